"""Tiny random Kimi-Linear checkpoints (made with transformers' own model) and hand-built RaggedBatches."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file

from kda_serving.model import RaggedBatch, StateCheckpoints


def tiny_hf_config(**overrides):
    """A small transformers KimiLinearConfig; overrides use config.json field names."""
    from transformers import KimiLinearConfig

    kwargs = dict(
        vocab_size=211, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=24, q_lora_rank=None, qk_rope_head_dim=8,
        v_head_dim=16, qk_nope_head_dim=16, num_experts=8, num_experts_per_token=2, num_shared_experts=1,
        num_expert_group=1, topk_group=1, first_k_dense_replace=1, model_max_length=4096,
        linear_attn_config={"kda_layers": [1, 2, 3], "full_attn_layers": [4], "num_heads": 2, "head_dim": 16,
                            "short_conv_kernel_size": 4},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    kwargs.update(overrides)
    return KimiLinearConfig(**kwargs)


def randomize_(model, seed: int) -> None:
    """Weights large enough that every part of the network visibly moves the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_((1 + 15 * torch.rand(p.shape, generator=gen)).log())
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "conv1d" in name:
                p.copy_(torch.rand(p.shape, generator=gen) - 0.5)
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) * (0.8 / math.sqrt(fan_in)))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def make_hf_model(seed: int = 0, **overrides):
    """(transformers KimiLinearForCausalLM in fp32 eval mode, its config)."""
    from transformers import KimiLinearForCausalLM

    cfg = tiny_hf_config(**overrides)
    torch.manual_seed(seed)
    model = KimiLinearForCausalLM(cfg).eval()
    model.set_attn_implementation("eager")  # the plainest reference paths
    model.set_experts_implementation("eager")
    randomize_(model, seed)
    return model, cfg


def save_hf_checkpoint(model, path: str) -> str:
    model.save_pretrained(path)
    return path


def save_moonshot_checkpoint(model, cfg, path: str) -> str:
    """The same weights in the original Moonshot naming (per-expert w1/w2/w3, q/k/v_conv1d, block_sparse_moe)
    and config format (1-based lists in linear_attn_config, no layer_types), split over two shards."""
    os.makedirs(path, exist_ok=True)
    out = {}
    D = cfg.linear_num_heads * cfg.linear_head_dim
    for name, t in model.state_dict().items():
        t = t.detach().clone()
        name = name.replace("self_attn.forget_gate.", "self_attn.")
        if name.endswith("self_attn.conv1d.weight"):
            for i, part in enumerate(("q", "k", "v")):
                out[name.replace("conv1d", f"{part}_conv1d")] = t[i * D:(i + 1) * D].contiguous()
            continue
        if ".mlp." in name and (".experts." in name or ".gate." in name or ".shared_experts." in name):
            name = name.replace(".mlp.", ".block_sparse_moe.")
        if name.endswith("experts.gate_up_proj"):
            I = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[name.replace("gate_up_proj", f"{e}.w1.weight")] = t[e, :I].contiguous()
                out[name.replace("gate_up_proj", f"{e}.w3.weight")] = t[e, I:].contiguous()
            continue
        if name.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                out[name.replace("down_proj", f"{e}.w2.weight")] = t[e].contiguous()
            continue
        out[name] = t
    names = sorted(out)
    half = len(names) // 2
    save_file({n: out[n] for n in names[:half]}, os.path.join(path, "model-00001-of-00002.safetensors"))
    save_file({n: out[n] for n in names[half:]}, os.path.join(path, "model-00002-of-00002.safetensors"))
    layer_types = cfg.layer_types
    raw = {
        "model_type": "kimi_linear", "architectures": ["KimiLinearForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "kv_lora_rank": cfg.kv_lora_rank, "q_lora_rank": cfg.q_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "v_head_dim": cfg.v_head_dim, "num_experts": cfg.num_experts,
        "num_experts_per_token": cfg.num_experts_per_token, "num_shared_experts": cfg.num_shared_experts,
        "routed_scaling_factor": cfg.routed_scaling_factor, "num_expert_group": cfg.num_expert_group,
        "topk_group": cfg.topk_group, "moe_renormalize": cfg.moe_renormalize, "use_grouped_topk": True,
        "moe_router_activation_func": "sigmoid", "moe_layer_freq": 1, "mla_use_nope": True,
        "first_k_dense_replace": cfg.mlp_layer_types.count("dense"), "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "model_max_length": cfg.model_max_length,
        "hidden_act": "silu", "eos_token_id": cfg.eos_token_id, "attention_bias": cfg.attention_bias,
        "linear_attn_config": {
            "kda_layers": [i + 1 for i, t in enumerate(layer_types) if t == "linear_attention"],
            "full_attn_layers": [i + 1 for i, t in enumerate(layer_types) if t == "full_attention"],
            "num_heads": cfg.linear_num_heads, "head_dim": cfg.linear_head_dim,
            "short_conv_kernel_size": cfg.linear_conv_kernel_dim,
        },
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    return path


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """transformers' logits [len(ids), vocab] for one sequence, fp32, no cache."""
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0].float()


@dataclass
class Sequence:
    """A test request: its tokens, where its state lives, how much of it the caches already hold."""

    tokens: list[int]
    slot: int
    blocks: list[int]
    done: int = 0  # tokens already run through the model
    logits: list[torch.Tensor] = field(default_factory=list)


def make_batch(chunks: list[tuple[Sequence, int]], block_size: int, *, all_logits: bool = True,
               checkpoints: StateCheckpoints | None = None, max_blocks: int | None = None) -> RaggedBatch:
    """A RaggedBatch running the next `n` tokens of each (sequence, n). With all_logits, logits_indices names
    every new token (so the model returns [T, vocab]); otherwise the last new token of each sequence."""
    ids, positions, cu, ctx, slot_map = [], [], [0], [], []
    width = max_blocks or max(len(s.blocks) for s, _ in chunks)
    tables = torch.full((len(chunks), width), -1, dtype=torch.int32)
    for i, (seq, n) in enumerate(chunks):
        pos = list(range(seq.done, seq.done + n))
        ids += seq.tokens[seq.done:seq.done + n]
        positions += pos
        cu.append(cu[-1] + n)
        ctx.append(seq.done)
        slot_map += [seq.blocks[p // block_size] * block_size + p % block_size for p in pos]
        tables[i, :len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.int32)
    query_lens = [n for _, n in chunks]
    cu_t = torch.tensor(cu, dtype=torch.int32)
    ctx_t = torch.tensor(ctx, dtype=torch.int32)
    seq_lens = ctx_t + torch.tensor(query_lens, dtype=torch.int32)
    logits_indices = torch.arange(cu[-1]) if all_logits else (cu_t[1:] - 1).long()
    return RaggedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        cu_seqlens=cu_t,
        context_lens=ctx_t,
        seq_lens=seq_lens,
        state_slots=torch.tensor([s.slot for s, _ in chunks], dtype=torch.int32),
        has_initial_state=ctx_t > 0,
        block_tables=tables,
        slot_mapping=torch.tensor(slot_map, dtype=torch.long),
        logits_indices=logits_indices,
        query_lens=query_lens,
        kv_lens=seq_lens.tolist(),
        is_decode=all(n == 1 and s.done > 0 for s, n in chunks),
        checkpoints=checkpoints,
    )


def run_step(model, caches, chunks: list[tuple[Sequence, int]], block_size: int, **kw) -> torch.Tensor:
    """One forward over the chunks; appends each sequence's new-token logits to seq.logits and advances it."""
    batch = make_batch(chunks, block_size, **kw).to(model.device)
    logits = model(batch, caches).cpu()
    start = 0
    for seq, n in chunks:
        seq.logits.append(logits[start:start + n])
        seq.done += n
        start += n
    return logits


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def clone_caches(caches):
    """A copy of a ModelCaches, every pool cloned."""
    return type(caches)(*[[t.clone() for t in pools] for pools in (caches.recurrent, caches.conv, caches.kv)])


def logit_error(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |ours - ref| / max |ref|, ||ours - ref|| / ||ref||); inf if ours has a NaN/Inf."""
    if not torch.isfinite(ours).all():
        return math.inf, math.inf
    diff = (ours.double() - ref.double())
    return (diff.abs().max() / ref.abs().max()).item(), (diff.norm() / ref.double().norm()).item()


def save_dense_checkpoint(path: str, seed: int) -> str:
    """A dense random model saved at path: 3 KDA layers of head size 128 and one MLA layer, no MoE (whose expert
    choice is discontinuous: a near-tie flips with any rounding and moves a token's logits by O(1)), so that two
    runs' logits can be held to a rounding-level distance."""
    hf, _ = make_hf_model(
        seed=seed, hidden_size=256, q_lora_rank=64, first_k_dense_replace=4,
        linear_attn_config={"kda_layers": [1, 2, 4], "full_attn_layers": [3], "num_heads": 2, "head_dim": 128,
                            "short_conv_kernel_size": 4},
    )
    return save_hf_checkpoint(hf, path)


def run_two_prompts(model, state_dtype=torch.float32, block_size: int = 16) -> list[torch.Tensor]:
    """A packed prefill of two random prompts, then 5 decode steps of both; each sequence's logits rows."""
    caches = model.allocate_caches(4, 16, block_size, state_dtype=state_dtype)
    gen = torch.Generator().manual_seed(0)
    a = Sequence(torch.randint(3, model.config.vocab_size, (60,), generator=gen).tolist(), slot=3, blocks=[4, 0, 7, 2])
    b = Sequence(torch.randint(3, model.config.vocab_size, (45,), generator=gen).tolist(), slot=1, blocks=[9, 5, 11])
    run_step(model, caches, [(a, 50), (b, 40)], block_size)
    for _ in range(5):
        run_step(model, caches, [(a, 1), (b, 1)], block_size)
    return [torch.cat(s.logits) for s in (a, b)]


def per_token_rel(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> list[float]:
    """Per-token relative error of each sequence's logits rows, flattened over the sequences."""
    return [((x.double() - y.double()).norm() / y.double().norm()).item()
            for o, r in zip(ours, ref) for x, y in zip(o, r.to(o.device))]


def paged_kernel_model(seed: int = 0, device: str = "cuda"):
    """A random bf16 KimiLinearModel whose MLA layer is of sizes our CUDA kernels take (16 heads, latent
    512 + 64 for the paged decode kernel; heads of 192 and values of 128 for the flash kernel), small
    elsewhere: a KDA layer of 2 heads of 128, then the MLA layer, dense MLPs (the MoE's discontinuous expert
    choice would turn rounding into O(1) logit changes). Weights from model/random_init.py, N(0, 1/fan_in)."""
    from kda_serving.model import KimiLinearModel, ModelConfig
    from kda_serving.model.random_init import fill_random_

    cfg = ModelConfig.from_dict({
        "model_type": "kimi_linear", "vocab_size": 256, "hidden_size": 256, "intermediate_size": 256,
        "moe_intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 16,
        "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
        "v_head_dim": 128, "num_experts": 0, "num_experts_per_token": 1, "num_shared_experts": 0,
        "first_k_dense_replace": 2, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
        "model_max_length": 8192, "eos_token_id": 1, "mla_use_nope": True, "head_dim": 48,
        "linear_attn_config": {"kda_layers": [1], "full_attn_layers": [2], "num_heads": 2, "head_dim": 128,
                               "short_conv_kernel_size": 4},
    })
    return fill_random_(KimiLinearModel(cfg, dtype=torch.bfloat16, device=device), seed).eval()
