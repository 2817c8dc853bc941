"""Host time of the eager parts of a step replayed from prompt graphs (experiment, not part of CI), on
bench_prompt_step.py's 4-layer Kimi-Linear-48B-shaped engine and one of its steps (--step, a name from STEPS):
1. each mixer (KDA: short convolution and recurrence; MLA: attention), its ops, the logits and one replay,
   called alone (host microseconds per call), then once behind a ~20 ms sleep kernel (a call that waits for the
   GPU shows ~20,000);
2. cProfile of PromptGraphs.run, the functions with the most own time;
3. the same phases timed inside whole steps (ModelRunner.execute);
4. the MLA mix's functions timed inside it (host microseconds per call, 20 calls) and torch.profiler's
   ops with the most own CPU time in it.

    python benchmarks/experiments/mixer_host_cost.py [--step "1 prompt x 16"]
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import os
import pstats
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_engine import random_kimi48b_model  # noqa: E402
from common import host_us  # noqa: E402
from bench_prompt_step import STEPS, make_step, step_engine  # noqa: E402

from kda_serving.ops import causal_conv1d_prefill, cuda_lib, indices_checked_by_caller, kda_prefill  # noqa: E402
from kda_serving.ops.contract import validate_kda_args  # noqa: E402


def busy_host_us(fn) -> float:
    """Host time of one call queued behind a ~20 ms sleep kernel."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(40_000_000)
    t0 = time.perf_counter()
    fn()
    spent = (time.perf_counter() - t0) * 1e6
    torch.cuda.synchronize()
    return spent


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", default="1 prompt x 16")
    args = ap.parse_args()
    seqs = dict(STEPS)[args.step]
    model = random_kimi48b_model(torch.device("cuda"))
    engine = step_engine(model, [seqs])
    runner, caches = engine.runner, engine.runner.caches
    host = make_step(seqs, model.config.vocab_size, torch.Generator().manual_seed(0))
    batch = host.to("cuda")
    graphs = runner.prompt_graphs
    nothing = SimpleNamespace(state_restores=[], block_copies=[], state_saves=[])
    runner.execute(nothing, host)
    T = host.num_tokens
    captured = graphs.captured[graphs.bucket(T)]
    kda_carry = {k: v[:T] for k, v in captured.carries[0].items()}
    mla_i = next(i for i, layer in enumerate(model.layers) if not layer.is_kda)
    mla_carry = {k: v[:T] for k, v in captured.carries[mla_i].items()}
    block = model.layers[0].self_attn
    H, K = block.num_heads, block.head_dim
    qkv = causal_conv1d_prefill(kda_carry["qkv"], block.conv_weight, None, batch.cu_seqlens, caches.conv[0],
                                batch.state_slots, batch.has_initial_state, split=3)
    q, k, v = qkv.view(3, T, H, K).unbind(0)
    g, beta = kda_carry["g"], kda_carry["beta"]
    out = torch.empty_like(v)[None]
    kda_args = (q[None], k[None], v[None], g[None], beta[None], block.A_log, block.dt_bias)
    pool_args = dict(cu_seqlens=batch.cu_seqlens, state_pool=caches.recurrent[0], state_indices=batch.state_slots,
                     has_initial_state=batch.has_initial_state)
    calls = {
        "PromptGraphs.run (whole step)": lambda: graphs.run(host, batch),
        "batch.check + batch.to": lambda: (host.check(engine.config.num_state_slots, runner.num_kv_blocks, 16),
                                           host.to("cuda")),
        "KDA mix (layer 0)": lambda: model.mix(0, kda_carry, batch, caches),
        "  causal_conv1d_prefill": lambda: causal_conv1d_prefill(
            kda_carry["qkv"], block.conv_weight, None, batch.cu_seqlens, caches.conv[0], batch.state_slots,
            batch.has_initial_state, split=3),
        "  kda_prefill": lambda: kda_prefill(*kda_args, **pool_args),
        "    validate_kda_args": lambda: validate_kda_args(*kda_args, **pool_args),
        "    torch.ops kda_prefill_": lambda: torch.ops.kda_serving.kda_prefill_(
            *kda_args, K**-0.5, None, batch.cu_seqlens, None, None, caches.recurrent[0], batch.state_slots,
            batch.has_initial_state, None, None, None, out),
        "    cuda_lib.prefill": lambda: cuda_lib.prefill(
            *kda_args, K**-0.5, None, batch.cu_seqlens, None, None, caches.recurrent[0], batch.state_slots,
            batch.has_initial_state, None, None, None, out),
        f"MLA mix (layer {mla_i})": lambda: model.mix(mla_i, mla_carry, batch, caches),
        "logits": lambda: model.logits(captured.carries[-1]["h"][:T], batch),
        "one graph replay (piece 1)": lambda: captured.graphs[1].replay(),
    }
    calls["torch.tensor(list).to(cuda, non_blocking)"] = lambda: torch.tensor([1, 2, 3]).to("cuda", non_blocking=True)
    calls["pinned tensor .to(cuda, non_blocking)"] = lambda: pinned.to("cuda", non_blocking=True)
    pinned = torch.tensor([1, 2, 3]).pin_memory()
    print(f"{torch.cuda.get_device_name()}: step {args.step!r} ({T} tokens), host us per call; then the same "
          f"with the GPU busy (a ~20 ms sleep kernel queued first): a call that waits for the GPU shows it")
    with indices_checked_by_caller():
        for name, fn in calls.items():
            print(f"  {name:44s} {host_us(fn):8.1f} {busy_host_us(fn):10.1f}")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            graphs.run(host, batch)
        prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(35)
    print(text.getvalue())
    time_phases(runner, host, captured)
    with indices_checked_by_caller():
        mla_breakdown(lambda: model.mix(mla_i, mla_carry, batch, caches))


def mla_breakdown(mix) -> None:
    """Host time of the functions an MLA mix calls, each wrapped with a timer (nested ones count in their
    callers too), then torch.profiler's table of the ops with the most own CPU time."""
    from kda_serving.model import mla_block, mla_prefill
    fa_module = importlib.import_module("kda_serving.ops.flash_attention")  # (ops exports a function of its name)

    spent: dict[str, list[float]] = {}
    saved = []

    def wrap(owner, name, label):
        fn = getattr(owner, name)
        saved.append((owner, name, fn))

        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            spent.setdefault(label, []).append(1e6 * (time.perf_counter() - t0))
            return out
        setattr(owner, name, timed)

    block_cls = mla_block.MLABlock
    for name in ("_prefill", "_expanded_prefill", "_absorb", "_unabsorb"):
        wrap(block_cls, name, f"MLABlock.{name}")
    for name in ("mla_decode", "row_index", "plan_runs"):
        if hasattr(mla_block, name):
            wrap(mla_block, name, f"mla_block.{name}")
    for name in ("varlen_attention", "gather_paged_rows", "merge_attention", "plan_pieces", "plan_calls"):
        wrap(mla_prefill, name, f"mla_prefill.{name}")
    wrap(mla_prefill.ExpandedPrefill, "__call__", "ExpandedPrefill.__call__")
    wrap(mla_prefill.ExpandedPrefill, "_context_call", "ExpandedPrefill._context_call")
    wrap(mla_prefill.ExpandedPrefill, "_expand", "ExpandedPrefill._expand")
    wrap(mla_prefill, "flash_attention", "flash_attention (ops)")
    wrap(fa_module, "_flash_attention_op", "torch op flash_attention_")
    wrap(fa_module, "_validate", "flash_attention._validate")
    try:
        for _ in range(20):
            mix()
        torch.cuda.synchronize()
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)
    print("MLA mix, its functions (host us per call, calls per mix):")
    for label, values in spent.items():
        print(f"  {label:34s} {statistics.median(values):8.1f} {len(values) / 20:5.1f}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            mix()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def time_phases(runner, host, captured) -> None:
    """Host time of each phase inside whole steps (ModelRunner.execute, the device drained around each): the
    replays, the mixers and the logits, per step over 10 steps."""
    model, graphs = runner.model, runner.prompt_graphs
    nothing = SimpleNamespace(state_restores=[], block_copies=[], state_saves=[])
    spent: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            spent.setdefault(name, []).append(1e6 * (time.perf_counter() - t0))
            return out
        return wrapper

    saved = model.mix, model.logits, graphs.run, [g.replay for g in captured.graphs]
    model.mix, model.logits, graphs.run = timed("mix", model.mix), timed("logits", model.logits), timed(
        "PromptGraphs.run", graphs.run)
    for g in captured.graphs:
        g.replay = timed("replay", g.replay)
    walls = []
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.execute(nothing, host)
        walls.append(1e6 * (time.perf_counter() - t0))
        torch.cuda.synchronize()
    model.mix, model.logits, graphs.run, replays = saved
    for g, replay in zip(captured.graphs, replays):
        g.replay = replay
    print(f"phases inside whole steps: execute {statistics.median(walls):.0f} us of host (median of 10)")
    for name, values in spent.items():
        print(f"  {name:18s} {len(values) // 10:3d} calls/step, {statistics.median(values):7.1f} us median each, "
              f"{sum(values) / 10:7.1f} us/step")


if __name__ == "__main__":
    main()
