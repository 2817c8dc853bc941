"""KDA recurrent states kept in bf16 (EngineConfig.kda_state_dtype="bfloat16") against fp32 states.

A dense random model (3 KDA layers of head size 128 and one MLA layer; no MoE, whose expert choice is
discontinuous: a near-tie flips with any rounding and moves a token's logits by O(1)) runs the same tokens (a
packed prefill of two prompts, then decode steps fed the same tokens) once with fp32 and once with bf16 state
pools. bf16 rounds each state once per step (unit roundoff 2^-9), an error that decays with the gate rather
than accumulating, so the logits stay within a few 1e-3 of the fp32-state run: the bound 2e-2 (relative norm,
every token) fails a state that is dropped, misplaced or never written back by orders of magnitude. On the GPU
(bf16 weights) both state dtypes are measured against the fp32 CPU truth instead; see that test.
"""

from __future__ import annotations

import statistics

import pytest
import torch
from kimi_testing import per_token_rel as _rel
from kimi_testing import run_two_prompts as _run
from kimi_testing import save_dense_checkpoint

from kda_serving.model import load_model

BLOCK = 16


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory) -> str:
    return save_dense_checkpoint(str(tmp_path_factory.mktemp("dense")), seed=12)


def test_bf16_states_track_fp32_states_cpu(dense_checkpoint):
    model = load_model(dense_checkpoint, device="cpu", progress=False)
    ref, ours = _run(model, torch.float32), _run(model, torch.bfloat16)
    assert all(torch.isfinite(o).all() for o in ours)
    errs = _rel(ours, ref)
    print(f"cpu: worst per-token logits rel {max(errs):.2e}")
    assert max(errs) <= 2e-2


@pytest.mark.gpu
def test_bf16_states_track_fp32_states_cuda(dense_checkpoint):
    """On the GPU the model itself runs in bf16, whose rounding alone puts the logits 1-3e-2 off the fp32 truth
    (tests/model/test_model_gpu.py) and moves with any change of kernel path. So both GPU runs are measured
    against the fp32 CPU model with fp32 states, and the bf16-state run may be off by at most 1.25x the
    fp32-state run's error plus 5e-3 (the bf16 state's own share, ~1e-3 on the CPU)."""
    truth = _run(load_model(dense_checkpoint, device="cpu", progress=False), torch.float32)
    model = load_model(dense_checkpoint, device="cuda", progress=False)
    fp32, bf16 = _run(model, torch.float32), _run(model, torch.bfloat16)
    assert all(torch.isfinite(o).all() for o in bf16)
    e32 = statistics.median(_rel(fp32, truth))
    e16 = statistics.median(_rel(bf16, truth))
    w32, w16 = max(_rel(fp32, truth)), max(_rel(bf16, truth))
    print(f"cuda vs fp32 truth, median (worst) per token: fp32 states {e32:.2e} ({w32:.2e}), "
          f"bf16 states {e16:.2e} ({w16:.2e})")
    assert e16 <= 1.25 * e32 + 5e-3 and w16 <= 1.25 * w32 + 5e-3


def test_bf16_state_slot_bytes_and_bad_dtype():
    model = load_model(None, progress=False)
    caches = model.allocate_caches(3, 2, BLOCK, state_dtype=torch.bfloat16)
    per_slot = sum(p[0].numel() * p.element_size() for p in (*caches.recurrent, *caches.conv))
    assert model.state_slot_bytes(torch.bfloat16) == per_slot
    assert model.state_slot_bytes(torch.bfloat16) < model.state_slot_bytes()
    with pytest.raises(ValueError, match="state_dtype"):
        model.allocate_caches(3, 2, BLOCK, state_dtype=torch.float16)
