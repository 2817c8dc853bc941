"""Eager GPU steps do not wait for the device before the sampler reads the tokens back.

The ops' own index checks copy cu_seqlens and slot indices to the host (a synchronisation per op call); the
engine checks its batch once on the host instead (RaggedBatch.check) and runs the model inside
ops.indices_checked_by_caller. torch's sync debug mode turns any synchronising call inside the model
runner, or in the sampler's choice and its copy back (asynchronous scheduling), into an error here: prefills with prefix-cache checkpoints, a follow-up turn restored from the cache
(state copies), a mixed prefill + decode step, and the CUDA-graph decode steps between them.
"""

from __future__ import annotations

import pytest
import torch

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["default", "paged-kernels"])
def test_eager_steps_run_the_model_without_a_host_sync(monkeypatch, model):
    """model: the embedded default (MLA on torch ops), or one whose MLA layer runs on our CUDA kernels (the
    flash kernel for prompt tokens, the paged kernel for cached context and decodes)."""
    from model.kimi_testing import paged_kernel_model  # tests/model/kimi_testing.py

    weights = paged_kernel_model(seed=1) if model == "paged-kernels" else None
    engine = LLMEngine(EngineConfig(device="cuda", max_num_seqs=8, num_state_slots=48, num_kv_blocks=256,
                                    block_size=16, prefix_cache_interval=64, enable_prefix_caching=True),
                       model=weights)
    runner = engine.runner
    execute = runner.execute
    eager_steps = []

    def strict_execute(out, batch, pending_inputs=None):
        eager = not batch.is_decode or batch.checkpoints is not None
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits = execute(out, batch, pending_inputs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        if eager:
            eager_steps.append((out.num_tokens, bool(out.state_restores), bool(out.checkpoints)))
        fed_from_device.append(pending_inputs is not None)
        return logits

    sample = engine._sample

    def strict_sample(out, logits, previous):  # asynchronous scheduling: the choice and its copy to the host
        torch.cuda.set_sync_debug_mode("error")
        try:
            return sample(out, logits, previous)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    fed_from_device = []
    monkeypatch.setattr(runner, "execute", strict_execute)
    monkeypatch.setattr(engine, "_sample", strict_sample)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt = [5 + (7 * i) % 200 for i in range(150)]
    engine.add_request("a", prompt, greedy)
    engine.add_request("b", list(range(3, 40)), greedy)
    finished = {}

    def run():
        while engine.has_unfinished_requests():
            finished.update((o.request_id, o) for o in engine.step() if o.finished)

    run()
    # a follow-up turn on "a" (restored from the prefix cache), then a new prompt beside its decodes
    engine.add_request("c", prompt + list(finished["a"].output_token_ids) + [9, 10, 11], greedy)
    engine.step()
    engine.add_request("d", list(range(50, 120)), greedy)
    run()
    assert sorted(finished) == list("abcd") and all(len(o.output_token_ids) == 6 for o in finished.values())
    assert engine.stats().prefix_cache_hit_tokens > 0
    assert engine.config.async_scheduling and sum(fed_from_device) > 10  # decodes fed tokens left on the device
    assert any(restored for _, restored, _ in eager_steps), eager_steps
    assert any(ckpt for _, _, ckpt in eager_steps), eager_steps
    assert any(tokens == 70 + 1 for tokens, _, _ in eager_steps), eager_steps  # d's prefill + c's decode
