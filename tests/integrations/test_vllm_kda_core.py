"""The vLLM layer's KDA core (kda_serving/integrations/vllm_kda_core.py) on tensors shaped as vLLM passes them,
against a float64 reference: short conv by its definition, then the token-by-token KDA recurrence.

No vLLM needed: the core takes plain tensors. Covers mixed decode+prefill batches (decodes first, as vLLM's
GDN metadata builder orders them), pure decode batches with a padded entry, sequences with and without cached
state, vLLM's page-strided pools (slot stride larger than a slot) and untouched slots left bit-identical.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kda_serving.integrations.state_pools import run_on_pool
from kda_serving.integrations.vllm_kda_core import KimiKDAParams, VLLMKDABatch, kimi_kda_core
from kda_serving.ops import PAD_SLOT, kda_recurrent_reference

H, D, W, SLOTS = 2, 16, 4, 9  # CPU shapes; the GPU tests use D = 128 (what the kernels are built for)
P = H * D


class Case:
    """Sizes, device and dtypes of one test setting (vLLM: bf16 activations and conv state, fp32 states)."""

    def __init__(self, heads=H, head_dim=D, device="cpu", act=torch.float32, conv_dtype=torch.float32):
        self.H, self.D, self.P = heads, head_dim, heads * head_dim
        self.device, self.act, self.conv_dtype = torch.device(device), act, conv_dtype


CPU = Case()


def make_pools(strided: bool, gen: torch.Generator, c: Case = CPU):
    """conv [S, W-1, 3P] and recurrent [S, H, D, D] (fp32) pools; `strided` puts both in one page per slot,
    as vLLM's hybrid KV cache does (slot stride = page size, not the slot's own size)."""
    conv = torch.randn(SLOTS, W - 1, 3 * c.P, generator=gen).to(c.device, c.conv_dtype)
    rec = (0.3 * torch.randn(SLOTS, c.H, c.D, c.D, generator=gen)).to(c.device)
    if not strided:
        return conv, rec
    conv_bytes, rec_bytes = conv[0].numel() * conv.element_size(), rec[0].numel() * 4
    page = conv_bytes + rec_bytes + 64  # bytes; a multiple of 4 and of 2
    raw = torch.empty(SLOTS, page, dtype=torch.uint8, device=c.device)
    conv_view = raw[:, :conv_bytes].view(c.conv_dtype).view(SLOTS, W - 1, 3 * c.P)
    rec_view = raw[:, conv_bytes:conv_bytes + rec_bytes].view(torch.float32).view(SLOTS, c.H, c.D, c.D)
    conv_view.copy_(conv)
    rec_view.copy_(rec)
    assert not conv_view.is_contiguous() and not rec_view.is_contiguous()
    return conv_view, rec_view


def make_params(lower_bound, gen: torch.Generator, c: Case = CPU) -> KimiKDAParams:
    return KimiKDAParams(
        conv_weight=(0.5 * torch.randn(3 * c.P, W, generator=gen)).to(c.device),  # vLLM keeps it fp32
        conv_bias=None,
        A_log=(torch.rand(c.H, generator=gen) * 1.5).to(c.device),
        dt_bias=(0.5 * torch.randn(c.H, c.D, generator=gen)).to(c.device),
        num_heads=c.H,
        head_dim=c.D,
        lower_bound=lower_bound,
    )


def projections(T: int, gen: torch.Generator, c: Case = CPU):
    """mixed_qkv as a column slice of a wider fused projection (row stride > 3P, as vLLM splits in_proj)."""
    fused = torch.randn(T, 3 * c.P + c.H + 5, generator=gen).to(c.device, c.act)
    mixed_qkv = fused[:, : 3 * c.P]
    beta = fused[:, 3 * c.P:3 * c.P + c.H].unsqueeze(0)  # [1, T, H], strided like vLLM's
    g = torch.randn(1, T, c.H, c.D, generator=gen).to(c.device, c.act)
    return mixed_qkv, g, beta


def reference(mixed_qkv, g, beta, conv0, rec0, params, lens, slots, has_init):
    """float64 outputs [T, H, D] and the new conv [N, W-1, 3P] / recurrent [N, H, D, D] states, on the CPU."""
    mixed_qkv, g, beta, conv0, rec0 = (t.cpu() for t in (mixed_qkv, g, beta, conv0, rec0))
    H, D = params.num_heads, params.head_dim
    P = H * D
    outs, conv_new, rec_new = [], [], []
    start = 0
    w = params.conv_weight.double().cpu()
    for n, length in enumerate(lens):
        x = mixed_qkv[start:start + length].double()
        slot = slots[n]
        fresh = slot == PAD_SLOT or not has_init[n]
        hist = torch.zeros(W - 1, 3 * P, dtype=torch.float64) if fresh else conv0[slot].double()
        seq = torch.cat([hist, x])  # [W-1+L, 3P]
        y = torch.stack([F.silu((seq[t:t + W] * w.T).sum(0)) for t in range(length)]) if length else x
        conv_new.append(seq[-(W - 1):])
        q, k, v = (y[:, i * P:(i + 1) * P].reshape(1, length, H, D).contiguous() for i in range(3))
        s0 = torch.zeros(H, D, D, dtype=torch.float64) if fresh else rec0[slot].double()
        res = kda_recurrent_reference(
            q, k, v, g[:, start:start + length].double(), beta[:, start:start + length].double(),
            params.A_log.double().cpu(), params.dt_bias.double().cpu(), lower_bound=params.lower_bound,
            initial_state=s0.float().unsqueeze(0), output_final_state=True,
        )
        o = res.out[0]
        if slot == PAD_SLOT:
            o = torch.zeros_like(o)
        outs.append(o)
        rec_new.append(res.final_state[0])
        start += length
    return torch.cat(outs), conv_new, rec_new


def rel_err(a, b) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_pools(conv, rec, conv_before, rec_before, conv_ref, rec_ref, slots, state_tol=1e-4):
    touched = [s for s in slots if s != PAD_SLOT]
    for n, s in enumerate(slots):
        if s == PAD_SLOT:
            continue
        assert rel_err(conv[s], conv_ref[n]) < 1e-6, f"conv state of sequence {n}"
        err = rel_err(rec[s], rec_ref[n])
        assert err < state_tol, f"recurrent state of sequence {n}: rel err {err:.2e}"
    for s in range(SLOTS):
        if s not in touched:
            assert torch.equal(conv[s], conv_before[s]) and torch.equal(rec[s], rec_before[s]), f"slot {s} changed"


def run_mixed_batch(c: Case, strided: bool, lower_bound, out_tol: float, state_tol: float):
    gen = torch.Generator().manual_seed(7)
    lens = [1, 1, 17, 5, 64, 130]  # two decodes first, then prefills (one continuing, three fresh)
    slots = [4, 0, 7, 2, 5, 8]
    has_init = [True, True, True, False, False, True]
    T = sum(lens)
    params = make_params(lower_bound, gen, c)
    conv, rec = make_pools(strided, gen, c)
    conv_before, rec_before = conv.clone(), rec.clone()
    mixed_qkv, g, beta = projections(T, gen, c)
    batch = VLLMKDABatch(
        num_decodes=2, num_prefills=4, num_tokens=T,
        query_start_loc=torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=c.device),
        state_indices=torch.tensor(slots, dtype=torch.int32, device=c.device),
        has_initial_state=torch.tensor(has_init, device=c.device),
    )
    # vLLM's output buffer [1, padded tokens, H, D] may be longer than the real tokens
    out = torch.full((T + 3, c.H, c.D), float("nan"), dtype=c.act, device=c.device)
    path = kimi_kda_core(mixed_qkv, g, beta, conv, rec, params, batch, out)
    assert path == "prefill"
    ref_out, conv_ref, rec_ref = reference(mixed_qkv, g, beta, conv_before, rec_before, params, lens, slots, has_init)
    assert not out[:T].isnan().any(), "some outputs were not written"
    err = rel_err(out[:T], ref_out)
    print(f"mixed batch ({c.device.type}, {'strided' if strided else 'contiguous'}, lb={lower_bound}): "
          f"rel err {err:.2e}, max abs {float((out[:T].cpu().double() - ref_out).abs().max()):.2e}")
    assert err < out_tol
    check_pools(conv, rec, conv_before, rec_before, conv_ref, rec_ref, slots, state_tol)


def run_decode_batch(c: Case, strided: bool, out_tol: float, state_tol: float):
    gen = torch.Generator().manual_seed(11)
    slots = [3, PAD_SLOT, 8, 1]
    N = len(slots)
    params = make_params(None, gen, c)
    conv, rec = make_pools(strided, gen, c)
    conv_before, rec_before = conv.clone(), rec.clone()
    mixed_qkv, g, beta = projections(N, gen, c)
    batch = VLLMKDABatch(
        num_decodes=N, num_prefills=0, num_tokens=N,
        query_start_loc=torch.arange(N + 1, dtype=torch.int32, device=c.device),
        state_indices=torch.tensor(slots, dtype=torch.int32, device=c.device),
        has_initial_state=None,
    )
    out = torch.full((N, c.H, c.D), float("nan"), dtype=c.act, device=c.device)
    assert kimi_kda_core(mixed_qkv, g, beta, conv, rec, params, batch, out) == "decode"
    ref_out, conv_ref, rec_ref = reference(mixed_qkv, g, beta, conv_before, rec_before, params, [1] * N, slots,
                                           [True] * N)
    assert not out.isnan().any()
    err = rel_err(out, ref_out)
    print(f"decode batch ({c.device.type}, {'strided' if strided else 'contiguous'}): rel err {err:.2e}")
    assert err < out_tol
    assert not out[1].any(), "a padded entry must output zeros"
    check_pools(conv, rec, conv_before, rec_before, conv_ref, rec_ref, slots, state_tol)


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous-pools", "page-strided-pools"])
@pytest.mark.parametrize("lower_bound", [None, -5.0], ids=["softplus-gate", "lower-bound-gate"])
def test_mixed_decode_prefill_batch(strided, lower_bound):
    run_mixed_batch(CPU, strided, lower_bound, out_tol=1e-4, state_tol=1e-4)


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous-pools", "page-strided-pools"])
def test_pure_decode_batch_with_padding(strided):
    run_decode_batch(CPU, strided, out_tol=1e-4, state_tol=1e-4)


GPU = dict(heads=4, head_dim=128, device="cuda", act=torch.bfloat16, conv_dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous-pools", "page-strided-pools"])
@pytest.mark.parametrize("lower_bound", [None, -5.0], ids=["softplus-gate", "lower-bound-gate"])
def test_mixed_batch_on_the_kernels(strided, lower_bound):
    """vLLM's shapes on the GPU: bf16 activations and conv pool, fp32 recurrent pool, K = V = 128."""
    run_mixed_batch(Case(**GPU), strided, lower_bound, out_tol=3e-2, state_tol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous-pools", "page-strided-pools"])
def test_decode_batch_on_the_kernels(strided):
    run_decode_batch(Case(**GPU), strided, out_tol=3e-2, state_tol=3e-2)


def test_decode_batch_rejects_multi_token_sequences():
    gen = torch.Generator().manual_seed(3)
    params = make_params(None, gen)
    conv, rec = make_pools(False, gen)
    mixed_qkv, g, beta = projections(4, gen)
    batch = VLLMKDABatch(2, 0, 4, torch.tensor([0, 2, 4], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32),
                         None)
    with pytest.raises(ValueError, match="one token per sequence"):
        kimi_kda_core(mixed_qkv, g, beta, conv, rec, params, batch, torch.empty(4, H, D))


def test_mixed_qkv_shape_is_checked():
    gen = torch.Generator().manual_seed(3)
    params = make_params(None, gen)
    conv, rec = make_pools(False, gen)
    batch = VLLMKDABatch(1, 0, 1, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32), None)
    with pytest.raises(ValueError, match="mixed_qkv"):
        kimi_kda_core(torch.zeros(1, 2 * P), torch.zeros(1, 1, H, D), torch.zeros(1, 1, H), conv, rec, params,
                      batch, torch.empty(1, H, D))


def test_run_on_pool_with_only_padding_changes_nothing():
    pool = torch.randn(6, 4).t()
    before = pool.clone()
    # like our ops, the call writes only the rows of real entries: here none
    run_on_pool(pool, torch.tensor([PAD_SLOT, PAD_SLOT]), lambda work, idx: None)
    assert torch.equal(pool, before)


def test_page_strided_pools_go_to_the_op_in_place():
    pool = torch.arange(5 * 6, dtype=torch.float32).view(5, 6)[:, :4]  # slot stride 6, slot size 4
    seen = {}

    def call(work, idx):
        seen["same"], seen["idx"] = work.data_ptr() == pool.data_ptr() and work.stride() == pool.stride(), idx
        return "done"

    indices = torch.tensor([3, PAD_SLOT, 1])
    assert run_on_pool(pool, indices, call) == "done"
    assert seen["same"] and seen["idx"] is indices


def test_run_on_pool_renumbers_and_writes_back():
    pool = torch.arange(5 * 4, dtype=torch.float32).view(4, 5).t()  # slots are columns: not contiguous
    before = pool.clone()
    seen = {}

    def call(work, idx):
        seen["contiguous"], seen["idx"] = work.is_contiguous(), idx.tolist()
        work[idx[idx != PAD_SLOT].long()] += 100
        return "done"

    assert run_on_pool(pool, torch.tensor([3, PAD_SLOT, 1]), call) == "done"
    assert seen == {"contiguous": True, "idx": [0, PAD_SLOT, 2]}  # row n holds entry n's slot
    assert torch.equal(pool[[3, 1]], before[[3, 1]] + 100)
    assert torch.equal(pool[[0, 2, 4]], before[[0, 2, 4]])
