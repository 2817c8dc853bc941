"""The model with its plain torch pieces compiled (KimiLinearModel.compile_plain_ops: the RMS norms, residual add +
norm, the MoE router, the SwiGLU activation, the experts' weighted sum and the MLA latent rows through
torch.compile / Inductor) against the same model eager.

A dense random model (no MoE, whose expert choice is discontinuous: a near-tie flips with any rounding) runs
a packed prefill of two prompts and decode steps both ways. On the CPU (fp32) the compiled kernels only
reorder float operations, so the logits agree to ~1e-6; a fused piece that dropped a term, used the wrong
weight or skipped the residual would be off by O(1). The router is checked on its own, on random inputs whose
top-k has no ties: the same experts, the same weights; so is the experts' weighted sum, against float64. On the
GPU (bf16) both runs are measured against the fp32 CPU truth, as in test_state_dtype.py. The compiled
activation is forced at every token count (the model uses it from moe.FUSED_MIN_TOKENS).
"""

from __future__ import annotations

import statistics

import pytest
import torch
from kimi_testing import per_token_rel as _rel
from kimi_testing import run_two_prompts as _run
from kimi_testing import save_dense_checkpoint

from kda_serving.model import load_model
from kda_serving.model import moe
from kda_serving.model.kimi_linear import _compiled
from kda_serving.model.mla_block import latent_rows
from kda_serving.model.moe import combine_experts, route_experts, silu_mul
from kda_serving.model.norm import add_rms_norm, rms_norm

@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory) -> str:
    return save_dense_checkpoint(str(tmp_path_factory.mktemp("dense")), seed=13)


def _route_inputs(device, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, 64, generator=gen).to(device, dtype)
    router = torch.randn(32, 64, generator=gen).to(device, dtype)
    bias = (0.1 * torch.randn(32, generator=gen)).to(device)
    return x, router, bias


def _check_router(device, dtype) -> None:
    args = _route_inputs(device, dtype)
    for groups, topk_group in ((1, 1), (4, 2)):
        ids, weights = route_experts(*args, 6, groups, topk_group, True, 2.5)
        cids, cweights = _compiled(route_experts)(*args, 6, groups, topk_group, True, 2.5)
        order, corder = ids.sort(-1), cids.sort(-1)
        assert torch.equal(order.values, corder.values)
        torch.testing.assert_close(weights.gather(1, order.indices), cweights.gather(1, corder.indices),
                                   rtol=1e-4, atol=1e-5)


def _check_combine(device, dtype, tol) -> None:
    """combine_experts on 37 tokens x 6 experts: each token's pairs at shuffled rows of y, compiled and eager,
    against the float64 sum written out; tol is the output dtype's rounding."""
    gen = torch.Generator().manual_seed(4)
    T, k, H = 37, 6, 48
    y = torch.randn(T * k, H, generator=gen).to(device, dtype)
    inverse = torch.randperm(T * k, generator=gen).to(device)
    weights = torch.rand(T, k, generator=gen).to(device)
    ref = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            ref[t] += weights[t, j].double().cpu() * y[inverse[t * k + j]].double().cpu()
    for fn in (combine_experts, _compiled(combine_experts)):
        out = fn(y, inverse, weights)
        assert out.dtype == dtype and out.shape == (T, H)
        torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol)


def _check_latent_rows(device, dtype, tol) -> None:
    """latent_rows on 37 rows of a 48 + 16 latent, compiled and eager, against float64 written out: the first
    48 columns RMS-normalised and scaled, the last 16 copied, the result in the cache's dtype (fp32 rows into a
    bf16 cache on the way too). tol is the output dtype's rounding."""
    gen = torch.Generator().manual_seed(5)
    kv_a = (3 * torch.randn(37, 64, generator=gen)).to(device, dtype)
    weight = (1 + 0.5 * torch.randn(48, generator=gen)).to(device, dtype)
    x = kv_a.double().cpu()
    c, r = x[:, :48], x[:, 48:]
    ref = torch.cat([c / (c.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * weight.double().cpu(), r], dim=-1)
    for fn in (latent_rows, _compiled(latent_rows)):
        for out_dtype in {dtype, torch.bfloat16}:
            out = fn(kv_a, weight, 1e-6, out_dtype)
            assert out.dtype == out_dtype and out.shape == (37, 64)
            assert torch.equal(out[:, 48:], kv_a[:, 48:].to(out_dtype))
            t = tol if out_dtype == dtype else 1e-2
            torch.testing.assert_close(out.double().cpu(), ref, rtol=t, atol=t)


def test_compiled_pieces_match_eager_cpu(dense_checkpoint, monkeypatch):
    monkeypatch.setattr(moe, "FUSED_MIN_TOKENS", 0)  # the compiled activation at every token count
    model = load_model(dense_checkpoint, device="cpu", progress=False)
    eager = _run(model)
    model.compile_plain_ops()
    assert model.layers[0].norm_fn is _compiled(rms_norm) and model.layers[0].add_norm_fn is _compiled(add_rms_norm)
    assert model.layers[0].mlp.act_fn is _compiled(silu_mul)
    mla = next(layer.self_attn for layer in model.layers if not layer.is_kda)
    assert mla.latent_fn is _compiled(latent_rows) and mla.norm_fn is _compiled(rms_norm)
    compiled = _run(model)
    model.compile_plain_ops(False)
    assert model.norm_fn is rms_norm and model.layers[0].add_norm_fn is add_rms_norm
    assert mla.latent_fn is latent_rows and mla.norm_fn is rms_norm
    errs = _rel(compiled, eager)
    print(f"cpu: worst per-token logits rel {max(errs):.2e}")
    assert all(torch.isfinite(c).all() for c in compiled) and max(errs) <= 1e-5
    assert model.layers[0].mlp.act_fn is silu_mul  # compile_plain_ops(False) put the eager ones back
    _check_router("cpu", torch.float32)
    _check_combine("cpu", torch.float32, 1e-5)
    _check_latent_rows("cpu", torch.float32, 1e-5)


def test_add_rms_norm_is_the_add_then_the_norm():
    gen = torch.Generator().manual_seed(2)
    h, x, w = torch.randn(5, 16, generator=gen), torch.randn(5, 16, generator=gen), torch.randn(16, generator=gen)
    s, n = add_rms_norm(h, x, w, 1e-5)
    assert torch.equal(s, h + x) and torch.equal(n, rms_norm(h + x, w, 1e-5))


@pytest.mark.gpu
def test_compiled_pieces_track_the_fp32_truth_cuda(dense_checkpoint, monkeypatch):
    """bf16 on the GPU: the compiled run's median per-token error against the fp32 CPU truth may be at most
    1.25x the eager run's plus 2e-3 (a fused kernel keeps an intermediate in fp32 where eager rounds it to
    bf16), its worst token 1.5x plus 5e-3: single-token maxima move by a third with any change of rounding
    order (H200: eager 8.4e-2, compiled 1.09e-1, while the median went 2.71e-2 -> 2.66e-2). A broken fused
    piece is off by O(1) in every token."""
    monkeypatch.setattr(moe, "FUSED_MIN_TOKENS", 0)  # the compiled activation at every token count
    truth = _run(load_model(dense_checkpoint, device="cpu", progress=False))
    model = load_model(dense_checkpoint, device="cuda", progress=False)
    eager = _run(model)
    model.compile_plain_ops()
    compiled = _run(model)
    assert all(torch.isfinite(c).all() for c in compiled)
    e_eager, e_comp = statistics.median(_rel(eager, truth)), statistics.median(_rel(compiled, truth))
    w_eager, w_comp = max(_rel(eager, truth)), max(_rel(compiled, truth))
    print(f"cuda vs fp32 truth, median (worst) per token: eager {e_eager:.2e} ({w_eager:.2e}), "
          f"compiled {e_comp:.2e} ({w_comp:.2e})")
    assert e_comp <= 1.25 * e_eager + 2e-3 and w_comp <= 1.5 * w_eager + 5e-3
    _check_router("cuda", torch.bfloat16)
    _check_combine("cuda", torch.bfloat16, 1e-2)
    _check_latent_rows("cuda", torch.bfloat16, 1e-2)


def test_a_failing_compile_leaves_the_eager_functions(dense_checkpoint, monkeypatch, caplog):
    """No C compiler, an Inductor error: the model keeps its eager functions and says so, instead of failing
    its first step."""
    from kda_serving.model import kimi_linear

    def broken(fn):
        def compiled(*args):
            raise RuntimeError("Inductor: no working C compiler found\nmore detail")
        return compiled

    monkeypatch.setattr(kimi_linear, "_compiled", broken)
    model = load_model(dense_checkpoint, device="cpu", progress=False)
    assert model.compile_plain_ops() is False
    assert model.norm_fn is rms_norm and model.layers[0].add_norm_fn is add_rms_norm
    assert "no working C compiler found" in caplog.text and "run eagerly" in caplog.text
    assert all(torch.isfinite(x).all() for x in _run(model))
