"""Asynchronous scheduling on the GPU: decode throughput and step time with the engine's host work overlapped
with the GPU (EngineConfig.async_scheduling, the default on CUDA) against the same engine reading every step's
tokens back before it schedules the next (the baseline), in the same run, rounds alternating, on 4 layers of
Kimi-Linear-48B shapes (random bf16 weights, bench_engine.py), decode steps replayed from CUDA graphs.

    python benchmarks/bench_async_scheduling.py [--batch 1,8,32,64] [--output-len 128] [--rounds 2]

Scenarios: `decode`, N requests of 8 prompt tokens and G generated tokens (steady decode); `mixed`, the same
plus requests of 1024 prompt tokens arriving every 16 steps (prefill chunks beside the decodes, which run
eagerly). Reported: generated tokens per second over the whole run, and the median decode step (the wall time
of step() calls that ran a decode-only step, which in the steady state is the time between two steps).

Floor: the bytes a decode step must move at the card's copy rate (measured at the start of the run): every
weight but the embedding and the routed experts, the routed experts that N tokens' top-8 choices are expected
to touch (256 * (1 - (1 - 8/256)^N) of 256 per MoE layer, uniform routing), the KDA states read and written,
and the MLA latents read. Writes benchmarks/results/<card>-async_scheduling.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py

from bench_engine import prompts, random_kimi48b_model, release_memory  # noqa: E402
from common import RESULTS, card_name, copy_rate_bytes_per_s, environment, write_json  # noqa: E402

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402


def decode_floor_bytes(model, engine: LLMEngine, n: int, context: int) -> float:
    """Bytes one decode step of n sequences at `context` tokens must read or write (see the module doc)."""
    cfg = model.config
    touched = 1 - (1 - cfg.num_experts_per_token / cfg.num_experts) ** n
    total = 0.0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if name == "embed_tokens":
            nbytes = n * p.shape[1] * p.element_size()
        elif name.endswith(("mlp.gate_up_proj", "mlp.down_proj")) and p.dim() == 3:
            nbytes *= touched
        total += nbytes
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
    results = []
    for scenario in args.scenarios.split(","):
        for n in batches:
            best: dict[str, dict] = {}
            floor_ms = None
            for r in range(args.rounds):
                for mode in ("sync", "async"):
                    engine = LLMEngine(EngineConfig(
                        device="cuda", max_num_seqs=max(batches) + 2, max_num_batched_tokens=8192,
                        num_state_slots=2 * max(batches) + 8, num_kv_blocks=max(batches) * 16 + 1024,
                        async_scheduling=mode == "async"), model=model)
                    run(engine, vocab, 1, 4, False, seed=999)  # warm-up
                    report = run(engine, vocab, n, args.output_len, scenario == "mixed", seed=10 * r)
                    if floor_ms is None:
                        context = 8 + args.output_len // 2
                        floor_ms = 1e3 * decode_floor_bytes(model, engine, n, context) / rate
                    if mode not in best or report["seconds"] < best[mode]["seconds"]:
                        best[mode] = report
                    del engine
                    release_memory()
            row = {"scenario": scenario, "batch": n, "floor_ms": floor_ms, **{
                f"{mode}_{k}": v for mode, rep in best.items() for k, v in rep.items()}}
            row["speedup_tokens_per_s"] = best["async"]["generated_tokens_per_s"] / best["sync"]["generated_tokens_per_s"]
            results.append(row)
            print(f"{scenario:6s} N={n:3d}: decode step p50 sync {best['sync']['decode_step_ms_p50']:.3f} ms, "
                  f"async {best['async']['decode_step_ms_p50']:.3f} ms (floor {floor_ms:.3f} ms); "
                  f"generated tok/s sync {best['sync']['generated_tokens_per_s']:.0f}, "
                  f"async {best['async']['generated_tokens_per_s']:.0f} ({row['speedup_tokens_per_s']:.2f}x)",
                  flush=True)
    out = args.out or RESULTS / f"{card_name()}-async_scheduling.json"
    write_json(out, {"benchmark": "async_scheduling", "environment": environment(),
                     "copy_rate_bytes_per_s": rate, "shape": "kimi48b-4layer", "args": vars(args),
                     "results": results})


if __name__ == "__main__":
    main()
