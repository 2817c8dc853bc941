"""The row-gather kernel of csrc/mla (ops.gather_paged_rows on CUDA) against a loop over keys and the torch-ops
path, on shuffled block tables; its output is poisoned with NaN first (every row must come back written)."""

from __future__ import annotations

from itertools import accumulate

import pytest
import torch

from kda_serving.ops import cuda_mla, paged_rows
from ops.test_paged_rows import PIECES, loop_reference, make_cache  # tests/ops/test_paged_rows.py

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("pieces", PIECES + [[(n % 7, 16 * (n % 5), 300) for n in range(40)]])
@pytest.mark.parametrize("block_size,L", [(16, 576), (1, 576), (64, 160)])
def test_kernel_matches_a_loop_and_the_torch_ops(pieces, block_size, L):
    flat, tables = make_cache(7, 400 // block_size + 2, block_size, L, torch.bfloat16, "cuda", seed=L)
    starts = list(accumulate((count for *_, count in pieces), initial=0))
    meta = torch.tensor([[s, f, st] for (s, f, _), st in zip(pieces, starts)], dtype=torch.int32, device="cuda")
    out = torch.full((starts[-1], L), float("nan"), dtype=torch.bfloat16, device="cuda")
    cuda_mla.gather_rows(flat, tables, meta, block_size, out)
    assert torch.equal(out, loop_reference(flat, tables, pieces, block_size))
    assert torch.equal(out, paged_rows._gather_torch(flat, tables, meta, starts[-1], block_size))
    assert torch.equal(out, paged_rows.gather_paged_rows(flat, tables, pieces, block_size))  # the op's own route
