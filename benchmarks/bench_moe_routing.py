"""A Kimi-Linear-48B MoE layer's routing: our kernels (ops.moe_route, ops.moe_sort_pairs; csrc/moe/moe_route.cu)
against torch's formulas (the baseline: the router compiled by Inductor as the engine ran it, and the sort by
torch's stable argsort), in the same run, on bench_engine.py's random weights.

Per token count T, GPU microseconds of the kernels of a call (torch.profiler; `_replay_us`: one CUDA-graph
replay from an idle GPU, launch latency included):
  router   torch compiled | ours (kernel logits + top-k) | ours with cuBLAS logits + top-k; floor: the router's
           weights and the tokens read once at the copy rate
  sort     torch (argsort, searchsorted, scatter: moe.py before) | ours (one kernel)
and the whole layer's GPU time (common.gpu_ms: routing, experts, shared expert) with torch's routing and with
ours, bf16 and e4m3 experts.

    python benchmarks/bench_moe_routing.py [--tokens 1,8,64,128,256,1024,2048,4096,8192]

Writes benchmarks/results/<card>-moe_routing.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py

from bench_moe import kimi48b_moe_layers  # noqa: E402
from common import (RESULTS, card_name, copy_rate_bytes_per_s, environment, gpu_ms, graph_replay_us,  # noqa: E402
                    write_json)

from kda_serving.model import moe as moe_module  # noqa: E402
from kda_serving.model.kimi_linear import _compiled  # noqa: E402
from kda_serving.ops import cuda_moe_routing, moe_route  # noqa: E402
from kda_serving.ops.moe_routing import route_experts_reference, sort_pairs_reference  # noqa: E402


def kernels_us(fn, reps: int = 20) -> tuple[float, dict]:
    """GPU microseconds per call of fn()'s kernels (torch.profiler's device time: no launch gaps, no host), and
    each kernel's share by name."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per_kernel = {}
    for e in prof.key_averages():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
            per_kernel[e.key[:60]] = round(e.self_device_time_total / reps, 2)
    return sum(per_kernel.values()), per_kernel


def _sort_kernel(ids, experts):
    out = [torch.empty(ids.numel(), dtype=torch.int32, device=ids.device) for _ in range(2)]
    ends = torch.empty(experts, dtype=torch.int32, device=ids.device)
    cuda_moe_routing.sort_pairs(ids, experts, *out, ends)
    return (*out, ends)


def _ours_with_cublas_logits(x, layer):
    logits = F.linear(x.float(), layer.router.float())
    T = x.shape[0]
    ids = torch.empty(T, layer.top_k, dtype=torch.int64, device=x.device)
    weights = torch.empty(T, layer.top_k, dtype=torch.float32, device=x.device)
    cuda_moe_routing.router_topk(logits, layer.e_score_correction_bias, layer.top_k, layer.num_groups,
                                 layer.topk_group, layer.renormalize, layer.scaling, ids, weights)
    return ids, weights


def _ours_with_kernel_logits(x, layer):
    logits = torch.empty(x.shape[0], layer.num_experts, dtype=torch.float32, device=x.device)
    cuda_moe_routing.router_logits(x, layer.router, logits)
    ids = torch.empty(x.shape[0], layer.top_k, dtype=torch.int64, device=x.device)
    weights = torch.empty_like(ids, dtype=torch.float32)
    cuda_moe_routing.router_topk(logits, layer.e_score_correction_bias, layer.top_k, layer.num_groups,
                                 layer.topk_group, layer.renormalize, layer.scaling, ids, weights)
    return ids, weights


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,8,64,128,256,1024,2048,4096,8192")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rate = copy_rate_bytes_per_s()
    layers = kimi48b_moe_layers()
    layer = layers["bf16"]  # the router is the same in both
    router_args = (layer.router, layer.e_score_correction_bias, layer.top_k, layer.num_groups, layer.topk_group,
                   layer.renormalize, layer.scaling)
    compiled_router = _compiled(route_experts_reference)
    print(f"{torch.cuda.get_device_name()}: copy rate {rate / 1e12:.2f} TB/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    real_takes, real_sort = moe_module.route_kernel_takes, moe_module.moe_sort_pairs
    rows = []
    for T in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(T, layer.router.shape[1], device="cuda", generator=gen).to(torch.bfloat16)
        row = {"tokens": T}
        floor_bytes = layer.router.numel() * 2 + x.numel() * 2 + T * layer.top_k * 12
        row["router_floor_us"] = 1e6 * floor_bytes / rate
        with torch.inference_mode():
            ids = moe_route(x, *router_args)[0]
            cases = {"router_torch_compiled": lambda: compiled_router(x, *router_args),
                     "router_ours": lambda: moe_route(x, *router_args),
                     "router_ours_kernel_logits": lambda: _ours_with_kernel_logits(x, layer),
                     "router_ours_cublas_logits": lambda: _ours_with_cublas_logits(x, layer),
                     "sort_torch": lambda: sort_pairs_reference(ids, layer.num_experts),
                     "sort_ours": lambda: _sort_kernel(ids, layer.num_experts)}
            for name, fn in cases.items():
                row[f"{name}_replay_us"] = graph_replay_us(fn)  # one replay from an idle GPU: launch included
                row[f"{name}_us"], row[f"{name}_kernels"] = kernels_us(fn)
            for kind, mlp in layers.items():
                moe_module.route_kernel_takes = lambda *a: False
                moe_module.moe_sort_pairs = sort_pairs_reference
                row[f"layer_{kind}_torch_routing_ms"] = gpu_ms(lambda: mlp(x))
                moe_module.route_kernel_takes, moe_module.moe_sort_pairs = real_takes, real_sort
                row[f"layer_{kind}_ours_ms"] = gpu_ms(lambda: mlp(x))
        rows.append(row)
        print("  " + "; ".join(f"{name}: {row[f'{name}_kernels']}" for name in cases), flush=True)
        print(f"T={T:5d}: router torch {row['router_torch_compiled_us']:7.1f} us, ours {row['router_ours_us']:6.1f} "
              f"(kernel logits {row['router_ours_kernel_logits_us']:6.1f}, cuBLAS logits "
              f"{row['router_ours_cublas_logits_us']:6.1f}; floor {row['router_floor_us']:5.1f}); sort torch "
              f"{row['sort_torch_us']:6.1f} us, ours {row['sort_ours_us']:6.1f}; layer bf16 "
              f"{row['layer_bf16_torch_routing_ms']:.3f} -> {row['layer_bf16_ours_ms']:.3f} ms, fp8 "
              f"{row['layer_fp8_torch_routing_ms']:.3f} -> {row['layer_fp8_ours_ms']:.3f} ms", flush=True)
    out = Path(args.out) if args.out else RESULTS / f"{card_name()}-moe_routing.json"
    write_json(out, {"benchmark": "moe_routing", "environment": environment(), "copy_rate_bytes_per_s": rate,
                     "shape": "kimi48b MoE layer (256 experts of 1024, top 8, 1 group, hidden 2304)",
                     "args": vars(args), "results": rows})


if __name__ == "__main__":
    main()
