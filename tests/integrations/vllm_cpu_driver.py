"""Runs vLLM (CPU) greedy generation on a checkpoint and prints one JSON line with the results.

Usage: python vllm_cpu_driver.py MODEL_DIR REQUESTS_JSON
REQUESTS_JSON: {"prefix_caching": bool, "max_new_tokens": int, "rounds": [[prompt, ...], ...],
"engine_args": {...} (optional extra LLM arguments)}; each round is
one `generate` call (a batch), run in order on the same engine, so a later round can hit the prefix cache of
an earlier one. Prints {"rounds": [[{"tokens": [...], "num_cached_tokens": int}, ...], ...]}.
A separate process because vLLM's engine is heavy and its environment switches must be set before import.
"""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model, spec = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(
        model=model, skip_tokenizer_init=True, enforce_eager=True, dtype="float32", max_model_len=2048,
        max_num_seqs=8, enable_prefix_caching=spec["prefix_caching"], gpu_memory_utilization=0.15,
        kv_cache_memory_bytes=256 << 20, seed=0, **spec.get("engine_args", {}),
    )
    params = SamplingParams(max_tokens=spec["max_new_tokens"], temperature=0.0, detokenize=False)
    rounds = []
    for prompts in spec["rounds"]:
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        rounds.append([
            {"tokens": list(o.outputs[0].token_ids), "num_cached_tokens": int(o.num_cached_tokens or 0)}
            for o in outputs
        ])
    print("RESULT " + json.dumps({"rounds": rounds}), flush=True)


if __name__ == "__main__":
    main()
