"""Where a prefill step of many short prompts spends its time (experiment, not part of CI).

bench_engine.py's decode scenario prefills 64 prompts of 8 tokens in one step of 512 tokens; on an H200 that
step took 13.6 ms (p50) against 22.9 ms for a step of 8 x 1,024 tokens. This builds the same 4-layer
Kimi-Linear-48B-shaped engine, warms it on one such step, then times (perf_counter around each engine phase)
and profiles (torch.profiler, host and device) the prefill step of a fresh batch of N prompts of P tokens.

    python benchmarks/experiments/profile_prefill_step.py [--requests 64] [--prompt-len 8] [--cprofile] [--phases]

--cprofile also prints the Python functions with the most time (cProfile) over 5 more such steps. --phases
times the step's phases (schedule, build_batch, the forward's host time, its GPU time left after the host is
done, sampling) over 5 more such steps, the device synchronised after the forward.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_engine import prompts, random_kimi48b_model  # noqa: E402

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402


def time_phases(engine: LLMEngine, submit) -> None:
    """Wraps the engine's phases with timers (the forward then waits for the device) and prints their medians
    over 5 fresh prefill steps."""
    import statistics

    from kda_serving.engine import llm_engine

    spent: dict[str, list[float]] = {}

    def timed(name, fn, sync=False):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            result = fn(*a, **kw)
            t1 = time.perf_counter()
            spent.setdefault(name, []).append(1e3 * (t1 - t0))
            if sync:
                torch.cuda.synchronize()
                spent.setdefault(name + " (GPU left)", []).append(1e3 * (time.perf_counter() - t1))
            return result
        return wrapper

    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    build = llm_engine.build_batch
    llm_engine.build_batch = timed("build_batch", build)
    engine.runner.execute = timed("forward (host)", engine.runner.execute, sync=True)
    engine._sample = timed("sample", engine._sample)
    steps = []
    for seed in range(20, 25):
        submit(seed)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        steps.append(1e3 * (time.perf_counter() - t0))
        n = len(steps)
        for values in spent.values():
            del values[n:]  # only each prefill step's own phases
        while engine.has_unfinished_requests():
            engine.step()
            for values in spent.values():
                del values[n:]
    llm_engine.build_batch = build
    print(f"phases, median of {len(steps)} prefill steps ({statistics.median(steps):.2f} ms each, wall):")
    for name, values in spent.items():
        print(f"  {name:22s} {statistics.median(values):7.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--phases", action="store_true")
    args = ap.parse_args()
    model = random_kimi48b_model(torch.device("cuda"))
    engine = LLMEngine(EngineConfig(device="cuda", max_num_seqs=args.requests, max_num_batched_tokens=8192),
                       model=model)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    vocab = model.config.vocab_size

    def submit(seed: int) -> None:
        for i, ids in enumerate(prompts(args.requests, args.prompt_len, vocab, seed=seed)):
            engine.add_request(f"{seed}-{i}", ids, params)

    for seed in (1, 2):  # warm-up: compilation, graph capture, allocator
        submit(seed)
        while engine.has_unfinished_requests():
            engine.step()
    torch.cuda.synchronize()
    submit(3)
    t0 = time.perf_counter()
    engine.step()
    torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name()}: prefill step of {args.requests} x {args.prompt_len} tokens: "
          f"{1e3 * (time.perf_counter() - t0):.2f} ms wall (synchronised)")
    while engine.has_unfinished_requests():
        engine.step()
    submit(4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    print(f"GPU busy {sum(e.self_device_time_total for e in kernels) / 1e3:.2f} ms; launches "
          f"{sum(e.count for e in events if 'LaunchKernel' in e.key)}")
    print(events.table(sort_by="cpu_time_total", row_limit=45, max_name_column_width=70))
    print(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=70))
    if args.phases:
        while engine.has_unfinished_requests():
            engine.step()
        time_phases(engine, submit)
    if args.cprofile:
        import cProfile
        import io
        import pstats

        while engine.has_unfinished_requests():
            engine.step()
        prof = cProfile.Profile()
        for seed in range(5, 10):
            submit(seed)
            prof.enable()
            engine.step()
            torch.cuda.synchronize()
            prof.disable()
            while engine.has_unfinished_requests():
                engine.step()
        for order in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats(order).print_stats(45)
            print(out.getvalue())


if __name__ == "__main__":
    main()
