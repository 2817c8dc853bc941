"""The host's work for one long prompt, without the model (experiment, not part of CI).

A prompt of L tokens is prefilled in chunks of max_num_batched_tokens and saves a prefix-cache checkpoint
at every interval boundary it has a state slot for: up to L / 256 of them. This runs the embedded default
model's engine on the CPU with its forward replaced by zeros (only the scheduling, batch building and cache
work are timed) and prints the host time of the whole prompt. Before session 17 each checkpoint hashed and
walked the tree from the root, so the time grew with L^2.

    python benchmarks/experiments/long_prompt_host_cost.py [--lengths 32768,131072,524288] [--slots 4096]
"""

from __future__ import annotations

import argparse
import time

import torch

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams
from kda_serving.model import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="32768,131072,524288")
    ap.add_argument("--slots", type=int, default=4096)
    args = ap.parse_args()
    for length in (int(x) for x in args.lengths.split(",")):
        model = load_model(None, device="cpu", progress=False)
        max_len = length + 1024
        object.__setattr__(model.config, "max_model_len", max_len)  # the host's work does not read the weights
        engine = LLMEngine(EngineConfig(device="cpu", max_num_seqs=4, max_num_batched_tokens=8192,
                                        num_state_slots=args.slots, num_kv_blocks=max_len // 16 + 64,
                                        max_model_len=max_len), model=model)
        vocab = model.config.vocab_size
        engine.runner.execute = lambda out, batch, pending=None: torch.zeros(len(out.chunks), vocab)
        ids = torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(0)).tolist()
        t0 = time.perf_counter()
        engine.add_request("long", ids, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        print(f"prompt of {length:7d} tokens: {steps:3d} steps, host {1e3 * (time.perf_counter() - t0):8.0f} ms, "
              f"cache entries {engine.scheduler.cache.num_entries}", flush=True)


if __name__ == "__main__":
    main()
