"""The KDA block's output gate and norm: out = rms_norm(x) * weight * sigmoid(gate) over the last dimension.

Kimi-Linear normalises each head's KDA output o [T, H, D] (RMS over D, eps = config.rms_norm_eps), scales it by
the learned weight [D] and gates it with sigmoid(gate), gate = g_b(g_a(hidden)) viewed as [T, H, D]; all in
fp32, the result in x's dtype, the way transformers' KimiLinearRMSNormGated computes it.

Registered as a torch custom op like the KDA ops (fake implementation for torch.compile; the CUDA one neither
allocates nor synchronises, so it can be captured in a CUDA graph). CPU tensors run the PyTorch code below,
which the model ran before the kernel existed and which the transformers comparisons hold to bit for bit; CUDA
tensors run the fused kernel in csrc/norm through kda_serving/ops/cuda_norm.py: one memory-bound pass instead
of a dozen elementwise kernels over fp32 copies (docs/gated-norm.md).

Example (the KDA block's call):

    >>> o = kda_prefill(...).out.view(T, H, D)                              # bf16, CUDA
    >>> gate = F.linear(g_a, g_b_proj).view(T, H, D)
    >>> y = gated_rms_norm(o, gate, o_norm_weight, eps=1e-5)                # [T, H, D] bf16
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def gated_rms_norm_torch(x: Tensor, gate: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The PyTorch formula, on any device, unchecked: what CPU tensors run, and the eager baseline that
    benchmarks/bench_kda_layer.py times against the kernel."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h * torch.sigmoid(gate.float())).to(x.dtype)


@torch.library.custom_op("kda_serving::gated_rms_norm_", mutates_args=("out",))
def _gated_rms_norm_op(x: Tensor, gate: Tensor, weight: Tensor, eps: float, out: Tensor) -> None:
    """CPU implementation (the CUDA one is registered below). Writes out, x's shape and dtype."""
    out.copy_(gated_rms_norm_torch(x, gate, weight, eps))


@_gated_rms_norm_op.register_kernel("cuda")
def _gated_rms_norm_cuda(x, gate, weight, eps, out):
    from . import cuda_norm

    cuda_norm.gated_rms_norm(x, gate, weight, eps, out)


@_gated_rms_norm_op.register_fake
def _(*args, **kwargs) -> None:
    return None


def _validate(x, gate, weight, eps) -> None:
    """What holds on every device; the CUDA kernel's own limits (bf16, D, layout, alignment) are checked by
    cuda_norm.py."""
    for name, t in (("x", x), ("gate", gate), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"kda: argument '{name}': expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"kda: argument '{name}': dtype {t.dtype} is not a floating-point type")
    if x.dim() == 0:
        raise ValueError("kda: argument 'x': expected rows of D values [..., D], got a scalar")
    if gate.shape != x.shape:
        raise ValueError(f"kda: argument 'gate': expected x's shape {tuple(x.shape)}, got {tuple(gate.shape)}")
    if tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"kda: argument 'weight': expected shape {(x.shape[-1],)}, got {tuple(weight.shape)}")
    for name, t in (("gate", gate), ("weight", weight)):
        if t.device != x.device:
            raise ValueError(f"kda: argument '{name}': is on {t.device}, but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"kda: argument 'eps': expected a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"kda: argument 'eps': must be finite and non-negative, got {eps}")


def gated_rms_norm(x: Tensor, gate: Tensor, weight: Tensor, eps: float) -> Tensor:
    """rms_norm(x) * weight * sigmoid(gate) over the last dimension, computed in fp32.

    Args:
        x: [..., D], e.g. the KDA output [T, H, D]. CUDA: bf16, D a multiple of 8 up to 1024, rows of D contiguous
            at one stride (contiguous, or each head's slice of a wider projection). CPU: any floating dtype.
        gate: x's shape (the gate projection [T, H * D] viewed as [T, H, D]); CUDA: bf16, contiguous.
        weight: [D]; CUDA: fp32 or bf16.
        eps: added to the mean square (config.rms_norm_eps).
    Returns:
        out: x's shape and dtype, contiguous.
    """
    _validate(x, gate, weight, eps)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.kda_serving.gated_rms_norm_(x, gate, weight, float(eps), out)
    return out
