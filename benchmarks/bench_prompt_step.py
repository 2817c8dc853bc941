"""Steps with prompt tokens: eager against piecewise CUDA graphs (engine/prompt_graphs.py), in the same run, on
the 4-layer Kimi-Linear-48B-shaped model (bench_engine.py's kimi48b-4layer, random bf16 weights).

One engine is built (its prompt graphs captured); each step is a RaggedBatch made here and run through the
engine's ModelRunner.execute, once with its prompt graphs and once without (the eager forward, the baseline):
- wall: median milliseconds of execute with the device synchronised after it, the latency a step adds;
- gpu: the same step with the host queued ahead of the GPU (common.gpu_ms), its kernels' own time: what a step
  would take if the host cost nothing, the floor of the step as its kernels are;
- logits: the two modes' from the same caches, and the eager forward's with the step padded to the graphs'
  bucket by a prompt of its own, against the step's (what padding alone changes);
- weights floor: the bytes of weights the step must read (every weight but the embedding table, the experts
  at the share that T tokens touch under uniform routing) at the copy rate measured at the start.

Steps: fresh prompts (one of 16 to 512 tokens; 64 of 8), a turn of 64 tokens after 4,096 cached, and prompt
chunks among running decodes. Repeating a step is harmless: a fresh prompt rewrites the same state slot and KV
rows, a decode advances a state in place. The logits of the two modes are compared once, from the same caches.

    python benchmarks/bench_prompt_step.py [--out-dir DIR] [--iters 20]

Prints a table, writes <out-dir>/<card>-prompt_step.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py

from bench_engine import random_kimi48b_model  # noqa: E402
from common import RESULTS, card_name, copy_rate_bytes_per_s, environment, gpu_ms, weight_bytes, write_json  # noqa: E402

from kda_serving.engine import EngineConfig, LLMEngine  # noqa: E402
from kda_serving.model.batch import RaggedBatch  # noqa: E402

BLOCK = 16
# (name, [(cached tokens, new tokens) per sequence])
STEPS = [
    ("1 prompt x 16", [(0, 16)]),
    ("1 prompt x 64", [(0, 64)]),
    ("1 prompt x 256", [(0, 256)]),
    ("1 prompt x 512", [(0, 512)]),
    ("64 prompts x 8", [(0, 8)] * 64),
    ("turn: 64 after 4096", [(4096, 64)]),
    ("32 decodes + 64-token chunk", [(1024, 1)] * 32 + [(0, 64)]),
    ("63 decodes + 256-token chunk", [(1024, 1)] * 63 + [(512, 256)]),
]


def make_step(seqs: list[tuple[int, int]], vocab: int, gen: torch.Generator) -> RaggedBatch:
    """A batch of the given (cached, new) sequences: sequence n in state slot n, its blocks consecutive after the
    previous sequence's; logits for each sequence's last token."""
    ids, positions, slots, tables, cu = [], [], [], [], [0]
    width = max(-(-(c + n) // BLOCK) for c, n in seqs)
    first = 0
    for c, n in seqs:
        blocks = list(range(first, first + -(-(c + n) // BLOCK)))
        first += len(blocks)
        ids += torch.randint(10, vocab, (n,), generator=gen).tolist()
        positions += list(range(c, c + n))
        slots += [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(c, c + n)]
        tables.append(blocks + [-1] * (width - len(blocks)))
        cu.append(cu[-1] + n)
    cached = torch.tensor([c for c, _ in seqs], dtype=torch.int32)
    new = [n for _, n in seqs]
    seq_lens = cached + torch.tensor(new, dtype=torch.int32)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    return RaggedBatch(
        input_ids=torch.tensor(ids), positions=torch.tensor(positions), cu_seqlens=cu_t, context_lens=cached,
        seq_lens=seq_lens, state_slots=torch.arange(len(seqs), dtype=torch.int32), has_initial_state=cached > 0,
        block_tables=torch.tensor(tables, dtype=torch.int32), slot_mapping=torch.tensor(slots),
        logits_indices=(cu_t[1:] - 1).long(), query_lens=new, kv_lens=seq_lens.tolist(),
        is_decode=all(n == 1 and c > 0 for c, n in seqs),
    )


def experts_touched(model, tokens: int) -> float:
    """The expected share of the routed experts that `tokens` tokens' top-k choices touch, routed uniformly."""
    k, experts = model.config.num_experts_per_token, max(model.config.num_experts, 1)
    return 1 - (1 - k / experts) ** tokens


def step_engine(model, steps: list[list[tuple[int, int]]]) -> LLMEngine:
    """An engine (prompt graphs up to 512 tokens) with room for any of `steps` (make_step's slots and blocks)
    plus a padding prompt of up to 512 tokens (its own state slot and blocks)."""
    seqs = max(len(s) for s in steps)
    blocks = max(sum(-(-(c + n) // BLOCK) for c, n in s) for s in steps) + 512 // BLOCK
    return LLMEngine(EngineConfig(device="cuda", max_num_seqs=seqs, max_num_batched_tokens=2048,
                                  num_state_slots=seqs + 1, num_kv_blocks=blocks), model=model)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    rate = copy_rate_bytes_per_s()
    model = random_kimi48b_model(torch.device("cuda"))
    before = torch.cuda.memory_reserved()
    t0 = time.perf_counter()
    engine = step_engine(model, [s for _, s in STEPS])
    runner = engine.runner
    graphs = runner.prompt_graphs
    setup = {"engine_start_s": time.perf_counter() - t0,
             "reserved_after_start_mib": (torch.cuda.memory_reserved() - before) / 2**20,
             "buckets": graphs.buckets, "prompt_capture_s": graphs.capture_seconds,
             "prompt_capture_reserved_mib": graphs.capture_bytes / 2**20}
    print(f"{torch.cuda.get_device_name()}: engine start {setup['engine_start_s']:.1f} s; prompt pieces of "
          f"{graphs.buckets} tokens captured in {graphs.capture_seconds:.2f} s, "
          f"{setup['prompt_capture_reserved_mib']:.0f} MiB more reserved")
    nothing = SimpleNamespace(state_restores=[], block_copies=[], state_saves=[])
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'step':32s} {'tokens':>6s} {'eager wall':>10s} {'graphs wall':>11s} {'speed-up':>8s} "
          f"{'eager gpu':>9s} {'graphs gpu':>10s} {'weights floor':>13s}  (ms)")
    for name, seqs in STEPS:
        batch = make_step(seqs, model.config.vocab_size, gen)
        result = {"step": name, "tokens": batch.num_tokens, "sequences": batch.num_seqs}
        outs = {}
        pools = runner.caches.recurrent + runner.caches.conv + runner.caches.kv
        saved = [p.clone() for p in pools]
        for mode, prompt_graphs in (("eager", None), ("graphs", graphs)):
            runner.prompt_graphs = prompt_graphs

            def step():
                return runner.execute(nothing, batch)

            for p, s in zip(pools, saved):  # both modes' logits from the same states
                p.copy_(s)
            outs[mode] = step()
            walls = []
            for _ in range(args.iters):
                torch.cuda.synchronize()
                t = time.perf_counter()
                step()
                torch.cuda.synchronize()
                walls.append(1e3 * (time.perf_counter() - t))
            result[f"{mode}_wall_ms"] = statistics.median(walls)
            result[f"{mode}_gpu_ms"] = gpu_ms(step, n=5)
        # The graphs run the step padded to its bucket; so does the eager forward here, the padding a fresh
        # prompt of its own: how far padding alone moves the logits (GEMMs of other shapes round otherwise).
        pad = graphs.bucket(batch.num_tokens) - batch.num_tokens
        if pad:
            padded = make_step(seqs + [(0, pad)], model.config.vocab_size, gen)
            padded.input_ids[: batch.num_tokens] = batch.input_ids
            for p, s in zip(pools, saved):
                p.copy_(s)
            runner.prompt_graphs = None
            outs["eager_padded"] = runner.execute(nothing, padded)[:-1]  # the padding prompt's row dropped
        runner.prompt_graphs = graphs
        del saved
        touched = experts_touched(model, batch.num_tokens)
        result["weights_floor_ms"] = 1e3 * weight_bytes(model, batch.num_tokens, touched) / rate
        a, b = outs["eager"].double(), outs["graphs"].double()
        result["logits_rel_diff"] = ((a - b).norm() / a.norm()).item()
        if "eager_padded" in outs:
            result["eager_padded_rel_diff"] = ((a - outs["eager_padded"].double()).norm() / a.norm()).item()
        rows.append(result)
        print(f"{name:32s} {batch.num_tokens:6d} {result['eager_wall_ms']:10.2f} {result['graphs_wall_ms']:11.2f} "
              f"{result['eager_wall_ms'] / result['graphs_wall_ms']:7.2f}x {result['eager_gpu_ms']:9.2f} "
              f"{result['graphs_gpu_ms']:10.2f} {result['weights_floor_ms']:13.2f}   "
              f"(logits rel diff {result['logits_rel_diff']:.1e}; eager padded to the bucket: "
              f"{result.get('eager_padded_rel_diff', 0):.1e})")
    payload = {"benchmark": "prompt_step", "environment": environment(), "copy_rate_gb_s": rate / 1e9,
               "setup": setup, "results": rows}
    write_json(Path(args.out_dir) / f"{card_name()}-prompt_step.json", payload)


if __name__ == "__main__":
    main()
