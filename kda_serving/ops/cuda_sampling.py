"""ctypes binding of the sampler's radix-floor kernel (csrc/sampling/radix_floor.cu) in the C-ABI library.

The public op (sampling.py) validates the call and allocates out; the function here checks only what keeps the
kernel inside its memory (dtypes, devices, shapes, unit inner stride), allocates the kernel's scratch through
torch (16 KB per CTA, and a zeroed counter per row) and enqueues the three launches on torch's current stream.
It never synchronises, so it can be captured in a CUDA graph.

A row goes to several CTAs when the rows alone would leave SMs idle: the kernel is bound by its shared-memory
atomics, about 0.11 ms for a 163,840-entry row on one H100 SM.

    radix_floor(x, target, by_mass, out)     x [R, V] fp32 (rows at any stride); target [R] int64; out [R] fp32
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import cuda_lib
from .cuda_args import check_launch, cuda_tensor, sm_count, stream_handle


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The library loaded by cuda_lib.load(), with the radix-floor entry point typed."""
    lib = cuda_lib.load()
    fn = lib.kda_serving_radix_floor
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return lib


MAX_SLICE = 1 << 18  # csrc/sampling/radix_floor.cu kMaxSlice: entries of a row per CTA
MAX_PARTS = 1024
MAX_ROWS = 65535  # the grid's y dimension
MIN_SLICE = 8192  # entries below which another CTA for a row is not worth its histogram (Kimi-Linear: 20 a row)
BINS = 2048


def parts_per_row(rows: int, vocab: int, sms: int) -> int:
    """CTAs per row: enough that none takes over MAX_SLICE entries; more while the rows leave SMs idle (two CTAs
    fit an SM) and each keeps MIN_SLICE entries."""
    needed = -(-vocab // MAX_SLICE)
    return max(needed, min(2 * sms // max(rows, 1), vocab // MIN_SLICE, MAX_PARTS), 1)


def radix_floor(x, target, by_mass: bool, out) -> None:
    """out[r] = the largest v with weight(x[r] >= v) >= target[r] (sampling.py radix_floor_torch); in place."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"kda: argument 'x': expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"kda: argument 'x': dtype {x.dtype} not supported by the CUDA kernel (expected torch.float32)")
    if x.device.type != "cuda":
        raise ValueError(f"kda: argument 'x': must be on a CUDA device, is on {x.device}")
    if x.dim() != 2 or x.shape[1] == 0 or (x.shape[1] > 1 and x.stride(1) != 1):
        raise ValueError(f"kda: argument 'x': the CUDA kernel needs rows [R, V] of V >= 1 contiguous elements, got "
                         f"shape {tuple(x.shape)} strides {x.stride()}")
    rows, vocab = x.shape
    if rows > MAX_ROWS or vocab > MAX_PARTS * MAX_SLICE:
        raise ValueError(f"kda: argument 'x': the CUDA kernel takes at most {MAX_ROWS} rows of "
                         f"{MAX_PARTS * MAX_SLICE} entries, got shape {tuple(x.shape)}")
    stride = x.stride(0) if rows > 1 else vocab
    if rows > 1 and stride < vocab:
        raise ValueError(f"kda: argument 'x': rows overlap (stride {stride} < {vocab})")
    for name, t, dtype in (("target", target, torch.int64), ("out", out, torch.float32)):
        if tuple(cuda_tensor(name, t, (dtype,), x.device, ndim=1).shape) != (rows,):
            raise ValueError(f"kda: argument '{name}': expected shape {(rows,)}, got {tuple(t.shape)}")
    parts = parts_per_row(rows, vocab, sm_count(x.device))
    slices = torch.empty(rows * parts * BINS, dtype=torch.int64, device=x.device)
    state = torch.empty(rows * 2, dtype=torch.int64, device=x.device)
    arrived = torch.zeros(rows, dtype=torch.int32, device=x.device)
    code = library().kda_serving_radix_floor(x.data_ptr(), stride, rows, vocab, target.data_ptr(), int(by_mass),
                                            out.data_ptr(), parts, slices.data_ptr(), state.data_ptr(),
                                            arrived.data_ptr(), stream_handle(x.device))
    check_launch(code, "radix floor")
