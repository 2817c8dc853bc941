"""Experiment (not CI): the engine's host time per step with a model that computes nothing, against the
number of tokens generated so far. Whatever grows with the length is per-step Python work that scales badly.

    python benchmarks/experiments/engine_host_overhead.py [N sequences] [tokens each] [cumulative|delta]

Prints the median step time near the start, the middle and the end of the generation (CPU, no tokenizer).
"""
import sys
import time
import types

import torch

from kda_serving.engine.config import EngineConfig
from kda_serving.engine.llm_engine import LLMEngine
from kda_serving.engine.sampling_params import SamplingParams

VOCAB = 1000


class NoOpModel:
    """The model API the engine needs (kda_serving.model), doing no work: every step samples token 5."""

    config = types.SimpleNamespace(vocab_size=VOCAB, eos_token_ids=(2,))
    max_model_len = 1 << 20
    decode_capturable = False

    def state_slot_bytes(self, dtype):
        return 1024

    def kv_block_bytes(self, block_size):
        return 1024

    def allocate_caches(self, slots, blocks, block_size, dtype):
        return None

    def forward(self, batch, caches):
        logits = torch.zeros(batch.logits_indices.numel(), VOCAB)
        logits[:, 5] = 1.0
        return logits


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    length = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    kind = sys.argv[3] if len(sys.argv) > 3 else "cumulative"
    cfg = EngineConfig(device="cpu", max_num_seqs=n, max_num_batched_tokens=max(8192, n), num_state_slots=n + 8,
                       num_kv_blocks=n * (length // 16 + 4), enable_prefix_caching=False)
    engine = LLMEngine(cfg, model=NoOpModel())
    params = SamplingParams(max_tokens=length, ignore_eos=True, temperature=0.0, output_kind=kind)
    for i in range(n):
        engine.add_request(str(i), [7, 8, 9, 10], params)
    times = []
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    k = len(times)
    for a, b in ((1, 51), (k // 2 - 25, k // 2 + 25), (k - 51, k - 1)):
        window = sorted(times[a:b])
        print(f"{kind}: steps {a}-{b}: median {1e3 * window[len(window) // 2]:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
