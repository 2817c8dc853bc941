"""The activations' e4m3 quantization kernels (csrc/moe/fp8_quantize.cu, ops.quantize_rows_fp8 and
ops.silu_mul_quantize_fp8) on a GPU.

quantize_rows: bit for bit the torch formula (ops/fp8_quantize.py: fp32 steps rounded to nearest), and
within rounding to nearest e4m3 of the float64 rows. silu_mul_quantize: within that rounding of silu(gate) * up
in float64 (the kernel's exp is the fast approximation, so a value next to a rounding midpoint may take the
other neighbour: checked as one e4m3 step at most, on a small fraction of elements, against the torch formula).
Rows span twelve orders of magnitude, with zero rows, spikes, subnormal elements and saturated gates; outputs
are poisoned with NaN before each call, so an element the kernel skipped fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kda_serving.ops import cuda_fp8, quantize_rows_fp8, silu_mul_quantize_fp8
from kda_serving.ops.fp8_quantize import FP8, FP8_MAX, quantize_rows_reference, silu_mul_quantize_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NAN_BYTE = 0x7F  # e4m3fn's NaN


def _library_or_skip() -> None:
    if not cuda_fp8.supports(torch.empty(1, 8, dtype=torch.bfloat16, device="cuda"), 8):
        pytest.skip("needs an SM90 GPU and the library with the fp8 quantization kernels")


def _rows(rows: int, width: int, seed: int) -> torch.Tensor:
    """bf16 [rows, width]: N(0, 1) times 10^U(-6, 6) per row; a zero row, a one-spike row, a row with elements
    ~2^-16 of its amax (e4m3 subnormals after scaling), a row near bf16's largest values."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, width, generator=gen, device="cuda")
    x *= 10.0 ** torch.empty(rows, 1, device="cuda").uniform_(-6, 6, generator=gen)
    if rows >= 4:
        x[0] = 0
        x[1] = 0
        x[1, width // 2] = -3e4
        x[2, : width // 2] *= 2.0**-16
        x[3] = 3e38 * torch.sign(x[3])
    return x.to(torch.bfloat16)


def _gate_up(rows: int, inter: int, seed: int) -> torch.Tensor:
    """bf16 [rows, 2 * inter]: gates over +-30 (silu saturating both ways), ups N(0, 1) times 10^U(-4, 4) per
    row; a zero row and one whose gates are all -100."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    gate = torch.empty(rows, inter, device="cuda").uniform_(-30, 30, generator=gen)
    up = torch.randn(rows, inter, generator=gen, device="cuda")
    up *= 10.0 ** torch.empty(rows, 1, device="cuda").uniform_(-4, 4, generator=gen)
    out = torch.cat([gate, up], dim=1)
    if rows >= 2:
        out[0] = 0
        out[1, :inter] = -100.0
    return out.to(torch.bfloat16)


def _poisoned(rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.full((rows, width), NAN_BYTE, dtype=torch.uint8, device="cuda").view(FP8)
    return q, torch.full((rows,), float("nan"), device="cuda")


def _code_index(q: torch.Tensor) -> torch.Tensor:
    """e4m3 values as signed step counts from zero: adjacent representable values differ by one."""
    code = q.view(torch.uint8).int()
    return torch.where(code >= 128, -(code - 128), code)


def _e4m3_excess(q, scale, exact, slack: float) -> float:
    """Largest |q * scale - exact| beyond rounding to nearest e4m3 (2^-4 |x| normals, 2^-10 scale subnormals),
    with `slack` relative for an fp32 computation of exact; <= 0 passes."""
    back = q.double() * scale.double()[:, None]
    s = scale.double()[:, None]
    bound = torch.maximum(exact.abs() * 2.0**-4, s * 2.0**-10) * (1 + slack) + exact.abs() * slack
    return ((back - exact).abs() - bound).max().item()


@pytest.mark.parametrize("rows, width", [(1, 8), (9, 24), (1000, 2304), (37, 7168), (4099, 1024)])
def test_quantize_rows_kernel_is_the_torch_formula_bit_for_bit(rows, width):
    _library_or_skip()
    x = _rows(rows, width, seed=rows + width)
    q, scale = _poisoned(rows, width)
    cuda_fp8.quantize_rows(x, q, scale)
    ref_q, ref_scale = quantize_rows_reference(x)
    mismatched = (q.view(torch.uint8) != ref_q.view(torch.uint8)).sum().item()
    excess = _e4m3_excess(q, scale, x.double(), slack=1e-6)
    print(f"quantize_rows {rows}x{width}: {mismatched} bytes differ from torch, scale max rel diff "
          f"{((scale - ref_scale).abs() / ref_scale).max().item():.1e}, excess over the e4m3 bound {excess:.2e}")
    assert torch.isfinite(scale).all() and not torch.isnan(q.float()).any()  # every element written
    assert mismatched == 0 and torch.equal(scale, ref_scale)
    assert excess <= 0
    nonzero = x.float().abs().amax(1) > 0
    assert torch.all(q.float().abs().amax(1)[nonzero] == FP8_MAX)


@pytest.mark.parametrize("rows, inter", [(1, 8), (5, 40), (2048, 1024), (33, 2048)])
def test_silu_mul_quantize_kernel_within_e4m3_of_float64(rows, inter):
    _library_or_skip()
    gate_up = _gate_up(rows, inter, seed=rows * inter)
    q, scale = _poisoned(rows, inter)
    cuda_fp8.silu_mul_quantize(gate_up, q, scale)
    g, u = gate_up.double().chunk(2, dim=1)
    exact = F.silu(g) * u
    excess = _e4m3_excess(q, scale, exact, slack=1e-5)
    ref_q, ref_scale = silu_mul_quantize_reference(gate_up)
    steps = (_code_index(q) - _code_index(ref_q)).abs()  # e4m3 steps between the two
    differ = (q.view(torch.uint8) != ref_q.view(torch.uint8)).float().mean().item()
    scale_rel = ((scale - ref_scale).abs() / ref_scale).max().item()
    print(f"silu_mul_quantize {rows}x{inter}: excess over the e4m3 bound {excess:.2e}, {differ:.2e} of elements "
          f"differ from torch's fp32 formula, scale max rel diff {scale_rel:.1e}")
    assert torch.isfinite(scale).all() and not torch.isnan(q.float()).any()  # every element written
    assert excess <= 0
    assert scale_rel <= 1e-5 and differ <= 1e-2 and steps.max() <= 1
    nonzero = exact.abs().amax(1) > 1e-30  # above fp32's underflow: silu(-100) is 0 there
    assert torch.all(q.float().abs().amax(1)[nonzero] == FP8_MAX)
    assert torch.all(q[~nonzero].float() == 0) and torch.all(scale > 0)


def test_nan_rows_get_nan_scales_and_leave_other_rows_alone():
    _library_or_skip()
    x = _rows(8, 256, seed=3)
    clean_q, clean_s = quantize_rows_fp8(x)
    x[5, 17] = float("nan")
    gate_up = _gate_up(8, 128, seed=4)
    clean_hq, clean_hs = silu_mul_quantize_fp8(gate_up)
    gate_up[6, 200] = float("nan")  # an up value
    for (q, scale), (cq, cs), row in ((quantize_rows_fp8(x), (clean_q, clean_s), 5),
                                      (silu_mul_quantize_fp8(gate_up), (clean_hq, clean_hs), 6)):
        assert torch.isnan(scale[row]) and torch.isnan(q[row].float()).all()
        keep = torch.arange(8, device="cuda") != row
        assert torch.equal(q[keep].view(torch.uint8), cq[keep].view(torch.uint8)) and torch.equal(scale[keep],
                                                                                                  cs[keep])


def test_public_ops_take_the_kernel_for_bf16_and_torch_otherwise(monkeypatch):
    _library_or_skip()
    calls = []
    for name in ("quantize_rows", "silu_mul_quantize"):
        real = getattr(cuda_fp8, name)
        monkeypatch.setattr(cuda_fp8, name, lambda *a, _real=real, _name=name: (calls.append(_name), _real(*a)))
    x = _rows(6, 64, seed=5)
    strided = torch.cat([x, x], dim=1)[:, 64:]  # rows 128 apart: copied to dense rows first
    q, scale = quantize_rows_fp8(strided.view(2, 3, 64))
    ref_q, ref_s = quantize_rows_reference(x)
    assert torch.equal(q.view(6, 64).view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(scale.view(6),
                                                                                                  ref_s)
    silu_mul_quantize_fp8(_gate_up(4, 32, seed=6))
    assert calls == ["quantize_rows", "silu_mul_quantize"]
    # fp16, fp32, widths that are not a multiple of 8 and rows over 8,192 run the torch formula
    wide = torch.randn(2, 8200, device="cuda").to(torch.bfloat16)
    for t in (x.half(), x.float(), x[:, :12].contiguous(), wide):
        q, scale = quantize_rows_fp8(t)
        ref_q, ref_s = quantize_rows_reference(t)
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(scale, ref_s)
    assert calls == ["quantize_rows", "silu_mul_quantize"]
    empty_q, empty_s = quantize_rows_fp8(torch.empty(0, 64, dtype=torch.bfloat16, device="cuda"))
    assert empty_q.shape == (0, 64) and empty_s.shape == (0,)


def test_kernel_argument_errors_name_the_argument():
    _library_or_skip()
    x = _rows(4, 64, seed=7)
    q, scale = _poisoned(4, 64)
    with pytest.raises(ValueError, match="expected q"):
        cuda_fp8.quantize_rows(x, q[:, :32].contiguous(), scale)
    with pytest.raises(TypeError, match="argument 'x'"):
        cuda_fp8.quantize_rows(x.float(), q, scale)
    with pytest.raises(ValueError, match="multiple of 8 up to 8192"):
        cuda_fp8.quantize_rows(x[:, :12].contiguous(), q[:, :12].contiguous(), scale)
    with pytest.raises(ValueError, match="8-byte aligned"):
        cuda_fp8.quantize_rows(x[:, :56].contiguous(), q.view(-1)[1:225].view(4, 56), scale)
    with pytest.raises(ValueError, match="argument 'gate_up'"):
        cuda_fp8.silu_mul_quantize(x[:, :63].contiguous(), q, scale)
    assert torch.isnan(scale).all()  # nothing ran


def test_quantization_captures_in_a_cuda_graph():
    _library_or_skip()
    x, gate_up = _rows(300, 2304, seed=8), _gate_up(300, 1024, seed=9)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        quantize_rows_fp8(x), silu_mul_quantize_fp8(gate_up)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (q, scale), (hq, hs) = quantize_rows_fp8(x), silu_mul_quantize_fp8(gate_up)
    for seed in range(2):
        x.copy_(_rows(300, 2304, seed=20 + seed))
        gate_up.copy_(_gate_up(300, 1024, seed=30 + seed))
        graph.replay()
        (eq, es), (ehq, ehs) = quantize_rows_fp8(x), silu_mul_quantize_fp8(gate_up)
        torch.cuda.synchronize()
        assert torch.equal(q.view(torch.uint8), eq.view(torch.uint8)) and torch.equal(scale, es)
        assert torch.equal(hq.view(torch.uint8), ehq.view(torch.uint8)) and torch.equal(hs, ehs)
