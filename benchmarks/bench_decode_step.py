"""The engine's decode step on the GPU with its two step-level optimisations, each against the engine without
them (the baseline), in the same run, rounds alternating, on 4 layers of Kimi-Linear-48B shapes (random bf16
weights, bench_engine.py), decode steps replayed from CUDA graphs:

  baseline       every step's tokens read back before the next is scheduled; the model's plain torch eager
  async          asynchronous scheduling (EngineConfig.async_scheduling): host work overlapped with the GPU
  async+compile  and the norms, residual adds and MoE router compiled (EngineConfig.torch_compile): the default

    python benchmarks/bench_decode_step.py [--batch 1,8,32,64] [--output-len 128] [--rounds 2]

Scenarios: `decode`, N requests of 8 prompt tokens and G generated tokens (steady decode); `mixed`, the same
plus requests of 1024 prompt tokens arriving every 16 steps (prefill chunks beside the decodes, which run
eagerly). Reported: generated tokens per second over the whole run, and the median decode step (the wall time
of step() calls that ran a decode-only step, which in the steady state is the time between two steps).

Floor: the bytes a decode step must move at the card's copy rate (measured at the start of the run): every
weight but the embedding and the routed experts, the routed experts that the step's tokens chose (counted in
eager decode steps of the same requests: random weights route far from uniformly, so the 256 * (1 - (1 -
8/256)^N) experts of uniform routing would overstate it), the KDA states read and written, and the MLA latents
read. Writes benchmarks/results/<card>-decode_step.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py

from bench_engine import prompts, random_kimi48b_model, release_memory  # noqa: E402
from common import RESULTS, card_name, copy_rate_bytes_per_s, environment, weight_bytes, write_json  # noqa: E402

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from kda_serving.model.moe import MoE  # noqa: E402


MODES = {"baseline": (False, False), "async": (True, False), "async+compile": (True, True)}  # (overlap, compile)


def routed_expert_fraction(model, vocab: int, n: int) -> float:
    """The mean share of each MoE layer's routed experts that a decode step of n requests touches, counted over
    eager decode steps (graphs would hide the routing from Python)."""
    shares = []
    route = MoE.route

    def counting_route(self, x):
        ids, weights = route(self, x)
        if x.shape[0] == n:
            shares.append(ids.unique().numel() / self.num_experts)
        return ids, weights

    MoE.route = counting_route
    try:
        engine = LLMEngine(EngineConfig(device="cuda", max_num_seqs=n, num_state_slots=n + 2, num_kv_blocks=n * 16 + 64,
                                        enable_cuda_graphs=False, torch_compile=False), model=model)
        run(engine, vocab, n, 16, False, seed=7)
    finally:
        MoE.route = route
    del engine
    release_memory()
    return statistics.fmean(shares)


def decode_floor_bytes(model, engine: LLMEngine, n: int, context: int, touched: float) -> float:
    """Bytes one decode step of n sequences at `context` tokens must read or write (see the module doc), a
    share `touched` of the routed experts read."""
    total = weight_bytes(model, n, touched)
    caches = engine.runner.caches
    for state in caches.recurrent:  # read + written, per sequence
        total += 2 * n * state[0].numel() * state.element_size()
    for kv in caches.kv:  # [blocks, block_size, latent]: read up to the context
        total += n * context * kv.shape[-1] * kv.element_size()
    return total


def run(engine: LLMEngine, vocab: int, n: int, output_len: int, mixed: bool, seed: int) -> dict:
    greedy = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, output_kind="delta")
    for i, ids in enumerate(prompts(n, 8, vocab, seed=seed)):
        engine.add_request(f"d{seed}-{i}", ids, greedy)
    arrivals = prompts(output_len // 16, 1024, vocab, seed=seed + 1) if mixed else []
    one_token = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, output_kind="delta")
    generated, steps, decode_ms = 0, 0, []
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        if arrivals and steps % 16 == 0:
            engine.add_request(f"p{seed}-{steps}", arrivals.pop(), one_token)
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        steps += 1
        if engine.last_step is not None and engine.last_step.is_decode:
            decode_ms.append(1e3 * dt)
        generated += sum(len(o.new_token_ids) for o in outs if o.request_id.startswith("d"))
    seconds = time.perf_counter() - start
    return {"generated_tokens": generated, "seconds": seconds, "generated_tokens_per_s": generated / seconds,
            "decode_step_ms_p50": statistics.median(decode_ms) if decode_ms else None, "steps": steps}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="1,8,32,64")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per mode; the fastest is kept")
    ap.add_argument("--scenarios", default="decode,mixed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    rate = copy_rate_bytes_per_s()
    model = random_kimi48b_model(device)
    vocab = model.config.vocab_size
    batches = [int(b) for b in args.batch.split(",")]
    touched = {n: routed_expert_fraction(model, vocab, n) for n in batches}
    print("routed experts touched per decode step:", {n: round(f, 3) for n, f in touched.items()})
    results = []
    for scenario in args.scenarios.split(","):
        for n in batches:
            best: dict[str, dict] = {}
            floor_ms = None
            for r in range(args.rounds):
                for mode, (overlap, compiled) in MODES.items():
                    engine = LLMEngine(EngineConfig(
                        device="cuda", max_num_seqs=max(batches) + 2, max_num_batched_tokens=8192,
                        num_state_slots=2 * max(batches) + 8, num_kv_blocks=max(batches) * 16 + 1024,
                        async_scheduling=overlap, torch_compile=compiled), model=model)
                    run(engine, vocab, 1, 4, False, seed=999)  # warm-up
                    report = run(engine, vocab, n, args.output_len, scenario == "mixed", seed=10 * r)
                    if floor_ms is None:
                        context = 8 + args.output_len // 2
                        floor_ms = 1e3 * decode_floor_bytes(model, engine, n, context, touched[n]) / rate
                    if mode not in best or report["seconds"] < best[mode]["seconds"]:
                        best[mode] = report
                    del engine
                    release_memory()
            row = {"scenario": scenario, "batch": n, "floor_ms": floor_ms, "routed_experts_touched": touched[n], **{
                f"{mode}_{k}": v for mode, rep in best.items() for k, v in rep.items()}}
            base = best["baseline"]["generated_tokens_per_s"]
            for mode in MODES:
                row[f"{mode}_speedup"] = best[mode]["generated_tokens_per_s"] / base
            results.append(row)
            print(f"{scenario:6s} N={n:3d}: decode step p50 " + ", ".join(
                f"{mode} {best[mode]['decode_step_ms_p50']:.3f}" for mode in MODES) + f" ms (floor {floor_ms:.3f} ms); "
                "generated tok/s " + ", ".join(
                f"{mode} {best[mode]['generated_tokens_per_s']:.0f} ({row[mode + '_speedup']:.2f}x)" for mode in MODES),
                flush=True)
    out = Path(args.out) if args.out else RESULTS / f"{card_name()}-decode_step.json"
    write_json(out, {"benchmark": "decode_step", "modes": {m: {"async_scheduling": a, "torch_compile": c}
                                                          for m, (a, c) in MODES.items()}, "environment": environment(),
                     "copy_rate_bytes_per_s": rate, "shape": "kimi48b-4layer", "args": vars(args),
                     "results": results})


if __name__ == "__main__":
    main()
