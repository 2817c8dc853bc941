"""ctypes binding of the gated RMS norm kernel (csrc/norm) in the C-ABI library.

Its own module beside cuda_decode.py (the kernel is no part of decode), with the argument checks of
cuda_args.py: the public op (gated_norm.py) validates the call and allocates out; the function here checks only
what keeps the kernel inside its memory (dtypes, device, contiguity, sizes, alignment), then enqueues it on
torch's current stream. It neither allocates nor synchronises, so it can be captured in a CUDA graph.

    gated_rms_norm(x, gate, weight, eps, out)     x, gate, out [..., D]; weight [D]

x needs only rows of D contiguous elements at one stride (x.view(-1, D) works): contiguous, or each head's
slice of a wider projection. gate and out are contiguous.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import cuda_lib
from .cuda_args import check_aligned, check_launch, cuda_tensor, stream_handle

CHUNK = 8  # elements per 16-byte access; D and x's row stride are multiples of it
MAX_HEAD_DIM = 1024  # csrc/norm/gated_norm_params.h kMaxHeadDim

_BF16 = (torch.bfloat16,)
_WEIGHT = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The library loaded by cuda_lib.load(), with the norm entry point typed."""
    lib = cuda_lib.load()
    fn = lib.kda_serving_gated_rms_norm
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return lib


def _row_stride(x: torch.Tensor, D: int) -> int:
    """Elements between consecutive rows of D in x; ValueError unless the rows are contiguous and evenly spaced."""
    try:
        rows = x.view(-1, D)
    except RuntimeError:
        rows = None
    if rows is None or rows.stride(1) != 1:
        raise ValueError(f"kda: argument 'x': the CUDA kernel needs rows of {D} contiguous elements at one stride "
                         f"(x.view(-1, {D}) must work), got shape {tuple(x.shape)} strides {x.stride()}")
    stride = rows.stride(0) if rows.shape[0] > 1 else D
    if stride % CHUNK:
        raise ValueError(f"kda: argument 'x': the CUDA kernel needs a row stride that is a multiple of {CHUNK} "
                         f"(16-byte aligned rows), got {stride}")
    return stride


def gated_rms_norm(x, gate, weight, eps: float, out) -> None:
    """out = rms_norm(x) * weight * sigmoid(gate) per row of D (gated_norm.py); writes out in place."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"kda: argument 'x': expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _BF16:
        raise TypeError(f"kda: argument 'x': dtype {x.dtype} not supported by the CUDA kernel (expected "
                        f"torch.bfloat16)")
    if x.device.type != "cuda":
        raise ValueError(f"kda: argument 'x': must be on a CUDA device, is on {x.device}")
    if x.dim() == 0:
        raise ValueError("kda: argument 'x': expected at least 1 dimension (rows of D), got a scalar")
    dev, D = x.device, x.shape[-1]
    if D % CHUNK or not CHUNK <= D <= MAX_HEAD_DIM:
        raise ValueError(f"kda: argument 'x': the CUDA kernel needs D a multiple of {CHUNK} in [{CHUNK}, "
                         f"{MAX_HEAD_DIM}], got D={D}")
    stride = _row_stride(x, D)
    for name, t in (("gate", gate), ("out", out)):
        if tuple(cuda_tensor(name, t, _BF16, dev).shape) != tuple(x.shape):
            raise ValueError(f"kda: argument '{name}': expected shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if tuple(cuda_tensor("weight", weight, _WEIGHT, dev, ndim=1).shape) != (D,):
        raise ValueError(f"kda: argument 'weight': expected shape {(D,)}, got {tuple(weight.shape)}")
    for name, t in (("x", x), ("gate", gate), ("weight", weight), ("out", out)):
        check_aligned(name, t)
    code = library().kda_serving_gated_rms_norm(
        x.data_ptr(), stride, gate.data_ptr(), weight.data_ptr(), int(weight.dtype == torch.bfloat16),
        out.data_ptr(), x.numel() // D, D, float(eps), stream_handle(dev),
    )
    check_launch(code, "gated rms norm")
