"""Public KDA ops: prefill, decode and the FlashKDA-compatible entry point.

Each public function validates its arguments against the contract (docs/kda-contract.md), allocates its
outputs and calls a torch custom op (`torch.ops.kda_serving.*`) that writes them in place. The custom ops have
fake implementations, so torch.compile traces through them, and their CUDA implementations neither allocate
nor synchronise, so they can be captured in CUDA graphs. CPU tensors run the chunked PyTorch path
(kda_serving/ops/chunked.py); CUDA tensors run the kernels in csrc/ through kda_serving/ops/cuda_lib.py.

Example (varlen prefill of two sequences into a state pool, then one decode step):

    >>> H, K = 4, 128
    >>> q = k = torch.randn(1, 300, H, K, dtype=torch.bfloat16, device="cuda")
    >>> pool = torch.zeros(8, H, K, K, device="cuda")               # [S, H, V, K]
    >>> slots = torch.tensor([5, 2], device="cuda")
    >>> out, _ = kda_prefill(q, k, v, g, beta, A_log, dt_bias, cu_seqlens=torch.tensor([0, 100, 300]),
    ...                      state_pool=pool, state_indices=slots)    # pool[5], pool[2] now hold the states
    >>> o = kda_decode(q1, k1, v1, g1, beta1, A_log, dt_bias, pool, slots)   # q1: [2, 1, H, K]
"""

from __future__ import annotations

from typing import Optional

import torch

from .chunked import chunked_scan, cpu_step, scan_packed
from .contract import (
    PAD_SLOT,
    KDACheckpoints,
    validate_decode_args,
    validate_kda_args,
    validate_scale,
)
from .layout import (
    from_padded,
    gather_initial_states,
    padded_entries,
    scatter_final_states,
    sequence_lengths,
    to_padded,
)
from .reference import KDAOutput, prepare_inputs

Tensor = torch.Tensor


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------- prefill op
@torch.library.custom_op("kda_serving::kda_prefill_", mutates_args=("out", "final_state", "state_pool"))
def _kda_prefill_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, A_log: Tensor, dt_bias: Tensor,
    scale: float, lower_bound: Optional[float], cu_seqlens: Optional[Tensor], initial_state: Optional[Tensor],
    final_state: Optional[Tensor], state_pool: Optional[Tensor], state_indices: Optional[Tensor],
    has_initial_state: Optional[Tensor], ckpt_seq: Optional[Tensor], ckpt_pos: Optional[Tensor],
    ckpt_slot: Optional[Tensor], out: Tensor,
) -> None:
    """CPU implementation (the CUDA one is registered below). Writes out, final_state and the pool."""
    ckpt = KDACheckpoints(ckpt_seq, ckpt_pos, ckpt_slot) if ckpt_seq is not None else None
    problem = validate_kda_args(
        q, k, v, g, beta, A_log, dt_bias, scale=scale, lower_bound=lower_bound, cu_seqlens=cu_seqlens,
        initial_state=initial_state, state_pool=state_pool, state_indices=state_indices,
        has_initial_state=has_initial_state, checkpoints=ckpt, cuda_kernel=False,
    )
    dtype = _compute_dtype(q)
    qn, kn, vv, a, b = prepare_inputs(q, k, v, g, beta, A_log, dt_bias, lower_bound, dtype)
    lens = sequence_lengths(problem, cu_seqlens)
    S0 = gather_initial_states(problem, initial_state, state_pool, state_indices, has_initial_state, dtype, q.device)
    if ckpt is not None:
        ckpt = KDACheckpoints(*(t.detach().cpu().long() for t in ckpt))
    pad = padded_entries(problem, state_indices)
    if problem.varlen:  # packed sequences of any lengths, in groups of like ones
        o, S, ckpt_states = scan_packed(*(x[0] for x in (qn, kn, vv, a, b)), S0, scale, lens.tolist(), ckpt)
        if pad is not None:
            o[torch.repeat_interleave(pad, lens)] = 0
        out.copy_(o.unsqueeze(0))
    else:  # a dense batch: every sequence of the same length
        tmax = int(lens.max()) if lens.numel() else 0
        o, S, ckpt_states = chunked_scan(*(to_padded(x, problem, lens, tmax) for x in (qn, kn, vv, a, b)), S0, scale,
                                         lens, ckpt)
        if pad is not None:
            o[pad] = 0
        out.copy_(from_padded(o, problem, lens))
    if final_state is not None:
        final_state.copy_(S)
    if problem.state_mode == "pool":
        scatter_final_states(problem, S, state_pool, state_indices)
        if ckpt is not None:
            state_pool[ckpt.slot] = ckpt_states.to(state_pool.dtype)


@_kda_prefill_op.register_kernel("cuda")
def _kda_prefill_cuda(q, k, v, g, beta, A_log, dt_bias, scale, lower_bound, cu_seqlens, initial_state,
                      final_state, state_pool, state_indices, has_initial_state, ckpt_seq, ckpt_pos, ckpt_slot, out):
    from . import cuda_lib

    cuda_lib.prefill(q, k, v, g, beta, A_log, dt_bias, scale, lower_bound, cu_seqlens, initial_state, final_state,
                     state_pool, state_indices, has_initial_state, ckpt_seq, ckpt_pos, ckpt_slot, out)


@_kda_prefill_op.register_fake
def _(*args, **kwargs) -> None:
    return None


def kda_prefill(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    A_log: Tensor,
    dt_bias: Tensor,
    *,
    scale: float | None = None,
    lower_bound: float | None = None,
    cu_seqlens: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    state_pool: Tensor | None = None,
    state_indices: Tensor | None = None,
    has_initial_state: Tensor | None = None,
    checkpoints: KDACheckpoints | None = None,
) -> KDAOutput:
    """KDA prefill (docs/kda-contract.md).

    Args:
        q, k, g: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H] logits. bf16 on CUDA.
        A_log: [H] fp32; dt_bias: [H, K] fp32; lower_bound: float in [-5, 0) or None (softplus gate).
        cu_seqlens: [N + 1] int32/int64 with B == 1 for variable-length sequences.
        initial_state / output_final_state: dense states [N, H, V, K] (bf16 or fp32).
        state_pool, state_indices [N], has_initial_state [N]: pool mode, read and written in place.
        checkpoints: KDACheckpoints(seq, pos, slot) — also store the state after `pos` tokens (pool mode).
    Returns:
        KDAOutput(out [B, T, H, V] in q's dtype, final_state [N, H, V, K] or None).
    """
    problem = validate_kda_args(
        q, k, v, g, beta, A_log, dt_bias, scale=scale, lower_bound=lower_bound, cu_seqlens=cu_seqlens,
        initial_state=initial_state, state_pool=state_pool, state_indices=state_indices,
        has_initial_state=has_initial_state, checkpoints=checkpoints,
    )
    if not isinstance(output_final_state, bool):
        raise TypeError("kda: argument 'output_final_state': expected a bool")
    if output_final_state and problem.state_mode == "pool":
        raise ValueError("kda: argument 'output_final_state': pool mode writes final states into state_pool")
    scale = validate_scale(scale, problem.key_dim)
    out = torch.empty_like(v)
    final_state = None
    if output_final_state:
        dtype = initial_state.dtype if initial_state is not None else torch.float32
        final_state = torch.empty(
            (problem.num_seqs, problem.heads, problem.value_dim, problem.key_dim), dtype=dtype, device=q.device
        )
    ck = checkpoints if checkpoints is not None else (None, None, None)
    torch.ops.kda_serving.kda_prefill_(
        q, k, v, g, beta, A_log, dt_bias, scale, None if lower_bound is None else float(lower_bound), cu_seqlens,
        initial_state, final_state, state_pool, state_indices, has_initial_state, *ck, out,
    )
    return KDAOutput(out, final_state)


def flash_kda_fwd(q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state=None, final_state=None,
                  cu_seqlens=None) -> None:
    """Drop-in for FlashKDA's `flash_kda.fwd`: same arguments, writes `out` [B, T, H, V] and, when given,
    `final_state` [N, H, V, K] in place. Unlike FlashKDA it also accepts lower_bound=None (softplus gate)."""
    problem = validate_kda_args(
        q, k, v, g, beta, A_log, dt_bias, scale=scale, lower_bound=lower_bound, cu_seqlens=cu_seqlens,
        initial_state=initial_state,
    )
    if not isinstance(out, torch.Tensor) or out.shape != v.shape or out.dtype != v.dtype or out.device != v.device:
        raise ValueError(f"kda: argument 'out': expected a tensor like v {tuple(v.shape)} {v.dtype}")
    if not out.is_contiguous():
        raise ValueError("kda: argument 'out': must be contiguous")
    if final_state is not None:
        want = (problem.num_seqs, problem.heads, problem.value_dim, problem.key_dim)
        if not isinstance(final_state, torch.Tensor) or tuple(final_state.shape) != want:
            raise ValueError(f"kda: argument 'final_state': expected shape {want}")
        if final_state.dtype not in (torch.float32, torch.bfloat16) or not final_state.is_contiguous():
            raise TypeError("kda: argument 'final_state': must be a contiguous bf16 or fp32 tensor")
    scale = validate_scale(scale, problem.key_dim)
    torch.ops.kda_serving.kda_prefill_(
        q, k, v, g, beta, A_log, dt_bias, scale, None if lower_bound is None else float(lower_bound), cu_seqlens,
        initial_state, final_state, None, None, None, None, None, None, out,
    )


# ------------------------------------------------------------------------------------------------ decode op
@torch.library.custom_op("kda_serving::kda_decode_", mutates_args=("out", "state_pool"))
def _kda_decode_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, A_log: Tensor, dt_bias: Tensor, scale: float,
    lower_bound: Optional[float], state_pool: Tensor, state_indices: Tensor, intermediate_slots: Optional[Tensor],
    out: Tensor, visit_order: Optional[Tensor] = None,
) -> None:
    """CPU implementation: the recurrence, one token at a time, batched over the sequences that have a slot
    (padded entries get zero output). States are gathered once, stepped, and scattered back. The visit order
    only schedules the CUDA kernel's memory traffic: the results do not depend on it."""
    dtype = _compute_dtype(q)
    qn, kn, vv, a, b = prepare_inputs(q, k, v, g, beta, A_log, dt_bias, lower_bound, dtype)
    idx = state_indices.long()
    rows = (idx != PAD_SLOT).nonzero().squeeze(1)
    if len(rows) < len(idx):
        out.zero_()
        qn, kn, vv, a, b = (x[rows] for x in (qn, kn, vv, a, b))
    slots = idx[rows]
    S = state_pool.index_select(0, slots).to(dtype)
    for t in range(q.shape[1]):
        S, o_t = cpu_step(S, qn[:, t], kn[:, t], vv[:, t], a[:, t], b[:, t], scale)
        out[rows, t] = o_t.to(out.dtype)
        if intermediate_slots is not None:
            inter = intermediate_slots[rows, t].long()
            keep = inter != PAD_SLOT
            state_pool.index_copy_(0, inter[keep], S[keep].to(state_pool.dtype))
    if intermediate_slots is None:
        state_pool.index_copy_(0, slots, S.to(state_pool.dtype))


@_kda_decode_op.register_kernel("cuda")
def _kda_decode_cuda(q, k, v, g, beta, A_log, dt_bias, scale, lower_bound, state_pool, state_indices,
                     intermediate_slots, out, visit_order=None):
    from . import cuda_decode

    cuda_decode.decode(q, k, v, g, beta, A_log, dt_bias, scale, lower_bound, state_pool, state_indices,
                       intermediate_slots, out, visit=visit_order)


@_kda_decode_op.register_fake
def _(*args, **kwargs) -> None:
    return None


def kda_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    A_log: Tensor,
    dt_bias: Tensor,
    state_pool: Tensor,
    state_indices: Tensor,
    *,
    scale: float | None = None,
    lower_bound: float | None = None,
    intermediate_slots: Tensor | None = None,
    visit_order: Tensor | None = None,
) -> Tensor:
    """T new tokens for each of N sequences with states in a pool, updated in place.

    Args:
        q, k, g: [N, T, H, K]; v: [N, T, H, V]; beta: [N, T, H] logits (T == 1 for plain decode).
        state_pool: [S, H, V, K] bf16/fp32; state_indices: [N] (-1 = padding: no read, no write, zero output).
        intermediate_slots: [N, T] or None. When given, the state after token t goes to
            state_pool[intermediate_slots[n, t]] and state_pool[state_indices[n]] is only read (speculative
            verification keeps the slot of the last accepted token).
        visit_order: [N, 2] int32 or None: (sequence, its slot) pairs in the order the CUDA kernel takes the
            sequences, from slot_visit_order(state_indices). The results are the same in any order; by
            increasing slot the state streams faster (docs/decode-kernel.md, "Visit order").
    Returns:
        out [N, T, H, V] in q's dtype.
    """
    problem = validate_decode_args(
        q, k, v, g, beta, A_log, dt_bias, state_pool, state_indices, scale=scale, lower_bound=lower_bound,
        intermediate_slots=intermediate_slots, visit_order=visit_order,
    )
    scale = validate_scale(scale, problem.key_dim)
    out = torch.empty_like(v)
    torch.ops.kda_serving.kda_decode_(
        q, k, v, g, beta, A_log, dt_bias, scale, None if lower_bound is None else float(lower_bound), state_pool,
        state_indices, intermediate_slots, out, visit_order,
    )
    return out


def slot_visit_order(state_indices: Tensor) -> Tensor:
    """The visit order of kda_decode for these slots: int32 [N, 2] (sequence, slot) pairs by increasing slot
    (padded entries, -1, first), on state_indices' device. Computed where the indices live: a caller that
    builds them on the host (the engine) sorts there and copies the pairs along with them."""
    slots = state_indices.detach().reshape(-1).to(torch.int64)
    order = torch.argsort(slots, stable=True)
    return torch.stack((order, slots[order]), dim=1).to(torch.int32)
