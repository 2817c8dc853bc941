"""Offline engine benchmark: prompt and generated tokens per second, per-step latency, multi-turn reuse.

    python benchmarks/bench_engine.py                       # CPU, the embedded tiny model
    python benchmarks/bench_engine.py --device cuda         # GPU, 4 layers of Kimi-Linear-48B shapes
    python benchmarks/bench_engine.py --model DIR --device cuda

Shapes:
  tiny-default    the embedded default checkpoint (kda_serving.model.default_model_path()).
  kimi48b-4layer  Kimi-Linear-48B-A3B layer shapes (../shared/reference/kimi-linear-48b-a3b.config.json):
                  hidden 2304, 3 KDA layers (32 heads x 128) + 1 MLA layer, layer 1 dense MLP, layers 2-4 MoE
                  with 256 experts (top 8, 1 shared), vocab 163840; random bf16 weights made in place on the GPU.

Scenarios (each on a fresh engine, after a warm-up request; --repeats runs, the fastest kept, because the
CPU machine is shared):
  prefill   N requests of P prompt tokens, 1 output token: prompt tokens/s.
  decode    N requests of 8 prompt tokens, G output tokens: generated tokens/s and decode-step latency.
  mixed     N requests of P prompt tokens and G output tokens submitted together: both rates, TTFT.
  multiturn one conversation of K turns (each adds U user tokens and --turn-output-len generated ones):
            time to first token per turn with the prefix cache on and off; and C conversations
            interleaved on one engine: the share of prompt tokens the cache served.
Writes one JSON (default benchmarks/results/<device>-engine.json) naming the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from kda_serving.model import mla_block, mla_prefill  # noqa: E402

REFERENCE_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "reference", "kimi-linear-48b-a3b.config.json"
)
KIMI48B = {  # the published config fields (see REFERENCE_CONFIG), cut to 4 layers
    "model_type": "kimi_linear", "vocab_size": 163840, "hidden_size": 2304, "head_dim": 72,
    "intermediate_size": 9216, "num_hidden_layers": 4, "num_attention_heads": 32, "num_key_value_heads": 32,
    "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
    "tie_word_embeddings": False, "model_max_length": 1048576, "eos_token_id": 163586, "first_k_dense_replace": 1,
    "moe_intermediate_size": 1024, "moe_layer_freq": 1, "moe_renormalize": True,
    "moe_router_activation_func": "sigmoid", "num_experts": 256, "num_experts_per_token": 8,
    "num_shared_experts": 1, "routed_scaling_factor": 2.446, "use_grouped_topk": True, "num_expert_group": 1,
    "topk_group": 1, "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "mla_use_nope": True, "num_nextn_predict_layers": 0,
    "linear_attn_config": {"kda_layers": [1, 2, 3], "full_attn_layers": [4], "num_heads": 32, "head_dim": 128,
                           "short_conv_kernel_size": 4},
}


def random_kimi48b_model(device: torch.device, seed: int = 0):
    """The 4-layer 48B-shaped model with random bf16 weights, initialised in place (no checkpoint on disk)."""
    from kda_serving.model import KimiLinearModel, ModelConfig
    from kda_serving.model.random_init import fill_random_

    if os.path.exists(REFERENCE_CONFIG):  # stay faithful to the published file where it is at hand
        with open(REFERENCE_CONFIG) as f:
            published = json.load(f)
        for key, value in KIMI48B.items():
            if key not in ("num_hidden_layers", "linear_attn_config") and key in published:
                assert published[key] == value, f"KIMI48B[{key!r}] differs from the published config"
    cfg = ModelConfig.from_dict(KIMI48B)
    with torch.device(device):
        model = KimiLinearModel(cfg, dtype=torch.bfloat16, device=device)
    fill_random_(model, seed, weight_std=0.02)
    return model.eval()


def make_engine(args, model, tokenizer, **overrides) -> LLMEngine:
    cfg = dict(
        device=args.device, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, enable_prefix_caching=True, enable_cuda_graphs=not args.no_cuda_graphs,
        kda_state_dtype=args.kda_state_dtype,
    )
    if args.prompt_graph_tokens is not None:
        cfg["prompt_graph_tokens"] = args.prompt_graph_tokens
    if args.device == "cpu":
        cfg["cpu_cache_bytes"] = args.cpu_cache_mib << 20
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg), model=model, tokenizer=tokenizer)


def release_memory() -> None:
    """Frees a dropped engine's caches before the next engine sizes its own from the free GPU memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (length,), generator=gen).tolist() for _ in range(n)]


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "max": s[-1], "mean": statistics.fmean(s), "count": len(s)}


def run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> tuple[dict, list[list[int]]]:
    """Submits all requests at once and steps to completion, timing every step and each first token.
    Returns the measurements and each request's output tokens. Updates are deltas, as the server asks for."""
    start, cpu_start = time.perf_counter(), time.process_time()
    ids = [f"bench-{start}-{i}" for i in range(len(requests))]
    for request_id, (tokens, params) in zip(ids, requests):
        engine.add_request(request_id, tokens, dataclasses.replace(params, output_kind="delta"))
    ttft, ttft_cpu, steps, outputs = {}, {}, [], {i: [] for i in ids}
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = engine.step()
        t1 = time.perf_counter()
        if engine.last_step is not None:
            steps.append((t1 - t0, engine.last_step))
        for out in outs:
            if out.request_id not in ttft:
                ttft[out.request_id] = t1 - start
                ttft_cpu[out.request_id] = time.process_time() - cpu_start
            outputs[out.request_id] += out.new_token_ids
    total = time.perf_counter() - start
    prompt_tokens = sum(len(tokens) for tokens, _ in requests)
    generated = sum(len(o) for o in outputs.values())
    prefill_time = sum(dt for dt, s in steps if s.num_prefill_tokens)
    decode_steps = [(dt, s) for dt, s in steps if s.is_decode]
    decode_time = sum(dt for dt, _ in decode_steps)
    report = {
        "requests": len(requests),
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "seconds": total,
        "steps": len(steps),
        # prompt tokens over the time of the steps that carried prompt tokens
        "prompt_tokens_per_s": prompt_tokens / prefill_time if prefill_time else None,
        # tokens produced by decode-only steps over their time
        "generated_tokens_per_s": sum(s.num_tokens for _, s in decode_steps) / decode_time if decode_time else None,
        "total_tokens_per_s": (prompt_tokens + generated) / total,
        "decode_step_ms": percentiles([1e3 * dt for dt, _ in decode_steps]),
        "prefill_step_ms": percentiles([1e3 * dt for dt, s in steps if s.num_prefill_tokens]),
        "decode_batch_size": percentiles([float(s.num_seqs) for _, s in decode_steps]),
        "ttft_ms": percentiles([1e3 * t for t in ttft.values()]),
        # CPU time of this process until each first token: on a shared CPU, steadier than wall time
        "ttft_process_cpu_ms": percentiles([1e3 * t for t in ttft_cpu.values()]),
    }
    return report, [outputs[i] for i in ids]


def multiturn(args, model, tokenizer, vocab: int) -> dict:
    """Multi-turn reuse. (1) One conversation of K turns, each adding U user tokens and G generated ones:
    time to first token of every turn with the prefix cache on and off (the two engines alternate turns, so
    machine load affects both alike). (2) C conversations interleaved turn by turn on one engine: how many
    prompt tokens the cache served."""
    params = SamplingParams(temperature=0, max_tokens=args.turn_output_len, ignore_eos=True)
    warm = [(prompts(1, 16, vocab, seed=0)[0], SamplingParams(max_tokens=2))]
    # Two engines live at once here, so their caches get explicit sizes (no memory profiling): blocks for
    # every conversation's full history twice over, slots for the running requests and a few entries per turn.
    history = args.turns * (args.user_tokens + args.turn_output_len)
    sizes = dict(num_kv_blocks=2 * args.conversations * (history // args.block_size + 1) + 64,
                 num_state_slots=4 * args.conversations * args.turns + args.max_num_seqs)
    users = prompts(args.turns, args.user_tokens, vocab, seed=7)
    per_turn = [None] * args.turns
    for _ in range(args.repeats):  # fresh engines each time; each turn keeps its fastest repetition
        on = make_engine(args, model, tokenizer, enable_prefix_caching=True, **sizes)
        off = make_engine(args, model, tokenizer, enable_prefix_caching=False, **sizes)
        run(on, warm), run(off, warm)
        conv = []
        for turn in range(args.turns):
            conv = conv + users[turn]
            cached_before = on.stats().prefix_cache_hit_tokens
            report_on, outputs = run(on, [(conv, params)])
            report_off, outputs_off = run(off, [(conv, params)])
            best = per_turn[turn]
            per_turn[turn] = {
                "turn": turn + 1,
                "prompt_len": len(conv),
                "cached_tokens": on.stats().prefix_cache_hit_tokens - cached_before,
                "ttft_ms_cache_on": min(report_on["ttft_ms"]["mean"], best["ttft_ms_cache_on"] if best else 1e30),
                "ttft_ms_cache_off": min(report_off["ttft_ms"]["mean"], best["ttft_ms_cache_off"] if best else 1e30),
                "same_tokens": outputs == outputs_off and (best is None or best["same_tokens"]),
            }
            conv = conv + outputs[0]
        del on, off
        release_memory()
    engine = make_engine(args, model, tokenizer, enable_prefix_caching=True, **sizes)
    convs = [[] for _ in range(args.conversations)]
    users = prompts(args.conversations * args.turns, args.user_tokens, vocab, seed=8)
    for turn in range(args.turns):
        convs = [c + users[turn * args.conversations + i] for i, c in enumerate(convs)]
        _, outputs = run(engine, [(c, params) for c in convs])
        convs = [c + o for c, o in zip(convs, outputs)]
    stats = engine.stats()
    del engine
    release_memory()
    return {
        "one_conversation": per_turn,
        "interleaved": {
            "conversations": args.conversations,
            "turns": args.turns,
            "prompt_tokens": stats.prefix_cache_query_tokens,
            "cached_tokens": stats.prefix_cache_hit_tokens,
            "hit_rate": stats.prefix_cache_hit_rate,
            "cache_entries_at_end": stats.prefix_cache_entries,
        },
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default=None, help="a checkpoint directory (default: tiny-default on CPU, "
                    "kimi48b-4layer on CUDA)")
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--output-len", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--cpu-cache-mib", type=int, default=256)
    ap.add_argument("--conversations", type=int, default=8, help="interleaved conversations (multiturn)")
    ap.add_argument("--turns", type=int, default=None)
    ap.add_argument("--user-tokens", type=int, default=None, help="new user tokens per turn (multiturn)")
    ap.add_argument("--turn-output-len", type=int, default=None, help="generated tokens per turn (multiturn)")
    ap.add_argument("--scenarios", default="prefill,decode,mixed,multiturn")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="run every step eagerly (the baseline)")
    ap.add_argument("--prompt-graph-tokens", type=int, default=None,
                    help="EngineConfig.prompt_graph_tokens (default 512; 0: steps with prompt tokens eager)")
    ap.add_argument("--mla-prefill", default="kernels", choices=["kernels", "flash2", "torch"],
                    help="MLA attention of steps with prompt tokens: our attention and paged kernels, the same with "
                         "FlashAttention-2 in place of our attention kernel (mla_prefill.OWN_KERNEL off), or the "
                         "absorbed torch-ops form (mla_block.PREFILL_ON_KERNELS off)")
    ap.add_argument("--kda-state-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quantization", default=None, choices=["fp8"],
                    help="fp8: the routed experts in e4m3 (EngineConfig.quantization; docs/quantization.md)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per measurement; the fastest is kept")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    defaults = dict(num_requests=(64 if cuda else 16), prompt_len=(1024 if cuda else 128),
                    output_len=(128 if cuda else 32), max_num_seqs=(64 if cuda else 16),
                    max_num_batched_tokens=(8192 if cuda else 512), turns=(10 if cuda else 6),
                    user_tokens=(512 if cuda else 64), turn_output_len=(32 if cuda else 16),
                    repeats=(1 if cuda else 3))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = torch.device(args.device)
    mla_block.PREFILL_ON_KERNELS = args.mla_prefill != "torch"
    mla_prefill.OWN_KERNEL = args.mla_prefill == "kernels"

    tokenizer = None
    if args.model is None and cuda:
        shape, model = "kimi48b-4layer", random_kimi48b_model(device)
    else:
        from kda_serving.model import load_model

        shape = "tiny-default" if args.model is None else os.path.basename(os.path.normpath(args.model))
        model = load_model(args.model, device=device, progress=False, quantization=args.quantization)
    if args.quantization == "fp8":  # (the random model is drawn in bf16 first: the same weights as without it)
        model.quantize_experts_()
    vocab = model.config.vocab_size
    n, p, g = args.num_requests, args.prompt_len, args.output_len
    greedy = lambda tokens: SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)  # noqa: E731
    scenarios = {
        "prefill": lambda seed: [(ids, greedy(1)) for ids in prompts(n, p, vocab, seed=1 + seed)],
        "decode": lambda seed: [(ids, greedy(g)) for ids in prompts(n, 8, vocab, seed=2 + seed)],
        "mixed": lambda seed: [(ids, greedy(g)) for ids in prompts(n, p, vocab, seed=3 + seed)],
    }
    results, engine_config = {}, None
    for name in args.scenarios.split(","):
        if name == "multiturn":
            results[name] = multiturn(args, model, tokenizer, vocab)
            continue
        engine = make_engine(args, model, tokenizer)  # caches sized from the memory budget
        engine_config = dict(vars(engine.config))
        run(engine, [(prompts(1, 16, vocab, seed=0)[0], greedy(4))])  # warm-up
        # repetitions use fresh prompts (no prefix-cache hits); the fastest is kept
        reports = [run(engine, scenarios[name](seed=10 * r))[0] for r in range(args.repeats)]
        results[name] = min(reports, key=lambda report: report["seconds"])
        results[name]["repeats"] = args.repeats
        del engine
        release_memory()
        print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if not isinstance(v, dict)})}")
    if cuda:
        from common import RESULTS, card_name, environment

        where, out_default = environment(), RESULTS / f"{card_name()}-engine.json"
    else:
        where = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                 "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
                 "load_average_1m_at_end": os.getloadavg()[0]}  # a shared machine makes CPU timings noisy
        out_default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu-engine.json")
    report = {
        "benchmark": "engine",
        "environment": where,
        "shape": shape,
        "model_params": sum(t.numel() for t in model.parameters()),
        "args": vars(args),
        "engine_config": engine_config,
        "results": results,
    }
    out = args.out or str(out_default)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
