"""The two kernels of ops.moe_experts_gemv one by one (experiment, not part of CI): Kimi-Linear-48B's routed
experts (256 of 1024, hidden 2304, top 8), bf16 and e4m3, at a few tokens, each kernel's GPU time from the
profiler beside the floor of the weights it reads (the touched experts once, at the card's copy rate), and the
op's whole time (common.gpu_ms). Compare libraries by running it once per KDA_SERVING_LIB.

    KDA_SERVING_LIB=... python benchmarks/experiments/moe_gemv_kernels.py [--tokens 1,2,4,8,12] [--label name]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import copy_rate_bytes_per_s, gpu_ms  # noqa: E402

from kda_serving.model.fp8 import quantize_rows  # noqa: E402
from kda_serving.ops import moe_experts_gemv  # noqa: E402

E, HIDDEN, INTER, TOP_K = 256, 2304, 1024, 8


def kernel_us(fn, calls: int = 20) -> dict[str, float]:
    """Mean GPU microseconds per call of each kernel fn launches, by kernel name (gate_up / down)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.cuda._sleep(50_000_000)  # the host queues every call before the GPU starts them
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.key_averages():
        for name in ("gate_up_kernel", "down_kernel"):
            if name in e.key:
                out[name] = e.self_device_time_total / calls
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,2,4,8,12")
    ap.add_argument("--label", default=os.environ.get("KDA_SERVING_LIB", "default"))
    args = ap.parse_args(argv)
    rate = copy_rate_bytes_per_s()
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate_up = (torch.randn(E, 2 * INTER, HIDDEN, generator=gen, device="cuda") * HIDDEN**-0.5).to(torch.bfloat16)
    down = (torch.randn(E, HIDDEN, INTER, generator=gen, device="cuda") * INTER**-0.5).to(torch.bfloat16)
    q1, s1 = quantize_rows(gate_up)
    q2, s2 = quantize_rows(down)
    kinds = {"bf16": (gate_up, down, None, None), "fp8": (q1, q2, s1, s2)}
    print(f"{torch.cuda.get_device_name()}, copy rate {rate / 1e12:.2f} TB/s, library {args.label}")
    for T in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(T, HIDDEN, generator=gen, device="cuda").to(torch.bfloat16)
        ids = torch.rand(T, E, generator=gen, device="cuda").topk(TOP_K, dim=-1).indices
        w = torch.rand(T, TOP_K, generator=gen, device="cuda")
        touched = ids.unique().numel()
        for kind, (gu, dn, gs, ds) in kinds.items():
            def call():
                return moe_experts_gemv(x, ids, w, gu, dn, gs, ds)
            k = kernel_us(call)
            floor_gu = touched * gu[0].numel() * gu.element_size() / rate * 1e6
            floor_dn = touched * dn[0].numel() * dn.element_size() / rate * 1e6
            print(f"T={T:2d} {kind}: gate_up {k.get('gate_up_kernel', 0):6.2f} us (floor {floor_gu:5.2f}), down "
                  f"{k.get('down_kernel', 0):6.2f} us (floor {floor_dn:5.2f}); op {gpu_ms(call) * 1e3:6.2f} us",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
