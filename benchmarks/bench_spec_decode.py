"""Speculative decoding on the GPU: what a verifying step costs against a plain decode step, both replayed from
CUDA graphs in the same run, and the generated tokens per second that follow for a given acceptance, on 4
layers of Kimi-Linear-48B shapes (random bf16 weights, bench_engine.py).

    python benchmarks/bench_spec_decode.py [--batch 1,8,32] [--drafts 2,4]
    python benchmarks/bench_spec_decode.py --device cpu     # the embedded default model, measured end to end

Random weights never repeat their context, so prompt lookup proposes nothing here, and a stand-in proposer
with known drafts cannot hold an acceptance either: the drafts would be the run without speculation's tokens,
but a verifying step rounds differently in bf16 and the random model's top two logits are often closer than
that (163,840 tokens), so the outputs part within a few tokens and the drafts stop matching. So the benchmark
measures the step: a verifying step of K drafts does the same work whatever is accepted (drafts here are
the baseline's tokens; the measured tokens per step are printed), and the generated tokens per second at
acceptance a (each draft right with probability a, independently) follow as N * sum_{j<=K} a^j / step time.

A verifying step of N requests with K drafts each moves, per KDA layer, N states in and N * (K + 1) states
out (the state after every token is kept until sampling decides), against N in and N out for a decode: that
state-traffic floor is printed beside each time; with MoE, each draft token also routes to its own experts.
Writes benchmarks/results/<card>-spec_decode.json.

On the CPU (fp32, the embedded default model) the runs with and without speculation compute the same tokens,
so the stand-in proposer holds its acceptance: each draft token is the baseline's with probability a, else a
wrong one, and tokens per second are measured end to end, not projected (cpu-spec_decode.json).
"""

from __future__ import annotations

import argparse
import os
import platform
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


class BaselineDrafter:
    """Drafts each request's next tokens from the run without speculation (right until the outputs part), each
    replaced by a wrong one with probability 1 - accept."""

    def __init__(self, expected: dict[str, list[int]], num_tokens: int, accept: float = 1.0, vocab: int = 1):
        self.expected, self.num_tokens, self.accept, self.vocab = expected, num_tokens, accept, vocab
        self.rng = random.Random(0)

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
        if engine.device.type == "cuda":
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


def baselines(engine: LLMEngine, batches: list[int], vocab: int, prompt_len: int, params: SamplingParams):
    """Per batch size N: N random prompts, a warm-up run (the prompts then sit in the prefix cache) and a timed
    run without drafts; yields (N, prompts, measurements, outputs)."""
    gen = torch.Generator().manual_seed(0)
    for n in batches:
        prompts = [torch.randint(10, vocab, (prompt_len,), generator=gen).tolist() for _ in range(n)]
        engine.scheduler.drafter = None
        run(engine, prompts, params)
        base, expected = run(engine, prompts, params)
        yield n, prompts, base, expected


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--drafts", default="2,4")
    p.add_argument("--accept", default="0.9,0.7,0.5,0.3", help="acceptances to project tokens per second at")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--kda-state-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    batches = [int(x) for x in args.batch.split(",")]
    drafts = [int(x) for x in args.drafts.split(",")]
    accepts = [float(x) for x in args.accept.split(",")]
    if args.device == "cpu":
        return cpu_main(args, batches, drafts, accepts)
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
    results = []
    for n, prompts, base, expected in baselines(engine, batches, vocab, args.prompt_len, params):
        base_floor_us = 1e6 * 2 * n * state_bytes / rate
        print(f"N={n:3d} decode      {base['step_ms_p50']:7.3f} ms/step  {base['generated_tokens_per_s']:9.0f} tok/s"
              f"  (KDA state floor {base_floor_us:6.1f} us)")
        row = {"batch": n, "baseline": {**base, "kda_state_floor_us": base_floor_us}, "speculative": []}
        for k in drafts:
            engine.scheduler.drafter = BaselineDrafter(expected, k)
            run(engine, prompts, params)  # captures this width's graphs
            spec, outputs = run(engine, prompts, params)
            floor_us = 1e6 * n * (2 + k) * state_bytes / rate
            projected = {f"{a:.1f}": n * sum(a**j for j in range(k + 1)) / (1e-3 * spec["step_ms_p50"])
                         for a in accepts}
            print(f"N={n:3d} K={k} verify  {spec['step_ms_p50']:7.3f} ms/step  ({spec['step_ms_p50'] / base['step_ms_p50']:4.2f}x"
                  f" a decode; KDA state floor {floor_us:6.1f} us); measured {spec['tokens_per_step'] / n:4.2f} "
                  f"tok/req/step; at acceptance " + ", ".join(
                      f"{a}: x{v / base['generated_tokens_per_s']:4.2f}" for a, v in projected.items()))
            row["speculative"].append({"drafts": k, **spec, "kda_state_floor_us": floor_us,
                                       "same_tokens_as_baseline": outputs == expected,
                                       "projected_tokens_per_s": projected,
                                       "projected_speedup": {a: v / base["generated_tokens_per_s"]
                                                             for a, v in projected.items()}})
        results.append(row)
    del engine
    release_memory()
    out = args.out or str(RESULTS / f"{card_name()}-spec_decode.json")
    write_json(__import__("pathlib").Path(out), {
        "benchmark": "spec_decode", "environment": environment(), "shape": "kimi48b-4layer",
        "args": vars(args), "copy_rate_gb_s": rate / 1e9, "kda_state_bytes_per_seq": state_bytes,
        "results": results,
    })


def cpu_main(args, batches: list[int], drafts: list[int], accepts: list[float]) -> None:
    """The embedded default model in fp32 on the CPU, where speculation keeps the baseline's tokens: measured
    generated tokens per second at each set acceptance."""
    from kda_serving.model import load_model

    torch.set_num_threads(1)  # the shared two-core machines: steadier
    model = load_model(None, device="cpu", dtype="float32", progress=False)
    vocab = model.config.vocab_size
    engine = LLMEngine(EngineConfig(max_num_seqs=max(batches), num_speculative_tokens=max(drafts),
                                    num_state_slots=max(batches) * (max(drafts) + 2) + 64), model=model)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    results = []
    for n, prompts, base, expected in baselines(engine, batches, vocab, args.prompt_len, params):
        print(f"N={n:3d} decode            {base['step_ms_p50']:7.2f} ms/step  {base['generated_tokens_per_s']:7.0f} tok/s")
        row = {"batch": n, "baseline": base, "speculative": []}
        for k in drafts:
            for accept in (1.0, *accepts, 0.0):
                engine.scheduler.drafter = BaselineDrafter(expected, k, accept, vocab)
                spec, outputs = run(engine, prompts, params)
                speedup = spec["generated_tokens_per_s"] / base["generated_tokens_per_s"]
                print(f"N={n:3d} K={k} a={accept:.1f}  {spec['step_ms_p50']:7.2f} ms/step  "
                      f"{spec['generated_tokens_per_s']:7.0f} tok/s  {spec['tokens_per_step'] / n:4.2f} tok/req/step  "
                      f"x{speedup:4.2f}{'' if outputs == expected else '  OUTPUT DIFFERS'}")
                row["speculative"].append({"drafts": k, "accept": accept, **spec, "speedup": speedup,
                                           "same_tokens_as_baseline": outputs == expected})
        results.append(row)
    out = args.out or str(RESULTS / "cpu-spec_decode.json")
    write_json(__import__("pathlib").Path(out), {
        "benchmark": "spec_decode", "environment": {"cpu": platform.processor() or platform.machine(),
                                                    "torch": torch.__version__, "threads": 1},
        "shape": "tiny-default", "args": vars(args), "results": results,
    })


if __name__ == "__main__":
    main()
