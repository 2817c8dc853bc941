"""ops.gather_paged_rows: the cached rows of (sequence, first key, count) pieces, against a loop over keys
written here; the CUDA kernel against the same on the GPU (tests/gpu/test_paged_rows_cuda.py)."""

from __future__ import annotations

import pytest
import torch

from kda_serving.ops.paged_rows import gather_paged_rows


def make_cache(num_seqs: int, width: int, block_size: int, L: int, dtype, device, seed: int):
    """A cache of random rows and block tables whose blocks are a random permutation of the cache's."""
    gen = torch.Generator().manual_seed(seed)
    blocks = num_seqs * width + 3
    flat = torch.randn(blocks * block_size, L, generator=gen).to(device, dtype)
    tables = torch.randperm(blocks, generator=gen)[: num_seqs * width].view(num_seqs, width).to(torch.int32)
    return flat, tables.to(device)


def loop_reference(flat, tables, pieces, block_size):
    rows = [int(tables[n, j // block_size]) * block_size + j % block_size
            for n, first, count in pieces for j in range(first, first + count)]
    return flat[torch.tensor(rows, dtype=torch.long, device=flat.device)] if rows else flat[:0]


PIECES = [
    [(0, 0, 37)],
    [(2, 5, 0), (1, 3, 20), (1, 23, 16), (0, 0, 0), (3, 60, 4)],  # empty pieces, one sequence twice
    [(n, 7 * n, 9) for n in range(4)],
]


@pytest.mark.parametrize("pieces", PIECES)
@pytest.mark.parametrize("block_size", [1, 16])
def test_cpu_matches_a_loop_over_keys(pieces, block_size):
    flat, tables = make_cache(4, 64 // block_size + 1, block_size, 24, torch.float32, "cpu", seed=len(pieces))
    out = gather_paged_rows(flat, tables, pieces, block_size)
    assert torch.equal(out, loop_reference(flat, tables, pieces, block_size))


def test_no_pieces_gives_no_rows():
    flat, tables = make_cache(2, 4, 4, 8, torch.float32, "cpu", seed=0)
    assert gather_paged_rows(flat, tables, [], 4).shape == (0, 8)


@pytest.mark.parametrize("pieces,name", [
    ([(4, 0, 1)], "pieces"),  # no such sequence
    ([(0, -1, 2)], "pieces"),
    ([(0, 10, 7)], "pieces"),  # past the table (4 blocks of 4)
])
def test_pieces_outside_the_table_raise(pieces, name):
    flat, tables = make_cache(4, 4, 4, 8, torch.float32, "cpu", seed=0)
    with pytest.raises(ValueError, match=f"kda: argument '{name}'"):
        gather_paged_rows(flat, tables, pieces, 4)
