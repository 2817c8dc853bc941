"""Paged MLA decode attention: our kernel (ops.mla_decode, csrc/mla) against the path it replaces in decode
steps, MLABlock._attend (gather every sequence's latent rows into a padded copy, then SDPA with a mask),
in the same run, on Kimi-Linear-48B's MLA sizes (32 heads, latent rows of 512 + 64, bf16, 16-token blocks
shuffled over the cache).

Both are timed by CUDA-graph replay (the engine replays its decode steps). The floor is the cached rows read
(N x context x 1152 bytes) at the copy rate measured at the start of the run. A third column times our kernel
as the engine's decode graphs call it: planned for a model length of ANY_LENGTH_KEYS keys with block tables of
that width (one graph per batch size serves every length: engine/cuda_graphs.py), so a short context runs on
more CTAs than its own plan gives it, most of them without keys.

    python benchmarks/bench_mla_decode.py [--out-dir DIR]

Prints a table, writes <out-dir>/<card>-mla_decode.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py

from common import (  # noqa: E402
    RESULTS, card_name, copy_rate_bytes_per_s, environment, graph_replay_us, write_json,
)

from kda_serving.model.batch import RaggedBatch  # noqa: E402
from kda_serving.model.config import ModelConfig  # noqa: E402
from kda_serving.model.mla_block import MLABlock  # noqa: E402
from kda_serving.ops import mla_decode  # noqa: E402

HEADS, LATENT, VALUE, BLOCK = 32, 576, 512, 16
CASES = [(1, 512), (1, 4096), (8, 1024), (8, 16384), (64, 1024), (64, 4096), (16, 32768)]  # (sequences, context)
ANY_LENGTH_KEYS = 1 << 17
MLA_CONFIG = {  # Kimi-Linear-48B's attention sizes; the rest is minimal (only the block's _attend is used)
    "model_type": "kimi_linear", "vocab_size": 64, "hidden_size": 256, "intermediate_size": 64,
    "moe_intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
    "kv_lora_rank": VALUE, "q_lora_rank": None, "qk_rope_head_dim": LATENT - VALUE, "qk_nope_head_dim": 128,
    "v_head_dim": 128, "num_experts": 0, "num_experts_per_token": 1, "num_shared_experts": 0,
    "first_k_dense_replace": 1, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
    "model_max_length": 1 << 20, "eos_token_id": 1, "mla_use_nope": True,
    "linear_attn_config": {"kda_layers": [], "full_attn_layers": [1], "num_heads": 1, "head_dim": 128,
                           "short_conv_kernel_size": 4},
}


def case(block: MLABlock, N: int, context: int, copy_rate: float, gen: torch.Generator) -> dict:
    blocks_per_seq = -(-context // BLOCK)
    num_blocks = N * blocks_per_seq + 1
    cache = torch.randn(num_blocks, BLOCK, LATENT, generator=gen, device="cuda").to(torch.bfloat16)
    tables = torch.randperm(num_blocks, generator=gen, device="cuda")[: N * blocks_per_seq]
    tables = tables.view(N, blocks_per_seq).to(torch.int32)
    seq_lens = torch.full((N,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(N, HEADS, LATENT, generator=gen, device="cuda").to(torch.bfloat16)
    batch = RaggedBatch(
        input_ids=torch.zeros(N, dtype=torch.long, device="cuda"),
        positions=torch.full((N,), context - 1, dtype=torch.long, device="cuda"),
        cu_seqlens=torch.arange(N + 1, dtype=torch.int32, device="cuda"), context_lens=seq_lens - 1,
        seq_lens=seq_lens, state_slots=torch.arange(N, dtype=torch.int32, device="cuda"),
        has_initial_state=seq_lens > 1, block_tables=tables, slot_mapping=torch.zeros(N, dtype=torch.long,
                                                                                      device="cuda"),
        logits_indices=torch.arange(N, device="cuda"), query_lens=[1] * N, kv_lens=[context] * N, is_decode=True)
    flat = cache.view(-1, LATENT)

    def ours():
        return mla_decode(q, cache, tables, seq_lens, scale=block.scale, max_seq_len=context, value_dim=VALUE)

    wide = torch.full((N, ANY_LENGTH_KEYS // BLOCK), -1, dtype=torch.int32, device="cuda")
    wide[:, :blocks_per_seq] = tables

    def ours_any_length():
        return mla_decode(q, cache, wide, seq_lens, scale=block.scale, max_seq_len=ANY_LENGTH_KEYS, value_dim=VALUE)

    def gather_sdpa():
        return block._attend(q, batch, flat, BLOCK)

    with torch.inference_mode():
        diff = (ours().float() - gather_sdpa().float()).norm() / gather_sdpa().float().norm()
        diff_any = (ours_any_length().float() - gather_sdpa().float()).norm() / gather_sdpa().float().norm()
        ours_ms, base_ms = graph_replay_us(ours, iters=30) / 1e3, graph_replay_us(gather_sdpa, iters=30) / 1e3
        any_ms = graph_replay_us(ours_any_length, iters=30) / 1e3
    floor_ms = N * context * LATENT * 2 / copy_rate * 1e3
    row = dict(seqs=N, context=context, ours_us=ours_ms * 1e3, ours_any_length_us=any_ms * 1e3,
               gather_sdpa_us=base_ms * 1e3, floor_us=floor_ms * 1e3, floor_over_ours=floor_ms / ours_ms,
               speedup=base_ms / ours_ms, rel_diff_vs_gather=float(diff), any_length_rel_diff_vs_gather=float(diff_any))
    print(f"N {N:3d} context {context:6d}: ours {row['ours_us']:9.1f} us  any-length plan {any_ms * 1e3:9.1f} us"
          f"  gather+SDPA {row['gather_sdpa_us']:9.1f} us  floor {row['floor_us']:8.1f} us"
          f" ({100 * row['floor_over_ours']:5.1f}%)  x{row['speedup']:.1f}  rel diff {diff:.1e} / {diff_any:.1e}",
          flush=True)
    del cache, tables, q, batch, flat, wide
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()
    copy_rate = copy_rate_bytes_per_s()
    print(f"copy rate {copy_rate / 1e12:.2f} TB/s (read + write)")
    block = MLABlock(ModelConfig.from_dict(MLA_CONFIG), torch.bfloat16, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = [case(block, N, context, copy_rate, gen) for N, context in CASES]
    write_json(Path(args.out_dir) / f"{card_name()}-mla_decode.json",
               {"benchmark": "mla_decode", "environment": environment(), "copy_rate_bytes_per_s": copy_rate,
                "heads": HEADS, "latent": LATENT, "block_size": BLOCK, "cases": rows})


if __name__ == "__main__":
    main()
