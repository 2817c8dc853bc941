"""Random weights in place: a model of a checkpoint's shapes without the checkpoint (benchmarks, tests).

The draws keep each part in the range a trained Kimi-Linear model has: norms 1, KDA decay rates exp(A_log)
in [1, 16], time steps log-uniform in [1e-3, 1e-1] (dt_bias their inverse softplus), conv taps in
[-0.5, 0.5], the MoE router N(0, 0.1) with a correction bias N(0, 0.01), and every other weight N(0, std),
or N(0, 1 / fan_in) (fan_in its last dimension) without a std: logits of order one, so that greedy choices
are not near-ties. fp8 experts are drawn the same way and stored quantized (model/fp8.py).
"""

from __future__ import annotations

import math

import torch

from .fp8 import FP8, quantize_into_


@torch.no_grad()
def fill_random_(model: torch.nn.Module, seed: int = 0, weight_std: float | None = None) -> torch.nn.Module:
    """Draws every parameter of model in place (module docstring) from a generator seeded with seed on the
    model's device; returns the model."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    params = dict(model.named_parameters())
    for name, p in params.items():
        leaf = name.rsplit(".", 1)[-1]
        if p.dtype == FP8:  # fp8 experts: drawn in fp32 a slice at a time, stored quantized with their scales
            std = weight_std if weight_std is not None else p.shape[-1] ** -0.5
            for e in range(p.shape[0]):
                draw = torch.empty(p.shape[1:], device=device).normal_(0.0, std, generator=gen)
                quantize_into_(p[e], params[f"{name}_scale"][e], draw)
        elif name.endswith("_scale") and params.get(name.removesuffix("_scale"), p).dtype == FP8:
            continue  # written with its fp8 weight
        elif "norm" in leaf:
            p.fill_(1.0)
        elif leaf == "A_log":
            p.copy_((1 + 15 * torch.rand(p.shape, generator=gen, device=device)).log())
        elif leaf == "dt_bias":
            u = torch.rand(p.shape, generator=gen, device=device)
            dt = torch.exp(math.log(1e-3) + (math.log(1e-1) - math.log(1e-3)) * u)
            p.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif leaf == "conv_weight":
            p.uniform_(-0.5, 0.5, generator=gen)
        elif leaf == "router":
            p.normal_(0.0, 0.1, generator=gen)
        elif leaf == "e_score_correction_bias":
            p.normal_(0.0, 0.01, generator=gen)
        else:
            p.normal_(0.0, weight_std if weight_std is not None else p.shape[-1] ** -0.5, generator=gen)
    return model
