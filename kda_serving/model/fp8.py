"""FP8 expert weights (`quantization="fp8"`): the routed experts' GEMMs with both operands in e4m3.

Kimi-Linear-48B's routed experts are 47 of its 49 B parameters: 94 GB in bf16, more than an 80 GB H100 holds,
and a decode step reads most of them. Stored in e4m3 with one fp32 scale per output channel (per row of each
expert's [out, in] matrix), they take half that, and the step reads half the bytes. The tokens' rows are
quantized the same way, one scale per row, as each GEMM runs; the GEMM multiplies the e4m3 values exactly,
accumulates in fp32 and applies both scales in its epilogue:

    out[t, o] = sa[t] * sw[o] * sum_i qa[t, i] * qw[o, i],   a[t, :] ~= sa[t] * qa[t, :],  w[o, :] ~= sw[o] * qw[o, :]

On CUDA that is torch._scaled_grouped_mm (one launch per GEMM over every expert, as the bf16 path's
torch._grouped_mm); elsewhere `fp8_linear` computes the same from the dequantized operands, the reference the
GPU path is tested against. Everything else (attention, KDA, shared experts, the dense MLP, embeddings,
lm_head) stays in the model dtype. docs/quantization.md has the measured speed and accuracy.
"""

from __future__ import annotations

import torch

from ..ops.fp8_quantize import FP8, FP8_MAX  # noqa: F401 - the format's constants, for callers
from ..ops.fp8_quantize import quantize_rows_reference as quantize_rows

QUANTIZATIONS = (None, "fp8")
# Rows quantized per call while loading or drawing weights: bounds the fp32 temporaries (64 MB at 2,304 wide).
QUANTIZE_ROWS_PER_CALL = 1 << 13

# quantize_rows(x [..., K]) -> (q e4m3 [..., K], scale fp32 [...]) with x ~= q * scale: each row scaled so that
# its largest magnitude maps to 448, rounded to nearest (ops/fp8_quantize.py; in torch ops, for weights of any
# dtype on any device; the GEMMs' activations go through that module's kernels).


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(e4m3 [..., K], fp32 [...]) -> fp32 [..., K]."""
    return q.float() * scale[..., None]


def fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """Quantized rows (xq e4m3 [T, in], x_scale [T]) @ W^T as the fp8 GEMM computes it: both operands
    dequantized, multiplied in fp32; [T, out] in `dtype`."""
    return (dequantize_rows(xq, x_scale) @ dequantize_rows(weight, weight_scale).T).to(dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ W^T with W = (weight e4m3 [out, in], weight_scale fp32 [out]): x's rows quantized, then
    fp8_matmul; [T, out] in x's dtype."""
    return fp8_matmul(*quantize_rows(x), weight, weight_scale, x.dtype)


@torch.no_grad()
def quantize_into_(weight: torch.Tensor, weight_scale: torch.Tensor, source: torch.Tensor) -> None:
    """Writes quantize_rows(source) into weight (e4m3) and weight_scale (fp32, weight's shape without the last
    dimension), a slice of rows at a time on weight's device (so a checkpoint tensor in host memory never
    needs an fp32 copy of itself on the GPU)."""
    if source.shape != weight.shape or weight_scale.shape != weight.shape[:-1]:
        raise ValueError(f"quantize_into_: source {tuple(source.shape)}, weight {tuple(weight.shape)} and scale "
                         f"{tuple(weight_scale.shape)} do not match")
    rows_q, rows_s = weight.view(-1, weight.shape[-1]), weight_scale.view(-1)
    rows_src = source.reshape(-1, source.shape[-1])
    for a in range(0, rows_src.shape[0], QUANTIZE_ROWS_PER_CALL):
        b = min(a + QUANTIZE_ROWS_PER_CALL, rows_src.shape[0])
        q, s = quantize_rows(rows_src[a:b].to(weight.device))
        rows_q[a:b].copy_(q)
        rows_s[a:b].copy_(s)


def check_quantization(quantization) -> str | None:
    """The quantization name, checked: None (weights in the model dtype) or "fp8" (routed experts in e4m3)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"'quantization' must be None or 'fp8', got {quantization!r}")
    return quantization
