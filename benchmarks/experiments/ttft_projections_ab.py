"""Whether ops.linear's table changes the first token of a prompt (a prefill, whose projections run on cuBLAS
either way): the whole Kimi-Linear-48B (fp8 experts) in one engine, P-token prompts into the idle engine,
alternating the table on and off between tries so that both see the same engine, clocks and memory.

    python benchmarks/experiments/ttft_projections_ab.py [--prompt-len 1024] [--tries 8]
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_decode_step import run  # noqa: E402
from bench_engine import prompts  # noqa: E402
from bench_kimi48b import full_model  # noqa: E402

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402

gemv_module = importlib.import_module("kda_serving.ops.gemv")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--tries", type=int, default=8)
    args = ap.parse_args()
    model = full_model("fp8")
    engine = LLMEngine(EngineConfig(device="cuda", quantization="fp8"), model=model)
    vocab = model.config.vocab_size
    run(engine, vocab, 1, 4, False, seed=999)  # warm-up
    table = dict(gemv_module.LINEAR_MAX_BYTES)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    times = {"kernel": [], "cublas": []}
    for r in range(2 * args.tries + 2):
        which = "kernel" if r % 2 == 0 else "cublas"
        gemv_module.LINEAR_MAX_BYTES = table if which == "kernel" else {}
        engine.add_request(f"p{r}", prompts(1, args.prompt_len, vocab, seed=100 + r)[0], one)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        if r >= 2:  # the first of each is a warm-up
            times[which].append(1e3 * (time.perf_counter() - t0))
    for which, ts in times.items():
        print(f"{which}: first token of a {args.prompt_len}-token prompt: median {statistics.median(ts):.1f} ms, "
              f"min {min(ts):.1f}, max {max(ts):.1f} ({', '.join(f'{t:.1f}' for t in ts)})", flush=True)


if __name__ == "__main__":
    main()
