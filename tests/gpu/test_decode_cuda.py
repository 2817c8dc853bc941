"""The CUDA decode kernel (csrc/decode) against the float64 recurrence.

Every case: fresh random inputs with extreme gates, outputs poisoned with NaN before the call, untouched pool
slots filled with 1e30 and checked bit-identical afterwards, padded entries (-1) giving zero output.
Tolerances (||x - ref|| / ||ref||): 1e-2 with a bf16 state pool, 8e-3 with fp32.
"""

from __future__ import annotations

import pytest
import torch

from kda_testing import EXTREME_GATES, MILD_GATES, make_kda_inputs, max_err, rel_err
from kda_serving.ops import PAD_SLOT, kda_decode, kda_recurrent_reference, slot_visit_order
from kda_serving.ops import cuda_decode

pytestmark = pytest.mark.gpu

DEV = "cuda"
TOL = {torch.bfloat16: 1e-2, torch.float32: 8e-3}
UNTOUCHED = 1e30


def _case(N, T, H, *, state_dtype, gates, pad=(), seed=0, extra_slots=3):
    """Inputs [N, T, H, 128], a pool with every slot poisoned and the used ones holding random states."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g, beta, A_log, dt_bias = make_kda_inputs(N, T, H, dtype=torch.bfloat16, device=DEV, generator=gen,
                                                       **gates)
    S = N + extra_slots
    pool = torch.full((S, H, 128, 128), UNTOUCHED, dtype=state_dtype, device=DEV)
    slots = torch.randperm(S, generator=gen)[:N]
    for n in pad:
        slots[n] = PAD_SLOT
    real = slots[slots != PAD_SLOT]
    pool[real.to(DEV)] = (torch.randn(len(real), H, 128, 128, generator=gen) * 0.3).to(DEV, state_dtype)
    return (q, k, v, g, beta, A_log, dt_bias), pool, slots.to(DEV, torch.int32)


def _reference(inputs, pool, slots, lower_bound):
    """float64 outputs [N, T, H, V] and final states [N, H, V, K] (zero for padded entries)."""
    q, k, v, g, beta, A_log, dt_bias = inputs
    return kda_recurrent_reference(q, k, v, g, beta, A_log, dt_bias, lower_bound=lower_bound,
                                   state_pool=pool, state_indices=slots)


def _decode(inputs, pool, slots, lower_bound, intermediate_slots=None, visit_order=None):
    q, k, v, g, beta, A_log, dt_bias = inputs
    out = torch.full_like(v, float("nan"))
    torch.ops.kda_serving.kda_decode_(q, k, v, g, beta, A_log, dt_bias, 128**-0.5, lower_bound, pool, slots,
                                      intermediate_slots, out, visit_order)
    return out


def _untouched_mask(S, *used) -> torch.Tensor:
    keep = torch.ones(S, dtype=torch.bool)
    for idx in used:
        idx = idx.reshape(-1).cpu().long()
        keep[idx[idx != PAD_SLOT]] = False
    return keep


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32_state", "bf16_state"])
@pytest.mark.parametrize("lower_bound", [None, -5.0], ids=["softplus", "lower_bound"])
# N300 H4: more CTAs than one wave. N64 H32: the benchmark's tightest case (bench_decode.py), 8192 CTAs with a
# bf16 pool, 16384 with fp32, over many waves, with two padded entries among them.
@pytest.mark.parametrize("N,H,pad", [(1, 32, ()), (7, 4, (2, 5)), (64, 3, (0, 63)), (300, 4, (0, 150, 299)),
                                     (64, 32, (5, 40))],
                         ids=["N1H32", "N7pad", "N64pad", "N300pad", "N64H32pad"])
def test_decode_matches_reference(state_dtype, lower_bound, N, H, pad):
    inputs, pool, slots = _case(N, 1, H, state_dtype=state_dtype, gates=EXTREME_GATES, pad=pad, seed=N * 31 + H)
    ref = _reference(inputs, pool, slots, lower_bound)
    before = pool.clone()
    out = _decode(inputs, pool, slots, lower_bound)
    torch.cuda.synchronize()

    assert not out.isnan().any(), "some outputs were never written"
    e_out, e_state = rel_err(out, ref.out), rel_err(pool[slots[slots >= 0].long()], ref.final_state[slots >= 0])
    print(f"out rel {e_out:.2e} max {max_err(out, ref.out):.2e}; state rel {e_state:.2e}")
    assert e_out <= TOL[state_dtype] and e_state <= TOL[state_dtype]
    pad_rows = slots == PAD_SLOT
    assert (out[pad_rows] == 0).all(), "padded entries must give zero output"
    keep = _untouched_mask(pool.shape[0], slots).to(DEV)
    assert torch.equal(pool[keep], before[keep]), "slots outside state_indices changed"


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32_state", "bf16_state"])
def test_decode_many_steps_stays_accurate(state_dtype):
    """20 consecutive decode steps through the pool (the state is re-rounded each step when bf16)."""
    N, H, steps = 5, 4, 20
    inputs, pool, slots = _case(N, steps, H, state_dtype=state_dtype, gates=MILD_GATES, seed=3)
    ref = _reference(inputs, pool, slots, -5.0)
    outs = []
    for t in range(steps):
        step = tuple(x[:, t : t + 1].contiguous() if x.dim() >= 3 else x for x in inputs)
        outs.append(_decode(step, pool, slots, -5.0))
    out = torch.cat(outs, dim=1)
    e_out, e_state = rel_err(out, ref.out), rel_err(pool[slots.long()], ref.final_state)
    print(f"out rel {e_out:.2e}; state rel {e_state:.2e}")
    assert e_out <= TOL[state_dtype] and e_state <= TOL[state_dtype]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32_state", "bf16_state"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_multi_token_intermediate_slots(state_dtype, index_dtype):
    """T = 4 tokens (speculative verification): the state after each token lands in its own slot, the
    source slot is only read, a -1 intermediate slot is skipped."""
    N, T, H = 6, 4, 4
    inputs, pool, slots = _case(N, T, H, state_dtype=state_dtype, gates=EXTREME_GATES, pad=(4,), seed=11,
                                extra_slots=N * T + 2)
    slots = slots.to(index_dtype)
    free = _untouched_mask(pool.shape[0], slots).nonzero().reshape(-1)
    inter = free[torch.randperm(len(free))[: N * T]].reshape(N, T).to(DEV, index_dtype)
    inter[1, 2] = PAD_SLOT
    before = pool.clone()
    out = _decode(inputs, pool, slots, None, inter)
    torch.cuda.synchronize()

    ref = _reference(inputs, before, slots, None)
    assert not out.isnan().any()
    e_out = rel_err(out, ref.out)
    assert e_out <= TOL[state_dtype], e_out
    for t in range(T):  # the state after token t: reference run on the first t+1 tokens
        prefix = tuple(x[:, : t + 1].contiguous() if x.dim() >= 3 else x for x in inputs)
        ref_t = _reference(prefix, before, slots, None).final_state
        rows = (slots >= 0) & (inter[:, t] >= 0)
        e_t = rel_err(pool[inter[rows, t].long()], ref_t[rows])
        print(f"token {t}: state rel {e_t:.2e}")
        assert e_t <= TOL[state_dtype]
    keep = _untouched_mask(pool.shape[0], slots, inter).to(DEV)
    real = slots[slots >= 0].long()
    assert torch.equal(pool[real], before[real]), "state_indices slots must only be read"
    assert torch.equal(pool[keep], before[keep])
    assert (out[4] == 0).all()


def test_unaligned_activations():
    """q, k, v, g as views at an odd element offset (not 16-byte aligned, as a slice of a larger buffer can be):
    accepted, and the same results; the kernels read the activations by element, only the state pool by
    16-byte chunks (its alignment is checked)."""
    N, H = 300, 4
    inputs, pool, slots = _case(N, 1, H, state_dtype=torch.bfloat16, gates=EXTREME_GATES, pad=(7,), seed=13)
    shifted = []
    for t in inputs[:4]:  # q, k, v, g
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=DEV)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        assert view.data_ptr() % 16 != 0
        shifted.append(view)
    ref = _reference(inputs, pool, slots, None)
    out = _decode((*shifted, *inputs[4:]), pool, slots, None)
    real = slots >= 0
    e_out = rel_err(out[real], ref.out[real])
    e_state = rel_err(pool[slots[real].long()], ref.final_state[real])
    print(f"out rel {e_out:.2e}; state rel {e_state:.2e}")
    assert not out.isnan().any() and e_out <= TOL[torch.bfloat16] and e_state <= TOL[torch.bfloat16]


@pytest.mark.parametrize("N,state_dtype", [(33, torch.float32), (600, torch.bfloat16)], ids=["fp32", "bf16_many"])
def test_two_runs_bit_identical(N, state_dtype):
    T = 1 if state_dtype == torch.bfloat16 else 2  # bf16 with one token: the bf16 step kernel, many waves of it
    inputs, pool, slots = _case(N, T, 8, state_dtype=state_dtype, gates=EXTREME_GATES, seed=5)
    pool2 = pool.clone()
    out1 = _decode(inputs, pool, slots, None)
    out2 = _decode(inputs, pool2, slots, None)
    assert torch.equal(out1, out2) and torch.equal(pool, pool2)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32_state", "bf16_state"])
def test_cuda_graph_replay_matches_eager(state_dtype):
    """Capture the public op once on static buffers, replay it on new inputs: same bits as eager calls."""
    N, H = 16, 8
    inputs, pool, slots = _case(N, 1, H, state_dtype=state_dtype, gates=EXTREME_GATES, pad=(3,), seed=9)
    static = [x.clone() for x in inputs]
    q, k, v, g, beta, A_log, dt_bias = static
    graph_pool = pool.clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture (library load, lazy module init)
        kda_decode(q, k, v, g, beta, A_log, dt_bias, graph_pool.clone(), slots)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = kda_decode(q, k, v, g, beta, A_log, dt_bias, graph_pool, slots)

    eager_pool = pool.clone()
    for step in range(3):
        fresh, _, _ = _case(N, 1, H, state_dtype=state_dtype, gates=EXTREME_GATES, seed=100 + step)
        for dst, src in zip(static[:5], fresh[:5]):
            dst.copy_(src)
        graph.replay()
        eager_out = kda_decode(*static, eager_pool, slots)
        torch.cuda.synchronize()
        assert not static_out.isnan().any()
        assert torch.equal(static_out, eager_out) and torch.equal(graph_pool, eager_pool)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32_state", "bf16_state"])
@pytest.mark.parametrize("N", [3, 300], ids=["one_wave", "many_waves"])
def test_graph_of_dependent_steps(state_dtype, N):
    """Consecutive steps on the same slots captured back to back in one graph: each kernel is launched with
    PDL and its first CTAs prefetch their state into L2 while the previous step may still be writing it, so
    every step must still read the previous step's result (float64 reference of the whole sequence)."""
    H, steps = 8, 6
    inputs, pool, slots = _case(N, steps, H, state_dtype=state_dtype, gates=EXTREME_GATES, pad=(1,), seed=21)
    ref = _reference(inputs, pool, slots, None)
    per_step = [tuple(x[:, t : t + 1].contiguous() if x.dim() >= 3 else x for x in inputs) for t in range(steps)]
    outs = [torch.full_like(s[2], float("nan")) for s in per_step]
    graph_pool = pool.clone()

    def run(target_pool):
        for (q, k, v, g, beta, A_log, dt_bias), out in zip(per_step, outs):
            torch.ops.kda_serving.kda_decode_(q, k, v, g, beta, A_log, dt_bias, 128**-0.5, None, target_pool,
                                              slots, None, out)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(pool.clone())  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    for out in outs:
        out.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(graph_pool)
    graph.replay()
    torch.cuda.synchronize()

    out = torch.cat(outs, dim=1)
    assert not out.isnan().any()
    real = slots >= 0
    e_out = rel_err(out[real], ref.out[real])
    e_state = rel_err(graph_pool[slots[real].long()], ref.final_state[real])
    print(f"out rel {e_out:.2e} (max {max_err(out[real], ref.out[real]):.2e}); state rel {e_state:.2e}")
    assert e_out <= TOL[state_dtype] and e_state <= TOL[state_dtype]
    assert (out[1] == 0).all()
    keep = _untouched_mask(pool.shape[0], slots).to(DEV)
    assert torch.equal(graph_pool[keep], pool[keep])


# (fp32 pool, T=1: the general kernel; bf16, T=1: the bf16 step kernel; bf16, T=3 with intermediate slots: the
# general kernel on its multi-token path)
@pytest.mark.parametrize("state_dtype,T", [(torch.float32, 1), (torch.bfloat16, 1), (torch.bfloat16, 3)],
                         ids=["fp32", "bf16_step", "bf16_multi_token"])
def test_visit_order_gives_the_same_bits(state_dtype, T):
    """The visit order (slot_visit_order: the sequences by increasing slot) changes only which CTA takes which
    sequence: outputs and states are bit-identical to the plain call, padded entries still give zeros, and the
    float64 reference agrees. N = 300 over many waves, slots a random permutation."""
    N, H = 300, 4
    extra = N * T + 5 if T > 1 else 5
    inputs, pool, slots = _case(N, T, H, state_dtype=state_dtype, gates=EXTREME_GATES, pad=(0, 17, 299),
                                seed=41 + T, extra_slots=extra)
    inter = None
    if T > 1:
        free = _untouched_mask(pool.shape[0], slots).nonzero().reshape(-1)
        inter = free[torch.randperm(len(free), generator=torch.Generator().manual_seed(3))[: N * T]]
        inter = inter.reshape(N, T).to(DEV, torch.int32)
    visit = slot_visit_order(slots)
    assert visit.device.type == "cuda" and not torch.equal(visit[:, 0].cpu(), torch.arange(N, dtype=torch.int32))
    plain_pool, visit_pool = pool.clone(), pool.clone()
    plain = _decode(inputs, plain_pool, slots, None, inter)
    visited = _decode(inputs, visit_pool, slots, None, inter, visit)
    torch.cuda.synchronize()
    assert not visited.isnan().any(), "some outputs were never written"
    assert torch.equal(plain, visited) and torch.equal(plain_pool, visit_pool)
    assert (visited[slots == PAD_SLOT] == 0).all()
    ref = _reference(inputs, pool, slots, None)
    real = slots >= 0
    e_out = rel_err(visited[real], ref.out[real])
    print(f"out rel {e_out:.2e} max {max_err(visited[real], ref.out[real]):.2e}")
    assert e_out <= TOL[state_dtype]
    if T == 1:
        e_state = rel_err(visit_pool[slots[real].long()], ref.final_state[real])
        assert e_state <= TOL[state_dtype], e_state
    keep = _untouched_mask(pool.shape[0], slots, *(() if inter is None else (inter,))).to(DEV)
    assert torch.equal(visit_pool[keep], pool[keep])


def test_visit_order_in_a_graph():
    """Captured with a visit order: replays with new slots and a new order in the same static buffers match
    eager calls in sequence order bit for bit."""
    N, H, S = 64, 8, 200
    inputs, pool, _ = _case(N, 1, H, state_dtype=torch.bfloat16, gates=EXTREME_GATES, seed=7, extra_slots=S - N)
    pool = (torch.randn(pool.shape, generator=torch.Generator().manual_seed(1)) * 0.3).to(DEV, torch.bfloat16)
    slots = torch.zeros(N, dtype=torch.int32, device=DEV)
    visit = torch.zeros(N, 2, dtype=torch.int32, device=DEV)
    q, k, v, g, beta, A_log, dt_bias = inputs
    graph_pool, eager_pool = pool.clone(), pool.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture
        kda_decode(q, k, v, g, beta, A_log, dt_bias, pool.clone(), torch.arange(N, dtype=torch.int32, device=DEV))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = kda_decode(q, k, v, g, beta, A_log, dt_bias, graph_pool, slots, visit_order=visit)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        new_slots = torch.randperm(S, generator=gen)[:N].to(DEV, torch.int32)
        slots.copy_(new_slots)
        visit.copy_(slot_visit_order(new_slots))
        graph.replay()
        eager_out = kda_decode(q, k, v, g, beta, A_log, dt_bias, eager_pool, new_slots)
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager_out) and torch.equal(graph_pool, eager_pool)


def test_bad_arguments_raise():
    inputs, pool, slots = _case(2, 1, 2, state_dtype=torch.float32, gates=MILD_GATES)
    q, k, v, g, beta, A_log, dt_bias = inputs
    out = torch.empty_like(v)
    with pytest.raises(TypeError, match="A_log"):
        cuda_decode.decode(q, k, v, g, beta, A_log.double(), dt_bias, 0.1, None, pool, slots, None, out)
    with pytest.raises(TypeError, match="state_pool"):
        cuda_decode.decode(q, k, v, g, beta, A_log, dt_bias, 0.1, None, pool.half(), slots, None, out)
    with pytest.raises(ValueError, match="intermediate_slots"):
        cuda_decode.decode(q, k, v, g, beta, A_log, dt_bias, 0.1, None, pool, slots, slots, out)
    with pytest.raises(ValueError, match="q"):
        kda_decode(q[..., :64].contiguous(), k[..., :64].contiguous(), v, g[..., :64].contiguous(), beta, A_log,
                   dt_bias[:, :64].contiguous(), pool, slots)
    visit = slot_visit_order(slots)
    with pytest.raises(ValueError, match="visit"):
        cuda_decode.decode(q, k, v, g, beta, A_log, dt_bias, 0.1, None, pool, slots, None, out, visit=visit[:1])
    with pytest.raises(TypeError, match="visit"):
        cuda_decode.decode(q, k, v, g, beta, A_log, dt_bias, 0.1, None, pool, slots, None, out, visit=visit.long())
    with pytest.raises(ValueError, match="visit_order"):
        kda_decode(q, k, v, g, beta, A_log, dt_bias, pool, slots, visit_order=visit.flip(1).contiguous())
