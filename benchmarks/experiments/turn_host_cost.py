"""The host's per-turn work in a long conversation, without the model (experiment, not part of CI).

A turn of a chat resends the whole history: the engine checks the prompt, looks its prefix up in the cache,
builds the step's block tables and saves the turn's states, all in Python, all growing with the history.
This runs the embedded default model's engine on the CPU with its forward replaced by zeros (so only the
host's work is timed), grows one conversation by 2,048 tokens a turn (--turn-tokens) to 62K, and prints the first step's
schedule / build_batch / update times every few turns, then a cProfile of one more turn (add_request
included).

    python benchmarks/experiments/turn_host_cost.py [--turns 30] [--turn-tokens 2048] [--max-len 65536]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams, llm_engine
from kda_serving.model import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=30)
    ap.add_argument("--turn-tokens", type=int, default=2048)
    ap.add_argument("--max-len", type=int, default=1 << 16)
    args = ap.parse_args()
    max_len = args.max_len
    model = load_model(None, device="cpu", progress=False)
    object.__setattr__(model.config, "max_model_len", max_len)  # the host's work does not depend on the weights
    engine = LLMEngine(EngineConfig(device="cpu", max_num_seqs=4, max_num_batched_tokens=4096, num_state_slots=64,
                                    num_kv_blocks=max_len // 16 + 64, max_model_len=max_len), model=model)
    times: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times.setdefault(name, []).append(1e3 * (time.perf_counter() - t0))
        return wrapper

    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine.scheduler.update = timed("update", engine.scheduler.update)
    llm_engine.build_batch = timed("build_batch", llm_engine.build_batch)
    vocab = model.config.vocab_size
    engine.runner.execute = lambda out, batch, pending=None: torch.zeros(len(out.chunks), vocab)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    conv: list[int] = []

    def turn(request_id: str) -> None:
        nonlocal conv
        conv = conv + torch.randint(3, vocab, (args.turn_tokens,), generator=gen).tolist()
        engine.add_request(request_id, conv, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                conv = conv + out.new_token_ids

    for t in range(args.turns):
        times.clear()
        t0 = time.perf_counter()
        turn(f"t{t}")
        if t % 5 == 4:
            first = {k: round(v[0], 2) for k, v in times.items()}
            print(f"history {len(conv):6d}: whole turn {1e3 * (time.perf_counter() - t0):.1f} ms; first step {first}")
    prof = cProfile.Profile()
    prof.enable()
    turn("profiled")
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(20)
    print(out.getvalue())


if __name__ == "__main__":
    main()
