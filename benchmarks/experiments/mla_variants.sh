#!/usr/bin/env bash
# Experiment driver (not part of CI): the MLA decode GPU tests on the default library, then bench_mla_decode.py
# on the default library and on each variant under kda_serving/_lib/variants/NAME, alternating, two rounds.
#   bash benchmarks/experiments/mla_variants.sh NAME...
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device_env.sh
nvidia-smi -L
python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/gpu/test_mla_decode_cuda.py 2>&1 \
  | grep -E "out-ref|passed|failed|Error" | tee "$OUT/mla-tests.log"
for r in 1 2; do
  for v in default "$@"; do
    lib="$PWD/kda_serving/_lib/libkda_serving.so"; [ "$v" = default ] || lib="$PWD/kda_serving/_lib/variants/$v/libkda_serving.so"
    echo "=== $v round $r"
    KDA_SERVING_LIB=$lib python3 benchmarks/bench_mla_decode.py --out-dir "$OUT/$v-$r" 2>&1 | grep -E "^N|copy"
  done
done 2>&1 | tee "$OUT/mla-bench.log"
