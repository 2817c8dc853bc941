"""The fused gated RMS norm kernel (csrc/norm) against the float64 formula on fresh random inputs.

out = bf16(weight * rms_norm(x) * sigmoid(gate)). The kernel computes in fp32 (fast-math exp, reciprocal and
rsqrt: relative error under 1e-5) and rounds once to bf16, which moves a value by at most 2^-8 of itself. So
every element must lie within GATED_NORM_BF16_TOL = 2^-8 + 2e-5 of |ref|, the float64 value from the same bf16
inputs: as tight as the output rounding allows, and a real bug does not fit in it. eps off by 10% moves the
rows of scale 1e-3 (mean square 1e-6 against eps 1e-5) by ~4%; a missing weight, a wrong gate or a row read
from the wrong place moves elements by O(1) (tests/ops/test_gated_norm.py checks the bound rejects those).

Outputs are poisoned with NaN before each call: an element never written fails the bound (NaN compares false).
"""

from __future__ import annotations

import pytest
import torch

from kda_testing import (
    GATED_NORM_BF16_TOL,
    beyond_rounding,
    gated_norm_reference,
    make_gated_norm_inputs,
    max_err,
    rel_err,
)
from kda_serving.ops import gated_rms_norm

pytestmark = pytest.mark.gpu

DEV = "cuda"
EPS = 1e-5
HEAD_DIM = 128  # Kimi-Linear's linear_attn_config head_dim


def _inputs(T, H, D, weight_dtype=torch.float32, seed=0):
    """x and gate as the KDA block passes them: [T, H * D] tensors (the KDA output, the gate projection) viewed
    as [T, H, D]."""
    x, gate, weight = make_gated_norm_inputs(T, H, D, weight_dtype=weight_dtype,
                                             generator=torch.Generator().manual_seed(seed))
    x_proj, gate_proj = x.reshape(T, H * D).to(DEV), gate.reshape(T, H * D).to(DEV)
    return x_proj.view(T, H, D), gate_proj.view(T, H, D), weight.to(DEV)


def _run(x, gate, weight) -> torch.Tensor:
    out = torch.full(x.shape, float("nan"), dtype=torch.bfloat16, device=DEV)
    torch.ops.kda_serving.gated_rms_norm_(x, gate, weight, EPS, out)
    torch.cuda.synchronize()
    return out


def _check(out, x, gate, weight, label: str) -> None:
    ref = gated_norm_reference(x, gate, weight, EPS)
    print(f"gated norm {label}: rel {rel_err(out, ref):.2e} max {max_err(out, ref):.2e}")
    assert not out.isnan().any(), "some outputs were never written"
    bad = beyond_rounding(out, ref, GATED_NORM_BF16_TOL)
    assert bad == 0, f"{bad} of {out.numel()} elements beyond one bf16 rounding of the float64 value"


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32_w", "bf16_w"])
@pytest.mark.parametrize("H", [1, 32], ids=lambda h: f"H{h}")
@pytest.mark.parametrize("T", [1, 7, 8192], ids=lambda t: f"T{t}")
def test_kimi_shapes(T, H, weight_dtype):
    x, gate, weight = _inputs(T, H, HEAD_DIM, weight_dtype, seed=T + H)
    _check(_run(x, gate, weight), x, gate, weight, f"T{T} H{H} D{HEAD_DIM} {weight_dtype}")


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32_w", "bf16_w"])
@pytest.mark.parametrize("D", [8, 16, 24, 64, 96, 256, 320, 512, 1024], ids=lambda d: f"D{d}")
def test_head_dims(D, weight_dtype):
    """Every row layout (1 to 32 lanes per row, 1 to 4 chunks per lane, idle lanes where D / 8 is no power of
    two); 111 rows leave the last CTA partial."""
    x, gate, weight = _inputs(37, 3, D, weight_dtype, seed=D)
    _check(_run(x, gate, weight), x, gate, weight, f"T37 H3 D{D} {weight_dtype}")


@pytest.mark.parametrize("half", [0, 1], ids=["first_half", "second_half"])
def test_rows_of_a_wider_projection(half):
    """x as each head's half of a [T, H, 2D] projection (row stride 2D): the same bits as on a contiguous copy."""
    T, H, D = 300, 4, HEAD_DIM
    x, gate, weight = _inputs(T, H, D, seed=11)
    wide = torch.randn(T, H, 2 * D, device=DEV).to(torch.bfloat16)
    wide[..., half * D : (half + 1) * D] = x
    view = wide[..., half * D : (half + 1) * D]
    assert view.stride() == (H * 2 * D, 2 * D, 1)
    out = _run(view, gate, weight)
    _check(out, view, gate, weight, f"row stride {2 * D}")
    assert torch.equal(out, _run(x, gate, weight))


def test_public_function():
    """gated_rms_norm allocates out with x's shape; [rows, D] inputs and zero rows work."""
    x, gate, weight = _inputs(50, 6, HEAD_DIM, seed=12)
    out = gated_rms_norm(x, gate, weight, EPS)
    assert out.shape == x.shape and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert torch.equal(out, _run(x, gate, weight))
    flat = gated_rms_norm(x.view(300, HEAD_DIM), gate.view(300, HEAD_DIM), weight, EPS)
    assert torch.equal(flat, out.view(300, HEAD_DIM))
    empty = gated_rms_norm(x[:0], gate[:0], weight, EPS)
    torch.cuda.synchronize()
    assert empty.shape == (0, 6, HEAD_DIM)


def test_two_runs_bit_identical():
    x, gate, weight = _inputs(8192, 32, HEAD_DIM, seed=13)
    assert torch.equal(_run(x, gate, weight), _run(x, gate, weight))


def test_cuda_graph_replay_matches_eager():
    """Capture the public op once on static buffers, replay it on new inputs: same bits as eager calls."""
    T, H = 64, 32
    x, gate, weight = _inputs(T, H, HEAD_DIM, seed=14)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture (library load)
        gated_rms_norm(x, gate, weight, EPS)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = gated_rms_norm(x, gate, weight, EPS)

    for step in range(3):
        fresh_x, fresh_gate, _ = _inputs(T, H, HEAD_DIM, seed=100 + step)
        x.copy_(fresh_x)
        gate.copy_(fresh_gate)
        graph.replay()
        eager = gated_rms_norm(x, gate, weight, EPS)
        torch.cuda.synchronize()
        assert not static_out.isnan().any()
        assert torch.equal(static_out, eager)
    _check(static_out, x, gate, weight, "graph replay")


def _bad(T=4, H=2, D=HEAD_DIM):
    return list(_inputs(T, H, D, seed=15))


def _misaligned():
    x, gate, weight = _bad()
    flat = torch.empty(x.numel() + 1, dtype=torch.bfloat16, device=DEV)[1:]
    return [flat.view(x.shape), gate, weight]


def _replace(pos, make):
    def build():
        args = _bad()
        args[pos] = make(args[pos])
        return args
    return build


@pytest.mark.parametrize("build,name,exc", [
    (_replace(0, lambda x: x.float()), "x", TypeError),
    (_replace(1, lambda g: g.float()), "gate", TypeError),
    (_replace(2, lambda w: w.half()), "weight", TypeError),
    (_replace(2, lambda w: w.cpu()), "weight", ValueError),
    (_replace(1, lambda g: g[:, :1]), "gate", ValueError),
    (_replace(2, lambda w: w[:64]), "weight", ValueError),
    (lambda: _bad(D=12), "x", ValueError),
    (lambda: _bad(D=2048), "x", ValueError),
    # heads of a token contiguous, tokens 2 H D apart: no single row stride
    (_replace(0, lambda x: torch.cat([x.view(4, -1), x.view(4, -1)], 1)[:, : x[0].numel()].view(x.shape)), "x",
     ValueError),
    # rows 132 elements apart: not 16-byte aligned
    (_replace(0, lambda x: torch.cat([x, x[..., :4]], -1)[..., :HEAD_DIM]), "x", ValueError),
    (_misaligned, "x", ValueError),
    (_replace(1, lambda g: torch.cat([g, g], -1)[..., :HEAD_DIM]), "gate", ValueError),
], ids=["x_fp32", "gate_fp32", "weight_fp16", "weight_on_cpu", "gate_shape", "weight_shape", "D12", "D2048",
        "x_uneven_rows", "x_row_stride", "x_misaligned", "gate_strided"])
def test_bad_arguments(build, name, exc):
    with pytest.raises(exc, match=f"'{name}'"):
        gated_rms_norm(*build(), EPS)
