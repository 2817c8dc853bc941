"""Multi-turn state reuse: a tree of cached prompt prefixes, each entry a KDA state slot plus MLA KV blocks.

A KDA layer's state is recurrent: it exists only at the exact length it was saved at, so an entry restores a
request to exactly its length and the request computes the rest. Entries come from three places (all chosen
by the scheduler): prefill checkpoints every `interval` prompt tokens, the end of each prompt, branch points
(where a prompt leaves a cached path), and the end of every finished turn (prompt + generated tokens).

The tree:
- an *aligned* node covers `interval` tokens [start, start + interval) (start a multiple of interval) and
  holds the KV blocks of those tokens; it may also hold the state slot at its end. Its key is a chained hash
  (parent hash, its tokens), indexed globally, and every hit compares the tokens (hashes can collide).
- a *tail* node hangs under an aligned node, covers 1..interval-1 tokens past it, and always holds a state
  slot (an entry at an unaligned length). Its last KV block may be partly filled: a request resuming from it
  copies that block before appending (copy-on-write).
Each node holds one reference on each of its blocks; requests hold their own, so dropping an entry never
frees KV a running request reads. A request that will restore a node's state pins the node until the copy
has run; pinned nodes are never evicted. Eviction is least-recently-used over entries' states and over
leaves without a state (which serve nothing), and a leaf that loses its state leaves the tree.

Plain Python on purpose: the engine tests it without torch.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from dataclasses import dataclass
from typing import Sequence

from .kv_blocks import KVBlockManager
from .state_slots import StateSlotPool

ROOT_HASH = 0x6B6461  # any constant; the chain starts here


def chain_hash(parent_hash: int, tokens: tuple[int, ...]) -> int:
    return hash((parent_hash, tokens))


class CacheNode:
    __slots__ = ("parent", "tokens", "start", "hash", "blocks", "slot", "children", "tails", "is_tail", "pins",
                 "last_used", "removed", "tail_lengths", "branches")

    def __init__(self, parent, tokens, start, hash_, blocks, is_tail):
        self.parent: CacheNode | None = parent
        self.tokens: tuple[int, ...] = tokens
        self.start = start
        self.hash = hash_
        self.blocks: list[int] = blocks  # KV blocks of positions [start, end)
        self.slot: int | None = None
        self.children: dict[int, CacheNode] = {}  # aligned children by hash
        self.tails: dict[tuple[int, ...], CacheNode] = {}
        # For lookups that cost no more with many entries below a node (the root holds every short prompt's):
        # how many tails of each length, and the tokens of every child and tail, sorted.
        self.tail_lengths: dict[int, int] = {}
        self.branches: list[tuple[int, ...]] = []
        self.is_tail = is_tail
        self.pins = 0
        self.last_used = 0
        self.removed = False

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def is_leaf(self) -> bool:
        return not self.children and not self.tails


class PathCursor:
    """One request's place in the tree, kept while it runs, so that its prompt's checkpoints and entries cost
    the tree work of their own tokens rather than of the whole prefix each time (a prompt of L tokens saves
    up to L / interval checkpoints; walking and hashing from the root for each cost O(L^2): 0.7 s of host time
    at 128K tokens). It memoises the chained hashes of the aligned boundaries of tokens[:limit] (tokens that
    never change: the prompt) and holds the deepest aligned node verified on its path, from which walks resume
    while it is in the tree (an attached node's ancestors are attached)."""

    __slots__ = ("tokens", "limit", "hashes", "node")

    def __init__(self, tokens: Sequence[int], limit: int, root: "CacheNode"):
        self.tokens = tokens
        self.limit = limit
        self.hashes: list[int] = []  # hashes[i]: the boundary (i + 1) * interval
        self.node = root


@dataclass
class PrefixHit:
    """The result of a lookup. `node` is None when nothing can be restored (length 0).

    length: tokens restored. blocks: KV blocks of positions [0, length) (the last one partly filled when
    length is not a multiple of the block size). slot: the state slot to copy from. match_len: how far the
    prompt follows a cached path at all (>= length); a prompt that stops following it there leaves the tree
    at a branch point worth saving.
    """

    node: CacheNode | None
    length: int
    blocks: list[int]
    slot: int | None
    match_len: int


class PrefixCache:
    def __init__(self, interval: int, slots: StateSlotPool, blocks: KVBlockManager):
        if not isinstance(interval, int) or interval < 1 or interval % blocks.block_size:
            raise ValueError(f"PrefixCache: 'interval' must be a positive multiple of the block size, got {interval}")
        self.interval = interval
        self.slots = slots
        self.block_mgr = blocks
        self.root = CacheNode(None, (), 0, ROOT_HASH, [], is_tail=False)
        self._index: dict[int, CacheNode] = {}  # aligned nodes by chained hash
        self._clock = itertools.count(1)
        # Eviction candidates as a lazy heap of (last_used, tiebreak, node): stale entries (the node was used
        # again, removed, or cannot be evicted now) are skipped when popped; a node is pushed again whenever
        # it is used or may have become evictable.
        self._heap: list[tuple[int, int, CacheNode]] = []
        self._tiebreak = itertools.count()
        self.num_entries = 0  # nodes holding a state slot

    # ---- lookup -------------------------------------------------------------------------------------------

    def cursor(self, tokens: Sequence[int], limit: int) -> PathCursor:
        """A cursor for a request's tokens, of which tokens[:limit] never change (PathCursor)."""
        return PathCursor(tokens, limit, self.root)

    def boundary_hashes(self, tokens: Sequence[int], upto: int, cursor: PathCursor | None = None) -> list[int]:
        """Chained hashes of the aligned boundaries interval, 2*interval, ... <= upto (with a cursor over these
        tokens, those within its limit computed once)."""
        memo = cursor.hashes if cursor is not None else []
        limit = cursor.limit if cursor is not None else 0
        hashes = memo[: upto // self.interval]
        for start in range(len(hashes) * self.interval, upto - self.interval + 1, self.interval):
            hashes.append(chain_hash(hashes[-1] if hashes else ROOT_HASH, tuple(tokens[start : start + self.interval])))
            if start + self.interval <= limit:  # within the unchanging tokens: the memo's next boundary
                memo.append(hashes[-1])
        return hashes

    def _resume(self, cursor: PathCursor | None, length: int) -> CacheNode:
        """Where a walk over the cursor's tokens up to length may start: its node while that is in the tree
        (climbing to an ancestor at or before length), else the root."""
        if cursor is None or cursor.node.removed:
            return self.root
        node = cursor.node
        while node.end > length:
            node = node.parent
        return node

    def _aligned_path(self, tokens: Sequence[int], cursor: PathCursor | None = None,
                      start_node: CacheNode | None = None, end: int | None = None) -> list[CacheNode]:
        """The aligned nodes tokens[:end] follows from start_node (the root by default), each checked token for
        token; with a cursor, its deepest one becomes the cursor's node."""
        node = start_node or self.root
        path = [node]
        end = len(tokens) if end is None else end
        hashes = self.boundary_hashes(tokens, end, cursor) if cursor is not None else None
        for start in range(node.end, end - self.interval + 1, self.interval):
            chunk = tuple(tokens[start : start + self.interval])
            h = hashes[start // self.interval] if hashes is not None else chain_hash(node.hash, chunk)
            child = self._index.get(h)
            if child is None or child.parent is not node or child.tokens != chunk:
                break
            path.append(child)
            node = child
        if cursor is not None:
            cursor.node = node
        return path

    def cached_lengths(self, tokens: Sequence[int], cursor: PathCursor | None = None, start: int = 0,
                       end: int | None = None) -> set[int]:
        """The aligned boundaries of tokens[:end] after start that already have a cached state (saving them
        again is wasted). With a cursor the walk resumes from its node."""
        node = self._resume(cursor, start)
        path = self._aligned_path(tokens, cursor, node, end)
        return {n.end for n in path if n.slot is not None and n.end > start}

    def lookup(self, tokens: Sequence[int], max_len: int, cursor: PathCursor | None = None) -> PrefixHit:
        """The longest cached entry that is a prefix of tokens and no longer than max_len (callers pass
        prompt_len - 1: at least one token must be computed to produce logits). Marks the entry used."""
        path = self._aligned_path(tokens, cursor)
        best: CacheNode | None = None
        for node in path:
            if node.slot is not None and node.end <= max_len and (best is None or node.end > best.end):
                best = node
            # the longest tail that the tokens continue with: one dict probe per tail length present, longest
            # first (not a scan of the tails: the root holds one for every short prompt cached)
            room = min(len(tokens), max_len) - node.end
            for length in sorted(node.tail_lengths, reverse=True):
                if length > room:
                    continue
                if best is not None and node.end + length <= best.end:
                    break
                tail = node.tails.get(tuple(tokens[node.end : node.end + length]))
                if tail is not None:
                    best = tail
                    break
        last = path[-1]
        match_len = last.end
        # how far the tokens follow any child or tail of the last node: the longest common prefix with a set of
        # sorted sequences is with a neighbour of the tokens' place among them
        rest = tuple(tokens[last.end : last.end + self.interval])
        at = bisect.bisect_left(last.branches, rest)
        for other in last.branches[max(at - 1, 0) : at + 1]:
            common = 0
            for a, b in zip(rest, other):
                if a != b:
                    break
                common += 1
            match_len = max(match_len, last.end + common)
        if best is None:
            return PrefixHit(None, 0, [], None, match_len)
        self._touch(best)
        return PrefixHit(best, best.end, self.chain_blocks(best), best.slot, match_len)

    def chain_blocks(self, node: CacheNode) -> list[int]:
        chain = []
        while node is not None:
            chain.append(node.blocks)
            node = node.parent
        return [b for blocks in reversed(chain) for b in blocks]

    def _touch(self, node: CacheNode) -> None:
        """Marks an entry used. Only its own state counts: its ancestors' blocks stay while it lives anyway,
        and their states were not used."""
        node.last_used = next(self._clock)
        self._push(node)

    def _push(self, node: CacheNode) -> None:
        heapq.heappush(self._heap, (node.last_used, next(self._tiebreak), node))
        if len(self._heap) > 64 + 4 * len(self._index) + 4 * self.num_entries:
            self._heap = [e for e in self._heap if not e[2].removed and e[0] == e[2].last_used]
            heapq.heapify(self._heap)

    def pin(self, node: CacheNode) -> None:
        node.pins += 1

    def unpin(self, node: CacheNode) -> None:
        if node.pins <= 0:
            raise ValueError("PrefixCache: unpin of a node that is not pinned")
        node.pins -= 1
        if node.pins == 0:
            self._push(node)

    # ---- insertion ----------------------------------------------------------------------------------------

    def insert(self, tokens: Sequence[int], length: int, block_table: Sequence[int], slot: int,
               cursor: PathCursor | None = None) -> bool:
        """Caches the state in `slot` as the entry for tokens[:length], with KV from the request's block_table.

        Creates the missing aligned nodes up to `length` (each taking a reference on the request's blocks
        for its tokens). Returns True if the cache took ownership of the slot, False if an entry for this
        prefix already exists (or a hash collision blocks the path): the caller keeps the slot then. With a
        cursor over these tokens the walk resumes from its node, and the deepest aligned node becomes it.
        """
        if length <= 0 or length > len(tokens):
            raise ValueError(f"PrefixCache: insert length {length} outside [1, {len(tokens)}]")
        bs = self.block_mgr.block_size
        if len(block_table) < -(-length // bs):
            raise ValueError(f"PrefixCache: block_table holds {len(block_table)} blocks, {length} tokens need more")
        node = self._resume(cursor, length)
        hashes = self.boundary_hashes(tokens, length, cursor) if cursor is not None else None
        for start in range(node.end, length - self.interval + 1, self.interval):
            chunk = tuple(tokens[start : start + self.interval])
            h = hashes[start // self.interval] if hashes is not None else chain_hash(node.hash, chunk)
            child = self._index.get(h)
            if child is None:
                blocks = list(block_table[start // bs : (start + self.interval) // bs])
                self.block_mgr.incref(blocks)
                child = CacheNode(node, chunk, start, h, blocks, is_tail=False)
                self._index[h] = child
                node.children[h] = child
                bisect.insort(node.branches, chunk)
            elif child.parent is not node or child.tokens != chunk:
                self._drop_useless(node)
                return False
            node = child
        if cursor is not None:
            cursor.node = node
        if node.end == length:
            target = node
        else:
            tail_tokens = tuple(tokens[node.end : length])
            target = node.tails.get(tail_tokens)
            if target is None:
                blocks = list(block_table[node.end // bs : -(-length // bs)])
                self.block_mgr.incref(blocks)
                target = CacheNode(node, tail_tokens, node.end, None, blocks, is_tail=True)
                node.tails[tail_tokens] = target
                node.tail_lengths[len(tail_tokens)] = node.tail_lengths.get(len(tail_tokens), 0) + 1
                bisect.insort(node.branches, tail_tokens)
        self._touch(target)
        if target.slot is not None:
            self._drop_useless(node)
            return False
        target.slot = slot
        self.num_entries += 1
        return True

    # ---- eviction -----------------------------------------------------------------------------------------

    def _nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            stack.extend(node.tails.values())
            if node is not self.root:
                yield node

    def _evictable(self, node: CacheNode) -> bool:
        return node.pins == 0 and (node.slot is not None or node.is_leaf)

    def evict_one(self) -> bool:
        """Drops the least recently used evictable state or stateless leaf. False if nothing can go."""
        while self._heap:
            last_used, _, victim = heapq.heappop(self._heap)
            if victim.removed or last_used != victim.last_used or not self._evictable(victim):
                continue
            if victim.slot is not None:
                self.slots.free(victim.slot)
                victim.slot = None
                self.num_entries -= 1
            self._drop_useless(victim)
            return True
        return False

    def make_room(self, num_slots: int, num_blocks: int) -> bool:
        """Evicts LRU until the pools have num_slots free slots and num_blocks free blocks (False if it can't)."""
        while self.slots.num_free < num_slots or self.block_mgr.num_free < num_blocks:
            if not self.evict_one():
                return False
        return True

    def _drop_useless(self, node: CacheNode) -> None:
        """Removes node and then its ancestors while they are unpinned leaves without a state."""
        while node is not self.root and node.is_leaf and node.slot is None and node.pins == 0:
            parent = node.parent
            if node.is_tail:
                del parent.tails[node.tokens]
                n = len(node.tokens)
                parent.tail_lengths[n] -= 1
                if not parent.tail_lengths[n]:
                    del parent.tail_lengths[n]
            else:
                del parent.children[node.hash]
                del self._index[node.hash]
            del parent.branches[bisect.bisect_left(parent.branches, node.tokens)]
            self.block_mgr.decref(node.blocks)
            node.removed = True
            node = parent
        if node is not self.root and self._evictable(node):
            self._push(node)  # a node that just lost its last child may now be evictable

    def clear(self) -> None:
        """Evicts everything not pinned."""
        while self.evict_one():
            pass

    # ---- accounting ---------------------------------------------------------------------------------------

    def num_nodes(self) -> int:
        return sum(1 for _ in self._nodes())
