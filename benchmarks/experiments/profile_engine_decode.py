"""Where a GPU decode step of the engine spends its time (experiment, not part of CI).

Builds bench_engine.py's 4-layer Kimi-Linear-48B-shaped model, brings 64 requests into decode, then profiles
a few decode steps with torch.profiler: total wall time per step, GPU busy time per step, and the operators
with the most host time. Tells whether the step is bound by the GPU, by launches, or by Python.

    python benchmarks/experiments/profile_engine_decode.py [--steps 8] [--requests 64] [--no-cuda-graphs]
        [--full48b [--quantization fp8]]

--full48b profiles the whole 27-layer model of bench_kimi48b.py instead (random weights, ~51 GB with fp8 experts).

The log in benchmarks/results/logs/session7/h100-engine-decode-profile.log is of eager steps (before the engine
replayed decode steps from CUDA graphs: --no-cuda-graphs now).
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--no-cuda-graphs", action="store_true", help="profile eager decode steps")
    ap.add_argument("--full48b", action="store_true", help="the whole 27-layer model, not 4 layers")
    ap.add_argument("--quantization", default=None, choices=["fp8"])
    ap.add_argument("--rows", type=int, default=15, help="kernels listed by GPU time")
    args = ap.parse_args(argv)
    if args.full48b:
        from bench_kimi48b import full_model

        model = full_model(args.quantization)
    else:
        model = random_kimi48b_model(torch.device("cuda"))
    engine = LLMEngine(EngineConfig(device="cuda", max_num_seqs=args.requests, max_num_batched_tokens=8192,
                                    quantization=args.quantization,
                                    enable_cuda_graphs=not args.no_cuda_graphs), model=model)
    params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    for i, ids in enumerate(prompts(args.requests, 8, model.config.vocab_size, seed=2)):
        engine.add_request(str(i), ids, params)
    for _ in range(6):  # prefill, then warm decode steps
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    # Kernels only: an operator's own device time repeats that of the kernels it launched.
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.self_device_time_total for e in kernels) / args.steps
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC",
                                                         "cuLaunchKernel", "cuLaunchKernelEx")) / args.steps
    print(f"decode step ({args.requests} sequences): wall {wall_ms:.2f} ms without the profiler; GPU busy "
          f"{gpu_us / 1e3:.2f} ms per step; {launches:.0f} kernel launches per step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=90))
    print_timeline(prof, args.steps)
    return 0


# Kernel families by a substring of the kernel's name, first match wins: enough to see where a step goes.
FAMILIES = [("cuBLAS GEMM/GEMV", ("nvjet", "gemv", "cublas", "gemm", "splitK")),
            ("MoE experts (ours)", ("moe::",)), ("MoE routing (ours)", ("router_", "sort_pairs")),
            ("KDA decode", ("decode::",)), ("short conv", ("conv::",)), ("gated norm", ("norm::",)),
            ("MLA decode", ("mla::",)), ("fp8 quantize", ("quant",)), ("sampling", ("sampling::", "radix")),
            ("torch.compile (triton)", ("triton_",)), ("torch elementwise/index/copy", ("at::native",))]


def family(name: str) -> str:
    for label, keys in FAMILIES:
        if any(k in name for k in keys):
            return label
    return "other"


def print_timeline(prof, steps: int) -> None:
    """Per step: kernels, GPU busy time, the idle time between kernels, and the busy time by kernel family."""
    kernels = sorted((e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    if not kernels:
        return
    busy, idle, by_family, prev_end = 0.0, 0.0, {}, None
    for e in kernels:
        start, end = e.time_range.start, e.time_range.end
        if prev_end is not None and start > prev_end:
            gap = start - prev_end
            idle += gap if gap < 200 else 0.0  # a gap over 200 us is the host between steps, not a kernel boundary
        busy += end - start
        by_family[family(e.name)] = by_family.get(family(e.name), 0.0) + end - start
        prev_end = max(prev_end or end, end)
    print(f"timeline per step: {len(kernels) / steps:.0f} kernels, busy {busy / steps / 1e3:.3f} ms, idle between "
          f"kernels {idle / steps / 1e3:.3f} ms ({idle / max(len(kernels) - 1, 1):.2f} us per boundary)")
    for label, us in sorted(by_family.items(), key=lambda kv: -kv[1]):
        n = sum(1 for e in kernels if family(e.name) == label) / steps
        print(f"  {label:32s} {us / steps / 1e3:7.3f} ms  {n:5.0f} kernels  {us / max(n * steps, 1):6.2f} us each")


if __name__ == "__main__":
    sys.exit(main())
