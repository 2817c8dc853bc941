"""Multi-head latent attention (MLA, NoPE as in Kimi-Linear) over a paged cache of latents.

Each token is cached as one latent row [kv_lora_rank + qk_rope_head_dim]: the RMS-normalised KV latent c
followed by the shared key part r. Keys and values of head h are k_h = [W_uk[h] c, r], v_h = W_uv[h] c,
with W_uk, W_uv the two halves of kv_b_proj. Decodes attend in the absorbed form, on the latents
themselves: score = [W_uk[h]^T q_nope, q_rope] . [c, r] and out_h = W_uv[h] (sum_l p_l c_l), which is the same
function as expanding keys and values but never materialises them, so the cost per token is that of one
multi-query attention of head size kv_lora_rank + qk_rope_head_dim. The softmax scale stays qk_head_dim ** -0.5.
No rotary embedding is applied (mla_use_nope), exactly as transformers' KimiLinearAttention.

Where it runs: on CUDA a decode or verify step takes the paged kernel (ops.mla_decode); a step with prompt
tokens takes, for sequences of EXPANDED_MIN_QUERIES+ new tokens, the expanded form on the flash kernel
(mla_prefill.py: keys and values expanded per head, which pays when queries are many), and the paged kernel
for the other rows. On the CPU, a step of long or fresh prompts takes the expanded form too (torch's CPU flash
kernel); the rest (and fp32 or other sizes on CUDA) _attend, the absorbed form in torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import linear, mla_decode
from ..ops.contract import skip_index_value_checks
from ..ops import cuda_mla
from ..ops.cuda_args import sm_count
from . import mla_prefill
from .batch import RaggedBatch
from .config import ModelConfig
from .mla_prefill import ExpandedPrefill, flash_varlen_supported, offsets, plan_runs, row_index
from .norm import LATENT_NORM_EPS, rms_norm

# Bounds on the attention's temporaries, in elements: one [seqs, heads, queries, keys] score block (512 MiB in
# fp32) and one gather of cached latents [seqs, keys, latent] (512 MiB in bf16).
SCORE_BUDGET = 1 << 27
LATENT_BUDGET = 1 << 28
# On CUDA, groups whose keys number at least this many times their queries (a prompt chunk after cached
# context) take _gemm_attention instead of SDPA: measured 1.2-1.4x faster there, 0.77x with no context.
GEMM_ATTENTION_KEYS_PER_QUERY = 2
# A group of sequences in _attend computes scores for every (query, key) of its padded block: at most this
# many times the (query, key) pairs its sequences hold (plus a few thousand, so small steps stay one group).
GROUP_PADDING = 2
# On CUDA, in a step with prompt tokens, a sequence with at least this many new tokens takes the expanded form
# on the flash kernel (mla_prefill); the other rows (decodes, verifications, short chunks) the paged kernel, one
# query each. The paged kernel reads a sequence's cache once per query, the expanded form expands every key
# once: measured on an H200, they cross at 96-192 queries, lower the longer the context (docs/engine.md).
EXPANDED_MIN_QUERIES = 128
# On the CPU a step with prompt tokens runs in the expanded form (torch's CPU flash kernel) when every sequence
# in it is a fresh prompt of at least CPU_FRESH_MIN_QUERIES tokens or has CPU_MIN_QUERIES new tokens; else
# _attend. Measured with the default model's MLA (4 heads, latent 128 + 32): 1.4x at 4 fresh prompts of 64,
# 2.3x at 2 of 512, 2.0x at 2 x 512 after 1K cached; 0.7-0.9x at 64-128 new tokens after as many cached.
CPU_FRESH_MIN_QUERIES = 32
CPU_MIN_QUERIES = 256
# False sends every step with prompt tokens to _attend, on CUDA and on the CPU (the absorbed torch-ops path all
# of them took before session 15): the baseline of benchmarks/bench_engine.py --mla-prefill torch.
PREFILL_ON_KERNELS = True


def _param(*shape: int, dtype: torch.dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def latent_rows(kv_a: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """kv_a_proj_with_mqa's output [T, C + R] -> the cached latent rows [T, C + R] in `dtype`: the KV latent c
    RMS-normalised by weight [C], the shared key part r as it is. One function, so that a compiled model runs it
    as one kernel (eagerly it is nine: the norm's casts and reductions, the concatenation)."""
    c, r = kv_a.split([weight.shape[0], kv_a.shape[-1] - weight.shape[0]], dim=-1)
    return torch.cat([rms_norm(c, weight, eps), r], dim=-1).to(dtype)


class MLABlock(nn.Module):
    # the plain-torch pieces, or their compiled versions on a compiled model (KimiLinearModel.compile_plain_ops)
    norm_fn = staticmethod(rms_norm)
    latent_fn = staticmethod(latent_rows)

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device):
        super().__init__()
        self.num_heads = nh = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.scale = cfg.qk_head_dim**-0.5
        qk = nh * cfg.qk_head_dim
        self.q_lora_rank = cfg.q_lora_rank
        if cfg.q_lora_rank is None:
            self.q_proj = _param(qk, cfg.hidden_size, dtype=dtype, device=device)
        else:
            self.q_a_proj = _param(cfg.q_lora_rank, cfg.hidden_size, dtype=dtype, device=device)
            self.q_a_layernorm = _param(cfg.q_lora_rank, dtype=dtype, device=device)
            self.q_b_proj = _param(qk, cfg.q_lora_rank, dtype=dtype, device=device)
        self.kv_a_proj_with_mqa = _param(cfg.latent_dim, cfg.hidden_size, dtype=dtype, device=device)
        self.kv_a_layernorm = _param(cfg.kv_lora_rank, dtype=dtype, device=device)
        self.kv_b_proj = _param(nh * (self.nope_dim + self.v_dim), cfg.kv_lora_rank, dtype=dtype, device=device)
        self.o_proj = _param(cfg.hidden_size, nh * self.v_dim, dtype=dtype, device=device)
        self.attention_bias = cfg.attention_bias
        if cfg.attention_bias:  # transformers puts biases on q_a_proj, kv_a_proj_with_mqa and o_proj only
            if cfg.q_lora_rank is not None:
                self.q_a_proj_bias = _param(cfg.q_lora_rank, dtype=dtype, device=device)
            self.kv_a_proj_with_mqa_bias = _param(cfg.latent_dim, dtype=dtype, device=device)
            self.o_proj_bias = _param(cfg.hidden_size, dtype=dtype, device=device)
        self._expansion: tuple[tuple, ExpandedPrefill] | None = None  # (key, ExpandedPrefill): _expanded_prefill

    def _bias(self, name: str):
        return getattr(self, name + "_bias", None) if self.attention_bias else None

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x through the projection `name` and its bias where it has one: ops.linear (KDABlock's note) without a
        bias, F.linear with one."""
        bias = self._bias(name)
        return linear(x, getattr(self, name)) if bias is None else F.linear(x, getattr(self, name), bias)

    def forward(self, x: torch.Tensor, batch: RaggedBatch, kv_cache: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]. Writes the new latents into kv_cache [blocks, block_size, latent]."""
        return self.finish(self.mix(self.project(x, batch, kv_cache), batch, kv_cache))

    # forward in three parts: project and finish see only the tokens (a piecewise CUDA graph captures them per
    # token count, engine/prompt_graphs.py; project reads batch.slot_mapping alone); mix reads the batch's
    # sequences and block tables.

    def project(self, x: torch.Tensor, batch: RaggedBatch, kv_cache: torch.Tensor) -> dict[str, torch.Tensor]:
        """Queries "q" [T, nh, nope + rope] and the new tokens' latent rows "latent" [T, L], which it also writes
        into kv_cache at batch.slot_mapping."""
        T, nh = x.shape[0], self.num_heads
        if self.q_lora_rank is None:
            q = linear(x, self.q_proj)
        else:
            q_lat = self._linear(x, "q_a_proj")
            q = linear(self.norm_fn(q_lat, self.q_a_layernorm, LATENT_NORM_EPS), self.q_b_proj)
        kv_a = self._linear(x, "kv_a_proj_with_mqa")
        latent = self.latent_fn(kv_a, self.kv_a_layernorm, LATENT_NORM_EPS, kv_cache.dtype)
        kv_cache.view(-1, kv_cache.shape[-1])[batch.slot_mapping] = latent  # [T, L]
        return {"q": q.view(T, nh, -1), "latent": latent}  # q: [nope | rope] per head

    @property
    def mix_shape(self) -> tuple[int, int]:
        """mix's output per token: [nh, v_head_dim]."""
        return self.num_heads, self.v_dim

    def mix(self, inputs: dict[str, torch.Tensor], batch: RaggedBatch, kv_cache: torch.Tensor) -> torch.Tensor:
        """Attention of the new tokens over their sequences' cached keys, themselves included: per-head values
        [T, nh, v]."""
        q, latent = inputs["q"], inputs["latent"]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        flat_cache = kv_cache.view(-1, kv_cache.shape[-1])
        w_kv = self.kv_b_proj.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        if self._expanded_on_cpu(q, batch):
            return self._prefill(q, latent, batch, kv_cache, w_kv, min_queries=1)
        if not self._on_cuda_kernels(q, batch, kv_cache):
            out_latent = self._attend(self._absorb(q_nope, q_rope, w_kv), batch, flat_cache, kv_cache.shape[1])
            return self._unabsorb(out_latent, w_kv)
        if batch.decode_only:
            # no prompt tokens: the paged kernel reads each cached row in place, once per query
            lens, table_rows = _query_lengths(batch)
            out_latent = mla_decode(self._absorb(q_nope, q_rope, w_kv), kv_cache, batch.block_tables, lens,
                                    scale=self.scale, max_seq_len=max(batch.kv_lens), value_dim=self.kv_lora_rank,
                                    table_rows=table_rows)
            return self._unabsorb(out_latent, w_kv)
        return self._prefill(q, latent, batch, kv_cache, w_kv)

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """o_proj: per-head values [T, nh, v] -> [T, hidden]."""
        return self._linear(out.reshape(out.shape[0], -1), "o_proj")

    def _absorb(self, q_nope: torch.Tensor, q_rope: torch.Tensor, w_kv: torch.Tensor) -> torch.Tensor:
        """Queries [T, nh, nope], [T, nh, rope] -> absorbed queries [T, nh, L] = [W_uk[h]^T q_nope, q_rope]."""
        return torch.cat([torch.einsum("thd,hdc->thc", q_nope, w_kv[:, : self.nope_dim]), q_rope], dim=-1)

    def _unabsorb(self, out_latent: torch.Tensor, w_kv: torch.Tensor) -> torch.Tensor:
        """Attention output on the latents [T, nh, C] -> per-head values [T, nh, v] (W_uv[h] applied): a batch of
        one product per head, seen head-major ([nh, T, C] -> [nh, T, v] views), so that at a few tokens
        ops.linear's kernel writes the values in place (2.3 us for Kimi-Linear-48B's 32 heads where cuBLAS's
        batched GEMM took 4.0, H200, docs/gemv.md)."""
        T = out_latent.shape[0]
        values = torch.empty(T, self.num_heads, self.v_dim, dtype=out_latent.dtype, device=out_latent.device)
        linear(out_latent.transpose(0, 1), w_kv[:, self.nope_dim :], out=values.transpose(0, 1))
        return values

    @property
    def decode_on_kernel(self) -> bool:
        """Whether this layer's decode and verifying steps run on the paged kernel (bf16 on an SM90 GPU, sizes
        it is built for), which reads each query's key count and block-table row on the device: one captured
        step then serves every key length (engine/cuda_graphs.py)."""
        w = self.kv_b_proj
        return (w.is_cuda and w.dtype == torch.bfloat16
                and cuda_mla.supports(self.num_heads, self.kv_lora_rank + self.rope_dim, self.kv_lora_rank)
                and cuda_mla.runs_on(w.device.index or 0))

    def _on_cuda_kernels(self, x: torch.Tensor, batch: RaggedBatch, kv_cache: torch.Tensor) -> bool:
        """Whether this step's attention runs on the CUDA kernels: bf16, with host copies of the query and key
        lengths, in sizes the paged kernel is built for (16 or 32 heads of 576), and, with prompt tokens, heads
        the flash kernel takes. Decode and verify steps go to the paged kernel (ops.mla_decode) whole; steps with
        prompt tokens to _prefill. Elsewhere _attend, in the absorbed form with torch ops."""
        return (x.is_cuda and bool(batch.kv_lens) and bool(batch.query_lens)
                and x.dtype == kv_cache.dtype == torch.bfloat16
                and batch.block_tables.dtype == torch.int32 and batch.seq_lens.dtype == torch.int32
                and cuda_mla.supports(self.num_heads, kv_cache.shape[-1], self.kv_lora_rank)
                and cuda_mla.runs_on(x.device.index or 0)
                and (batch.decode_only or (PREFILL_ON_KERNELS and flash_varlen_supported(
                    x, self.nope_dim + self.rope_dim, self.v_dim))))

    def _expanded_on_cpu(self, x: torch.Tensor, batch: RaggedBatch) -> bool:
        """Whether this CPU step runs every sequence in the expanded form (CPU_FRESH_MIN_QUERIES above)."""
        if (x.is_cuda or not PREFILL_ON_KERNELS or batch.decode_only or not batch.query_lens or not batch.kv_lens
                or self.v_dim > self.nope_dim + self.rope_dim):
            return False
        return all(q >= CPU_MIN_QUERIES or (q == kv and q >= CPU_FRESH_MIN_QUERIES)
                   for q, kv in zip(batch.query_lens, batch.kv_lens))

    def _prefill(self, q: torch.Tensor, latent: torch.Tensor, batch: RaggedBatch, kv_cache: torch.Tensor,
                 w_kv: torch.Tensor, min_queries: int | None = None) -> torch.Tensor:
        """A step with prompt tokens (queries q [T, nh, nope + rope]): sequences with at least min_queries (default
        EXPANDED_MIN_QUERIES) new tokens in the expanded form (mla_prefill), the other rows on the paged kernel
        one query each, over the keys up to their own position. Returns per-head values [T, nh, v]."""
        T, nh = q.shape[:2]
        if not skip_index_value_checks():  # the engine checked the batch already (RaggedBatch.check)
            batch.check_host_lengths(kv_cache.shape[1])
        q_lens, kv_lens = batch.query_lens, batch.kv_lens
        starts = offsets(q_lens)
        least = EXPANDED_MIN_QUERIES if min_queries is None else min_queries
        long = [n for n in range(len(q_lens)) if q_lens[n] >= max(1, least)]
        short = [n for n in range(len(q_lens)) if 0 < q_lens[n] < least]  # (a sequence may be empty)
        flat_cache = kv_cache.view(-1, kv_cache.shape[-1])
        if long:
            rows = row_index([(starts[n], starts[n + 1]) for n in long], q.device)
            attend = self._expanded_prefill(w_kv)
            runs = plan_runs(long, q_lens, kv_lens, attend.key_budget)
            expanded = attend(q[rows], latent[rows], runs, batch.block_tables, flat_cache, kv_cache.shape[1])
            if isinstance(rows, slice) and rows == slice(0, T):  # every token: the result is the output
                return expanded
        out = q.new_empty(T, nh, self.v_dim)
        if long:
            out[rows] = expanded
        if short:
            rows = row_index([(starts[n], starts[n + 1]) for n in short], q.device)
            seq_of_row = torch.tensor([n for n in short for _ in range(q_lens[n])]).to(q.device, non_blocking=True)
            # each query sees the keys up to its own position: a short chunk's earlier tokens, not its later ones
            lens = (batch.positions[rows] + 1).to(torch.int32)
            q_nope, q_rope = q[rows].split([self.nope_dim, self.rope_dim], dim=-1)
            out_latent = mla_decode(self._absorb(q_nope, q_rope, w_kv), kv_cache,
                                    batch.block_tables[seq_of_row], lens, scale=self.scale,
                                    max_seq_len=max(kv_lens[n] for n in short), value_dim=self.kv_lora_rank)
            out[rows] = self._unabsorb(out_latent, w_kv)
        return out

    def _expanded_prefill(self, w_kv: torch.Tensor) -> ExpandedPrefill:
        """The layer's ExpandedPrefill, whose expansion matrix (12 MB at 48B's sizes; building it took six
        kernels per layer and step) is kept while kv_b_proj is unchanged: same storage, same version counter
        (an in-place reload bumps it), same attention kernel. Weights made under inference mode have no version
        counter, so theirs is built at every step. (The key also holds the settings the instance reads.)"""
        sms = sm_count(w_kv.device) if w_kv.is_cuda else 8  # 8: the CPU, one call a sequence
        if self.kv_b_proj.is_inference():
            return ExpandedPrefill(w_kv, self.nope_dim, self.rope_dim, self.scale, sms)
        key = (self.kv_b_proj.data_ptr(), self.kv_b_proj._version, mla_prefill.OWN_KERNEL, mla_prefill.EXPANDED_BUDGET,
               sms)
        if self._expansion is None or self._expansion[0] != key:
            self._expansion = key, ExpandedPrefill(w_kv, self.nope_dim, self.rope_dim, self.scale, sms)
        return self._expansion[1]

    def _attend(self, q: torch.Tensor, batch: RaggedBatch, flat_cache: torch.Tensor, block_size: int):
        """Causal attention of the new tokens' queries q [T, nh, L] over each sequence's cached latents.

        Sequences are taken in groups small enough that the gathered latents [n, Lmax, L] and one score block
        [n, nh, Qc, Lmax] stay within fixed budgets (long prompts are also split along the queries), so the
        activation memory is bounded whatever the batch; a tiny model's step is a single group.
        """
        T, nh, L = q.shape
        q_lens = list(batch.query_lens) if batch.query_lens else batch.cu_seqlens.diff().tolist()
        kv_lens = list(batch.kv_lens) if batch.kv_lens else batch.seq_lens.tolist()
        starts = offsets(q_lens)
        out = q.new_empty(T, nh, self.kv_lora_rank)
        s, N = 0, len(q_lens)
        while s < N:
            e, q_max, l_max, work = s + 1, q_lens[s], kv_lens[s], q_lens[s] * kv_lens[s]
            while e < N:
                qm, lm = max(q_max, q_lens[e]), max(l_max, kv_lens[e])
                n = e - s + 1
                if n * nh * qm * lm > SCORE_BUDGET or n * lm * L > LATENT_BUDGET:
                    break
                # padding every sequence to the group's longest would more than double the scores computed (a
                # prompt chunk among decodes: 374 -> 14 ms on the CPU at 16 decodes and two 512-token chunks)
                if n * qm * lm > GROUP_PADDING * (work + q_lens[e] * kv_lens[e]) + 4096:
                    break
                q_max, l_max, e, work = qm, lm, e + 1, work + q_lens[e] * kv_lens[e]
            if starts[e] > starts[s]:
                out[starts[s] : starts[e]] = self._attend_group(
                    q[starts[s] : starts[e]], batch, s, e, starts[s], q_lens[s:e], q_max, l_max, flat_cache,
                    block_size,
                )
            s = e
        return out

    def _attend_group(self, q, batch: RaggedBatch, s: int, e: int, start: int, q_lens: list[int], q_max: int,
                      l_max: int, flat_cache: torch.Tensor, block_size: int) -> torch.Tensor:
        """Sequences s..e-1 (tokens q [Tg, nh, L], the first at token `start`) padded to q_max queries and l_max
        keys; returns [Tg, nh, C].

        The heads are folded into the query axis (all heads share the one latent key/value row), so each SDPA
        call is q [n, 1, Qc * nh, L], k [n, 1, Lmax, L], v [n, 1, Lmax, C] with C = kv_lora_rank.
        """
        Tg, nh, L = q.shape
        n, device = e - s, q.device
        key_pos = torch.arange(l_max, device=device)
        blocks = batch.block_tables[s:e].long()[:, key_pos // block_size]  # [n, Lmax]
        valid = key_pos[None, :] < batch.seq_lens[s:e].long()[:, None]
        slots = torch.where(valid, blocks * block_size + key_pos % block_size, 0)
        # rows past a sequence's end are zeroed, not just masked: a reused block may hold anything
        keys = torch.where(valid[..., None], flat_cache[slots].to(q.dtype), 0)  # [n, Lmax, L]
        positions = batch.positions[start : start + Tg].long()

        padded = q_max > 1 or Tg != n
        if padded:
            # from the batch's own cu_seqlens, not a host copy: a verifying step is captured in a CUDA graph
            q_lens_t = batch.cu_seqlens[s + 1 : e + 1].long() - batch.cu_seqlens[s:e].long()
            seq_of = torch.repeat_interleave(torch.arange(n, device=device), q_lens_t, output_size=Tg)
            offset = torch.arange(Tg, device=device) - (torch.cumsum(q_lens_t, 0) - q_lens_t)[seq_of]
            q_pad = q.new_zeros(n, q_max, nh, L)
            q_pad[seq_of, offset] = q
            q_pos = torch.zeros(n, q_max, dtype=torch.long, device=device)  # padding rows see key 0: no NaN
            q_pos[seq_of, offset] = positions
        else:  # one query per sequence (decode): no padding
            q_pad, q_pos = q[:, None], positions[:, None]

        gemm = q.is_cuda and l_max >= GEMM_ATTENTION_KEYS_PER_QUERY * q_max
        # the GEMM form holds fp32 scores, bf16 probabilities and the mask: 7 bytes per score, so a quarter of
        # the rows per chunk keeps it near the SDPA form's footprint (whose boolean mask is the largest part)
        chunk = max(1, SCORE_BUDGET // ((4 if gemm else 1) * n * nh * l_max))
        outs = []
        for a in range(0, q_max, chunk):
            qc = q_pad[:, a : a + chunk]
            c = qc.shape[1]
            mask = key_pos[None, None, :] <= q_pos[:, a : a + chunk, None]  # [n, Qc, Lmax], causal by position
            mask = mask[:, :, None, :].expand(n, c, nh, l_max).reshape(n, c * nh, l_max)
            if gemm:
                o = self._gemm_attention(qc.reshape(n, c * nh, L), keys, mask)
            else:
                o = F.scaled_dot_product_attention(
                    qc.reshape(n, 1, c * nh, L), keys[:, None], keys[:, None, :, : self.kv_lora_rank],
                    attn_mask=mask[:, None], scale=self.scale,
                )
            outs.append(o.view(n, c, nh, self.kv_lora_rank))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out[seq_of, offset] if padded else out[:, 0]


    def _gemm_attention(self, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention of query rows q [n, R, L] over keys [n, Lmax, L] (values: their first kv_lora_rank columns)
        as two batched GEMMs with fp32 scores around a masked softmax: on CUDA with much cached context 1.2-1.4x
        faster than SDPA's masked kernel, whose head size of 576 rules out the flash kernels (docs/engine.md,
        Limits). Same error against fp32 (1.7-2.2e-3 relative in the experiment)."""
        scores = torch.bmm(q, keys.transpose(1, 2), out_dtype=torch.float32).mul_(self.scale)
        probs = torch.softmax(scores.masked_fill_(~mask, float("-inf")), dim=-1).to(q.dtype)
        return torch.bmm(probs, keys[:, :, : self.kv_lora_rank], out_dtype=torch.float32).to(q.dtype)


def _query_lengths(batch: RaggedBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Key count and block-table row of every query of a step without prompt tokens, for the paged decode
    kernel: a decode's are its sequence's (rows None: query n reads row n); the W tokens of a verifying
    sequence are W queries over its row that see their own position and those before it (so a draft never sees
    the drafts after it)."""
    spec = batch.spec
    if spec is None:
        return batch.seq_lens, None
    device = batch.block_tables.device
    seqs = torch.arange(batch.num_seqs, device=device)
    seq_of_token = torch.cat((seqs[: spec.num_seqs].repeat_interleave(spec.width), seqs[spec.num_seqs :]))
    # a padding row of a captured step (sequence length 0) reads no key
    lens = torch.minimum(batch.positions + 1, batch.seq_lens[seq_of_token].long()).to(torch.int32)
    return lens, seq_of_token.to(torch.int32)
