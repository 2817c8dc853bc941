#!/usr/bin/env bash
# Launch SGLang on a Kimi-Linear checkpoint with kda-serving as its KDA prefill and decode kernel.
#   pip install "kda-serving[sglang]"      (sglang 0.5.23, CUDA)
# SGLang loads our `sglang.srt.plugins` entry point in each process; its log then shows
#   kda-serving: SGLang KDA extend/decode kernel is now kda-serving
# Restrict plugins with SGLANG_PLUGINS=kda_serving; KDA_SERVING_SGLANG=0 keeps SGLang's kernels.
# Speculative verify and radix-cache state snapshots stay on SGLang's Triton kernels (docs/integrations.md).
set -euo pipefail
MODEL="${1:-moonshotai/Kimi-Linear-48B-A3B-Instruct}"
shift || true
exec python -m sglang.launch_server --model-path "$MODEL" --trust-remote-code "$@"
