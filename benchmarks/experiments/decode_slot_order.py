"""Experiment (not CI): does the decode step's speed depend on the order of the slots it visits?

bench_decode gives each step a random permutation of N consecutive slots. Here the same kernel runs, in one
process, on four slot sets per case: N consecutive slots in order / permuted, and N slots drawn at random
from 4N (a pool shared with other sequences and cache entries, as an engine's is) sorted / permuted. Ours only;
graph of 20 steps on disjoint slot sets, as bench_decode.

    python benchmarks/experiments/decode_slot_order.py [bf16] [fp32]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_decode import D, STATE_DTYPES, graph_us_per_step, make_step, ours_call  # noqa: E402
from common import copy_rate_bytes_per_s  # noqa: E402

import kda_serving.ops  # noqa: E402,F401

STEPS, SPREAD = 20, 4
copy_rate = copy_rate_bytes_per_s()


def slot_sets(N, order, gen):
    sets = []
    for r in range(STEPS):
        base = r * SPREAD * N
        if order.startswith("consecutive"):
            s = torch.arange(N, device="cuda")
        else:  # N of the 4N slots of this step's range, sorted
            s = torch.randperm(SPREAD * N, generator=gen, device="cuda")[:N].sort().values
        if order.endswith("permuted"):
            s = s[torch.randperm(N, generator=gen, device="cuda")]
        sets.append((s + base).to(torch.int32))
    return sets


for state in sys.argv[1:] or ("bf16", "fp32"):
    for H, N in ((32, 64), (32, 256), (96, 64)):
        pool = None  # the previous case's pool (up to 42 GB) goes back first
        torch.cuda.empty_cache()
        gen = torch.Generator(device="cuda").manual_seed(N * 1000 + H)
        step = make_step(N, H, gen)
        pool = torch.empty(STEPS * SPREAD * N, H, D, D, dtype=STATE_DTYPES[state], device="cuda").normal_(0, 0.1)
        out = torch.empty_like(step["v"])
        floor_us = 2 * N * H * D * D * pool.element_size() / copy_rate * 1e6
        fracs = {}
        for order in ("consecutive permuted", "consecutive in order", "spread permuted", "spread sorted",
                      "consecutive permuted again"):
            sets = slot_sets(N, order, gen)
            fracs[order] = floor_us / graph_us_per_step(lambda r: ours_call(step, pool, sets[r], out), STEPS)
        print(f"{state} H{H} N{N}: " + "  ".join(f"{k} {100 * v:.1f}%" for k, v in fracs.items()), flush=True)
