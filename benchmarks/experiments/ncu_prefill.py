"""Calls the prefill a few times on one case, for ncu (experiment helper)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_prefill import make_problem, ours_fn  # noqa: E402

H, T = int(sys.argv[1]), int(sys.argv[2])
p = make_problem(H, [T], False)
fn = ours_fn(p, -5.0)
for _ in range(3):
    fn()
torch.cuda.synchronize()
