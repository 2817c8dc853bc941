"""MLA attention of steps with prompt tokens in the expanded form (model/mla_prefill.py, MLABlock._prefill).

Against an independent float64 reference written here (queries, latents, keys and values expanded per head,
a lower-right causal softmax per sequence): on the CPU (torch's CPU flash kernel, the paged rows through
ops.mla_decode's CPU path), with budgets small enough that prompts split into runs, contexts into pieces and
pieces into several calls, and sequences of the expanded and the paged forms interleaved; the CPU's own
routing of long and fresh prompts; on the GPU (marked) through the flash kernel at Kimi-Linear-48B's
sizes, with the caching allocator poisoned by NaN so that a row left unwritten shows. Every cache row no
sequence holds is NaN, so a key read from the wrong row shows too.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kda_serving.model import mla_block, mla_prefill
from kda_serving.model.batch import RaggedBatch
from kda_serving.model.config import ModelConfig
from kda_serving.model.mla_block import MLABlock
from kda_serving.model.norm import LATENT_NORM_EPS


def mla_config(nh: int, nope: int, rope: int, v: int, lora: int, hidden: int) -> ModelConfig:
    return ModelConfig.from_dict({
        "model_type": "kimi_linear", "vocab_size": 64, "hidden_size": hidden, "intermediate_size": 64,
        "moe_intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": nh, "num_key_value_heads": nh,
        "kv_lora_rank": lora, "q_lora_rank": None, "qk_rope_head_dim": rope, "qk_nope_head_dim": nope,
        "v_head_dim": v, "num_experts": 0, "num_experts_per_token": 1, "num_shared_experts": 0,
        "first_k_dense_replace": 1, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
        "model_max_length": 1 << 16, "eos_token_id": 1, "mla_use_nope": True, "head_dim": nope + rope,
        "linear_attn_config": {"kda_layers": [], "full_attn_layers": [1], "num_heads": 1, "head_dim": 128,
                               "short_conv_kernel_size": 4},
    })


CPU_CONFIG = dict(nh=4, nope=16, rope=8, v=16, lora=24, hidden=64)
KIMI48B_MLA = dict(nh=32, nope=128, rope=64, v=128, lora=512, hidden=512)


def make_block(sizes: dict, dtype, device, seed: int) -> MLABlock:
    block = MLABlock(mla_config(**sizes), dtype, device)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            w = torch.randn(p.shape, generator=gen) * (1.0 if p.dim() == 1 else p.shape[-1] ** -0.5)
            p.copy_(w.to(device, dtype))
    return block


def make_case(seqs: list[tuple[int, int]], latent: int, block_size: int, dtype, device, seed: int):
    """A batch of sequences (new tokens, cached tokens) over a paged cache whose rows hold random cached latents
    where a sequence's context lies and NaN everywhere else (the new tokens' rows included, which the block
    writes before it reads them)."""
    gen = torch.Generator().manual_seed(seed)
    N = len(seqs)
    width = max(-(-(q + c) // block_size) for q, c in seqs)
    num_blocks = N * width + 5
    cache = torch.full((num_blocks, block_size, latent), float("nan"))
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((N, width), -1, dtype=torch.int32)
    positions, slot_mapping = [], []
    for n, (q_len, ctx) in enumerate(seqs):
        used = -(-(q_len + ctx) // block_size)
        tables[n, :used] = perm[n * width : n * width + used].to(torch.int32)
        for p in range(ctx + q_len):
            row = int(tables[n, p // block_size]) * block_size + p % block_size
            if p < ctx:
                cache.view(-1, latent)[row] = torch.randn(latent, generator=gen)
            else:
                positions.append(p)
                slot_mapping.append(row)
    q_lens = [q for q, _ in seqs]
    ctx_t = torch.tensor([c for _, c in seqs], dtype=torch.int32)
    seq_lens = ctx_t + torch.tensor(q_lens, dtype=torch.int32)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    T = int(cu[-1])
    batch = RaggedBatch(
        input_ids=torch.zeros(T, dtype=torch.long), positions=torch.tensor(positions, dtype=torch.long),
        cu_seqlens=cu, context_lens=ctx_t, seq_lens=seq_lens, state_slots=torch.arange(N, dtype=torch.int32),
        has_initial_state=ctx_t > 0, block_tables=tables, slot_mapping=torch.tensor(slot_mapping, dtype=torch.long),
        logits_indices=(cu[1:] - 1).long(), query_lens=q_lens, kv_lens=seq_lens.tolist(),
        is_decode=all(q == 1 and c > 0 for q, c in seqs))
    return batch.to(device), cache.to(device, dtype)


def reference(block: MLABlock, x: torch.Tensor, batch: RaggedBatch, cache: torch.Tensor) -> torch.Tensor:
    """float64: each sequence's keys are its cached latent rows then its new tokens' latents (rounded to the
    cache's dtype, as stored), expanded per head; query i of a sequence with C cached keys sees keys 0..C+i."""
    W = {name: p.detach().double().cpu() for name, p in block.named_parameters()}
    nh, nope, rope, vd, C = block.num_heads, block.nope_dim, block.rope_dim, block.v_dim, block.kv_lora_rank
    x = x.double().cpu()
    T = x.shape[0]
    q = (x @ W["q_proj"].T).view(T, nh, nope + rope)
    c, r = (x @ W["kv_a_proj_with_mqa"].T).split([C, rope], dim=-1)
    c = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + LATENT_NORM_EPS) * W["kv_a_layernorm"]
    new_latent = torch.cat([c, r], -1).to(cache.dtype).double()
    w_kv = W["kv_b_proj"].view(nh, nope + vd, C)
    flat = cache.view(-1, cache.shape[-1]).double().cpu()
    tables, bs = batch.block_tables.cpu(), cache.shape[1]
    out = torch.zeros(T, nh, vd, dtype=torch.float64)
    start = 0
    for n, (q_len, kv_len) in enumerate(zip(batch.query_lens, batch.kv_lens)):
        ctx = kv_len - q_len
        rows = [int(tables[n, p // bs]) * bs + p % bs for p in range(ctx)]
        lat = torch.cat([flat[rows], new_latent[start : start + q_len]])  # [kv_len, C + rope]
        k = torch.cat([torch.einsum("kc,hdc->khd", lat[:, :C], w_kv[:, :nope]),
                       lat[:, None, C:].expand(kv_len, nh, rope)], -1)
        v = torch.einsum("kc,hdc->khd", lat[:, :C], w_kv[:, nope:])
        scores = torch.einsum("qhd,khd->hqk", q[start : start + q_len], k) * block.scale
        visible = torch.arange(kv_len)[None, :] <= ctx + torch.arange(q_len)[:, None]
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", probs, v)
        start += q_len
    return out.reshape(T, nh * vd) @ W["o_proj"].T


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    assert torch.isfinite(out).all(), "non-finite output (an unwritten row, or a key read from a NaN row)"
    d = out.double().cpu() - ref
    return (d.norm() / ref.norm()).item(), d.abs().max().item()


# sequences (new tokens, cached tokens): expanded (>= min queries) and paged rows interleaved, fresh prompts,
# prompts after context, decodes and a short chunk; with the budgets below prompts split into several runs
CPU_CASES = [
    [(9, 0)],
    [(9, 0), (1, 7), (12, 30), (3, 5), (5, 0)],
    [(1, 7), (2, 0), (30, 41)],
    [(4, 3), (17, 0), (1, 1), (8, 64)],
    [(0, 7), (9, 0), (0, 0), (2, 5)],  # sequences without new tokens
]


@pytest.mark.parametrize("seqs", CPU_CASES)
@pytest.mark.parametrize("budget_keys", [5, 1 << 20])
def test_prefill_split_matches_the_float64_reference_on_cpu(monkeypatch, seqs, budget_keys):
    """MLABlock._prefill on the CPU, forced (torch's CPU flash kernel in place of the CUDA one, the paged kernel
    by ops.mla_decode's CPU path): fp32 within 1e-5 of the float64 reference, as is the absorbed _attend path."""
    torch.manual_seed(0)
    sizes = CPU_CONFIG
    block = make_block(sizes, torch.float32, "cpu", seed=len(seqs))
    batch, cache = make_case(seqs, sizes["lora"] + sizes["rope"], 4, torch.float32, "cpu", seed=budget_keys)
    x = torch.randn(batch.num_tokens, sizes["hidden"], generator=torch.Generator().manual_seed(1))
    per_key = sizes["lora"] + sizes["rope"] + sizes["nh"] * 2 * (sizes["nope"] + sizes["rope"])
    monkeypatch.setattr(mla_prefill, "EXPANDED_BUDGET", per_key * budget_keys)
    monkeypatch.setattr(mla_block, "EXPANDED_MIN_QUERIES", 4)
    monkeypatch.setattr(mla_prefill, "MIN_PIECE_KEYS", 2)  # contexts cut for parallelism as well as budget
    monkeypatch.setattr(mla_block, "CPU_FRESH_MIN_QUERIES", 1 << 30)  # the CPU's own route: absorbed, always
    monkeypatch.setattr(mla_block, "CPU_MIN_QUERIES", 1 << 30)
    calls = []
    real_varlen = mla_prefill.varlen_attention
    monkeypatch.setattr(mla_prefill, "varlen_attention", lambda *a, **kw: calls.append(a) or real_varlen(*a, **kw))
    ref = reference(block, x, batch, cache)

    with torch.inference_mode():
        cache_attend = cache.clone()
        out_attend = block(x, batch, cache_attend)  # the CPU's own path: absorbed, torch ops
        monkeypatch.setattr(MLABlock, "_on_cuda_kernels", lambda self, x, b, c: True)
        cache_split = cache.clone()
        out_split = block(x, batch, cache_split)
    expanded = [q for q, _ in seqs if q >= 4]
    assert bool(calls) == bool(expanded)
    if expanded and budget_keys == 5:  # runs of at most 5 queries, pieces of at most 5 keys
        assert all(int(a[1].shape[0]) <= 5 for a in calls)
        assert len(calls) > len(expanded)
    err, max_err = rel_err(out_split, ref)
    err_attend, _ = rel_err(out_attend, ref)
    print(f"{seqs} budget {budget_keys}: split |out-ref|/|ref| {err:.2e} (max {max_err:.2e}), "
          f"absorbed {err_attend:.2e}")
    assert err < 1e-5 and err_attend < 1e-5
    torch.testing.assert_close(cache_split, cache_attend, equal_nan=True)


def test_cpu_varlen_attention_matches_the_reference():
    """varlen_attention on the CPU (torch's CPU flash kernel per sequence, keys and values strided views of one
    buffer, an empty sequence) against reference_attention in float64: outputs and log-sum-exps."""
    gen = torch.Generator().manual_seed(11)
    lens_q, lens_k = [5, 0, 33, 1], [9, 4, 33, 70]
    for causal in (False, True):
        kq = lens_q if causal else lens_k
        q = torch.randn(sum(lens_q), 4, 24, generator=gen)
        kv = torch.randn(sum(kq), 4, 48, generator=gen)
        kv[..., 24 + 16 :] = 0
        k, v = kv[..., :24], kv[..., 24:]
        out, lse = mla_prefill.varlen_attention(q, k, v, lens_q, kq, causal, 0.3, 16)
        ref_out, ref_lse = mla_prefill.reference_attention(q.double(), k.double(), v[..., :16].double(), lens_q, kq,
                                                           causal, 0.3)
        assert (out.double() - ref_out).abs().max() < 1e-5 and (lse.double() - ref_lse).abs().max() < 1e-5


@pytest.mark.parametrize("seqs,expanded", [
    ([(40, 0), (33, 0)], True),  # fresh prompts of 32+ tokens
    ([(300, 20), (40, 0)], True),  # 256+ new tokens after context, and a fresh prompt
    ([(40, 0), (1, 30)], False),  # a decode in the step: the absorbed path (_attend)
    ([(100, 50)], False),  # a shorter chunk after context
])
def test_cpu_routes_long_and_fresh_prompts_to_the_expanded_form(monkeypatch, seqs, expanded):
    """The CPU's own routing (MLABlock._expanded_on_cpu), the default model's MLA sizes: the expanded form for
    steps of long or fresh prompts only, each within 1e-5 of the float64 reference."""
    sizes = dict(nh=4, nope=64, rope=32, v=64, lora=128, hidden=256)
    block = make_block(sizes, torch.float32, "cpu", seed=6)
    batch, cache = make_case(seqs, 160, 16, torch.float32, "cpu", seed=7)
    x = torch.randn(batch.num_tokens, 256, generator=torch.Generator().manual_seed(8))
    calls = []
    real_varlen = mla_prefill.varlen_attention
    monkeypatch.setattr(mla_prefill, "varlen_attention", lambda *a, **kw: calls.append(a) or real_varlen(*a, **kw))
    with torch.inference_mode():
        out = block(x, batch, cache.clone())
    assert bool(calls) == expanded
    err, max_err = rel_err(out, reference(block, x, batch, cache))
    print(f"{seqs}: expanded {expanded}, |out-ref|/|ref| {err:.2e} (max {max_err:.2e})")
    assert err < 1e-5


def test_expansion_is_kept_until_the_weights_change():
    """MLABlock keeps its ExpandedPrefill (the expansion matrix) across steps while kv_b_proj is unchanged, and
    builds a new one after an in-place reload of it: outputs follow the new weights."""
    sizes = dict(nh=4, nope=64, rope=32, v=64, lora=128, hidden=256)
    block = make_block(sizes, torch.float32, "cpu", seed=6)
    batch, cache = make_case([(40, 0), (33, 0)], 160, 16, torch.float32, "cpu", seed=7)
    x = torch.randn(batch.num_tokens, 256, generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        block(x, batch, cache.clone())
        first = block._expansion[1]
        block(x, batch, cache.clone())
        assert block._expansion[1] is first
    with torch.no_grad():
        block.kv_b_proj.mul_(0.5)
    with torch.inference_mode():
        out = block(x, batch, cache.clone())
    assert block._expansion[1] is not first
    err, _ = rel_err(out, reference(block, x, batch, cache))
    assert err < 1e-5


def test_large_scores_merge_without_overflow(monkeypatch):
    """Scores of hundreds (queries scaled up): the pieces' log-sum-exp merge must not overflow or lose the
    dominant key."""
    sizes = CPU_CONFIG
    block = make_block(sizes, torch.float32, "cpu", seed=5)
    with torch.no_grad():
        block.q_proj.mul_(40.0)
    batch, cache = make_case([(11, 23), (6, 9)], sizes["lora"] + sizes["rope"], 4, torch.float32, "cpu", seed=2)
    x = torch.randn(batch.num_tokens, sizes["hidden"], generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(mla_prefill, "EXPANDED_BUDGET", 1)  # one key per call
    monkeypatch.setattr(mla_block, "EXPANDED_MIN_QUERIES", 1)
    monkeypatch.setattr(MLABlock, "_on_cuda_kernels", lambda self, x, b, c: True)
    with torch.inference_mode():
        out = block(x, batch, cache.clone())
    err, max_err = rel_err(out, reference(block, x, batch, cache))
    print(f"large scores: |out-ref|/|ref| {err:.2e}, max {max_err:.2e}")
    assert err < 1e-5


def test_absorbed_path_groups_a_prompt_chunk_apart_from_decodes(monkeypatch):
    """MLABlock._attend (the CPU's path) pads a group's sequences to its longest: a prompt chunk among decodes
    takes a group of its own instead of padding every decode to its length; the output is the same."""
    sizes = CPU_CONFIG
    block = make_block(sizes, torch.float32, "cpu", seed=3)
    batch, cache = make_case([(1, 300)] * 6 + [(96, 0), (1, 200)], sizes["lora"] + sizes["rope"], 4, torch.float32,
                             "cpu", seed=4)
    x = torch.randn(batch.num_tokens, sizes["hidden"], generator=torch.Generator().manual_seed(5))
    groups = []
    real_group = MLABlock._attend_group
    monkeypatch.setattr(MLABlock, "_attend_group", lambda self, q, b, s, e, *a: groups.append((s, e))
                        or real_group(self, q, b, s, e, *a))
    outs = {}
    for padding in (mla_block.GROUP_PADDING, float("inf")):
        monkeypatch.setattr(mla_block, "GROUP_PADDING", padding)
        groups.clear()
        with torch.inference_mode():
            outs[padding] = block(x, batch, cache.clone())
        print(f"padding bound {padding}: groups {groups}")
        if padding == mla_block.GROUP_PADDING and padding != float("inf"):
            assert groups == [(0, 6), (6, 7), (7, 8)]
    assert groups == [(0, 8)]
    torch.testing.assert_close(outs[2], outs[float("inf")], rtol=1e-5, atol=1e-6)
    err, _ = rel_err(outs[2], reference(block, x, batch, cache))
    assert err < 1e-5


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 90)), min_size=1, max_size=6), st.integers(1, 50),
       st.integers(1, 64))
def test_plans_cover_every_query_and_key_once(seqs, budget, target_ctas):
    """plan_runs / plan_pieces / plan_calls: every new token in exactly one run (runs in order, at most `budget`
    long); every (run, context key) pair in exactly one piece, pieces ordinal by ordinal across the runs; a call
    within the budget (or one item alone), and with `once` each run at most once in it."""
    q_lens = [q for q, _ in seqs]
    kv_lens = [q + c for q, c in seqs]
    runs = mla_prefill.plan_runs(list(range(len(seqs))), q_lens, kv_lens, budget)
    rows = [r for run in runs for r in range(*run.rows)]
    assert rows == list(range(sum(q_lens)))
    for run in runs:
        assert 0 < run.rows[1] - run.rows[0] <= budget
        n = run.seq
        first_new = sum(q_lens[:n])
        assert run.context == kv_lens[n] - q_lens[n] + run.rows[0] - first_new
    sizes = [run.rows[1] - run.rows[0] for run in runs]
    for call in mla_prefill.plan_calls(list(range(len(runs))), sizes, budget):
        assert len(call) == 1 or sum(sizes[i] for i in call) <= budget
    saved = mla_prefill.MIN_PIECE_KEYS
    mla_prefill.MIN_PIECE_KEYS = 2  # (hypothesis runs many examples per test call: no monkeypatch fixture)
    try:
        pieces = mla_prefill.plan_pieces(runs, 3, budget, target_ctas)
    finally:
        mla_prefill.MIN_PIECE_KEYS = saved
    ordinal, order = {}, []
    for i, a, b in pieces:
        assert 0 < b - a <= budget
        order.append((ordinal.get(i, 0), i))
        ordinal[i] = ordinal.get(i, 0) + 1
    assert order == sorted(order)
    covered = sorted((i, key) for i, a, b in pieces for key in range(a, b))
    assert covered == [(i, key) for i, run in enumerate(runs) for key in range(run.context)]
    for once in (True, False):
        calls = mla_prefill.plan_calls([p[0] for p in pieces], [p[2] - p[1] for p in pieces], budget, once=once)
        assert [j for call in calls for j in call] == list(range(len(pieces)))
        for call in calls:
            assert sum(pieces[j][2] - pieces[j][1] for j in call) <= budget
            if once:
                assert len({pieces[j][0] for j in call}) == len(call)


# ---------------------------------------------------------------------------------------------------- GPU


def poison_allocator(device: str, gib: float = 4.0) -> None:
    """Fills freed blocks of the caching allocator with NaN, so that an output row the code never writes
    (torch.empty reuses those blocks) shows as NaN."""
    blocks = [torch.full((1 << 26,), float("nan"), device=device) for _ in range(int(gib * 4))]
    del blocks


@pytest.mark.gpu
@pytest.mark.parametrize("D,Dv", [(192, 128), (192, 192), (64, 32)])
@pytest.mark.parametrize("lens_q,lens_k", [
    ([1, 77, 300, 5], [9, 77, 1000, 5]),
    ([64] * 5 + [300], [700] * 5 + [1000]),
    ([3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [5, 8, 9, 7, 9, 3, 2, 3, 8, 4]),
])
def test_varlen_attention_matches_float64_with_its_log_sum_exps(D, Dv, lens_q, lens_k):
    """varlen_attention on CUDA (192/128: our kernel; 192/192 and 64/32: FlashAttention-2; keys and values given
    as strided views of one buffer, the values padded to the key size): outputs and log-sum-exps against
    float64, causal and not."""
    gen = torch.Generator(device="cuda").manual_seed(D + Dv + len(lens_q))
    for causal in (False, True):
        kq = lens_q if causal else lens_k
        q = torch.randn(sum(lens_q), 8, D, device="cuda", generator=gen).to(torch.bfloat16)
        kv = torch.randn(sum(kq), 8, 2 * D, device="cuda", generator=gen).to(torch.bfloat16)
        kv[..., D + Dv :] = 0
        k, v = kv[..., :D], kv[..., D:]
        scale = D**-0.5 * 4  # peaky softmax
        out, lse = mla_prefill.varlen_attention(q, k, v, lens_q, kq, causal, scale, Dv)
        ref_out, ref_lse = mla_prefill.reference_attention(q.double().cpu(), k.double().cpu(),
                                                           v[..., :Dv].double().cpu(), lens_q, kq, causal, scale)
        assert out.shape == (sum(lens_q), 8, Dv) and lse.shape == (sum(lens_q), 8)
        err, max_err = rel_err(out, ref_out)
        lse_err = (lse.double().cpu() - ref_lse.double()).abs().max().item()
        print(f"D {D} Dv {Dv} {len(lens_q)} sequences causal {causal}: |out-ref|/|ref| {err:.2e} (max "
              f"{max_err:.2e}), max lse err {lse_err:.2e}")
        assert err < 1e-2 and lse_err < 1e-2


GPU_CASES = [
    [(700, 0)],
    [(300, 5000), (1, 2048), (128, 1000), (20, 300), (1100, 0), (127, 17)],
    [(1, 9), (512, 4096), (5, 0)],
]


@pytest.mark.gpu
@pytest.mark.parametrize("seqs", GPU_CASES)
@pytest.mark.parametrize("budget_keys", [None, 300])
def test_prefill_split_matches_the_float64_reference_on_gpu(monkeypatch, seqs, budget_keys):
    """MLABlock at Kimi-Linear-48B's sizes in a step with prompt tokens on CUDA: the flash kernel for
    sequences of 128+ new tokens, the paged kernel for the rest, against float64; bf16 error no larger than the
    absorbed torch-ops path's (within 1.5x) on the same inputs."""
    sizes = KIMI48B_MLA
    block = make_block(sizes, torch.bfloat16, "cuda", seed=len(seqs))
    batch, cache = make_case(seqs, sizes["lora"] + sizes["rope"], 16, torch.bfloat16, "cuda", seed=7)
    x = torch.randn(batch.num_tokens, sizes["hidden"], generator=torch.Generator().manual_seed(1)).to("cuda",
                                                                                                    torch.bfloat16)
    if budget_keys is not None:
        monkeypatch.setattr(mla_prefill, "EXPANDED_BUDGET", (576 + 32 * 2 * 192) * budget_keys)
    ref = reference(block, x, batch, cache)
    with torch.inference_mode():
        assert block._on_cuda_kernels(x, batch, cache)
        poison_allocator("cuda")
        cache_split = cache.clone()
        out_split = block(x, batch, cache_split)
        cache_attend = cache.clone()
        out_attend = block(x, RaggedBatch(**{**batch.__dict__, "query_lens": []}), cache_attend)
    err, max_err = rel_err(out_split, ref)
    err_attend, max_attend = rel_err(out_attend, ref)
    print(f"{seqs} budget {budget_keys}: split |out-ref|/|ref| {err:.2e} (max {max_err:.2e}); absorbed torch ops "
          f"{err_attend:.2e} (max {max_attend:.2e})")
    assert err < 1.5e-2 and err <= 1.5 * err_attend
    torch.testing.assert_close(cache_split, cache_attend, equal_nan=True, rtol=0, atol=0)


def test_pieces_fill_one_wave_of_ctas():
    """plan_pieces at 48B's 32 heads and a 132-SM GPU: a run of one query tile over 32K keys is cut into 4 pieces
    (128 CTAs; 5 would leave a second wave of 28), 8 where two CTAs fit per SM; a run of two tiles into 2."""
    for queries, target, count in ((64, 132, 4), (64, 264, 8), (200, 132, 2), (128 * 40, 132, 1)):
        runs = [mla_prefill.QueryRun(0, (0, queries), 32768)]
        pieces = mla_prefill.plan_pieces(runs, 32, 1 << 20, target)
        assert len(pieces) == count, (queries, target, pieces)
        assert sum(b - a for _, a, b in pieces) == 32768
