"""Experiment (not CI): MLABlock.forward at Kimi-Linear-48B's MLA sizes (32 heads, latent 512 + 64) in steps with
prompt tokens, one sequence of Q new tokens after C cached ones, in four forms on the same inputs:
  torch     the absorbed form on torch ops (MLABlock._attend; mla_block.PREFILL_ON_KERNELS off)
  auto      what the block does: expanded on the flash kernel at Q >= EXPANDED_MIN_QUERIES, else paged
  expanded  every sequence expanded (EXPANDED_MIN_QUERIES = 1)
  paged     every row on the paged kernel, one query each (EXPANDED_MIN_QUERIES huge)
then a mixed step (8 prompts of 1024 and 32 decodes at 4K keys). Times in ms per block forward (projections
included): wall (each call timed alone) and GPU (common.gpu_ms: the host queued ahead); relative error of
each against the float64 reference of tests/model/test_mla_prefill.py. Before that table, the flash kernel
against torch's cuDNN attention on single calls. (The session-15 logs ran "auto" at a threshold of 64.)

    python benchmarks/experiments/mla_prefill_expanded.py                     # both tables
    python benchmarks/experiments/mla_prefill_expanded.py --new-shapes        # cuDNN's cost of a new shape
    python benchmarks/experiments/mla_prefill_expanded.py --profile 512x32768 # kernels of one forward
    python benchmarks/experiments/mla_prefill_expanded.py --host-profile 128x4096
"""

import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from common import gpu_ms, time_ms  # noqa: E402

from kda_serving.model import mla_block  # noqa: E402
from kda_serving.ops import indices_checked_by_caller  # noqa: E402
from model.test_mla_prefill import KIMI48B_MLA, make_block, make_case, reference  # noqa: E402

DEFAULT_MIN_QUERIES = mla_block.EXPANDED_MIN_QUERIES
FORMS = {"torch": (False, DEFAULT_MIN_QUERIES), "auto": (True, DEFAULT_MIN_QUERIES), "expanded": (True, 1),
         "paged": (True, 1 << 30)}


def measure(block, seqs, check: bool):
    batch, cache = make_case(seqs, 576, 16, torch.bfloat16, "cuda", seed=0)
    x = torch.randn(batch.num_tokens, 512, device="cuda", dtype=torch.bfloat16)
    ref = reference(block, x, batch, cache) if check else None
    row = {}
    for name, (on_kernels, min_q) in FORMS.items():
        mla_block.PREFILL_ON_KERNELS, mla_block.EXPANDED_MIN_QUERIES = on_kernels, min_q
        with torch.inference_mode(), indices_checked_by_caller():  # as the engine runs it: no index checks
            work = cache.clone()
            out = block(x, batch, work)
            ms = time_ms(lambda: block(x, batch, work), warmup=2, iters=5)
            gpu = gpu_ms(lambda: block(x, batch, work))
        err = ((out.double().cpu() - ref).norm() / ref.norm()).item() if check else float("nan")
        row[name] = (ms, gpu, err)
    mla_block.PREFILL_ON_KERNELS, mla_block.EXPANDED_MIN_QUERIES = True, DEFAULT_MIN_QUERIES
    return row


def cudnn_attention(q, k, v, causal: bool, scale: float):
    """torch's cuDNN attention on one sequence: q [Q, H, D], k [K, H, D], v [K, H, Dv] (strided views)."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None, True, 0.0, causal, False,
        scale=scale)[0]
    return out[0].transpose(0, 1)


def flash_vs_cudnn():
    """One sequence, 32 heads of 192 (values 128): mla_prefill.varlen_attention (the flash kernel, values padded
    to 192) against torch's cuDNN attention (values 128), causal Q x Q and Q queries over K context keys."""
    from kda_serving.model import mla_prefill

    for Q, K, causal in ((8192, 8192, True), (2048, 12288, False), (512, 12288, False), (64, 12288, False)):
        q = torch.randn(Q, 32, 192, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(K, 32, 384, device="cuda", dtype=torch.bfloat16)
        kv[..., 320:] = 0
        k, v = kv[..., :192], kv[..., 192:]
        flops = 2 * Q * K * 32 * (192 + 128) / (2 if causal else 1)
        runs = {"flash": lambda: mla_prefill.varlen_attention(q, k, v, [Q], [K], causal, 0.07, 128)[0],
                "cuDNN": lambda: cudnn_attention(q, k, v[..., :128], causal, 0.07)}
        outs = {name: fn().float() for name, fn in runs.items()}
        times = {name: time_ms(fn, warmup=2, iters=5) for name, fn in runs.items()}
        diff = ((outs["cuDNN"] - outs["flash"]).norm() / outs["flash"].norm()).item()
        print(f"Q {Q:5d} K {K:5d} causal {causal!s:5}: " + "  ".join(
            f"{name} {ms:7.3f} ms ({flops / ms / 1e9:5.0f} TFLOP/s)" for name, ms in times.items())
            + f"  rel diff {diff:.1e}")


def new_shapes():
    """Host cost of a shape an attention kernel has not seen: cuDNN builds (and caches) an execution plan per
    shape, the flash kernel has none. Wall time of the first call of each of 12 new shapes, then of a repeat."""
    import time

    from kda_serving.model import mla_prefill

    runs = {"cuDNN": lambda q, k, v, Q, K: cudnn_attention(q, k, v[..., :128], False, 0.07),
            "flash": lambda q, k, v, Q, K: mla_prefill.varlen_attention(q, k, v, [Q], [K], False, 0.07, 128)}
    for j, (name, fn) in enumerate(runs.items()):
        first, again = [], []
        for i in range(12):
            Q, K = 301 + 7 * i + j, 5003 + 13 * i
            q = torch.randn(Q, 32, 192, device="cuda", dtype=torch.bfloat16)
            kv = torch.randn(K, 32, 384, device="cuda", dtype=torch.bfloat16)
            for times in (first, again):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(q, kv[..., :192], kv[..., 192:], Q, K)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
        print(f"{name}: new shape {statistics.median(first):6.2f} ms median (max {max(first):6.2f}), "
              f"seen shape {statistics.median(again):6.2f} ms")


def main():
    torch.manual_seed(0)
    block = make_block(KIMI48B_MLA, torch.bfloat16, "cuda", seed=0)
    print("ms per block forward: wall (each call timed alone) / GPU (host queued ahead); error against float64")
    print(f"{'Q':>6} {'cached':>7}  " + "  ".join(f"{name:>24}" for name in FORMS))
    cases = [(q, c) for c in (0, 4096, 32768) for q in (16, 32, 64, 96, 128, 192, 256, 512, 2048)] + [(8192, 0)]
    for q, c in cases:
        row = measure(block, [(q, c)], check=q * (q + c) <= 1 << 21)
        print(f"{q:6d} {c:7d}  " + "  ".join(f"{ms:7.3f} / {gpu:7.3f} {err:7.1e}" for ms, gpu, err in row.values()),
              flush=True)
    mixed = [(1, 4096)] * 32 + [(1024, 0)] * 8
    row = measure(block, mixed, check=False)
    print("mixed 8 x 1024 new + 32 decodes at 4K  "
          + "  ".join(f"{ms:7.3f} / {gpu:7.3f}" for ms, gpu, _ in row.values()))


def profile(q_len: int, cached: int, min_q: int = 128, sort_by: str = "cuda_time_total"):
    """The ops of one block forward (auto form) with their total times: CUDA time, or with --host-profile the
    host's own time per op."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    block = make_block(KIMI48B_MLA, torch.bfloat16, "cuda", seed=0)
    batch, cache = make_case([(q_len, cached)], 576, 16, torch.bfloat16, "cuda", seed=0)
    x = torch.randn(batch.num_tokens, 512, device="cuda", dtype=torch.bfloat16)
    mla_block.EXPANDED_MIN_QUERIES = min_q
    with torch.inference_mode(), indices_checked_by_caller():
        for _ in range(3):
            block(x, batch, cache)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                block(x, batch, cache)
            torch.cuda.synchronize()
        import time

        host_ms = {}
        for form, on_kernels in (("ours", True), ("torch", False)):
            mla_block.PREFILL_ON_KERNELS = on_kernels
            block(x, batch, cache)
            torch.cuda._sleep(400_000_000)  # the host alone: queueing never waits for the GPU
            t0 = time.perf_counter()
            for _ in range(10):
                block(x, batch, cache)
            host_ms[form] = (time.perf_counter() - t0) * 100
            torch.cuda.synchronize()
        mla_block.PREFILL_ON_KERNELS = True
    print(f"--- Q {q_len} cached {cached} (5 forwards); host time per forward without the profiler: "
          + ", ".join(f"{form} {ms:.3f} ms" for form, ms in host_ms.items()))
    print(prof.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--new-shapes":
        new_shapes()
    elif len(sys.argv) > 1 and sys.argv[1] in ("--profile", "--host-profile"):
        for arg in sys.argv[2:]:
            q_len, cached = map(int, arg.split("x"))
            profile(q_len, cached, sort_by="self_cpu_time_total" if sys.argv[1] == "--host-profile" else
                    "cuda_time_total")
    else:
        flash_vs_cudnn()
        main()
