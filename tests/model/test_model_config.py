"""config.json parsing (agrees with transformers' KimiLinearConfig), refusals, loader and cache errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from kimi_testing import make_hf_model, save_hf_checkpoint, tiny_hf_config
from safetensors.torch import load_file, save_file

from kda_serving.model import ModelConfig, load_model
from kda_serving.model.config import DENSE, KDA, MLA, MOE

REFERENCE_48B = "/work/shared/reference/kimi-linear-48b-a3b.config.json"
CONFIG_48B_4L = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "kimi-linear-48b-4layer.json")


def _raw(**overrides) -> dict:
    raw = tiny_hf_config().to_dict()
    raw.pop("layer_types")  # use the 1-based lists of linear_attn_config, as a Moonshot config.json does
    raw.pop("mlp_layer_types")
    raw.update(overrides)
    return raw


@pytest.mark.skipif(not os.path.exists(REFERENCE_48B), reason="reference config not present")
def test_published_48b_config_matches_transformers():
    from transformers import KimiLinearConfig

    with open(REFERENCE_48B) as f:
        raw = json.load(f)
    ours = ModelConfig.from_dict(raw)
    theirs = KimiLinearConfig.from_dict(raw)
    assert ours.layer_types == tuple(KDA if t == "linear_attention" else MLA for t in theirs.layer_types)
    assert ours.mlp_types == tuple(DENSE if t == "dense" else MOE for t in theirs.mlp_layer_types)
    assert ours.kda_layers == [i - 1 for i in raw["linear_attn_config"]["kda_layers"]]
    assert (ours.linear_num_heads, ours.linear_head_dim, ours.conv_kernel_size) == (32, 128, 4)
    assert (ours.num_experts, ours.num_experts_per_token, ours.num_expert_group) == (256, 8, 1)
    assert ours.latent_dim == 512 + 64 and ours.qk_head_dim == 192 and ours.max_model_len == 1048576


@pytest.mark.parametrize("overrides", [
    dict(first_k_dense_replace=2),
    dict(linear_attn_config={"kda_layers": [2, 4], "full_attn_layers": [1, 3], "num_heads": 2, "head_dim": 16}),
    dict(layer_types=["full_attention", "linear_attention", "linear_attention", "linear_attention"]),
    dict(linear_attn_config={"num_heads": 2, "head_dim": 16}),  # no lists: transformers' every-4th default
], ids=["first-k-dense", "lists", "explicit-layer-types", "default-layout"])
def test_layouts_match_transformers(overrides):
    from transformers import KimiLinearConfig

    raw = _raw(**overrides)
    theirs = KimiLinearConfig.from_dict(dict(raw))
    ours = ModelConfig.from_dict(raw)
    assert ours.layer_types == tuple(KDA if t == "linear_attention" else MLA for t in theirs.layer_types)
    assert ours.mlp_types == tuple(DENSE if t == "dense" else MOE for t in theirs.mlp_layer_types)


@pytest.mark.parametrize("overrides, field", [
    (dict(model_type="deepseek_v3"), "model_type"),
    (dict(mla_use_nope=False), "mla_use_nope"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(moe_router_activation_func="softmax"), "moe_router_activation_func"),
    (dict(moe_layer_freq=2), "moe_layer_freq"),
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(quantization_config={"quant_method": "compressed-tensors"}), "quantization_config"),
    (dict(num_nextn_predict_layers=1), "num_nextn_predict_layers"),
    (dict(num_expert_group=3), "num_expert_group"),
    (dict(num_expert_group=2, topk_group=3), "topk_group"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(linear_attn_config={"kda_layers": [1, 2], "full_attn_layers": [4], "num_heads": 2, "head_dim": 16}),
     "linear_attn_config"),
    (dict(linear_attn_config={"kda_layers": [1, 2, 3], "full_attn_layers": [5], "num_heads": 2, "head_dim": 16}),
     "full_attn_layers"),
    (dict(linear_attn_config={"kda_layers": [1, 2, 3], "full_attn_layers": [4], "num_heads": 2, "head_dim": 16,
                              "gate_lower_bound": -5.0}), "gate_lower_bound"),
    (dict(layer_types=["linear_attention"] * 3), "layer_types"),
])
def test_unsupported_configs_are_refused(overrides, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict(_raw(**overrides))


def test_config_must_be_a_dict():
    with pytest.raises(TypeError):
        ModelConfig.from_dict("config.json")


@pytest.fixture
def checkpoint(tmp_path):
    hf, _ = make_hf_model(seed=3)
    return save_hf_checkpoint(hf, str(tmp_path / "ckpt"))


def _edit_weights(path: str, edit) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_missing_weight_is_named(checkpoint):
    _edit_weights(checkpoint, lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"layers\.2\.self_attn\.in_proj"):
        load_model(checkpoint, progress=False)


def test_unknown_weight_is_named(checkpoint):
    _edit_weights(checkpoint, lambda t: t.update({"model.layers.0.self_attn.surprise": torch.zeros(3)}))
    with pytest.raises(ValueError, match="surprise"):
        load_model(checkpoint, progress=False)


def test_wrong_shape_is_named(checkpoint):
    _edit_weights(checkpoint, lambda t: t.update({"model.norm.weight": torch.ones(7)}))
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_model(checkpoint, progress=False)


def test_routing_bias_is_optional(checkpoint):
    _edit_weights(checkpoint, lambda t: [t.pop(k) for k in list(t) if k.endswith("e_score_correction_bias")])
    model = load_model(checkpoint, progress=False)
    assert torch.equal(model.layers[1].mlp.e_score_correction_bias, torch.zeros(8))


def test_bad_arguments(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        load_model(checkpoint, dtype=torch.float16, progress=False)
    with pytest.raises(ValueError, match="dtype"):
        load_model(checkpoint, dtype="half", progress=False)
    with pytest.raises(TypeError, match="path"):
        load_model(42, progress=False)
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path / "nowhere"), progress=False)
    empty = tmp_path / "no-weights"
    empty.mkdir()
    shutil.copy(os.path.join(checkpoint, "config.json"), empty / "config.json")
    with pytest.raises(ValueError, match="safetensors"):
        load_model(str(empty), progress=False)


def test_bf16_load_and_sizes(checkpoint):
    model = load_model(checkpoint, dtype="bfloat16", progress=False)
    assert model.embed_tokens.dtype == torch.bfloat16
    assert model.layers[0].self_attn.A_log.dtype == torch.float32  # gate parameters stay fp32 for the op
    caches = model.allocate_caches(num_state_slots=5, num_kv_blocks=7, block_size=16)
    assert [tuple(p.shape) for p in caches.recurrent] == [(5, 2, 16, 16)] * 3
    assert all(p.dtype == torch.float32 for p in caches.recurrent)
    assert [tuple(p.shape) for p in caches.conv] == [(5, 3, 96)] * 3
    assert [tuple(p.shape) for p in caches.kv] == [(7, 16, 32)]
    per_slot = sum(p[0].numel() * p.element_size() for p in (*caches.recurrent, *caches.conv))
    assert model.state_slot_bytes() == per_slot
    assert model.kv_block_bytes(16) == sum(p[0].numel() * p.element_size() for p in caches.kv)
    assert model.max_model_len == 4096


def test_allocate_caches_rejects_bad_sizes(checkpoint):
    model = load_model(checkpoint, progress=False)
    with pytest.raises(ValueError, match="num_state_slots"):
        model.allocate_caches(0, 4, 16)
    with pytest.raises(TypeError, match="block_size"):
        model.allocate_caches(2, 4, 16.0)


def test_copy_states(checkpoint):
    model = load_model(checkpoint, progress=False)
    caches = model.allocate_caches(6, 2, 16)
    for i, pool in enumerate((*caches.recurrent, *caches.conv)):
        pool.copy_(torch.randn(pool.shape, generator=torch.Generator().manual_seed(i)))
    before = [p.clone() for p in (*caches.recurrent, *caches.conv)]
    caches.copy_states([1, 4], [3, 0])
    for old, new in zip(before, (*caches.recurrent, *caches.conv)):
        assert torch.equal(new[3], old[1]) and torch.equal(new[0], old[4])
        for s in (1, 2, 4, 5):
            assert torch.equal(new[s], old[s])
    with pytest.raises(ValueError, match="dst_slots"):
        caches.copy_states([1], [6])
    with pytest.raises(ValueError, match="src_slots"):
        caches.copy_states([1, 2], [3])
    with pytest.raises(ValueError, match="distinct"):
        caches.copy_states([1, 2], [3, 3])
    with pytest.raises(TypeError, match="src_slots"):
        caches.copy_states([1.0], [3])


def test_tied_head_without_stored_lm_head_shares_embeddings(tmp_path):
    hf, _ = make_hf_model(seed=4, tie_word_embeddings=True)
    path = save_hf_checkpoint(hf, str(tmp_path / "tied"))
    _edit_weights(path, lambda t: t.pop("lm_head.weight", None))
    model = load_model(path, progress=False)
    assert model.lm_head is model.embed_tokens
    assert torch.equal(model.embed_tokens, hf.model.embed_tokens.weight)


def test_cuda_device_without_cuda(checkpoint):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="device"):
        load_model(checkpoint, device="cuda", progress=False)


def test_random_model_of_a_config(tmp_path):
    """random_model builds the model of any config.json on the device, with finite logits, no checkpoint."""
    from kda_serving.model.random_model import random_model

    raw = _raw(num_hidden_layers=4)
    model = random_model(raw, seed=1)
    again = random_model(raw, seed=1)
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b) and torch.isfinite(a).all(), name
    assert (model.layers[0].self_attn.A_log.exp() >= 1).all()
    caches = model.allocate_caches(2, 4, 16)
    from kimi_testing import Sequence, run_step

    logits = run_step(model, caches, [(Sequence(list(range(3, 40)), slot=1, blocks=[2, 0, 3]), 37)], 16)
    assert logits.shape == (37, 211) and torch.isfinite(logits).all()


def test_48b_four_layer_config():
    cfg = ModelConfig.from_file(CONFIG_48B_4L)
    assert cfg.layer_types == (KDA, KDA, KDA, MLA) and cfg.mlp_types == (DENSE, MOE, MOE, MOE)
    assert cfg.num_experts == 256 and cfg.linear_head_dim == 128 and cfg.hidden_size == 2304
