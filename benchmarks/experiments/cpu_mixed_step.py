"""Experiment (not CI): on the CPU with the embedded default model, the step in which a new prompt's chunk
joins running decodes (16 requests decoding at ~900 tokens of context, then a 1,536-token prompt arriving;
512-token step budget, so its chunks ride along with the 16 decodes). Prints the median duration of those
mixed steps and of plain decode steps, with the grouping of unlike sequence lengths on (the default) or off
(GROUP_PADDING = inf in ops/chunked.py and model/mla_block.py: every sequence padded to the step's longest,
as before session 15).

    python benchmarks/experiments/cpu_mixed_step.py [on|off]
"""

import random
import statistics
import sys
import time

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams
from kda_serving.model import load_model, mla_block
from kda_serving.ops import chunked


def main(mode: str) -> None:
    if mode == "off":
        chunked.GROUP_PADDING = mla_block.GROUP_PADDING = float("inf")
    model = load_model(None, device="cpu", progress=False)
    engine = LLMEngine(EngineConfig(device="cpu", cpu_cache_bytes=256 << 20, max_num_batched_tokens=512,
                                    max_num_seqs=32, enable_prefix_caching=False), model=model)
    rng = random.Random(0)

    def ids(n):
        return [rng.randrange(3, 2000) for _ in range(n)]

    for i in range(16):
        engine.add_request(f"d{i}", ids(900), SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
    for _ in range(60):  # their prompts, then some decoding
        engine.step()
    mixed, plain = [], []
    for r in range(3):
        engine.add_request(f"p{r}", ids(1536), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        for _ in range(4):
            t = time.perf_counter()
            engine.step()
            mixed.append((time.perf_counter() - t) * 1e3)
        for _ in range(3):
            engine.step()
    for _ in range(10):
        t = time.perf_counter()
        engine.step()
        plain.append((time.perf_counter() - t) * 1e3)
    print(f"grouping {mode}: a 496-512-token chunk among 16 decodes {statistics.median(mixed):.1f} ms median "
          f"(max {max(mixed):.1f}); a decode-only step {statistics.median(plain):.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "on")
