"""One Kimi-Linear-48B MoE layer at decode sizes: the routed experts as matrix-vector products (our kernel,
ops.moe_experts_gemv) against the grouped GEMMs (torch._grouped_mm / torch._scaled_grouped_mm, the baseline),
bf16 and e4m3 experts, in the same run, on bench_engine.py's random weights (layer 1 of the 4-layer model; the
fp8 layer is its copy, quantized).

GPU time (common.gpu_ms) of the layer's whole forward as the engine runs it (routing, experts, shared expert,
compiled pieces) at T tokens, each path forced through moe.GEMV_MAX_TOKENS and FP8_GEMV_MAX_TOKENS, beside the
floor: the routed experts the step touches read once at the card's copy rate (the shared expert's and the
router's weights are in neither path's floor). The crossovers those limits are chosen from. The GEMV path runs
twice: with the shared expert in its kernels (MoE.fuse_shared_experts, the default) and beside them
("gemv_unfused": cuBLAS GEMVs, SwiGLU and the add in torch).

    python benchmarks/bench_moe.py [--tokens 1,2,4,8,16,24,32,64]

Writes benchmarks/results/<card>-moe.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py

from bench_engine import random_kimi48b_model  # noqa: E402
from common import RESULTS, card_name, copy_rate_bytes_per_s, environment, gpu_ms, write_json  # noqa: E402

from kda_serving.model import moe as moe_module  # noqa: E402
from kda_serving.model.moe import MoE  # noqa: E402


def kimi48b_moe_layers() -> dict[str, MoE]:
    """The first MoE layer of bench_engine's random Kimi-Linear-48B-shaped model on the GPU (its plain pieces
    compiled, as the engine runs them), with bf16 experts and as a copy with e4m3 ones: {"bf16": .., "fp8": ..}."""
    model = random_kimi48b_model(torch.device("cuda"))
    model.compile_plain_ops(True)
    bf16 = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE))
    fp8 = copy.deepcopy(bf16)
    fp8.quantize_experts_()
    return {"bf16": bf16, "fp8": fp8}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,2,4,8,16,24,32,64")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rate = copy_rate_bytes_per_s()
    layers = kimi48b_moe_layers()
    bf16 = layers["bf16"]
    print(f"{torch.cuda.get_device_name()}: copy rate {rate / 1e12:.2f} TB/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for T in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(T, bf16.gate_up_proj.shape[2], device="cuda", generator=gen).to(torch.bfloat16)
        row = {"tokens": T}
        with torch.inference_mode():
            touched = bf16.route(x)[0].unique().numel()
        row["experts_touched"] = touched
        for kind, layer in layers.items():
            expert_bytes = sum(getattr(layer, n)[0].numel() * getattr(layer, n).element_size()
                               for n, _ in layer.named_parameters() if n.startswith(("gate_up_proj", "down_proj")))
            row[f"{kind}_floor_ms"] = 1e3 * touched * expert_bytes / rate
            for path, limit, fuse in (("grouped", 0, True), ("gemv", 1 << 30, True),
                                      ("gemv_unfused", 1 << 30, False)):
                moe_module.GEMV_MAX_TOKENS = moe_module.FP8_GEMV_MAX_TOKENS = limit
                MoE.fuse_shared_experts = fuse
                with torch.inference_mode():
                    row[f"{kind}_{path}_ms"] = gpu_ms(lambda: layer(x))
            MoE.fuse_shared_experts = True
        rows.append(row)
        print(f"T={T:3d} ({touched:3d} experts): " + "; ".join(
            f"{kind} grouped {row[f'{kind}_grouped_ms']:.3f} gemv {row[f'{kind}_gemv_ms']:.3f} (unfused "
            f"{row[f'{kind}_gemv_unfused_ms']:.3f}) ms (floor "
            f"{row[f'{kind}_floor_ms']:.3f}, {row[f'{kind}_grouped_ms'] / row[f'{kind}_gemv_ms']:.2f}x)"
            for kind in layers), flush=True)
    out = Path(args.out) if args.out else RESULTS / f"{card_name()}-moe.json"
    write_json(out, {"benchmark": "moe", "environment": environment(), "copy_rate_bytes_per_s": rate,
                     "shape": "kimi48b MoE layer (256 experts of 1024, top 8, 1 shared)", "args": vars(args),
                     "results": rows})


if __name__ == "__main__":
    main()
