"""The activations' e4m3 quantization (ops.quantize_rows_fp8, ops.silu_mul_quantize_fp8) on the CPU: the fused
SwiGLU's quantization against float64, any leading dimensions, NaN rows, argument errors and the custom ops'
registration. The row quantization's own error bound is tests/model/test_fp8.py's; the CUDA kernel is checked
against both in tests/gpu/test_fp8_quantize_cuda.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from kda_serving.ops import quantize_rows_fp8, silu_mul_quantize_fp8
from kda_serving.ops.fp8_quantize import FP8, FP8_MAX


def gate_up_rows(rows: int, inter: int, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    """[rows, 2 * inter]: gates over +-20 (silu saturating both ways, as trained MLPs reach), ups N(0, 1), rows
    scaled by 10^U(-4, 4); one row of zeros and one whose gates are all very negative (silu ~ 0)."""
    gen = torch.Generator().manual_seed(seed)
    gate = torch.empty(rows, inter).uniform_(-20, 20, generator=gen)
    up = torch.randn(rows, inter, generator=gen) * 10.0 ** torch.empty(rows, 1).uniform_(-4, 4, generator=gen)
    out = torch.cat([gate, up], dim=1)
    out[1] = 0
    out[2, :inter] = -90.0
    return out.to(dtype)


def assert_within_e4m3_bound(q: torch.Tensor, scale: torch.Tensor, exact: torch.Tensor, slack: float) -> None:
    """q * scale within rounding to nearest e4m3 of `exact` (float64): 2^-4 |x| for normals, 2^-10 scale for the
    subnormals, plus `slack` relative for an fp32 computation of x."""
    back = q.double() * scale.double()[..., None]
    s = scale.double()[..., None]
    bound = torch.maximum(exact.abs() * 2.0**-4, s * 2.0**-10) * (1 + slack) + exact.abs() * slack
    excess = (back - exact).abs() - bound
    assert torch.isfinite(back).all()
    assert excess.max() <= 0, f"largest excess over the e4m3 bound {excess.max().item():.3e}"


def test_silu_mul_quantize_within_the_e4m3_bound_of_float64():
    gate_up = gate_up_rows(40, 96, seed=0)
    q, scale = silu_mul_quantize_fp8(gate_up)
    assert q.dtype == FP8 and q.shape == (40, 96) and scale.shape == (40,)
    g, u = gate_up.double().chunk(2, dim=1)
    exact = F.silu(g) * u
    assert_within_e4m3_bound(q, scale, exact, slack=1e-5)
    # every row with a product above fp32's underflow reaches +-448 (its amax); the zero row and the one of
    # saturated gates (silu(-90) ~ 1e-37: 0 in fp32) are zeros with a positive scale
    nonzero = exact.abs().amax(1) > 1e-30
    assert torch.all(q.float().abs().amax(1)[nonzero] == FP8_MAX)
    assert torch.all(q[1:3].float() == 0) and torch.all(scale[1:3] > 0)
    # no bf16 rounding of the product before quantizing: a row's scale is the fp32 amax's
    assert torch.allclose(scale.double(), exact.abs().amax(1).clamp_min(1e-12) / FP8_MAX, rtol=1e-6, atol=0)


def test_quantize_ops_keep_leading_dimensions_and_match_row_by_row():
    x = torch.randn(2, 3, 40, dtype=torch.bfloat16)
    q, scale = quantize_rows_fp8(x)
    assert q.shape == x.shape and scale.shape == (2, 3)
    q_flat, scale_flat = quantize_rows_fp8(x.reshape(6, 40))
    assert torch.equal(q.view(torch.uint8).reshape(6, 40), q_flat.view(torch.uint8)) and torch.equal(
        scale.reshape(6), scale_flat)
    gate_up = gate_up_rows(6, 16, seed=1)
    q3, s3 = silu_mul_quantize_fp8(gate_up.view(2, 3, 32))
    q2, s2 = silu_mul_quantize_fp8(gate_up)
    assert q3.shape == (2, 3, 16) and torch.equal(q3.view(torch.uint8).reshape(6, 16), q2.view(torch.uint8))
    assert torch.equal(s3.reshape(6), s2)
    empty_q, empty_s = quantize_rows_fp8(torch.empty(0, 8))
    assert empty_q.shape == (0, 8) and empty_s.shape == (0,)


def test_a_nan_row_gets_a_nan_scale_and_the_others_are_untouched():
    x = torch.randn(3, 16)
    clean_q, clean_s = quantize_rows_fp8(x)
    x[1, 5] = float("nan")
    q, scale = quantize_rows_fp8(x)
    assert torch.isnan(scale[1]) and torch.isnan(q[1].float()).all()
    keep = torch.tensor([0, 2])
    assert torch.equal(q[keep].view(torch.uint8), clean_q[keep].view(torch.uint8)) and torch.equal(scale[keep],
                                                                                                 clean_s[keep])


@pytest.mark.parametrize("bad, match", [
    (torch.ones(4, 8, dtype=torch.int32), "expected a float tensor"),
    (torch.ones(4, 0), "K >= 1"),
    (torch.ones(()), "expected a float tensor"),
])
def test_quantize_rows_rejects_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        quantize_rows_fp8(bad)


def test_silu_mul_quantize_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"\[\.\.\., 2I\]"):
        silu_mul_quantize_fp8(torch.ones(4, 7))
    with pytest.raises(ValueError, match="K >= 2"):
        silu_mul_quantize_fp8(torch.ones(4, 1))
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        silu_mul_quantize_fp8([1.0, 2.0])
    with pytest.raises(ValueError, match="expected a float tensor"):
        silu_mul_quantize_fp8(torch.ones(2, 8, dtype=FP8))


def test_quantize_ops_pass_opcheck():
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    opcheck(torch.ops.kda_serving.fp8_quantize_rows.default, (torch.randn(5, 24),), test_utils=utils)
    opcheck(torch.ops.kda_serving.fp8_silu_mul_quantize.default, (torch.randn(2, 3, 48),), test_utils=utils)


def test_quantize_ops_compile_without_graph_breaks():
    fn = torch.compile(lambda t: (quantize_rows_fp8(t), silu_mul_quantize_fp8(t)), fullgraph=True, backend="eager")
    x = torch.randn(4, 32)
    (q, s), (hq, hs) = fn(x)
    assert torch.equal(q.view(torch.uint8), quantize_rows_fp8(x)[0].view(torch.uint8)) and torch.equal(
        hs, silu_mul_quantize_fp8(x)[1])
