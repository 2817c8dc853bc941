"""Experiment (not CI): does the decode step's speed depend on the order of the slots it visits?

bench_decode gives each step a random permutation of its N slots (an engine's slots come in any order). Here
the same cases run with the slots in order (sequence n in slot n), so consecutive CTAs stream consecutive
memory, against the permuted order, in the same process; ours only.

    python benchmarks/experiments/decode_slot_order.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import bench_decode  # noqa: E402
from common import copy_rate_bytes_per_s  # noqa: E402

import kda_serving.ops  # noqa: E402,F401

copy_rate = copy_rate_bytes_per_s()
l2 = torch.cuda.get_device_properties(0).L2_cache_size
randperm = torch.randperm
for state in ("bf16", "fp32"):
    for H, N in ((32, 64), (32, 256), (96, 64), (96, 256)):
        fracs = {}
        for order in ("permuted", "in order", "permuted again"):
            bench_decode.torch.randperm = randperm if order != "in order" else (
                lambda n, generator=None, device=None: torch.arange(n, device=device))
            torch.cuda.empty_cache()
            fracs[order] = bench_decode.run_case(H, N, state, copy_rate, l2, False)["floor_frac"]
        bench_decode.torch.randperm = randperm
        print(f"{state} H{H} N{N}: " + "  ".join(f"{k} {100 * v:.1f}%" for k, v in fracs.items()), flush=True)
