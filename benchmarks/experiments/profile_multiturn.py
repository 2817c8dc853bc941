"""Where a multi-turn conversation's time to first token goes (experiment, not part of CI).

bench_engine.py's multiturn scenario puts a 2,048-token turn after a cached history at 35-55 ms to the first
token on the 4-layer Kimi-Linear-48B-shaped model, several times the GPU work such a step holds. This runs
one conversation (cache on) twice, each time on a fresh engine in the same process, so the second pass tells
what the first paid for shapes it had not seen (compilation, autotuning, allocator growth). Per turn it
prints the time to the first token, the steps it took and each step's wall time. Then it profiles one more
turn (torch.profiler, host and device) and prints the device's busy time beside the wall time and the
operators with the most host time.

    python benchmarks/experiments/profile_multiturn.py [--turns 8] [--user-tokens 2048] [--mla-prefill kernels]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_engine import prompts, random_kimi48b_model, release_memory  # noqa: E402

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from kda_serving.engine import llm_engine  # noqa: E402
from kda_serving.model import mla_block, mla_prefill  # noqa: E402


def timed(phases: list, name: str, fn, sync: bool):
    """fn, appending (name, ms) to phases at each call; with sync, the device's queue is drained first, so the
    time includes the device work the call queued."""
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if sync:
                torch.cuda.synchronize()
            phases.append((name, 1e3 * (time.perf_counter() - t0)))
    return wrapper


def instrument(engine: LLMEngine, phases: list, sync: bool) -> None:
    engine.scheduler.schedule = timed(phases, "schedule", engine.scheduler.schedule, sync)
    engine.scheduler.update = timed(phases, "update", engine.scheduler.update, sync)
    engine.runner.execute = timed(phases, "execute", engine.runner.execute, sync)
    engine._sample = timed(phases, "sample", engine._sample, sync)
    engine._finish = timed(phases, "finish", engine._finish, sync)


def one_turn(engine: LLMEngine, tokens: list[int], params: SamplingParams, tag: str) -> tuple[float, list[int]]:
    """Runs one request to completion; returns the time to its first token and its output tokens."""
    start = time.perf_counter()
    engine.add_request(tag, tokens, params)
    ttft, steps, output = None, [], []
    while engine.has_unfinished_requests():
        PHASES.clear()
        t0 = time.perf_counter()
        outs = engine.step()
        t1 = time.perf_counter()
        if ttft is None:
            phases = " ".join(f"{name} {ms:.1f}" for name, ms in PHASES)
            steps.append((1e3 * (t1 - t0), engine.last_step.num_prefill_tokens if engine.last_step else 0, phases))
        for out in outs:
            if ttft is None and out.new_token_ids:
                ttft = 1e3 * (t1 - start)
            output += out.new_token_ids
    return ttft, steps, output


PHASES: list = []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--user-tokens", type=int, default=2048)
    ap.add_argument("--turn-output-len", type=int, default=16)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--mla-prefill", default="kernels", choices=["kernels", "flash2", "torch"])
    ap.add_argument("--no-torch-compile", action="store_true")
    ap.add_argument("--no-async", action="store_true")
    ap.add_argument("--sync-phases", action="store_true", help="drain the device after each timed phase")
    args = ap.parse_args(argv)
    mla_block.PREFILL_ON_KERNELS = args.mla_prefill != "torch"
    mla_prefill.OWN_KERNEL = args.mla_prefill == "kernels"
    model = random_kimi48b_model(torch.device("cuda"))
    vocab = model.config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.turn_output_len, ignore_eos=True, output_kind="delta")
    users = prompts(args.turns + 1, args.user_tokens, vocab, seed=7)
    history = (args.turns + 1) * (args.user_tokens + args.turn_output_len)
    config = dict(device="cuda", max_num_seqs=64, max_num_batched_tokens=8192, enable_prefix_caching=True,
                  num_kv_blocks=2 * (history // 16 + 1) + 64, num_state_slots=4 * (args.turns + 1) + 64)
    if args.no_torch_compile:
        config["torch_compile"] = False
    if args.no_async:
        config["async_scheduling"] = False
    llm_engine.build_batch = timed(PHASES, "build_batch", llm_engine.build_batch, args.sync_phases)
    print(f"{torch.cuda.get_device_name()}  mla_prefill={args.mla_prefill}  {config}")
    engine = None
    for p in range(args.passes + 1):
        profiling = p == args.passes
        engine = LLMEngine(EngineConfig(**config), model=model)
        instrument(engine, PHASES, args.sync_phases)
        one_turn(engine, prompts(1, 16, vocab, seed=0)[0], dataclasses.replace(params, max_tokens=2), "warm")
        conv = []
        for turn in range(args.turns if not profiling else args.turns - 1):
            conv = conv + users[turn]
            torch.cuda.synchronize()
            ttft, steps, output = one_turn(engine, conv, params, f"p{p}t{turn}")
            conv = conv + output
            if not profiling:
                print(f"pass {p} turn {turn + 1} prompt {len(conv) - len(output)}: ttft {ttft:.1f} ms; steps to it "
                      + "; ".join(f"{ms:.1f} ms ({n} prompt tok: {ph})" for ms, n, ph in steps))
        if profiling:
            conv = conv + users[args.turns - 1]
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                ttft, steps, _ = one_turn(engine, conv, dataclasses.replace(params, max_tokens=1), "profiled")
                torch.cuda.synchronize()
            events = prof.key_averages()
            kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
            gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3
            print(f"profiled turn, prompt {len(conv)}: ttft {ttft:.1f} ms under the profiler; GPU busy {gpu_ms:.2f} ms;"
                  f" steps " + "; ".join(f"{ms:.1f} ms ({n} prompt tok: {ph})" for ms, n, ph in steps))
            syncs = {e.key: e.count for e in events if any(k in e.key for k in (
                "Synchronize", "_local_scalar_dense", "cudaMemcpy", "cudaMalloc", "cudaHostAlloc", "nonzero"))}
            print(f"host waits and allocations: {syncs}")
            launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC",
                                                                 "cuLaunchKernel", "cuLaunchKernelEx"))
            print(f"kernel launches: {launches}")
            print(events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))
            print(events.table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=70))
            print(events.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=70))
        del engine
        release_memory()
    return 0


if __name__ == "__main__":
    sys.exit(main())
