"""Every contract violation raises TypeError/ValueError naming the argument (docs/kda-contract.md)."""

import pytest
import torch

from kda_testing import cu_seqlens_of, make_kda_inputs
from kda_serving.ops import (
    KDACheckpoints,
    causal_conv1d_decode,
    causal_conv1d_prefill,
    indices_checked_by_caller,
    kda_decode,
    kda_prefill,
)
from kda_serving.ops.contract import validate_cu_seqlens, validate_slot_indices


def _inputs(B=1, T=20, H=2, K=16):
    return list(make_kda_inputs(B, T, H, K, generator=torch.Generator().manual_seed(0)))


def _raises(exc, name, fn, *args, **kw):
    with pytest.raises(exc, match=f"'{name}'"):
        fn(*args, **kw)


@pytest.mark.parametrize("pos,name,value,exc", [
    (0, "q", "not a tensor", TypeError),
    (0, "q", torch.zeros(1, 20, 2), ValueError),
    (1, "k", torch.zeros(1, 20, 2, 8), ValueError),
    (1, "k", torch.zeros(1, 20, 2, 16, dtype=torch.float64), TypeError),
    (2, "v", torch.zeros(1, 19, 2, 16), ValueError),
    (3, "g", torch.zeros(1, 20, 2, 15), ValueError),
    (4, "beta", torch.zeros(1, 20, 3), ValueError),
    (5, "A_log", torch.zeros(3), ValueError),
    (5, "A_log", torch.zeros(2, dtype=torch.int32), TypeError),
    (6, "dt_bias", torch.zeros(2, 8), ValueError),
    (0, "q", torch.zeros(1, 20, 2, 16, dtype=torch.int32), TypeError),
])
def test_bad_tensors(pos, name, value, exc):
    args = _inputs()
    args[pos] = value
    _raises(exc, name, kda_prefill, *args)


def test_non_contiguous():
    args = _inputs()
    args[0] = torch.zeros(1, 16, 2, 20).transpose(1, 3)
    _raises(ValueError, "q", kda_prefill, *args)


def test_device_mismatch_is_reported():
    args = _inputs()
    args[2] = args[2].to("meta")
    _raises(ValueError, "v", kda_prefill, *args)


@pytest.mark.parametrize("cu,msg", [
    ([1, 20], "start at 0"), ([0, 12, 8, 20], "non-decreasing"), ([0, 5, 19], "end at"), ([0], "at least 2"),
])
def test_bad_cu_seqlens(cu, msg):
    with pytest.raises(ValueError, match=msg):
        kda_prefill(*_inputs(), cu_seqlens=torch.tensor(cu))


def test_cu_seqlens_type_and_batch():
    _raises(TypeError, "cu_seqlens", kda_prefill, *_inputs(), cu_seqlens=torch.tensor([0.0, 20.0]))
    _raises(ValueError, "cu_seqlens", kda_prefill, *_inputs(B=2), cu_seqlens=torch.tensor([0, 20]))


@pytest.mark.parametrize("lb,exc", [(0.0, ValueError), (-6.0, ValueError), ("x", TypeError), (True, TypeError)])
def test_bad_lower_bound(lb, exc):
    _raises(exc, "lower_bound", kda_prefill, *_inputs(), lower_bound=lb)


def test_bad_scale():
    _raises(ValueError, "scale", kda_prefill, *_inputs(), scale=float("nan"))
    _raises(TypeError, "scale", kda_prefill, *_inputs(), scale="1")


def test_bad_states():
    args = _inputs()
    _raises(ValueError, "initial_state", kda_prefill, *args, initial_state=torch.zeros(1, 2, 16, 8))
    _raises(TypeError, "initial_state", kda_prefill, *args, initial_state=torch.zeros(1, 2, 16, 16).half())
    pool = torch.zeros(4, 2, 16, 16)
    _raises(ValueError, "initial_state", kda_prefill, *args, initial_state=torch.zeros(1, 2, 16, 16),
            state_pool=pool, state_indices=torch.tensor([0]))
    _raises(ValueError, "state_indices", kda_prefill, *args, state_pool=pool)
    _raises(ValueError, "state_indices", kda_prefill, *args, state_indices=torch.tensor([0]))
    _raises(ValueError, "state_indices", kda_prefill, *args, state_pool=pool, state_indices=torch.tensor([4]))
    _raises(ValueError, "state_indices", kda_prefill, *args, state_pool=pool, state_indices=torch.tensor([-2]))
    _raises(ValueError, "state_indices", kda_prefill, *args, state_pool=pool, state_indices=torch.tensor([0, 1]))
    _raises(TypeError, "state_indices", kda_prefill, *args, state_pool=pool, state_indices=torch.tensor([0.0]))
    _raises(TypeError, "has_initial_state", kda_prefill, *args, state_pool=pool, state_indices=torch.tensor([0]),
            has_initial_state=torch.tensor([1]))
    _raises(ValueError, "output_final_state", kda_prefill, *args, state_pool=pool, state_indices=torch.tensor([0]),
            output_final_state=True)


def test_duplicate_indices():
    args = _inputs(T=20)
    pool = torch.zeros(4, 2, 16, 16)
    with pytest.raises(ValueError, match="distinct"):
        kda_prefill(*args, cu_seqlens=cu_seqlens_of([10, 10]), state_pool=pool, state_indices=torch.tensor([1, 1]))


def test_index_value_checks_skip_only_inside_the_callers_scope():
    """indices_checked_by_caller() turns off the checks that read index values on the host (and nothing else),
    for its scope only, also when the scope ends by an exception."""
    cpu = torch.device("cpu")
    bad_slots, bad_cu = torch.tensor([0, 7]), torch.tensor([0, 5, 3])

    def value_checks():
        validate_slot_indices("state_indices", bad_slots, 2, 4, cpu)
        validate_cu_seqlens(bad_cu, 3, cpu)

    with pytest.raises(ValueError, match="out of range"):
        value_checks()
    with indices_checked_by_caller():
        value_checks()  # skipped: the caller checked them
        with pytest.raises(TypeError, match="'state_indices'"):  # dtype checks still run
            validate_slot_indices("state_indices", bad_slots.float(), 2, 4, cpu)
        with pytest.raises(ValueError, match="expected 3 entries"):  # and sizes
            validate_slot_indices("state_indices", bad_slots, 3, 4, cpu)
    with pytest.raises(RuntimeError), indices_checked_by_caller():
        raise RuntimeError
    with pytest.raises(ValueError, match="out of range"):
        value_checks()


def test_bad_checkpoints():
    args = _inputs(T=128)
    pool = torch.zeros(4, 2, 16, 16)
    ok = dict(state_pool=pool, state_indices=torch.tensor([0]))

    def ck(seq, pos, slot):
        return KDACheckpoints(torch.tensor(seq), torch.tensor(pos), torch.tensor(slot))

    _raises(ValueError, "checkpoints", kda_prefill, *args, checkpoints=ck([0], [64], [1]))  # needs pool mode
    _raises(ValueError, "checkpoints.pos", kda_prefill, *args, **ok, checkpoints=ck([0], [32], [1]))
    _raises(ValueError, "checkpoints.pos", kda_prefill, *args, **ok, checkpoints=ck([0], [192], [1]))
    _raises(ValueError, "checkpoints.seq", kda_prefill, *args, **ok, checkpoints=ck([1], [64], [1]))
    _raises(ValueError, "checkpoints.slot", kda_prefill, *args, **ok, checkpoints=ck([0], [64], [0]))
    _raises(ValueError, "checkpoints.slot", kda_prefill, *args, **ok, checkpoints=ck([0], [64], [9]))


def test_decode_validation():
    q, k, v, g, beta, A_log, dt = make_kda_inputs(2, 1, 2, 16, generator=torch.Generator().manual_seed(0))
    pool = torch.zeros(4, 2, 16, 16)
    idx = torch.tensor([0, 1])
    _raises(ValueError, "beta", kda_decode, q, k, v, g, beta[:1], A_log, dt, pool, idx)
    _raises(ValueError, "state_pool", kda_decode, q, k, v, g, beta, A_log, dt, pool[:, :1], idx)
    _raises(ValueError, "state_indices", kda_decode, q, k, v, g, beta, A_log, dt, pool, torch.tensor([0, 0]))
    _raises(ValueError, "intermediate_slots", kda_decode, q, k, v, g, beta, A_log, dt, pool, idx,
            intermediate_slots=torch.tensor([[1], [2]]))
    _raises(ValueError, "q", kda_decode, *(x[:, :0] for x in (q, k, v, g, beta)), A_log, dt, pool, idx)
    visit = torch.tensor([[1, 1], [0, 0]], dtype=torch.int32)
    _raises(TypeError, "visit_order", kda_decode, q, k, v, g, beta, A_log, dt, pool, idx, visit_order=visit.long())
    _raises(ValueError, "visit_order", kda_decode, q, k, v, g, beta, A_log, dt, pool, idx, visit_order=visit[:1])
    _raises(ValueError, "visit_order", kda_decode, q, k, v, g, beta, A_log, dt, pool, idx,
            visit_order=torch.tensor([[1, 1], [1, 1]], dtype=torch.int32))  # a sequence twice
    _raises(ValueError, "visit_order", kda_decode, q, k, v, g, beta, A_log, dt, pool, idx,
            visit_order=torch.tensor([[1, 0], [0, 1]], dtype=torch.int32))  # slots not those of state_indices


def test_conv_validation():
    x = torch.randn(10, 6)
    w = torch.randn(6, 4)
    pool = torch.zeros(3, 3, 6)
    cu = torch.tensor([0, 4, 10])
    idx = torch.tensor([0, 2])
    _raises(ValueError, "weight", causal_conv1d_prefill, x, w[:5], None, cu, pool, idx)
    _raises(ValueError, "bias", causal_conv1d_prefill, x, w, torch.zeros(5), cu, pool, idx)
    _raises(ValueError, "conv_pool", causal_conv1d_prefill, x, w, None, cu, pool[:, :2], idx)
    _raises(ValueError, "cu_seqlens", causal_conv1d_prefill, x, w, None, torch.tensor([0, 4, 9]), pool, idx)
    _raises(ValueError, "state_indices", causal_conv1d_prefill, x, w, None, cu, pool, torch.tensor([0, 3]))
    _raises(ValueError, "activation", causal_conv1d_prefill, x, w, None, cu, pool, idx, activation="relu")
    _raises(ValueError, "state_indices", causal_conv1d_decode, x[:2], w, None, pool, torch.tensor([1]))
