"""KDA prefill ("extend") and decode for SGLang's linear-attention backend, on kda-serving's ops.

SGLang's KDAAttnBackend runs the short conv itself and hands its KDA kernel (a LinearAttnKernelBase) the
conv outputs and the raw gate/beta; this module is what our kernel does with them, reduced to tensors so it
is testable without SGLang. Shapes as SGLang passes them (T new tokens, N sequences, H heads, K == V):

    extend:  q, k, v [1, T, H, K] (column views of the conv output), g [1, T, H, K] raw gate,
             beta [1, T, H] raw logits (SGLang passes beta_is_raw=True)
    decode:  q, k, v [1, N, H, K], a raw gate [N, H * K] (or [N, H, K]), b raw logits [1, N, H]
    both:    ssm_states [S, H, V, K] pool (updated in place), cache_indices [N] (-1 = padding),
             query_start_loc [N+1], A_log [H] (any shape with H values), dt_bias [H * K], lower_bound

Both return the output [1, T, H, V]. Every sequence in an extend batch starts from its pool slot: SGLang
resets the slot of a new request before its first extend, and a request that continues (chunked prefill or a
prefix-cache hit) has its state there. The ops take SGLang's indices as SGLang's own kernels do, without
reading them back on the host (ops.indices_checked_by_caller): that would synchronise with the GPU per call.
"""

from __future__ import annotations

import torch

from kda_serving.ops import indices_checked_by_caller, kda_decode, kda_prefill

from .state_pools import run_on_pool


def _gate_params(A_log: torch.Tensor, dt_bias: torch.Tensor, H: int, K: int):
    return A_log.reshape(H).float().contiguous(), dt_bias.reshape(H, K).float().contiguous()


def sglang_extend(q, k, v, g, beta, *, ssm_states, cache_indices, query_start_loc, A_log, dt_bias,
                  lower_bound=None, beta_is_raw=True) -> torch.Tensor:
    """Varlen prefill of the batch from (and back into) the pool. Returns o [1, T, H, V]."""
    if not beta_is_raw:
        raise ValueError("kda: argument 'beta_is_raw': kda-serving applies the beta sigmoid itself; pass raw beta")
    _, T, H, K = q.shape
    A, bias = _gate_params(A_log, dt_bias, H, K)
    tensors = [t.contiguous() for t in (q, k, v, g.reshape(1, T, H, K), beta.reshape(1, T, H))]
    with indices_checked_by_caller():  # not read back on the host (module docstring)
        return run_on_pool(
            ssm_states, cache_indices,
            lambda pool, slots: kda_prefill(*tensors, A, bias, lower_bound=lower_bound,
                                            cu_seqlens=query_start_loc, state_pool=pool, state_indices=slots).out,
        )


def sglang_decode(q, k, v, a, b, *, ssm_states, cache_indices, query_start_loc, A_log, dt_bias,
                  lower_bound=None) -> torch.Tensor:
    """One token per sequence. Returns o [1, N, H, V]."""
    _, N, H, K = q.shape
    if query_start_loc.numel() != N + 1 or cache_indices.numel() != N:
        raise ValueError(f"kda: argument 'query_start_loc': decode needs one token for each of {N} sequences")
    A, bias = _gate_params(A_log, dt_bias, H, K)
    q1, k1, v1 = (t.reshape(N, 1, H, t.shape[-1]).contiguous() for t in (q, k, v))
    gate = a.reshape(N, 1, H, K).contiguous()
    logits = b.reshape(N, 1, H).contiguous()
    with indices_checked_by_caller():
        o = run_on_pool(
            ssm_states, cache_indices,
            lambda pool, slots: kda_decode(q1, k1, v1, gate, logits, A, bias, pool, slots, lower_bound=lower_bound),
        )
    return o.view(1, N, H, o.shape[-1])
