"""MLA attention of prompt chunks in the expanded form, on our varlen flash attention kernel (ops.flash_attention,
SM90; FlashAttention-2's in torch on other GPUs, torch's CPU flash kernel on the CPU).

The absorbed form (mla_block) attends on the cached latents themselves: one multi-query attention of head size
kv_lora_rank + qk_rope_head_dim (576 at Kimi-Linear-48B's shapes), 2 * (576 + 512) FLOPs per query, key and
head, and no flash kernel takes a head of 576. A prompt chunk has many queries per key, so it pays to expand
the keys and values once per step instead: k_h = [W_uk[h] c, r] (192) and v_h = W_uv[h] c (128), one GEMM per
key, after which each (query, key, head) costs 2 * (192 + 128) FLOPs (2 * (192 + 192) on FlashAttention-2, which
needs values padded to the key's size) and a flash kernel runs it.

Sequence n's Q new tokens attend over its C cached keys and its Q new ones. That splits in two parts:
  - its own new keys, expanded from this step's latents: causal and square, where upper-left and lower-right
    alignment agree, so one varlen call with is_causal covers every sequence;
  - its cached context, gathered from the paged cache (ops.gather_paged_rows) and expanded: no mask (every
    cached key precedes every new query), in pieces, each a varlen call.
The parts merge by their log-sum-exps (ops.merge_attention). Every call holds at most `key_budget` expanded
keys (and a sequence's new tokens are cut into runs of at most that many queries, a run's earlier tokens
joining its context), so the temporaries stay bounded whatever the prompt and context.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from ..ops import cuda_attention
from ..ops.flash_attention import cumulative_lengths, flash_attention, merge_attention
from ..ops.paged_rows import gather_paged_rows

# Elements of expanded keys and values (and their latents) one call may hold: 512 MiB in bf16, the same bound as
# the absorbed form's gathered latents (mla_block.LATENT_BUDGET); 20,000 keys at 48B's shapes.
EXPANDED_BUDGET = 1 << 28
FLASH_MAX_HEAD_DIM = 256  # FlashAttention-2's largest head size (torch's build)
TILE_M = 128  # query rows per CTA of the flash kernel's forward at head sizes 128-192
MIN_PIECE_KEYS = 256  # context pieces no smaller: each costs a merge
# False sends CUDA calls our kernel would take to FlashAttention-2 instead (benchmarks' baseline).
OWN_KERNEL = True


def flash_varlen_supported(q: torch.Tensor, qk_dim: int, v_dim: int) -> bool:
    """Whether a flash kernel takes these queries on CUDA: our own (ops.flash_attention: SM90, bf16, heads of 128
    or 192 with values of 128), or FlashAttention-2's (16-bit, SM80+, heads up to 256, a multiple of 8; values
    padded to the key size)."""
    return _own_kernel(q, qk_dim, v_dim) or (
        q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and v_dim <= qk_dim <= FLASH_MAX_HEAD_DIM
        and qk_dim % 8 == 0 and torch.cuda.get_device_capability(q.device)[0] >= 8)


def values_padded(q: torch.Tensor, qk_dim: int, v_dim: int) -> bool:
    """Whether varlen_attention needs values padded with zeros to the key size: all but our CUDA kernel do."""
    return not _own_kernel(q, qk_dim, v_dim)


def _own_kernel(q: torch.Tensor, qk_dim: int, v_dim: int) -> bool:
    return OWN_KERNEL and cuda_attention.supports(q, qk_dim, v_dim)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens_q: list[int], lens_k: list[int],
                     causal: bool, scale: float, v_dim: int, cu: tuple | None = None, out: torch.Tensor | None = None,
                     lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of packed sequences: q [Tq, H, D], k [Tk, H, D], v [Tk, H, >= v_dim] whose first v_dim columns
    are the values (where values_padded, D columns, the rest zeros), sequence i owning lens_q[i] query and
    lens_k[i] key rows in order; causal: square sequences, query j sees keys 0..j. Rows of q, k, v may be
    strided; the last dimension must be contiguous. cu: the cumulative lengths as int32 tensors on q's device,
    where the caller has them; out, lse: fp32 [Tq, H, v_dim] and [Tq, H] to write into.
    Returns (out [Tq, H, v_dim] fp32, lse [Tq, H] fp32, the log-sum-exp of each row's scaled scores).

    On an SM90 GPU our kernel (ops.flash_attention, csrc/attention): one launch for any mix of lengths, values of
    128 unpadded. Other CUDA GPUs and sizes: FlashAttention-2's varlen kernel in torch (cuDNN's attention is
    faster than both, but builds a plan of ~64 ms for every new shape, and a serving step's shapes are new at
    every turn: docs/engine.md). The CPU: torch's flash kernel for the CPU, one sequence at a time."""
    Tq, H, D = q.shape
    if q.is_cuda and _own_kernel(q, D, v_dim):
        return flash_attention(q, k, v[..., :v_dim], lens_q, lens_k, causal=causal, scale=scale, cu=cu, out=out,
                               lse=lse)
    if q.is_cuda:
        cu_q, cu_k = cu if cu is not None else cumulative_lengths(lens_q, lens_k, q.device)
        o, l = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), 0.0, causal, False, scale=scale)[:2]
        o, l = o[..., :v_dim], _lse_rows(l, cu_q, Tq, H)
    else:  # the op's CPU path; values padded to D columns (no copy), of whose output v_dim are kept
        o, l = flash_attention(q, k, v, lens_q, lens_k, causal=causal, scale=scale, cu=cu)
        o = o[..., :v_dim]
    if out is None:
        return o.float(), l
    out.copy_(o)
    lse.copy_(l)
    return out, lse


def reference_attention(q, k, v, lens_q, lens_k, causal: bool, scale: float):
    """varlen_attention one sequence at a time with materialised scores, in fp32 or float64 (v: the values
    alone): the tests' reference."""
    Tq, H, _ = q.shape
    out = q.new_empty(Tq, H, v.shape[-1])
    lse = torch.empty(Tq, H, dtype=torch.float32, device=q.device)
    q0 = k0 = 0
    for lq, lk in zip(lens_q, lens_k):
        q1, k1 = q0 + lq, k0 + lk
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1].float(), k[k0:k1].float()) * scale
        if causal:
            scores.masked_fill_(torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # [H, q]
        probs = torch.exp(scores - row_lse[..., None])
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v[k0:k1].float()).to(q.dtype)
        lse[q0:q1] = row_lse.t()
        q0, k0 = q1, k1
    return out, lse


def _lse_rows(lse: torch.Tensor, cu_q: torch.Tensor, Tq: int, H: int) -> torch.Tensor:
    """The flash kernel's log-sum-exps as [Tq, H]: torch's varlen build returns them [H, Tq]; a padded layout
    [batch, H, max_q] (older builds) is unpacked by sequence."""
    if lse.dim() == 2:
        return lse.t()
    seq_of_row = torch.repeat_interleave(torch.arange(cu_q.shape[0] - 1, device=lse.device),
                                         cu_q.diff().long(), output_size=Tq)
    offset = torch.arange(Tq, device=lse.device) - cu_q.long()[seq_of_row]
    return lse[seq_of_row, :, offset]


@dataclass
class QueryRun:
    """Queries rows[0]:rows[1] (in the expanded rows) of batch sequence `seq`, at positions context..context +
    rows[1] - rows[0] - 1: they attend causally among themselves and fully over the `context` keys before."""

    seq: int
    rows: tuple[int, int]
    context: int


def plan_runs(seqs: list[int], q_lens: list[int], kv_lens: list[int], max_run: int) -> list[QueryRun]:
    """The query runs of sequences `seqs` (their new tokens packed in this order), each at most max_run long:
    a sequence's tokens are the last q_lens[n] of its kv_lens[n] keys."""
    runs, row = [], 0
    for n in seqs:
        context = kv_lens[n] - q_lens[n]
        for a in range(0, q_lens[n], max_run):
            size = min(max_run, q_lens[n] - a)
            runs.append(QueryRun(n, (row + a, row + a + size), context + a))
        row += q_lens[n]
    return runs


def plan_calls(run_of: list[int], sizes: list[int], budget: int, *, once: bool = True) -> list[list[int]]:
    """Groups items i (of query run run_of[i], with sizes[i] keys), in order, into calls of at most `budget` keys
    (an item over it alone); with `once`, no run twice in a call (its rows would be written twice)."""
    calls, cur, cur_keys, seen = [], [], 0, set()
    for i, size in enumerate(sizes):
        if cur and (cur_keys + size > budget or (once and run_of[i] in seen)):
            calls.append(cur)
            cur, cur_keys, seen = [], 0, set()
        cur.append(i)
        cur_keys += size
        seen.add(run_of[i])
    if cur:
        calls.append(cur)
    return calls


def plan_pieces(runs: list[QueryRun], num_heads: int, key_budget: int, target_ctas: int) -> list[tuple[int, int, int]]:
    """The context pieces (run index, first key, end key), ordered piece by piece across the runs (every run's
    first piece, then every run's second, ...). A run's context is cut finer than the key budget where its own
    (query tile, head) CTAs could not fill the GPU: the attention kernels do not split the keys, so a run of 64
    queries over 32K keys would give only 32 CTAs (one per head); as pieces in one call it gives up to
    target_ctas (the CTAs the GPU holds at once: 4 pieces of 32 CTAs for 132, not 5, whose 160 would leave a
    second wave of 28), merged afterwards by log-sum-exp."""
    pieces = []
    for i, run in enumerate(runs):
        tiles = -(-(run.rows[1] - run.rows[0]) // TILE_M) * num_heads
        splits = max(1, target_ctas // tiles)
        size = min(key_budget, max(MIN_PIECE_KEYS, min(-(-run.context // splits), key_budget // splits)))
        pieces += [(j, i, a, min(a + size, run.context)) for j, a in enumerate(range(0, run.context, size))]
    return [(i, a, b) for _, i, a, b in sorted(pieces)]


def offsets(lengths: list[int]) -> list[int]:
    """Where consecutive stretches of these lengths start, and the end: [0, l0, l0 + l1, ..., sum]."""
    return list(accumulate(lengths, initial=0))


def row_index(ranges: list[tuple[int, int]], device) -> slice | torch.Tensor:
    """The rows of (start, end) ranges, in order: a slice where each ends where the next starts, else an index
    tensor on `device`."""
    if all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])):
        return slice(ranges[0][0], ranges[-1][1])
    return torch.tensor([r for a, b in ranges for r in range(a, b)]).to(device, non_blocking=True)


class ExpandedPrefill:
    """The expanded-form attention of one MLA layer's prompt sequences (module docstring).

    w_kv: [H, nope + v, C] (kv_b_proj per head); scale: the softmax scale; sms: the GPU's multiprocessors (a
    context call gives the attention kernel as many CTAs as they hold at once: plan_pieces).
    """

    def __init__(self, w_kv: torch.Tensor, nope_dim: int, rope_dim: int, scale: float, sms: int):
        H, nope_v, C = w_kv.shape
        self.num_heads, self.scale = H, scale
        self.v_dim = nope_v - nope_dim
        # One GEMM takes a latent row [c, r] to [k_h | v_h] for every head: k_h = [W_uk[h] c, r] (r through an
        # identity block, exact), v_h = W_uv[h] c, padded with zeros to the key size where the attention kernel
        # needs it (values_padded). Keys and values come out as strided views of its output, with no
        # concatenation or padding pass over them (those passes cost more than the GEMM's extra columns:
        # docs/engine.md).
        D = self.head_dim = nope_dim + rope_dim
        padded = values_padded(w_kv, D, self.v_dim)
        self.value_width = D if padded else self.v_dim
        # CTAs resident per SM: ours 1 (214 KB of shared memory), FlashAttention-2's 2 at these head sizes
        self.target_ctas = sms * (2 if padded else 1)
        # keys per call: each holds its latent row and its expanded keys and values
        self.key_budget = max(1, EXPANDED_BUDGET // (C + rope_dim + H * (D + self.value_width)))
        w = w_kv.new_zeros(H, D + self.value_width, C + rope_dim)
        w[:, :nope_dim, :C] = w_kv[:, :nope_dim]
        w[:, nope_dim:D, C:] = torch.eye(rope_dim, dtype=w.dtype, device=w.device)
        w[:, D : D + self.v_dim, :C] = w_kv[:, nope_dim:]
        self.w_expand = w.view(H * (D + self.value_width), C + rope_dim)

    def _expand(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent rows [K, C + rope] -> keys [K, H, D], values [K, H, value_width] (v_dim, then any zeros), views of
        one GEMM."""
        kv = F.linear(latents, self.w_expand).view(latents.shape[0], self.num_heads, -1)
        return kv[..., : self.head_dim], kv[..., self.head_dim :]

    def __call__(self, q: torch.Tensor, new_latents: torch.Tensor, runs: list[QueryRun], block_tables: torch.Tensor,
                 flat_cache: torch.Tensor, block_size: int) -> torch.Tensor:
        """q [R, H, nope + rope] the runs' queries, packed; new_latents [R, C + rope] their tokens' latents as
        cached; block_tables [N, max_blocks] the batch's; flat_cache [rows, C + rope]. Returns [R, H, v]."""
        R, H, D = q.shape
        device = q.device
        out = torch.empty(R, H, self.v_dim, dtype=torch.float32, device=device)
        lse = torch.empty(R, H, dtype=torch.float32, device=device)

        # the new keys: one causal call per group of whole runs (a run's rows are contiguous, and so are a call's)
        for call in plan_calls(list(range(len(runs))), [r.rows[1] - r.rows[0] for r in runs], self.key_budget):
            r0, r1 = runs[call[0]].rows[0], runs[call[-1]].rows[1]
            lengths = [runs[i].rows[1] - runs[i].rows[0] for i in call]
            k, v = self._expand(new_latents[r0:r1])
            varlen_attention(q[r0:r1], k, v, lengths, lengths, True, self.scale, self.v_dim, out=out[r0:r1],
                             lse=lse[r0:r1])

        # the cached context: pieces of each run's keys (plan_pieces), several to a call, merged by log-sum-exp
        pieces = plan_pieces(runs, H, self.key_budget, self.target_ctas)
        for call in plan_calls([p[0] for p in pieces], [p[2] - p[1] for p in pieces], self.key_budget, once=False):
            self._context_call([pieces[j] for j in call], runs, q, out, lse, block_tables, flat_cache, block_size)
        return out.to(q.dtype)

    def _context_call(self, pieces, runs, q, out, lse, block_tables, flat_cache, block_size) -> None:
        """One attention call over the pieces' keys, each piece with a copy of its run's queries; then the merge, one
        segment (a stretch of pieces holding each run at most once) after another, in order."""
        device = q.device
        key_lens = [b - a for _, a, b in pieces]
        q_lens = [runs[i].rows[1] - runs[i].rows[0] for i, _, _ in pieces]
        P = len(pieces)
        query_rows = [r for i, _, _ in pieces for r in range(*runs[i].rows)]
        whole = query_rows == list(range(q.shape[0]))
        # the two cumulative lengths and the query rows (unless they are q's rows in order) in one copy
        host = offsets(q_lens) + offsets(key_lens) + ([] if whole else query_rows)
        cu_q, cu_k, index = torch.tensor(host, dtype=torch.int32).to(device, non_blocking=True).split(
            [P + 1, P + 1, len(host) - 2 * P - 2])
        latents = gather_paged_rows(flat_cache, block_tables, [(runs[i].seq, a, b - a) for i, a, b in pieces],
                                    block_size)
        k, v = self._expand(latents.to(q.dtype))

        segments, seen = [[]], set()
        for i, _, _ in pieces:
            if i in seen:
                segments.append([])
                seen = set()
            segments[-1].append(i)
            seen.add(i)
        qc = q if whole else q.index_select(0, index)
        o, l = varlen_attention(qc, k, v, q_lens, key_lens, False, self.scale, self.v_dim, cu=(cu_q, cu_k))
        if all(seg == segments[0] for seg in segments):  # the same runs in every segment: one batched merge
            n = len(segments)
            merge_attention(out, lse, row_index([runs[i].rows for i in segments[0]], device),
                            o.view(n, -1, *o.shape[1:]), l.view(n, -1, l.shape[-1]))
            return
        at = 0
        for seg in segments:
            size = sum(runs[i].rows[1] - runs[i].rows[0] for i in seg)
            merge_attention(out, lse, row_index([runs[i].rows for i in seg], device), o[None, at : at + size],
                            l[None, at : at + size])
            at += size

