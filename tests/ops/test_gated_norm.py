"""The KDA output gate and norm op (kda_serving/ops/gated_norm.py) on the CPU: within one output rounding of the
float64 formula, bit for bit the PyTorch code the model ran before the op existed, and argument errors that
name the argument. The CUDA kernel: tests/gpu/test_gated_norm_cuda.py; the op registration and torch.compile:
tests/ops/test_custom_ops.py."""

import pytest
import torch

from kda_testing import GATED_NORM_BF16_TOL, beyond_rounding, gated_norm_reference, make_gated_norm_inputs, rel_err
from kda_serving.ops import gated_rms_norm

EPS = 1e-5
FP32_TOL = 2e-5  # fp32 output: the arithmetic alone (see GATED_NORM_BF16_TOL)


def _previous_gated_rms_norm(x, gate, weight, eps):
    """kda_serving/model/norm.py's gated_rms_norm before the op replaced it, verbatim."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = weight.float() * h * torch.sigmoid(gate.float())
    return h.to(x.dtype)


@pytest.mark.parametrize("D", [16, 128])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, GATED_NORM_BF16_TOL), (torch.float32, FP32_TOL)],
                         ids=["bf16", "fp32"])
def test_matches_float64_formula(dtype, tol, D):
    x, gate, weight = make_gated_norm_inputs(40, 4, D, dtype=dtype, generator=torch.Generator().manual_seed(D))
    out = gated_rms_norm(x, gate, weight, EPS)
    ref = gated_norm_reference(x, gate, weight, EPS)
    assert out.dtype == dtype and out.shape == x.shape
    assert beyond_rounding(out, ref, tol) == 0
    assert torch.equal(out[0, 2], torch.zeros(D, dtype=dtype)), "an all-zero row normalises to zero"


@pytest.mark.parametrize("dtype,weight_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32),
    (torch.float16, torch.float32), (torch.float64, torch.float64),
], ids=["bf16", "bf16_fp32w", "fp32", "fp16", "fp64"])
def test_matches_previous_torch_code_exactly(dtype, weight_dtype):
    """The embedded default model and the transformers comparisons run this path: not one bit may move."""
    gen = torch.Generator().manual_seed(3)
    x, gate, weight = make_gated_norm_inputs(33, 2, 128, dtype=dtype, weight_dtype=weight_dtype, generator=gen)
    assert torch.equal(gated_rms_norm(x, gate, weight, EPS), _previous_gated_rms_norm(x, gate, weight, EPS))
    strided = torch.randn(33, 2, 256, generator=gen).to(dtype)[..., ::2]  # any layout on the CPU
    assert torch.equal(gated_rms_norm(strided, gate, weight, EPS), _previous_gated_rms_norm(strided, gate, weight, EPS))


def test_tolerance_catches_real_bugs():
    """The bf16 bound the CUDA tests use rejects a 10% eps error, a missing weight, a row mix-up and NaN."""
    x, gate, weight = make_gated_norm_inputs(16, 4, 128, generator=torch.Generator().manual_seed(5))
    ref = gated_norm_reference(x, gate, weight, EPS)
    assert beyond_rounding(gated_rms_norm(x, gate, weight, EPS), ref, GATED_NORM_BF16_TOL) == 0
    wrong = {
        "eps": gated_rms_norm(x, gate, weight, 1.1 * EPS),
        "weight": gated_rms_norm(x, gate, torch.ones_like(weight), EPS),
        "row": gated_rms_norm(x, gate, weight, EPS).roll(1, dims=1),
        "nan": gated_rms_norm(x, gate, weight, EPS).index_fill_(2, torch.tensor([7]), float("nan")),
    }
    for bug, out in wrong.items():
        assert beyond_rounding(out, ref, GATED_NORM_BF16_TOL) > 0, bug
    assert rel_err(wrong["nan"], ref) == float("inf")


def test_empty_and_two_dimensional():
    x, gate, weight = make_gated_norm_inputs(5, 1, 64, generator=torch.Generator().manual_seed(6))
    flat = gated_rms_norm(x.view(5, 64), gate.view(5, 64), weight, EPS)
    assert torch.equal(flat, gated_rms_norm(x, gate, weight, EPS).view(5, 64))
    assert gated_rms_norm(x[:0], gate[:0], weight, EPS).shape == (0, 1, 64)


def _inputs():
    return list(make_gated_norm_inputs(3, 2, 16, generator=torch.Generator().manual_seed(0))) + [EPS]


@pytest.mark.parametrize("pos,name,value,exc", [
    (0, "x", "not a tensor", TypeError),
    (0, "x", torch.zeros(3, 2, 16, dtype=torch.int32), TypeError),
    (1, "gate", torch.zeros(3, 2, 16, dtype=torch.int64), TypeError),
    (2, "weight", torch.zeros(16, dtype=torch.bool), TypeError),
    (1, "gate", torch.zeros(3, 2, 8), ValueError),
    (1, "gate", torch.zeros(3, 32), ValueError),
    (2, "weight", torch.zeros(8), ValueError),
    (2, "weight", torch.zeros(2, 16), ValueError),
    (2, "weight", torch.zeros(16, device="meta"), ValueError),
    (0, "x", torch.tensor(1.0), ValueError),
    (3, "eps", "1e-5", TypeError),
    (3, "eps", True, TypeError),
    (3, "eps", -1e-5, ValueError),
    (3, "eps", float("nan"), ValueError),
])
def test_bad_arguments(pos, name, value, exc):
    args = _inputs()
    args[pos] = value
    with pytest.raises(exc, match=f"'{name}'"):
        gated_rms_norm(*args)
