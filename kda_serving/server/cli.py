"""`kda-serve`: the OpenAI-compatible server on the command line (also `python -m kda_serving.server`).

    kda-serve                                  # the embedded default model on 127.0.0.1:8000, CPU
    kda-serve --model /ckpt/kimi-linear --device cuda --api-key "$KEY" --host 0.0.0.0
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "KDA_SERVE_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kda-serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    http = p.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="address to bind; loopback unless you mean to expose it")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--api-key", default=None,
                      help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV} if set, else none)")
    http.add_argument("--max-request-bytes", type=int, default=4 << 20, help="larger request bodies get a 413")
    add_request_arguments(http)
    http.add_argument("--max-stored-response-bytes", type=int, default=64 << 20,
                      help="JSON text of /v1/responses answers kept for previous_response_id (LRU; 0: none)")
    http.add_argument("--max-concurrent-requests", type=int, default=0,
                      help="generation requests in flight at once; past it a 429 with Retry-After (0: no limit)")
    http.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])

    add_engine_arguments(p)
    return p


def add_request_arguments(group) -> None:
    """How requests are read and bounded (ServerConfig's fields), shared with kda-serve-batch."""
    group.add_argument("--max-prompt-tokens", type=int, default=None,
                       help="longer prompts get a 400 (default: max-model-len minus one)")
    group.add_argument("--max-n", type=int, default=16, help="most choices per request")
    group.add_argument("--tool-call-parser", default="auto",
                       help="how tool_choice 'auto' replies are read: auto (the format the tokenizer has markers "
                            "for), none, or kimi_k2")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's flags (EngineConfig's fields, and --cpu-threads), shared with kda-serve-batch."""
    eng = parser.add_argument_group("engine")
    eng.add_argument("--model", default=None, help="checkpoint directory (default: the embedded default model)")
    eng.add_argument("--served-model-name", default=None, help="the `model` name clients use")
    eng.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    eng.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                     help="default: float32 on CPU, bfloat16 on CUDA")
    eng.add_argument("--max-num-seqs", type=int, default=None, help="sequences per engine step")
    eng.add_argument("--max-num-batched-tokens", type=int, default=None, help="new tokens per engine step")
    eng.add_argument("--max-model-len", type=int, default=None, help="prompt + completion limit")
    eng.add_argument("--num-state-slots", type=int, default=None, help="KDA state slots (default: from memory)")
    eng.add_argument("--num-kv-blocks", type=int, default=None, help="MLA KV blocks (default: from memory)")
    eng.add_argument("--block-size", type=int, default=None, help="tokens per MLA KV block")
    eng.add_argument("--gpu-memory-utilization", type=float, default=None)
    eng.add_argument("--cpu-cache-bytes", type=int, default=None, help="cache budget on CPU")
    eng.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None,
                     help="recompute every prompt from scratch")
    eng.add_argument("--kda-state-dtype", default=None, choices=["float32", "bfloat16"],
                     help="KDA recurrent states (default float32); bfloat16 halves their memory and decode traffic")
    eng.add_argument("--quantization", default=None, choices=["fp8"],
                     help="fp8: the routed experts' weights in e4m3 (quantized while loading), their GEMMs in fp8: "
                          "half their memory and decode traffic (default: every weight in --dtype)")
    eng.add_argument("--fp8-fast-accumulation", action="store_true", default=None,
                     help="with --quantization fp8: the experts' GEMMs in Hopper's fast accumulation mode (up to "
                          "1.3x faster MoE layers on long prompt chunks, 3x their rounding error)")
    eng.add_argument("--no-cuda-graphs", dest="enable_cuda_graphs", action="store_false", default=None,
                     help="run every step eagerly instead of replaying captured CUDA graphs")
    eng.add_argument("--prompt-graph-tokens", type=int, default=None,
                     help="steps with prompt tokens of up to this many tokens replay piecewise CUDA graphs, the "
                          "attention and KDA recurrence eager between them (default 512; 0: every such step eager)")
    eng.add_argument("--prefix-cache-interval", type=int, default=None,
                     help="prompt tokens between cached states (multiple of 64 and of the block size)")
    eng.add_argument("--seed", type=int, default=None, help="engine seed for unseeded sampling")
    eng.add_argument("--scheduling-policy", default=None, choices=["fcfs", "priority"],
                     help="fcfs (default), or priority: requests' `priority` field orders the queue (lower first) "
                          "and may preempt running requests of a lower priority")
    eng.add_argument("--num-speculative-tokens", type=int, default=None,
                     help="speculative decoding: up to this many draft tokens verified per decode step, drafted by "
                          "prompt lookup from the request's own context (default 0: off)")
    eng.add_argument("--prompt-lookup-min", type=int, default=None,
                     help="shortest suffix of the context that prompt lookup matches (default 2)")
    eng.add_argument("--prompt-lookup-max", type=int, default=None,
                     help="longest suffix of the context that prompt lookup matches (default 4)")
    eng.add_argument("--async-scheduling", dest="async_scheduling", action=argparse.BooleanOptionalAction,
                     default=None,
                     help="queue each step before reading the previous one's tokens back, overlapping host work with "
                          "the GPU (default: on for CUDA without speculative decoding)")
    eng.add_argument("--torch-compile", dest="torch_compile", action=argparse.BooleanOptionalAction, default=None,
                     help="compile the model's norms, residual adds and MoE router with torch.compile (default: on "
                          "for CUDA)")
    eng.add_argument("--cpu-threads", type=int, default=None,
                     help="torch intra-op threads (default: torch's choice); 1 is fastest for the small "
                          "default model on a busy machine, where extra threads only spin")


def engine_config_from(args: argparse.Namespace):
    """The EngineConfig the engine flags ask for; TypeError or ValueError (before anything loads) if they are
    wrong, an unreadable --model included."""
    from kda_serving.engine import EngineConfig
    from kda_serving.model.config import ModelConfig

    if args.model is not None:  # a wrong directory or an unsupported config.json: refused before any load
        ModelConfig.from_file(args.model)
    return EngineConfig(**{k: getattr(args, k) for k in ENGINE_FLAGS if getattr(args, k) is not None})


def apply_cpu_threads(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.cpu_threads is not None:
        if args.cpu_threads < 1:
            parser.error(f"--cpu-threads must be at least 1, got {args.cpu_threads}")
        import torch

        torch.set_num_threads(args.cpu_threads)


ENGINE_FLAGS = ("model", "served_model_name", "device", "dtype", "max_num_seqs", "max_num_batched_tokens",
                "max_model_len", "num_state_slots", "num_kv_blocks", "block_size", "gpu_memory_utilization",
                "cpu_cache_bytes", "enable_prefix_caching", "enable_cuda_graphs", "prompt_graph_tokens",
                "kda_state_dtype", "quantization", "fp8_fast_accumulation", "prefix_cache_interval", "seed",
                "scheduling_policy", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
                "async_scheduling", "torch_compile")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Imported here so that --help and argument errors answer without loading torch.
    import uvicorn

    from kda_serving.engine import AsyncLLMEngine
    from kda_serving.server.app import create_app
    from kda_serving.server.config import ServerConfig

    try:
        engine_config = engine_config_from(args)
        server_config = ServerConfig(api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                                     max_request_bytes=args.max_request_bytes,
                                     max_prompt_tokens=args.max_prompt_tokens, max_n=args.max_n,
                                     max_stored_response_bytes=args.max_stored_response_bytes,
                                     max_concurrent_requests=args.max_concurrent_requests,
                                     tool_call_parser=args.tool_call_parser)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    if args.host not in LOOPBACK_HOSTS and server_config.api_key is None:
        logging.getLogger("kda_serving.server").warning(
            "listening on %s without --api-key: anyone who can reach this port can use the model", args.host)
    apply_cpu_threads(args, parser)
    app = create_app(AsyncLLMEngine(engine_config), server_config)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    sys.exit(main())
