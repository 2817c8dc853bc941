"""The SM90 prefill kernel (csrc/prefill) against the float64 recurrence, on the GPU.

Every call writes into NaN-poisoned outputs/states (so an unwritten element fails), the reference runs in
float64 on the GPU (kda_recurrent_reference vectorises the recurrence over sequences and heads), and the
error is ||x - ref|| / ||ref|| over outputs and final states: at most 1e-2 with a bf16 state, 8e-3 with an
fp32 state. Inputs are fresh random draws, gates include the extreme sweep of docs/kda-contract.md.
"""

from __future__ import annotations

import math

import pytest
import torch

from kda_serving.ops import cuda_lib
from kda_serving.ops.contract import KDACheckpoints, validate_kda_args
from kda_serving.ops.reference import kda_recurrent_reference



def on_gpu(fn):
    """Marks a kernel test: `gpu`, skipped without CUDA. (The host-side helper tests at the end run anywhere.)"""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn))

D = 128
TOL = {torch.bfloat16: 1e-2, torch.float32: 8e-3}


def make_inputs(B, T, H, *, g_std=1.0, dt_shift=0.0, a_log_max=math.log(16), seed=None):
    gen = torch.Generator(device="cuda")
    gen.manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())

    def rnd(*shape, std=1.0, dtype=torch.bfloat16):
        return (torch.randn(*shape, generator=gen, device="cuda") * std).to(dtype)

    return dict(
        q=rnd(B, T, H, D), k=rnd(B, T, H, D), v=rnd(B, T, H, D), g=rnd(B, T, H, D, std=g_std), beta=rnd(B, T, H),
        A_log=torch.rand(H, generator=gen, device="cuda") * a_log_max,
        dt_bias=torch.randn(H, D, generator=gen, device="cuda") + dt_shift,
    )


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(||x - ref|| / ||ref||, max |x - ref|); NaN anywhere gives inf."""
    x = x.double()
    if not torch.isfinite(x).all():
        return math.inf, math.inf
    diff = x - ref
    return (diff.norm() / ref.norm().clamp_min(1e-30)).item(), diff.abs().max().item()


def check(name, x, ref, tol):
    rel, mx = rel_err(x, ref)
    print(f"{name}: rel {rel:.2e} max {mx:.2e}")
    assert rel <= tol, f"{name}: rel err {rel:.3e} > {tol} (max abs {mx:.3e})"


def run_prefill(inp, *, lower_bound, cu_seqlens=None, initial_state=None, final_dtype=None, state_pool=None,
                state_indices=None, has_initial_state=None, checkpoints=None):
    """Validate per the contract, then call the kernel on NaN-poisoned outputs. Returns (out, final_state)."""
    problem = validate_kda_args(**inp, lower_bound=lower_bound, cu_seqlens=cu_seqlens, initial_state=initial_state,
                                state_pool=state_pool, state_indices=state_indices,
                                has_initial_state=has_initial_state, checkpoints=checkpoints)
    out = torch.full_like(inp["v"], float("nan"))
    final = None
    if final_dtype is not None:
        final = torch.full((problem.num_seqs, problem.heads, D, D), float("nan"), dtype=final_dtype, device="cuda")
    ck = checkpoints if checkpoints is not None else (None, None, None)
    cuda_lib.prefill(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], inp["A_log"], inp["dt_bias"], D**-0.5,
                     lower_bound, cu_seqlens, initial_state, final, state_pool, state_indices, has_initial_state,
                     *ck, out)
    return out, final


def reference(inp, **kw):
    return kda_recurrent_reference(**inp, **kw)


def dense_case(B, T, H, *, lower_bound=-5.0, state_dtype=torch.bfloat16, cu=None, **gen):
    inp = make_inputs(B, T, H, **gen)
    N = B if cu is None else len(cu) - 1
    cu_t = None if cu is None else torch.tensor(cu, device="cuda", dtype=torch.int32)
    S0 = (torch.randn(N, H, D, D, device="cuda") * 0.5).to(state_dtype)
    out, final = run_prefill(inp, lower_bound=lower_bound, cu_seqlens=cu_t, initial_state=S0, final_dtype=state_dtype)
    ref = reference(inp, lower_bound=lower_bound, cu_seqlens=cu_t, initial_state=S0, output_final_state=True)
    tol = TOL[state_dtype]
    check("out", out, ref.out, tol)
    check("state", final, ref.final_state, tol)
    return out, final


@on_gpu
@pytest.mark.parametrize("H", [1, 4, 32, 64, 96])
def test_heads(H):
    dense_case(1, 1000, H)


@on_gpu
@pytest.mark.parametrize("T", [1, 15, 16, 17, 64, 1000, 8192])
def test_lengths_batched(T):
    dense_case(2, T, 4, state_dtype=torch.float32, lower_bound=None)


@on_gpu
@pytest.mark.parametrize("lens", [[1300, 547, 2048, 963, 271, 3063], [1024] * 8, [256] * 32, [300, 17, 1, 0, 700]],
                         ids=["mixed6", "1024x8", "256x32", "short"])
@pytest.mark.parametrize("lower_bound", [-5.0, None], ids=["lb", "softplus"])
def test_varlen(lens, lower_bound):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    dense_case(1, cu[-1], 4, lower_bound=lower_bound, cu=cu)


@on_gpu
@pytest.mark.parametrize("lower_bound", [-5.0, None], ids=["lb", "softplus"])
@pytest.mark.parametrize("dt_shift", [-8.0, 8.0])
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_extreme_gates(lower_bound, dt_shift, state_dtype):
    dense_case(1, 1000, 4, lower_bound=lower_bound, state_dtype=state_dtype, g_std=8.0, dt_shift=dt_shift)


@on_gpu
def test_no_states():
    inp = make_inputs(1, 777, 8)
    out, _ = run_prefill(inp, lower_bound=None)
    check("out", out, reference(inp, lower_bound=None).out, TOL[torch.float32])


@on_gpu
def test_final_state_without_initial():
    inp = make_inputs(3, 200, 4)
    out, final = run_prefill(inp, lower_bound=-5.0, final_dtype=torch.float32)
    ref = reference(inp, lower_bound=-5.0, output_final_state=True)
    check("out", out, ref.out, TOL[torch.float32])
    check("state", final, ref.final_state, TOL[torch.float32])


@on_gpu
@pytest.mark.parametrize("warps", ["1", "2", "4", "8"])
def test_variants_repeatable(warps, monkeypatch):
    """Every CTA shape of the recurrence (row groups per CTA) is right, and two runs on the same inputs are
    bit-identical."""
    monkeypatch.setenv(cuda_lib.WARPS_ENV, warps)
    cu = torch.tensor([0, 1300, 1847, 3895, 4000], device="cuda", dtype=torch.int64)
    inp = make_inputs(1, 4000, 8, g_std=4.0)
    S0 = torch.randn(4, 8, D, D, device="cuda")
    out1, fin1 = run_prefill(inp, lower_bound=None, cu_seqlens=cu, initial_state=S0, final_dtype=torch.float32)
    out2, fin2 = run_prefill(inp, lower_bound=None, cu_seqlens=cu, initial_state=S0, final_dtype=torch.float32)
    assert torch.equal(out1, out2) and torch.equal(fin1, fin2)
    ref = reference(inp, lower_bound=None, cu_seqlens=cu, initial_state=S0, output_final_state=True)
    check("out", out1, ref.out, TOL[torch.float32])
    check("state", fin1, ref.final_state, TOL[torch.float32])


@on_gpu
@pytest.mark.parametrize("segments", ["2", "3", "5"])
@pytest.mark.parametrize("warps", ["2", "4", "8"])
def test_time_segments(segments, warps, monkeypatch):
    """Sequences cut into time segments that run at once (run from zero + identity-row transition, then the
    fix-up): outputs and final states against the float64 reference, with a 1-token and a 17-token sequence
    (empty segments), fixed-length rows, and pool mode with a padded entry and a has_initial_state mask."""
    monkeypatch.setenv(cuda_lib.SEGMENTS_ENV, segments)
    monkeypatch.setenv(cuda_lib.WARPS_ENV, warps)
    dense_case(1, 4000, 4, state_dtype=torch.float32, cu=[0, 1300, 1301, 1318, 4000], g_std=4.0)
    dense_case(2, 1000, 2, state_dtype=torch.bfloat16, lower_bound=None)
    test_pool(torch.float32, None)
    test_checkpoints(torch.float32)  # checkpoints: the library runs without segments


@on_gpu
@pytest.mark.parametrize("pool_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("lower_bound", [-5.0, None], ids=["lb", "softplus"])
def test_pool(pool_dtype, lower_bound):
    """Shuffled slots, a has_initial_state mask, a padded entry; untouched slots stay bit-identical."""
    lens = [700, 1, 0, 1500, 63, 257]
    N, H, S = len(lens), 4, 16
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
    inp = make_inputs(1, int(cu[-1]), H, g_std=4.0)
    slots = torch.randperm(S, device="cuda")[:N]
    slots[4] = -1  # padded entry
    has_init = torch.tensor([True, False, True, True, True, False], device="cuda")
    pool = (torch.randn(S, H, D, D, device="cuda") * 0.5).to(pool_dtype)
    untouched = torch.ones(S, dtype=torch.bool, device="cuda")
    untouched[slots[slots >= 0]] = False
    for n in range(N):  # a slot whose content must be ignored holds NaN
        if not has_init[n] and slots[n] >= 0:
            pool[slots[n]] = float("nan")
    pool_before = pool.clone()
    ref = reference(inp, lower_bound=lower_bound, cu_seqlens=cu, state_pool=pool_before, state_indices=slots,
                    has_initial_state=has_init)
    out, _ = run_prefill(inp, lower_bound=lower_bound, cu_seqlens=cu, state_pool=pool, state_indices=slots,
                         has_initial_state=has_init)
    tol = TOL[pool_dtype]
    real = slots >= 0
    tok_real = torch.repeat_interleave(real, torch.tensor(lens, device="cuda"))
    check("out", out[:, tok_real], ref.out[:, tok_real], tol)
    assert torch.equal(out[:, ~tok_real], torch.zeros_like(out[:, ~tok_real])), "padded entry outputs must be zero"
    check("pool states", pool[slots[real]], ref.final_state[real], tol)
    assert torch.equal(pool[untouched], pool_before[untouched]), "untouched pool slots changed"


def check_checkpoints(inp, cu, seq, pos, S, pool_dtype):
    """Softplus-gate prefill in pool mode with checkpoints (seq, pos) against the float64 reference: outputs,
    final states and checkpoint states. The pool has S slots in a random order: the N state slots (random
    initial states), then one per checkpoint; all others hold NaN."""
    N, H = cu.numel() - 1, inp["q"].shape[2]
    slots_all = torch.randperm(S, device="cuda")
    state_slots, ck_slots = slots_all[:N], slots_all[N : N + len(seq)]
    ckpt = KDACheckpoints(seq, pos, ck_slots)
    pool = torch.full((S, H, D, D), float("nan"), dtype=pool_dtype, device="cuda")
    pool[state_slots] = (torch.randn(N, H, D, D, device="cuda") * 0.5).to(pool_dtype)
    pool_before = pool.clone()
    ref = reference(inp, lower_bound=None, cu_seqlens=cu, state_pool=pool_before, state_indices=state_slots,
                    checkpoints=ckpt)
    out, _ = run_prefill(inp, lower_bound=None, cu_seqlens=cu, state_pool=pool, state_indices=state_slots,
                         checkpoints=ckpt)
    tol = TOL[pool_dtype]
    check("out", out, ref.out, tol)
    check("final", pool[state_slots], ref.final_state, tol)
    check("checkpoints", pool[ck_slots], ref.checkpoint_states, tol)
    # A second run on the same inputs agrees bit for bit (a stage handed back to pass 2's producer warp too
    # early once showed up here as a few wrong checkpoints, below the norm-wise tolerance in the outputs).
    pool2 = pool_before.clone()
    out2, _ = run_prefill(inp, lower_bound=None, cu_seqlens=cu, state_pool=pool2, state_indices=state_slots,
                          checkpoints=ckpt)
    assert torch.equal(out2, out), "outputs differ between two runs"
    assert torch.equal(pool2.nan_to_num(7.0), pool.nan_to_num(7.0)), "pool differs between two runs"


@on_gpu
@pytest.mark.parametrize("pool_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_checkpoints(pool_dtype):
    lens = [1300, 64, 700, 2048]
    H, S = 4, 40
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device="cuda", dtype=torch.int64)
    inp = make_inputs(1, int(cu[-1]), H, g_std=2.0, dt_shift=-4.0)
    seq, pos = [], []
    for n, length in enumerate(lens):
        for p in range(64, length + 1, 64):
            if p % 1024 == 0 or p == length - length % 64 or torch.rand(()) < 0.2:
                seq.append(n)
                pos.append(p)
    perm = torch.randperm(len(seq))
    check_checkpoints(inp, cu, torch.tensor(seq)[perm].cuda(), torch.tensor(pos)[perm].cuda().to(torch.int32), S,
                      pool_dtype)


@on_gpu
def test_many_sequences_and_checkpoints():
    """More sequences and checkpoints than the schedule kernel has threads (1024): its chunk-offset scan runs
    over several tiles and every thread ranks several checkpoints. Zero-length sequences included."""
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    N, H = 1500, 1
    lens = torch.randint(64, 200, (N,), generator=gen)  # 1-3 checkpoints each
    lens[::7] = 0
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).cuda()
    inp = make_inputs(1, int(cu[-1]), H, g_std=2.0)
    seq = [n for n in range(N) for p in range(64, int(lens[n]) + 1, 64)]
    pos = [p for n in range(N) for p in range(64, int(lens[n]) + 1, 64)]
    assert len(seq) > 1024
    perm = torch.randperm(len(seq), generator=gen)
    check_checkpoints(inp, cu, torch.tensor(seq)[perm].cuda(), torch.tensor(pos)[perm].cuda(), N + len(seq),
                      torch.float32)


@on_gpu
def test_random_mixes():
    """64 random varlen batches (1-4 sequences of 1..4096 tokens), one float64 reference run for all of them."""
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    mixes = [torch.randint(1, 4097, (int(torch.randint(1, 5, (), generator=gen)),), generator=gen).tolist()
             for _ in range(64)]
    lens = [n for mix in mixes for n in mix]
    H = 2
    inp = make_inputs(1, sum(lens), H, g_std=3.0)
    cu_all = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device="cuda")
    S0 = torch.randn(len(lens), H, D, D, device="cuda").to(torch.bfloat16)
    lb = -5.0
    ref = reference(inp, lower_bound=lb, cu_seqlens=cu_all, initial_state=S0, output_final_state=True)
    out = torch.full_like(inp["v"], float("nan"))
    finals = []
    seq0 = tok0 = 0
    for mix in mixes:
        tok1 = tok0 + sum(mix)
        part = {name: (x[:, tok0:tok1] if name not in ("A_log", "dt_bias") else x) for name, x in inp.items()}
        cu = torch.tensor([0] + torch.tensor(mix).cumsum(0).tolist(), device="cuda")
        o, f = run_prefill(part, lower_bound=lb, cu_seqlens=cu, initial_state=S0[seq0 : seq0 + len(mix)],
                           final_dtype=torch.bfloat16)
        out[:, tok0:tok1] = o
        finals.append(f)
        seq0, tok0 = seq0 + len(mix), tok1
    check("out", out, ref.out, TOL[torch.bfloat16])
    check("state", torch.cat(finals), ref.final_state, TOL[torch.bfloat16])


@on_gpu
def test_public_ops_and_graph_capture():
    """kda_prefill and flash_kda_fwd reach the kernel; a CUDA-graph replay gives the eager result."""
    from kda_serving.ops import flash_kda_fwd, kda_prefill

    inp = make_inputs(1, 600, 4)
    cu = torch.tensor([0, 100, 600], device="cuda", dtype=torch.int64)
    S0 = torch.randn(2, 4, D, D, device="cuda")
    res = kda_prefill(**inp, lower_bound=-5.0, cu_seqlens=cu, initial_state=S0, output_final_state=True)
    ref = reference(inp, lower_bound=-5.0, cu_seqlens=cu, initial_state=S0, output_final_state=True)
    check("kda_prefill out", res.out, ref.out, TOL[torch.float32])
    check("kda_prefill state", res.final_state, ref.final_state, TOL[torch.float32])

    out = torch.full_like(inp["v"], float("nan"))
    final = torch.full_like(S0, float("nan"))
    args = (inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], D**-0.5, out, inp["A_log"], inp["dt_bias"], -5.0)
    flash_kda_fwd(*args, initial_state=S0, final_state=final, cu_seqlens=cu)
    assert torch.equal(out, res.out) and torch.equal(final, res.final_state)

    out.fill_(float("nan"))
    final.fill_(float("nan"))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda_lib.prefill(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], inp["A_log"], inp["dt_bias"], D**-0.5,
                         -5.0, cu, S0, final, None, None, None, None, None, None, out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_lib.prefill(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], inp["A_log"], inp["dt_bias"], D**-0.5,
                         -5.0, cu, S0, final, None, None, None, None, None, None, out)
    out.fill_(float("nan"))
    final.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, res.out) and torch.equal(final, res.final_state)


@on_gpu
@pytest.mark.parametrize("env,value", [("KDA_PREFILL_WARPS", "3"), ("KDA_PREFILL_SEGMENTS", "9")])
def test_bad_overrides(env, value, monkeypatch):
    monkeypatch.setenv(env, value)
    inp = make_inputs(1, 16, 1)
    with pytest.raises(ValueError, match=env):
        run_prefill(inp, lower_bound=-5.0)


# ----------------------------------------------------------------------------------- host-side helpers (CPU)
def test_chunk_bound():
    """The launch bound covers every chunk without reading cu_seqlens (no host sync)."""
    lens = [0, 1, 16, 17, 0, 100]
    exact = sum((n + 15) // 16 for n in lens)
    assert cuda_lib._chunk_bound(True, 1, sum(lens), len(lens)) >= exact
    assert cuda_lib._chunk_bound(False, 3, 33, 3) == 9


def test_env_overrides_are_checked(monkeypatch):
    monkeypatch.setenv(cuda_lib.WARPS_ENV, "2")
    assert cuda_lib._warps_override() == 2
    monkeypatch.setenv(cuda_lib.WARPS_ENV, "16")
    with pytest.raises(ValueError, match=cuda_lib.WARPS_ENV):
        cuda_lib._warps_override()
    monkeypatch.setenv(cuda_lib.SEGMENTS_ENV, "3")
    assert cuda_lib._segments_override() == 3
    monkeypatch.setenv(cuda_lib.SEGMENTS_ENV, "9")
    with pytest.raises(ValueError, match=cuda_lib.SEGMENTS_ENV):
        cuda_lib._segments_override()


def test_missing_library_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(cuda_lib.LIB_ENV, str(tmp_path / "nope.so"))
    with pytest.raises(RuntimeError, match="not found"):
        cuda_lib.load()
    assert not cuda_lib.available()
