"""ctypes binding of the rows' e4m3 quantization (csrc/moe/fp8_quantize.cu) in the C-ABI library.

The public ops (fp8_quantize.py) pick the kernel where `supports` says so and allocate the outputs; the
functions here check what keeps the kernel inside its memory (dtypes, device, contiguity, shapes, alignment),
then enqueue it on torch's current stream. Neither allocates nor synchronises: CUDA-graph capturable.

    quantize_rows(x [M, K] bf16, q [M, K] e4m3, scale [M] fp32)
    silu_mul_quantize(gate_up [M, 2I] bf16, q [M, I] e4m3, scale [M] fp32)
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import cuda_lib
from .cuda_args import check_aligned, check_launch, cuda_tensor, stream_handle

FP8 = torch.float8_e4m3fn
VEC = 8  # elements per load: widths are multiples of it
MAX_WIDTH = 8192  # a row's share per thread held in registers (kMaxVecsPerThread)
ENTRY_POINTS = ("kda_serving_fp8_quantize_rows", "kda_serving_fp8_silu_mul_quantize")


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The library loaded by cuda_lib.load(), with the quantization entry points typed."""
    lib = cuda_lib.load()
    for name in ENTRY_POINTS:
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = ctypes.c_int
    return lib


def supports(rows: torch.Tensor, width: int) -> bool:
    """Whether the kernel quantizes these rows: bf16 on an SM90 GPU with the library, `width` elements quantized
    per row a multiple of 8, at most 8,192."""
    return (rows.is_cuda and rows.dtype == torch.bfloat16 and VEC <= width <= MAX_WIDTH and width % VEC == 0
            and _runs_on(rows.device.index if rows.device.index is not None else torch.cuda.current_device()))


@functools.lru_cache(maxsize=8)
def _runs_on(index: int) -> bool:
    return all(cuda_lib.runs_on(index, name) for name in ENTRY_POINTS)


def _launch(entry: str, what: str, src_name: str, src: torch.Tensor, width: int, q: torch.Tensor,
            scale: torch.Tensor) -> None:
    dev = src.device
    cuda_tensor("q", q, (FP8,), dev, ndim=2)
    cuda_tensor("scale", scale, (torch.float32,), dev, ndim=1)
    rows = src.shape[0]
    if tuple(q.shape) != (rows, width) or tuple(scale.shape) != (rows,):
        raise ValueError(f"kda: {what}: expected q {(rows, width)} and scale {(rows,)}, got {tuple(q.shape)} and "
                         f"{tuple(scale.shape)}")
    if not VEC <= width <= MAX_WIDTH or width % VEC:
        raise ValueError(f"kda: {what}: the CUDA kernel needs a row width that is a multiple of {VEC} up to "
                         f"{MAX_WIDTH}, got {width}")
    check_aligned(src_name, src)
    if q.data_ptr() % 8:
        raise ValueError("kda: argument 'q': the CUDA kernel needs 8-byte aligned data")
    code = getattr(library(), entry)(src.data_ptr(), src.shape[1], rows, width, q.data_ptr(), scale.data_ptr(),
                                     stream_handle(dev))
    check_launch(code, what)


def quantize_rows(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """q, scale = the e4m3 rows of x and their scales (fp8_quantize.py), written in place."""
    cuda_tensor("x", x, (torch.bfloat16,), ndim=2)
    _launch("kda_serving_fp8_quantize_rows", "fp8 row quantization", "x", x, x.shape[1], q, scale)


def silu_mul_quantize(gate_up: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """q, scale = the e4m3 rows of silu(gate) * up and their scales (fp8_quantize.py), written in place."""
    cuda_tensor("gate_up", gate_up, (torch.bfloat16,), ndim=2)
    if gate_up.shape[1] % 2:
        raise ValueError(f"kda: argument 'gate_up': expected [M, 2I], got {tuple(gate_up.shape)}")
    _launch("kda_serving_fp8_silu_mul_quantize", "fp8 SiLU-mul quantization", "gate_up", gate_up,
            gate_up.shape[1] // 2, q, scale)
