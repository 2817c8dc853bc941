"""ctypes binding of the paged MLA decode attention kernel (csrc/mla) in the C-ABI library.

    mla_decode(q, kv_cache, block_tables, seq_lens, scale, num_splits, part_o, part_ml, out, table_rows=None)

The public op (mla_decode.py) validates the call, picks the split and allocates out and the split workspace;
this function checks only what keeps the kernel inside its memory (dtypes, device, contiguity, shapes, the
kernel's fixed sizes), then enqueues it on torch's current stream. It neither allocates nor synchronises, so
it can be captured in a CUDA graph. Keys past a block table's width or with block ids outside the cache read
zeros, and so does a table row outside the block tables: the kernel bounds every row it reads.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import cuda_lib
from .cuda_args import check_launch, cuda_tensor, stream_handle

LATENT_DIM = 576  # csrc/mla/mla_decode_params.h kLatentDim: kv_lora_rank 512 + qk_rope_head_dim 64
VALUE_DIM = 512
HEADS = (16, 32)
MAX_SPLITS = 1024  # csrc kMaxSplits: the merge kernel holds one weight per split in shared memory

_BF16 = (torch.bfloat16,)
_I32 = (torch.int32,)
_F32 = (torch.float32,)


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The library loaded by cuda_lib.load(), with the MLA entry point typed."""
    lib = cuda_lib.load()
    fn = lib.kda_serving_mla_decode
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int,
                   ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    plan = lib.kda_serving_mla_decode_plan
    plan.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
    plan.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=4)
def plan_constants(num_heads: int) -> tuple[int, int]:
    """(CTAs resident per SM, key tile) of the built kernel for num_heads: the split plan fills one wave of
    CTAs, and a split holds whole tiles."""
    ctas, tile = ctypes.c_int(), ctypes.c_int()
    check_launch(library().kda_serving_mla_decode_plan(num_heads, ctypes.byref(ctas), ctypes.byref(tile)),
                 "MLA decode plan")
    return ctas.value, tile.value


def _check_block_tables(block_tables, dev, where: str) -> None:
    """Block tables the kernels read: int32 [N, max_blocks] on `dev` (named `where` in the error), each row
    contiguous (a column slice of a wider table is fine)."""
    if not isinstance(block_tables, torch.Tensor) or block_tables.dtype not in _I32 or block_tables.device != dev \
            or block_tables.dim() != 2 or (block_tables.shape[1] > 1 and block_tables.stride(1) != 1):
        raise ValueError(f"kda: argument 'block_tables': the CUDA kernel needs int32 [N, max_blocks] on {where} "
                         "with contiguous rows")


def supports(num_heads: int, latent_dim: int, value_dim: int) -> bool:
    """Whether the kernel is built for these MLA sizes (else the caller keeps its PyTorch path)."""
    return num_heads in HEADS and latent_dim == LATENT_DIM and value_dim == VALUE_DIM


@functools.lru_cache(maxsize=16)
def runs_on(index: int) -> bool:
    """Whether the kernel runs on CUDA device `index` (an SM90 GPU, the library built with it)."""
    return cuda_lib.runs_on(index, "kda_serving_mla_decode")


def mla_decode(q, kv_cache, block_tables, seq_lens, scale: float, num_splits: int, part_o, part_ml, out,
               table_rows=None) -> None:
    """out [N, H, 512] = softmax(scale q k^T) v per sequence over its paged latent rows; see mla_decode.py."""
    dev = q.device
    cuda_tensor("q", q, _BF16, ndim=3)
    N, H, L = q.shape
    if not supports(H, L, VALUE_DIM):
        raise ValueError(f"kda: argument 'q': the CUDA kernel needs H in {HEADS} and a latent of {LATENT_DIM}, "
                         f"got shape {tuple(q.shape)}")
    cuda_tensor("kv_cache", kv_cache, _BF16, dev, ndim=3)
    if kv_cache.shape[2] != L:
        raise ValueError(f"kda: argument 'kv_cache': expected rows of {L}, got shape {tuple(kv_cache.shape)}")
    _check_block_tables(block_tables, dev, "q's device")
    cuda_tensor("seq_lens", seq_lens, _I32, dev, ndim=1)
    if table_rows is not None:
        cuda_tensor("table_rows", table_rows, _I32, dev, ndim=1)
        if table_rows.shape[0] != N:
            raise ValueError(f"kda: argument 'table_rows': expected {N} entries, got {tuple(table_rows.shape)}")
    if (table_rows is None and block_tables.shape[0] != N) or seq_lens.shape[0] != N:
        raise ValueError(f"kda: argument 'block_tables': expected {N} rows (and seq_lens {N} entries), got "
                         f"{tuple(block_tables.shape)} and {tuple(seq_lens.shape)}")
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"kda: argument 'num_splits': must lie in [1, {MAX_SPLITS}], got {num_splits}")
    cuda_tensor("out", out, _BF16, dev)
    if tuple(out.shape) != (N, H, VALUE_DIM):
        raise ValueError(f"kda: argument 'out': expected shape {(N, H, VALUE_DIM)}, got {tuple(out.shape)}")
    if num_splits > 1:
        cuda_tensor("part_o", part_o, _F32, dev)
        cuda_tensor("part_ml", part_ml, _F32, dev)
        if part_o.numel() < N * num_splits * H * VALUE_DIM or part_ml.numel() < N * num_splits * H * 2:
            raise ValueError(f"kda: argument 'part_o': the split workspace is smaller than {num_splits} splits")
    blocks, block_size = kv_cache.shape[0], kv_cache.shape[1]
    table_stride = block_tables.stride(0) if block_tables.shape[0] else 0
    workspace = (part_o.data_ptr(), part_ml.data_ptr()) if num_splits > 1 else (None, None)
    code = library().kda_serving_mla_decode(
        q.data_ptr(), kv_cache.data_ptr(), blocks * block_size, block_tables.data_ptr(), table_stride,
        block_tables.shape[1], block_tables.shape[0], None if table_rows is None else table_rows.data_ptr(),
        seq_lens.data_ptr(), block_size, N, H, num_splits, float(scale), *workspace, out.data_ptr(),
        stream_handle(dev),
    )
    check_launch(code, "MLA decode")


@functools.lru_cache(maxsize=1)
def _gather_fn():
    fn = cuda_lib.load().kda_serving_mla_gather_rows
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                   ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


def gather_rows(flat_cache, block_tables, pieces, block_size: int, out) -> None:
    """out [K, L] = the cache rows of the pieces' keys; see paged_rows.py. Checks what keeps the kernel inside
    its memory; block ids outside the cache (and keys past a table's width) read zeros."""
    dev = flat_cache.device
    cuda_tensor("flat_cache", flat_cache, (torch.bfloat16, torch.float16, torch.float32), dev, ndim=2)
    cuda_tensor("pieces", pieces, _I32, dev, ndim=2)
    cuda_tensor("out", out, (flat_cache.dtype,), dev, ndim=2)
    row_bytes = flat_cache.shape[1] * flat_cache.element_size()
    if out.shape[1] != flat_cache.shape[1] or row_bytes % 16 or flat_cache.data_ptr() % 16 or out.data_ptr() % 16 \
            or pieces.shape[1] != 3 or pieces.shape[0] < 1:
        raise ValueError("kda: argument 'flat_cache': the gather kernel needs rows of a multiple of 16 bytes, "
                         "16-byte aligned, out of the same width and pieces [P >= 1, 3]")
    _check_block_tables(block_tables, dev, "the cache's device")
    code = _gather_fn()(flat_cache.data_ptr(), flat_cache.shape[0], row_bytes, block_tables.data_ptr(),
                        block_tables.stride(0) if block_tables.shape[0] else 0, block_tables.shape[1],
                        block_size, pieces.data_ptr(), pieces.shape[0], out.shape[0], out.data_ptr(),
                        stream_handle(dev))
    check_launch(code, "MLA row gather")
