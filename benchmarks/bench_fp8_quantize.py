"""The fp8 experts' activation quantization (ops.quantize_rows_fp8, ops.silu_mul_quantize_fp8: csrc/moe/
fp8_quantize.cu) against what the engine ran before them, in the same run, at Kimi-Linear-48B's shapes:

1. each quantization alone, GPU time (common.gpu_ms) beside its floor (bytes read + written at the copy rate
   measured at the start): the tokens' rows [M, 2304] and the experts' activations silu(gate) * up of
   [M, 2 * 1024], against the same torch formula compiled with dynamic shapes (the engine's previous path,
   KimiLinearModel.compile_plain_ops) and eager;
2. one fp8 MoE layer (routing, the two grouped fp8 GEMMs with both quantizations, the shared expert, the
   expert sum; routing and sum compiled as the engine runs them) with our kernels (exact accumulation, the
   default), with the GEMMs' fast accumulation too (EngineConfig.fp8_fast_accumulation), and as before
   (compiled quantizations), beside the same layer with bf16 experts.

    python benchmarks/bench_fp8_quantize.py [--rows 64,1024,8192,65536] [--tokens 64,1024,8192]

Writes benchmarks/results/<card>-fp8_quantize.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py

from bench_engine import KIMI48B  # noqa: E402
from common import RESULTS, card_name, copy_rate_bytes_per_s, environment, gpu_ms, write_json  # noqa: E402

from kda_serving.model import ModelConfig  # noqa: E402
from kda_serving.model import moe as moe_module  # noqa: E402
from kda_serving.model.moe import MoE, combine_experts, route_experts  # noqa: E402
from kda_serving.model.random_init import fill_random_  # noqa: E402
from kda_serving.ops import quantize_rows_fp8, silu_mul_quantize_fp8  # noqa: E402
from kda_serving.ops.fp8_quantize import quantize_rows_reference  # noqa: E402


def silu_mul_quantize_bf16(gate_up: torch.Tensor):
    """The engine's previous activation: silu(gate) * up in bf16 ops, then its rows quantized."""
    gate, up = gate_up.chunk(2, dim=-1)
    return quantize_rows_reference(F.silu(gate) * up)


COMPILED = {"quantize_rows": torch.compile(quantize_rows_reference, dynamic=True),
            "silu_mul_quantize": torch.compile(silu_mul_quantize_bf16, dynamic=True)}
EAGER = {"quantize_rows": quantize_rows_reference, "silu_mul_quantize": silu_mul_quantize_bf16}
OURS = {"quantize_rows": quantize_rows_fp8, "silu_mul_quantize": silu_mul_quantize_fp8}
HIDDEN, INTER = KIMI48B["hidden_size"], KIMI48B["moe_intermediate_size"]


def kernel_rows(rows_list: list[int], rate: float) -> list[dict]:
    out = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for M in rows_list:
        inputs = {"quantize_rows": torch.randn(M, HIDDEN, device="cuda", generator=gen).to(torch.bfloat16),
                  "silu_mul_quantize": torch.randn(M, 2 * INTER, device="cuda", generator=gen).to(torch.bfloat16)}
        for name, x in inputs.items():
            width = x.shape[1] if name == "quantize_rows" else x.shape[1] // 2
            nbytes = x.numel() * 2 + M * width + M * 4
            row = {"op": name, "rows": M, "width_in": x.shape[1], "floor_ms": 1e3 * nbytes / rate}
            for label, fns in (("ours", OURS), ("compiled", COMPILED), ("eager", EAGER)):
                row[f"{label}_ms"] = gpu_ms(lambda fn=fns[name], x=x: fn(x))
            row["floor_fraction"] = row["floor_ms"] / row["ours_ms"]
            row["speedup_vs_compiled"] = row["compiled_ms"] / row["ours_ms"]
            print(f"{name:18s} {M:6d} rows: ours {row['ours_ms']:.4f} ms ({100 * row['floor_fraction']:.0f}% of "
                  f"the floor {row['floor_ms']:.4f}), compiled {row['compiled_ms']:.4f}, eager "
                  f"{row['eager_ms']:.4f} ({row['speedup_vs_compiled']:.2f}x the compiled)", flush=True)
            out.append(row)
    return out


def moe_layers() -> dict[str, MoE]:
    cfg = ModelConfig.from_dict(KIMI48B)
    bf16 = MoE(cfg, torch.bfloat16, "cuda")
    fill_random_(bf16, 0, weight_std=0.02)
    fp8 = copy.deepcopy(bf16)
    fp8.quantize_experts_()
    for m in (bf16, fp8):  # as the engine's compiled model runs them
        m.route_fn = torch.compile(route_experts, dynamic=True)
        m.combine_fn = torch.compile(combine_experts, dynamic=True)
        m.act_fn = torch.compile(moe_module.silu_mul, dynamic=True)
    return {"bf16": bf16, "fp8": fp8}


def layer_rows(layers: dict[str, MoE], tokens: list[int]) -> list[dict]:
    """Per token count: the bf16 layer, then the fp8 layer with our quantization kernels (exact accumulation,
    the default), with fast accumulation too (--fp8-fast-accumulation), and as before this benchmark's kernels
    (compiled quantization); the fast accumulation's relative difference from the exact."""
    out = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    variants = {"fp8_ms": (OURS, False), "fp8_fast_accum_ms": (OURS, True), "fp8_before_ms": (COMPILED, False)}
    fp8 = layers["fp8"]
    for T in tokens:
        x = torch.randn(T, HIDDEN, device="cuda", generator=gen).to(torch.bfloat16)
        row = {"tokens": T}
        outputs = {}
        saved = moe_module.quantize_rows_fp8, moe_module.silu_mul_quantize_fp8
        with torch.inference_mode():
            row["bf16_ms"] = gpu_ms(lambda: layers["bf16"](x))
            try:
                for key, (fns, fast) in variants.items():
                    moe_module.quantize_rows_fp8 = fns["quantize_rows"]
                    moe_module.silu_mul_quantize_fp8 = fns["silu_mul_quantize"]
                    fp8.fast_accumulation = fast
                    row[key] = gpu_ms(lambda: fp8(x))
                    outputs[key] = fp8(x).double()
            finally:
                moe_module.quantize_rows_fp8, moe_module.silu_mul_quantize_fp8 = saved
                fp8.fast_accumulation = False
        exact = outputs["fp8_ms"]
        row["fast_accum_rel_diff"] = ((outputs["fp8_fast_accum_ms"] - exact).norm() / exact.norm()).item()
        for key in variants:
            row[f"{key[:-3]}_gain_vs_bf16"] = row["bf16_ms"] / row[key]
        row["fp8_gain_vs_before"] = row["fp8_before_ms"] / row["fp8_ms"]
        row["fast_accum_gain"] = row["fp8_ms"] / row["fp8_fast_accum_ms"]
        print(f"MoE layer {T:5d} tokens: bf16 {row['bf16_ms']:.3f} ms; fp8 {row['fp8_ms']:.3f} ms (before "
              f"{row['fp8_before_ms']:.3f}: {row['fp8_gain_vs_before']:.2f}x; {row['fp8_gain_vs_bf16']:.2f}x bf16); "
              f"fast accumulation {row['fp8_fast_accum_ms']:.3f} ms ({row['fast_accum_gain']:.2f}x, "
              f"{row['fp8_fast_accum_gain_vs_bf16']:.2f}x bf16, {row['fast_accum_rel_diff']:.1e} from exact)",
              flush=True)
        out.append(row)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="64,1024,8192,65536")
    ap.add_argument("--tokens", default="64,1024,2048,8192")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rate = copy_rate_bytes_per_s()
    print(f"{torch.cuda.get_device_name()}: copy rate {rate / 1e12:.2f} TB/s", flush=True)
    results = {"kernels": kernel_rows([int(r) for r in args.rows.split(",")], rate)}
    if args.tokens:
        results["moe_layer"] = layer_rows(moe_layers(), [int(t) for t in args.tokens.split(",")])
    out = Path(args.out) if args.out else RESULTS / f"{card_name()}-fp8_quantize.json"
    write_json(out, {"benchmark": "fp8_quantize", "environment": environment(), "copy_rate_bytes_per_s": rate,
                     "shape": {"hidden": HIDDEN, "moe_intermediate": INTER}, "args": vars(args),
                     "results": results})


if __name__ == "__main__":
    main()
