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


# bf16 keeps 8 significant bits: rounding to nearest moves a value by at most 2^-8 of itself. The gated norm's
# fp32 arithmetic (a sum of squares, rsqrt, exp, reciprocal; fast-math on CUDA) adds under 1e-5 more.
GATED_NORM_BF16_TOL = 2.0**-8 + 2e-5


def make_gated_norm_inputs(T, H, D, *, dtype=torch.bfloat16, weight_dtype=torch.float32, generator=None):
    """x, gate [T, H, D] and weight [D] on the CPU, as extreme as the KDA output norm meets: each row of x scaled
    by 10^u, u uniform in [-3, 3] (the first rows exactly 1e-3, 1e3 and 0: the eps-dominated, the large and the
    empty row), gate uniform in [-30, 30] (sigmoid from 1e-13 to 1), weight ~ N(0, 1)."""
    gen = generator
    scale = 10 ** (torch.rand(T * H, generator=gen, dtype=torch.float64) * 6 - 3)
    special = torch.tensor([1e-3, 1e3, 0.0], dtype=torch.float64)[: T * H]
    scale[: special.numel()] = special
    x = (torch.randn(T, H, D, generator=gen, dtype=torch.float64) * scale.view(T, H, 1)).to(dtype)
    gate = (torch.rand(T, H, D, generator=gen) * 60 - 30).to(dtype)
    weight = torch.randn(D, generator=gen).to(weight_dtype)
    return x, gate, weight


def gated_norm_reference(x, gate, weight, eps: float) -> torch.Tensor:
    """rms_norm(x) * weight * sigmoid(gate) over the last dimension in float64, from the given (rounded) inputs."""
    x64 = x.double()
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return weight.double() * (x64 * rstd) * torch.sigmoid(gate.double())


def beyond_rounding(out: torch.Tensor, ref: torch.Tensor, rel_tol: float) -> int:
    """How many elements of out lie farther than rel_tol * |ref| from ref; NaN always counts."""
    out, ref = out.double(), ref.double().to(out.device)
    return int((~((out - ref).abs() <= rel_tol * ref.abs())).sum())
