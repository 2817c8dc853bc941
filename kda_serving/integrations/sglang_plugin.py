"""SGLang general plugin (entry point `sglang.srt.plugins`): KDA prefill and decode on kda-serving.

SGLang runs `register()` in each process through `load_plugins()`, then applies the hooks registered with its
HookRegistry. We register an AFTER hook on `KDAKernelDispatcher.__init__` (the object through which SGLang's
KDA attention backend calls its kernels): once SGLang has chosen its kernels, the dispatcher's extend and
decode kernels become our `KDAServingSGLangKernel` (verify stays SGLang's). Idempotent. KDA_SERVING_SGLANG=0
leaves SGLang's kernels in place (checked when each dispatcher is built).
"""

from __future__ import annotations

from .switches import SGLANG_SWITCH, framework_logger, integration_enabled, log_once

logger = framework_logger("sglang")

DISPATCHER_INIT = "sglang.srt.layers.attention.linear.kda_backend.KDAKernelDispatcher.__init__"
_registered = False


def install_kernels(result, dispatcher, *args, **kwargs):
    """AFTER hook on KDAKernelDispatcher.__init__: swap in our extend and decode kernel."""
    if not integration_enabled(SGLANG_SWITCH):
        log_once("sglang-off", "kda-serving: %s=0, SGLang keeps its KDA kernels", SGLANG_SWITCH, to=logger)
        return result
    from .sglang_kernel import KDAServingSGLangKernel

    kernel = KDAServingSGLangKernel()
    dispatcher.extend_kernel = kernel
    dispatcher.decode_kernel = kernel
    dispatcher.supports_packed_decode = False
    dispatcher.supports_packed_decode_safe_gate = False
    log_once("sglang-on", "kda-serving: SGLang KDA extend/decode kernel is now kda-serving", to=logger)
    return result


def register() -> bool:
    """Registers the hook with SGLang's HookRegistry (once per process). Returns False when switched off."""
    global _registered
    if not integration_enabled(SGLANG_SWITCH):
        log_once("sglang-off", "kda-serving: %s=0, SGLang keeps its KDA kernels", SGLANG_SWITCH, to=logger)
        return False
    if _registered:
        return True
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(DISPATCHER_INIT, install_kernels, HookType.AFTER)
    _registered = True
    return True
