"""The few-token matrix-vector kernel (ops.gemv, csrc/gemv/gemv.cu) on a GPU against float64: every token count
it takes (1-8), the projection shapes of Kimi-Linear-48B's decode step (and the smallest and longest rows), the
strided views the model passes (f_a | g_a slices, transposed heads, an `out` view), CUDA-graph capture, and the
argument errors of its binding.

Bound: the kernel multiplies in fp32 and rounds once to bf16, so every element is within 2^-8 of its float64
value relative to the element (round to nearest: 2^-9) plus a 1e-5 share of the output's largest magnitude
for the fp32 sums' own error; a wrong row, column, token or batch entry is off by O(1). The weights carry a
few large outliers (x100) as trained projections do. Outputs are poisoned with NaN before each call, so an
element the kernel skipped fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import importlib

from kda_serving.ops import cuda_gemv, gemv, linear

gemv_module = importlib.import_module("kda_serving.ops.gemv")  # the module (ops.gemv is its function)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# (B, N, K): Kimi-Linear-48B's KDA in_proj, f_b|g_b, o_proj, MLA q_proj, kv_a, value heads; the row limits; a K not
# a multiple of the 32-column step; layer 0's MLP down projection; a long row
SHAPES = [(1, 12576, 2304), (2, 4096, 128), (1, 2304, 4096), (1, 6144, 2304), (1, 576, 2304), (32, 128, 512),
          (1, 3, 8), (3, 37, 4096), (1, 1, 264), (1, 2304, 9216), (1, 21, 18440)]


def _weights(B, N, K, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(B, N, K, generator=gen, device="cuda") * K**-0.5
    outliers = torch.rand(B, N, K, generator=gen, device="cuda") < 1e-3
    return torch.where(outliers, 100 * w, w).to(torch.bfloat16)


def _check(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, what: str) -> None:
    assert not torch.isnan(out).any(), f"{what}: an output element was not written"
    ref = torch.matmul(x.double(), w.double().transpose(-1, -2))
    diff = (out.double() - ref).abs()
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"{what}: rel {rel:.2e}, max abs {diff.max().item():.2e} (max |ref| {ref.abs().max().item():.2e})")
    bound = 2**-8 * ref.abs() + 1e-5 * ref.abs().max()
    assert (diff <= bound).all(), f"{what}: worst excess {(diff - bound).max().item():.2e}"


@pytest.mark.parametrize("B,N,K", SHAPES)
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 8])
def test_gemv_matches_float64(B, N, K, T):
    w = _weights(B, N, K, seed=N + K)
    gen = torch.Generator(device="cuda").manual_seed(T)
    x = (3 * torch.randn(B, T, K, generator=gen, device="cuda")).to(torch.bfloat16)
    assert cuda_gemv.supports(x, w)
    out = torch.full((B, T, N), float("nan"), dtype=torch.bfloat16, device="cuda")
    torch.ops.kda_serving.gemv_(x, w, out)
    _check(out, x, w, f"B={B} N={N} K={K} T={T}")
    again = torch.full_like(out, float("nan"))
    torch.ops.kda_serving.gemv_(x, w, again)
    assert torch.equal(out, again), "two calls gave different results"


def test_gemv_takes_the_models_views():
    """f_a | g_a as columns of the input projection's output, f_b | g_b batched; MLA's per-head values from
    the latent outputs [T, nh, C] through transposed views, written into a transposed out."""
    T, D, K = 3, 4096, 128
    gen = torch.Generator(device="cuda").manual_seed(7)
    projected = torch.randn(T, 3 * D + 2 * K + 32, generator=gen, device="cuda").to(torch.bfloat16)
    fg_a = projected[:, 3 * D: 3 * D + 2 * K].view(T, 2, K).transpose(0, 1)
    fg_b = _weights(2, D, K, seed=1)
    out = gemv(fg_a, fg_b)
    assert out.shape == (2, T, D)
    _check(out, fg_a, fg_b, "f_b|g_b on a strided view")
    nh, C, V = 32, 512, 128
    latent = torch.randn(T, nh, C, generator=gen, device="cuda").to(torch.bfloat16)
    w_kv = _weights(nh, 128 + V, C, seed=2)
    values = torch.full((T, nh, V), float("nan"), dtype=torch.bfloat16, device="cuda")
    gemv(latent.transpose(0, 1), w_kv[:, 128:], out=values.transpose(0, 1))
    _check(values.transpose(0, 1), latent.transpose(0, 1), w_kv[:, 128:], "value heads through views")


def test_linear_takes_the_kernel_within_its_limits(monkeypatch):
    """linear: the kernel's result (bit-equal to gemv) for a weight within LINEAR_MAX_BYTES of the token count,
    cuBLAS's (F.linear) for a larger one or another count, and cuBLAS for what the kernel does not take (fp32,
    a row longer than cuda_gemv.MAX_COLS)."""
    w = _weights(1, 640, 2304, seed=3)[0]
    nbytes = w.numel() * 2
    monkeypatch.setattr(gemv_module, "LINEAR_MAX_BYTES", {1: nbytes, 2: nbytes - 1, 3: nbytes})
    gen = torch.Generator(device="cuda").manual_seed(8)
    for T, kernel in ((1, True), (2, False), (3, True), (4, False)):
        x = torch.randn(T, 2304, generator=gen, device="cuda").to(torch.bfloat16)
        want = gemv(x, w) if kernel else F.linear(x, w)
        assert torch.equal(linear(x, w), want), T
    x = torch.randn(2, 2304, generator=gen, device="cuda")
    assert torch.equal(linear(x, w.float()), F.linear(x, w.float()))
    long_w = _weights(1, 16, cuda_gemv.MAX_COLS + 8, seed=4)[0]
    x = torch.randn(2, cuda_gemv.MAX_COLS + 8, generator=gen, device="cuda").to(torch.bfloat16)
    assert not cuda_gemv.supports(x[None], long_w[None])
    assert torch.equal(linear(x, long_w), F.linear(x, long_w))


def test_gemv_in_a_cuda_graph():
    """Captured once, replayed on new token rows: no host work or allocation in the call."""
    w = _weights(1, 2304, 4096, seed=5)[0]
    x = torch.zeros(2, 4096, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(2, 2304, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gemv(x, w, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gemv(x, w, out=out)
    gen = torch.Generator(device="cuda").manual_seed(9)
    for _ in range(2):
        x.copy_(torch.randn(2, 4096, generator=gen, device="cuda"))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, x, w, "graph replay")


def test_binding_rejects_what_the_kernel_cannot_take():
    w = _weights(1, 8, 64, seed=6)
    x = torch.randn(1, 9, 64, device="cuda").to(torch.bfloat16)
    out = torch.empty(1, 9, 8, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="1 to 8 token rows"):
        cuda_gemv.gemv(x, w, out)
    with pytest.raises(TypeError, match="bfloat16"):
        cuda_gemv.gemv(x[:, :2].float(), w, out[:, :2])
    with pytest.raises(ValueError, match="multiple of 8"):
        cuda_gemv.gemv(x[:, :2, :60], w[:, :, :60], out[:, :2])
    wide = torch.randn(1, 8, 72, device="cuda").to(torch.bfloat16)[:, :, 4:68]  # rows at an unaligned offset
    with pytest.raises(ValueError, match="16-byte aligned"):
        cuda_gemv.gemv(x[:, :2], wide, out[:, :2])
    with pytest.raises(ValueError, match="not \\[B, T, K\\]"):
        cuda_gemv.gemv(x[:, :2], w, out[:, :2, :4])
    assert not cuda_gemv.supports(x, w)  # 9 rows
