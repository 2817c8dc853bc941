"""vLLM's Kimi-Linear KDA layer with its core forward running on kda-serving's ops.

Imports vLLM: load it only through `vllm_plugin.register()`. The subclass keeps everything of
`KimiGatedDeltaNetAttention` (weights, loaders, projections, output norm, state shapes) and replaces
`_forward`, the part between the projections and the output norm: short conv + KDA over vLLM's ragged batch,
reading and writing vLLM's conv and recurrent state tensors in place (see vllm_kda_core.py). Speculative
decoding batches keep vLLM's own path.
"""

from __future__ import annotations

import inspect

import torch
from vllm.compilation.breakable_cudagraph import eager_break_during_capture
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.gdn.kimi_gdn_linear_attn import KimiGatedDeltaNetAttention
from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first

from .switches import framework_logger, log_once
from .vllm_kda_core import KimiKDAParams, VLLMKDABatch, kimi_kda_core

_vllm_forward = inspect.unwrap(KimiGatedDeltaNetAttention._forward)
logger = framework_logger("vllm")


class KDAServingKimiDeltaAttention(KimiGatedDeltaNetAttention):
    """KimiGatedDeltaNetAttention whose KDA core runs on kda-serving (CUDA kernels, or the CPU path)."""

    def kda_params(self) -> KimiKDAParams:
        weight = self.conv1d.weight
        return KimiKDAParams(
            conv_weight=weight.view(weight.shape[0], weight.shape[-1]),
            conv_bias=self.conv1d.bias,
            A_log=self.A_log,
            dt_bias=self.dt_bias.view(self.local_num_heads, self.head_dim),
            num_heads=self.local_num_heads,
            head_dim=self.head_dim,
            lower_bound=self.gate_lower_bound,
        )

    @eager_break_during_capture
    def _forward(
        self,
        mixed_qkv: torch.Tensor,
        g1: torch.Tensor,
        g2: torch.Tensor,
        beta: torch.Tensor,
        core_attn_out: torch.Tensor,
    ) -> None:
        metadata = get_forward_context().attn_metadata
        if metadata is None:
            return
        m = metadata.get(self.prefix)
        if m is None:  # profiling and warm-up runs carry no mamba metadata
            return
        if m.spec_sequence_masks is not None:
            log_once("vllm-spec", "kda-serving: speculative-decode batch: vLLM's own KDA path", to=logger)
            return _vllm_forward(self, mixed_qkv, g1, g2, beta, core_attn_out)
        conv_state, rec_state = self.kv_cache
        if is_conv_state_dim_first():
            conv_state = conv_state.transpose(-1, -2)  # [S, D, W-1] -> [S, W-1, D] view
        path = kimi_kda_core(
            mixed_qkv, g1, beta, conv_state, rec_state, self.kda_params(), VLLMKDABatch.from_vllm(m),
            core_attn_out[0], logger,
        )
        device = "CUDA kernels" if mixed_qkv.is_cuda else "CPU reference path"
        log_once(f"vllm-{path}-{mixed_qkv.device.type}", "kda-serving: vLLM KDA %s on the %s", path, device, to=logger)
        core_attn_out.copy_(self.o_norm(core_attn_out, g2))
