"""Does where the state pool lands in device memory move the decode step? (experiment helper, GPU)

bench_decode.py's bf16 H32 N64 case read 80.9% of the floor on an H100 after the fp32 cases and 92.0% when
run alone, twice each on one card (logs/session10). Same slots, same kernel: what differs is the allocation
history, hence the pool's address. Here the case runs in one process with a spacer buffer of S MiB allocated
first (kept alive), so the pool starts S MiB further along, each placement twice; then the case after
each of several other cases, in one process.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_decode import copy_rate_bytes_per_s, run_case  # noqa: E402

import kda_serving.ops  # noqa: E402,F401

H, N, state = 32, 64, "bf16"
copy_rate = copy_rate_bytes_per_s()
l2 = torch.cuda.get_device_properties(0).L2_cache_size
print(f"copy rate {copy_rate / 1e12:.2f} TB/s")
for spacer_mib in [0, 2, 32, 256, 1024, 4096, 0, 2, 32, 256, 1024, 4096]:
    torch.cuda.empty_cache()
    spacer = torch.empty(spacer_mib << 20, dtype=torch.uint8, device="cuda") if spacer_mib else None
    row = run_case(H, N, state, copy_rate, l2, False)
    print(f"spacer {spacer_mib:5d} MiB: {row['ours_graph_us']:7.2f} us, {100 * row['floor_frac']:5.1f}% of the floor",
          flush=True)
    del spacer

# The history instead: which earlier case, run in this process, moves the next bf16 H32 N64 reading?
history = [("bf16", 32, 64), ("fp32", 96, 256), ("bf16", 32, 64), ("bf16", 32, 64), ("fp32", 32, 8),
           ("bf16", 32, 64), ("fp32", 96, 8), ("bf16", 32, 64), ("fp32", 32, 256), ("bf16", 32, 64)]
for st, h, n in history:
    torch.cuda.empty_cache()
    row = run_case(h, n, st, copy_rate, l2, False)
    print(f"{st} H{h} N{n}: {row['ours_graph_us']:8.2f} us, {100 * row['floor_frac']:5.1f}% of the floor", flush=True)
