"""The paged MLA decode kernel (csrc/mla) against the float64 reference, on fresh random inputs.

Sizes of Kimi-Linear-48B's MLA (latent rows of 576, values the first 512, 32 heads; 16 at TP 2). Every call's
output is poisoned with NaN first and must come back finite everywhere. Cases: lengths around the key tiles
and split boundaries, padding rows (length 0), block sizes 8 to 64 with shuffled blocks (TMA loads where the
block size is a multiple of 16, cp.async otherwise), NaN in every cache row no sequence holds, scores large enough
to saturate a naive softmax, every split count from one to more splits than keys (empty splits), a block
table that is a column slice of a wider one, and CUDA-graph replay with new lengths and tables.
"""

from __future__ import annotations

import pytest
import torch

from kda_serving.ops import mla_decode
from ops.test_mla_decode import make_case, reference  # tests/ops/test_mla_decode.py

pytestmark = pytest.mark.gpu

L, V = 576, 512
SCALE = 192**-0.5  # qk_head_dim ** -0.5 of Kimi-Linear-48B


def check(out, ref, what, rel_tol=6e-3):
    assert torch.isfinite(out).all(), f"{what}: non-finite output (unwritten or NaN)"
    ref = ref.to(out.device)
    err = (out.double() - ref).norm() / ref.norm().clamp_min(1e-30)
    max_err = (out.double() - ref).abs().max().item()
    print(f"{what}: |out-ref|/|ref| = {err:.2e}, max |out-ref| = {max_err:.2e}")
    assert err < rel_tol, f"{what}: relative error {err:.2e}"
    return err


def run_op(q, cache, tables, seq_lens, max_seq_len, splits=None, table_rows=None):
    """The custom op with a NaN-poisoned output (and workspace); splits forced when given."""
    from kda_serving.ops.cuda_args import sm_count
    from kda_serving.ops.mla_decode import plan_splits

    N, H, _ = q.shape
    if splits is None:
        from kda_serving.ops import cuda_mla

        splits = plan_splits(N, max_seq_len, sm_count(q.device), cuda_mla.plan_constants(H)[0])
    out = torch.full((N, H, V), float("nan"), dtype=torch.bfloat16, device=q.device)
    part_o = torch.full((N, splits, H, V), float("nan"), device=q.device)
    part_ml = torch.full((N, splits, H, 2), float("nan"), device=q.device)
    torch.ops.kda_serving.mla_decode_(q, cache, tables, table_rows, seq_lens, SCALE, splits, part_o, part_ml, out)
    return out


@pytest.mark.parametrize("H", [32, 16])
@pytest.mark.parametrize("lens,block_size", [
    ([1], 16),
    ([63, 64, 65, 1], 16),
    ([300, 0, 1000, 129, 7], 64),
    ([4097, 2500], 16),
    ([0, 0, 0], 16),
    ([300, 0, 1000, 129, 7], 8),  # not a multiple of 16: cp.async loads instead of TMA boxes
    ([700, 33], 48),  # three 16-row boxes a block
])
def test_kernel_matches_the_float64_reference(H, lens, block_size):
    q, cache, tables, seq_lens = make_case(lens, H=H, L=L, block_size=block_size, seed=sum(lens) + H,
                                           dtype=torch.bfloat16, device="cuda")
    out = run_op(q, cache, tables, seq_lens, max(lens))
    ref = reference(q, cache, tables, seq_lens, SCALE, V)
    if max(lens) == 0:
        assert torch.all(out == 0)
        return
    check(out, ref, f"H={H} lens={lens} block_size={block_size}")
    for n, length in enumerate(lens):
        if length == 0:
            assert torch.all(out[n] == 0), "a padding row must be zeros"


def test_extreme_scores_stay_exact():
    """Scores of +-hundreds (scale * q.k): the online softmax must rescale, never overflow."""
    lens = [700, 1500]
    q, cache, tables, seq_lens = make_case(lens, H=32, L=L, block_size=16, seed=3, device="cuda")
    q = (q * 40).to(torch.bfloat16)
    cache = cache.to(torch.bfloat16)
    # one late key that dominates: the running max jumps after many tiles
    cache[int(tables[1, 1400 // 16]), 1400 % 16] *= 4
    out = run_op(q, cache, tables, seq_lens, max(lens))
    check(out, reference(q, cache, tables, seq_lens, SCALE, V), "extreme scores")


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 12, 40, 1024])  # merge groups 1, 2, 4; the most splits
def test_every_split_count_gives_the_same_result(splits):
    """Each query's keys in `splits` shares of whole tiles: 900 keys = 15 tiles (40 splits leave 25 CTAs
    without keys), 64 keys = 1 tile, 5 keys = part of one."""
    lens = [900, 5, 64]
    q, cache, tables, seq_lens = make_case(lens, H=32, L=L, block_size=16, seed=11, dtype=torch.bfloat16,
                                           device="cuda")
    out = run_op(q, cache, tables, seq_lens, 900, splits=splits)
    check(out, reference(q, cache, tables, seq_lens, SCALE, V), f"{splits} splits")


@pytest.mark.parametrize("splits", [1, 5])
def test_table_rows_share_a_row_and_bad_rows_read_zeros(splits):
    """Queries naming block-table rows (a verifying sequence's tokens: one row, their own key counts) against
    each query with its own copy of the row; a row index outside the table (value checks skipped) must read
    no cache row: an all-zero output for that query, never a fault."""
    from kda_serving.ops import indices_checked_by_caller

    q, cache, tables, _ = make_case([1000, 300], H=32, L=L, block_size=16, seed=21, dtype=torch.bfloat16,
                                    device="cuda")
    q = torch.cat([q, q.flip(0), q[:1]])
    rows = torch.tensor([0, 0, 1, 0, 1], dtype=torch.int32, device="cuda")
    lens = torch.tensor([998, 1000, 300, 999, 1], dtype=torch.int32, device="cuda")
    out = run_op(q, cache, tables, lens, 1000, splits=splits, table_rows=rows)
    check(out, reference(q, cache, tables[rows.long()], lens, SCALE, V), f"table rows, {splits} splits")
    bad = torch.tensor([0, 2, -1, 1, 7], dtype=torch.int32, device="cuda")
    lens = torch.tensor([998, 1000, 300, 300, 1], dtype=torch.int32, device="cuda")
    with indices_checked_by_caller():
        out = mla_decode(q, cache, tables, lens, scale=SCALE, max_seq_len=1000, value_dim=V, table_rows=bad)
    torch.cuda.synchronize()
    assert torch.all(out[[1, 2, 4]] == 0) and torch.isfinite(out).all()
    check(out[[0, 3]], reference(q[[0, 3]], cache, tables[[0, 1]], lens[[0, 3]], SCALE, V), "valid rows")


def test_block_table_slice_and_graph_replay():
    """A column slice of a wider block table (what the engine's graphs pass), captured once, replayed with other
    lengths and tables."""
    N, width, bs = 4, 80, 16
    q, cache, tables, seq_lens = make_case([1200, 1, 640, 0], H=32, L=L, block_size=bs, seed=5,
                                           dtype=torch.bfloat16, device="cuda", num_blocks=400)
    wide = torch.full((N, width + 7), -1, dtype=torch.int32, device="cuda")
    table_view = wide[:, :width]
    lens_buf = torch.zeros(N, dtype=torch.int32, device="cuda")
    q_buf = torch.empty_like(q)

    def load(q_new, tables_new, lens_new):
        q_buf.copy_(q_new)
        table_view.fill_(-1)
        table_view[:, : tables_new.shape[1]].copy_(tables_new)
        lens_buf.copy_(lens_new)

    load(q, tables, seq_lens)
    mla_decode(q_buf, cache, table_view, lens_buf, scale=SCALE, max_seq_len=width * bs, value_dim=V)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_decode(q_buf, cache, table_view, lens_buf, scale=SCALE, max_seq_len=width * bs, value_dim=V)
    for seed, lens in ((5, [1200, 1, 640, 0]), (6, [17, 1280, 0, 999])):
        q2, _, tables2, lens2 = make_case(lens, H=32, L=L, block_size=bs, seed=seed, dtype=torch.bfloat16,
                                          device="cuda", num_blocks=400)
        load(q2, tables2, lens2)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(out, reference(q2, cache, tables2, lens2, SCALE, V), f"graph replay {lens}")
        assert torch.all(out[[i for i, n in enumerate(lens) if n == 0]] == 0)


def test_bad_block_ids_read_zeros_not_outside_the_cache():
    """With the value checks skipped (the engine's path), a corrupt block id must not fault: it reads zeros."""
    from kda_serving.ops import indices_checked_by_caller

    q, cache, tables, seq_lens = make_case([100], H=32, L=L, block_size=16, seed=9, dtype=torch.bfloat16,
                                           device="cuda")
    tables[0, 2] = 10**8
    with indices_checked_by_caller():
        out = mla_decode(q, cache, tables, seq_lens, scale=SCALE, max_seq_len=100, value_dim=V)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("block_size", [16, 8])
def test_cache_rows_past_each_sequence_are_never_used(block_size):
    """Rows past a sequence's end in its last block (and every block no sequence holds) may hold anything,
    NaN too: the kernel loads whole blocks (TMA boxes of 16 rows at block size 16) and must zero them."""
    lens = [37, 100, 64, 1]
    q, cache, tables, seq_lens = make_case(lens, H=32, L=L, block_size=block_size, seed=17, dtype=torch.bfloat16,
                                           device="cuda")
    valid = torch.zeros(cache.shape[0] * block_size, dtype=torch.bool)
    for n, length in enumerate(lens):
        keys = torch.arange(length)
        valid[tables[n].cpu()[keys // block_size].long() * block_size + keys % block_size] = True
    cache.view(-1, L)[~valid.to(cache.device)] = float("nan")
    out = run_op(q, cache, tables, seq_lens, max(lens))
    check(out, reference(q, cache, tables, seq_lens, SCALE, V), f"NaN past the ends, block size {block_size}")


def test_mla_block_decode_on_the_kernel_matches_the_gather_path():
    """MLABlock of Kimi-Linear-48B's sizes (32 heads, latent 512 + 64) in a decode step: the kernel path
    against the block's own gather + SDPA path on the same inputs, and the cache written alike."""
    from kda_serving.model.batch import RaggedBatch
    from kda_serving.model.config import ModelConfig
    from kda_serving.model.mla_block import MLABlock

    raw = {
        "model_type": "kimi_linear", "vocab_size": 64, "hidden_size": 512, "intermediate_size": 64,
        "moe_intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 32, "num_key_value_heads": 32,
        "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
        "v_head_dim": 128, "num_experts": 0, "num_experts_per_token": 1, "num_shared_experts": 0,
        "first_k_dense_replace": 1, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
        "model_max_length": 8192, "eos_token_id": 1, "mla_use_nope": True, "head_dim": 72,
        "linear_attn_config": {"kda_layers": [], "full_attn_layers": [1], "num_heads": 1, "head_dim": 128,
                               "short_conv_kernel_size": 4},
    }
    cfg = ModelConfig.from_dict(raw)
    gen = torch.Generator(device="cuda").manual_seed(0)
    block = MLABlock(cfg, torch.bfloat16, "cuda")
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device="cuda") * (1.0 if p.dim() == 1 else p.shape[-1] ** -0.5))
    lens, bs, num_blocks = [700, 1, 65, 2048], 16, 600
    N = len(lens)
    cache = torch.randn(num_blocks, bs, 576, generator=gen, device="cuda").to(torch.bfloat16)
    perm = torch.randperm(num_blocks, generator=gen, device="cuda")
    width = max(-(-n // bs) for n in lens)
    tables = perm[: N * width].view(N, width).to(torch.int32)
    seq = torch.tensor(lens, dtype=torch.int32, device="cuda")
    slot = torch.stack([tables[n, (lens[n] - 1) // bs].long() * bs + (lens[n] - 1) % bs for n in range(N)])
    batch = RaggedBatch(
        input_ids=torch.zeros(N, dtype=torch.long, device="cuda"), positions=(seq - 1).long(),
        cu_seqlens=torch.arange(N + 1, dtype=torch.int32, device="cuda"), context_lens=seq - 1, seq_lens=seq,
        state_slots=torch.arange(N, dtype=torch.int32, device="cuda"), has_initial_state=seq > 1,
        block_tables=tables, slot_mapping=slot, logits_indices=torch.arange(N, device="cuda"),
        query_lens=[1] * N, kv_lens=list(lens), is_decode=True)
    x = torch.randn(N, 512, generator=gen, device="cuda").to(torch.bfloat16)
    with torch.inference_mode():
        cache_k = cache.clone()
        assert block._on_cuda_kernels(x, batch, cache_k)
        out_kernel = block(x, batch, cache_k)
        cache_g = cache.clone()
        gather_batch = RaggedBatch(**{**batch.__dict__, "query_lens": []})  # no host lengths: the gather path
        out_gather = block(x, gather_batch, cache_g)
    assert torch.equal(cache_k, cache_g)
    check(out_kernel, out_gather.double(), "MLABlock decode, kernel vs gather path", rel_tol=1.5e-2)
