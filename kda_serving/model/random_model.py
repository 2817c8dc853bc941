"""A KimiLinearModel with random weights made straight on the device, for benchmarks of large shapes.

    model = random_model("configs/kimi-linear-48b-4layer.json", device="cuda")   # 48B layer shapes, 4 layers

No checkpoint is written or read (a 4-layer slice of the 48B model is 12.9 GB in bf16). The initialisation is
that of transformers' KimiLinearPreTrainedModel (normal(0, 0.02) matrices, unit norms, FLA's A_log and dt_bias),
so activations, gates and routing have realistic magnitudes; the values themselves mean nothing.
"""

from __future__ import annotations

import json
import math

import torch

from . import _resolve_dtype
from .config import ModelConfig
from .kimi_linear import KimiLinearModel

INIT_STD = 0.02


@torch.no_grad()
def random_model(config: dict | str, device="cpu", dtype=None, seed: int = 0) -> KimiLinearModel:
    """config: a config.json dict or path. dtype defaults to bf16 on CUDA, fp32 on the CPU."""
    if isinstance(config, str):
        with open(config, encoding="utf-8") as f:
            config = json.load(f)
    cfg = ModelConfig.from_dict(config)
    device = torch.device(device)
    model = KimiLinearModel(cfg, dtype=_resolve_dtype(dtype, device), device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":  # decay rates exp(A_log) uniform in [1, 16]
            p.uniform_(1.0, 16.0, generator=gen).log_()
        elif leaf == "dt_bias":  # inverse softplus of dt, log-uniform in [1e-3, 1e-1]
            dt = torch.empty_like(p).uniform_(math.log(1e-3), math.log(1e-1), generator=gen).exp_()
            p.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif leaf == "conv_weight":
            p.uniform_(-0.5, 0.5, generator=gen)
        elif leaf == "e_score_correction_bias" or leaf.endswith("_bias"):
            p.normal_(0.0, 0.01, generator=gen)
        elif p.dim() == 1:  # RMS norm weights
            p.fill_(1.0)
        else:
            p.normal_(0.0, INIT_STD, generator=gen)
    return model.eval()
