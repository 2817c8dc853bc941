"""Calls a Kimi-Linear-48B router (ops.moe_route) and pair sort a few times at T tokens, for Nsight Compute
(experiment, not part of CI):

    ncu --kernel-name regex:"router|sort_pairs" --launch-skip 3 --launch-count 3 --section SpeedOfLight \
        --section WarpStateStats python3 benchmarks/experiments/ncu_moe_route.py 1
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kda_serving.ops import moe_route, moe_sort_pairs  # noqa: E402

T = int(sys.argv[1]) if len(sys.argv) > 1 else 1
gen = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(T, 2304, device="cuda", generator=gen).to(torch.bfloat16)
router = (torch.randn(256, 2304, device="cuda", generator=gen) / 16).to(torch.bfloat16)
bias = 0.1 * torch.randn(256, device="cuda", generator=gen)
for _ in range(3):
    ids, weights = moe_route(x, router, bias, 8, 1, 1, True, 2.446)
    moe_sort_pairs(ids, 256)
torch.cuda.synchronize()
