"""Argument checks and launch plumbing shared by the ctypes bindings (cuda_decode.py, cuda_norm.py,
cuda_sampling.py, ...), and the SM count that the MLA and sampling launch plans divide work by (sm_count).

A binding checks only what keeps its kernel inside its memory (dtype, device, contiguity, alignment), with
errors that name the argument like the public ops' own, enqueues the kernel on torch's current stream and turns
a failed launch into a RuntimeError.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import cuda_lib


def cuda_tensor(name: str, t, dtypes, device=None, ndim=None) -> torch.Tensor:
    """t itself, if it is a contiguous CUDA tensor of one of `dtypes` (on `device`, with `ndim` dimensions)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"kda: argument '{name}': expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"kda: argument '{name}': dtype {t.dtype} not supported by the CUDA kernel "
                        f"(expected one of {', '.join(str(d) for d in dtypes)})")
    if t.device.type != "cuda" or (device is not None and t.device != device):
        raise ValueError(f"kda: argument '{name}': must be on {device or 'a CUDA device'}, is on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"kda: argument '{name}': must be contiguous")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"kda: argument '{name}': expected {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


@functools.lru_cache(maxsize=8)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device (one without an index: the current one), for the launch plans of the bindings."""
    return _sm_count_of(torch.cuda.current_device() if device.index is None else device.index)


def check_aligned(name: str, t: torch.Tensor) -> None:
    if t.data_ptr() % 16:
        raise ValueError(f"kda: argument '{name}': the CUDA kernel needs 16-byte aligned data")


def stream_handle(device: torch.device) -> ctypes.c_void_p:
    """torch's current stream on `device` (the capture stream inside a CUDA-graph capture)."""
    return ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)


@functools.lru_cache(maxsize=1)
def _error_string():
    fn = cuda_lib.load().kda_serving_decode_error_string  # the library's one cudaError_t -> text entry point
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_char_p
    return fn


def check_launch(code: int, what: str) -> None:
    """RuntimeError naming the kernel and the CUDA error if an entry point returned a non-zero cudaError_t."""
    if code != 0:
        msg = _error_string()(code).decode()
        raise RuntimeError(f"kda: {what} kernel launch failed: {msg} (cudaError {code})")
