"""Where the host time of a GPU decode step goes (experiment, not part of CI): the engine's phases timed with
perf_counter around schedule, build_batch, the runner's execute (copies into the graph's buffers and the
replay launch; asynchronous) and the sampler (which waits for the GPU), over decode steps of bench_engine.py's
4-layer Kimi-Linear-48B-shaped model.

    python benchmarks/experiments/engine_step_phases.py [N requests ...]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_engine import prompts, random_kimi48b_model, release_memory  # noqa: E402

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from kda_serving.engine import llm_engine  # noqa: E402


def timed(store: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            store.setdefault(name, []).append(1e3 * (time.perf_counter() - t0))
    wrapper.__wrapped__ = fn
    return wrapper


def main() -> None:
    sizes = [int(x) for x in sys.argv[1:]] or [1, 32]
    model = random_kimi48b_model(torch.device("cuda"))
    for n in sizes:
        engine = LLMEngine(EngineConfig(device="cuda", max_num_seqs=max(sizes), max_num_batched_tokens=8192),
                           model=model)
        times: dict[str, list[float]] = {}
        engine.scheduler.schedule = timed(times, "schedule", engine.scheduler.schedule)
        llm_engine.build_batch = timed(times, "build_batch", llm_engine.build_batch)
        engine.runner.execute = timed(times, "execute", engine.runner.execute)
        engine.sampler = timed(times, "sample (waits for the GPU)", engine.sampler)
        engine._advance = timed(times, "advance", engine._advance)
        params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
        for i, ids in enumerate(prompts(n, 8, model.config.vocab_size, seed=2)):
            engine.add_request(str(i), ids, params)
        for _ in range(5):
            engine.step()
        times.clear()
        steps = []
        for _ in range(40):
            t0 = time.perf_counter()
            engine.step()
            steps.append(1e3 * (time.perf_counter() - t0))
        print(f"N={n}: step {statistics.median(steps):.3f} ms (median of 40)")
        for name, values in times.items():
            print(f"  {name:28s} {statistics.median(values):.3f} ms per call, {len(values) / 40:.0f} calls per step")
        llm_engine.build_batch = llm_engine.build_batch.__wrapped__
        del engine
        release_memory()


if __name__ == "__main__":
    main()
