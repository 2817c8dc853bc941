"""Experiment (not a test): where a recurrence variant differs from the float64 reference, per chunk of
outputs and per 16-row group / 8-column tile of the final state. Run on the GPU machine:

    KDA_PREFILL_WARPS=4 python3 benchmarks/experiments/diff_paths.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "gpu"))
from test_prefill_cuda import D, make_inputs, reference, run_prefill  # noqa: E402


def table(err: torch.Tensor, ref: torch.Tensor) -> str:
    return " ".join(f"{e:.0e}" for e in (err.norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).tolist())


for T, init in [(16, False), (16, True), (48, True), (200, True)]:
    inp = make_inputs(1, T, 1, seed=1)
    S0 = (torch.randn(1, 1, D, D, device="cuda") * 0.5) if init else None
    out, final = run_prefill(inp, lower_bound=-5.0, initial_state=S0, final_dtype=torch.float32)
    ref = reference(inp, lower_bound=-5.0, initial_state=S0, output_final_state=True)
    print(f"T={T} init={init}")
    o, r = out[0, :, 0].double(), ref.out[0, :, 0]
    chunks = (T + 15) // 16
    e = torch.stack([(o - r)[16 * c:16 * c + 16].norm() / r[16 * c:16 * c + 16].norm() for c in range(chunks)])
    print("  out per chunk:", " ".join(f"{x:.0e}" for x in e.tolist()))
    eo = (o - r).reshape(T, 8, 16)  # value rows in 8 groups of 16
    print("  out per row group:", table(eo.permute(1, 0, 2).reshape(8, -1), r.reshape(T, 8, 16).permute(1, 0, 2).reshape(8, -1)))
    fs, fr = final[0, 0].double(), ref.final_state[0, 0]
    print("  state per row group:", table((fs - fr).reshape(8, -1), fr.reshape(8, -1)))
    print("  state per 8-col tile:", table((fs - fr).reshape(128, 16, 8).permute(1, 0, 2).reshape(16, -1),
                                            fr.reshape(128, 16, 8).permute(1, 0, 2).reshape(16, -1)))
