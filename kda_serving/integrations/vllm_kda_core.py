"""The KDA core of vLLM's Kimi-Linear layer, run by our ops on vLLM's own batch metadata and state tensors.

vLLM's `KimiGatedDeltaNetAttention._forward` takes the packed projections of one step and writes the core
attention output; this module is that computation with vLLM's framework objects reduced to tensors, so it is
testable without vLLM. What vLLM hands over (T tokens this step, P = H * D per projection):

    mixed_qkv    [T, 3P]   q|k|v before the short conv (a column slice of the fused in_proj output)
    g            [1, T, H, D]  raw KDA gate (before A_log/dt_bias activation)
    beta         [1, T, H]     raw beta logits
    conv_state   [S, W-1, 3P]  conv pool ("SD" layout; vLLM's "DS" layout arrives as a transposed view)
    rec_state    [S, H, D, D]  recurrent pool, [V, K] per head (the layout of our ops)
    metadata     GDNAttentionMetadata: decodes first, then prefills; query_start_loc [N+1];
                 state indices [N]; has_initial_state [N] (prefill batches)

Prefill batches (any sequence with more than one new token, or no cached state) run
`causal_conv1d_prefill` + `kda_prefill` in pool mode over the whole batch, with vLLM's query_start_loc as
cu_seqlens; pure decode batches run `causal_conv1d_decode` + `kda_decode`. Both read and write vLLM's pools
in place. Speculative-decode batches are not handled here (the layer falls back to vLLM's own path).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kda_serving.ops import (
    causal_conv1d_decode,
    causal_conv1d_prefill,
    indices_checked_by_caller,
    kda_decode,
    kda_prefill,
)

from .state_pools import run_on_pool


@dataclass(frozen=True)
class VLLMKDABatch:
    """The fields of vLLM's GDNAttentionMetadata that a non-speculative KDA step needs."""

    num_decodes: int  # decode sequences, first in the batch (one token each)
    num_prefills: int  # prefill sequences, after the decodes
    num_tokens: int  # real (unpadded) tokens of those sequences
    query_start_loc: torch.Tensor  # [>= N+1] int32, token offsets of the sequences
    state_indices: torch.Tensor  # [>= N] int32, state slot of each sequence (-1 = padding)
    has_initial_state: torch.Tensor | None  # [>= N] bool for prefill batches, None for pure decode

    @property
    def num_seqs(self) -> int:
        return self.num_decodes + self.num_prefills

    @classmethod
    def from_vllm(cls, m) -> "VLLMKDABatch":
        """Reads a vLLM GDNAttentionMetadata (non-speculative: m.spec_sequence_masks is None)."""
        if m.spec_sequence_masks is not None:
            raise ValueError("kda: argument 'metadata': speculative-decode batches are not supported here")
        return cls(
            num_decodes=int(m.num_decodes),
            num_prefills=int(m.num_prefills),
            num_tokens=int(m.num_decode_tokens) + int(m.num_prefill_tokens),
            query_start_loc=m.non_spec_query_start_loc,
            state_indices=m.non_spec_state_indices_tensor,
            has_initial_state=m.has_initial_state,
        )


@dataclass(frozen=True)
class KimiKDAParams:
    """A Kimi KDA layer's weights as our ops take them."""

    conv_weight: torch.Tensor  # [3P, W] (vLLM stores [3P, 1, W]; pass the view)
    conv_bias: torch.Tensor | None  # [3P] or None
    A_log: torch.Tensor  # [H] fp32
    dt_bias: torch.Tensor  # [H, D] fp32 (vLLM stores [H * D]; pass the view)
    num_heads: int  # H on this rank
    head_dim: int  # D (K == V)
    lower_bound: float | None  # None: softplus gate (Kimi-Linear-48B)


def kimi_kda_core(
    mixed_qkv: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    conv_state: torch.Tensor,
    rec_state: torch.Tensor,
    params: KimiKDAParams,
    batch: VLLMKDABatch,
    out: torch.Tensor,
    log: logging.Logger | None = None,
) -> str:
    """Writes the core attention output of the batch's tokens into out[:num_tokens] ([T, H, D], any strides)
    and updates both pools in place. Returns the path taken: "prefill", "decode" or "empty" (nothing to do).

    The ops do not re-check vLLM's index values (query_start_loc, state indices): vLLM's metadata builder
    made them, its own kernels take them as they are, and reading them on the host would synchronise with
    the GPU four times per layer (ops.indices_checked_by_caller)."""
    with indices_checked_by_caller():
        return _kimi_kda_core(mixed_qkv, g, beta, conv_state, rec_state, params, batch, out, log)


def _kimi_kda_core(mixed_qkv, g, beta, conv_state, rec_state, params: KimiKDAParams, batch: VLLMKDABatch,
                   out: torch.Tensor, log: logging.Logger | None) -> str:
    N, T = batch.num_seqs, batch.num_tokens
    H, D = params.num_heads, params.head_dim
    P = H * D
    if mixed_qkv.dim() != 2 or mixed_qkv.shape[1] != 3 * P or mixed_qkv.shape[0] < T:
        raise ValueError(f"kda: argument 'mixed_qkv': expected shape (>= {T}, {3 * P}), got {tuple(mixed_qkv.shape)}")
    if N == 0 or T == 0:
        return "empty"
    idx = batch.state_indices[:N]
    x = mixed_qkv[:T].contiguous()
    gate = g[:, :T].contiguous()
    logits = beta[:, :T].contiguous()
    if batch.num_prefills > 0:
        cu_seqlens = batch.query_start_loc[: N + 1]
        has_init = None if batch.has_initial_state is None else batch.has_initial_state[:N]
        y = run_on_pool(
            conv_state, idx,
            lambda pool, slots: causal_conv1d_prefill(
                x, params.conv_weight, params.conv_bias, cu_seqlens, pool, slots, has_init, activation="silu"
            ),
            log,
        )
        q, k, v = (y[:, i * P:(i + 1) * P].reshape(1, T, H, D).contiguous() for i in range(3))
        o = run_on_pool(
            rec_state, idx,
            lambda pool, slots: kda_prefill(
                q, k, v, gate, logits, params.A_log, params.dt_bias, lower_bound=params.lower_bound,
                cu_seqlens=cu_seqlens, state_pool=pool, state_indices=slots, has_initial_state=has_init,
            ).out,
            log,
        )
        out[:T].copy_(o[0])
        return "prefill"
    if T != N:
        raise ValueError(f"kda: argument 'metadata': a decode batch needs one token per sequence, got {T} for {N}")
    y = run_on_pool(
        conv_state, idx,
        lambda pool, slots: causal_conv1d_decode(
            x, params.conv_weight, params.conv_bias, pool, slots, activation="silu"
        ),
        log,
    )
    q, k, v = (y[:, i * P:(i + 1) * P].reshape(N, 1, H, D).contiguous() for i in range(3))
    o = run_on_pool(
        rec_state, idx,
        lambda pool, slots: kda_decode(
            q, k, v, gate.view(N, 1, H, D), logits.view(N, 1, H), params.A_log, params.dt_bias, pool, slots,
            lower_bound=params.lower_bound,
        ),
        log,
    )
    out[:T].copy_(o.view(N, H, D))
    return "decode"
