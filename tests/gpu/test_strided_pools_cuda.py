"""CUDA kernels on slot pools that are views into larger pages (vLLM's layout): same results as a packed pool,
written in place, and the rest of every page untouched."""

import pytest
import torch

from kda_testing import EXTREME_GATES, cu_seqlens_of, make_kda_inputs
from kda_serving.ops import causal_conv1d_decode, causal_conv1d_prefill, kda_decode, kda_prefill

pytestmark = pytest.mark.gpu
H, K = 4, 128
EXTRA = 64  # page elements beyond the state (16-byte aligned for both dtypes)


def _paged(S, slot_shape, dtype, gen):
    numel = 1
    for n in slot_shape:
        numel *= n
    pages = torch.randn(S, numel + EXTRA, generator=gen).to(device="cuda", dtype=dtype)
    view = pages[:, :numel].view(S, *slot_shape)
    assert not view.is_contiguous()
    return pages, view


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_prefill_and_decode_on_page_strided_pool(state_dtype):
    gen = torch.Generator().manual_seed(11)
    lengths = [300, 17, 1, 64]
    q, k, v, g, beta, A_log, dt = make_kda_inputs(1, sum(lengths), H, K, dtype=torch.bfloat16, device="cuda",
                                                  generator=gen, **EXTREME_GATES)
    pages, strided = _paged(7, (H, K, K), state_dtype, gen)
    packed = strided.clone()
    rest = pages[:, -EXTRA:].clone()
    idx = torch.tensor([5, 0, 3, 6], device="cuda")
    has = torch.tensor([True, False, True, True], device="cuda")
    kw = dict(cu_seqlens=cu_seqlens_of(lengths, device="cuda"), state_indices=idx, has_initial_state=has)
    a = kda_prefill(q, k, v, g, beta, A_log, dt, state_pool=strided, **kw).out
    b = kda_prefill(q, k, v, g, beta, A_log, dt, state_pool=packed, **kw).out
    torch.cuda.synchronize()
    assert torch.equal(a, b) and torch.equal(strided, packed)
    assert torch.equal(pages[:, -EXTRA:], rest)
    q1, k1, v1, g1, b1, _, _ = make_kda_inputs(4, 1, H, K, dtype=torch.bfloat16, device="cuda", generator=gen)
    o1 = kda_decode(q1, k1, v1, g1, b1, A_log, dt, strided, idx)
    o2 = kda_decode(q1, k1, v1, g1, b1, A_log, dt, packed, idx)
    torch.cuda.synchronize()
    assert torch.equal(o1, o2) and torch.equal(strided, packed)
    assert torch.equal(pages[:, -EXTRA:], rest)


def test_conv_on_page_strided_pool():
    gen = torch.Generator().manual_seed(12)
    D, W = 3 * 256, 4
    x = torch.randn(50, D, generator=gen).to("cuda", torch.bfloat16)
    w = torch.randn(D, W, generator=gen).to("cuda", torch.bfloat16)
    pages, strided = _paged(5, (W - 1, D), torch.bfloat16, gen)
    packed = strided.clone()
    rest = pages[:, -EXTRA:].clone()
    idx = torch.tensor([4, 1], device="cuda")
    cu = cu_seqlens_of([20, 30], device="cuda")
    ya = causal_conv1d_prefill(x, w, None, cu, strided, idx, split=3)
    yb = causal_conv1d_prefill(x, w, None, cu, packed, idx, split=3)
    da = causal_conv1d_decode(x[:2].contiguous(), w, None, strided, idx)
    db = causal_conv1d_decode(x[:2].contiguous(), w, None, packed, idx)
    torch.cuda.synchronize()
    assert torch.equal(ya, yb) and torch.equal(da, db) and torch.equal(strided, packed)
    assert torch.equal(pages[:, -EXTRA:], rest)
