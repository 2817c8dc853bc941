"""The CUDA short-conv kernels (csrc/conv) against the CPU op of kda_serving/ops/conv.py run in float64.

Outputs are poisoned with NaN before each call; the new conv states must equal the reference bit for bit
(they are copies of inputs); untouched pool slots must not change; padded entries give zero output.
"""

from __future__ import annotations

import pytest
import torch

from kda_testing import cu_seqlens_of, max_err, rel_err
from kda_serving.ops import PAD_SLOT, causal_conv1d_decode, causal_conv1d_prefill

pytestmark = pytest.mark.gpu

DEV = "cuda"
OUT_TOL = 8e-3  # bf16 rounding of the output (2^-9 relative) with margin
UNTOUCHED = 1e30


def _check_output(name: str, out: torch.Tensor, y_ref: torch.Tensor) -> None:
    """Every output element written (the NaN poison gone) and within OUT_TOL of the float64 reference."""
    assert not out.isnan().any(), "some outputs were never written"
    err = rel_err(out, y_ref)
    print(f"{name} rel {err:.2e} max {max_err(out, y_ref):.2e}")
    assert err <= OUT_TOL


def _cpu_reference_prefill(x, weight, bias, cu, pool, slots, has_init, silu):
    """The CPU op in float64 on copies; returns (y float64 [T, D], pool after, in the pool's dtype)."""
    pool64 = pool.double().cpu()
    y = causal_conv1d_prefill(x.double().cpu(), weight.double().cpu(), None if bias is None else bias.double().cpu(),
                              cu.cpu(), pool64, slots.cpu(), None if has_init is None else has_init.cpu(),
                              "silu" if silu else None)
    return y, pool64.to(pool.dtype)


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16], ids=["fp32_pool", "bf16_pool"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32_w", "bf16_w"])
@pytest.mark.parametrize("with_bias,silu", [(True, True), (False, False)], ids=["bias_silu", "plain"])
def test_conv_prefill_matches_reference(pool_dtype, weight_dtype, with_bias, silu):
    gen = torch.Generator().manual_seed(7)
    lengths = [0, 1, 2, 3, 15, 17, 113, 64, 200, 0, 5]  # empty, shorter than W-1, tile-crossing
    N, D = len(lengths), 264  # 33 channel groups: a partial CTA
    cu = cu_seqlens_of(lengths, device=DEV)
    T = int(cu[-1])
    x = torch.randn(T, D, generator=gen).to(DEV, torch.bfloat16)
    weight = (torch.randn(D, 4, generator=gen) * 0.5).to(DEV, weight_dtype)
    bias = (torch.randn(D, generator=gen) * 0.1).to(DEV, weight_dtype) if with_bias else None
    S = N + 4
    pool = torch.full((S, 3, D), UNTOUCHED, dtype=pool_dtype)
    slots = torch.randperm(S, generator=gen)[:N].to(torch.int32)
    slots[6] = PAD_SLOT
    pool[slots[slots >= 0].long()] = torch.randn(N - 1, 3, D, generator=gen).to(pool_dtype)
    has_init = torch.rand(N, generator=gen) < 0.6
    has_init[7] = False  # a long sequence starting fresh
    pool, slots, has_init = pool.to(DEV), slots.to(DEV), has_init.to(DEV)

    y_ref, pool_ref = _cpu_reference_prefill(x, weight, bias, cu, pool, slots, has_init, silu)
    before = pool.clone()
    out = torch.full_like(x, float("nan"))
    torch.ops.kda_serving.causal_conv1d_prefill_(x, weight, bias, cu, pool, slots, has_init, silu, out)
    torch.cuda.synchronize()

    _check_output("conv prefill", out, y_ref)
    assert torch.equal(pool.cpu(), pool_ref), "new conv states differ from the reference"
    pad_tokens = slice(int(cu[6]), int(cu[7]))
    assert (out[pad_tokens] == 0).all()
    untouched = torch.ones(S, dtype=torch.bool, device=DEV)
    untouched[slots[slots >= 0].long()] = False
    assert torch.equal(pool[untouched], before[untouched])


def test_conv_prefill_large_and_int64():
    """Kimi-Linear's width: q, k, v convolved together (D = 3 * 4096), int64 indices and cu_seqlens."""
    gen = torch.Generator().manual_seed(1)
    lengths = [300, 257, 129, 64, 1, 0, 333, 200]
    N, D = len(lengths), 3 * 4096
    cu = cu_seqlens_of(lengths, device=DEV, dtype=torch.int64)
    x = torch.randn(int(cu[-1]), D, generator=gen).to(DEV, torch.bfloat16)
    weight = (torch.randn(D, 4, generator=gen) * 0.5).to(DEV)
    pool = torch.randn(N, 3, D, generator=gen).to(DEV, torch.bfloat16)
    slots = torch.randperm(N, generator=gen).to(DEV)
    y_ref, pool_ref = _cpu_reference_prefill(x, weight, None, cu, pool, slots, None, True)
    out = torch.full_like(x, float("nan"))
    torch.ops.kda_serving.causal_conv1d_prefill_(x, weight, None, cu, pool, slots, None, True, out)
    _check_output("conv prefill (large, int64)", out, y_ref)
    assert torch.equal(pool.cpu(), pool_ref)


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16], ids=["fp32_pool", "bf16_pool"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32_w", "bf16_w"])
def test_conv_decode_matches_reference(pool_dtype, weight_dtype):
    gen = torch.Generator().manual_seed(3)
    N, D, S = 9, 4096 + 8, 12
    x = torch.randn(N, D, generator=gen).to(DEV, torch.bfloat16)
    weight = (torch.randn(D, 4, generator=gen) * 0.5).to(DEV, weight_dtype)
    bias = (torch.randn(D, generator=gen) * 0.1).to(DEV, weight_dtype)
    pool = torch.full((S, 3, D), UNTOUCHED, dtype=pool_dtype)
    slots = torch.randperm(S, generator=gen)[:N]
    slots[4] = PAD_SLOT
    pool[slots[slots >= 0]] = torch.randn(N - 1, 3, D, generator=gen).to(pool_dtype)
    pool, slots = pool.to(DEV), slots.to(DEV)

    pool64 = pool.double().cpu()
    y_ref = causal_conv1d_decode(x.double().cpu(), weight.double().cpu(), bias.double().cpu(), pool64,
                                 slots.cpu(), "silu")
    before = pool.clone()
    out = torch.full_like(x, float("nan"))
    torch.ops.kda_serving.causal_conv1d_decode_(x, weight, bias, pool, slots, True, out)
    torch.cuda.synchronize()
    _check_output("conv decode", out, y_ref)
    assert torch.equal(pool.cpu(), pool64.to(pool_dtype))
    assert (out[4] == 0).all()
    untouched = torch.ones(S, dtype=torch.bool, device=DEV)
    untouched[slots[slots >= 0]] = False
    assert torch.equal(pool[untouched], before[untouched])


def test_split_output_equals_plain_output():
    """out [3, rows, D/3] (q, k, v written apart) holds exactly the column blocks of out [rows, D]."""
    from kda_serving.ops import cuda_decode

    gen = torch.Generator().manual_seed(2)
    D, lengths = 3 * 256, [70, 0, 9]
    cu = cu_seqlens_of(lengths, device=DEV)
    x = torch.randn(int(cu[-1]), D, generator=gen).to(DEV, torch.bfloat16)
    weight = torch.randn(D, 4, generator=gen).to(DEV)
    pool = torch.randn(3, 3, D, generator=gen).to(DEV)
    slots = torch.tensor([2, 0, 1], device=DEV)
    plain, split = torch.full_like(x, float("nan")), torch.full((3, x.shape[0], D // 3), float("nan"), device=DEV,
                                                                  dtype=torch.bfloat16)
    pool_split = pool.clone()
    cuda_decode.conv_prefill(x, weight, None, cu, pool, slots, None, True, plain)
    cuda_decode.conv_prefill(x, weight, None, cu, pool_split, slots, None, True, split)
    assert not plain.isnan().any()
    assert torch.equal(torch.cat(list(split), dim=1), plain) and torch.equal(pool, pool_split)
    xd = x[:3].contiguous()
    plain_d, split_d = torch.empty_like(xd), torch.empty(3, 3, D // 3, device=DEV, dtype=torch.bfloat16)
    cuda_decode.conv_decode(xd, weight, None, pool.clone(), slots, True, plain_d)
    cuda_decode.conv_decode(xd, weight, None, pool.clone(), slots, True, split_d)
    assert torch.equal(torch.cat(list(split_d), dim=1), plain_d)


def test_prefill_then_decode_equals_longer_prefill():
    """State hand-over: prefill 37 tokens then 3 decode steps == prefill of all 40 tokens."""
    gen = torch.Generator().manual_seed(4)
    D = 512
    x = torch.randn(40, D, generator=gen).to(DEV, torch.bfloat16)
    weight = torch.randn(D, 4, generator=gen).to(DEV)
    slots = torch.tensor([1], device=DEV)
    pool_a = torch.zeros(2, 3, D, device=DEV)
    pool_b = torch.zeros(2, 3, D, device=DEV)
    y_all = causal_conv1d_prefill(x, weight, None, cu_seqlens_of([40], DEV), pool_a, slots,
                                  torch.tensor([False], device=DEV))
    y = [causal_conv1d_prefill(x[:37], weight, None, cu_seqlens_of([37], DEV), pool_b, slots,
                               torch.tensor([False], device=DEV))]
    for t in range(37, 40):
        y.append(causal_conv1d_decode(x[t : t + 1], weight, None, pool_b, slots))
    assert torch.equal(torch.cat(y), y_all)
    assert torch.equal(pool_a, pool_b)


def test_conv_bad_arguments_raise():
    from kda_serving.ops import cuda_decode

    x = torch.randn(4, 12, device=DEV, dtype=torch.bfloat16)
    weight = torch.randn(12, 4, device=DEV)
    pool = torch.zeros(4, 3, 12, device=DEV)
    slots = torch.arange(4, device=DEV)
    with pytest.raises(ValueError, match="'x'"):
        cuda_decode.conv_decode(x, weight, None, pool, slots, True, torch.empty_like(x))
    x = torch.randn(4, 16, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="conv_pool"):
        cuda_decode.conv_decode(x, torch.randn(16, 4, device=DEV), None, torch.zeros(4, 3, 16, device=DEV).half(),
                                slots, True, torch.empty_like(x))
    with pytest.raises(ValueError, match="weight"):
        cuda_decode.conv_decode(x, torch.randn(16, 3, device=DEV), None, torch.zeros(4, 2, 16, device=DEV), slots,
                                True, torch.empty_like(x))


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16], ids=["fp32_pool", "bf16_pool"])
def test_conv_verify_matches_reference(pool_dtype):
    # The verify conv (speculative decoding) on the GPU, as the engine calls it (no padded entries: no host
    # read), against the float64 CPU op; intermediate states are copies of inputs, so bit-exact.
    from kda_serving.ops import causal_conv1d_verify, indices_checked_by_caller

    gen = torch.Generator().manual_seed(5)
    N, T, D, S = 6, 5, 3 * 4096, 64
    x = torch.randn(N, T, D, generator=gen).to(DEV, torch.bfloat16)
    weight = (torch.randn(D, 4, generator=gen) * 0.5).to(DEV, torch.bfloat16)
    pool = torch.full((S, 3, D), UNTOUCHED, dtype=pool_dtype)
    perm = torch.randperm(S, generator=gen)
    slots, inter = perm[:N], perm[N : N + N * T].view(N, T)
    pool[slots] = torch.randn(N, 3, D, generator=gen).to(pool_dtype)
    pool, slots, inter = pool.to(DEV), slots.to(DEV, torch.int32), inter.to(DEV, torch.int32)

    pool64 = pool.double().cpu()
    y_ref = causal_conv1d_verify(x.double().cpu(), weight.double().cpu(), None, pool64, slots.cpu(), inter.cpu())
    before = pool.clone()
    out = torch.full((N * T, D), float("nan"), dtype=torch.bfloat16, device=DEV)
    with indices_checked_by_caller():
        torch.ops.kda_serving.causal_conv1d_verify_(x, weight, None, pool, slots, inter, False, True, out)
    torch.cuda.synchronize()
    _check_output("conv verify", out, y_ref)
    assert torch.equal(pool.cpu(), pool64.to(pool_dtype))
    untouched = torch.ones(S, dtype=torch.bool, device=DEV)
    untouched[inter.reshape(-1).long()] = False
    assert torch.equal(pool[untouched], before[untouched])
