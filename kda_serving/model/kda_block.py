"""The Kimi Delta Attention token mixer: projections, short convolution, the KDA recurrence, gated output norm.

Per token x [hidden]:  q, k, v = silu(causal_conv(W_q x, W_k x, W_v x));  g = f_b(f_a(x)) (raw forget gate);
beta = b(x) (logits); o = KDA(q, k, v, g, beta; A_log, dt_bias) per head; y = o_proj(rmsnorm(o) * sigmoid(g_b(g_a(x)))).
The gate activation (softplus form) and sigmoid(beta) are applied inside kda_prefill/kda_decode, so the raw
projections go straight to the op. The six projections that read x are stored as one matrix and run as one
matmul; the loader fills its row blocks from the checkpoint's separate tensors. f_b and g_b likewise: stored as
one [2, D, K] tensor, they run as one batched matmul over f_a(x) | g_a(x), adjacent in the first one's output
(at one token two cuBLAS GEMVs of 1 MB cost ~4.5 us each, launch-bound; H200, docs/engine.md). The
projections go through ops.linear: our matrix-vector kernel at steps of 1-8 tokens (every projection here at
0.5-0.9x cuBLAS's time), cuBLAS for longer steps (docs/gemv.md).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import (causal_conv1d_decode, causal_conv1d_prefill, causal_conv1d_verify, gated_rms_norm, kda_decode,
                   kda_prefill, linear)
from ..ops.contract import KDACheckpoints
from .batch import RaggedBatch, SpecVerify
from .config import ModelConfig


def _param(*shape: int, dtype: torch.dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class KDABlock(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device):
        super().__init__()
        H, K, D = cfg.linear_num_heads, cfg.linear_head_dim, cfg.kda_dim
        self.num_heads, self.head_dim, self.dim = H, K, D
        self.eps = cfg.rms_norm_eps
        # rows: q | k | v (D each) | f_a (K) | g_a (K) | b (H)
        self.in_proj = _param(3 * D + 2 * K + H, cfg.hidden_size, dtype=dtype, device=device)
        self.conv_weight = _param(3 * D, cfg.conv_kernel_size, dtype=dtype, device=device)  # [3D, W]
        self.fg_b_proj = _param(2, D, K, dtype=dtype, device=device)  # f_b_proj, g_b_proj
        self.A_log = _param(H, dtype=torch.float32, device=device)
        self.dt_bias = _param(H, K, dtype=torch.float32, device=device)
        self.o_norm = _param(K, dtype=dtype, device=device)
        self.o_proj = _param(cfg.hidden_size, D, dtype=dtype, device=device)

    def forward(
        self, x: torch.Tensor, batch: RaggedBatch, state_pool: torch.Tensor, conv_pool: torch.Tensor
    ) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; state_pool [S, H, V, K] and conv_pool [S, W-1, 3D] updated in place."""
        inputs = self.project(x)
        return self.finish(self.mix(inputs, batch, state_pool, conv_pool), inputs)

    # forward in three parts: project and finish see only the tokens (a piecewise CUDA graph captures them per
    # token count, engine/prompt_graphs.py); mix reads the batch's sequences and states.

    def project(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The projections of x [T, hidden]: conv inputs "qkv" [T, 3D], raw forget gate "g" [T, H, K], beta
        logits "beta" [T, H], and the output gate's logits "gate" [T, H, K]."""
        T, H, K = x.shape[0], self.num_heads, self.head_dim
        mixed, fg_a, beta = linear(x, self.in_proj).split((3 * self.dim, 2 * K, H), dim=-1)
        # [2, T, K] @ [2, D, K]^T: f_b(f_a) and g_b(g_a) in one batched matmul
        g, gate = linear(fg_a.view(T, 2, K).transpose(0, 1), self.fg_b_proj)
        return {"qkv": mixed.contiguous(), "g": g.view(T, H, K), "beta": beta.contiguous(),
                "gate": gate.view(T, H, K)}

    @property
    def mix_shape(self) -> tuple[int, int]:
        """mix's output per token: [H, V]."""
        return self.num_heads, self.head_dim

    def mix(self, inputs: dict[str, torch.Tensor], batch: RaggedBatch, state_pool: torch.Tensor,
            conv_pool: torch.Tensor) -> torch.Tensor:
        """The short convolution and the KDA recurrence of every sequence: out [T, H, V]."""
        mixed, g, beta = inputs["qkv"], inputs["g"], inputs["beta"]
        spec = batch.spec
        if spec is None:
            return self._mix(mixed, g, beta, batch, state_pool, conv_pool)
        # the verifying sequences come first, the rest run as usual
        tv = spec.num_tokens
        out = self._verify(mixed[:tv], g[:tv], beta[:tv], batch.state_slots[: spec.num_seqs], spec, state_pool,
                           conv_pool)
        if spec.rest is not None:
            out = torch.cat((out, self._mix(mixed[tv:], g[tv:], beta[tv:], spec.rest, state_pool, conv_pool)))
        return out

    def finish(self, out: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The gated output norm and o_proj: out [T, H, V] -> [T, hidden]."""
        T = out.shape[0]
        out = gated_rms_norm(out, inputs["gate"], self.o_norm, self.eps)
        return linear(out.reshape(T, self.dim), self.o_proj)

    def _mix(self, mixed, g, beta, batch: RaggedBatch, state_pool, conv_pool) -> torch.Tensor:
        """Conv and KDA core of a batch without verifying sequences: out [T, H, V]."""
        T, H, K = mixed.shape[0], self.num_heads, self.head_dim
        if batch.is_decode:
            mixed = causal_conv1d_decode(mixed, self.conv_weight, None, conv_pool, batch.state_slots, split=3)
        else:
            if batch.checkpoints is not None:
                self._checkpoint_conv_states(mixed, batch, conv_pool)
            mixed = causal_conv1d_prefill(
                mixed, self.conv_weight, None, batch.cu_seqlens, conv_pool, batch.state_slots,
                batch.has_initial_state, split=3,
            )
        q, k, v = mixed.view(3, T, H, K).unbind(0)  # the conv wrote q, k and v as contiguous parts
        if batch.is_decode:
            return kda_decode(
                q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], self.A_log, self.dt_bias,
                state_pool, batch.state_slots, visit_order=batch.state_visit,
            ).view(T, H, K)
        ckpt = batch.checkpoints
        return kda_prefill(
            q[None], k[None], v[None], g[None], beta[None], self.A_log, self.dt_bias,
            cu_seqlens=batch.cu_seqlens, state_pool=state_pool, state_indices=batch.state_slots,
            has_initial_state=batch.has_initial_state,
            checkpoints=None if ckpt is None else KDACheckpoints(ckpt.seq, ckpt.pos, ckpt.slot),
        ).out.view(T, H, K)

    def _verify(self, mixed, g, beta, slots, spec: SpecVerify, state_pool, conv_pool) -> torch.Tensor:
        """Speculative verification: N sequences of W tokens each, every state after every token kept in
        spec.out_slots (the conv window and the recurrent state alike); out [N * W, H, V]."""
        N, W, H, K = spec.num_seqs, spec.width, self.num_heads, self.head_dim
        mixed = causal_conv1d_verify(mixed.view(N, W, -1), self.conv_weight, None, conv_pool, slots,
                                     spec.out_slots, split=3)
        q, k, v = mixed.view(3, N, W, H, K).unbind(0)
        return kda_decode(q, k, v, g.view(N, W, H, K), beta.view(N, W, H), self.A_log, self.dt_bias, state_pool,
                          slots, intermediate_slots=spec.out_slots).view(N * W, H, K)

    @staticmethod
    def _checkpoint_conv_states(mixed: torch.Tensor, batch: RaggedBatch, conv_pool: torch.Tensor) -> None:
        """conv_pool[slot[m]] = the W-1 conv inputs just before new token pos[m] of sequence seq[m].

        Checkpoint positions are multiples of CHECKPOINT_ALIGN (64) >= W-1, so the window lies inside this
        step's tokens and the previous conv state is never needed.
        """
        ckpt = batch.checkpoints
        width = conv_pool.shape[1]
        ends = batch.cu_seqlens.long()[ckpt.seq.long()] + ckpt.pos.long()  # [M]
        rows = ends[:, None] - width + torch.arange(width, device=mixed.device)  # [M, W-1]
        conv_pool[ckpt.slot.long()] = mixed[rows].to(conv_pool.dtype)
