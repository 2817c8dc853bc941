"""kda-serving as a KDA kernel of SGLang's linear-attention backend (imports SGLang: load it only through
`sglang_plugin.register()`).

`KDAServingSGLangKernel` subclasses SGLang's TritonKDAKernel: SGLang's dispatcher treats it as the Triton
kernel where it checks (safe-gate decode is allowed only for Triton), and whatever our kernels do not cover
goes to the Triton code it inherits: speculative target verify, the prefix-cache track snapshot
(`return_intermediate_states` / `track_state`), draft-extend batches, and state checkpoints. The packed decode
fast path is turned off, so decode reaches `decode()` with q, k, v split.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.linear.kernels.kda_triton import TritonKDAKernel

from .sglang_kda_core import sglang_decode, sglang_extend
from .switches import framework_logger, log_once

logger = framework_logger("sglang")


def _where(t: torch.Tensor) -> str:
    return "CUDA kernels" if t.is_cuda else "CPU reference path"


class KDAServingSGLangKernel(TritonKDAKernel):
    """KDA extend/decode on kda-serving; the rest of TritonKDAKernel's interface is inherited."""

    supports_packed_decode = False

    def extend(self, q, k, v, g, beta, *, ssm_states, cache_indices, query_start_loc, A_log=None, dt_bias=None,
               lower_bound=None, beta_is_raw=False, return_intermediate_states=False, **kwargs):
        needs_triton = (
            return_intermediate_states
            or kwargs.get("track_state") is not None
            or kwargs.get("is_spec_decode", False)
            or kwargs.get("num_state_checkpoints")
            or not beta_is_raw
            or A_log is None
        )
        if needs_triton:
            log_once("sglang-extend-triton", "kda-serving: SGLang KDA extend needing state snapshots/spec: Triton",
                     to=logger)
            return super().extend(q, k, v, g, beta, ssm_states=ssm_states, cache_indices=cache_indices,
                                  query_start_loc=query_start_loc, A_log=A_log, dt_bias=dt_bias,
                                  lower_bound=lower_bound, beta_is_raw=beta_is_raw,
                                  return_intermediate_states=return_intermediate_states, **kwargs)
        log_once(f"sglang-extend-{q.device.type}", "kda-serving: SGLang KDA extend on the %s", _where(q), to=logger)
        return sglang_extend(q, k, v, g, beta, ssm_states=ssm_states, cache_indices=cache_indices,
                             query_start_loc=query_start_loc, A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound)

    def decode(self, q, k, v, a, b, *, A_log, dt_bias, ssm_states, cache_indices, query_start_loc,
               lower_bound=None, **kwargs):
        log_once(f"sglang-decode-{q.device.type}", "kda-serving: SGLang KDA decode on the %s", _where(q), to=logger)
        return sglang_decode(q, k, v, a, b, ssm_states=ssm_states, cache_indices=cache_indices,
                             query_start_loc=query_start_loc, A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound)
