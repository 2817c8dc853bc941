"""Quickstart: one KDA prefill and a few decode steps through the public ops, checked against the float64 truth.

    python examples/quickstart.py            # CPU reference path; on a GPU machine with the library built, CUDA
"""

import torch

from kda_serving.ops import kda_decode, kda_prefill, kda_recurrent_reference

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
H, K = 4, 128
lengths = [300, 17, 1]
T = sum(lengths)
gen = torch.Generator().manual_seed(0)


def rand(*shape, std=1.0):
    return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)


q, k, v, g, beta = rand(1, T, H, K), rand(1, T, H, K), rand(1, T, H, K), rand(1, T, H, K), rand(1, T, H)
A_log = torch.zeros(H, device=device)
dt_bias = torch.zeros(H, K, device=device)
cu_seqlens = torch.tensor([0, 300, 317, 318], device=device)
pool = torch.zeros(8, H, K, K, device=device)  # [S, H, V, K] state slots
slots = torch.tensor([5, 2, 7], device=device)

out, _ = kda_prefill(q, k, v, g, beta, A_log, dt_bias, cu_seqlens=cu_seqlens, state_pool=pool, state_indices=slots)
ref = kda_recurrent_reference(q, k, v, g, beta, A_log, dt_bias, cu_seqlens=cu_seqlens, state_pool=torch.zeros_like(pool),
                              state_indices=slots)
err = ((out.double() - ref.out).norm() / ref.out.norm()).item()
print(f"prefill of {lengths} tokens on {device}: ||out - ref|| / ||ref|| = {err:.2e}")

for step in range(3):
    q1, k1, v1, g1 = (rand(3, 1, H, K) for _ in range(4))
    o = kda_decode(q1, k1, v1, g1, rand(3, 1, H), A_log, dt_bias, pool, slots)
    print(f"decode step {step}: out {tuple(o.shape)}, state norm of slot 5 = {pool[5].norm().item():.3f}")
