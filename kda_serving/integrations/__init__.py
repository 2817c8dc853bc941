"""Plugins that put kda-serving's KDA kernels inside other frameworks, with no code change on their side.

- vLLM (`vllm_plugin.register`, entry point `vllm.general_plugins`): replaces vLLM's Kimi-Linear KDA layer.
- SGLang (`sglang_plugin.register`, entry point `sglang.srt.plugins`): installs our kernels as the KDA
  prefill/decode kernel of SGLang's linear-attention backend.
- flash-linear-attention (`fla_backend.register`): a backend for fla's `chunk_kda` and
  `fused_recurrent_kda`, ahead of FlashKDA.

Each framework is an optional extra: nothing here is imported by the core package, and each module imports
its framework only when its `register()` runs. See docs/integrations.md.
"""
