"""PrefixCache on its own: lookups, tails, the token check, pins and LRU eviction (no torch)."""

import pytest

from kda_serving.cache import KVBlockManager, PrefixCache, StateSlotPool
from kda_serving.cache import prefix_cache as pc


def make(slots=8, blocks=32, block_size=2, interval=4):
    pool, bm = StateSlotPool(slots), KVBlockManager(blocks, block_size)
    return PrefixCache(interval, pool, bm), pool, bm


def request(pool, bm, length, block_size=2):
    """A finished request's slot and block table for `length` computed tokens."""
    return pool.allocate(), bm.allocate(-(-length // block_size))


def test_lookup_finds_longest_entry_within_max_len():
    cache, pool, bm = make()
    tokens = list(range(10))
    slot, table = request(pool, bm, 10)
    assert cache.insert(tokens, 10, table, slot)
    bm.decref(table)  # the request ends; the cache keeps its own references
    slot8, table8 = request(pool, bm, 8)
    assert cache.insert(tokens, 8, table8, slot8)
    bm.decref(table8)
    hit = cache.lookup(tokens + [99], max_len=10)
    assert (hit.length, hit.slot) == (10, slot) and hit.blocks == cache.chain_blocks(hit.node)
    assert len(hit.blocks) == 5
    hit = cache.lookup(tokens + [99], max_len=9)
    assert (hit.length, hit.slot) == (8, slot8)
    assert cache.lookup([5] + tokens, max_len=10).length == 0
    hit = cache.lookup(tokens[:6] + [7, 7, 7], max_len=8)  # leaves the path inside the second chunk
    assert hit.length == 0 and hit.match_len == 6


def test_tail_entries_need_their_tokens():
    cache, pool, bm = make()
    slot, table = request(pool, bm, 7)
    cache.insert([1, 2, 3, 4, 5, 6, 7], 7, table, slot)
    assert cache.lookup([1, 2, 3, 4, 5, 6, 7, 8], 7).length == 7
    assert cache.lookup([1, 2, 3, 4, 5, 9, 7, 8], 7).length == 0


def test_duplicate_insert_leaves_the_slot_with_the_caller():
    cache, pool, bm = make()
    s1, t1 = request(pool, bm, 4)
    s2, t2 = request(pool, bm, 4)
    assert cache.insert([1, 2, 3, 4], 4, t1, s1)
    assert not cache.insert([1, 2, 3, 4], 4, t2, s2)
    assert cache.num_entries == 1


def test_hash_collision_is_caught_by_the_token_check(monkeypatch):
    monkeypatch.setattr(pc, "chain_hash", lambda parent, tokens: 12345)
    cache, pool, bm = make()
    slot, table = request(pool, bm, 4)
    cache.insert([1, 1, 1, 1], 4, table, slot)
    assert cache.lookup([2, 2, 2, 2, 2], 4).length == 0  # same hash, other tokens: no hit
    s2, t2 = request(pool, bm, 4)
    assert not cache.insert([2, 2, 2, 2], 4, t2, s2)  # and no entry claims the colliding path
    assert cache.lookup([1, 1, 1, 1, 1], 4).length == 4


def test_eviction_is_lru_and_skips_pinned_entries():
    cache, pool, bm = make(slots=4)
    entries = []
    for i in range(3):
        tokens = [i] * 4
        slot, table = request(pool, bm, 4)
        cache.insert(tokens, 4, table, slot)
        bm.decref(table)
        entries.append(tokens)
    hit0 = cache.lookup(entries[0] + [0], 4)  # entry 0 is now the most recent
    cache.pin(hit0.node)
    assert cache.evict_one()
    assert cache.lookup(entries[1] + [0], 4).length == 0  # entry 1 was least recently used
    assert cache.evict_one()
    assert not cache.evict_one()  # only the pinned entry is left
    assert cache.lookup(entries[0] + [0], 4).length == 4
    cache.unpin(hit0.node)
    cache.clear()
    assert pool.num_free == 4 and bm.num_free == 32


def test_evicting_a_state_keeps_blocks_that_descendants_need():
    cache, pool, bm = make()
    tokens = list(range(8))
    s4, t = request(pool, bm, 8)
    s8 = pool.allocate()
    cache.insert(tokens, 4, t, s4)
    cache.insert(tokens, 8, t, s8)
    bm.decref(t)
    cache.lookup(tokens + [1], 8)  # touch the 8-entry; the 4-entry is older
    assert cache.evict_one()
    assert cache.lookup(tokens + [1], 8).length == 8 and cache.lookup(tokens[:5], 4).length == 0
    assert bm.num_used == 4
    assert cache.evict_one() and bm.num_used == 0 and pool.num_used == 0


def test_make_room_reports_failure_when_pins_block_it():
    cache, pool, bm = make(slots=2)
    slot, table = request(pool, bm, 4)
    cache.insert([1] * 4, 4, table, slot)
    cache.pin(cache.lookup([1] * 5, 4).node)
    assert not cache.make_room(2, 0)


def test_bad_arguments():
    pool, bm = StateSlotPool(2), KVBlockManager(4, 4)
    with pytest.raises(ValueError, match="interval"):
        PrefixCache(6, pool, bm)
    cache = PrefixCache(4, pool, bm)
    with pytest.raises(ValueError, match="insert length"):
        cache.insert([1, 2], 3, [0], 0)
    with pytest.raises(ValueError, match="not pinned"):
        cache.unpin(cache.root)


def _path_tokens(node) -> tuple:
    """The tokens from the root to the end of node."""
    parts = []
    while node is not None:
        parts.append(node.tokens)
        node = node.parent
    return tuple(t for part in reversed(parts) for t in part)


def _common(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_lookups_match_the_definitions_under_random_inserts_and_evictions():
    """Prompts over 3 token values (so prefixes, tails and branches collide often) inserted at random lengths,
    evicted at random, looked up at random, some through cursors kept across operations (a running
    request's): every hit is the longest cached entry that is a prefix of the tokens within max_len, match_len
    the longest common prefix of the tokens with any cached node's path (what the branch-point saving reads),
    and a cursor's cached boundaries those of the aligned nodes on its path. Written from the definitions over
    the whole tree, so the indexed lookups (tails by length, branches sorted) and the walks resumed from a
    cursor's node must agree with a scan of every node."""
    import random

    rng = random.Random(0)
    cache, pool, bm = make(slots=24, blocks=400, block_size=2, interval=4)
    live = []  # requests that keep a cursor across operations, as the scheduler's running requests do
    inserted = set()
    for step in range(600):
        tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 14))]
        cursor = None
        if live and rng.random() < 0.5:
            tokens, cursor = rng.choice(live)
        elif rng.random() < 0.3:
            cursor = cache.cursor(tokens, len(tokens))
            live = (live + [(tokens, cursor)])[-4:]
        if rng.random() < 0.5:
            length = rng.randrange(1, len(tokens) + 1)
            if not cache.make_room(1, -(-length // 2)):
                continue
            slot, table = request(pool, bm, length)
            if cache.insert(tokens, length, table, slot, cursor):
                inserted.add(tuple(tokens[:length]))
            else:
                pool.free(slot)
            bm.decref(table)
            for n in cache._nodes():  # the tree's shape, and every entry one that was inserted
                assert (0 < len(n.tokens) < 4) if n.is_tail else (len(n.tokens) == 4 and n.start % 4 == 0)
                assert n.start == n.parent.end and (n.slot is None or _path_tokens(n) in inserted)
            continue
        if cursor is not None:  # what the scheduler asks at each prompt chunk: the cached boundaries past start
            start, end = rng.randrange(len(tokens) + 1), len(tokens)
            expected = {n.end for n in cache._nodes() if n.slot is not None and not n.is_tail
                        and start < n.end <= end and _path_tokens(n) == tuple(tokens[: n.end])}
            assert cache.cached_lengths(tokens, cursor, start, end) == expected, (step, tokens, start)
            assert cache.boundary_hashes(tokens, end, cursor) == cache.boundary_hashes(tokens, end)
        if rng.random() < 0.1:
            cache.evict_one()
        max_len = rng.randrange(0, len(tokens) + 1)
        nodes = list(cache._nodes())
        entries = [len(p) for n in nodes if n.slot is not None
                   for p in [_path_tokens(n)] if len(p) <= max_len and tuple(tokens[: len(p)]) == p]
        match = max([0] + [_common(tokens, _path_tokens(n)) for n in nodes])
        hit = cache.lookup(tokens, max_len, cursor)
        assert hit.length == max(entries, default=0), (step, tokens, max_len)
        assert hit.match_len == match, (step, tokens)
        if hit.node is not None:
            assert _path_tokens(hit.node) == tuple(tokens[: hit.length]) and hit.slot == hit.node.slot
    assert cache.num_entries > 5  # the run kept a populated tree
