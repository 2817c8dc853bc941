"""Speculative decoding on the GPU: generated tokens per second of verifying steps against plain decode steps
(CUDA graphs) in the same run, on 4 layers of Kimi-Linear-48B shapes (random bf16 weights, bench_engine.py).

    python benchmarks/bench_spec_decode.py [--batch 1,8,32] [--drafts 2,4] [--accept 1.0,0.8,0.5,0.0]

Random weights never repeat their context, so prompt lookup would propose nothing here. The drafts come
from a stand-in proposer with a set acceptance instead: the baseline's own (greedy) output tokens, each
replaced by a wrong one with probability 1 - accept. The speculating run then produces the baseline's
tokens (checked), and a verifying step keeps on average sum_{j<=K} accept^j tokens. This measures what a
verifying step costs against what it gains, for the acceptance a workload has (prompt lookup on code edits
and quoted text is high; on free chat low).

A verifying step of N requests with K drafts each moves, per KDA layer, N states in and N * (K + 1) states
out (the state after every token is kept until sampling decides), against N in and N out for a decode: its
state-traffic floor is printed beside each time. Writes benchmarks/results/<card>-spec_decode.json.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py

from bench_engine import random_kimi48b_model, release_memory  # noqa: E402
from common import RESULTS, card_name, copy_rate_bytes_per_s, environment, write_json  # noqa: E402

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402


class SetAcceptanceDrafter:
    """Drafts the known continuation of each request with every token wrong with probability 1 - accept."""

    def __init__(self, expected: dict[str, list[int]], num_tokens: int, accept: float, vocab: int, seed: int = 0):
        self.expected, self.num_tokens, self.accept, self.vocab = expected, num_tokens, accept, vocab
        self.rng = random.Random(seed)

    def limit(self, seq) -> int:
        return max(0, min(self.num_tokens, seq.params.max_tokens - seq.num_output_tokens - 1))

    def propose(self, seq) -> list[int]:
        n = seq.num_output_tokens
        drafts = self.expected[seq.request_id][n : n + self.limit(seq)]
        return [t if self.rng.random() < self.accept else (t + 1) % self.vocab for t in drafts]


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[dict, dict[str, list[int]]]:
    """All requests at once; times the steps without prompt tokens (decodes or verifications)."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    outputs = {f"r{i}": [] for i in range(len(prompts))}
    times, tokens = [], []
    while engine.has_unfinished_requests():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = engine.step()
        t1 = time.perf_counter()  # step() ends by reading the sampled tokens: the GPU is done
        new = sum(len(o.new_token_ids) for o in outs)
        for o in outs:
            outputs[o.request_id] += o.new_token_ids
        if engine.last_step.num_prefill_tokens == 0:
            times.append(t1 - t0)
            tokens.append(new)
    return {
        "steps": len(times),
        "step_ms_p50": 1e3 * statistics.median(times),
        "tokens_per_step": sum(tokens) / len(times),
        "generated_tokens_per_s": sum(tokens) / sum(times),
    }, outputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--drafts", default="2,4")
    p.add_argument("--accept", default="1.0,0.8,0.5,0.0")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--kda-state-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    batches = [int(x) for x in args.batch.split(",")]
    drafts = [int(x) for x in args.drafts.split(",")]
    accepts = [float(x) for x in args.accept.split(",")]
    device = torch.device("cuda")
    model = random_kimi48b_model(device)
    cfg = model.config
    vocab = cfg.vocab_size
    state_bytes = cfg.linear_num_heads * cfg.linear_head_dim**2 * torch.empty((), dtype=getattr(
        torch, args.kda_state_dtype)).element_size() * len(cfg.kda_layers)
    rate = copy_rate_bytes_per_s()
    engine = LLMEngine(EngineConfig(device="cuda", max_num_seqs=max(batches), max_num_batched_tokens=8192,
                                    num_speculative_tokens=max(drafts), kda_state_dtype=args.kda_state_dtype,
                                    num_state_slots=max(batches) * (max(drafts) + 2) + 64),
                       model=model, tokenizer=None)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    results = []
    for n in batches:
        prompts = [torch.randint(10, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(n)]
        engine.scheduler.drafter = None
        run(engine, prompts, params)  # warm-up (and the prompts enter the prefix cache)
        base, expected = run(engine, prompts, params)
        base_floor_us = 1e6 * 2 * n * state_bytes / rate
        print(f"N={n:3d} decode      {base['step_ms_p50']:7.3f} ms/step  {base['generated_tokens_per_s']:9.0f} tok/s"
              f"  (KDA state floor {base_floor_us:6.1f} us)")
        row = {"batch": n, "baseline": {**base, "kda_state_floor_us": base_floor_us}, "speculative": []}
        for k in drafts:
            for accept in accepts:
                engine.scheduler.drafter = SetAcceptanceDrafter(expected, k, accept, vocab, seed=k)
                spec, outputs = run(engine, prompts, params)
                same = outputs == expected
                floor_us = 1e6 * n * (2 + k) * state_bytes / rate
                speedup = spec["generated_tokens_per_s"] / base["generated_tokens_per_s"]
                print(f"N={n:3d} K={k} a={accept:.1f} {spec['step_ms_p50']:7.3f} ms/step  "
                      f"{spec['generated_tokens_per_s']:9.0f} tok/s  {spec['tokens_per_step'] / n:4.2f} tok/req/step "
                      f"x{speedup:4.2f}  (KDA state floor {floor_us:6.1f} us){'' if same else '  OUTPUT DIFFERS'}")
                row["speculative"].append({"drafts": k, "accept": accept, **spec, "kda_state_floor_us": floor_us,
                                           "speedup": speedup, "same_tokens_as_baseline": same})
        results.append(row)
    del engine
    release_memory()
    out = args.out or str(RESULTS / f"{card_name()}-spec_decode.json")
    write_json(__import__("pathlib").Path(out), {
        "benchmark": "spec_decode", "environment": environment(), "shape": "kimi48b-4layer",
        "args": vars(args), "copy_rate_gb_s": rate / 1e9, "kda_state_bytes_per_seq": state_bytes,
        "results": results,
    })


if __name__ == "__main__":
    main()
