"""The RMS norm, computed in fp32 the way transformers' KimiLinearRMSNorm is. The KDA block's gated output norm
is an op (kda_serving/ops/gated_norm.py), with a fused CUDA kernel."""

from __future__ import annotations

import torch

# transformers builds the MLA latent norms (q_a_layernorm, kv_a_layernorm) with its default eps, not
# config.rms_norm_eps; the checkpoints were trained that way.
LATENT_NORM_EPS = 1e-6


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] normalised in fp32, cast back to x's dtype, then scaled by weight [D]."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual add and the norm after it: (h + x, rms_norm(h + x)), one function so that a compiled
    model fuses them (KimiLinearModel.compile_plain_ops)."""
    h = h + x
    return h, rms_norm(h, weight, eps)
