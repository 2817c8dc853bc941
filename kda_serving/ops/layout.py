"""Moving between the contract's token layouts and a padded per-sequence layout, and gathering states.

The CPU backends compute on a padded layout: N sequences of up to Tmax tokens, [N, Tmax, H, D]. Padding
tokens are made inert (k = v = 0, beta = 0, decay 0), so they never change a state and the state after the
padding equals the state after the last real token. These helpers convert both ways and read/write the
initial and final states for the dense and pool modes.
"""

from __future__ import annotations

import torch

from .contract import PAD_SLOT, KDAProblem


def sequence_lengths(problem: KDAProblem, cu_seqlens) -> torch.Tensor:
    """[N] int64 lengths on the CPU."""
    if problem.varlen:
        return cu_seqlens.detach().cpu().long().diff()
    return torch.full((problem.batch,), problem.tokens, dtype=torch.long)


def to_padded(x: torch.Tensor, problem: KDAProblem, lens: torch.Tensor, tmax: int) -> torch.Tensor:
    """[B, T, ...] (or varlen [1, T, ...]) -> [N, tmax, ...], zero padded."""
    if not problem.varlen:
        if tmax == problem.tokens:
            return x
        pad = x.new_zeros((x.shape[0], tmax - x.shape[1], *x.shape[2:]))
        return torch.cat([x, pad], dim=1)
    flat = x[0]
    out = x.new_zeros((problem.num_seqs, tmax, *x.shape[2:]))
    seq_id, offset = _token_owner(lens)
    out[seq_id, offset] = flat
    return out


def from_padded(y: torch.Tensor, problem: KDAProblem, lens: torch.Tensor) -> torch.Tensor:
    """[N, tmax, ...] -> [B, T, ...] (inverse of to_padded)."""
    if not problem.varlen:
        return y[:, : problem.tokens]
    seq_id, offset = _token_owner(lens)
    return y[seq_id, offset].unsqueeze(0)


def _token_owner(lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed tokens: which sequence owns each one, and its offset within that sequence."""
    seq_id = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    starts = torch.cumsum(lens, 0) - lens
    offset = torch.arange(int(lens.sum())) - starts[seq_id]
    return seq_id, offset


def gather_initial_states(
    problem: KDAProblem, initial_state, state_pool, state_indices, has_initial_state, dtype, device
) -> torch.Tensor:
    """[N, H, V, K] starting states in `dtype` (zeros where there is none)."""
    N, H, V, K = problem.num_seqs, problem.heads, problem.value_dim, problem.key_dim
    if problem.state_mode == "dense" and initial_state is not None:
        return initial_state.to(device=device, dtype=dtype)
    S0 = torch.zeros((N, H, V, K), dtype=dtype, device=device)
    if problem.state_mode == "pool":
        idx = state_indices.long().to(state_pool.device)
        use = idx != PAD_SLOT
        if has_initial_state is not None:
            use = use & has_initial_state.to(idx.device)
        if bool(use.any()):
            S0[use.to(device)] = state_pool[idx[use]].to(device=device, dtype=dtype)
    return S0


def scatter_final_states(problem: KDAProblem, S: torch.Tensor, state_pool, state_indices) -> None:
    """Writes final states [N, H, V, K] back to their pool slots, in place (padding entries skipped)."""
    idx = state_indices.long().to(state_pool.device)
    use = idx != PAD_SLOT
    if bool(use.any()):
        state_pool[idx[use]] = S[use.to(S.device)].to(device=state_pool.device, dtype=state_pool.dtype)


def padded_entries(problem: KDAProblem, state_indices) -> torch.Tensor | None:
    """[N] bool, True for PAD_SLOT entries (their outputs must be zero), or None when there are none."""
    if problem.state_mode != "pool":
        return None
    pad = state_indices.long() == PAD_SLOT
    return pad if bool(pad.any()) else None
