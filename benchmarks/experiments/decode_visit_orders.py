"""Experiment (not CI): which visit order of the decode kernel streams the state fastest?

bench_decode's setup (R graph steps, each a random permutation of N consecutive slots), ours only, the same
slots visited in several orders through the kernel's visit array, each order twice, interleaved:
batch order (no visit array), ascending slots (ops.slot_visit_order), descending, and ascending with the two
halves interleaved (two sweep fronts).

    python benchmarks/experiments/decode_visit_orders.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_decode import graph_us_per_step, make_case, ours_call  # noqa: E402
from common import copy_rate_bytes_per_s  # noqa: E402

from kda_serving.ops import slot_visit_order  # noqa: E402


def orders(slots):
    up = slot_visit_order(slots)  # (N is even in every case)
    two_fronts = torch.stack((up[: len(up) // 2], up[len(up) // 2 :]), 1).reshape(-1, 2).contiguous()
    return {"batch": None, "ascending": up, "descending": up.flip(0).contiguous(), "two fronts": two_fronts}


copy_rate = copy_rate_bytes_per_s()
l2 = torch.cuda.get_device_properties(0).L2_cache_size
for state, H, N in (("bf16", 96, 256), ("bf16", 32, 64), ("fp32", 96, 64), ("bf16", 32, 256)):
    pool = None  # the previous case's pool goes back first
    torch.cuda.empty_cache()
    step, pool, sets, out, state_bytes = make_case(H, N, state, l2)
    reps = len(sets)
    per_set = [orders(s) for s in sets]
    floor_us = 2 * state_bytes / copy_rate * 1e6
    line = []
    for rnd in range(2):
        for name in per_set[0]:
            us = graph_us_per_step(lambda r: ours_call(step, pool, sets[r], out, per_set[r][name]), reps)
            line.append(f"{name} {100 * floor_us / us:.1f}%")
    print(f"{state} H{H} N{N}: " + "  ".join(line), flush=True)
