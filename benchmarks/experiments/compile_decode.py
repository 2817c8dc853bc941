"""Would torch.compile shorten a CUDA-graph decode step? (experiment, not part of CI)

A decode step of bench_engine.py's 4-layer Kimi-Linear-48B-shaped model replays ~265 kernels; at one request
about half of its 0.96 ms of GPU time is small elementwise, reduction and routing kernels of 1-7 us each
(profile_engine_decode.py). Inductor could fuse the plain torch ops between our custom ops. This times the
engine's decode step (asynchronous scheduling, graphs) with the model as is and with parts of it compiled:

  plain ops  EngineConfig.torch_compile (KimiLinearModel.compile_plain_ops): the norms, residual add + norm and
             the MoE router, dynamic=True (one compile for every token count); what the engine does
  plain-emulate  the plain ops with emulate_precision_casts (fused intermediates rounded to bf16 as eager does)
  whole      model.forward, dynamic=False (graph breaks at each custom op; recompiles per shape and key length)
  plain+moe  the plain ops and the whole MoE.forward (grouped GEMMs included), dynamic=True

and compares the first decode step's logits with the uncompiled model's (bf16: not bit-equal).

    python benchmarks/experiments/compile_decode.py [N requests ...] [variant labels ...]
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_engine import prompts, random_kimi48b_model, release_memory  # noqa: E402

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from kda_serving.model import kimi_linear, moe  # noqa: E402


def measure(model, n: int, label: str, plain_ops: bool):
    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(device="cuda", max_num_seqs=n, max_num_batched_tokens=2048,
                                    num_state_slots=n + 4, num_kv_blocks=n * 16 + 64, torch_compile=plain_ops),
                       model=model)
    setup = time.perf_counter() - t0
    first_logits = []
    execute = engine.runner.execute

    def capturing(out, batch, *rest):
        logits = execute(out, batch, *rest)
        if batch.is_decode and not first_logits:
            first_logits.append(logits.float().clone())
        return logits

    engine.runner.execute = capturing
    params = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)
    for i, ids in enumerate(prompts(n, 8, model.config.vocab_size, seed=2)):
        engine.add_request(str(i), ids, params)
    steps = []
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        engine.step()
        if engine.last_step is not None and engine.last_step.is_decode:
            steps.append(1e3 * (time.perf_counter() - t))
    run = time.perf_counter() - t0
    print(f"{label:10s} N={n:3d}: start-up {setup:5.1f} s, run {run:5.1f} s, decode step p50 "
          f"{statistics.median(steps[8:]):.3f} ms", flush=True)
    del engine
    release_memory()
    return first_logits[0]


def main() -> None:
    sizes = [int(x) for x in sys.argv[1:] if x.isdigit()] or [1, 8, 64]
    chosen = [x for x in sys.argv[1:] if not x.isdigit()]  # variant labels to run (default: all)
    model = random_kimi48b_model(torch.device("cuda"))
    torch._dynamo.config.cache_size_limit = 64
    forward, moe_forward, compiled = model.forward, moe.MoE.forward, kimi_linear._compiled

    def restore():
        model.forward, moe.MoE.forward, kimi_linear._compiled = forward, moe_forward, compiled
        torch._dynamo.reset()

    def eager_rounding(fn):  # fused intermediates rounded to their dtype as the eager ops do
        return torch.compile(fn, dynamic=True, options={"emulate_precision_casts": True})

    variants = {  # label: (set-up, EngineConfig.torch_compile)
        "as is": (lambda: None, False),
        "plain ops": (lambda: None, True),
        "plain-emulate": (lambda: setattr(kimi_linear, "_compiled", functools.cache(eager_rounding)), True),
        "whole": (lambda: setattr(model, "forward", torch.compile(forward, dynamic=False)), False),
        "plain+moe": (lambda: setattr(moe.MoE, "forward", torch.compile(moe_forward, dynamic=True)), True),
    }
    for n in sizes:
        reference = None
        for label, (apply, plain_ops) in variants.items():
            if chosen and label != "as is" and label not in chosen:
                continue
            apply()
            try:
                logits = measure(model, n, label, plain_ops)
            except Exception as exc:  # report and go on
                print(f"{label:10s} N={n:3d}: failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                restore()
                continue
            restore()
            if reference is None:
                reference = logits
            else:
                err = (logits - reference).norm() / reference.norm()
                same = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
                print(f"  first decode step logits vs as is: rel err {err:.2e}, argmax equal {same:.2f}", flush=True)


if __name__ == "__main__":
    main()
