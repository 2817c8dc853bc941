"""The vLLM plugin for real, on CPU: vllm-cpu serves a tiny all-KDA kimi_linear checkpoint with our layer and
must produce transformers' greedy tokens, also when a request hits vLLM's prefix cache.

Runs only where vLLM is importable (the venv made by .ci/vllm_cpu_test.sh); skipped in the main suite.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from tiny_kimi import build_tiny_kimi, transformers_greedy  # noqa: E402  (tests/integrations on sys.path)

HERE = Path(__file__).resolve().parent
MAX_NEW_TOKENS = 8
BLOCK = 64  # vLLM prefix-cache granularity for the test (mamba states are cached at block boundaries)

# vllm-cpu 0.32 switches that must be off for Kimi models on CPU: GEMM-AR/RS need CUTLASS DSL and NVLink.
# VLLM_MLA_DISABLE: on a CPU without AMX tiles (AMD EPYC, older Xeons) vllm-cpu turns prefix caching off for
# every model it takes for MLA (kimi_linear is one, by its kv_lora_rank), and then refuses the mamba block
# size it had set for prefix caching itself. The test checkpoint has no MLA layer, so nothing else changes.
VLLM_CPU_ENV = {"VLLM_KIMI_K3_GEMM_AR": "0", "VLLM_ENABLE_GEMM_RS": "0", "VLLM_MLA_DISABLE": "1"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_kimi(tmp_path_factory.mktemp("tiny_kimi"))


def run_vllm(model: Path, spec: dict, extra_env: dict[str, str] | None = None) -> tuple[dict, str]:
    env = {**os.environ, **VLLM_CPU_ENV, **(extra_env or {})}
    proc = subprocess.run(
        [sys.executable, str(HERE / "vllm_cpu_driver.py"), str(model), json.dumps(spec)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"vLLM driver failed:\n{log[-6000:]}"
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), log


def test_register_is_idempotent_and_switchable(monkeypatch):
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.mamba.gdn.kimi_gdn_linear_attn import KimiGatedDeltaNetAttention

    from kda_serving.integrations import vllm_plugin

    monkeypatch.setenv("KDA_SERVING_VLLM", "0")
    before = dict(op_registry_oot)
    assert vllm_plugin.register() is False
    assert dict(op_registry_oot) == before
    monkeypatch.delenv("KDA_SERVING_VLLM")
    assert vllm_plugin.register() is True
    assert vllm_plugin.register() is True  # a second call changes nothing
    from kda_serving.integrations.vllm_layer import KDAServingKimiDeltaAttention

    assert op_registry_oot["KimiGatedDeltaNetAttention"] is KDAServingKimiDeltaAttention
    assert issubclass(KDAServingKimiDeltaAttention, KimiGatedDeltaNetAttention)


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("kda_serving") == "kda_serving.integrations.vllm_plugin:register"


@pytest.mark.slow
def test_vllm_cpu_greedy_matches_transformers_with_prefix_cache(tiny_model):
    rng = random.Random(0)
    prefix = [rng.randrange(3, 500) for _ in range(9 * BLOCK + 5)]
    first = [
        [rng.randrange(3, 500) for _ in range(7)],  # shorter than the conv window's reach into history
        [rng.randrange(3, 500) for _ in range(150)],
        prefix + [7, 8, 9],
    ]
    second = [prefix + [10, 11, 12, 13]]  # shares 9 full blocks with first[2]
    spec = {"prefix_caching": True, "max_new_tokens": MAX_NEW_TOKENS, "engine_args": {"block_size": BLOCK},
            "rounds": [first, second]}
    result, log = run_vllm(tiny_model, spec)

    expected = transformers_greedy(tiny_model, first + second, MAX_NEW_TOKENS)
    got = [r["tokens"] for rnd in result["rounds"] for r in rnd]
    print("vLLM+kda-serving:", got, "\ntransformers:    ", expected)
    assert got == expected
    cached = result["rounds"][1][0]["num_cached_tokens"]
    assert cached >= 9 * BLOCK - BLOCK, f"the second request should hit the prefix cache, got {cached} cached tokens"
    assert "kda-serving: vLLM's KimiGatedDeltaNetAttention now runs on kda-serving ops" in log
    assert "kda-serving: vLLM KDA prefill on the CPU reference path" in log
    assert "kda-serving: vLLM KDA decode on the CPU reference path" in log
