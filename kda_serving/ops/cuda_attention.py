"""ctypes binding of the varlen flash attention forward (csrc/attention) in the C-ABI library.

    flash_attention(q, k, v, cu_q, cu_k, max_q, causal, scale, out, lse)

The public op (flash_attention.py) validates the call and allocates out and lse; this function checks what
keeps the kernel inside its memory (dtypes, device, strides, alignment, the built sizes), then enqueues it on
torch's current stream. It neither allocates nor synchronises.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import cuda_lib
from .cuda_args import check_launch, cuda_tensor, stream_handle

QK_DIMS = (128, 192)  # query/key head sizes the kernel is built for (192: the MLA layers' nope 128 + rope 64)
VALUE_DIM = 128


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The library loaded by cuda_lib.load(), with the attention entry point typed."""
    lib = cuda_lib.load()
    fn = lib.kda_serving_flash_attention
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, ptr, ptr, i64, ctypes.c_int, ctypes.c_int,
                   ctypes.c_int, i64, ctypes.c_int, ctypes.c_float, ptr, i64, i64, ptr, i64, ptr]
    fn.restype = ctypes.c_int
    merge = lib.kda_serving_attention_merge
    merge.argtypes = [ptr, i64, i64, ptr, i64, ptr, i64, ptr, ptr, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ptr]
    merge.restype = ctypes.c_int
    return lib


def merge_supported(out: torch.Tensor) -> bool:
    """Whether the merge kernel runs on out's device (the library is built for SM90 only)."""
    return out.is_cuda and cuda_lib.runs_on(out.device.index or 0, "kda_serving_attention_merge")


def supports(q: torch.Tensor, qk_dim: int, v_dim: int) -> bool:
    """Whether the kernel takes these attention sizes on q's device: bf16 on an SM90 GPU, query/key heads of
    128 or 192, values of 128, the library built with it."""
    return (q.is_cuda and q.dtype == torch.bfloat16 and qk_dim in QK_DIMS and v_dim == VALUE_DIM
            and cuda_lib.runs_on(q.device.index or 0, "kda_serving_flash_attention"))


def _rows_operand(name: str, t, device) -> None:
    """A [rows, H, D] bf16 view on `device` whose last dimension is contiguous, 16-byte aligned with row and
    head strides in multiples of 8 elements (what a TMA tensor map takes)."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.bfloat16 or t.device != device or t.dim() != 3:
        raise ValueError(f"kda: argument '{name}': the CUDA kernel needs a bf16 [rows, heads, dim] tensor on {device}")
    if t.stride(2) != 1 or t.data_ptr() % 16 or t.stride(0) % 8 or t.stride(1) % 8 or min(t.stride(0),
                                                                                          t.stride(1)) <= 0:
        raise ValueError(f"kda: argument '{name}': the CUDA kernel needs a contiguous last dimension, 16-byte "
                         f"aligned data and row and head strides in multiples of 8, got strides {t.stride()}")


def flash_attention(q, k, v, cu_q, cu_k, max_q: int, causal: bool, scale: float, out, lse) -> None:
    """out [Tq, H, 128] fp32 and lse [Tq, H] fp32 of softmax(scale q k^T) v per packed sequence; see
    flash_attention.py."""
    dev = q.device
    for name, t in (("q", q), ("k", k), ("v", v)):
        _rows_operand(name, t, dev)
    Tq, H, D = q.shape
    if not supports(q, D, v.shape[2]) or k.shape[1:] != q.shape[1:] or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"kda: argument 'q': the CUDA kernel takes heads of {QK_DIMS} for queries and keys and "
                         f"{VALUE_DIM} for values on an SM90 GPU, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    cuda_tensor("cu_q", cu_q, (torch.int32,), dev, ndim=1)
    cuda_tensor("cu_k", cu_k, (torch.int32,), dev, ndim=1)
    if cu_k.shape != cu_q.shape or cu_q.shape[0] < 1:
        raise ValueError(f"kda: argument 'cu_k': expected as many entries as cu_q ({cu_q.shape[0]}), got "
                         f"{cu_k.shape[0]}")
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.device != dev \
            or tuple(out.shape) != (Tq, H, VALUE_DIM) or out.stride(2) != 1 or out.stride(0) % 2 \
            or out.stride(1) % 2 or out.data_ptr() % 8:
        raise ValueError(f"kda: argument 'out': expected fp32 {(Tq, H, VALUE_DIM)} on {dev} with a contiguous last "
                         "dimension and even strides")
    if not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32 or lse.device != dev \
            or tuple(lse.shape) != (Tq, H) or lse.stride(1) != 1 or (Tq > 1 and lse.stride(0) < H):
        raise ValueError(f"kda: argument 'lse': expected fp32 {(Tq, H)} on {dev} with contiguous rows")
    code = library().kda_serving_flash_attention(
        q.data_ptr(), Tq, q.stride(0), q.stride(1), k.data_ptr(), k.shape[0], k.stride(0), k.stride(1),
        v.data_ptr(), v.stride(0), v.stride(1), cu_q.data_ptr(), cu_k.data_ptr(), cu_q.shape[0] - 1, H, D,
        v.shape[2], max_q, int(causal), float(scale), out.data_ptr(), out.stride(0), out.stride(1),
        lse.data_ptr(), max(lse.stride(0), H), stream_handle(dev))
    check_launch(code, "flash attention")


def merge(out, lse, rows, row0: int, part_o, part_lse) -> None:
    """Folds part_o [n, R, H, D] / part_lse [n, R, H] into out / lse at rows (int64 [R] on the device, or None:
    rows row0 .. row0 + R - 1); see flash_attention.merge_attention."""
    dev = out.device
    n, R, H, D = part_o.shape
    cuda_tensor("part_o", part_o, (torch.float32,), dev)
    cuda_tensor("part_lse", part_lse, (torch.float32,), dev)
    if tuple(part_lse.shape) != (n, R, H):
        raise ValueError(f"kda: argument 'part_lse': expected shape {(n, R, H)}, got {tuple(part_lse.shape)}")
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.dim() != 3 or out.shape[1:] != (H, D) \
            or out.stride(2) != 1 or out.stride(0) % 4 or out.stride(1) % 4 or out.data_ptr() % 16 or D % 4:
        raise ValueError(f"kda: argument 'out': the merge kernel needs fp32 [rows, {H}, {D}] with a contiguous last "
                         "dimension, 16-byte aligned rows and D a multiple of 4")
    if not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32 or lse.device != dev or lse.dim() != 2 \
            or lse.shape[1] != H or lse.stride(1) != 1 or lse.shape[0] != out.shape[0]:
        raise ValueError(f"kda: argument 'lse': expected fp32 [{out.shape[0]}, {H}] on {dev} with contiguous rows")
    if rows is not None:
        cuda_tensor("rows", rows, (torch.int64,), dev, ndim=1)
        if rows.shape[0] != R:
            raise ValueError(f"kda: argument 'rows': expected {R} entries, got {rows.shape[0]}")
    elif not 0 <= row0 <= out.shape[0] - R:
        raise ValueError(f"kda: argument 'row0': rows {row0} .. {row0 + R - 1} lie outside out's {out.shape[0]}")
    code = library().kda_serving_attention_merge(
        out.data_ptr(), out.stride(0), out.stride(1), lse.data_ptr(), lse.stride(0),
        None if rows is None else rows.data_ptr(), row0, part_o.data_ptr(), part_lse.data_ptr(), R, n, H, D,
        stream_handle(dev))
    check_launch(code, "attention merge")
