"""FP8 experts (EngineConfig.quantization="fp8", model/fp8.py) against bf16 experts, the same weights, in the
same run, on 4 layers of Kimi-Linear-48B shapes (random bf16 weights, bench_engine.py; the fp8 model is a copy
with its routed experts quantized):

1. one MoE layer (routing, the two grouped GEMMs with the rows' quantization, the shared expert, the expert
   sum; compiled pieces as the engine runs them) at 1 to 8,192 tokens, GPU time (common.gpu_ms), beside the
   floor of reading the routed experts it touches once;
2. the engine's decode step as served (CUDA graphs, asynchronous scheduling, compiled pieces), N requests of 8
   prompt tokens generating G tokens: median decode step and generated tokens per second, beside the step's
   floor (bench_decode_step.decode_floor_bytes at each model's own weight bytes);
3. a prompt of P tokens into an idle engine: time to its first token;
4. memory: the model's weights, and Kimi-Linear-48B's (27 layers) at the published shapes; the two models'
   logits on the same prompt (relative difference; random weights say nothing of quality:
   tests/engine/test_engine_bf16.py holds the fp8 engine to fp32 transformers on a trained-like model).

    python benchmarks/bench_fp8_experts.py [--tokens 1,8,64,256,1024,8192] [--batch 1,8,64]

Writes benchmarks/results/<card>-fp8_experts.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py

from bench_decode_step import decode_floor_bytes, routed_expert_fraction, run  # noqa: E402
from bench_engine import prompts, random_kimi48b_model  # noqa: E402
from common import RESULTS, card_name, copy_rate_bytes_per_s, environment, gpu_ms, write_json  # noqa: E402

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from kda_serving.model.moe import MoE  # noqa: E402


def moe_layer_rows(models: dict, tokens: list[int], rate: float) -> list[dict]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for T in tokens:
        x = torch.randn(T, models["bf16"].config.hidden_size, device="cuda", generator=gen).to(torch.bfloat16)
        row = {"tokens": T}
        for name, model in models.items():
            moe = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE))
            with torch.inference_mode():
                touched = moe.route(x)[0].unique().numel()
                row[f"{name}_ms"] = gpu_ms(lambda: moe(x))
            experts = sum(p.numel() * p.element_size() for n, p in moe.named_parameters()
                          if n.startswith(("gate_up_proj", "down_proj")))
            row[f"{name}_floor_ms"] = 1e3 * experts * touched / moe.num_experts / rate
        row["experts_touched"] = touched
        row["speedup"] = row["bf16_ms"] / row["fp8_ms"]
        print(f"MoE layer, {T:5d} tokens ({touched:3d} experts): bf16 {row['bf16_ms']:.3f} ms (floor "
              f"{row['bf16_floor_ms']:.3f}), fp8 {row['fp8_ms']:.3f} ms (floor {row['fp8_floor_ms']:.3f}): "
              f"{row['speedup']:.2f}x", flush=True)
        rows.append(row)
    return rows


def engine(model, max_batch: int) -> LLMEngine:
    """An engine as served by default (CUDA graphs, asynchronous scheduling, compiled pieces) with room for
    max_batch requests and an 8,192-token prompt step."""
    return LLMEngine(EngineConfig(device="cuda", max_num_seqs=max_batch + 2, max_num_batched_tokens=8192,
                                  num_state_slots=2 * max_batch + 8, num_kv_blocks=max_batch * 16 + 1024),
                     model=model)


def logits_difference(engines: dict) -> float:
    """Relative difference of the two models' logits for a fresh 64-token prompt (one eager step, run on each
    engine before any request: it writes state slot 0 and the first KV blocks directly)."""
    from types import SimpleNamespace

    from bench_prompt_step import make_step

    nothing = SimpleNamespace(state_restores=[], block_copies=[], state_saves=[])
    logits = {}
    for name, eng in engines.items():
        batch = make_step([(0, 64)], eng.runner.model.config.vocab_size, torch.Generator().manual_seed(3))
        logits[name] = eng.runner.execute(nothing, batch).double()
    a, b = logits["bf16"], logits["fp8"]
    return ((a - b).norm() / a.norm()).item()


def decode_rows(engines: dict, touched: dict, batches: list[int], output_len: int, rounds: int,
                rate: float) -> list[dict]:
    rows = []
    for n in batches:
        row = {"batch": n}
        for name, eng in engines.items():
            model = eng.runner.model
            vocab = model.config.vocab_size
            best = None
            for r in range(rounds):
                report = run(eng, vocab, n, output_len, False, seed=10 * r + n)
                if best is None or report["seconds"] < best["seconds"]:
                    best = report
            share = touched[name, n]
            floor_ms = 1e3 * decode_floor_bytes(model, eng, n, 8 + output_len // 2, share) / rate
            row.update({f"{name}_decode_step_ms_p50": best["decode_step_ms_p50"],
                        f"{name}_generated_tokens_per_s": best["generated_tokens_per_s"],
                        f"{name}_floor_ms": floor_ms, f"{name}_routed_experts_touched": share})
        row["speedup"] = row["fp8_generated_tokens_per_s"] / row["bf16_generated_tokens_per_s"]
        print(f"decode N={n:3d}: step p50 bf16 {row['bf16_decode_step_ms_p50']:.3f} ms (floor "
              f"{row['bf16_floor_ms']:.3f}), fp8 {row['fp8_decode_step_ms_p50']:.3f} ms (floor "
              f"{row['fp8_floor_ms']:.3f}); tokens/s {row['bf16_generated_tokens_per_s']:.0f} -> "
              f"{row['fp8_generated_tokens_per_s']:.0f} ({row['speedup']:.2f}x)", flush=True)
        rows.append(row)
    return rows


def ttft_row(engines: dict, prompt_len: int, rounds: int) -> dict:
    row = {"prompt_tokens": prompt_len}
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for name, eng in engines.items():
        vocab = eng.runner.model.config.vocab_size
        times = []
        for r in range(rounds + 1):
            eng.add_request(f"p{r}", prompts(1, prompt_len, vocab, seed=100 + r)[0], one)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            while eng.has_unfinished_requests():
                eng.step()
            times.append(1e3 * (time.perf_counter() - t0))
        row[f"{name}_ttft_ms"] = statistics.median(times[1:])  # the first warms the shapes up
    print(f"first token of a {prompt_len}-token prompt: bf16 {row['bf16_ttft_ms']:.1f} ms, fp8 "
          f"{row['fp8_ttft_ms']:.1f} ms", flush=True)
    return row


def kimi48b_weight_bytes(quantization: str | None) -> int:
    """Kimi-Linear-48B's weight bytes at the published shapes (27 layers), bf16 or with fp8 experts."""
    from bench_kimi48b import KIMI48B_FULL

    from kda_serving.model import ModelConfig, weight_bytes

    return weight_bytes(ModelConfig.from_dict(KIMI48B_FULL), torch.bfloat16, quantization)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,8,64,256,1024,8192")
    ap.add_argument("--batch", default="1,8,64")
    ap.add_argument("--output-len", type=int, default=96)
    ap.add_argument("--prompt-len", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rate = copy_rate_bytes_per_s()
    bf16 = random_kimi48b_model(torch.device("cuda"))
    fp8 = copy.deepcopy(bf16).quantize_experts_()
    models = {"bf16": bf16, "fp8": fp8}
    batches = [int(b) for b in args.batch.split(",")]
    # counted first: its engines turn the model's compiled pieces off, which compile_plain_ops undoes
    touched = {(name, n): routed_expert_fraction(m, m.config.vocab_size, n) for name, m in models.items()
               for n in batches}
    for model in models.values():
        model.compile_plain_ops(True)
    memory = {f"{name}_weight_bytes": sum(p.numel() * p.element_size() for p in m.parameters())
              for name, m in models.items()}
    print(f"{torch.cuda.get_device_name()}: copy rate {rate / 1e12:.2f} TB/s; 4-layer weights "
          + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in memory.items()), flush=True)

    memory["kimi48b_bf16_weight_bytes"] = kimi48b_weight_bytes(None)
    memory["kimi48b_fp8_weight_bytes"] = kimi48b_weight_bytes("fp8")
    print(f"Kimi-Linear-48B weights: bf16 {memory['kimi48b_bf16_weight_bytes'] / 1e9:.1f} GB, fp8 experts "
          f"{memory['kimi48b_fp8_weight_bytes'] / 1e9:.1f} GB", flush=True)
    engines = {name: engine(model, max(batches)) for name, model in models.items()}
    memory["logits_rel_diff_64_token_prompt"] = logits_difference(engines)
    print(f"logits, fp8 vs bf16 experts, one 64-token prompt: relative difference "
          f"{memory['logits_rel_diff_64_token_prompt']:.3e}", flush=True)
    for name, eng in engines.items():
        run(eng, bf16.config.vocab_size, 1, 4, False, seed=999)  # warm-up

    results = {"moe_layer": moe_layer_rows(models, [int(t) for t in args.tokens.split(",")], rate),
               "decode": decode_rows(engines, touched, batches, args.output_len, args.rounds, rate),
               "ttft": ttft_row(engines, args.prompt_len, args.rounds)}
    out = Path(args.out) if args.out else RESULTS / f"{card_name()}-fp8_experts.json"
    write_json(out, {"benchmark": "fp8_experts", "environment": environment(), "copy_rate_bytes_per_s": rate,
                     "shape": "kimi48b-4layer", "args": vars(args), "memory": memory, "results": results})


if __name__ == "__main__":
    main()
