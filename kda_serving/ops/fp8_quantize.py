"""Rows quantized to e4m3 with one fp32 scale each: the operands of the fp8 experts' GEMMs (model/fp8.py).

    q, scale = quantize_rows_fp8(x)              x [..., K]              -> q [..., K] e4m3, scale [...]
    q, scale = silu_mul_quantize_fp8(gate_up)    gate_up [..., 2I]       -> the same of silu(gate) * up [..., I]

Each row is scaled so that its largest magnitude maps to 448, e4m3's largest finite value, and rounded to
nearest: scale = max(amax, 1e-12) * (1/448), q = round(x * (1/scale)), each fp32 step rounded to nearest (the
reciprocals make that one definition on every device: torch divides by a scalar as a product with its
reciprocal on CUDA and not on the CPU). So x ~= q * scale within 2^-4 |x| (3 mantissa bits), or 2^-10 scale for
the elements below 2^-6 scale (e4m3's subnormals). silu(gate) * up is computed in fp32 from the inputs and
quantized without an intermediate rounding. A row holding a NaN gets a NaN scale.

Registered as torch custom ops (functional: they return new tensors) with fake implementations. CUDA tensors
of bf16 rows (K or I a multiple of 8, at most 8,192) run csrc/moe/fp8_quantize.cu through cuda_fp8.py, one
memory-bound kernel each; everything else runs the torch formulas below, which the kernel is tested against
(quantize_rows bit for bit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
SCALE_PER_AMAX = 1.0 / FP8_MAX  # as fp32, the kernel's constant
# The smallest row amax a scale is taken from: an all-zero row gets a tiny positive scale (and zeros), not 0/0.
AMAX_FLOOR = 1e-12


def quantize_rows_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., K] (any float dtype) -> (q e4m3 [..., K], scale fp32 [...]) with x ~= q * scale (module
    docstring), in torch ops on x's device."""
    amax = x.abs().amax(-1).float().clamp_min(AMAX_FLOOR)
    scale = amax * SCALE_PER_AMAX
    return (x.float() * torch.reciprocal(scale)[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def silu_mul_quantize_reference(gate_up: Tensor) -> tuple[Tensor, Tensor]:
    """gate_up [..., 2I] = [gate, up] -> quantize_rows_reference(silu(gate) * up), the product in fp32."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return quantize_rows_reference(F.silu(gate) * up)


def _kernel_takes(rows: Tensor, width: int) -> bool:
    from . import cuda_fp8

    return cuda_fp8.supports(rows, width)


@torch.library.custom_op("kda_serving::fp8_quantize_rows", mutates_args=())
def _quantize_rows_op(x: Tensor) -> tuple[Tensor, Tensor]:
    """CPU implementation (the CUDA one is registered below)."""
    return quantize_rows_reference(x)


@_quantize_rows_op.register_kernel("cuda")
def _quantize_rows_cuda(x):
    from . import cuda_fp8

    if not _kernel_takes(x, x.shape[-1]):
        return quantize_rows_reference(x)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    cuda_fp8.quantize_rows(rows, q.view(-1, x.shape[-1]), scale.view(-1))
    return q, scale


@_quantize_rows_op.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=FP8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("kda_serving::fp8_silu_mul_quantize", mutates_args=())
def _silu_mul_quantize_op(gate_up: Tensor) -> tuple[Tensor, Tensor]:
    """CPU implementation (the CUDA one is registered below)."""
    return silu_mul_quantize_reference(gate_up)


@_silu_mul_quantize_op.register_kernel("cuda")
def _silu_mul_quantize_cuda(gate_up):
    from . import cuda_fp8

    inter = gate_up.shape[-1] // 2
    if not _kernel_takes(gate_up, inter):
        return silu_mul_quantize_reference(gate_up)
    rows = gate_up.reshape(-1, gate_up.shape[-1]).contiguous()
    q = torch.empty(*gate_up.shape[:-1], inter, dtype=FP8, device=gate_up.device)
    scale = torch.empty(gate_up.shape[:-1], dtype=torch.float32, device=gate_up.device)
    cuda_fp8.silu_mul_quantize(rows, q.view(-1, inter), scale.view(-1))
    return q, scale


@_silu_mul_quantize_op.register_fake
def _(gate_up):
    out_shape = (*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    return gate_up.new_empty(out_shape, dtype=FP8), gate_up.new_empty(gate_up.shape[:-1], dtype=torch.float32)


def _check(name: str, t, even: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"kda: argument '{name}': expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point() or t.dtype == FP8 or t.dim() < 1 or t.shape[-1] < (2 if even else 1):
        raise ValueError(f"kda: argument '{name}': expected a float tensor [..., K] with K >= {2 if even else 1}, "
                         f"got {t.dtype} {tuple(t.shape)}")
    if even and t.shape[-1] % 2:
        raise ValueError(f"kda: argument '{name}': expected [..., 2I] (gate, then up), got {tuple(t.shape)}")


def quantize_rows_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., K] -> (q e4m3 [..., K], scale fp32 [...]) with x ~= q * scale (module docstring)."""
    _check("x", x)
    return torch.ops.kda_serving.fp8_quantize_rows(x)


def silu_mul_quantize_fp8(gate_up: Tensor) -> tuple[Tensor, Tensor]:
    """gate_up [..., 2I] = [gate, up] -> (q e4m3 [..., I], scale fp32 [...]) of silu(gate) * up in fp32."""
    _check("gate_up", gate_up, even=True)
    return torch.ops.kda_serving.fp8_silu_mul_quantize(gate_up)
