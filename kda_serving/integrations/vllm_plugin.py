"""vLLM general plugin (entry point `vllm.general_plugins`): serve Kimi-Linear's KDA layers with kda-serving.

vLLM calls `register()` in every process it starts (API server, engine core, workers), before models are
built. It registers `KDAServingKimiDeltaAttention` as the out-of-tree replacement of vLLM's pluggable layer
`KimiGatedDeltaNetAttention`, so every Kimi-Linear model vLLM builds gets it. Idempotent. Set
KDA_SERVING_VLLM=0 to keep vLLM's own layer.
"""

from __future__ import annotations

from .switches import VLLM_SWITCH, framework_logger, integration_enabled, log_once

logger = framework_logger("vllm")

REPLACED_LAYER = "KimiGatedDeltaNetAttention"


def register() -> bool:
    """Installs the layer replacement. Returns True when our layer is (now or already) registered."""
    if not integration_enabled(VLLM_SWITCH):
        log_once("vllm-off", "kda-serving: %s=0, vLLM keeps its own Kimi KDA layer", VLLM_SWITCH, to=logger)
        return False
    from vllm.model_executor.custom_op import PluggableLayer, op_registry_oot

    from .vllm_layer import KDAServingKimiDeltaAttention

    current = op_registry_oot.get(REPLACED_LAYER)
    if current is KDAServingKimiDeltaAttention:
        return True
    if current is not None:
        log_once("vllm-taken", "kda-serving: %s is already replaced by %s; leaving it", REPLACED_LAYER, current,
                 to=logger)
        return False
    PluggableLayer.register_oot(KDAServingKimiDeltaAttention, name=REPLACED_LAYER)
    log_once("vllm-on", "kda-serving: vLLM's %s now runs on kda-serving ops", REPLACED_LAYER, to=logger)
    return True
