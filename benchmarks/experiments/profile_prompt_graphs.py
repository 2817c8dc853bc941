"""Where a step with prompt tokens spends its host time once its pieces replay from graphs (experiment, not CI).

Builds bench_prompt_step.py's engine (4 Kimi-Linear-48B-shaped layers), then for one of its steps (--step, a
name from its STEPS) times the phases of ModelRunner.execute on the graph path (perf_counter, the device
synchronised before and after) and profiles it (torch.profiler: host ops by total time, the launches).

    python benchmarks/experiments/profile_prompt_graphs.py [--step "1 prompt x 16"]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_engine import random_kimi48b_model  # noqa: E402
from bench_prompt_step import STEPS, make_step, step_engine  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", default="1 prompt x 16")
    args = ap.parse_args()
    seqs = dict(STEPS)[args.step]
    model = random_kimi48b_model(torch.device("cuda"))
    engine = step_engine(model, [seqs])
    runner = engine.runner
    batch = make_step(seqs, model.config.vocab_size, torch.Generator().manual_seed(0))
    nothing = SimpleNamespace(state_restores=[], block_copies=[], state_saves=[])
    for _ in range(5):
        runner.execute(nothing, batch)

    # phases: the mixers, the replays and the logits, host time each (device synchronised around the step)
    spent: dict[str, list[float]] = {}
    graphs = runner.prompt_graphs
    mix, logits = model.mix, model.logits

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            spent.setdefault(name, []).append(1e6 * (time.perf_counter() - t0))
            return out
        return wrapper

    model.mix, model.logits = timed("mix", mix), timed("logits", logits)
    bucket = graphs.captured[graphs.bucket(batch.num_tokens)]
    for g in bucket.graphs:
        g.replay = timed("replay", g.replay)
    run = graphs.run
    graphs.run = timed("PromptGraphs.run", run)
    walls = []
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.execute(nothing, batch)
        walls.append(1e6 * (time.perf_counter() - t0))
        torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name()}: step {args.step!r} ({batch.num_tokens} tokens): execute host "
          f"{statistics.median(walls):.0f} us (median of 10)")
    for name, values in spent.items():
        per_step = len(values) // 10
        print(f"  {name:18s} {per_step:3d} calls/step, {statistics.median(values):7.1f} us median each, "
              f"{sum(values) / 10:7.1f} us/step")
    model.mix, model.logits, graphs.run = mix, logits, run

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        runner.execute(nothing, batch)
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=60))


if __name__ == "__main__":
    main()
