"""The model configuration: a Hugging Face `kimi_linear` config.json, read and checked once.

Field names and defaults follow transformers' own `KimiLinearConfig` (the published Moonshot config.json uses
the same names, with the KDA settings in a `linear_attn_config` sub-dict and 1-based layer lists). Everything
the model code reads lives in one frozen dataclass; configs this implementation cannot run exactly are refused
here with a ValueError naming the field, before any weight is read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

KDA = "kda"
MLA = "mla"
DENSE = "dense"
MOE = "moe"

# transformers' KimiLinearConfig defaults (the 48B model), used where config.json leaves a field out.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 163840,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "moe_intermediate_size": 1024,
    "num_hidden_layers": 27,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "num_shared_experts": 1,
    "routed_scaling_factor": 2.446,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "num_expert_group": 1,
    "topk_group": 1,
    "num_experts_per_token": 8,
    "moe_renormalize": True,
    "hidden_act": "silu",
    "model_max_length": 1048576,
    "rms_norm_eps": 1e-5,
    "pad_token_id": 163839,
    "bos_token_id": 163584,
    "eos_token_id": 163586,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "num_experts": 256,
    "first_k_dense_replace": 1,
}

# transformers' attribute_map: alternative spellings a config.json may use for the same field.
_ALIASES = {
    "max_position_embeddings": "model_max_length",
    "norm_topk_prob": "moe_renormalize",
    "n_group": "num_expert_group",
    "num_local_experts": "num_experts",
    "num_experts_per_tok": "num_experts_per_token",
    "n_shared_experts": "num_shared_experts",
}


def _fail(field: str, message: str):
    raise ValueError(f"kimi_linear config: '{field}' {message}")


@dataclass(frozen=True)
class ModelConfig:
    """What the model code needs from config.json. Layer lists are 0-based here (config.json's are 1-based)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_model_len: int
    layer_types: tuple[str, ...]  # KDA or MLA per layer
    mlp_types: tuple[str, ...]  # DENSE or MOE per layer
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    bos_token_id: int | None
    # dense MLP
    intermediate_size: int
    # KDA
    linear_num_heads: int
    linear_head_dim: int
    conv_kernel_size: int
    # MLA
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    attention_bias: bool
    # MoE
    num_experts: int
    num_experts_per_token: int
    moe_intermediate_size: int
    num_shared_experts: int
    routed_scaling_factor: float
    num_expert_group: int
    topk_group: int
    moe_renormalize: bool

    @property
    def kda_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == KDA]

    @property
    def mla_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == MLA]

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one cached MLA token: the normalised KV latent followed by the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def kda_dim(self) -> int:
        return self.linear_num_heads * self.linear_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the short convolution: q, k and v side by side."""
        return 3 * self.kda_dim

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Parses a config.json dict the way transformers' KimiLinearConfig does; refuses what we cannot run."""
        if not isinstance(raw, dict):
            raise TypeError(f"kimi_linear config: expected a dict, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type != "kimi_linear":
            _fail("model_type", f"must be 'kimi_linear', got {model_type!r}")
        if raw.get("quantization_config"):
            _fail("quantization_config", "is set: quantized checkpoints are not supported (use the bf16 weights)")
        cfg = dict(_DEFAULTS)
        for key, value in raw.items():
            cfg[_ALIASES.get(key, key)] = value
        linear = cfg.get("linear_attn_config") or {}
        if not isinstance(linear, dict):
            _fail("linear_attn_config", f"must be a dict, got {type(linear).__name__}")

        num_layers = _positive_int(cfg, "num_hidden_layers")
        layer_types = _layer_types(cfg, linear, num_layers)
        mlp_types = _mlp_types(cfg, num_layers)
        _check_supported(cfg, linear)

        num_heads = _positive_int(cfg, "num_attention_heads")
        kv_heads = cfg["num_key_value_heads"]
        if kv_heads is not None and kv_heads != num_heads:
            _fail("num_key_value_heads", f"must equal num_attention_heads ({num_heads}) for MLA, got {kv_heads}")
        num_experts = _positive_int(cfg, "num_experts") if MOE in mlp_types else int(cfg["num_experts"] or 0)
        groups = _positive_int(cfg, "num_expert_group") if MOE in mlp_types else 1
        if not cfg.get("use_grouped_topk", True):
            groups = 1  # Moonshot's flag for plain top-k: one group holding every expert is the same choice
        topk_group = groups if groups == 1 else _positive_int(cfg, "topk_group")
        top_k = _positive_int(cfg, "num_experts_per_token") if MOE in mlp_types else 0
        if MOE in mlp_types:
            _check_routing(num_experts, groups, topk_group, top_k)

        eos = cfg["eos_token_id"]
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))
        q_lora = cfg["q_lora_rank"]
        return cls(
            vocab_size=_positive_int(cfg, "vocab_size"),
            hidden_size=_positive_int(cfg, "hidden_size"),
            num_hidden_layers=num_layers,
            rms_norm_eps=float(cfg["rms_norm_eps"]),
            tie_word_embeddings=bool(cfg["tie_word_embeddings"]),
            max_model_len=_positive_int(cfg, "model_max_length"),
            layer_types=layer_types,
            mlp_types=mlp_types,
            eos_token_ids=eos_ids,
            pad_token_id=cfg["pad_token_id"],
            bos_token_id=cfg["bos_token_id"],
            intermediate_size=_positive_int(cfg, "intermediate_size") if DENSE in mlp_types else 0,
            linear_num_heads=int(linear.get("num_heads", cfg.get("linear_num_heads", 32))),
            linear_head_dim=int(linear.get("head_dim", cfg.get("linear_head_dim", 128))),
            conv_kernel_size=int(linear.get("short_conv_kernel_size", cfg.get("linear_conv_kernel_dim", 4))),
            num_attention_heads=num_heads,
            q_lora_rank=None if q_lora is None else _positive_int(cfg, "q_lora_rank"),
            kv_lora_rank=_positive_int(cfg, "kv_lora_rank"),
            qk_nope_head_dim=_positive_int(cfg, "qk_nope_head_dim"),
            qk_rope_head_dim=_positive_int(cfg, "qk_rope_head_dim"),
            v_head_dim=_positive_int(cfg, "v_head_dim"),
            attention_bias=bool(cfg["attention_bias"]),
            num_experts=num_experts,
            num_experts_per_token=top_k,
            moe_intermediate_size=_positive_int(cfg, "moe_intermediate_size") if MOE in mlp_types else 0,
            num_shared_experts=int(cfg["num_shared_experts"] or 0),
            routed_scaling_factor=float(cfg["routed_scaling_factor"]),
            num_expert_group=groups,
            topk_group=topk_group,
            moe_renormalize=bool(cfg["moe_renormalize"]),
        )._checked()

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        """Reads `path/config.json` (or `path` itself when it names a file)."""
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ValueError(f"no config.json at {path!r}")
        with open(file, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def _checked(self) -> "ModelConfig":
        for name in ("linear_num_heads", "linear_head_dim"):
            if getattr(self, name) <= 0:
                _fail(f"linear_attn_config.{name.removeprefix('linear_')}", "must be positive")
        if self.conv_kernel_size < 2:
            _fail("linear_attn_config.short_conv_kernel_size", f"must be at least 2, got {self.conv_kernel_size}")
        if self.num_shared_experts < 0:
            _fail("num_shared_experts", f"must be >= 0, got {self.num_shared_experts}")
        return self


def _positive_int(cfg: dict, name: str) -> int:
    value = cfg.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(name, f"must be a positive integer, got {value!r}")
    return value


def _layer_types(cfg: dict, linear: dict, num_layers: int) -> tuple[str, ...]:
    """transformers' precedence: explicit layer_types, then the 1-based lists, then every 4th layer full."""
    names = {"linear_attention": KDA, "full_attention": MLA}
    explicit = cfg.get("layer_types")
    if explicit is not None:
        if len(explicit) != num_layers or any(t not in names for t in explicit):
            _fail("layer_types", f"must list {num_layers} of 'linear_attention'/'full_attention', got {explicit}")
        return tuple(names[t] for t in explicit)
    if "kda_layers" in linear and "full_attn_layers" in linear:
        types: list[str | None] = [None] * num_layers
        for key, kind in (("full_attn_layers", MLA), ("kda_layers", KDA)):
            for layer in linear[key]:
                if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= num_layers:
                    _fail(f"linear_attn_config.{key}", f"entries are 1-based layer numbers in [1, {num_layers}]")
                types[layer - 1] = kind
        missing = [i + 1 for i, t in enumerate(types) if t is None]
        if missing:
            _fail("linear_attn_config", f"layers {missing} are in neither kda_layers nor full_attn_layers")
        return tuple(types)  # type: ignore[arg-type]
    return tuple(MLA if i and i % 4 == 0 else KDA for i in range(num_layers))


def _mlp_types(cfg: dict, num_layers: int) -> tuple[str, ...]:
    explicit = cfg.get("mlp_layer_types")
    if explicit is not None:
        names = {"dense": DENSE, "sparse": MOE}
        if len(explicit) != num_layers or any(t not in names for t in explicit):
            _fail("mlp_layer_types", f"must list {num_layers} of 'dense'/'sparse', got {explicit}")
        return tuple(names[t] for t in explicit)
    first_dense = cfg.get("first_k_dense_replace", 1)
    if isinstance(first_dense, bool) or not isinstance(first_dense, int) or first_dense < 0:
        _fail("first_k_dense_replace", f"must be a non-negative integer, got {first_dense!r}")
    if cfg.get("num_experts") in (None, 0):
        return tuple(DENSE for _ in range(num_layers))
    return tuple(DENSE if i < first_dense else MOE for i in range(num_layers))


def _check_supported(cfg: dict, linear: dict) -> None:
    """Published options whose other values transformers does not implement: refuse rather than guess."""
    if cfg["hidden_act"] != "silu":
        _fail("hidden_act", f"only 'silu' is supported, got {cfg['hidden_act']!r}")
    if cfg.get("mla_use_nope", True) is not True:
        _fail("mla_use_nope", "must be true: the MLA layers here are NoPE, as published (no rotary embedding)")
    router = cfg.get("moe_router_activation_func", "sigmoid")
    if router != "sigmoid":
        _fail("moe_router_activation_func", f"only 'sigmoid' is supported, got {router!r}")
    freq = cfg.get("moe_layer_freq", 1)
    if freq != 1:
        _fail("moe_layer_freq", f"only 1 is supported (MoE in every layer after first_k_dense_replace), got {freq}")
    for key in ("gate_lower_bound", "lower_bound"):
        if linear.get(key) is not None or cfg.get(key) is not None:
            _fail(f"linear_attn_config.{key}", "is set: kimi_linear uses the softplus gate (no lower bound)")
    if cfg.get("num_nextn_predict_layers", 0) not in (0, None):
        _fail("num_nextn_predict_layers", "must be 0: multi-token-prediction layers are not supported")


def _check_routing(num_experts: int, groups: int, topk_group: int, top_k: int) -> None:
    if num_experts % groups:
        _fail("num_expert_group", f"must divide num_experts ({num_experts}), got {groups}")
    if groups > 1 and num_experts // groups < 2:
        _fail("num_expert_group", "each group needs at least 2 experts (groups are scored by their top-2)")
    if not 1 <= topk_group <= groups:
        _fail("topk_group", f"must be in [1, num_expert_group={groups}], got {topk_group}")
    if top_k > topk_group * (num_experts // groups):
        _fail("num_experts_per_token", f"{top_k} exceeds the experts in the chosen groups")
