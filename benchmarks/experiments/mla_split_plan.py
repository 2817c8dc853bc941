"""Experiment (not part of CI): where a paged MLA decode call spends its time, and how the split plan moves it.

For each (sequences, context) case and each plan (CTAs per SM targeted; each split holds whole 64-key tiles, the
kernel's; sessions before 17 also varied that granule), the call is timed by CUDA-graph replay, and one eager
call is profiled for the split and combine kernels' own times. 32 heads, 16-token blocks shuffled over the
cache (bench_mla_decode.py's inputs).

    python benchmarks/experiments/mla_split_plan.py [--plans 1,2] [--cases 1x4096,8x1024]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import copy_rate_bytes_per_s, graph_replay_us  # noqa: E402

from kda_serving.ops import cuda_mla, mla_decode  # noqa: E402

mla_mod = sys.modules["kda_serving.ops.mla_decode"]  # the module (the package exports the function by that name)

HEADS, LATENT, VALUE, BLOCK = 32, 576, 512, 16
CASES = "1x4096,8x1024,8x16384,64x1024,64x4096,16x32768,1x1024,32x2048,128x1024,256x1024"


def kernel_us(fn) -> dict[str, float]:
    """Mean device time per call of each kernel fn() launches, over 10 eager calls."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.device_type == torch.autograd.DeviceType.CUDA and "mla" in ev.key:
            name = "split" if "split" in ev.key else "combine" if "combine" in ev.key else ev.key[:30]
            times[name] = ev.device_time_total / 10
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plans", default="1,2")
    ap.add_argument("--cases", default=CASES)
    args = ap.parse_args()
    rate = copy_rate_bytes_per_s()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}  copy rate {rate / 1e12:.2f} TB/s  {sms} SMs")
    gen = torch.Generator(device="cuda").manual_seed(0)
    tile = cuda_mla.plan_constants(HEADS)[1]
    for spec in args.cases.split(","):
        N, C = (int(x) for x in spec.split("x"))
        blocks = N * (-(-C // BLOCK)) + 1
        cache = torch.randn(blocks, BLOCK, LATENT, generator=gen, device="cuda").to(torch.bfloat16)
        tables = torch.randperm(blocks, generator=gen, device="cuda")[: blocks - 1].view(N, -1).to(torch.int32)
        lens = torch.full((N,), C, dtype=torch.int32, device="cuda")
        q = torch.randn(N, HEADS, LATENT, generator=gen, device="cuda").to(torch.bfloat16)
        floor_us = N * C * LATENT * 2 / rate * 1e6
        for plan in args.plans.split(","):
            ctas_per_sm = int(plan)
            cuda_mla.plan_constants = lambda heads, c=ctas_per_sm, t=tile: (c, t)  # the plan mla_decode uses
            splits = mla_mod.plan_splits(N, C, sms, ctas_per_sm)
            tiles = -(-C // tile)
            kps = -(-tiles // splits) * tile

            def call():
                return mla_decode(q, cache, tables, lens, scale=0.07, max_seq_len=C, value_dim=VALUE)

            t = graph_replay_us(call, iters=30)
            parts = kernel_us(call)
            detail = "  ".join(f"{k} {v:6.1f}" for k, v in sorted(parts.items(), reverse=True))
            print(f"N {N:3d} C {C:6d} plan {plan:6s} splits {splits:3d} x {kps:5d} keys: graph {t:7.1f} us "
                  f"floor {floor_us:6.1f} ({100 * floor_us / t:4.1f}%)  eager kernels: {detail}", flush=True)
        del cache, tables, lens, q
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
