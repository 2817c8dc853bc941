"""MLA layers in steps with prompt tokens: MLABlock.forward on the kernels (the expanded form on our attention
kernel for sequences of EXPANDED_MIN_QUERIES+ new tokens, the paged kernel for the other rows) against the same
block with FlashAttention-2 in place of our attention kernel ("flash2", values padded to the key size) and on
the torch-ops path both replace (the absorbed form: gathered latents, SDPA or two GEMMs around a masked
softmax), in the same run, on Kimi-Linear-48B's MLA layer (hidden 2304, 32 heads, latent 512 + 64, bf16,
16-token blocks shuffled over the cache, random weights).

Each case is one step: sequences of Q new tokens after C cached ones (and one mixed step). Times are GPU time
per forward with the host queued ahead (as between a model's layers: a sleep kernel holds the GPU while the
host queues the calls), and the wall time of a call timed alone. The floor is the block's FLOPs (projections,
then each sequence's attention in the cheaper form: expanded, one GEMM per key and heads of 192 + 128, or
absorbed, heads of 576 + 512) at the bf16 GEMM rate measured at the start of the run, or its bytes (weights,
cached rows) at the measured copy rate, whichever is longer.

    python benchmarks/bench_mla_prefill.py [--out-dir DIR]

Prints a table, writes <out-dir>/<card>-mla_prefill.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py

from common import (  # noqa: E402
    RESULTS, card_name, copy_rate_bytes_per_s, environment, gemm_rate_flops_per_s, gpu_ms, time_ms, write_json,
)

from kda_serving.model import mla_block, mla_prefill  # noqa: E402
from kda_serving.model.batch import RaggedBatch  # noqa: E402
from kda_serving.model.config import ModelConfig  # noqa: E402
from kda_serving.model.mla_block import MLABlock  # noqa: E402
from kda_serving.ops import indices_checked_by_caller  # noqa: E402

HIDDEN, HEADS, NOPE, ROPE, V, LORA, BLOCK = 2304, 32, 128, 64, 128, 512, 16
LATENT = LORA + ROPE
CASES = [  # (name, [(new tokens, cached tokens) per sequence])
    ("512 new", [(512, 0)]),
    ("8192 new", [(8192, 0)]),
    ("8 x 1024 new", [(1024, 0)] * 8),
    ("128 after 4K", [(128, 4096)]),
    ("512 after 4K", [(512, 4096)]),
    ("2048 after 4K", [(2048, 4096)]),
    ("128 after 32K", [(128, 32768)]),
    ("512 after 32K", [(512, 32768)]),
    ("2048 after 32K", [(2048, 32768)]),
    ("8 x 1024 new + 32 decodes at 4K", [(1, 4096)] * 32 + [(1024, 0)] * 8),
]
MLA_CONFIG = {  # Kimi-Linear-48B's MLA layer; the rest minimal (only the block is built)
    "model_type": "kimi_linear", "vocab_size": 64, "hidden_size": HIDDEN, "intermediate_size": 64,
    "moe_intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
    "kv_lora_rank": LORA, "q_lora_rank": None, "qk_rope_head_dim": ROPE, "qk_nope_head_dim": NOPE,
    "v_head_dim": V, "num_experts": 0, "num_experts_per_token": 1, "num_shared_experts": 0,
    "first_k_dense_replace": 1, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
    "model_max_length": 1 << 20, "eos_token_id": 1, "mla_use_nope": True,
    "linear_attn_config": {"kda_layers": [], "full_attn_layers": [1], "num_heads": 1, "head_dim": 128,
                           "short_conv_kernel_size": 4},
}


def make_step(seqs: list[tuple[int, int]], gen: torch.Generator) -> tuple[RaggedBatch, torch.Tensor]:
    """The batch and a cache of random latents, each sequence's blocks a random choice over the cache."""
    widths = [-(-(q + c) // BLOCK) for q, c in seqs]
    width, N = max(widths), len(seqs)
    num_blocks = sum(widths) + 1
    cache = torch.randn(num_blocks, BLOCK, LATENT, generator=gen, device="cuda").to(torch.bfloat16)
    perm = torch.randperm(num_blocks, generator=gen, device="cuda").to(torch.int32)
    tables = torch.full((N, width), -1, dtype=torch.int32, device="cuda")
    positions, slots, at = [], [], 0
    for n, ((q, c), w) in enumerate(zip(seqs, widths)):
        tables[n, :w] = perm[at : at + w]
        at += w
        pos = torch.arange(c, c + q, device="cuda")
        positions.append(pos)
        slots.append(tables[n, pos // BLOCK].long() * BLOCK + pos % BLOCK)
    q_lens = [q for q, _ in seqs]
    kv_lens = [q + c for q, c in seqs]
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    seq_lens = torch.tensor(kv_lens, dtype=torch.int32, device="cuda")
    batch = RaggedBatch(
        input_ids=torch.zeros(int(cu[-1]), dtype=torch.long, device="cuda"), positions=torch.cat(positions),
        cu_seqlens=cu, context_lens=seq_lens - torch.tensor(q_lens, dtype=torch.int32, device="cuda"),
        seq_lens=seq_lens, state_slots=torch.arange(N, dtype=torch.int32, device="cuda"),
        has_initial_state=torch.tensor([c > 0 for _, c in seqs], device="cuda"), block_tables=tables,
        slot_mapping=torch.cat(slots), logits_indices=(cu[1:] - 1).long(), query_lens=q_lens, kv_lens=kv_lens)
    return batch, cache


def floor_ms(seqs: list[tuple[int, int]], gemm_rate: float, copy_rate: float) -> float:
    """The step's FLOPs at the GEMM rate or its bytes at the copy rate, whichever is longer; each sequence's
    attention in the cheaper of the two forms (expanded: every key once through kv_b_proj, then heads of
    192 + 128; absorbed: queries through W_uk and outputs through W_uv, heads of 576 + 512)."""
    T = sum(q for q, _ in seqs)
    keys = sum(q + c for q, c in seqs)
    flops = 2 * T * HIDDEN * (HEADS * (NOPE + ROPE) + LATENT + HEADS * V)  # q, kv_a and o projections
    for q, c in seqs:
        pairs = q * (c + (q + 1) / 2)  # causal (query, key) pairs
        expanded = 2 * (q + c) * LORA * HEADS * (NOPE + V) + 2 * HEADS * (NOPE + ROPE + V) * pairs
        absorbed = 2 * q * HEADS * LORA * (NOPE + V) + 2 * HEADS * (LATENT + LORA) * pairs
        flops += min(expanded, absorbed)
    weight_bytes = 2 * HIDDEN * (HEADS * (NOPE + ROPE) + LATENT + HEADS * V) + 2 * LORA * HEADS * (NOPE + V)
    data_bytes = weight_bytes + 2 * LATENT * keys + 2 * 2 * T * HIDDEN
    return max(flops / gemm_rate, data_bytes / copy_rate) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()
    copy_rate, gemm_rate = copy_rate_bytes_per_s(), gemm_rate_flops_per_s()
    print(f"copy rate {copy_rate / 1e12:.2f} TB/s (read + write), bf16 GEMM {gemm_rate / 1e12:.0f} TFLOP/s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    block = MLABlock(ModelConfig.from_dict(MLA_CONFIG), torch.bfloat16, "cuda")
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device="cuda") * (1.0 if p.dim() == 1 else p.shape[-1] ** -0.5))
    rows = []
    for name, seqs in CASES:
        batch, cache = make_step(seqs, gen)
        x = torch.randn(batch.num_tokens, HIDDEN, generator=gen, device="cuda").to(torch.bfloat16)
        result, outs = {}, {}
        # ours: the expanded form on our attention kernel; flash2: the same on FlashAttention-2 (values padded
        # to 192), the kernel it replaced; torch: the absorbed torch-ops path before either
        for form, on_kernels, own in (("ours", True, True), ("flash2", True, False), ("torch", False, False)):
            mla_block.PREFILL_ON_KERNELS, mla_prefill.OWN_KERNEL = on_kernels, own
            with torch.inference_mode(), indices_checked_by_caller():  # as the engine runs it
                work = cache.clone()
                outs[form] = block(x, batch, work).float()
                result[f"{form}_gpu_ms"] = gpu_ms(lambda: block(x, batch, work))
                result[f"{form}_wall_ms"] = time_ms(lambda: block(x, batch, work), warmup=2, iters=5)
        mla_block.PREFILL_ON_KERNELS, mla_prefill.OWN_KERNEL = True, True
        floor = floor_ms(seqs, gemm_rate, copy_rate)
        diff = ((outs["ours"] - outs["torch"]).norm() / outs["torch"].norm()).item()
        diff2 = ((outs["ours"] - outs["flash2"]).norm() / outs["flash2"].norm()).item()
        row = dict(case=name, seqs=seqs, tokens=batch.num_tokens, **result, floor_ms=floor,
                   floor_over_ours=floor / result["ours_gpu_ms"],
                   speedup=result["torch_gpu_ms"] / result["ours_gpu_ms"],
                   speedup_vs_flash2=result["flash2_gpu_ms"] / result["ours_gpu_ms"], rel_diff_vs_torch=diff,
                   rel_diff_vs_flash2=diff2)
        rows.append(row)
        print(f"{name:>32}: ours {row['ours_gpu_ms']:7.3f} ms (wall {row['ours_wall_ms']:6.3f})  flash2 "
              f"{row['flash2_gpu_ms']:7.3f}  torch {row['torch_gpu_ms']:7.3f} ms (wall {row['torch_wall_ms']:6.3f})"
              f"  floor {floor:6.3f} ms ({100 * row['floor_over_ours']:4.1f}%)  x{row['speedup_vs_flash2']:4.2f} "
              f"vs flash2, x{row['speedup']:5.1f} vs torch  rel diff {diff:.1e} / {diff2:.1e}", flush=True)
    write_json(Path(args.out_dir) / f"{card_name()}-mla_prefill.json",
               {"benchmark": "mla_prefill", "environment": environment(), "copy_rate_bytes_per_s": copy_rate,
                "gemm_rate_flops_per_s": gemm_rate, "expanded_min_queries": mla_block.EXPANDED_MIN_QUERIES,
                "heads": HEADS, "latent": LATENT, "block_size": BLOCK, "cases": rows})


if __name__ == "__main__":
    main()
