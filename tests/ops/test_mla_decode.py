"""ops.mla_decode on the CPU: the float32 path against a float64 reference, its argument checks, and the split
plan the CUDA path uses. The kernel itself: tests/gpu/test_mla_decode_cuda.py."""

from __future__ import annotations

import pytest
import torch

from kda_serving.ops import indices_checked_by_caller, mla_decode
from kda_serving.ops.mla_decode import MAX_SPLITS, SPLIT_KEYS, plan_splits


def make_case(lens, H=4, L=40, block_size=4, num_blocks=None, seed=0, dtype=torch.float32, device="cpu"):
    """Random queries and cache; each sequence's blocks are a random choice of distinct cache blocks."""
    gen = torch.Generator().manual_seed(seed)
    N = len(lens)
    width = max([1, *(-(-n // block_size) for n in lens)])
    num_blocks = num_blocks or N * width + 3
    q = torch.randn(N, H, L, generator=gen)
    cache = torch.randn(num_blocks, block_size, L, generator=gen)
    tables = torch.full((N, width), -1, dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=gen)
    for n, length in enumerate(lens):
        used = -(-length // block_size)
        tables[n, :used] = perm[n * width : n * width + used].to(torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return (q.to(device, dtype), cache.to(device, dtype), tables.to(device), seq_lens.to(device))


def reference(q, cache, tables, seq_lens, scale, value_dim):
    """float64, one sequence and head at a time."""
    N, H, L = q.shape
    bs = cache.shape[1]
    out = torch.zeros(N, H, value_dim, dtype=torch.float64)
    for n in range(N):
        length = int(seq_lens[n])
        if length == 0:
            continue
        rows = [cache[int(tables[n, j // bs]), j % bs].double().cpu() for j in range(length)]
        k = torch.stack(rows)
        p = torch.softmax(scale * q[n].double().cpu() @ k.T, dim=-1)
        out[n] = p @ k[:, :value_dim]
    return out


@pytest.mark.parametrize("lens", [[1], [5, 0, 9], [16, 3, 1, 33], [0, 0]])
def test_cpu_matches_the_float64_reference(lens):
    q, cache, tables, seq_lens = make_case(lens)
    out = mla_decode(q, cache, tables, seq_lens, scale=0.3, max_seq_len=max(lens), value_dim=32)
    ref = reference(q, cache, tables, seq_lens, 0.3, 32)
    assert out.shape == (len(lens), 4, 32) and out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)
    for n, length in enumerate(lens):
        if length == 0:
            assert torch.all(out[n] == 0)  # a padding row: zeros, not NaN


def test_argument_checks_name_the_argument():
    q, cache, tables, seq_lens = make_case([5, 9])
    ok = dict(scale=0.3, max_seq_len=9, value_dim=32)

    def raises(exc, name, *args, **kw):
        with pytest.raises(exc, match=f"'{name}'"):
            mla_decode(*args, **{**ok, **kw})

    raises(ValueError, "q", q[0], cache, tables, seq_lens)
    raises(ValueError, "kv_cache", q, cache[..., :-1], tables, seq_lens)
    raises(ValueError, "kv_cache", q, cache.double(), tables, seq_lens)
    raises(ValueError, "block_tables", q, cache, tables.long(), seq_lens)
    raises(ValueError, "seq_lens", q, cache, tables, seq_lens[:1])
    raises(TypeError, "seq_lens", q, cache, tables, [5, 9])
    raises(ValueError, "max_seq_len", q, cache, tables, seq_lens, max_seq_len=4 * tables.shape[1] + 1)
    raises(ValueError, "seq_lens", q, cache, tables, seq_lens, max_seq_len=8)  # 9 keys > the bound
    raises(ValueError, "value_dim", q, cache, tables, seq_lens, value_dim=41)
    raises(TypeError, "scale", q, cache, tables, seq_lens, scale="x")
    bad = tables.clone()
    bad[1, 0] = cache.shape[0]
    raises(ValueError, "block_tables", q, cache, bad, seq_lens)
    bad[1, 0] = -1
    raises(ValueError, "block_tables", q, cache, bad, seq_lens)
    bad = tables.clone()
    bad[0, -1] = 10**6  # past sequence 0's 5 keys: never read, so fine
    mla_decode(q, cache, bad, seq_lens, **ok)
    with indices_checked_by_caller():  # value checks skipped: the caller vouches for the indices
        mla_decode(q, cache, tables, seq_lens, **{**ok, "max_seq_len": 9})


def test_split_plan_fills_one_wave_with_whole_tiles():
    """The plan names CTAs per query; the kernel gives each an equal share of whole tiles of its own keys
    (ceil(tiles / splits) each), so no split of the longest query may be left without keys."""
    for sms, ctas_per_sm in ((1, 1), (132, 1), (132, 2)):
        for n in (1, 3, 8, 64, 300):
            for length in (0, 1, 63, 64, 65, 1000, 16384, 100_000):
                splits = plan_splits(n, length, sms, ctas_per_sm)
                tiles = max(1, -(-length // SPLIT_KEYS))
                assert 1 <= splits <= min(tiles, MAX_SPLITS)
                per_split = -(-tiles // splits)
                assert (splits - 1) * per_split < tiles  # the last split of the longest query holds a tile
                assert n * splits <= max(n, ctas_per_sm * sms)  # one wave of resident CTAs at most
    assert plan_splits(8, 16384, 132, 2) == 32
    assert plan_splits(8, 16384, 132, 1) == 16
    assert plan_splits(300, 4096, 132, 2) == 1
    assert plan_splits(64, 4096, 132, 2) == 4  # 256 CTAs: not 5 splits, 320 CTAs in 1.2 waves
    assert plan_splits(64, 640, 132, 2) == 4  # 10 tiles: 3, 3, 3, 1
    assert plan_splits(64, 576, 132, 2) == 3  # 9 tiles: 3, 3, 3 (a fourth CTA would get none)
    assert plan_splits(1, 1 << 22, 4096) == MAX_SPLITS  # the merge kernel's bound, on any GPU


def test_table_rows_let_queries_share_a_block_table_row():
    """Three queries over one sequence's row with their own key counts (a verifying sequence's tokens) and one
    over another row: the same as each query with its own copy of the row."""
    q, cache, tables, _ = make_case([9, 6], seed=4)
    q = torch.cat([q, torch.randn(2, *q.shape[1:], generator=torch.Generator().manual_seed(5))])
    rows = torch.tensor([0, 0, 0, 1], dtype=torch.int32)
    lens = torch.tensor([7, 8, 9, 6], dtype=torch.int32)
    out = mla_decode(q, cache, tables, lens, scale=0.3, max_seq_len=9, value_dim=32, table_rows=rows)
    ref = reference(q, cache, tables[rows.long()], lens, 0.3, 32)
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)
    ok = dict(scale=0.3, max_seq_len=9, value_dim=32)
    with pytest.raises(ValueError, match="'table_rows'"):
        mla_decode(q, cache, tables, lens, table_rows=rows.long(), **ok)
    with pytest.raises(ValueError, match="'table_rows'"):
        mla_decode(q, cache, tables, lens, table_rows=rows[:3], **ok)
    with pytest.raises(ValueError, match="'table_rows'"):
        mla_decode(q, cache, tables, lens, table_rows=torch.tensor([0, 0, 2, 1], dtype=torch.int32), **ok)
    with pytest.raises(ValueError, match="'block_tables'"):
        mla_decode(q, cache, tables, lens, **ok)  # 4 queries, 2 rows, no table_rows
