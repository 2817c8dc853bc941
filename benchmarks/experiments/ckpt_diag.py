"""Repeatability check of the prefill with many sequences and checkpoints (experiment helper, GPU).

Runs the same pool-mode prefill with 2,010 checkpoints twice and reports whether outputs, final states and
checkpoint states agree bit for bit, and which checkpoints are off against the float64 reference. Found the
early stage release in pass 2 (logs/session4/streaming-and-race.md).

    python3 benchmarks/experiments/ckpt_diag.py        (DIAG_N=... sequences, default 1500)
"""
import os
import sys

import torch

sys.path.insert(0, "tests/gpu")
sys.path.insert(0, ".")
from test_prefill_cuda import D, make_inputs, reference, run_prefill  # noqa: E402

from kda_serving.ops.contract import KDACheckpoints  # noqa: E402

gen = torch.Generator().manual_seed(5)
N, H = int(os.environ.get("DIAG_N", "1500")), 1
lens = torch.randint(64, 200, (N,), generator=gen)
lens[::7] = 0
cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).cuda()
inp = make_inputs(1, int(cu[-1]), H, g_std=2.0, seed=3)
seq = [n for n in range(N) for p in range(64, int(lens[n]) + 1, 64)]
pos = [p for n in range(N) for p in range(64, int(lens[n]) + 1, 64)]
S = N + len(seq)
slots = torch.randperm(S, generator=gen).cuda()
st, ck = slots[:N], slots[N:N + len(seq)]
ckpt = KDACheckpoints(torch.tensor(seq).cuda(), torch.tensor(pos).cuda(), ck)
initial = torch.randn(N, H, D, D, generator=torch.Generator().manual_seed(9)).cuda() * 0.5
runs = []
for _ in range(2):
    pool = torch.full((S, H, D, D), float("nan"), device="cuda")
    pool[st] = initial
    before = pool.clone()
    out, _ = run_prefill(inp, lower_bound=None, cu_seqlens=cu, state_pool=pool, state_indices=st, checkpoints=ckpt)
    runs.append((out, pool[st].clone(), pool[ck].clone()))
same = [torch.equal(a, b) for a, b in zip(*runs)]
print("repeatable: out", same[0], "final", same[1], "checkpoints", same[2])
ref = reference(inp, lower_bound=None, cu_seqlens=cu, state_pool=before, state_indices=st, checkpoints=ckpt)
got = runs[0][2].double()
err = (got - ref.checkpoint_states).flatten(1).norm(dim=1) / ref.checkpoint_states.flatten(1).norm(dim=1)
bad = (~(err <= 0.02)).nonzero().flatten().tolist()  # NaN counts as bad
print("bad", len(bad), "of", len(seq))
for i in bad[:20]:
    print(f"checkpoint {i}: sequence {seq[i]} position {pos[i]} of {int(lens[seq[i]])}, rel err {err[i]:.3f}")
