"""Our Kimi-Linear forward (CPU, fp32) against transformers' KimiLinearForCausalLM on the same weights.

Every test compares the logits of *every* new token (logits_indices = all tokens) with transformers' logits of
the full sequence run in one go without a cache, so state carried across steps (KDA recurrent + conv states in
the slot pools, MLA latents in the paged cache) is checked at every position. The tolerance, 1e-4 of the
largest |logit|, is the size of fp32 rounding through 4-5 layers (transformers' own fp32 run differs from its
fp64 run by ~3e-5 on these weights); a wrong gate, norm, routing or mask moves logits by 1e-2 or more.
"""

from __future__ import annotations

import pytest
import torch
from kimi_testing import (
    Sequence,
    make_batch,
    hf_logits,
    logit_error,
    make_hf_model,
    run_step,
    save_hf_checkpoint,
    save_moonshot_checkpoint,
)

from kda_serving.model import StateCheckpoints, load_model

TOL = 1e-4
BLOCK = 16

# Shapes: (name, transformers config overrides)
SHAPES = {
    "moe-kda3-mla1": dict(),
    "dense-qlora-mla-first": dict(
        num_hidden_layers=5, q_lora_rank=16, first_k_dense_replace=5,
        linear_attn_config={"kda_layers": [2, 3, 5], "full_attn_layers": [1, 4], "num_heads": 2, "head_dim": 16,
                            "short_conv_kernel_size": 4},
    ),
    "grouped-topk-bias-tied": dict(
        num_hidden_layers=4, q_lora_rank=12, attention_bias=True, tie_word_embeddings=True,
        num_experts=8, num_expert_group=4, topk_group=2, num_experts_per_token=3, first_k_dense_replace=0,
        num_shared_experts=2,
        linear_attn_config={"kda_layers": [1, 3, 4], "full_attn_layers": [2], "num_heads": 3, "head_dim": 32,
                            "short_conv_kernel_size": 3},
    ),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def shape(request, tmp_path_factory):
    """(transformers model, our model loaded from its save_pretrained checkpoint, vocab size)."""
    hf, cfg = make_hf_model(seed=len(request.param), **SHAPES[request.param])
    path = save_hf_checkpoint(hf, str(tmp_path_factory.mktemp(request.param)))
    return hf, load_model(path, progress=False), cfg.vocab_size


def _tokens(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _poisoned_caches(model, slots=8, blocks=48):
    """Caches full of NaN: fresh sequences must never read them (has_initial_state False, unwritten KV)."""
    caches = model.allocate_caches(slots, blocks, BLOCK)
    for t in (*caches.recurrent, *caches.conv, *caches.kv):
        t.fill_(float("nan"))
    return caches


def _check(seq: Sequence, hf) -> None:
    ours = torch.cat(seq.logits)
    ref = hf_logits(hf, seq.tokens[: seq.done])
    max_rel, fro = logit_error(ours, ref)
    print(f"{len(seq.tokens[: seq.done])} tokens: max |diff|/max|logit| {max_rel:.1e}, ||diff||/||ref|| {fro:.1e}")
    assert max_rel < TOL, f"max |diff| / max |logit| = {max_rel:.2e} (||diff||/||ref|| = {fro:.2e})"


def test_one_sequence(shape):
    hf, model, vocab = shape
    caches = _poisoned_caches(model)
    seq = Sequence(_tokens(77, vocab, 1), slot=5, blocks=[7, 3, 11, 0, 9])
    run_step(model, caches, [(seq, 77)], BLOCK)
    _check(seq, hf)
    # nothing outside the sequence's slot and blocks was written
    for pool in (*caches.recurrent, *caches.conv):
        assert torch.isnan(pool[[i for i in range(8) if i != 5]]).all()
        assert torch.isfinite(pool[5]).all()
    for kv in caches.kv:
        assert torch.isnan(kv[[b for b in range(48) if b not in (7, 3, 11, 0, 9)]]).all()
        written = [b * BLOCK + o for b in (7, 3, 11, 0) for o in range(BLOCK)]  # 77 tokens: blocks 7, 3, 11, 0
        assert torch.isfinite(kv.view(-1, kv.shape[-1])[written]).all()


def test_packed_sequences_of_different_lengths(shape):
    hf, model, vocab = shape
    caches = _poisoned_caches(model)
    lengths = [1, 17, 64, 5, 40]
    seqs = [Sequence(_tokens(n, vocab, 10 + i), slot=7 - i, blocks=[20 + 5 * i + j for j in range(5)][::-1])
            for i, n in enumerate(lengths)]
    run_step(model, caches, [(s, len(s.tokens)) for s in seqs], BLOCK)
    for s in seqs:
        _check(s, hf)


def test_chunked_prefill_then_decode(shape):
    """Two requests through chunked prefill steps, a mixed prefill+decode step, then pure decode steps."""
    hf, model, vocab = shape
    caches = _poisoned_caches(model)
    a = Sequence(_tokens(98, vocab, 2), slot=2, blocks=[4, 40, 1, 33, 12, 6, 7])
    b = Sequence(_tokens(48, vocab, 3), slot=6, blocks=[30, 2, 8, 9])
    run_step(model, caches, [(a, 37), (b, 20)], BLOCK)  # two first chunks
    run_step(model, caches, [(b, 1), (a, 50)], BLOCK)  # b: one token with context, a: a middle chunk
    run_step(model, caches, [(a, 9), (b, 24)], BLOCK)  # a ends its 96-token prompt, b its 45-token one
    for _ in range(2):  # pure decode steps (batch.is_decode), teacher-forced with the next tokens
        run_step(model, caches, [(a, 1), (b, 1)], BLOCK)
    run_step(model, caches, [(b, 1)], BLOCK)
    assert (a.done, b.done) == (98, 48)
    _check(a, hf)
    _check(b, hf)


def test_decode_batch_is_flagged_as_decode(shape):
    """The decode path (conv/KDA decode ops, one query per sequence) is taken and agrees."""
    hf, model, vocab = shape
    caches = _poisoned_caches(model)
    seqs = [Sequence(_tokens(12 + 9 * i, vocab, 20 + i), slot=i, blocks=[3 * i, 3 * i + 1, 3 * i + 2])
            for i in range(3)]
    run_step(model, caches, [(s, len(s.tokens) - 4) for s in seqs], BLOCK)
    for _ in range(4):
        assert make_batch([(s, 1) for s in seqs], BLOCK).is_decode
        run_step(model, caches, [(s, 1) for s in seqs], BLOCK)
    for s in seqs:
        _check(s, hf)


def test_checkpoints_resume_exactly(shape):
    """States checkpointed inside a prefill (KDA recurrent via kda_prefill(checkpoints=...), conv window from
    the layer's conv input) resume a new request sharing the prefix, as the prefix cache does."""
    hf, model, vocab = shape
    caches = _poisoned_caches(model, slots=8)
    tokens = _tokens(150, vocab, 4)
    full = Sequence(tokens, slot=0, blocks=list(range(10)))
    ckpt = StateCheckpoints(seq=torch.tensor([0, 0], dtype=torch.int32),
                            pos=torch.tensor([64, 128], dtype=torch.int32),
                            slot=torch.tensor([3, 4], dtype=torch.int32))
    run_step(model, caches, [(full, 150)], BLOCK, checkpoints=ckpt)
    _check(full, hf)
    # a request with the first 64 tokens in common continues from checkpoint slot 3, via copy_states
    caches.copy_states([3], [6])
    other = Sequence(tokens[:64] + _tokens(30, vocab, 5), slot=6, blocks=[0, 1, 2, 3, 20, 21], done=64)
    run_step(model, caches, [(other, 25)], BLOCK)
    run_step(model, caches, [(other, 1)], BLOCK)
    ref = hf_logits(hf, other.tokens[:90])[64:]
    max_rel, fro = logit_error(torch.cat(other.logits), ref)
    assert max_rel < TOL, f"resumed from checkpoint 64: {max_rel:.2e} ({fro:.2e})"
    # and the request sharing 128 tokens continues straight from checkpoint slot 4
    again = Sequence(tokens, slot=4, blocks=list(range(10)), done=128)
    run_step(model, caches, [(again, 22)], BLOCK)
    max_rel, fro = logit_error(again.logits[0], hf_logits(hf, tokens)[128:])
    assert max_rel < TOL, f"resumed from checkpoint 128: {max_rel:.2e} ({fro:.2e})"


def test_moonshot_checkpoint_naming(tmp_path):
    """The original release's names (q/k/v_conv1d, f_a_proj on self_attn, block_sparse_moe w1/w2/w3) and config
    layout, over two shards, load to the same model."""
    hf, cfg = make_hf_model(seed=7, **SHAPES["grouped-topk-bias-tied"])
    model = load_model(save_moonshot_checkpoint(hf, cfg, str(tmp_path / "moonshot")), progress=False)
    caches = model.allocate_caches(4, 8, BLOCK)
    seq = Sequence(_tokens(40, cfg.vocab_size, 6), slot=1, blocks=[5, 2, 6])
    run_step(model, caches, [(seq, 40)], BLOCK)
    _check(seq, hf)


def test_last_token_logits_only(shape):
    hf, model, vocab = shape
    caches = model.allocate_caches(4, 16, BLOCK)
    seqs = [Sequence(_tokens(n, vocab, 30 + n), slot=i, blocks=[4 * i + j for j in range(4)])
            for i, n in enumerate((9, 33, 2))]
    logits = model(make_batch([(s, len(s.tokens)) for s in seqs], BLOCK, all_logits=False), caches)
    assert logits.shape == (3, vocab) and logits.dtype == torch.float32
    ref = torch.stack([hf_logits(hf, s.tokens)[-1] for s in seqs])
    assert logit_error(logits, ref)[0] < TOL


def test_attention_in_bounded_pieces(shape, monkeypatch):
    """With tiny memory budgets MLA attention runs per sequence group and in query chunks: same logits."""
    from kda_serving.model import mla_block

    hf, model, vocab = shape
    monkeypatch.setattr(mla_block, "SCORE_BUDGET", 4 * 40 * 64)  # forces groups of one and query chunks
    monkeypatch.setattr(mla_block, "LATENT_BUDGET", 3 * 64 * 40)
    caches = _poisoned_caches(model)
    seqs = [Sequence(_tokens(n, vocab, 40 + n), slot=i, blocks=[5 * i + j for j in range(5)])
            for i, n in enumerate((70, 3, 41, 1))]
    run_step(model, caches, [(s, len(s.tokens) - 1) if len(s.tokens) > 1 else (s, 1) for s in seqs], BLOCK)
    run_step(model, caches, [(s, 1) for s in seqs if s.done < len(s.tokens)], BLOCK)
    for s in seqs:
        _check(s, hf)
