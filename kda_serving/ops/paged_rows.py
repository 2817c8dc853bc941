"""Cached latent rows of a paged cache, gathered for the MLA layers' expanded prompt attention
(kda_serving/model/mla_prefill.py: each step expands a sequence's cached context, in pieces).

    rows = gather_paged_rows(flat_cache, block_tables, pieces, block_size)

pieces: (sequence, first key, number of keys) triples; the result holds their keys' rows in order, key j of
sequence n being row j % block_size of cache block block_tables[n, j // block_size]. CUDA tensors run one
kernel of csrc/mla (a warp per row; built for SM90, other GPUs take the torch path); CPU tensors an index
built with torch ops and one gather, the reference the kernel is tested against.
"""

from __future__ import annotations

from itertools import accumulate

import torch

from . import cuda_lib, cuda_mla
from .contract import _fail

Tensor = torch.Tensor


def _gather_torch(flat_cache: Tensor, block_tables: Tensor, pieces: Tensor, num_keys: int, block_size: int):
    P = pieces.shape[0]
    meta = pieces.long()
    counts = torch.diff(meta[:, 2], append=meta.new_tensor([num_keys]))
    piece_of_key = torch.repeat_interleave(torch.arange(P, device=pieces.device), counts, output_size=num_keys)
    seq, first, start = meta[piece_of_key].unbind(-1)
    pos = first + torch.arange(num_keys, device=pieces.device) - start
    return flat_cache[block_tables[seq, pos // block_size].long() * block_size + pos % block_size]


@torch.library.custom_op("kda_serving::gather_paged_rows", mutates_args=())
def _gather_op(flat_cache: Tensor, block_tables: Tensor, pieces: Tensor, num_keys: int, block_size: int) -> Tensor:
    """CPU implementation (torch ops); the CUDA one is registered below."""
    return _gather_torch(flat_cache, block_tables, pieces, num_keys, block_size)


@_gather_op.register_kernel("cuda")
def _gather_cuda(flat_cache, block_tables, pieces, num_keys, block_size):
    if not cuda_lib.runs_on(flat_cache.device.index or 0, "kda_serving_mla_gather_rows"):  # SM90 only
        return _gather_torch(flat_cache, block_tables, pieces, num_keys, block_size)
    out = flat_cache.new_empty(num_keys, flat_cache.shape[1])
    cuda_mla.gather_rows(flat_cache, block_tables, pieces, block_size, out)
    return out


@_gather_op.register_fake
def _(flat_cache, block_tables, pieces, num_keys, block_size):
    return flat_cache.new_empty(num_keys, flat_cache.shape[1])


def gather_paged_rows(flat_cache: Tensor, block_tables: Tensor, pieces: list[tuple[int, int, int]],
                      block_size: int) -> Tensor:
    """The rows [K, L] of the pieces' keys (module docstring).

    Args:
        flat_cache: [cache rows, L], the paged cache's blocks of block_size rows, contiguous.
        block_tables: [N, max_blocks] int32.
        pieces: host (sequence, first key, number of keys) triples, each within its sequence's table.
        block_size: rows per cache block.
    """
    if not isinstance(flat_cache, torch.Tensor) or flat_cache.dim() != 2:
        _fail(ValueError, "flat_cache", "expected a [rows, L] tensor")
    if not isinstance(block_tables, torch.Tensor) or block_tables.dtype != torch.int32 or block_tables.dim() != 2:
        _fail(ValueError, "block_tables", "expected an int32 [N, max_blocks] tensor")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        _fail(ValueError, "block_size", f"expected an int >= 1, got {block_size!r}")
    N, width = block_tables.shape
    for seq, first, count in pieces:
        if not (0 <= seq < N and first >= 0 and count >= 0 and first + count <= width * block_size):
            _fail(ValueError, "pieces", f"piece {(seq, first, count)} lies outside the {N} x {width} block table")
    if not pieces:
        return flat_cache.new_empty(0, flat_cache.shape[1])
    starts = list(accumulate((count for _, _, count in pieces), initial=0))
    host = [x for (seq, first, _), start in zip(pieces, starts) for x in (seq, first, start)]
    table = torch.tensor(host, dtype=torch.int32).view(-1, 3).to(flat_cache.device, non_blocking=True)
    return _gather_op(flat_cache, block_tables, table, starts[-1], block_size)
