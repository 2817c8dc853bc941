"""model/random_init.py: random weights in place, in the ranges its docstring names, the same for the same seed."""

from __future__ import annotations

import torch
from kimi_testing import paged_kernel_model

from kda_serving.model.random_init import fill_random_


def test_fill_random_draws_each_part_in_its_range_repeatably():
    model = paged_kernel_model(seed=4, device="cpu")
    params = dict(model.named_parameters())
    decay = params["layers.0.self_attn.A_log"].float().exp()
    assert decay.min() >= 1 and decay.max() <= 16
    dt = torch.nn.functional.softplus(params["layers.0.self_attn.dt_bias"].float())
    assert dt.min() >= 0.9e-3 and dt.max() <= 1.1e-1
    assert params["layers.0.self_attn.conv_weight"].abs().max() <= 0.5
    assert torch.all(params["layers.1.input_layernorm"] == 1)
    w = params["layers.1.self_attn.o_proj"].float()  # N(0, 1 / fan_in)
    assert abs(w.std().item() * w.shape[-1] ** 0.5 - 1) < 0.05
    again = paged_kernel_model(seed=4, device="cpu")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    fill_random_(again, seed=5, weight_std=0.02)
    assert abs(dict(again.named_parameters())["layers.1.self_attn.o_proj"].float().std().item() - 0.02) < 2e-3
