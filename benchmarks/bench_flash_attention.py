"""The varlen flash attention kernel (csrc/attention, ops.flash_attention) on single calls, against
FlashAttention-2's varlen kernel in torch (the kernel it replaces in the MLA layers' prompt steps; values padded
to the key size, which it needs) and torch's cuDNN attention (one sequence, a shape it has seen: its plan built
beforehand), in the same run. Heads of 192 for queries and keys, 128 for values, 32 heads (Kimi-Linear-48B's MLA
in the expanded form), bf16; keys and values strided views of one buffer, as the layer's expansion gives them.

Times are GPU time per call with the host queued ahead (as between a model's layers), and the wall time of a
call timed alone (which shows the host's time where that is longer). The floor is the call's FLOPs (2 (192 +
128) per (query, key, head) pair the mask keeps) at the bf16 GEMM rate measured at the start of the run; its
bytes are far below it.

    python benchmarks/bench_flash_attention.py [--out-dir DIR]

Prints a table, writes <out-dir>/<card>-flash_attention.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py

from common import (  # noqa: E402
    RESULTS, card_name, environment, gemm_rate_flops_per_s, gpu_ms, time_ms, write_json,
)

from kda_serving.ops.flash_attention import flash_attention  # noqa: E402

H, D, DV = 32, 192, 128
SCALE = D**-0.5
CASES = [  # (name, lens_q, lens_k, causal)
    ("8192 causal", [8192], [8192], True),
    ("8 x 1024 causal", [1024] * 8, [1024] * 8, True),
    ("2048 causal", [2048], [2048], True),
    ("512 causal", [512], [512], True),
    ("2048 x 32K", [2048], [32768], False),
    ("512 x 32K", [512], [32768], False),
    ("128 x 4K", [128], [4096], False),
    ("16 pieces of 128 x 2K", [128] * 16, [2048] * 16, False),
]


def pairs(lens_q, lens_k, causal) -> int:
    """(query, key) pairs the mask keeps (causal: the diagonal at the bottom right)."""
    total = 0
    for lq, lk in zip(lens_q, lens_k):
        total += sum(max(0, min(lk, j + lk - lq + 1)) for j in range(lq)) if causal else lq * lk
    return total


def flash2(q, kv, lens_q, lens_k, causal):
    """FlashAttention-2's varlen forward with values padded to 192 (kv [Tk, H, 384]: keys, values, zeros)."""
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return lambda: torch.ops.aten._flash_attention_forward(
        q, kv[..., :D], kv[..., D:], cu_q, cu_k, max(lens_q), max(lens_k), 0.0, causal, False, scale=SCALE)[0]


def cudnn(q, kv, causal):
    """torch's cuDNN attention on one sequence (values unpadded)."""
    args = (q.transpose(0, 1)[None], kv[..., :D].transpose(0, 1)[None], kv[..., D : D + DV].transpose(0, 1)[None])
    return lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(*args, None, True, 0.0, causal, False,
                                                                      scale=SCALE)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()
    gemm_rate = gemm_rate_flops_per_s()
    print(f"bf16 GEMM {gemm_rate / 1e12:.0f} TFLOP/s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, lens_q, lens_k, causal in CASES:
        q = torch.randn(sum(lens_q), H, D, generator=gen, device="cuda").to(torch.bfloat16)
        kv = torch.randn(sum(lens_k), H, 2 * D, generator=gen, device="cuda").to(torch.bfloat16)
        kv[..., D + DV :] = 0
        k, v = kv[..., :D], kv[..., D : D + DV]
        cu = tuple(torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
                   for lens in (lens_q, lens_k))
        out = torch.empty(sum(lens_q), H, DV, device="cuda")
        lse = torch.empty(sum(lens_q), H, device="cuda")
        runs = {"ours": lambda: flash_attention(q, k, v, lens_q, lens_k, causal=causal, scale=SCALE, cu=cu, out=out,
                                                lse=lse),
                "flash2": flash2(q, kv, lens_q, lens_k, causal)}
        if len(lens_q) == 1:
            runs["cudnn"] = cudnn(q, kv, causal)
        results = {}
        for form, fn in runs.items():
            fn()  # cuDNN builds its plan here
            results[f"{form}_ms"] = gpu_ms(fn, n=20)
            results[f"{form}_wall_ms"] = time_ms(fn, warmup=3, iters=20)
        ours = flash_attention(q, k, v, lens_q, lens_k, causal=causal, scale=SCALE, cu=cu)[0]
        ref = runs["flash2"]()[..., :DV].float()
        diff = ((ours - ref).norm() / ref.norm()).item()
        flops = 2 * (D + DV) * H * pairs(lens_q, lens_k, causal)
        floor = flops / gemm_rate * 1e3
        row = dict(case=name, lens_q=lens_q, lens_k=lens_k, causal=causal, flops=flops, floor_ms=floor, **results,
                   ours_tflops=flops / results["ours_ms"] / 1e9, floor_over_ours=floor / results["ours_ms"],
                   speedup_vs_flash2=results["flash2_ms"] / results["ours_ms"], rel_diff_vs_flash2=diff)
        rows.append(row)
        extra = f"  cudnn {results['cudnn_ms']:7.3f}" if "cudnn_ms" in results else " " * 15
        print(f"{name:>24}: ours {results['ours_ms']:7.3f} ms ({row['ours_tflops']:4.0f} TFLOP/s, wall "
              f"{results['ours_wall_ms']:6.3f})  flash2 "
              f"{results['flash2_ms']:7.3f}{extra}  floor {floor:6.3f} ms ({100 * row['floor_over_ours']:4.1f}%)  "
              f"x{row['speedup_vs_flash2']:4.2f} vs flash2  rel diff {diff:.1e}", flush=True)
    write_json(Path(args.out_dir) / f"{card_name()}-flash_attention.json",
               {"benchmark": "flash_attention", "environment": environment(), "gemm_rate_flops_per_s": gemm_rate,
                "heads": H, "qk_dim": D, "v_dim": DV, "cases": rows})


if __name__ == "__main__":
    main()
