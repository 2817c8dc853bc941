"""State-pool semantics of kda_prefill and kda_decode: indexing, in-place updates, padding, masks."""

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kda_testing import EXTREME_GATES, cu_seqlens_of, make_kda_inputs, rel_err
from kda_serving.ops import PAD_SLOT, kda_decode, kda_prefill, kda_recurrent_reference, slot_visit_order

TOL = 3e-4  # float32 rounding, amplified by the chunk's triangular solve when gates are extreme


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(0, 90), min_size=1, max_size=6),
    pool_extra=st.integers(0, 5),
    data=st.data(),
)
def test_pool_prefill_equals_independent_dense_calls(lengths, pool_extra, data):
    """Each sequence of a packed pool-mode call gets exactly what it would get alone with a dense state."""
    N = len(lengths)
    S = N + pool_extra
    slots = data.draw(st.permutations(range(S)))[:N]
    has_init = data.draw(st.lists(st.booleans(), min_size=N, max_size=N))
    seed = data.draw(st.integers(0, 2**31 - 1))
    lb = data.draw(st.sampled_from([None, -5.0]))
    gen = torch.Generator().manual_seed(seed)
    H, K, V = 2, 16, 8
    T = sum(lengths)
    q, k, v, g, beta, A_log, dt = make_kda_inputs(1, T, H, K, V, generator=gen, **EXTREME_GATES)
    pool = torch.randn(S, H, V, K, generator=gen)
    before = pool.clone()
    idx = torch.tensor(slots, dtype=torch.int32)
    mask = torch.tensor(has_init)
    got = kda_prefill(q, k, v, g, beta, A_log, dt, lower_bound=lb, cu_seqlens=cu_seqlens_of(lengths),
                      state_pool=pool, state_indices=idx, has_initial_state=mask)
    start = 0
    for n, L in enumerate(lengths):
        init = before[slots[n]] if has_init[n] else torch.zeros(H, V, K)
        part = [x[:, start:start + L] for x in (q, k, v, g, beta)]
        ref = kda_recurrent_reference(*part, A_log, dt, lower_bound=lb, initial_state=init.unsqueeze(0),
                                      output_final_state=True)
        if L:
            assert rel_err(got.out[:, start:start + L], ref.out) <= TOL
        assert rel_err(pool[slots[n]], ref.final_state[0]) <= TOL or L == 0 and torch.equal(pool[slots[n]], init)
        start += L
    for s in set(range(S)) - set(slots):
        assert torch.equal(pool[s], before[s]), f"slot {s} not in state_indices was modified"


def test_padding_entries_touch_nothing():
    gen = torch.Generator().manual_seed(1)
    q, k, v, g, beta, A_log, dt = make_kda_inputs(1, 30, 2, 16, generator=gen)
    pool = torch.randn(4, 2, 16, 16, generator=gen)
    before = pool.clone()
    out, _ = kda_prefill(q, k, v, g, beta, A_log, dt, cu_seqlens=cu_seqlens_of([10, 20]), state_pool=pool,
                         state_indices=torch.tensor([PAD_SLOT, 2]))
    assert torch.equal(out[:, :10], torch.zeros_like(out[:, :10]))
    assert torch.equal(pool[[0, 1, 3]], before[[0, 1, 3]])
    assert not torch.equal(pool[2], before[2])


def test_pool_bf16_rounds_once():
    gen = torch.Generator().manual_seed(2)
    q, k, v, g, beta, A_log, dt = make_kda_inputs(1, 50, 2, 16, generator=gen, **EXTREME_GATES)
    pool = torch.randn(3, 2, 16, 16, generator=gen).bfloat16()
    init = pool[1].float().clone()
    kda_prefill(q, k, v, g, beta, A_log, dt, state_pool=pool, state_indices=torch.tensor([1]))
    ref = kda_recurrent_reference(q, k, v, g, beta, A_log, dt, initial_state=init.unsqueeze(0), output_final_state=True)
    assert pool.dtype == torch.bfloat16
    assert rel_err(pool[1], ref.final_state[0]) <= 1e-2


def _decode_inputs(gen, N, T, H=2, K=16, V=8):
    q, k, v, g, beta, A_log, dt = make_kda_inputs(N, T, H, K, V, generator=gen, **EXTREME_GATES)
    return q, k, v, g, beta, A_log, dt


def test_decode_steps_equal_prefill():
    """T decode steps on the pool == one prefill of T tokens, for every sequence."""
    gen = torch.Generator().manual_seed(3)
    N, T, H, K, V = 3, 5, 2, 16, 8
    q, k, v, g, beta, A_log, dt = _decode_inputs(gen, N, T, H, K, V)
    pool = torch.randn(6, H, V, K, generator=gen)
    slots = torch.tensor([4, 0, 2])
    init = pool[slots].clone()
    outs = []
    for t in range(T):
        outs.append(kda_decode(*(x[:, t:t + 1].contiguous() for x in (q, k, v, g, beta)), A_log, dt, pool, slots))
    ref = kda_recurrent_reference(q, k, v, g, beta, A_log, dt, initial_state=init, output_final_state=True)
    assert rel_err(torch.cat(outs, 1), ref.out) <= TOL
    assert rel_err(pool[slots], ref.final_state) <= TOL


def test_decode_multi_token_intermediate_slots():
    gen = torch.Generator().manual_seed(4)
    N, T, H, K, V = 2, 3, 2, 16, 8
    q, k, v, g, beta, A_log, dt = _decode_inputs(gen, N, T, H, K, V)
    pool = torch.randn(10, H, V, K, generator=gen)
    before = pool.clone()
    slots = torch.tensor([1, 5])
    inter = torch.tensor([[2, 3, 4], [6, 7, 8]])
    out = kda_decode(q, k, v, g, beta, A_log, dt, pool, slots, intermediate_slots=inter)
    assert torch.equal(pool[slots], before[slots]), "with intermediate slots the starting slot is only read"
    for t in range(T):
        part = [x[:, : t + 1].contiguous() for x in (q, k, v, g, beta)]
        ref = kda_recurrent_reference(*part, A_log, dt, initial_state=before[slots], output_final_state=True)
        assert rel_err(pool[inter[:, t]], ref.final_state) <= TOL
        assert rel_err(out[:, : t + 1], ref.out) <= TOL
    assert torch.equal(pool[[0, 9]], before[[0, 9]])


def test_decode_padding_with_intermediate_slots():
    """A padded entry beside real ones, and intermediate slots that skip a token (-1): the real rows match the
    reference, the padded row is zero, and only the named slots change."""
    gen = torch.Generator().manual_seed(6)
    N, T, H, K, V = 3, 2, 2, 16, 8
    q, k, v, g, beta, A_log, dt = _decode_inputs(gen, N, T, H, K, V)
    pool = torch.randn(9, H, V, K, generator=gen)
    before = pool.clone()
    slots = torch.tensor([4, PAD_SLOT, 0])
    inter = torch.tensor([[PAD_SLOT, 5], [7, 8], [1, 2]])
    out = kda_decode(q, k, v, g, beta, A_log, dt, pool, slots, intermediate_slots=inter)
    real = torch.tensor([0, 2])
    ref = kda_recurrent_reference(*(x[real] for x in (q, k, v, g, beta)), A_log, dt, initial_state=before[slots[real]],
                                  output_final_state=True)
    assert rel_err(out[real], ref.out) <= TOL and torch.equal(out[1], torch.zeros_like(out[1]))
    assert rel_err(pool[[5, 2]], ref.final_state) <= TOL
    changed = [1, 2, 5]
    keep = [s for s in range(9) if s not in changed]
    assert torch.equal(pool[keep], before[keep])


def test_decode_padding():
    gen = torch.Generator().manual_seed(5)
    q, k, v, g, beta, A_log, dt = _decode_inputs(gen, 2, 1)
    pool = torch.randn(3, 2, 8, 16, generator=gen)
    before = pool.clone()
    out = kda_decode(q, k, v, g, beta, A_log, dt, pool, torch.tensor([PAD_SLOT, 0]))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(pool[1:], before[1:]) and not torch.equal(pool[0], before[0])


def test_slot_visit_order_sorts_by_slot_and_keeps_each_sequence():
    slots = torch.tensor([7, PAD_SLOT, 2, 9, 0], dtype=torch.int64)
    visit = slot_visit_order(slots)
    assert visit.dtype == torch.int32 and visit.tolist() == [[1, -1], [4, 0], [2, 2], [0, 7], [3, 9]]
    assert slot_visit_order(torch.empty(0, dtype=torch.int32)).shape == (0, 2)


def test_decode_with_a_visit_order_gives_the_same_results():
    gen = torch.Generator().manual_seed(8)
    q, k, v, g, beta, A_log, dt = _decode_inputs(gen, 4, 1)
    pool = torch.randn(6, 2, 8, 16, generator=gen)
    slots = torch.tensor([4, PAD_SLOT, 0, 3])
    pool2 = pool.clone()
    out = kda_decode(q, k, v, g, beta, A_log, dt, pool, slots)
    out2 = kda_decode(q, k, v, g, beta, A_log, dt, pool2, slots, visit_order=slot_visit_order(slots))
    assert torch.equal(out, out2) and torch.equal(pool, pool2)


def test_pools_with_strided_slots_are_used_in_place():
    """A pool that is a view into bigger pages (vLLM's layout): results equal a contiguous pool's, in place."""
    gen = torch.Generator().manual_seed(6)
    H, K, V, S = 2, 16, 8, 5
    q, k, v, g, beta, A_log, dt = make_kda_inputs(1, 40, H, K, V, generator=gen, **EXTREME_GATES)
    pages = torch.randn(S, H * V * K + 24, generator=gen)  # each page: this state plus 24 other values
    strided = pages[:, : H * V * K].view(S, H, V, K)
    assert not strided.is_contiguous()
    dense = strided.clone()
    others = pages[:, H * V * K:].clone()
    kw = dict(cu_seqlens=cu_seqlens_of([15, 25]), state_indices=torch.tensor([3, 1]))
    a = kda_prefill(q, k, v, g, beta, A_log, dt, state_pool=strided, **kw).out
    b = kda_prefill(q, k, v, g, beta, A_log, dt, state_pool=dense, **kw).out
    assert torch.equal(a, b) and torch.equal(strided, dense)
    assert torch.equal(pages[:, H * V * K:], others), "the rest of each page must be untouched"
    q1, k1, v1, g1, b1, _, _ = make_kda_inputs(2, 1, H, K, V, generator=gen)
    o1 = kda_decode(q1, k1, v1, g1, b1, A_log, dt, strided, torch.tensor([3, 1]))
    o2 = kda_decode(q1, k1, v1, g1, b1, A_log, dt, dense, torch.tensor([3, 1]))
    assert torch.equal(o1, o2) and torch.equal(strided, dense)


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 40)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(N=st.integers(1, 5), T=st.integers(1, 3), data=st.data())
def test_decode_random_batches_match_the_reference(N, T, data):
    """Random decode calls: padded entries anywhere, a bf16 or fp32 pool, and (sometimes) intermediate slots with
    skipped tokens. Real rows match the float64 reference, padded rows are zero, and exactly the slots the call
    names as destinations change."""
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    H, K, V = 2, 16, 8
    q, k, v, g, beta, A_log, dt = _decode_inputs(gen, N, T, H, K, V)
    pool_dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]))
    S = N * (T + 1) + 2
    pool = torch.randn(S, H, V, K, generator=gen).to(pool_dtype)
    before = pool.clone()
    order = torch.randperm(S, generator=gen)
    slots = order[:N].clone()
    pad = torch.tensor(data.draw(st.lists(st.booleans(), min_size=N, max_size=N)))
    slots[pad] = PAD_SLOT
    inter = None
    if data.draw(st.booleans()):
        inter = order[N:N + N * T].reshape(N, T).clone()
        skip = torch.tensor(data.draw(st.lists(st.booleans(), min_size=N * T, max_size=N * T))).reshape(N, T)
        inter[skip] = PAD_SLOT
    out = kda_decode(q, k, v, g, beta, A_log, dt, pool, slots, intermediate_slots=inter)
    real = (~pad).nonzero().squeeze(1)
    assert torch.equal(out[pad], torch.zeros_like(out[pad]))
    changed = set()
    tol = 1e-2 if pool_dtype == torch.bfloat16 else TOL
    if len(real):
        ref = kda_recurrent_reference(*(x[real] for x in (q, k, v, g, beta)), A_log, dt,
                                      initial_state=before[slots[real]].float(), output_final_state=True)
        assert rel_err(out[real], ref.out) <= tol
        if inter is None:
            assert rel_err(pool[slots[real]].float(), ref.final_state) <= tol
            changed = set(slots[real].tolist())
        else:
            for t in range(T):
                part = kda_recurrent_reference(*(x[real, : t + 1] for x in (q, k, v, g, beta)), A_log, dt,
                                               initial_state=before[slots[real]].float(), output_final_state=True)
                for i, n in enumerate(real.tolist()):
                    dst = int(inter[n, t])
                    if dst != PAD_SLOT:
                        assert rel_err(pool[dst].float(), part.final_state[i]) <= tol
                        changed.add(dst)
    keep = [s for s in range(S) if s not in changed]
    assert torch.equal(pool[keep], before[keep]), "a slot the call did not name changed"
