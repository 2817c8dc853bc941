"""On the GPU with fla installed: fla's chunk_kda dispatches to kda-serving (fla logs it) and matches fla's own
Triton result, for both gate forms (the softplus form is the one FlashKDA rejects), varlen, initial states in
both layouts. Both are compared with the float64 reference: ours must be within a small factor of Triton's
error (plus a floor for bf16 output rounding)."""

from __future__ import annotations

import logging
from inspect import unwrap

import pytest
import torch

pytest.importorskip("fla.ops.kda")

from fla.backends import _function_registries  # noqa: E402
from fla.ops.kda import chunk_kda, fused_recurrent_kda  # noqa: E402

from kda_serving.integrations import fla_backend  # noqa: E402
from kda_serving.ops import kda_recurrent_reference  # noqa: E402

pytestmark = pytest.mark.gpu
H, K = 4, 128
FLAGS = dict(use_gate_in_kernel=True, use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True)


def rel_err(a, b) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).norm() / b.norm())


def inputs(T: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g = (torch.randn(1, T, H, K, generator=gen).to("cuda", torch.bfloat16) for _ in range(4))
    beta = torch.randn(1, T, H, generator=gen).to("cuda", torch.bfloat16)
    A_log = (torch.rand(H, generator=gen) * 1.5).cuda()
    dt_bias = (0.5 * torch.randn(H * K, generator=gen)).cuda()
    return q, k, v, g, beta, A_log, dt_bias


@pytest.mark.parametrize("lower_bound", [None, -5.0], ids=["softplus-gate", "lower-bound-gate"])
@pytest.mark.parametrize("state_v_first", [True, False], ids=["v-first-state", "k-first-state"])
def test_chunk_kda_dispatches_to_us_and_matches_triton(monkeypatch, caplog, lower_bound, state_v_first):
    assert fla_backend.register()
    cu = torch.tensor([0, 1, 63, 64, 65, 300, 1000], dtype=torch.long, device="cuda")
    q, k, v, g, beta, A_log, dt_bias = inputs(int(cu[-1]), seed=1)
    h0_vk = torch.randn(6, H, K, K, device="cuda") * 0.1
    h0 = h0_vk if state_v_first else h0_vk.transpose(-1, -2).contiguous()
    kw = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu, lower_bound=lower_bound,
              safe_gate=lower_bound is not None, state_v_first=state_v_first, A_log=A_log, dt_bias=dt_bias, **FLAGS)
    _function_registries[unwrap(chunk_kda)]._logged.clear()
    with caplog.at_level(logging.INFO, logger="fla.backends"), torch.inference_mode():
        o_ours, ht_ours = chunk_kda(q, k, v, g, beta, **kw)
    assert "chunk_kda -> kda_serving" in caplog.text
    monkeypatch.setenv("KDA_SERVING_FLA", "0")  # our backend steps aside; FlashKDA is absent or declines
    monkeypatch.setenv("FLA_FLASH_KDA", "0")
    with torch.inference_mode():
        o_triton, ht_triton = chunk_kda(q, k, v, g, beta, **kw)
    ref = kda_recurrent_reference(q.double(), k.double(), v.double(), g.double(), beta.double(), A_log,
                                  dt_bias.view(H, K), lower_bound=lower_bound, cu_seqlens=cu, initial_state=h0_vk,
                                  output_final_state=True)
    to_vk = (lambda s: s) if state_v_first else (lambda s: s.transpose(-1, -2))
    e_ours, e_tri = rel_err(o_ours, ref.out), rel_err(o_triton, ref.out)
    s_ours, s_tri = rel_err(to_vk(ht_ours), ref.final_state), rel_err(to_vk(ht_triton), ref.final_state)
    print(f"chunk_kda lb={lower_bound} v_first={state_v_first}: out ours {e_ours:.2e} triton {e_tri:.2e}; "
          f"state ours {s_ours:.2e} triton {s_tri:.2e}; ours vs triton {rel_err(o_ours, o_triton):.2e}")
    assert not o_ours.isnan().any() and not ht_ours.isnan().any()
    assert ht_ours.shape == h0.shape and ht_ours.dtype == torch.float32
    assert e_ours <= 2 * e_tri + 5e-3 and s_ours <= 2 * s_tri + 5e-3


def test_fused_recurrent_kda_dispatches_to_us_and_matches_triton(monkeypatch):
    assert fla_backend.register()
    gen = torch.Generator().manual_seed(2)
    B = 3
    q, k, v, g = (torch.randn(B, 2, H, K, generator=gen).to("cuda", torch.bfloat16) for _ in range(4))
    beta = torch.randn(B, 2, H, generator=gen).to("cuda", torch.bfloat16)
    A_log, dt_bias = (torch.rand(H, generator=gen) * 1.5).cuda(), (0.5 * torch.randn(H * K, generator=gen)).cuda()
    h0 = torch.randn(B, H, K, K, device="cuda") * 0.1
    kw = dict(A_log=A_log, dt_bias=dt_bias, initial_state=h0, output_final_state=True, state_v_first=True, **FLAGS)
    with torch.inference_mode():
        o_ours, ht_ours = fused_recurrent_kda(q, k, v, g, beta, **kw)
    monkeypatch.setenv("KDA_SERVING_FLA", "0")
    with torch.inference_mode():
        o_tri, ht_tri = fused_recurrent_kda(q, k, v, g, beta, **kw)
    ref = kda_recurrent_reference(q.double(), k.double(), v.double(), g.double(), beta.double(), A_log,
                                  dt_bias.view(H, K), initial_state=h0, output_final_state=True)
    assert rel_err(o_ours, ref.out) <= 2 * rel_err(o_tri, ref.out) + 5e-3
    assert rel_err(ht_ours, ref.final_state) <= 2 * rel_err(ht_tri, ref.final_state) + 5e-3
