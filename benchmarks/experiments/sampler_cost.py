"""What sampling N random rows of Kimi-Linear's 163,840-token vocabulary costs a step (experiment, not part of
CI): the code before session 17 (a noise draw per row, and a sort of every row even with nothing to cut)
against Sampler.sample now (one draw for the unseeded rows; no sort without top-k or top-p, a top-k selection
when every row has a top-k), for plain temperature sampling (the OpenAI defaults), top-k 50, and top-p 0.95.
Wall clock with the device synchronised, median of 30, the two alternating, the second round kept.

    python benchmarks/experiments/sampler_cost.py [--rows 16,64,256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kda_serving.engine.sampler import Sampler
from kda_serving.engine.sampling_params import SamplingParams


def before(sampler, logits, params, gens) -> torch.Tensor:
    """Session 16's random-row path: every row sorted (_filtered_probs' sort, forced by a top-p that cuts
    nothing), a noise draw per row, the race."""
    forced = [SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=min(p.top_p, 1 - 1e-9))
              for p in params]
    probs = sampler._filtered_probs(logits, forced)
    noise = torch.empty_like(probs)
    for j in range(len(params)):
        noise[j].exponential_(generator=gens[j] or sampler.generator)
    return (probs / noise.clamp_(min=1e-38)).argmax(dim=-1)


def median_ms(fn) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(30):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="16,64,256")
    args = ap.parse_args()
    dev = torch.device("cuda")
    sampler = Sampler(torch.Generator(device=dev).manual_seed(0))
    print(torch.cuda.get_device_name())
    for kind, kw in (("temperature", {}), ("top-k 50", {"top_k": 50}), ("top-p 0.95", {"top_p": 0.95})):
        for n in (int(x) for x in args.rows.split(",")):
            logits = torch.randn(n, 163840, device=dev) * 3
            params, gens = [SamplingParams(temperature=0.8, **kw)] * n, [None] * n
            times = {}
            for name in ("before", "now", "before", "now"):
                fn = (lambda: before(sampler, logits, params, gens)) if name == "before" else (
                    lambda: sampler.sample(logits, params, gens).tokens)
                times[name] = median_ms(fn)
            print(f"{kind:12s} {n:4d} rows: before {times['before']:.3f} ms, now {times['now']:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
