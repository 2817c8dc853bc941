"""ops.moe_experts_gemv on the CPU (its torch path): the MoE layer's own per-expert loop, float64 for e4m3
experts (dequantized weights, unquantized activations), the summation order, and argument errors. The CUDA
kernel is held to float64 in tests/gpu/test_moe_gemv_cuda.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kda_serving.model import ModelConfig
from kda_serving.model.fp8 import dequantize_rows, quantize_rows
from kda_serving.model.moe import MoE
from kda_serving.model.random_init import fill_random_
from kda_serving.ops import moe_experts_gemv


def _layer(seed: int) -> MoE:
    from model.kimi_testing import tiny_hf_config  # tests/model/kimi_testing.py

    return fill_random_(MoE(ModelConfig.from_dict(tiny_hf_config().to_dict()), torch.float32, "cpu"), seed)


def test_cpu_path_equals_the_layers_loop():
    layer = _layer(0)
    x = torch.randn(6, layer.gate_up_proj.shape[2], generator=torch.Generator().manual_seed(1))
    ids, weights = layer.route(x)
    ours = moe_experts_gemv(x, ids, weights, layer.gate_up_proj, layer.down_proj)
    loop = layer._experts(x, ids, weights)
    assert ((ours - loop).norm() / loop.norm()).item() < 1e-5


def test_shared_experts_join_the_sum():
    """With the shared experts given, the op is the whole MoE layer after routing: the layer's own forward
    (routed loop + its DenseMLP) within fp32 rounding."""
    layer = _layer(6)
    assert layer.shared_experts is not None
    x = torch.randn(5, layer.gate_up_proj.shape[2], generator=torch.Generator().manual_seed(7))
    ids, weights = layer.route(x)
    shared = layer.shared_experts
    ours = moe_experts_gemv(x, ids, weights, layer.gate_up_proj, layer.down_proj,
                            shared_gate_up=shared.gate_up_proj, shared_down=shared.down_proj)
    ref = layer(x)
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-5
    routed_only = moe_experts_gemv(x, ids, weights, layer.gate_up_proj, layer.down_proj)
    assert ((ours - routed_only).norm() / ref.norm()).item() > 1e-2  # the shared part is really in it
    h = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    with_residual = moe_experts_gemv(x, ids, weights, layer.gate_up_proj, layer.down_proj,
                                     shared_gate_up=shared.gate_up_proj, shared_down=shared.down_proj, residual=h)
    assert ((with_residual - (h + ref)).norm() / (h + ref).norm()).item() < 1e-5
    assert torch.allclose(layer(x, residual=h), h + ref, rtol=1e-5, atol=1e-5)


def test_cpu_path_with_e4m3_experts_is_w8a16():
    layer = _layer(2)
    q1, s1 = quantize_rows(layer.gate_up_proj)
    q2, s2 = quantize_rows(layer.down_proj)
    x = torch.randn(4, q1.shape[2], generator=torch.Generator().manual_seed(3))
    ids, weights = layer.route(x)
    ours = moe_experts_gemv(x, ids, weights, q1, q2, s1, s2).double()
    w1, w2 = dequantize_rows(q1, s1).double(), dequantize_rows(q2, s2).double()
    ref = torch.zeros_like(ours)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            g, u = (w1[ids[t, j]] @ x[t].double()).chunk(2)
            ref[t] += weights[t, j].double() * (w2[ids[t, j]] @ (F.silu(g) * u))
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-5


def test_arguments_are_checked():
    layer = _layer(4)
    x = torch.randn(2, layer.gate_up_proj.shape[2])
    ids, weights = layer.route(x)
    args = (layer.gate_up_proj, layer.down_proj)
    with pytest.raises(ValueError, match="'ids'"):
        moe_experts_gemv(x, ids.int(), weights, *args)
    with pytest.raises(ValueError, match="'weights'"):
        moe_experts_gemv(x, ids, weights[:, :1], *args)
    with pytest.raises(ValueError, match="'down'"):
        moe_experts_gemv(x, ids, weights, layer.gate_up_proj, layer.down_proj[:, :-1])
    with pytest.raises(ValueError, match="'gate_up_scale'"):
        moe_experts_gemv(x, ids, weights, *args, torch.ones(1), torch.ones(1))
    with pytest.raises(TypeError, match="'x'"):
        moe_experts_gemv(x.tolist(), ids, weights, *args)
    shared = layer.shared_experts
    with pytest.raises(ValueError, match="both or neither"):
        moe_experts_gemv(x, ids, weights, *args, shared_gate_up=shared.gate_up_proj)
    with pytest.raises(ValueError, match="'shared_down'"):
        moe_experts_gemv(x, ids, weights, *args, shared_gate_up=shared.gate_up_proj,
                         shared_down=shared.down_proj[:, :-1])
    with pytest.raises(ValueError, match="'residual'"):
        moe_experts_gemv(x, ids, weights, *args, residual=x[:1])
    with pytest.raises(ValueError, match="'shared_gate_up'"):
        moe_experts_gemv(x, ids, weights, *args, shared_gate_up=shared.gate_up_proj.double(),
                         shared_down=shared.down_proj)
