"""The chunked CPU path (what kda_prefill runs on CPU) against the float64 token-by-token truth."""

import pytest
import torch

from kda_testing import EXTREME_GATES, MILD_GATES, cu_seqlens_of, make_kda_inputs, max_err, rel_err
from kda_serving.ops import KDACheckpoints, chunked, kda_prefill, kda_recurrent_reference

FP32_TOL = 3e-4  # float32 rounding, amplified by the chunk's triangular solve when gates are extreme
GATES = {"mild": MILD_GATES, "extreme": EXTREME_GATES}
FORMS = {"softplus": None, "lower_bound": -5.0}


def _check(out, ref, tol, what):
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: rel err {err:.3e} (max abs {max_err(out, ref):.3e}) > {tol}"
    return err


@pytest.mark.parametrize("T", [1, 15, 16, 17, 63, 64, 65, 1000])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("gates", GATES)
def test_fixed_length_matches_recurrence(T, form, gates):
    gen = torch.Generator().manual_seed(T * 7 + len(form) + len(gates))
    H, K = (2, 32) if T >= 1000 else (3, 64)
    q, k, v, g, beta, A_log, dt = make_kda_inputs(2, T, H, K, generator=gen, **GATES[gates])
    S0 = torch.randn(2, H, K, K, generator=gen)
    kw = dict(lower_bound=FORMS[form], initial_state=S0, output_final_state=True)
    got = kda_prefill(q, k, v, g, beta, A_log, dt, **kw)
    ref = kda_recurrent_reference(q, k, v, g, beta, A_log, dt, **kw)
    _check(got.out, ref.out, FP32_TOL, "out")
    _check(got.final_state, ref.final_state, FP32_TOL, "final_state")


@pytest.mark.parametrize("lengths", [[1300, 547, 963, 271], [1, 15, 0, 64, 65, 17], [5] * 12,
                                     [1, 700, 3, 1, 130, 0, 1]])  # a long prompt among decodes: scanned in groups
@pytest.mark.parametrize("form", FORMS)
def test_varlen_matches_recurrence(lengths, form):
    gen = torch.Generator().manual_seed(sum(lengths))
    H, K, V = 2, 32, 48  # K != V on purpose: the layouts must not mix them up
    T = sum(lengths)
    q, k, v, g, beta, A_log, dt = make_kda_inputs(1, T, H, K, V, generator=gen, **EXTREME_GATES)
    cu = cu_seqlens_of(lengths, dtype=torch.int64)
    S0 = torch.randn(len(lengths), H, V, K, generator=gen)
    kw = dict(lower_bound=FORMS[form], cu_seqlens=cu, initial_state=S0, output_final_state=True)
    got = kda_prefill(q, k, v, g, beta, A_log, dt, **kw)
    ref = kda_recurrent_reference(q, k, v, g, beta, A_log, dt, **kw)
    _check(got.out, ref.out, FP32_TOL, "out")
    _check(got.final_state, ref.final_state, FP32_TOL, "final_state")
    # A zero-length sequence passes its state through unchanged.
    for n, L in enumerate(lengths):
        if L == 0:
            assert torch.equal(got.final_state[n], S0[n])


def test_bf16_inputs_and_state():
    gen = torch.Generator().manual_seed(3)
    q, k, v, g, beta, A_log, dt = make_kda_inputs(1, 200, 2, 64, dtype=torch.bfloat16, generator=gen, **EXTREME_GATES)
    S0 = torch.randn(1, 2, 64, 64, generator=gen).bfloat16()
    got = kda_prefill(q, k, v, g, beta, A_log, dt, initial_state=S0, output_final_state=True)
    ref = kda_recurrent_reference(q, k, v, g, beta, A_log, dt, initial_state=S0, output_final_state=True)
    assert got.out.dtype == torch.bfloat16 and got.final_state.dtype == torch.bfloat16
    _check(got.out, ref.out, 1e-2, "out")
    _check(got.final_state, ref.final_state, 1e-2, "final_state")


def test_no_state_means_zero_state():
    gen = torch.Generator().manual_seed(4)
    q, k, v, g, beta, A_log, dt = make_kda_inputs(1, 70, 2, 16, generator=gen)
    a = kda_prefill(q, k, v, g, beta, A_log, dt, output_final_state=True)
    b = kda_prefill(q, k, v, g, beta, A_log, dt, initial_state=torch.zeros(1, 2, 16, 16), output_final_state=True)
    assert a.final_state.dtype == torch.float32
    assert torch.allclose(a.out, b.out, atol=1e-6) and torch.allclose(a.final_state, b.final_state, atol=1e-6)
    assert kda_prefill(q, k, v, g, beta, A_log, dt).final_state is None


@pytest.mark.parametrize("split", [1, 64, 100, 199])
@pytest.mark.parametrize("form", FORMS)
def test_two_piece_prefill_equals_one(split, form):
    """Carrying the final state of a first piece into a second gives the one-piece result."""
    gen = torch.Generator().manual_seed(split)
    q, k, v, g, beta, A_log, dt = make_kda_inputs(1, 200, 2, 32, generator=gen, **EXTREME_GATES)
    lb = FORMS[form]
    whole = kda_prefill(q, k, v, g, beta, A_log, dt, lower_bound=lb, output_final_state=True)
    first = kda_prefill(*(x[:, :split] for x in (q, k, v, g, beta)), A_log, dt, lower_bound=lb, output_final_state=True)
    second = kda_prefill(*(x[:, split:] for x in (q, k, v, g, beta)), A_log, dt, lower_bound=lb,
                         initial_state=first.final_state, output_final_state=True)
    _check(torch.cat([first.out, second.out], 1), whole.out, FP32_TOL, "out")
    _check(second.final_state, whole.final_state, FP32_TOL, "final_state")


def test_scale_is_applied():
    gen = torch.Generator().manual_seed(5)
    q, k, v, g, beta, A_log, dt = make_kda_inputs(1, 40, 2, 16, generator=gen)
    base = kda_prefill(q, k, v, g, beta, A_log, dt, scale=1.0).out
    half = kda_prefill(q, k, v, g, beta, A_log, dt, scale=0.5).out
    assert torch.allclose(half, base * 0.5, atol=1e-6)
    default = kda_prefill(q, k, v, g, beta, A_log, dt).out
    assert torch.allclose(default, base * 16**-0.5, atol=1e-6)


@pytest.mark.parametrize("lengths", [[300, 64, 129], [300, 1, 129, 1, 1, 1]])
def test_checkpoints_match_prefix_states(lengths):
    gen = torch.Generator().manual_seed(6)
    q, k, v, g, beta, A_log, dt = make_kda_inputs(1, sum(lengths), 2, 32, generator=gen, **EXTREME_GATES)
    cu = cu_seqlens_of(lengths)
    pool = torch.randn(12, 2, 32, 32, generator=gen)
    slots = torch.tensor([3, 7, 1, 10, 11, 6][: len(lengths)])
    if lengths[1] == 64:
        ck = KDACheckpoints(seq=torch.tensor([0, 0, 1, 2, 0]), pos=torch.tensor([64, 192, 64, 128, 256]),
                            slot=torch.tensor([0, 2, 4, 5, 9]))
    else:  # the decodes are scanned apart from the prompts (chunked.length_groups); checkpoints in both prompts
        ck = KDACheckpoints(seq=torch.tensor([0, 2, 0, 2]), pos=torch.tensor([64, 64, 192, 128]),
                            slot=torch.tensor([0, 4, 2, 5]))
        assert len(chunked.length_groups(lengths)) > 1
    untouched = [8] + ([6] if len(lengths) == 3 else [])
    before = pool.clone()
    ref = kda_recurrent_reference(q, k, v, g, beta, A_log, dt, cu_seqlens=cu, state_pool=pool, state_indices=slots,
                                  checkpoints=ck)
    kda_prefill(q, k, v, g, beta, A_log, dt, cu_seqlens=cu, state_pool=pool, state_indices=slots, checkpoints=ck)
    _check(pool[ck.slot], ref.checkpoint_states, FP32_TOL, "checkpoint states")
    _check(pool[slots], ref.final_state, FP32_TOL, "final states")
    # The float64 truth, independently: the state after pos tokens is the final state of a prefix prefill.
    n, p = 0, 192
    start = int(cu[n])
    prefix = kda_recurrent_reference(*(x[:, start:start + p] for x in (q, k, v, g, beta)), A_log, dt,
                                     initial_state=before[slots[n]].unsqueeze(0), output_final_state=True)
    _check(pool[2], prefix.final_state[0], FP32_TOL, "checkpoint vs prefix prefill")
    for s in untouched:
        assert torch.equal(pool[s], before[s])
