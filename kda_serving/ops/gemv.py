"""Matrix products of a few token rows with a weight, x @ weight^T: the projections of a decode step.

    out = gemv(x, weight[, out])     x [T, K], weight [N, K] -> [T, N]; or batched: x [B, T, K], weight [B, N, K]
                                     -> [B, T, N] (f_b and g_b at once, or each MLA head's value projection)
    out = linear(x, weight[, out])   the same product, on gemv's kernel where it takes the call, else on torch

In fp32, rounded once to x's dtype. Registered as a torch custom op like the KDA ops. CUDA tensors run
csrc/gemv/gemv.cu through cuda_gemv.py (bf16, 1 to 8 token rows, K up to 65536, rows of K contiguous): where
cuBLAS spends one to a few microseconds of tile latency and a split-K reduction on each of a step's dozens of
projections, the kernel streams the weights straight into tensor-core products with the token rows
(docs/gemv.md). CPU tensors run torch.matmul, the reference the kernel is tested against. `linear` is what the
model calls: the kernel where it takes the layout and was measured faster than cuBLAS (LINEAR_MAX_BYTES), torch
(cuBLAS, or the CPU) for the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Where `linear` takes the kernel: the largest weight (bytes, a batch's all) per token count; other counts none.
# Alone (H200, benchmarks/bench_gemv.py, results/h200-gemv.json) the kernel takes every projection of
# Kimi-Linear-48B's decode step up to the 58 MB KDA input projection in 0.39-0.96x cuBLAS's time at 1-8 tokens;
# layer 0's 85 MB MLP gate_up (1.02-1.08x) and the 755 MB LM head (0.99-1.05x) stay on cuBLAS. With this table
# the whole 48B (fp8 experts) decode step took 2.51 ms at one request against 2.65 on cuBLAS, 6.35 against 6.45
# at eight (same run, logs/session25).
LINEAR_MAX_BYTES: dict[int, int] = {t: 64 << 20 for t in range(1, 9)}


def gemv_torch(x: Tensor, weight: Tensor) -> Tensor:
    """The product in torch ops on any device: fp32 sums, rounded once to x's dtype."""
    return torch.matmul(x.float(), weight.float().transpose(-1, -2)).to(x.dtype)


@torch.library.custom_op("kda_serving::gemv_", mutates_args=("out",))
def _gemv_op(x: Tensor, weight: Tensor, out: Tensor) -> None:
    """CPU implementation (the CUDA one is registered below): x [B, T, K], weight [B, N, K], out [B, T, N]."""
    out.copy_(gemv_torch(x, weight))


@_gemv_op.register_kernel("cuda")
def _gemv_cuda(x, weight, out):
    from . import cuda_gemv

    cuda_gemv.gemv(x, weight, out)


@_gemv_op.register_fake
def _(*args, **kwargs) -> None:
    return None


def _batched(x: Tensor, weight: Tensor, out: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The arguments checked and seen as batches [B, T, K], [B, N, K], [B, T, N] (out allocated if None)."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"kda: argument '{name}': expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"kda: argument '{name}': dtype {t.dtype} is not a floating-point type")
    if weight.dim() not in (2, 3) or x.dim() != weight.dim():
        raise ValueError(f"kda: gemv: expected x [T, K] with weight [N, K], or x [B, T, K] with weight [B, N, K]; "
                         f"got shapes {tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.device != x.device or weight.dtype != x.dtype:
        raise ValueError(f"kda: argument 'weight': expected x's device and dtype ({x.device}, {x.dtype}), got "
                         f"{weight.device}, {weight.dtype}")
    if x.shape[-1] != weight.shape[-1] or (x.dim() == 3 and x.shape[0] != weight.shape[0]):
        raise ValueError(f"kda: gemv: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match (the last "
                         f"dimensions, and the batch)")
    shape = (*x.shape[:-1], weight.shape[-2])
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif not isinstance(out, Tensor) or tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device:
        got = (tuple(out.shape), out.dtype, out.device) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"kda: argument 'out': expected {shape} {x.dtype} on {x.device}, got {got}")
    if x.dim() == 2:
        return x[None], weight[None], out[None]
    return x, weight, out


def gemv(x: Tensor, weight: Tensor, out: Tensor | None = None) -> Tensor:
    """x @ weight^T over the last dimension, in fp32, rounded once to x's dtype.

    Args:
        x: [T, K], or [B, T, K] with a batch of weights. CUDA: bf16, 1 <= T <= 8, K a multiple of 8 up to 65536,
            rows of K contiguous at strides that are multiples of 8 (any view of such rows works).
        weight: [N, K], or [B, N, K]; x's dtype and device; CUDA: laid out as x.
        out: where to write the result ([T, N] or [B, T, N], last dimension contiguous on CUDA), e.g. a
            transposed view; allocated if None.
    Returns:
        out.
    """
    xb, wb, ob = _batched(x, weight, out)
    torch.ops.kda_serving.gemv_(xb, wb, ob)
    return ob if x.dim() == 3 else ob[0]


def linear(x: Tensor, weight: Tensor, out: Tensor | None = None) -> Tensor:
    """gemv(x, weight, out) where its CUDA kernel takes the call and the weight is within LINEAR_MAX_BYTES for
    x's token rows; else the same product in torch (F.linear / bmm on the weights' layout, cuBLAS or the CPU)."""
    from . import cuda_gemv

    batched = x.dim() == 3
    if (x.is_cuda and weight.numel() * weight.element_size() <= LINEAR_MAX_BYTES.get(x.shape[-2], -1)
            and cuda_gemv.supports(x if batched else x[None], weight if batched else weight[None])):
        return gemv(x, weight, out)
    y = torch.bmm(x, weight.transpose(1, 2)) if batched else F.linear(x, weight)
    if out is None:
        return y
    out.copy_(y)
    return out
