"""Handing a framework's state pool to our ops.

Our ops take a pool `[S, ...]` whose slots are each contiguous, with any slot stride (docs/kda-contract.md).
vLLM and SGLang keep each layer's recurrent and conv states inside per-block pages, so a layer's pool is a
strided view whose slot stride (dim 0) is the page size: that goes to the op as it is, in place, no copy.
Only a layout whose slots are not contiguous (vLLM's dim-first conv layout seen through a transpose) falls
back to copying the slots the call touches into a contiguous working pool and back, logged once. The copies
are gathers and scatters on the device with no host synchronisation, so they also run inside CUDA graph
capture.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from kda_serving.ops import PAD_SLOT

from .switches import log_once

R = TypeVar("R")


def takes_in_place(pool: torch.Tensor) -> bool:
    """Whether our ops can use `pool` directly: every slot contiguous, slots apart by at least a slot, and on
    CUDA a slot stride and base that keep the kernels' 16-byte accesses aligned."""
    if pool.shape[0] == 0 or not pool[0].is_contiguous():
        return pool.is_contiguous()
    stride = pool.stride(0) if pool.shape[0] > 1 else pool[0].numel()
    if stride < pool[0].numel():
        return False
    if pool.is_cuda:
        return (stride * pool.element_size()) % 16 == 0 and pool.data_ptr() % 16 == 0
    return True


def run_on_pool(
    pool: torch.Tensor,
    indices: torch.Tensor,
    call: Callable[[torch.Tensor, torch.Tensor], R],
    log: logging.Logger | None = None,
) -> R:
    """Calls `call(pool, indices)` on a contiguous pool and returns its result.

    pool: [S, ...] state pool, updated in place by `call`; indices: [N] slot of each sequence (PAD_SLOT = -1
    marks padding). A non-contiguous pool is replaced by a working pool holding entry n's slot in row n, with
    `indices` renumbered to the rows (padding stays PAD_SLOT), and the rows are written back after the call.
    """
    if takes_in_place(pool):
        return call(pool, indices)
    if indices.numel() == 0:
        return call(pool.new_empty((0, *pool.shape[1:])), indices)
    log_once(
        f"pool-copy-{tuple(pool.shape[1:])}",
        "kda-serving: state pool %s with strides %s is not contiguous; copying the touched slots around each call",
        tuple(pool.shape),
        tuple(pool.stride()),
        to=log,
    )
    # Device-side only (no host sync), so this also runs inside a CUDA graph capture.
    idx = indices.long()
    real = idx != PAD_SLOT
    rows = torch.arange(idx.numel(), device=idx.device)
    work = pool.index_select(0, idx.clamp(min=0))  # [N, ...] contiguous; padded rows hold a harmless copy
    local = torch.where(real, rows, torch.full_like(rows, PAD_SLOT)).to(indices.dtype)
    result = call(work, local)
    # Write back one row per entry. A padded entry repeats the first real entry (same slot, same values), so
    # the duplicate writes agree; with no real entry at all it writes slot 0's unchanged copy back to slot 0.
    first_real = real.to(torch.int8).argmax()
    source = torch.where(real, rows, first_real)
    pool.index_copy_(0, idx.clamp(min=0).index_select(0, source), work.index_select(0, source))
    return result
