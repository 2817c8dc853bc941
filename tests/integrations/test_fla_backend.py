"""Our flash-linear-attention backend on CPU: registration ahead of FlashKDA, the verifier (what it accepts and
why it rejects), the opt-out switch, and fla's chunk_kda / fused_recurrent_kda dispatching to us with the
arguments mapped right (checked against the float64 reference).

fla needs triton to import; the main venv has neither, so this runs in the venv of .ci/vllm_cpu_test.sh. Our
kernels are CUDA-only, so the dispatch tests lift the backend's CUDA requirement to run our CPU path through
fla's dispatcher; tests/integrations/test_fla_gpu.py compares with fla's Triton kernels on the GPU.
"""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("fla.ops.kda")

from fla.backends import _function_registries, _get_operation_registry  # noqa: E402
from fla.ops.kda import chunk_kda, fused_recurrent_kda  # noqa: E402
from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd  # noqa: E402
from inspect import unwrap  # noqa: E402

from kda_serving.integrations import fla_backend  # noqa: E402
from kda_serving.ops import kda_recurrent_reference  # noqa: E402

H, K = 2, 128


def chunk_registry():
    return _function_registries[unwrap(chunk_kda)]


def inputs(T: int, B: int = 1, dtype=torch.bfloat16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, g = (torch.randn(B, T, H, K, generator=gen).to(dtype) for _ in range(3))
    v = torch.randn(B, T, H, K, generator=gen).to(dtype)
    beta = torch.randn(B, T, H, generator=gen).to(dtype)
    A_log = torch.rand(H, generator=gen) * 1.5
    dt_bias = 0.5 * torch.randn(H * K, generator=gen)  # fla passes dt_bias flat [H * K]
    return q, k, v, g, beta, A_log, dt_bias


def fused_flags():
    return dict(use_gate_in_kernel=True, use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True)


@pytest.fixture
def registered():
    assert fla_backend.register() is True
    return chunk_registry()


@pytest.fixture
def cpu_backend(monkeypatch, registered):
    """Our backend with its CUDA requirement lifted, so fla dispatches CPU tensors to our CPU path."""
    monkeypatch.setattr(fla_backend, "REQUIRE_CUDA", False)
    return registered


def test_registered_ahead_of_flash_kda_and_idempotent(registered):
    fla_backend.register()
    order = [b.backend_type for b in registered._get_sorted_backends()]
    assert order.count("kda_serving") == 1
    assert order.index("kda_serving") < order.index("flash_kda")
    kda_ops = _get_operation_registry("kda")
    assert "kda_serving" in [b.backend_type for b in kda_ops._get_sorted_backends()]


def test_switch_off(monkeypatch, registered):
    monkeypatch.setenv("KDA_SERVING_FLA", "0")
    assert fla_backend.register() is False
    ours = next(b for b in registered._get_sorted_backends() if b.backend_type == "kda_serving")
    assert not ours.is_enabled(), "an already registered backend must also honour the switch at call time"


def test_cpu_tensors_are_rejected_for_the_kernels(registered):
    q, k, v, g, beta, A_log, dt_bias = inputs(8)
    reason = fla_backend.chunk_kda_call_reason((q, k, v, g, beta), dict(A_log=A_log, dt_bias=dt_bias, **fused_flags()))
    assert reason is not None and "CUDA" in reason


def _valid_call():
    q, k, v, g, beta, A_log, dt_bias = inputs(8)
    return [q, k, v, g, beta], dict(A_log=A_log, dt_bias=dt_bias, **fused_flags())


def _edit(name):
    """Edits of a valid call that our kernels cannot take, with the word the reason must contain."""
    args, kw = _valid_call()
    q = args[0]
    if name == "fp32":
        args = [t.float() for t in args]
        return args, kw, "bfloat16"
    if name == "K=64":
        args = [t[..., :64].contiguous() if t.dim() == 4 else t for t in args]
        return args, kw, "K == V"
    if name == "no-gate-in-kernel":
        kw["use_gate_in_kernel"] = False
        return args, kw, "in_kernel"
    if name == "no-l2norm-in-kernel":
        kw["use_qk_l2norm_in_kernel"] = False
        return args, kw, "in_kernel"
    if name == "neg-eigval":
        kw["allow_neg_eigval"] = True
        return args, kw, "allow_neg_eigval"
    if name == "grouped-value-heads":
        args[2] = torch.cat([args[2], args[2]], dim=2)
        return args, kw, "grouped value heads"
    if name == "no-A_log":
        del kw["A_log"]
        return args, kw, "A_log"
    if name == "bad-lower-bound":
        kw["lower_bound"] = -6.0
        return args, kw, "lower_bound"
    if name == "intermediate-states":
        kw["return_intermediate_states"] = True
        return args, kw, "intermediate"
    if name == "wrong-state-shape":
        kw["initial_state"] = torch.zeros(2, H, K, K)
        return args, kw, "initial_state"
    if name == "needs-grad":
        args[0] = q.clone().requires_grad_(True)
        return args, kw, "backward"
    raise AssertionError(name)


@pytest.mark.parametrize("edit", [
    "fp32", "K=64", "no-gate-in-kernel", "no-l2norm-in-kernel", "neg-eigval", "grouped-value-heads", "no-A_log",
    "bad-lower-bound", "intermediate-states", "wrong-state-shape", "needs-grad",
])
def test_verifier_rejects_what_the_kernels_do_not_support(monkeypatch, edit):
    monkeypatch.setattr(fla_backend, "REQUIRE_CUDA", False)
    args, kw = _valid_call()
    assert fla_backend.chunk_kda_call_reason(tuple(args), kw) is None, "the unedited call must be accepted"
    args, kw, word = _edit(edit)
    reason = fla_backend.chunk_kda_call_reason(tuple(args), kw)
    assert reason is not None and word in reason, reason


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("lower_bound", [None, -5.0], ids=["softplus-gate", "lower-bound-gate"])
@pytest.mark.parametrize("state_v_first", [True, False], ids=["v-first-state", "k-first-state"])
def test_chunk_kda_dispatches_to_us(cpu_backend, caplog, lower_bound, state_v_first):
    cu = torch.tensor([0, 5, 70, 90], dtype=torch.long)
    q, k, v, g, beta, A_log, dt_bias = inputs(int(cu[-1]))
    h0_vk = torch.randn(3, H, K, K) * 0.1  # [N, H, V, K]
    h0 = h0_vk if state_v_first else h0_vk.transpose(-1, -2).contiguous()
    cpu_backend._logged.clear()  # fla logs each backend choice once per process
    with caplog.at_level(logging.INFO, logger="fla.backends"), torch.inference_mode():
        o, ht = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                          lower_bound=lower_bound, state_v_first=state_v_first, A_log=A_log, dt_bias=dt_bias,
                          **fused_flags())
    ref = kda_recurrent_reference(q.double(), k.double(), v.double(), g.double(), beta.double(), A_log,
                                  dt_bias.view(H, K), lower_bound=lower_bound, cu_seqlens=cu, initial_state=h0_vk,
                                  output_final_state=True)
    ht_vk = ht if state_v_first else ht.transpose(-1, -2)
    err_o, err_s = rel_err(o, ref.out), rel_err(ht_vk, ref.final_state)
    print(f"chunk_kda via fla ({lower_bound}, v_first={state_v_first}): out {err_o:.2e}, state {err_s:.2e}")
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32 and ht.shape == h0.shape
    assert err_o < 1e-2 and err_s < 1e-4
    assert "chunk_kda -> kda_serving" in caplog.text


def test_fused_recurrent_kda_dispatches_to_us(cpu_backend):
    q, k, v, g, beta, A_log, dt_bias = inputs(3, B=2)
    h0 = torch.randn(2, H, K, K) * 0.1
    with torch.inference_mode():
        o, ht = fused_recurrent_kda(q, k, v, g, beta, A_log=A_log, dt_bias=dt_bias, initial_state=h0,
                                    output_final_state=True, state_v_first=True, **fused_flags())
    ref = kda_recurrent_reference(q.double(), k.double(), v.double(), g.double(), beta.double(), A_log,
                                  dt_bias.view(H, K), initial_state=h0, output_final_state=True)
    assert rel_err(o, ref.out) < 1e-2 and rel_err(ht, ref.final_state) < 1e-4


def test_fused_recurrent_in_place_pool(cpu_backend):
    """vLLM-style decode: a V-first pool updated in place at ssm_state_indices, one token per sequence."""
    q, k, v, g, beta, A_log, dt_bias = inputs(3)  # varlen: 3 sequences of one token
    cu = torch.arange(4, dtype=torch.long)
    pool = torch.randn(6, H, K, K) * 0.1
    before = pool.clone()
    slots = torch.tensor([4, 0, 2], dtype=torch.int32)
    out = torch.full_like(v, float("nan"))
    with torch.inference_mode():
        o, final = fused_recurrent_kda_fwd(q, k, v, g, beta, A_log=A_log, dt_bias=dt_bias, initial_state=pool,
                                           inplace_final_state=True, state_v_first=True, cu_seqlens=cu,
                                           ssm_state_indices=slots, out=out, **fused_flags())
    assert final is pool and o is out and not out.isnan().any()
    ref = kda_recurrent_reference(q.double(), k.double(), v.double(), g.double(), beta.double(), A_log,
                                  dt_bias.view(H, K), cu_seqlens=cu, initial_state=before[slots.long()],
                                  output_final_state=True)
    assert rel_err(out, ref.out) < 1e-2
    assert rel_err(pool[slots.long()], ref.final_state) < 1e-4
    for s in (1, 3, 5):
        assert torch.equal(pool[s], before[s])
