#!/usr/bin/env bash
# One call on the GPU machine: install the carried wheels, then either run every GPU test (`tests`) or the
# benchmarks (`bench`, `bench-prefill`). Logs and result files go to $OUT (or ./device-out).
# The library is built on the dev machine (`python csrc/build.py`) and carried with the call:
#   carry: [".whl", "kda_serving/_lib"]   command: bash benchmarks/device_check.sh tests
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_env.sh
nvidia-smi -L
case "${1:-tests}" in  # tests | bench | bench-prefill [bench_prefill.py args]
  tests)
    # `tests [PATH...]`: all GPU tests, or those under the given paths.
    paths=("${@:2}"); [ ${#paths[@]} -gt 0 ] || paths=(tests)
    { python3 -m pytest -q -m gpu -p no:cacheprovider --ignore=tests/integrations/test_fla_gpu.py "${paths[@]}"
      PYTHONPATH=$WITH_FLA python3 -m pytest -q -m gpu -p no:cacheprovider tests/integrations/test_fla_gpu.py
    } 2>&1 | tee "$OUT/gpu-tests.log"
    ;;
  bench)
    export PYTHONPATH=$WITH_FLA
    { python3 benchmarks/bench_decode.py --out-dir "$OUT" &&
      python3 benchmarks/bench_kda_layer.py --out-dir "$OUT" &&
      python3 benchmarks/bench_mla_decode.py --out-dir "$OUT" &&
      python3 benchmarks/bench_flash_attention.py --out-dir "$OUT" &&
      python3 benchmarks/bench_mla_prefill.py --out-dir "$OUT" &&
      python3 benchmarks/bench_engine.py --device cuda --out "$OUT/engine.json" &&
      python3 benchmarks/bench_spec_decode.py --out "$OUT/spec_decode.json" &&
      python3 benchmarks/bench_decode_step.py --out "$OUT/decode_step.json" &&
      python3 benchmarks/bench_sampling.py --out-dir "$OUT" &&
      python3 benchmarks/bench_moe.py --out "$OUT/moe.json" &&
      python3 benchmarks/bench_moe_routing.py --out "$OUT/moe_routing.json" &&
      python3 benchmarks/bench_fp8_experts.py --out "$OUT/fp8_experts.json" &&
      python3 benchmarks/bench_fp8_quantize.py --out "$OUT/fp8_quantize.json"; } 2>&1 | tee "$OUT/bench.log"
    ;;
  bench-prefill)
    PYTHONPATH=$WITH_FLA python3 benchmarks/bench_prefill.py --out-dir "$OUT" "${@:2}" 2>&1 | tee "$OUT/bench-prefill.log"
    ;;
esac
