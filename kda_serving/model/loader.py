"""Loading a Hugging Face `kimi_linear` checkpoint directory (config.json + *.safetensors) into KimiLinearModel.

Accepts both weight namings: transformers' (self_attn.conv1d, self_attn.forget_gate.*, mlp.experts.gate_up_proj
[E, 2I, hidden]) and the original Moonshot release (self_attn.{q,k,v}_conv1d, self_attn.f_a_proj/A_log/dt_bias,
block_sparse_moe.experts.{e}.w1/w2/w3), the two sides of transformers' conversion mapping for this model.
Every checkpoint tensor is copied straight into a region of one of our (partly fused) parameters, so peak
memory is one tensor beyond the model. On a model with fp8 experts (model/fp8.py) the experts' tensors are
quantized as they are copied, a slice of rows at a time: the bf16 experts never exist on the device. Missing or
unknown tensors and shape mismatches are ValueErrors.
"""

from __future__ import annotations

import glob
import os
import re

from safetensors import safe_open
from tqdm.auto import tqdm

from .config import KDA, MOE, ModelConfig
from .fp8 import FP8, quantize_into_
from .kimi_linear import KimiLinearModel

_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")

# A target: (parameter name, index into it), index None meaning the whole parameter.
Target = tuple[str, tuple | None]


def _kda_target(rest: str, prefix: str, cfg: ModelConfig) -> Target | None:
    D, K, H = cfg.kda_dim, cfg.linear_head_dim, cfg.linear_num_heads
    rows = {  # the fused in_proj: q | k | v | f_a | g_a | b
        "q_proj.weight": (0, D), "k_proj.weight": (D, 2 * D), "v_proj.weight": (2 * D, 3 * D),
        "f_a_proj.weight": (3 * D, 3 * D + K), "g_a_proj.weight": (3 * D + K, 3 * D + 2 * K),
        "b_proj.weight": (3 * D + 2 * K, 3 * D + 2 * K + H),
    }
    conv_rows = {"q_conv1d.weight": (0, D), "k_conv1d.weight": (D, 2 * D), "v_conv1d.weight": (2 * D, 3 * D)}
    whole = {"A_log": "A_log", "dt_bias": "dt_bias", "o_norm.weight": "o_norm", "o_proj.weight": "o_proj",
             "conv1d.weight": "conv_weight"}
    rest = rest.removeprefix("forget_gate.")
    if rest in ("f_b_proj.weight", "g_b_proj.weight"):  # the two halves of fg_b_proj
        return f"{prefix}.fg_b_proj", (0 if rest.startswith("f") else 1,)
    if rest in rows:
        a, b = rows[rest]
        return f"{prefix}.in_proj", (slice(a, b),)
    if rest in conv_rows:
        a, b = conv_rows[rest]
        return f"{prefix}.conv_weight", (slice(a, b),)
    if rest in whole:
        return f"{prefix}.{whole[rest]}", None
    return None


def _mla_target(rest: str, prefix: str) -> Target | None:
    names = ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
             "kv_b_proj", "o_proj")
    module, _, kind = rest.rpartition(".")
    if module in names and kind == "weight":
        return f"{prefix}.{module}", None
    if module in ("q_a_proj", "kv_a_proj_with_mqa", "o_proj") and kind == "bias":
        return f"{prefix}.{module}_bias", None
    return None


def _mlp_target(rest: str, prefix: str, is_moe: bool, cfg: ModelConfig) -> Target | None:
    if not is_moe:
        I = cfg.intermediate_size
        return _swiglu_target(rest, prefix, I)
    I = cfg.moe_intermediate_size
    if rest == "gate.weight":
        return f"{prefix}.router", None
    if rest == "gate.e_score_correction_bias":
        return f"{prefix}.e_score_correction_bias", None
    if rest in ("experts.gate_up_proj", "experts.down_proj"):
        return f"{prefix}.{rest.removeprefix('experts.')}", None
    m = re.fullmatch(r"experts\.(\d+)\.(w1|w2|w3)\.weight", rest)
    if m:
        e, w = int(m.group(1)), m.group(2)
        if w == "w2":
            return f"{prefix}.down_proj", (e,)
        return f"{prefix}.gate_up_proj", (e, slice(0, I) if w == "w1" else slice(I, 2 * I))
    if rest.startswith("shared_experts."):
        return _swiglu_target(rest.removeprefix("shared_experts."), f"{prefix}.shared_experts",
                              I * cfg.num_shared_experts)
    return None


def _swiglu_target(rest: str, prefix: str, intermediate: int) -> Target | None:
    if rest == "gate_proj.weight":
        return f"{prefix}.gate_up_proj", (slice(0, intermediate),)
    if rest == "up_proj.weight":
        return f"{prefix}.gate_up_proj", (slice(intermediate, 2 * intermediate),)
    if rest == "down_proj.weight":
        return f"{prefix}.down_proj", None
    return None


def checkpoint_target(name: str, cfg: ModelConfig) -> Target | None:
    """Where checkpoint tensor `name` goes in KimiLinearModel, or None if it is not one of ours."""
    name = name.removeprefix("model.")
    if name in ("embed_tokens.weight", "norm.weight", "lm_head.weight"):
        return name.removesuffix(".weight"), None
    m = _LAYER.match(name)
    if not m:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    if layer >= cfg.num_hidden_layers:
        return None
    prefix = f"layers.{layer}"
    if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        return f"{prefix}.{rest.removesuffix('.weight')}", None
    if rest.startswith("self_attn."):
        rest = rest.removeprefix("self_attn.")
        if cfg.layer_types[layer] == KDA:
            return _kda_target(rest, f"{prefix}.self_attn", cfg)
        return _mla_target(rest, f"{prefix}.self_attn")
    for module in ("mlp.", "block_sparse_moe."):
        if rest.startswith(module):
            return _mlp_target(rest.removeprefix(module), f"{prefix}.mlp", cfg.mlp_types[layer] == MOE, cfg)
    return None


def checkpoint_files(path: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {path!r} (only safetensors checkpoints are supported)")
    return files


def load_weights(model: KimiLinearModel, path: str, progress: bool = True) -> None:
    """Fills every parameter of `model` from the safetensors shards in `path` (casting to the model dtype)."""
    cfg = model.config
    params = dict(model.named_parameters())
    written = {name: 0 for name in params}
    files = checkpoint_files(path)
    keys = []
    for file in files:
        with safe_open(file, framework="pt") as f:
            keys.extend((file, k) for k in f.keys())
    unknown = []
    bar = tqdm(total=len(keys), desc=f"Loading {os.path.basename(os.path.normpath(path))}", unit="tensor",
               disable=not progress)
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                bar.update(1)
                target = checkpoint_target(key, cfg)
                if target is None or target[0] not in params:
                    if not _IGNORED.match(key):
                        unknown.append(key)
                    continue
                name, index = target
                dest = params[name] if index is None else params[name][index]
                src = f.get_tensor(key)
                if src.numel() != dest.numel() or (src.dim() == dest.dim() and src.shape != dest.shape):
                    raise ValueError(
                        f"checkpoint tensor {key!r} has shape {tuple(src.shape)}, expected {tuple(dest.shape)} "
                        f"for {name} (does config.json match the weights?)"
                    )
                if dest.dtype == FP8:  # a routed expert's weight: quantized rows and their scales
                    scale = params[f"{name}_scale"] if index is None else params[f"{name}_scale"][index]
                    quantize_into_(dest, scale, src.reshape(dest.shape))
                    written[f"{name}_scale"] += scale.numel()
                else:
                    dest.copy_(src.reshape(dest.shape))
                written[name] += dest.numel()
    bar.close()
    if unknown:
        raise ValueError(f"checkpoint has {len(unknown)} tensors this model does not use, e.g. {unknown[:5]}")
    if cfg.tie_word_embeddings and written["lm_head"] == 0:
        model.lm_head = model.embed_tokens  # tied and not stored: share the embedding matrix
        written.pop("lm_head")
    for name, count in written.items():
        expected = params[name].numel()
        if count == expected:
            continue
        if count == 0 and name.endswith("e_score_correction_bias"):
            params[name].zero_()  # optional in checkpoints: no routing bias
            continue
        what = "missing from" if count == 0 else f"only {count} of {expected} elements found in"
        raise ValueError(f"weight {name} is {what} the checkpoint at {path!r}")
