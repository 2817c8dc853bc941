"""ctypes binding of the few-token matrix-vector kernel (csrc/gemv/gemv.cu) in the C-ABI library.

The public op (gemv.py) validates the call and allocates out; the function here checks what keeps the kernel
inside its memory (dtypes, device, sizes, strides, alignment), then enqueues it on torch's current stream. It
neither allocates nor synchronises, so it can be captured in a CUDA graph.

    gemv(x, weight, out)     x [B, T, K], weight [B, N, K], out [B, T, N]: out[b] = x[b] @ weight[b]^T

Each tensor needs its last dimension contiguous; the other strides are free (for x and weight multiples of 8
elements: 16-byte aligned rows), so a head's slice of a wider tensor or a transposed view goes in as it is.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import cuda_lib
from .cuda_args import check_aligned, check_launch, sm_count, stream_handle

CHUNK = 8  # elements per 16-byte load: K and x's and weight's strides are multiples of it
MAX_TOKENS = 8  # csrc/gemv/gemv.cu: token rows per call
MAX_COLS = 65536  # csrc/gemv/gemv.cu
MAX_BATCH = 65535  # the grid's y


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The library loaded by cuda_lib.load(), with the GEMV entry point typed."""
    lib = cuda_lib.load()
    fn = lib.kda_serving_gemv
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    fn.argtypes = [p, i64, i64, p, i64, i64, p, i64, i64, i32, i32, i32, i32, i32, p]
    fn.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=8)
def _runs_on(index: int) -> bool:
    return cuda_lib.runs_on(index, "kda_serving_gemv")


def _strides(t: torch.Tensor) -> tuple[int, int]:
    """(batch, row) strides of a 3-D tensor, 0 for a dimension of size 1 (its stride means nothing)."""
    return tuple(0 if t.shape[d] == 1 else t.stride(d) for d in (0, 1))


def _loads_whole_rows(t: torch.Tensor) -> bool:
    return (t.stride(-1) == 1 or t.shape[-1] == 1) and all(s % CHUNK == 0 for s in _strides(t)) \
        and t.data_ptr() % 16 == 0


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes x [B, T, K] @ weight [B, N, K]^T as laid out: bf16 on an SM90 GPU with the
    library, 1 <= T <= MAX_TOKENS, K a multiple of 8 up to MAX_COLS, rows of K contiguous at strides that are
    multiples of 8, 16-byte aligned data."""
    if not (x.is_cuda and x.dtype == weight.dtype == torch.bfloat16 and x.dim() == weight.dim() == 3):
        return False
    B, T, K = x.shape
    return (1 <= T <= MAX_TOKENS and K % CHUNK == 0 and CHUNK <= K <= MAX_COLS and weight.shape[0] == B
            and weight.shape[2] == K and B <= MAX_BATCH and _loads_whole_rows(x) and _loads_whole_rows(weight)
            and _runs_on(x.device.index or 0))


def gemv(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """out [B, T, N] = x [B, T, K] @ weight [B, N, K]^T per batch entry, fp32 sums rounded to bf16."""
    for name, t in (("x", x), ("weight", weight), ("out", out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"kda: argument '{name}': expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.bfloat16:
            raise TypeError(f"kda: argument '{name}': dtype {t.dtype} not supported by the CUDA kernel (expected "
                            f"torch.bfloat16)")
        if t.device.type != "cuda" or t.device != x.device:
            raise ValueError(f"kda: argument '{name}': must be on {x.device if x.is_cuda else 'a CUDA device'}, "
                             f"is on {t.device}")
        if t.dim() != 3:
            raise ValueError(f"kda: argument '{name}': expected 3 dimensions, got shape {tuple(t.shape)}")
    B, T, K = x.shape
    N = weight.shape[1]
    if tuple(weight.shape) != (B, N, K) or tuple(out.shape) != (B, T, N):
        raise ValueError(f"kda: gemv: shapes x {tuple(x.shape)}, weight {tuple(weight.shape)}, out "
                         f"{tuple(out.shape)} are not [B, T, K], [B, N, K], [B, T, N]")
    if not 1 <= T <= MAX_TOKENS:
        raise ValueError(f"kda: argument 'x': the CUDA kernel takes 1 to {MAX_TOKENS} token rows, got {T}")
    if K % CHUNK or not CHUNK <= K <= MAX_COLS:
        raise ValueError(f"kda: argument 'x': the CUDA kernel needs K a multiple of {CHUNK} in [{CHUNK}, "
                         f"{MAX_COLS}], got {K}")
    if B > MAX_BATCH:
        raise ValueError(f"kda: argument 'x': the CUDA kernel takes at most {MAX_BATCH} batch entries, got {B}")
    for name, t in (("x", x), ("weight", weight)):
        if not _loads_whole_rows(t):
            raise ValueError(f"kda: argument '{name}': the CUDA kernel needs rows of K contiguous elements at "
                             f"strides that are multiples of {CHUNK} and 16-byte aligned data, got strides "
                             f"{t.stride()}")
    if out.stride(-1) != 1 and N > 1:
        raise ValueError(f"kda: argument 'out': the CUDA kernel needs its last dimension contiguous, got strides "
                         f"{out.stride()}")
    check_aligned("x", x)
    (xb, xr), (wb, _), (ob, orow) = _strides(x), _strides(weight), _strides(out)
    code = library().kda_serving_gemv(  # a weight of one row: its row stride K, which the kernel checks
        x.data_ptr(), xr, xb, weight.data_ptr(), weight.stride(1) if N > 1 else K, wb, out.data_ptr(), orow, ob,
        B, T, N, K, sm_count(x.device), stream_handle(x.device),
    )
    check_launch(code, "gemv")
