"""The sampler's top-p and top-k cuts: our radix-floor kernel (kda_serving.ops.sampling, csrc/sampling) against
what it replaced, in the same run, on Kimi-Linear's 163,840-token vocabulary in fp32.

- The cut alone (GPU time, the host queued ahead): top_p_floor against a sort of every row, the heart of the
  session-17 filter (which then also took a softmax, a cumulative sum and a scatter over the sorted rows);
  top_k_floor against torch.topk. The floor is one read of the rows at the copy rate measured at the start.
- The whole Sampler.sample of unseeded rows at temperature 0.8 (wall clock with the device synchronised, so the
  host's work counts too): with the session-17 filter (a copy below) against the filter now, alternating.

    python benchmarks/bench_sampling.py [--out-dir DIR] [--rows 1,8,16,64,256]

Prints a table, writes <out-dir>/<card>-sampling.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py

from common import RESULTS, card_name, copy_rate_bytes_per_s, environment, gpu_ms, write_json  # noqa: E402

from kda_serving.engine.sampler import Sampler  # noqa: E402
from kda_serving.engine.sampling_params import SamplingParams  # noqa: E402
from kda_serving.model.batch import host_to_device  # noqa: E402
from kda_serving.ops.sampling import top_k_floor, top_p_floor  # noqa: E402

VOCAB = 163840
KINDS = (("temperature", {}), ("top-k 50", {"top_k": 50}), ("top-p 0.95", {"top_p": 0.95}),
         ("top-k 50 + top-p 0.95", {"top_k": 50, "top_p": 0.95}))


def session17_filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Session 17's Sampler._filtered_probs (a copy): softmax of logits / temperature with everything outside
    each row's top-k and top-p set to 0.

    Sorting every row of a 163,840-token vocabulary is most of a sampled step's device time, so it is done
    only when some row has a top-p or the rows mix top-k with none: without top-k or top-p (the OpenAI
    defaults) there is nothing to cut, and with a top-k on every row a selection of the largest k suffices."""
    temps = host_to_device([p.temperature for p in params], logits.device).unsqueeze(1)
    logits = logits / temps
    vocab = logits.shape[1]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if all(p.top_p >= 1 for p in params) and (min(ks) == vocab or max(ks) < vocab):
        if min(ks) == vocab:
            return logits.softmax(dim=-1)
        values, ids = logits.topk(max(ks), dim=-1)
        rank = torch.arange(max(ks), device=logits.device).unsqueeze(0)
        values = values.masked_fill(rank >= host_to_device(ks, logits.device).unsqueeze(1), float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(1, ids, values).softmax(dim=-1)
    top_k = host_to_device(ks, logits.device)
    # top_p 1 keeps everything (a cumulative sum can round past 1 before the last token)
    top_p = host_to_device([p.top_p if p.top_p < 1 else float("inf") for p in params], logits.device)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(rank >= top_k.unsqueeze(1), float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest set whose mass (within the top-k) reaches top_p: a token goes when the mass before
    # it already does. The most likely token always stays.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = mass_before >= top_p.unsqueeze(1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return filtered.softmax(dim=-1)


class Session17Sampler(Sampler):
    """Sampler.sample as it is, with session 17's filter."""

    _filtered_probs = staticmethod(session17_filtered_probs)


def wall_ms(fn, iters: int = 30) -> float:
    """Median wall milliseconds of fn() with the device synchronised after each call."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(samples)


def cut_case(rows: int, copy_rate: float, gen: torch.Generator) -> dict:
    logits = torch.randn(rows, VOCAB, generator=gen, device="cuda") * 3
    probs = logits.softmax(-1)
    floor_us = rows * VOCAB * 4 / copy_rate * 1e6
    times = {
        "top_p_floor_us": gpu_ms(lambda: top_p_floor(probs, [0.95] * rows)) * 1e3,
        "sort_us": gpu_ms(lambda: probs.sort(dim=-1, descending=True)) * 1e3,
        "top_k_floor_us": gpu_ms(lambda: top_k_floor(logits, [50] * rows)) * 1e3,
        "torch_topk_us": gpu_ms(lambda: logits.topk(50, dim=-1)) * 1e3,
    }
    print(f"{rows:4d} rows | top-p floor {times['top_p_floor_us']:7.1f} us, sort {times['sort_us']:7.1f} us | "
          f"top-k floor {times['top_k_floor_us']:7.1f} us, torch.topk {times['torch_topk_us']:7.1f} us | "
          f"floor (one read) {floor_us:5.1f} us", flush=True)
    return {"rows": rows, "vocab": VOCAB, "floor_us": floor_us, **times}


def sample_case(rows: int, kind: str, kw: dict, now: Sampler, before: Sampler, gen: torch.Generator) -> dict:
    logits = torch.randn(rows, VOCAB, generator=gen, device="cuda") * 3
    params, gens = [SamplingParams(temperature=0.8, **kw)] * rows, [None] * rows
    times = {}
    for name in ("session17_ms", "now_ms", "session17_ms", "now_ms"):  # alternating; the second round kept
        sampler = before if name == "session17_ms" else now
        times[name] = wall_ms(lambda: sampler.sample(logits, params, gens).tokens)
    print(f"{kind:22s} {rows:4d} rows: session 17 {times['session17_ms']:.3f} ms, now {times['now_ms']:.3f} ms",
          flush=True)
    return {"rows": rows, "kind": kind, **times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--rows", default="1,8,16,64,256")
    args = ap.parse_args()
    row_counts = [int(r) for r in args.rows.split(",")]
    copy_rate = copy_rate_bytes_per_s()
    print(f"{torch.cuda.get_device_name()}: copy rate {copy_rate / 1e12:.2f} TB/s (read + write)")
    gen = torch.Generator(device="cuda").manual_seed(0)
    cuts = [cut_case(rows, copy_rate, gen) for rows in row_counts]
    now = Sampler(torch.Generator(device="cuda").manual_seed(0))
    before = Session17Sampler(torch.Generator(device="cuda").manual_seed(0))
    samples = [sample_case(rows, kind, kw, now, before, gen) for kind, kw in KINDS for rows in row_counts]
    write_json(Path(args.out_dir) / f"{card_name()}-sampling.json",
               {"benchmark": "sampling", "environment": environment(), "copy_rate_bytes_per_s": copy_rate,
                "cuts": cuts, "sample": samples})


if __name__ == "__main__":
    main()
