"""StateSlotPool and KVBlockManager: allocation, reference counts, double frees, no leaks (no torch)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kda_serving.cache import KVBlockManager, StateSlotPool


def test_slot_pool_hands_out_each_slot_once_and_reuses_lowest():
    pool = StateSlotPool(3)
    got = [pool.allocate() for _ in range(3)]
    assert sorted(got) == [0, 1, 2] and pool.num_free == 0
    assert pool.allocate() is None
    pool.free(2)
    pool.free(0)
    assert pool.allocate() == 0 and pool.allocate() == 2


def test_slot_pool_rejects_double_free_and_bad_ids():
    pool = StateSlotPool(2)
    s = pool.allocate()
    pool.free(s)
    with pytest.raises(ValueError, match="double free"):
        pool.free(s)
    with pytest.raises(ValueError, match="out of range"):
        pool.free(5)
    with pytest.raises(ValueError, match="num_slots"):
        StateSlotPool(0)


def test_block_manager_refcounts_free_on_last_reference():
    bm = KVBlockManager(4, 16)
    a = bm.allocate(3)
    assert bm.num_free == 1 and bm.allocate(2) is None and bm.num_free == 1  # all or nothing
    bm.incref(a[:2])
    bm.decref(a)
    assert bm.num_free == 2 and [bm.ref_count(b) for b in a] == [1, 1, 0]
    bm.decref(a[:2])
    assert bm.num_free == 4
    with pytest.raises(ValueError, match="double free"):
        bm.decref([a[0]])
    with pytest.raises(ValueError, match="free"):
        bm.incref([a[0]])
    assert bm.blocks_for(0) == 0 and bm.blocks_for(16) == 1 and bm.blocks_for(17) == 2


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "share", "drop"]), st.integers(0, 7)), max_size=60))
def test_random_block_traffic_never_leaks_or_double_uses(ops):
    bm = KVBlockManager(8, 4)
    holders: list[list[int]] = []  # each holder owns one reference on each of its blocks
    for op, n in ops:
        if op == "alloc":
            got = bm.allocate(n % 4 + 1)
            if got is not None:
                assert not set(got) & {b for h in holders for b in h if bm.ref_count(b) > 0} - set(got)
                holders.append(got)
        elif op == "free" and holders:
            bm.decref(holders.pop(n % len(holders)))
        elif op == "share" and holders:
            shared = list(holders[n % len(holders)])
            bm.incref(shared)
            holders.append(shared)
        elif op == "drop" and holders:
            bm.decref(holders.pop(0))
        expected = {}
        for h in holders:
            for b in h:
                expected[b] = expected.get(b, 0) + 1
        assert all(bm.ref_count(b) == c for b, c in expected.items())
        assert bm.num_used == len(expected)
    for h in holders:
        bm.decref(h)
    assert bm.num_free == 8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), max_size=80))
def test_random_slot_traffic(allocs):
    pool = StateSlotPool(5)
    held = []
    for alloc in allocs:
        if alloc:
            s = pool.allocate()
            if s is None:
                assert len(held) == 5
            else:
                assert s not in held
                held.append(s)
        elif held:
            pool.free(held.pop(0))
        assert pool.num_used == len(held)
    for s in held:
        pool.free(s)
    assert pool.num_free == 5
