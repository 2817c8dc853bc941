"""SGLang's KDA extend/decode on our ops (kda_serving/integrations/sglang_kda_core.py), with tensors shaped
and laid out as SGLang's KDAAttnBackend passes them, against the float64 reference. No SGLang needed."""

from __future__ import annotations

import pytest
import torch

from kda_serving.integrations.sglang_kda_core import sglang_decode, sglang_extend
from kda_serving.ops import PAD_SLOT, kda_recurrent_reference

H, K, SLOTS = 2, 16, 7


def conv_output(T: int, gen, heads=H, dim=K, device="cpu", dtype=torch.float32):
    """q, k, v as SGLang makes them: column views of one conv output [T, 3HK], unflattened, unsqueezed."""
    qkv = torch.randn(T, 3 * heads * dim, generator=gen).to(device, dtype)
    q, k, v = qkv.split([heads * dim] * 3, dim=-1)
    return [t.unflatten(-1, (-1, dim)).unsqueeze(0) for t in (q, k, v)]


def params(gen, heads=H, dim=K, device="cpu"):
    A_log = (torch.rand(heads, generator=gen) * 1.5).view(1, 1, heads, 1)  # SGLang keeps A_log [1, 1, H, 1]
    dt_bias = 0.5 * torch.randn(heads * dim, generator=gen)
    return A_log.to(device), dt_bias.to(device)


def rel_err(a, b) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).norm() / b.norm())


def run_extend(lower_bound, heads, dim, device, dtype, tol):
    gen = torch.Generator().manual_seed(0)
    lens = [3, 40, 1, 17, 200]
    T = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = conv_output(T, gen, heads, dim, device, dtype)
    g = torch.randn(1, T, heads, dim, generator=gen).to(device, dtype)
    beta = torch.randn(1, T, heads, generator=gen).to(device, dtype)
    A_log, dt_bias = params(gen, heads, dim, device)
    pool = (torch.randn(SLOTS, heads, dim, dim, generator=gen) * 0.3).to(device)  # SGLang's KDA pool is fp32
    before = pool.clone()
    slots = torch.tensor([5, 0, 3, 6, 2], dtype=torch.int32)
    o = sglang_extend(q, k, v, g, beta, ssm_states=pool, cache_indices=slots.to(device),
                      query_start_loc=cu.to(device), A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound,
                      beta_is_raw=True)
    cpu = [t.cpu().double().contiguous() for t in (q, k, v, g, beta)]
    ref = kda_recurrent_reference(*cpu, A_log.cpu().reshape(heads), dt_bias.cpu().view(heads, dim),
                                  lower_bound=lower_bound, cu_seqlens=cu, initial_state=before.cpu()[slots.long()],
                                  output_final_state=True)
    err = rel_err(o, ref.out)
    print(f"sglang extend ({device}, {lower_bound}): rel err {err:.2e}")
    assert o.shape == (1, T, heads, dim) and not o.isnan().any() and err < tol
    assert rel_err(pool[slots.long().to(device)], ref.final_state) < tol
    for s in (1, 4):
        assert torch.equal(pool[s], before[s])


@pytest.mark.parametrize("lower_bound", [None, -5.0], ids=["softplus-gate", "lower-bound-gate"])
def test_extend_matches_reference(lower_bound):
    run_extend(lower_bound, H, K, "cpu", torch.float32, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("lower_bound", [None, -5.0], ids=["softplus-gate", "lower-bound-gate"])
def test_extend_on_the_kernels(lower_bound):
    """SGLang's extend shapes on the GPU: bf16, K = V = 128, fp32 pool, column-view q/k/v."""
    run_extend(lower_bound, 4, 128, "cuda", torch.bfloat16, 3e-2)


def test_decode_matches_reference_and_skips_padding():
    gen = torch.Generator().manual_seed(1)
    N = 4
    q, k, v = conv_output(N, gen)
    a = torch.randn(N, H * K, generator=gen)  # decode gate arrives flat [N, H*K]
    b = torch.randn(1, N, H, generator=gen)
    A_log, dt_bias = params(gen)
    pool = torch.randn(SLOTS, H, K, K, generator=gen) * 0.3
    before = pool.clone()
    slots = torch.tensor([2, PAD_SLOT, 6, 0], dtype=torch.int32)
    o = sglang_decode(q, k, v, a, b, ssm_states=pool, cache_indices=slots,
                      query_start_loc=torch.arange(N + 1, dtype=torch.int32), A_log=A_log, dt_bias=dt_bias)
    real = slots != PAD_SLOT
    init = torch.zeros(N, H, K, K)
    init[real] = before[slots[real].long()]
    ref = kda_recurrent_reference(q[0].unsqueeze(1).double().contiguous(), k[0].unsqueeze(1).double().contiguous(),
                                  v[0].unsqueeze(1).double().contiguous(), a.view(N, 1, H, K).double(),
                                  b.view(N, 1, H).double(), A_log.reshape(H), dt_bias.view(H, K),
                                  initial_state=init, output_final_state=True)
    assert o.shape == (1, N, H, K)
    assert torch.equal(o[0, 1], torch.zeros(H, K)), "padded entry must output zeros"
    keep = real.nonzero().flatten()
    err = rel_err(o[0, keep], ref.out[keep, 0])
    print(f"sglang decode: rel err {err:.2e}")
    assert err < 1e-4
    assert rel_err(pool[slots[real].long()], ref.final_state[keep]) < 1e-4
    for s in (1, 3, 4, 5):
        assert torch.equal(pool[s], before[s])


def test_extend_refuses_activated_beta():
    gen = torch.Generator().manual_seed(2)
    q, k, v = conv_output(2, gen)
    A_log, dt_bias = params(gen)
    with pytest.raises(ValueError, match="beta_is_raw"):
        sglang_extend(q, k, v, torch.zeros(1, 2, H, K), torch.zeros(1, 2, H), ssm_states=torch.zeros(2, H, K, K),
                      cache_indices=torch.tensor([0]), query_start_loc=torch.tensor([0, 2]), A_log=A_log,
                      dt_bias=dt_bias, beta_is_raw=False)


def test_decode_checks_one_token_per_sequence():
    gen = torch.Generator().manual_seed(3)
    q, k, v = conv_output(2, gen)
    A_log, dt_bias = params(gen)
    with pytest.raises(ValueError, match="query_start_loc"):
        sglang_decode(q, k, v, torch.zeros(2, H * K), torch.zeros(1, 2, H), ssm_states=torch.zeros(2, H, K, K),
                      cache_indices=torch.tensor([0, 1]), query_start_loc=torch.tensor([0, 2]), A_log=A_log,
                      dt_bias=dt_bias)
