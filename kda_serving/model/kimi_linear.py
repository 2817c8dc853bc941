"""The Kimi-Linear causal LM over a ragged batch: embeddings, KDA/MLA decoder layers, final norm, lm_head.

One forward call runs one engine step: the packed new tokens of every scheduled sequence (prefill chunks and
decodes together) go through every layer once; KDA layers read/write their state slots, MLA layers their KV
blocks (see RaggedBatch). Only the rows named by batch.logits_indices reach the final norm and lm_head.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import linear
from .batch import RaggedBatch
from .caches import ModelCaches
from .config import DENSE, KDA, ModelConfig
from .fp8 import check_quantization
from .kda_block import KDABlock
from .mla_block import MLABlock, latent_rows
from .moe import DenseMLP, MoE, combine_experts, route_experts, silu_mul
from .norm import LATENT_NORM_EPS, add_rms_norm, rms_norm

log = logging.getLogger(__name__)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x))."""

    # the plain-torch pieces, or their compiled versions on a compiled model (KimiLinearModel.compile_plain_ops)
    norm_fn = staticmethod(rms_norm)
    add_norm_fn = staticmethod(add_rms_norm)

    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, device, fp8_experts: bool = False):
        super().__init__()
        self.is_kda = cfg.layer_types[layer] == KDA
        self.self_attn = KDABlock(cfg, dtype, device) if self.is_kda else MLABlock(cfg, dtype, device)
        if cfg.mlp_types[layer] == DENSE:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, dtype, device)
        else:
            self.mlp = MoE(cfg, dtype, device, fp8=fp8_experts)
        self.input_layernorm = nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype, device=device), False)
        self.post_attention_layernorm = nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype, device=device), False)
        self.eps = cfg.rms_norm_eps

    def forward(self, h: torch.Tensor, batch: RaggedBatch, caches: ModelCaches, index: int) -> torch.Tensor:
        """h [T, hidden] -> [T, hidden]; `index` is this layer's position in caches.recurrent/conv or caches.kv."""
        inputs = self.project(h, batch, caches, index)
        return self.finish(h, self.mix(inputs, batch, caches, index), inputs)

    # forward in three parts, as the mixers split theirs (KDABlock.project, .mix, .finish)

    def project(self, h: torch.Tensor, batch: RaggedBatch, caches: ModelCaches, index: int) -> dict:
        """The input norm and the mixer's projections: its inputs, each [T, ...]."""
        x = self.norm_fn(h, self.input_layernorm, self.eps)
        if self.is_kda:
            return self.self_attn.project(x)
        return self.self_attn.project(x, batch, caches.kv[index])

    def mix(self, inputs: dict, batch: RaggedBatch, caches: ModelCaches, index: int) -> torch.Tensor:
        """The mixer's work across the batch's sequences: [T, *self.self_attn.mix_shape]."""
        if self.is_kda:
            return self.self_attn.mix(inputs, batch, caches.recurrent[index], caches.conv[index])
        return self.self_attn.mix(inputs, batch, caches.kv[index])

    def finish(self, h: torch.Tensor, mixed: torch.Tensor, inputs: dict) -> torch.Tensor:
        """The mixer's output projection, the residual add and norm, the MLP and its residual add: [T, hidden]."""
        x = self.self_attn.finish(mixed, inputs) if self.is_kda else self.self_attn.finish(mixed)
        h, x = self.add_norm_fn(h, x, self.post_attention_layernorm, self.eps)
        return self.mlp(x, residual=h)  # h + mlp(x), the add inside the MoE kernels where they run


class KimiLinearModel(nn.Module):
    """Parameters are created empty (torch.empty) and filled by the loader; use load_model() to get one.
    quantization: None (every weight in `dtype`) or "fp8" (the routed experts in e4m3: model/fp8.py)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, device="cpu", path: str | None = None,
                 quantization: str | None = None):
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        self.path = path  # the checkpoint directory (tokenizer files live there too)
        self.quantization = check_quantization(quantization)
        vocab, hidden = cfg.vocab_size, cfg.hidden_size
        self.embed_tokens = nn.Parameter(torch.empty(vocab, hidden, dtype=dtype, device=device), False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, dtype, device, fp8_experts=quantization == "fp8")
                                    for i in range(cfg.num_hidden_layers))
        self.norm = nn.Parameter(torch.empty(hidden, dtype=dtype, device=device), False)
        # With tie_word_embeddings the loader makes lm_head share embed_tokens, but only when the checkpoint has
        # no lm_head.weight: transformers' KimiLinearForCausalLM never ties, so a stored head is used as is.
        self.lm_head = nn.Parameter(torch.empty(vocab, hidden, dtype=dtype, device=device), False)
        # position of each layer's state in ModelCaches.recurrent/conv (KDA) or ModelCaches.kv (MLA)
        kda, mla = cfg.kda_layers, cfg.mla_layers
        self._cache_index = [kda.index(i) if i in kda else mla.index(i) for i in range(cfg.num_hidden_layers)]

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    norm_fn = staticmethod(rms_norm)

    def compile_plain_ops(self, enable: bool = True) -> bool:
        """Compiles (torch.compile, Inductor) the model's plain torch pieces between its custom ops and GEMMs:
        the RMS norms, each residual add with the norm after it, the MoE router, the SwiGLU activation, the
        experts' weighted sum (fp8 experts' quantizations are kernels of their own) and the MLA latent rows
        (mla_block.latent_rows), each one function shared by every layer and compiled once for every token
        count (dynamic shapes). Their dozens of small elementwise, reduction and top-k kernels per step become a
        few fused ones: on an H200 a CUDA-graph decode step of 4 Kimi-Linear-48B-shaped layers went 1.05 -> 0.92
        ms at 1 request and 2.63 -> 2.42 ms at 64 (benchmarks/experiments/compile_decode.py, the first three); a
        48B MoE layer of 8,192 tokens 4.27 -> 3.45 ms (the last two, used from moe.FUSED_MIN_TOKENS tokens).
        The rest stays eager: the custom ops and GEMMs gain nothing from it, and compiling the whole forward
        specialises on the key lengths of every step. enable=False puts the eager functions back.

        The functions are compiled here, on one and two tokens (every longer count shares the second). If that
        fails (no C compiler for Triton's launcher, an Inductor error), the eager functions stay, with a
        warning, rather than the first step failing. Returns whether the compiled ones are in use."""
        if enable:
            try:
                self._warm_up_compiled()
            except Exception as exc:  # noqa: BLE001 - any compile failure leaves the eager path, which is correct
                log.warning("torch.compile of the model's plain ops failed (%s: %s); they run eagerly",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                enable = False
        pick = _compiled if enable else (lambda fn: fn)
        norm, add_norm, route = pick(rms_norm), pick(add_rms_norm), pick(route_experts)
        act, combine, latent = pick(silu_mul), pick(combine_experts), pick(latent_rows)
        self.norm_fn = norm
        for layer in self.layers:
            layer.norm_fn, layer.add_norm_fn = norm, add_norm
            if not layer.is_kda:
                layer.self_attn.norm_fn, layer.self_attn.latent_fn = norm, latent
            mlps = [layer.mlp] + ([layer.mlp.shared_experts] if isinstance(layer.mlp, MoE) else [])
            for mlp in filter(None, mlps):
                mlp.act_fn = act
            if isinstance(layer.mlp, MoE):
                layer.mlp.route_fn, layer.mlp.combine_fn = route, combine
        return enable

    @torch.inference_mode()  # as forward runs: the compiled code is guarded on it
    def _warm_up_compiled(self) -> None:
        eps = self.config.rms_norm_eps
        moe = next((layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)), None)
        mla = next((layer.self_attn for layer in self.layers if not layer.is_kda), None)
        for tokens in (1, 2):
            h = torch.ones(tokens, self.norm.shape[0], dtype=self.dtype, device=self.device)
            _compiled(rms_norm)(h, self.norm, eps)
            _compiled(add_rms_norm)(h, h, self.norm, eps)
            _compiled(silu_mul)(torch.ones(tokens, 2 * self.config.intermediate_size, dtype=self.dtype,
                                           device=self.device))
            if mla is not None:
                kv_a = torch.ones(tokens, mla.kv_lora_rank + mla.rope_dim, dtype=self.dtype, device=self.device)
                _compiled(latent_rows)(kv_a, mla.kv_a_layernorm, LATENT_NORM_EPS, self.dtype)
            if moe is not None:
                _compiled(route_experts)(h, moe.router, moe.e_score_correction_bias, moe.top_k, moe.num_groups,
                                         moe.topk_group, moe.renormalize, moe.scaling)
                pairs = torch.arange(tokens * moe.top_k, dtype=torch.int32, device=self.device)  # as moe_sort_pairs
                _compiled(combine_experts)(h.repeat_interleave(moe.top_k, 0), pairs,
                                           torch.ones(tokens, moe.top_k, device=self.device))

    def quantize_experts_(self) -> KimiLinearModel:
        """Turns a loaded model's routed experts into fp8 in place (what load_model(..., quantization="fp8") loads
        directly, without the bf16 experts on the device); returns the model. Benchmarks and tests compare
        the two forms of the same weights with it."""
        for layer in self.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.quantize_experts_()
        self.quantization = "fp8"
        return self

    def set_fp8_fast_accumulation(self, enable: bool) -> None:
        """Whether the fp8 experts' grouped GEMMs use Hopper's fast accumulation (MoE.fast_accumulation: faster,
        less exact). Raises ValueError for a model without fp8 experts, where it would mean nothing. Set it
        before CUDA graphs are captured: they keep the setting they were captured with."""
        if enable and self.quantization != "fp8":
            raise ValueError("fp8 fast accumulation needs fp8 experts (quantization='fp8'), got quantization="
                             f"{self.quantization!r}")
        for layer in self.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.fast_accumulation = bool(enable)

    @property
    def decode_capturable(self) -> bool:
        """Whether a decode step (RaggedBatch.is_decode, host kv_lens given) runs without host syncs, so the
        engine can capture it in a CUDA graph: on CUDA, with every MoE on its grouped GEMMs (bf16 tokens; bf16
        experts, or fp8 ones on SM90)."""
        return self.device.type == "cuda" and all(
            getattr(layer.mlp, "capturable", True) for layer in self.layers
        )

    @property
    def decode_any_length(self) -> bool:
        """Whether a captured decode step serves every key length: each MLA layer's attention reads the key
        counts and block tables on the device (MLABlock.decode_on_kernel), so nothing in the step's shapes or
        launch parameters depends on them. Otherwise the engine captures a step per key-length bucket."""
        return all(layer.self_attn.decode_on_kernel for layer in self.layers if not layer.is_kda)

    @torch.inference_mode()
    def forward(self, batch: RaggedBatch, caches: ModelCaches) -> torch.Tensor:
        """Runs one step; returns fp32 logits [N, vocab] for the tokens at batch.logits_indices."""
        h = F.embedding(batch.input_ids, self.embed_tokens)  # [T, hidden]
        for layer, index in zip(self.layers, self._cache_index):
            h = layer(h, batch, caches, index)
        return self.logits(h, batch)

    def logits(self, h: torch.Tensor, batch: RaggedBatch) -> torch.Tensor:
        """The final norm and lm_head of the rows batch.logits_indices of h [T, hidden]: fp32 [R, vocab]."""
        last = self.norm_fn(h[batch.logits_indices], self.norm, self.config.rms_norm_eps)
        return linear(last, self.lm_head).float()

    # The forward cut where it reads the batch's sequences, for piecewise CUDA graphs (engine/prompt_graphs.py):
    #   carry = piece(0, {}); then for each layer i: carry["mixer_out"] = mix(i, carry); carry = piece(i + 1, carry);
    #   then logits(carry["h"]).
    # A piece sees only the step's tokens (batch.input_ids and batch.slot_mapping), so one capture serves every
    # step of its token count; every carry entry is [T, ...].

    def piece(self, i: int, carry: dict, batch: RaggedBatch, caches: ModelCaches) -> dict:
        """Piece i: layer i-1's finish (from i = 1), then layer i's project (below the last layer); returns the
        carry: the residual stream "h" and layer i's mixer inputs."""
        if i == 0:
            h = F.embedding(batch.input_ids, self.embed_tokens)
        else:
            h = self.layers[i - 1].finish(carry["h"], carry["mixer_out"], carry)
        if i == len(self.layers):
            return {"h": h}
        return {"h": h, **self.layers[i].project(h, batch, caches, self._cache_index[i])}

    def mix(self, i: int, carry: dict, batch: RaggedBatch, caches: ModelCaches) -> torch.Tensor:
        """Layer i's mixer over the batch's sequences, from the carry of piece i: [T, *mix_shape(i)]."""
        return self.layers[i].mix(carry, batch, caches, self._cache_index[i])

    def mix_shape(self, i: int) -> tuple[int, ...]:
        return tuple(self.layers[i].self_attn.mix_shape)

    def allocate_caches(self, num_state_slots: int, num_kv_blocks: int, block_size: int,
                        state_dtype: torch.dtype = torch.float32) -> ModelCaches:
        """Zeroed pools: per KDA layer recurrent [S, H, V, K] in state_dtype (fp32, or bf16 at half the memory
        and decode traffic, rounded once per step) and conv [S, W-1, 3*H*K] in the model dtype; per MLA layer
        latent KV [num_kv_blocks, block_size, kv_lora_rank + qk_rope_head_dim]."""
        for name, value in (("num_state_slots", num_state_slots), ("num_kv_blocks", num_kv_blocks),
                            ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"allocate_caches: '{name}' must be an int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"allocate_caches: '{name}' must be positive, got {value}")
        _check_state_dtype(state_dtype)
        cfg, dev = self.config, self.device
        H, K = cfg.linear_num_heads, cfg.linear_head_dim
        recurrent = [torch.zeros(num_state_slots, H, K, K, dtype=state_dtype, device=dev) for _ in cfg.kda_layers]
        conv = [
            torch.zeros(num_state_slots, cfg.conv_kernel_size - 1, cfg.conv_dim, dtype=self.dtype, device=dev)
            for _ in cfg.kda_layers
        ]
        kv = [
            torch.zeros(num_kv_blocks, block_size, cfg.latent_dim, dtype=self.dtype, device=dev)
            for _ in cfg.mla_layers
        ]
        return ModelCaches(recurrent, conv, kv)

    def state_slot_bytes(self, state_dtype: torch.dtype = torch.float32) -> int:
        """Bytes one state slot takes across all KDA layers (recurrent state in state_dtype + conv window)."""
        _check_state_dtype(state_dtype)
        cfg = self.config
        per_layer = cfg.linear_num_heads * cfg.linear_head_dim**2 * state_dtype.itemsize
        per_layer += (cfg.conv_kernel_size - 1) * cfg.conv_dim * self.dtype.itemsize
        return per_layer * len(cfg.kda_layers)

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes one KV block of `block_size` tokens takes across all MLA layers."""
        return block_size * self.config.latent_dim * self.dtype.itemsize * len(self.config.mla_layers)


@functools.cache
def _compiled(fn):
    """One compiled wrapper per function for the process, so that models and engines share its compilations.

    Fused intermediates stay in fp32 where eager ops round them to bf16 (the residual sum before its norm): on
    an H200 that measured as accurate against the fp32 truth (tests/model/test_compiled_pieces.py) and 0.13 ms
    faster per one-request decode step than rounding them as eager does (emulate_precision_casts, bit-equal
    to eager, no gain at one request: benchmarks/results/logs/session14/h200-compile-decode-emulate.log)."""
    return torch.compile(fn, dynamic=True)


def _check_state_dtype(state_dtype) -> None:
    if state_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(
            f"allocate_caches: 'state_dtype' must be torch.float32 or torch.bfloat16, got {state_dtype!r}"
        )
