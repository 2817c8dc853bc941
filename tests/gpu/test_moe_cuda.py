"""The mixture of experts on a GPU: the grouped-GEMM path (torch._grouped_mm over all experts) against the
per-expert loop it replaces and against float64, at Kimi-Linear-48B's expert shapes (hidden 2304, experts of
1024, top-8 of 256 experts; 64 experts here to keep the weights small).

Both GPU paths compute bf16 products with fp32 accumulation and round each expert's output once to bf16, so
they differ only in accumulation order: a few bf16 units at most, ~1e-3 in relative norm. Against float64 the
bf16 rounding of the intermediate activation and of each expert's output (unit roundoff 2^-9) bounds the
error: 1e-2 in relative norm fails a wrong expert, weight or row order by orders of magnitude.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kda_serving.model import ModelConfig
from kda_serving.model import moe as moe_module
from kda_serving.model.moe import MoE

pytestmark = pytest.mark.gpu

CONFIG_48B_4L = Path(__file__).resolve().parents[2] / "configs" / "kimi-linear-48b-4layer.json"


@pytest.fixture(scope="module")
def moe() -> MoE:
    cfg = dataclasses.replace(ModelConfig.from_file(str(CONFIG_48B_4L)), num_experts=64)
    m = MoE(cfg, torch.bfloat16, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            scale = 1.0 if name == "e_score_correction_bias" else p.shape[-1] ** -0.5
            p.copy_((torch.randn(p.shape, generator=gen, device="cuda") * scale).to(p.dtype))
    return m


def _loop_experts(m: MoE, x, ids, weights, monkeypatch):
    with monkeypatch.context() as mp:
        mp.setattr(moe_module, "_grouped_gemm_fits", lambda *a: False)
        mp.setattr(moe_module, "GEMV_MAX_TOKENS", 0)
        mp.setattr(moe_module, "FP8_GEMV_MAX_TOKENS", 0)
        return m._experts(x, ids, weights)


def _float64_experts(m: MoE, x, ids, weights) -> torch.Tensor:
    """sum_k w_k down(silu(gate x) * up x) per token in float64 on the CPU, from the same bf16 weights."""
    xd, ids_c, w = x.double().cpu(), ids.cpu(), weights.double().cpu()
    used = {int(e): (m.gate_up_proj[e].double().cpu(), m.down_proj[e].double().cpu()) for e in ids_c.unique()}
    out = torch.zeros_like(xd)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            gate_up, down = used[int(ids_c[t, j])]
            g, u = (gate_up @ xd[t]).chunk(2)
            out[t] += w[t, j] * (down @ (F.silu(g) * u))
    return out


def _rel(a, b) -> float:
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def _grouped_and_loop(layer: MoE, T: int, monkeypatch):
    """Random tokens, their routing, and the layer's experts on the grouped GEMMs (forced at every size: the
    GEMV path has tests/gpu/test_moe_gemv_cuda.py) and on the loop: (x, ids, weights, grouped, loop)."""
    monkeypatch.setattr(moe_module, "GEMV_MAX_TOKENS", 0)
    monkeypatch.setattr(moe_module, "FP8_GEMV_MAX_TOKENS", 0)
    assert moe_module._grouped_gemm_fits(torch.empty(1, device="cuda", dtype=torch.bfloat16), layer.gate_up_proj)
    gen = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, layer.gate_up_proj.shape[2], generator=gen, device="cuda").to(torch.bfloat16)
    ids, weights = layer.route(x)
    grouped = layer._experts(x, ids, weights)
    assert torch.isfinite(grouped).all()
    return x, ids, weights, grouped, _loop_experts(layer, x, ids, weights, monkeypatch)


@pytest.mark.parametrize("T", [1, 64, 700])
def test_grouped_experts_match_loop_and_float64(moe, T, monkeypatch):
    x, ids, weights, grouped, loop = _grouped_and_loop(moe, T, monkeypatch)
    e_loop = _rel(grouped, loop)
    e_ref = _rel(grouped, _float64_experts(moe, x, ids, weights)) if T <= 64 else float("nan")
    print(f"T={T}: vs loop {e_loop:.2e}, vs float64 {e_ref:.2e} (max |diff| vs loop "
          f"{(grouped.float() - loop.float()).abs().max().item():.2e})")
    assert e_loop <= 5e-3
    if T <= 64:  # the float64 loop is slow; the loop comparison covers the larger batch
        assert e_ref <= 1e-2


def test_moe_forward_captures_in_a_cuda_graph(moe):
    """No host sync on the grouped path: the whole MoE (routing, both grouped GEMMs, shared expert) is captured
    once and replayed on new inputs, equal to eager calls."""
    x = torch.zeros(64, moe.gate_up_proj.shape[2], device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        moe(x)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = moe(x)
    for seed in range(3):
        gen = torch.Generator(device="cuda").manual_seed(100 + seed)
        x.copy_(torch.randn(x.shape, generator=gen, device="cuda").to(x.dtype))
        graph.replay()
        eager = moe(x)
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager)


# fp8 experts (model/fp8.py): torch._scaled_grouped_mm on rows quantized per row, against a float64 emulation
# written here: each GEMM's input row quantized, both operands dequantized, exact products, and the bf16
# rounding the GPU path makes of each GEMM's output (silu(gate) * up is quantized from fp32, unrounded, as
# ops.silu_mul_quantize_fp8 computes it). What is left is
# accumulation order, and elements it moves across an e4m3 rounding boundary (one e4m3 step, 2^-3 relative):
# ~5e-3 in relative norm against the fp8 loop path (fp32 products of the same operands, measured).
# Quantization itself moves the experts by ~6.5e-2 from the bf16 ones (checked to be over twice the bound),
# so the 1.5e-2 bound fails a path that skipped it, and a wrong scale or expert by far more.
FP8_REF_TOL = 1.5e-2
# With Hopper's fast accumulation (MoE.fast_accumulation) the GEMMs' partial sums keep fewer bits, and their
# larger differences cross more e4m3 rounding boundaries of the second GEMM's input: measured 1.15-1.45e-2
# (H100). Twice that still fails a skipped quantization (6.5e-2) or a wrong scale.
FP8_FAST_ACCUM_TOL = 3e-2


@pytest.fixture(scope="module")
def moe_fp8(moe) -> MoE:
    import copy

    quantized = copy.deepcopy(moe)
    quantized.quantize_experts_()
    return quantized


def _float64_fp8_experts(m: MoE, x, ids, weights) -> torch.Tensor:
    from kda_serving.model.fp8 import quantize_rows

    def deq(q, s):
        return q.double().cpu() * s.double().cpu()[..., None]

    def quant(row):
        q, s = quantize_rows(row.float())
        return deq(q, s)

    def bf16(t):
        return t.to(torch.bfloat16).double()

    ids_c, w = ids.cpu(), weights.double().cpu()
    used = {int(e): (deq(m.gate_up_proj[e], m.gate_up_proj_scale[e]), deq(m.down_proj[e], m.down_proj_scale[e]))
            for e in ids_c.unique()}
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        xq = quant(x[t].cpu())
        for j in range(ids.shape[1]):
            gate_up, down = used[int(ids_c[t, j])]
            g, u = bf16(gate_up @ xq).chunk(2)
            out[t] += w[t, j] * bf16(down @ quant(F.silu(g) * u))  # the activation in fp32 (not bf16)
    return out


@pytest.mark.parametrize("fast", [False, True], ids=["exact-accum", "fast-accum"])
@pytest.mark.parametrize("T", [1, 64, 700])
def test_fp8_grouped_experts_match_loop_and_float64(moe, moe_fp8, T, fast, monkeypatch):
    monkeypatch.setattr(moe_fp8, "fast_accumulation", fast)
    x, ids, weights, out, loop = _grouped_and_loop(moe_fp8, T, monkeypatch)
    bf16 = moe._experts(x, ids, weights)
    e_loop, e_bf16 = _rel(out, loop), _rel(out, bf16)
    e_ref = _rel(out, _float64_fp8_experts(moe_fp8, x, ids, weights)) if T <= 64 else float("nan")
    print(f"fp8 T={T} fast accumulation {fast}: vs fp8 loop {e_loop:.2e}, vs float64 emulation {e_ref:.2e}, vs "
          f"bf16 experts {e_bf16:.2e} (max |diff| vs loop {(out.float() - loop.float()).abs().max().item():.2e})")
    tol = FP8_FAST_ACCUM_TOL if fast else FP8_REF_TOL
    assert e_loop <= tol
    if T <= 64:
        assert e_ref <= tol
    assert 2 * tol < e_bf16 < 0.2  # quantized, and only by e4m3's rounding


def test_fp8_moe_captures_in_a_cuda_graph(moe_fp8):
    test_moe_forward_captures_in_a_cuda_graph(moe_fp8)
