"""Host synchronisations and wall time of eager engine steps (GPU; the 4-layer Kimi-Linear-48B shape).

    python benchmarks/experiments/engine_syncs.py [--root DIR] [--rounds R]

Runs four kinds of step on a fresh engine and, for each, counts the synchronising CUDA calls that torch
reports (torch.cuda.set_sync_debug_mode("warn")) by the first kda_serving frame that made them, then times
the same kind of step R more times with the sync reporting off:
  prefill   8 new requests of 512 prompt tokens (one step of 4096 tokens)
  mixed     8 running decodes plus one new 512-token prompt
  turn      a follow-up turn of 64 tokens on a cached 1024-token conversation (state restore, checkpoints)
  decode    8 running decodes (a CUDA-graph replay)
--root picks the repository whose kda_serving and benchmarks/bench_engine.py are imported, so that an older
tree (git archive of a commit) runs the same script for a before/after comparison in one call.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import traceback
import warnings

ap = argparse.ArgumentParser()
ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
ap.add_argument("--rounds", type=int, default=20)
ap.add_argument("--out", default=None)
args = ap.parse_args()
sys.path.insert(0, os.path.join(args.root, "benchmarks"))
sys.path.insert(0, args.root)

import torch  # noqa: E402

import bench_engine  # noqa: E402
from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402

device = torch.device("cuda")
model = bench_engine.random_kimi48b_model(device)
vocab = model.config.vocab_size
gen = torch.Generator().manual_seed(0)


def tokens(n: int) -> list[int]:
    return torch.randint(10, vocab, (n,), generator=gen).tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


engine = LLMEngine(EngineConfig(device="cuda", max_num_seqs=16, max_num_batched_tokens=4096, block_size=16,
                                enable_prefix_caching=True, num_state_slots=160, num_kv_blocks=4096), model=model)
ids = iter(range(10**9))


def add(prompt: list[int], out_tokens: int) -> str:
    rid = f"r{next(ids)}"
    engine.add_request(rid, prompt, greedy(out_tokens))
    return rid


def drain() -> None:
    while engine.has_unfinished_requests():
        engine.step()


# Each setup leaves the engine so that its next step is one step of the named kind.
def setup_prefill() -> None:
    for _ in range(8):
        add(tokens(512), 1)


def setup_mixed() -> None:
    for _ in range(8):
        add(tokens(8), 1000)
    engine.step()  # their prefill
    engine.step()  # one decode, so the graphs' first use is behind us
    add(tokens(512), 1)


conversation: list[int] = []


def setup_turn() -> None:
    global conversation
    conversation = tokens(1024)
    add(conversation, 1)
    drain()
    conversation = conversation + tokens(64)
    add(conversation, 1)


def setup_decode() -> None:
    for _ in range(8):
        add(tokens(8), 1000)
    engine.step()
    engine.step()


SETUPS = {"prefill": setup_prefill, "mixed": setup_mixed, "turn": setup_turn, "decode": setup_decode}


def drain_aborted() -> None:
    """Ends what a setup left running."""
    engine.abort_all()
    drain()


def first_repo_frame(stack) -> str:
    for frame in reversed(stack):
        path = frame.filename
        if "kda_serving" in path and "engine_syncs" not in path:
            return f"{path.split('kda_serving', 1)[1].lstrip('/')}:{frame.lineno} {frame.line}"
    return "(outside kda_serving)"


sites: collections.Counter = collections.Counter()


def record(message, category, filename, lineno, file=None, line=None):
    if "called a synchronizing" in str(message):  # not the "prototype feature" notice set_sync_debug_mode gives
        sites[first_repo_frame(traceback.extract_stack()[:-1])] += 1


report = {"root": args.root, "steps": {}}
for kind, setup in SETUPS.items():
    # counted once
    setup()
    sites.clear()
    warnings.simplefilter("always")
    old_show, warnings.showwarning = warnings.showwarning, record
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    engine.step()
    torch.cuda.set_sync_debug_mode(0)
    warnings.showwarning = old_show
    drain_aborted()
    counted = dict(sites)
    # timed
    times = []
    for _ in range(args.rounds):
        setup()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        times.append(1e3 * (time.perf_counter() - t0))
        drain_aborted()
    times.sort()
    report["steps"][kind] = {"syncs": sum(counted.values()), "sites": counted,
                             "step_ms_p50": times[len(times) // 2], "step_ms_min": times[0]}
    print(f"{kind}: {sum(counted.values())} syncs, step p50 {times[len(times) // 2]:.3f} ms "
          f"(min {times[0]:.3f}) over {len(times)}")
    for site, count in sorted(counted.items(), key=lambda kv: -kv[1]):
        print(f"    {count:3d}  {site}")
if args.out:
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
