#!/usr/bin/env bash
# Experiment driver (not part of CI): compare library variants built with csrc/build.py --define.
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device_env.sh
lib() { [ "$1" = default ] && echo "$PWD/kda_serving/_lib/libkda_serving.so" || echo "$PWD/kda_serving/_lib/variants/$1/libkda_serving.so"; }
phase="$1"; shift
case "$phase" in
  prefill-acc)   # variants: accuracy on the hardest prefill tests
    for v in "$@"; do
      echo "=== $v"; KDA_SERVING_LIB=$(lib $v) timeout 200 python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/gpu/test_prefill_cuda.py \
        -k "extreme or 8192 or random_mixes or varlen or checkpoints or many" 2>&1 | grep -E "rel|passed|failed|Error" | sort -t' ' -k3 -g | tail -6
    done 2>&1 | tee -a "$OUT/acc.log" ;;
  prefill-speed)
    for v in "$@"; do
      echo "=== $v"; KDA_SERVING_LIB=$(lib $v) python3 benchmarks/bench_prefill.py --out-dir "$OUT/$v" --no-fla --iters 20 \
        ${EXTRA:-} --only "H96 fixed 8192" "H64 varlen 1024x8" "H32 fixed 8192" "H32 fixed 32768" "H96 varlen mixed6" --profile 2>&1 \
        | grep -E "^H|case|chunk_ops|recurrence|schedule|dense|copy" 
    done 2>&1 | tee -a "$OUT/speed.log" ;;
  decode)
    for v in "$@"; do
      echo "=== $v"; KDA_SERVING_LIB=$(lib $v) python3 benchmarks/bench_decode.py --out-dir "$OUT/$v" --no-fla --batch ${BATCH:-1 64 256} \
        --states ${STATES:-fp32 bf16} 2>&1 \
        | grep -E "${DECODE_STATES:-bf16}|copy"
    done 2>&1 | tee -a "$OUT/decode.log" ;;
  tests)
    python3 -m pytest -q -m gpu -p no:cacheprovider "$@" 2>&1 | tail -15 | tee -a "$OUT/tests.log" ;;
  segments)  # every prefill test with 2 time segments forced (where they apply), then ncu of one segmented call
    KDA_PREFILL_SEGMENTS=2 timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_prefill_cuda.py \
      2>&1 | tail -5 | tee -a "$OUT/segments-tests.log"
    KDA_PREFILL_SEGMENTS=2 KDA_PREFILL_WARPS=8 NCU_KERNELS=4 bash "$0" ncu "${@:-32}" 8192 ;;
  ncu)  # ncu H T: the kernels of one fixed-length case (NCU_KERNELS per call: 2, or 4 with segments), stall reasons
    ncu --clock-control none --kernel-name regex:"chunk_ops|recurrence|segment" --launch-skip "${NCU_KERNELS:-2}" \
      --launch-count "${NCU_KERNELS:-2}" \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
      --section MemoryWorkloadAnalysis --section SchedulerStats \
      --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio \
      python3 benchmarks/experiments/ncu_prefill.py "$@" > "$OUT/ncu-$1-$2.txt" 2>&1; tail -3 "$OUT/ncu-$1-$2.txt" ;;
  ncu-decode)  # ncu-decode H N [variant]: the bf16 decode step's kernel, stall reasons, top SASS stall sites
    f="$OUT/ncu-decode-$1-$2-${3:-default}"
    KDA_SERVING_LIB=$(lib ${3:-default}) ncu --clock-control none --kernel-name regex:"decode" --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
      --section MemoryWorkloadAnalysis --section SchedulerStats --section SourceCounters -o "$f" \
      python3 benchmarks/experiments/ncu_decode.py "$1" "$2" > /dev/null 2>&1
    ncu -i "$f.ncu-rep" > "$f.txt" 2>&1
    ncu -i "$f.ncu-rep" --page source --csv --print-source sass > "$f-sass.csv" 2>&1
    grep -E "Duration|DRAM Through|Issued Warp|Warp Cycles Per Issued|Registers Per" "$f.txt" | head -8
    python3 - "$f-sass.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
key = next(k for k in rows[0] if k.startswith("Warp Stall Sampling (All"))
tot = sum(float(r[key] or 0) for r in rows)
print(f"{len(rows)} SASS instructions, {tot:.0f} stall samples; top sites:")
for r in sorted(rows, key=lambda r: -float(r[key] or 0))[:25]:
    print(f"{float(r[key] or 0) / tot:6.1%}  {r.get('Address', '')}  {r['Source']}")
PY
    ;;
  ncu-source)  # ncu-source H T: per-SASS-instruction stall samples of pass 2 (NCU_KERNEL=chunk_ops: pass 1)
    ncu --clock-control none --kernel-name regex:"${NCU_KERNEL:-recurrence}" --launch-skip 1 --launch-count 1 \
      --section SourceCounters --section WarpStateStats --section SpeedOfLight --section SchedulerStats \
      --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis -o "$OUT/rec-$1-$2" python3 benchmarks/experiments/ncu_prefill.py "$@" > /dev/null 2>&1
    ncu -i "$OUT/rec-$1-$2.ncu-rep" --page source --csv --print-source sass > "$OUT/rec-$1-$2-sass.csv" 2>&1
    ncu -i "$OUT/rec-$1-$2.ncu-rep" > "$OUT/rec-$1-$2.txt" 2>&1; tail -40 "$OUT/rec-$1-$2.txt"; head -3 "$OUT/rec-$1-$2-sass.csv" ;;
esac
