"""FP8 expert GEMMs (experiment, not part of CI): torch._scaled_grouped_mm (e4m3 operands, a float32 scale per
row of the tokens and per output channel of each expert, bf16 out) against torch._grouped_mm in bf16, on one
Kimi-Linear-48B MoE layer's experts (256 x [2048, 2304] gate/up and [2304, 1024] down, top 8, uniform random
routing), at several token counts, GPU time (common.gpu_ms)
in the same run:

  bf16      the two grouped GEMMs as MoE._experts runs them, with silu(gate) * up between
  fp8       the same with both operands in e4m3: each GEMM's rows quantized per row first (amax / 448)
  fp8 fast  the same with use_fast_accum (Hopper's reduced-precision accumulation)

Each is printed beside the weights floor (the experts the step touches, read once, at the measured copy
rate). Correctness, once at 64 tokens: the fp8 GEMM against float64 on the dequantized operands (what it
computes, up to accumulation order), and against the bf16 GEMM (what quantization costs).

    python benchmarks/experiments/fp8_grouped_mm.py [--tokens 1,8,64,256,1024,8192]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import copy_rate_bytes_per_s, gpu_ms  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 [..., K], fp32 scales [...]) with x ~= q * scale, each row's amax at 448."""
    amax = x.abs().amax(-1).float().clamp_min(1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,8,64,256,1024,8192")
    args = ap.parse_args()
    E, H, I, k = 256, 2304, 1024, 8
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    w1 = (torch.randn(E, 2 * I, H, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
    w1q, w1s = quantize_rows(w1)
    w2q, w2s = quantize_rows(w2)
    rate = copy_rate_bytes_per_s()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy rate {rate / 1e12:.2f} TB/s")
    experts = torch.arange(1, E + 1, device=dev)
    quantize_compiled = torch.compile(quantize_rows, dynamic=True)

    def routed(T):
        ids = torch.rand(T, E, device=dev, generator=gen).topk(k, dim=-1).indices.reshape(-1)
        order = ids.argsort(stable=True)
        ends = torch.searchsorted(ids[order], experts).to(torch.int32)
        x = torch.randn(T, H, device=dev, generator=gen).to(torch.bfloat16)
        return x.index_select(0, order // k), ends, ids.unique().numel()

    def bf16(rows, ends):
        gate, up = torch._grouped_mm(rows, w1.transpose(1, 2), offs=ends).chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=ends)

    def fp8(rows, ends, fast=False):
        rq, rs = quantize_rows(rows)
        gate, up = torch._scaled_grouped_mm(rq, w1q.transpose(1, 2), rs, w1s, offs=ends, out_dtype=torch.bfloat16,
                                            use_fast_accum=fast).chunk(2, dim=-1)
        hq, hs = quantize_rows(F.silu(gate) * up)
        return torch._scaled_grouped_mm(hq, w2q.transpose(1, 2), hs, w2s, offs=ends, out_dtype=torch.bfloat16,
                                        use_fast_accum=fast)

    # correctness at 64 tokens: the first GEMM alone against float64 on its dequantized operands
    rows, ends, _ = routed(64)
    rq, rs = quantize_rows(rows)
    for fast in (False, True):
        got = torch._scaled_grouped_mm(rq, w1q.transpose(1, 2), rs, w1s, offs=ends, out_dtype=torch.bfloat16,
                                       use_fast_accum=fast).double()
        ref = torch.empty_like(got)
        start = 0
        for e, end in enumerate(ends.tolist()):
            if end > start:
                a = rq[start:end].double() * rs[start:end, None].double()
                b = w1q[e].double() * w1s[e, :, None].double()
                ref[start:end] = a @ b.T
            start = end
        rel = ((got - ref).norm() / ref.norm()).item()
        print(f"fp8 GEMM (fast accum {fast}) vs float64 on its operands: rel {rel:.2e}, max abs "
              f"{(got - ref).abs().max().item():.2e} (bf16 output rounding alone ~2e-3)")
    full_b, full_q = bf16(rows, ends).double(), fp8(rows, ends).double()
    print(f"fp8 experts vs bf16 experts, both GEMMs: rel {((full_q - full_b).norm() / full_b.norm()).item():.2e}")

    print(f"{'tokens':>6s} {'experts':>7s} {'floor bf16':>10s} {'bf16':>8s} {'floor fp8':>9s} {'fp8':>8s} "
          f"{'fp8 fast':>8s}  (us)")
    for T in [int(t) for t in args.tokens.split(",")]:
        rows, ends, touched = routed(T)
        floor = touched * (3 * I * H) * 2 / rate * 1e6  # bf16 weights read once (the rate counts all traffic)
        t_bf16 = gpu_ms(lambda: bf16(rows, ends)) * 1e3
        t_fp8 = gpu_ms(lambda: fp8(rows, ends)) * 1e3
        t_fast = gpu_ms(lambda: fp8(rows, ends, True)) * 1e3
        # the parts: the two fp8 GEMMs alone (operands quantized beforehand), and the row quantization eager
        # and compiled (one fused pass)
        rq, rs = quantize_rows(rows)
        h = F.silu(bf16(rows, ends)[:, :I].repeat(1, 1))
        hq, hs = quantize_rows(h)
        t_gemms = gpu_ms(lambda: (
            torch._scaled_grouped_mm(rq, w1q.transpose(1, 2), rs, w1s, offs=ends, out_dtype=torch.bfloat16),
            torch._scaled_grouped_mm(hq, w2q.transpose(1, 2), hs, w2s, offs=ends, out_dtype=torch.bfloat16))) * 1e3
        t_quant = gpu_ms(lambda: (quantize_rows(rows), quantize_rows(h))) * 1e3
        t_quant_c = gpu_ms(lambda: (quantize_compiled(rows), quantize_compiled(h))) * 1e3
        print(f"{T:6d} {touched:7d} {floor:10.1f} {t_bf16:8.1f} {floor / 2:9.1f} {t_fp8:8.1f} {t_fast:8.1f}   "
              f"gemms {t_gemms:8.1f}, quantize {t_quant:7.1f} eager, {t_quant_c:7.1f} compiled")


if __name__ == "__main__":
    main()
