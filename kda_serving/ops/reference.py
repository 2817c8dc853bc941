"""The ground truth: KDA as a token-by-token recurrence, evaluated in float64.

Slow but obviously right: every other backend is tested against `kda_recurrent_reference`. It runs on the
inputs' device (float64 on a GPU is fine for large reference runs) and never modifies its arguments: in pool
mode it returns the final states instead of writing them back.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .contract import KDACheckpoints, gate_activation, l2_normalize, validate_kda_args, validate_scale
from .layout import from_padded, gather_initial_states, padded_entries, sequence_lengths, to_padded


class KDAOutput(NamedTuple):
    out: torch.Tensor  # [B, T, H, V]
    final_state: torch.Tensor | None  # [N, H, V, K]


class ReferenceOutput(NamedTuple):
    out: torch.Tensor  # [B, T, H, V] float64
    final_state: torch.Tensor  # [N, H, V, K] float64, whatever the state mode
    checkpoint_states: torch.Tensor | None = None  # [M, H, V, K] float64, with checkpoints


def prepare_inputs(q, k, v, g, beta, A_log, dt_bias, lower_bound, dtype):
    """The op's pre-processing: L2-normalised q/k, log-decay a <= 0, beta after sigmoid, all in `dtype`."""
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    a = gate_activation(g, A_log.to(dtype), dt_bias.to(dtype), lower_bound)
    return l2_normalize(q), l2_normalize(k), v, a, torch.sigmoid(beta)


def recurrent_step(S, q_t, k_t, v_t, a_t, b_t, scale):
    """One token for a batch of states. S [n, H, V, K]; q_t, k_t, a_t [n, H, K]; v_t [n, H, V]; b_t [n, H].
    Returns the new states (S itself is not modified) and o [n, H, V]:
        S' = S diag(exp(a)),   u = b (v - S' k),   S'' = S' + u k^T,   o = scale S'' q
    as batched matrix products over the n * H heads; the decayed copy is the only [n, H, V, K] temporary,
    and the rank-1 update lands in it in place (the CPU ops run this, so it is what the embedded model's
    decode and prefill cost)."""
    n, H, V, K = S.shape
    S = (S * a_t.exp().unsqueeze(-2)).contiguous()
    heads = S.view(n * H, V, K)
    kv = torch.bmm(heads, k_t.reshape(n * H, K, 1))
    u = b_t.reshape(n * H, 1, 1) * (v_t.reshape(n * H, V, 1) - kv)
    heads.baddbmm_(u, k_t.reshape(n * H, 1, K))
    o = scale * torch.bmm(heads, q_t.reshape(n * H, K, 1))
    return S, o.view(n, H, V)


def recurrent_scan(q, k, v, a, b, S, scale, lens, checkpoints=None):
    """Padded layout [N, Tmax, ...]; padding tokens must be inert. Returns (o, S_final, checkpoint_states)."""
    N, tmax = q.shape[:2]
    o = torch.empty((*v.shape[:3], v.shape[3]), dtype=v.dtype, device=v.device)
    wanted: dict[int, list[tuple[int, int]]] = {}
    if checkpoints is not None:
        for m, (n, p) in enumerate(zip(checkpoints.seq.tolist(), checkpoints.pos.tolist())):
            wanted.setdefault(p - 1, []).append((m, n))
    ckpt = S.new_zeros((len(checkpoints.seq), *S.shape[1:])) if checkpoints is not None else None
    for t in range(tmax):
        S, o[:, t] = recurrent_step(S, q[:, t], k[:, t], v[:, t], a[:, t], b[:, t], scale)
        for m, n in wanted.get(t, ()):
            ckpt[m] = S[n]
    return o, S, ckpt


def kda_recurrent_reference(
    q,
    k,
    v,
    g,
    beta,
    A_log,
    dt_bias,
    *,
    scale=None,
    lower_bound=None,
    cu_seqlens=None,
    initial_state=None,
    output_final_state=False,
    state_pool=None,
    state_indices=None,
    has_initial_state=None,
    checkpoints: KDACheckpoints | None = None,
) -> ReferenceOutput:
    """KDA forward per docs/kda-contract.md in float64. Returns float64 out [B, T, H, V], the final states
    [N, H, V, K] (always, whatever the state mode; zero for padded pool entries) and, with `checkpoints`,
    the states at the checkpoint positions [M, H, V, K]. Arguments are never modified."""
    problem = validate_kda_args(
        q, k, v, g, beta, A_log, dt_bias, scale=scale, lower_bound=lower_bound, cu_seqlens=cu_seqlens,
        initial_state=initial_state, state_pool=state_pool, state_indices=state_indices,
        has_initial_state=has_initial_state, checkpoints=checkpoints, cuda_kernel=False,
    )
    scale = validate_scale(scale, problem.key_dim)
    f64 = torch.float64
    qn, kn, v64, a, b = prepare_inputs(q, k, v, g, beta, A_log, dt_bias, lower_bound, f64)
    lens = sequence_lengths(problem, cu_seqlens)
    tmax = int(lens.max()) if lens.numel() else 0
    padded = [to_padded(x, problem, lens, tmax) for x in (qn, kn, v64, a, b)]
    S0 = gather_initial_states(problem, initial_state, state_pool, state_indices, has_initial_state, f64, q.device)
    ckpt = None
    if checkpoints is not None:
        ckpt = KDACheckpoints(*(t.detach().cpu().long() for t in checkpoints))
    o, S, ckpt_states = recurrent_scan(*padded, S0, scale, lens, ckpt)
    pad = padded_entries(problem, state_indices)
    if pad is not None:
        o[pad.to(o.device)] = 0
        S[pad.to(S.device)] = 0
    return ReferenceOutput(from_padded(o, problem, lens), S, ckpt_states)
