"""The whole Kimi-Linear-48B-A3B on one GPU: its 27 layers at the published shapes (random weights made in
place on the GPU, bench_engine.random_kimi48b_model's draws), served by the engine with its default settings
as `kda-serve --device cuda [--quantization fp8]` would run it:

- whether it fits: the weights, and the state slots, KV blocks and length limit the engine sizes from what is
  left (EngineConfig.gpu_memory_utilization);
- decode: N requests of 8 prompt tokens generating G tokens each, the median decode step and generated tokens
  per second, beside the step's floor (bench_decode_step.decode_floor_bytes: weights, the routed experts the
  step's tokens chose, KDA states read and written, MLA latents read, at the card's copy rate);
- the first token of one P-token prompt into an idle engine (chunked by max_num_batched_tokens).

With bf16 weights (98 GB) the model needs an H200; with --quantization fp8 (51 GB) an 80 GB H100 holds it.
--torch-routing runs the MoE routing as torch ops (the router compiled, the pairs' sort by argsort) instead of
ops.moe_route / ops.moe_sort_pairs' kernels: the baseline those are measured against. --unfused-shared runs
the shared expert beside the MoE GEMV kernels (cuBLAS, torch) instead of inside them (MoE.fuse_shared_experts).
--cublas-projections runs every projection on cuBLAS, as before ops.linear took our matrix-vector kernel for
steps of a few tokens (ops.gemv.LINEAR_MAX_BYTES emptied).

    python benchmarks/bench_kimi48b.py [--quantization fp8] [--batch 1,8,64] [--output-len 64] [--prompt-len 8192]
        [--torch-routing] [--unfused-shared] [--cublas-projections]

Writes benchmarks/results/<card>-kimi48b[-fp8][-torch-routing][-unfused-shared][-cublas-projections].json.
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

from bench_decode_step import decode_floor_bytes, routed_expert_fraction, run  # noqa: E402
from bench_engine import KIMI48B, REFERENCE_CONFIG, prompts  # noqa: E402
from common import RESULTS, card_name, copy_rate_bytes_per_s, environment, write_json  # noqa: E402

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from kda_serving.model import KimiLinearModel, ModelConfig  # noqa: E402
from kda_serving.model.random_init import fill_random_  # noqa: E402

# The published config's 27 layers: KDA everywhere but every fourth layer and the last (MLA)
FULL_ATTN_LAYERS = [4, 8, 12, 16, 20, 24, 27]
KIMI48B_FULL = {**KIMI48B, "num_hidden_layers": 27, "linear_attn_config": {
    **KIMI48B["linear_attn_config"], "full_attn_layers": FULL_ATTN_LAYERS,
    "kda_layers": [i for i in range(1, 28) if i not in FULL_ATTN_LAYERS]}}


def full_model(quantization: str | None) -> KimiLinearModel:
    if os.path.exists(REFERENCE_CONFIG):  # stay faithful to the published file where it is at hand
        import json

        with open(REFERENCE_CONFIG) as f:
            published = json.load(f)
        assert published["linear_attn_config"] == KIMI48B_FULL["linear_attn_config"]
        assert published["num_hidden_layers"] == 27
    cfg = ModelConfig.from_dict(KIMI48B_FULL)
    model = KimiLinearModel(cfg, dtype=torch.bfloat16, device="cuda", quantization=quantization)
    return fill_random_(model, seed=0, weight_std=0.02).eval()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quantization", default=None, choices=["fp8"])
    ap.add_argument("--batch", default="1,8,64")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=8192)
    ap.add_argument("--torch-routing", action="store_true", help="the MoE routing in torch ops (the baseline)")
    ap.add_argument("--unfused-shared", action="store_true",
                    help="the shared expert beside the MoE GEMV kernels, not in them (the baseline)")
    ap.add_argument("--cublas-projections", action="store_true",
                    help="every projection on cuBLAS, none on ops.gemv's kernel (the baseline)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.cublas_projections:
        import importlib

        importlib.import_module("kda_serving.ops.gemv").LINEAR_MAX_BYTES = {}  # the module: ops.gemv is its function
    if args.torch_routing:
        from kda_serving.model import moe as moe_module
        from kda_serving.ops.moe_routing import sort_pairs_reference

        moe_module.route_kernel_takes = lambda *a: False
        moe_module.moe_sort_pairs = sort_pairs_reference
    if args.unfused_shared:
        from kda_serving.model.moe import MoE

        MoE.fuse_shared_experts = False
    rate = copy_rate_bytes_per_s()
    total = torch.cuda.get_device_properties(0).total_memory
    t0 = time.perf_counter()
    model = full_model(args.quantization)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    setup = {"card_memory_bytes": total, "weight_bytes": weights, "model_build_s": time.perf_counter() - t0}
    print(f"{torch.cuda.get_device_name()} ({total / 2**30:.1f} GiB), copy rate {rate / 1e12:.2f} TB/s: "
          f"Kimi-Linear-48B, 27 layers, experts {args.quantization or 'bf16'}: weights {weights / 1e9:.1f} GB "
          f"({weights / 2**30:.1f} GiB)", flush=True)
    vocab = model.config.vocab_size
    batches = [int(b) for b in args.batch.split(",")]
    touched = {n: routed_expert_fraction(model, vocab, n) for n in batches}  # before the engine: its own engines

    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(device="cuda", quantization=args.quantization), model=model)
    cfg = engine.config
    setup.update({"engine_start_s": time.perf_counter() - t0, "num_state_slots": cfg.num_state_slots,
                  "num_kv_blocks": cfg.num_kv_blocks, "block_size": cfg.block_size,
                  "max_model_len": cfg.max_model_len, "max_num_seqs": cfg.max_num_seqs,
                  "gpu_memory_utilization": cfg.gpu_memory_utilization,
                  "reserved_bytes_after_start": torch.cuda.memory_reserved()})
    print(f"engine started in {setup['engine_start_s']:.1f} s with the defaults: {cfg.num_state_slots} state slots, "
          f"{cfg.num_kv_blocks} KV blocks of {cfg.block_size} ({cfg.num_kv_blocks * cfg.block_size} tokens), "
          f"max_model_len {cfg.max_model_len}, {setup['reserved_bytes_after_start'] / 2**30:.1f} GiB reserved",
          flush=True)
    run(engine, vocab, 1, 4, False, seed=999)  # warm-up

    decode = []
    for n in batches:
        report = run(engine, vocab, n, args.output_len, False, seed=n)
        floor_ms = 1e3 * decode_floor_bytes(model, engine, n, 8 + args.output_len // 2, touched[n]) / rate
        decode.append({"batch": n, "floor_ms": floor_ms, "routed_experts_touched": touched[n], **report})
        print(f"decode N={n:3d}: step p50 {report['decode_step_ms_p50']:.2f} ms (floor {floor_ms:.2f}), "
              f"{report['generated_tokens_per_s']:.0f} generated tokens/s", flush=True)

    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    times = []
    for r in range(3):
        engine.add_request(f"p{r}", prompts(1, args.prompt_len, vocab, seed=100 + r)[0], one)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        times.append(1e3 * (time.perf_counter() - t0))
    ttft = {"prompt_tokens": args.prompt_len, "ttft_ms": statistics.median(times[1:]), "first_ms": times[0]}
    print(f"first token of a {args.prompt_len}-token prompt: {ttft['ttft_ms']:.1f} ms "
          f"({args.prompt_len / ttft['ttft_ms'] * 1e3:.0f} prompt tokens/s; first try {times[0]:.1f} ms)", flush=True)

    suffix = ((f"-{args.quantization}" if args.quantization else "") + ("-torch-routing" if args.torch_routing else "")
              + ("-unfused-shared" if args.unfused_shared else "")
              + ("-cublas-projections" if args.cublas_projections else ""))
    out = Path(args.out) if args.out else RESULTS / f"{card_name()}-kimi48b{suffix}.json"
    write_json(out, {"benchmark": "kimi48b", "environment": environment(), "copy_rate_bytes_per_s": rate,
                     "shape": "kimi48b-27layer", "quantization": args.quantization,
                     "moe_routing": "torch" if args.torch_routing else "kernels",
                     "shared_expert": "beside" if args.unfused_shared else "in the MoE GEMV kernels",
                     "projections": "cuBLAS" if args.cublas_projections else "ops.linear",
                     "args": vars(args),
                     "setup": setup, "decode": decode, "ttft": ttft})


if __name__ == "__main__":
    main()
