"""Experiment (not CI): forms of the MLA prefill attention for one sequence of Q new tokens after C cached
ones: SDPA with the heads folded into the query axis and a boolean mask (MLABlock's SDPA form), SDPA with the
heads apart, the one latent key/value row shared by all of them (enable_gqa) and a lower-right causal bias,
and two GEMMs with fp32 scores around a masked softmax (MLABlock._gemm_attention); then MLABlock._attend
itself, over a paged cache, with its GEMM form switched on and off.

    python benchmarks/experiments/mla_prefill_sdpa.py
"""

import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import time_ms  # noqa: E402  (benchmarks/common.py)

H, L, C_DIM = 32, 576, 512
SCALE = 192**-0.5


def folded(q, keys):
    """MLABlock._attend_group's form: q [Q, H, L] -> rows (query, head), mask by position."""
    Q, total = q.shape[0], keys.shape[0]
    pos = torch.arange(total - Q, total, device=q.device)
    key_pos = torch.arange(total, device=q.device)
    mask = (key_pos[None, :] <= pos[:, None])[:, None, :].expand(Q, H, total).reshape(1, 1, Q * H, total)
    o = F.scaled_dot_product_attention(q.reshape(1, 1, Q * H, L), keys[None, None], keys[None, None, :, :C_DIM],
                                       attn_mask=mask, scale=SCALE)
    return o.view(Q, H, C_DIM)


def heads(q, keys):
    Q, total = q.shape[0], keys.shape[0]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None, None], keys[None, None, :, :C_DIM],
                                       attn_mask=causal_lower_right(Q, total), scale=SCALE, enable_gqa=True)
    return o[0].transpose(0, 1)


def two_gemms(q, keys, rows_per_chunk=4096):
    """Scores by one GEMM with fp32 output (torch.mm out_dtype), a masked softmax, values by a second GEMM;
    query rows in chunks to bound the fp32 score block."""
    Q, total = q.shape[0], keys.shape[0]
    qr = q.reshape(Q * H, L)
    key_pos = torch.arange(total, device=q.device)
    out = torch.empty(Q * H, C_DIM, device=q.device, dtype=torch.float32)
    for a in range(0, Q * H, rows_per_chunk):
        b = min(a + rows_per_chunk, Q * H)
        s = torch.mm(qr[a:b], keys.T, out_dtype=torch.float32).mul_(SCALE)
        pos = total - Q + torch.arange(a, b, device=q.device) // H
        s.masked_fill_(key_pos[None, :] > pos[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1).to(torch.bfloat16)
        out[a:b] = torch.mm(p, keys[:, :C_DIM], out_dtype=torch.float32)
    return out.view(Q, H, C_DIM).to(torch.bfloat16)


def reference(q, keys):
    return folded(q.float(), keys.float())


def main():
    for Q, C in ((512, 4096), (512, 32768), (2048, 16384), (2048, 0)):
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(Q, H, L, device="cuda", dtype=torch.bfloat16, generator=gen)
        keys = torch.randn(C + Q, L, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref = reference(q, keys)
        errs = {}
        for name, fn in (("folded", folded), ("heads", heads), ("gemms", two_gemms)):
            out = fn(q, keys).float()
            errs[name] = ((out - ref).norm() / ref.norm()).item()
        ta = time_ms(lambda: folded(q, keys), warmup=3, iters=10)
        tb = time_ms(lambda: heads(q, keys), warmup=3, iters=10)
        tc = time_ms(lambda: two_gemms(q, keys), warmup=3, iters=10)
        print(f"Q {Q:5d} cached {C:6d}: folded+mask {ta:8.3f} ms (err {errs['folded']:.1e})  heads+causal_lower_right "
              f"{tb:8.3f} ms (err {errs['heads']:.1e})  two GEMMs {tc:8.3f} ms (err {errs['gemms']:.1e})  "
              f"folded / GEMMs x{ta / tc:5.2f}")


def block_ab():
    """MLABlock._attend on 48B shapes (32 heads, latent 576) over a paged cache: GEMM form on vs off."""
    from bench_engine import KIMI48B

    from kda_serving.model import ModelConfig, mla_block
    from kda_serving.model.batch import RaggedBatch

    cfg = ModelConfig.from_dict(KIMI48B)
    block = mla_block.MLABlock(cfg, torch.bfloat16, "cuda")
    bs = 16
    for Q, C in ((512, 4096), (512, 32768), (2048, 16384), (2048, 0)):
        total = C + Q
        nblocks = -(-total // bs)
        cache = torch.randn(nblocks + 8, bs, L, device="cuda", dtype=torch.bfloat16)
        table = torch.randperm(nblocks + 8, device="cuda")[:nblocks].to(torch.int32)
        pos = torch.arange(C, total, device="cuda")
        batch = RaggedBatch(
            input_ids=torch.zeros(Q, dtype=torch.long, device="cuda"), positions=pos,
            cu_seqlens=torch.tensor([0, Q], dtype=torch.int32, device="cuda"),
            context_lens=torch.tensor([C], dtype=torch.int32, device="cuda"),
            seq_lens=torch.tensor([total], dtype=torch.int32, device="cuda"),
            state_slots=torch.zeros(1, dtype=torch.int32, device="cuda"),
            has_initial_state=torch.tensor([C > 0], device="cuda"), block_tables=table[None],
            slot_mapping=(table.long()[pos // bs] * bs + pos % bs),
            logits_indices=torch.tensor([Q - 1], device="cuda"), query_lens=[Q], kv_lens=[total])
        q = torch.randn(Q, H, L, device="cuda", dtype=torch.bfloat16)
        flat = cache.view(-1, L)
        times, outs = {}, {}
        for name, ratio in (("gemm", 2), ("sdpa", 1 << 30)):
            mla_block.GEMM_ATTENTION_KEYS_PER_QUERY = ratio
            outs[name] = block._attend(q, batch, flat, bs).float()
            times[name] = time_ms(lambda: block._attend(q, batch, flat, bs), warmup=3, iters=10)
        diff = ((outs["gemm"] - outs["sdpa"]).norm() / outs["sdpa"].norm()).item()
        print(f"MLABlock._attend Q {Q:5d} cached {C:6d}: SDPA form {times['sdpa']:8.3f} ms  GEMM form "
              f"{times['gemm']:8.3f} ms  x{times['sdpa'] / times['gemm']:5.2f}  rel diff {diff:.1e}")
    mla_block.GEMM_ATTENTION_KEYS_PER_QUERY = 2


if __name__ == "__main__":
    main()
    block_ab()
