"""The projections of a Kimi-Linear-48B decode step at 1-8 tokens: our matrix-vector kernel (ops.gemv) against
cuBLAS (F.linear / torch.bmm, what ops.linear falls back to and the model ran before), in the same run.

Each shape is timed as the model runs it: CUDA-graph replays of back-to-back calls, each call on its own copy
of the weights (copies enough for 512 MB, so that no call finds its weights in the 50-60 MB L2), per call,
beside the floor: the weights read once at the card's copy rate. The crossovers set ops.gemv.LINEAR_MAX_BYTES.

    python benchmarks/bench_gemv.py [--tokens 1,2,4,8]

Writes benchmarks/results/<card>-gemv.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py

from common import RESULTS, card_name, copy_rate_bytes_per_s, environment, graph_replay_us, write_json  # noqa: E402

from kda_serving.ops import gemv  # noqa: E402

# name: (B, N, K), per ../shared/reference/kimi-linear-48b-a3b.config.json
SHAPES = {
    "kda_in_proj": (1, 12576, 2304),  # q | k | v | f_a | g_a | b
    "kda_fg_b": (2, 4096, 128),       # f_b | g_b, batched
    "o_proj": (1, 2304, 4096),        # KDA's and MLA's
    "mla_q_proj": (1, 6144, 2304),
    "mla_kv_a": (1, 576, 2304),
    "mla_values": (32, 128, 512),     # W_uv per head on the latent outputs (transposed views)
    "dense_gate_up": (1, 18432, 2304),  # layer 0's MLP
    "dense_down": (1, 2304, 9216),
    "lm_head": (1, 163840, 2304),
}
ROTATION_BYTES = 512 << 20


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,2,4,8")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rate = copy_rate_bytes_per_s()
    print(f"{torch.cuda.get_device_name()}: copy rate {rate / 1e12:.2f} TB/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name in args.shapes.split(","):
        B, N, K = SHAPES[name]
        nbytes = B * N * K * 2
        copies = max(2, math.ceil(ROTATION_BYTES / nbytes))
        weights = [(torch.randn(B, N, K, device="cuda", generator=gen) * K**-0.5).to(torch.bfloat16)
                   for _ in range(copies)]
        for T in [int(t) for t in args.tokens.split(",")]:
            if name == "mla_values":  # the latent outputs [T, nh, C] seen as [nh, T, C], out likewise
                x = torch.randn(T, B, K, device="cuda", generator=gen).to(torch.bfloat16).transpose(0, 1)
                out = torch.empty(T, B, N, device="cuda", dtype=torch.bfloat16).transpose(0, 1)
            else:
                x = torch.randn(B, T, K, device="cuda", generator=gen).to(torch.bfloat16)
                out = torch.empty(B, T, N, device="cuda", dtype=torch.bfloat16)

            def ours():
                for w in weights:
                    gemv(x, w, out=out)

            def cublas():
                for w in weights:
                    if B == 1:
                        F.linear(x[0], w[0])
                    else:
                        torch.bmm(x, w.transpose(1, 2))

            row = {"shape": name, "B": B, "N": N, "K": K, "tokens": T, "weight_bytes": nbytes,
                   "floor_us": 1e6 * nbytes / rate,
                   "gemv_us": graph_replay_us(ours) / copies, "cublas_us": graph_replay_us(cublas) / copies}
            rows.append(row)
            print(f"{name:14s} T={T}: gemv {row['gemv_us']:7.2f} us, cuBLAS {row['cublas_us']:7.2f} us, floor "
                  f"{row['floor_us']:7.2f} us ({row['floor_us'] / row['gemv_us']:.0%} vs "
                  f"{row['floor_us'] / row['cublas_us']:.0%} of it; {row['cublas_us'] / row['gemv_us']:.2f}x)",
                  flush=True)
    out = Path(args.out) if args.out else RESULTS / f"{card_name()}-gemv.json"
    write_json(out, {"benchmark": "gemv", "environment": environment(), "copy_rate_bytes_per_s": rate,
                     "rotation_bytes": ROTATION_BYTES, "args": vars(args), "results": rows})


if __name__ == "__main__":
    main()
