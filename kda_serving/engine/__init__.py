"""The serving engine: continuous batching with chunked prefill over KDA state slots and paged MLA KV.

    from kda_serving.engine import LLM, SamplingParams
    LLM().generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))

For servers: AsyncLLMEngine(EngineConfig(...)); see docs/engine.md.

Names are imported on first use, so the plain-Python parts (config, sampling params, sequence, scheduler)
load without torch.
"""

from importlib import import_module

_EXPORTS = {
    "AsyncLLMEngine": "async_engine",
    "EngineDeadError": "async_engine",
    "EngineConfig": "config",
    "EngineStats": "outputs",
    "LLM": "llm",
    "LLMEngine": "llm_engine",
    "RequestOutput": "outputs",
    "SamplingParams": "sampling_params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
