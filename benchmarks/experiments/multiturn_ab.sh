#!/usr/bin/env bash
# Experiment driver (not part of CI): time to first token per turn of one growing conversation
# (bench_engine.py --scenarios multiturn) with the MLA prompt attention on our kernel, on FlashAttention-2 in its
# place, and on the torch-ops path, alternating, after one untimed warm-up run (a machine just started ran its
# first process slower: docs/engine.md, MLA attention of prompt tokens, "Open"). One JSON per run under $OUT;
# a table of the cache-on TTFT per turn at the end.
#   bash benchmarks/experiments/multiturn_ab.sh [ROUNDS]
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device_env.sh
nvidia-smi -L
args=(--device cuda --scenarios multiturn --turns 8 --user-tokens 2048 --turn-output-len 16 --conversations 2)
python3 benchmarks/bench_engine.py "${args[@]}" --out "$OUT/warmup.json" > /dev/null 2>&1
for r in $(seq 1 "${1:-2}"); do
  for m in kernels flash2 torch; do
    python3 benchmarks/bench_engine.py "${args[@]}" --mla-prefill "$m" --out "$OUT/multiturn-$m-$r.json" > /dev/null 2>&1
    python3 - "$OUT/multiturn-$m-$r.json" "$m $r" <<'PY'
import json, sys

def find(x):
    if isinstance(x, dict):
        if "one_conversation" in x:
            return x["one_conversation"]
        x = list(x.values())
    if isinstance(x, list):
        for v in x:
            found = find(v)
            if found:
                return found
    return None

turns = find(json.load(open(sys.argv[1])))
print(sys.argv[2], " ".join(f"{t['prompt_len']}:{t['ttft_ms_cache_on']:.1f}" for t in turns))
PY
  done
done 2>&1 | tee "$OUT/multiturn-ab.log"
