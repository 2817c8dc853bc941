"""Input generators and error measures shared by the KDA tests (CPU and GPU)."""

from __future__ import annotations

import math

import torch

# Gates as extreme as trained checkpoints produce (issue 2): g ~ N(0, 8), dt_bias in {-8, +8},
# A_log up to log 16, lower_bound -5 (sigmoid form) or None (softplus form, unbounded decay).
EXTREME_GATES = dict(g_std=8.0, dt_bias=8.0, a_log_max=math.log(16.0))
MILD_GATES = dict(g_std=1.0, dt_bias=0.0, a_log_max=0.0)


def make_kda_inputs(B, T, H, K=128, V=None, *, dtype=torch.float32, device="cpu", g_std=1.0, dt_bias=0.0,
                    a_log_max=0.0, generator=None):
    """Fresh random q, k, v, g, beta [B, T, H, *] and gate parameters A_log [H], dt_bias [H, K]."""
    V = K if V is None else V
    gen = generator

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(dtype=dtype, device=device)

    q, k, v = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, H, V)
    g, beta = rnd(B, T, H, K, std=g_std), rnd(B, T, H, std=2.0)
    A_log = (torch.rand(H, generator=gen) * a_log_max).to(device)
    signs = torch.where(torch.rand(H, K, generator=gen) < 0.5, -1.0, 1.0)
    dt = (signs * dt_bias + torch.randn(H, K, generator=gen) * 0.5).to(device) if dt_bias else \
        (torch.randn(H, K, generator=gen) * 0.5).to(device)
    return q, k, v, g, beta, A_log, dt


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN/Inf anywhere gives inf, so it can never pass."""
    out, ref = out.double(), ref.double().to(out.device)
    if not torch.isfinite(out).all():
        return math.inf
    denom = ref.norm().item()
    return (out - ref).norm().item() / max(denom, 1e-30)


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double().to(out.device)
    return (out - ref).abs().max().item() if out.numel() else 0.0


def cu_seqlens_of(lengths, device="cpu", dtype=torch.int32) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=dtype, device=device)
