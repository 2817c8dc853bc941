"""Paged MLA decode attention: one new token per sequence attends, in the absorbed form, over the latent rows
of its paged KV cache (kda_serving/model/mla_block.py explains the absorbed form).

    out = mla_decode(q, kv_cache, block_tables, seq_lens, scale=..., max_seq_len=..., value_dim=512,
                     table_rows=None)

Per query n and head h, with L = len(latent row), r = table_rows[n] (n without table_rows) and k_j the cached
latent row of key j < seq_lens[n] (key j lies in row j % block_size of block block_tables[r, j // block_size]):

    out[n, h] = sum_j softmax_j(scale * q[n, h] . k_j) * k_j[:value_dim]

A query with seq_lens[n] == 0 (a padding row) gets zeros. table_rows lets several queries share a block-table
row without copying it: the W tokens of a verifying sequence, each with its own key count.

CUDA tensors run the tensor-core kernel of csrc/mla (split over keys, bf16, H in {16, 32}, L = 576,
value_dim = 512: Kimi-Linear-48B and DeepSeek-V3 at TP 1 and 2); CPU tensors a float32 gather, the reference
the kernel is tested against besides float64. The kernel reads each key row once, in place in the cache; the
PyTorch path it replaces in decode steps gathered every sequence's rows into a padded copy first
(docs/engine.md).

max_seq_len is a host-side bound on seq_lens: it fixes the number of CTAs per query (splits) without reading
seq_lens back from the GPU. The kernel divides each query's own keys among them on the device, so a call
captured in a CUDA graph with max_seq_len at the model's length serves every shorter length too (the engine's
decode graphs: engine/cuda_graphs.py).
"""

from __future__ import annotations

import torch

from .contract import _fail, skip_index_value_checks, validate_scale

Tensor = torch.Tensor

SPLIT_KEYS = 64  # a split holds whole 64-key tiles (the kernel's tile)
MAX_SPLITS = 1024  # the kernel's bound (cuda_mla.MAX_SPLITS)


def plan_splits(num_queries: int, max_seq_len: int, sms: int, ctas_per_sm: int = 1) -> int:
    """CTAs per query: as many as fit on the GPU at once (ctas_per_sm resident per SM; rounded down, so that a
    few CTAs never spill into a second wave), at most one per key tile of max_seq_len, and no more than the
    longest query fills with equal shares of whole tiles (the kernel's division); one when the queries alone
    fill the GPU."""
    tiles = max(1, -(-max_seq_len // SPLIT_KEYS))
    splits = max(1, min(tiles, ctas_per_sm * sms // max(num_queries, 1), MAX_SPLITS))
    return -(-tiles // -(-tiles // splits))


@torch.library.custom_op("kda_serving::mla_decode_", mutates_args=("part_o", "part_ml", "out"))
def _mla_decode_op(q: Tensor, kv_cache: Tensor, block_tables: Tensor, table_rows: Tensor | None, seq_lens: Tensor,
                   scale: float, num_splits: int, part_o: Tensor, part_ml: Tensor, out: Tensor) -> None:
    """CPU implementation (float32, a gather per query); the CUDA one is registered below."""
    N, H, L = q.shape
    block_size, value_dim = kv_cache.shape[1], out.shape[2]
    flat = kv_cache.reshape(-1, L)
    lens = seq_lens.tolist()
    table_of = table_rows.tolist() if table_rows is not None else range(N)
    for n in range(N):
        if lens[n] == 0:
            out[n] = 0
            continue
        keys = torch.arange(lens[n])
        rows = block_tables[table_of[n], keys // block_size].long() * block_size + keys % block_size
        k = flat[rows].float()  # [len, L]
        p = torch.softmax(scale * (q[n].float() @ k.T), dim=-1)  # [H, len]
        out[n] = (p @ k[:, :value_dim]).to(out.dtype)


@_mla_decode_op.register_kernel("cuda")
def _mla_decode_cuda(q, kv_cache, block_tables, table_rows, seq_lens, scale, num_splits, part_o, part_ml, out):
    from . import cuda_mla

    cuda_mla.mla_decode(q, kv_cache, block_tables, seq_lens, scale, num_splits, part_o, part_ml, out,
                        table_rows=table_rows)


@_mla_decode_op.register_fake
def _(*args, **kwargs) -> None:
    return None


def _validate(q, kv_cache, block_tables, seq_lens, scale, max_seq_len, value_dim, table_rows) -> None:
    tensors = [("q", q), ("kv_cache", kv_cache), ("block_tables", block_tables), ("seq_lens", seq_lens)]
    for name, t in tensors + ([("table_rows", table_rows)] if table_rows is not None else []):
        if not isinstance(t, torch.Tensor):
            _fail(TypeError, name, f"expected a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            _fail(ValueError, name, f"is on {t.device}, but q is on {q.device}")
        rows_contiguous = name == "block_tables" and t.dim() == 2 and (t.shape[1] <= 1 or t.stride(1) == 1)
        if not (t.is_contiguous() or rows_contiguous):  # a block table may be a column slice of a wider one
            _fail(ValueError, name, "must be contiguous")
    if q.dim() != 3 or not q.is_floating_point():
        _fail(ValueError, "q", f"expected a float tensor [N, H, L], got {q.dtype} of shape {tuple(q.shape)}")
    N, H, L = q.shape
    if kv_cache.dim() != 3 or kv_cache.shape[2] != L or kv_cache.dtype != q.dtype:
        _fail(ValueError, "kv_cache", f"expected [blocks, block_size, {L}] in {q.dtype}, got "
                                      f"{kv_cache.dtype} of shape {tuple(kv_cache.shape)}")
    rows = "rows" if table_rows is not None else N
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or (
            table_rows is None and block_tables.shape[0] != N):
        _fail(ValueError, "block_tables", f"expected int32 [{rows}, max_blocks], got {block_tables.dtype} of shape "
                                          f"{tuple(block_tables.shape)}")
    if table_rows is not None and (table_rows.dtype != torch.int32 or tuple(table_rows.shape) != (N,)):
        _fail(ValueError, "table_rows", f"expected int32 [{N}], got {table_rows.dtype} of shape "
                                        f"{tuple(table_rows.shape)}")
    if seq_lens.dtype != torch.int32 or tuple(seq_lens.shape) != (N,):
        _fail(ValueError, "seq_lens", f"expected int32 [{N}], got {seq_lens.dtype} of shape {tuple(seq_lens.shape)}")
    if scale is None:  # required here (contract.validate_scale would take None for K ** -0.5)
        _fail(TypeError, "scale", "expected a float, got None")
    validate_scale(scale, L)
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 0:
        _fail(ValueError, "max_seq_len", f"expected an int >= 0, got {max_seq_len!r}")
    if max_seq_len > block_tables.shape[1] * kv_cache.shape[1]:
        _fail(ValueError, "max_seq_len", f"{max_seq_len} keys exceed the {block_tables.shape[1]} blocks of "
                                         f"{kv_cache.shape[1]} a block table row holds")
    if isinstance(value_dim, bool) or not isinstance(value_dim, int) or not 0 < value_dim <= L:
        _fail(ValueError, "value_dim", f"expected an int in (0, {L}], got {value_dim!r}")
    if skip_index_value_checks() or N == 0:  # the caller checked the values (or a CUDA graph is being captured)
        return
    lens, tables = seq_lens.cpu(), block_tables.cpu()
    if int(lens.min()) < 0 or int(lens.max()) > max_seq_len:
        _fail(ValueError, "seq_lens", f"entries must lie in [0, max_seq_len={max_seq_len}]")
    if table_rows is not None:
        index = table_rows.cpu()
        if int(index.min()) < 0 or int(index.max()) >= tables.shape[0]:
            _fail(ValueError, "table_rows", f"entries must lie in [0, {tables.shape[0]}), the block tables' rows")
        tables = tables[index.long()]
    used = torch.arange(tables.shape[1]) * kv_cache.shape[1] < lens[:, None]  # blocks holding keys
    blocks = tables[used]
    if blocks.numel() and (int(blocks.min()) < 0 or int(blocks.max()) >= kv_cache.shape[0]):
        _fail(ValueError, "block_tables", f"a block holding keys lies outside the cache's {kv_cache.shape[0]} blocks")


def mla_decode(q: Tensor, kv_cache: Tensor, block_tables: Tensor, seq_lens: Tensor, *, scale: float,
               max_seq_len: int, value_dim: int, table_rows: Tensor | None = None) -> Tensor:
    """Decode attention over a paged latent cache (module docstring).

    Args:
        q: [N, H, L] absorbed queries (bf16 on CUDA).
        kv_cache: [num_blocks, block_size, L] latent rows, q's dtype.
        block_tables: [N, max_blocks] int32 (any number of rows with table_rows) cache block of each block_size
            keys of a sequence (rows contiguous, any row stride).
        seq_lens: [N] int32 keys of each query (its newest token's row included); 0 for padding rows.
        scale: softmax scale.
        max_seq_len: host-side upper bound of seq_lens.
        value_dim: the values are the first value_dim columns of each latent row.
        table_rows: None, or [N] int32: the block-table row of each query.
    Returns:
        out [N, H, value_dim] in q's dtype.
    """
    _validate(q, kv_cache, block_tables, seq_lens, scale, max_seq_len, value_dim, table_rows)
    N, H, _ = q.shape
    out = q.new_empty((N, H, value_dim))
    splits = 1
    part_o = part_ml = q.new_empty(0, dtype=torch.float32)
    if q.is_cuda:
        from . import cuda_mla
        from .cuda_args import sm_count

        built = cuda_mla.supports(H, q.shape[2], value_dim)  # else the binding refuses the call
        ctas_per_sm, tile = cuda_mla.plan_constants(H) if built else (1, SPLIT_KEYS)
        assert tile == SPLIT_KEYS, "the plan counts the kernel's tiles"
        splits = plan_splits(N, max_seq_len, sm_count(q.device), ctas_per_sm)
        if splits > 1:
            part_o = torch.empty((N, splits, H, value_dim), dtype=torch.float32, device=q.device)
            part_ml = torch.empty((N, splits, H, 2), dtype=torch.float32, device=q.device)
    torch.ops.kda_serving.mla_decode_(q, kv_cache, block_tables, table_rows, seq_lens, float(scale), splits,
                                      part_o, part_ml, out)
    return out
