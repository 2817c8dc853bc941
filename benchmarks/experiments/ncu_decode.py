"""Calls the bf16-pool decode step a few times on one case (H, N), random slots, for ncu (experiment helper)."""
import sys

import torch

from kda_serving.ops import kda_decode

H, N = int(sys.argv[1]), int(sys.argv[2])
dev = "cuda"
S = 2 * N
q, k, v, g = (torch.randn(N, 1, H, 128, device=dev, dtype=torch.bfloat16) for _ in range(4))
beta = torch.randn(N, 1, H, device=dev, dtype=torch.bfloat16)
A_log, dt_bias = torch.zeros(H, device=dev), torch.zeros(H, 128, device=dev)
pool = torch.randn(S, H, 128, 128, device=dev, dtype=torch.bfloat16)
slots = torch.randperm(S, device=dev)[:N].to(torch.int32)
for _ in range(3):
    kda_decode(q, k, v, g, beta, A_log, dt_bias, pool, slots)
torch.cuda.synchronize()
