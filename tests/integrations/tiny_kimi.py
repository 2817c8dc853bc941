"""A tiny all-KDA `kimi_linear` checkpoint for integration tests, and transformers' greedy tokens for it.

Two KDA layers (H=2 heads of D=32), dense MLPs, vocab 512, random weights scaled so that greedy decoding is
decisive (no near-ties between fp32 implementations). All-KDA because vLLM's MLA layer does not run on CPU.
Saved in the original Kimi-Linear checkpoint layout (q/k/v_conv1d, f_a/f_b_proj, A_log [1, 1, H, 1], dense
layers under `mlp.`), which both transformers' KimiLinearForCausalLM and vLLM load.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

KDA_HEADS = 2
KDA_HEAD_DIM = 32
VOCAB = 512


def build_tiny_kimi(path: Path, seed: int = 1) -> Path:
    """Writes config.json + model.safetensors under `path` and returns it."""
    from safetensors.torch import load_file, save_file
    from transformers import KimiLinearConfig, KimiLinearForCausalLM

    linear = {"kda_layers": [1, 2], "full_attn_layers": [], "num_heads": KDA_HEADS, "head_dim": KDA_HEAD_DIM,
              "short_conv_kernel_size": 4}
    config = KimiLinearConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, linear_attn_config=linear, layer_types=["linear_attention"] * 2,
        mlp_layer_types=["dense"] * 2, first_k_dense_replace=2, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_position_embeddings=4096,
    )
    torch.manual_seed(seed)
    model = KimiLinearForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.0, 1.5, generator=gen))
            elif name.endswith("dt_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "conv1d" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    path = Path(path)
    model.save_pretrained(path)
    # Dense MLPs live under `mlp.` in Kimi-Linear checkpoints (vLLM's loader expects that name).
    weights = path / "model.safetensors"
    tensors = {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    return path


def transformers_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens of transformers' KimiLinearForCausalLM (full recompute each step, fp32), computed in a
    subprocess that hides flash-linear-attention: transformers would otherwise call fla's Triton kernels,
    which do not run on CPU, instead of its PyTorch implementation."""
    proc = subprocess.run(
        [sys.executable, __file__, str(path), json.dumps(prompts), str(max_new_tokens)],
        capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"transformers reference failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _transformers_greedy_here(path: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from transformers import KimiLinearForCausalLM

    model = KimiLinearForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            for _ in range(max_new_tokens):
                nxt = model(ids, use_cache=False).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            results.append(ids[0, len(prompt):].tolist())
    return results


if __name__ == "__main__":
    sys.modules["fla"] = None  # an import of fla now fails: transformers falls back to its PyTorch KDA
    print(json.dumps(_transformers_greedy_here(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]))))
