"""ops.gemv / ops.linear on the CPU: the formula against float64 written out, the layouts the model passes
(batched, transposed views, an `out` view), the argument errors, and the custom op's schema and fake
implementation. The CUDA kernel's own tests are in tests/gpu/test_gemv_cuda.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from kda_serving.ops import gemv, linear


def _float64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Written out: out[..., t, n] = sum_k x[..., t, k] * w[..., n, k]."""
    return (x.double()[..., :, None, :] * w.double()[..., None, :, :]).sum(-1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 4e-3)])
def test_gemv_matches_float64(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 40, generator=gen).to(dtype), torch.randn(7, 40, generator=gen).to(dtype)
    out = gemv(x, w)
    ref = _float64(x, w)
    assert out.dtype == dtype and out.shape == (3, 7)
    assert ((out.double() - ref).norm() / ref.norm()).item() <= tol
    xb, wb = torch.randn(2, 3, 40, generator=gen).to(dtype), torch.randn(2, 5, 40, generator=gen).to(dtype)
    ref = _float64(xb, wb)
    assert ((gemv(xb, wb).double() - ref).norm() / ref.norm()).item() <= tol


def test_linear_on_the_cpu_is_torchs_product():
    """The CPU model's projections are what they were before linear existed: F.linear and bmm, bit for bit."""
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(5, 32, generator=gen), torch.randn(9, 32, generator=gen)
    assert torch.equal(linear(x, w), F.linear(x, w))
    wide = torch.randn(5, 64, generator=gen)  # f_a | g_a as the KDA block sees them: a transposed view
    xb, wb = wide.view(5, 2, 32).transpose(0, 1), torch.randn(2, 9, 32, generator=gen)
    assert torch.equal(linear(xb, wb), torch.bmm(xb, wb.transpose(1, 2)))
    out = torch.full((9, 2, 5), float("nan")).transpose(0, 2)  # [5, 2, 9] viewed as [B=5, T=2, N=9]
    lat, wv = torch.randn(2, 5, 32, generator=gen).transpose(0, 1), torch.randn(5, 9, 32, generator=gen)
    assert linear(lat, wv, out=out) is out
    assert torch.equal(out, torch.bmm(lat, wv.transpose(1, 2)))


def test_gemv_writes_into_out():
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(4, 3, 16, generator=gen), torch.randn(4, 6, 16, generator=gen)
    out = torch.full((3, 4, 6), float("nan")).transpose(0, 1)
    assert gemv(x, w, out=out) is out
    torch.testing.assert_close(out.double(), _float64(x, w), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 8), torch.randn(3, 9)), "do not match"),
    ((torch.randn(2, 8), torch.randn(2, 3, 8)), "expected x"),
    ((torch.randn(2, 2, 8), torch.randn(3, 4, 8)), "do not match"),
    ((torch.randn(2, 8), torch.randn(3, 8).double()), "argument 'weight'"),
    ((torch.randn(2, 8), torch.randint(0, 3, (3, 8))), "not a floating-point"),
    (("x", torch.randn(3, 8)), "expected a torch.Tensor"),
])
def test_gemv_rejects_bad_arguments(args, match):
    with pytest.raises((TypeError, ValueError), match=match):
        gemv(*args)


def test_gemv_rejects_a_bad_out():
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    for out in (torch.empty(3, 2), torch.empty(2, 3, dtype=torch.float64), "out"):
        with pytest.raises(ValueError, match="argument 'out'"):
            gemv(x, w, out=out)


def test_gemv_op_passes_opcheck():
    x, w = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    opcheck(torch.ops.kda_serving.gemv_.default, (x, w, torch.empty(2, 3, 5)),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_traces_through_gemv():
    x, w = torch.randn(3, 16), torch.randn(5, 16)
    compiled = torch.compile(lambda a, b: gemv(a, b) * 2, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, w), gemv(x, w) * 2)
