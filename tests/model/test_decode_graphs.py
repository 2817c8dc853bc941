"""Decode steps replayed from the engine's CUDA graphs (engine/cuda_graphs.py) against the same steps run eagerly.

GPU test: the embedded default model (KDA + MLA + MoE) in bf16 runs a packed prefill, then decode steps of
3, 3, 3 and 2 sequences, each both eagerly on one copy of the caches and through the graphs on another. The
graph runs padded batches (bucket 4, then 2) and gathers keys up to its 512-token bucket, so it may round
differently from the eager step, never by more than bf16 noise: logits and every written state within 1e-2
(relative norm) of the eager ones, which a wrong row, slot, position or key length would exceed by orders of
magnitude; pool slots and KV blocks no sequence owns stay bit-identical (the padding rows write only the
scratch block).
"""

from __future__ import annotations

import pytest
import torch
from kimi_testing import Sequence, clone_caches, make_batch, rel_error

from kda_serving.engine.cuda_graphs import MIN_KV_BUCKET, VISIT_MIN_SEQS, DecodeGraphs

BLOCK = 16


def _graph_step_matches_eager(model, graphs, eager, live: list[Sequence]) -> None:
    """One decode step of `live`, eagerly on `eager` and replayed by `graphs`: logits within bf16 noise of each
    other; each sequence advances by its token."""
    batch = make_batch([(s, 1) for s in live], BLOCK)
    assert batch.is_decode
    ref = model.forward(batch.to("cuda"), eager)
    out = graphs.run(batch)
    torch.cuda.synchronize()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    err = rel_error(out, ref)
    print(f"step of {len(live)} sequences (keys {[s.done + 1 for s in live]}): logits rel {err:.2e}")
    assert err <= 1e-2
    for s in live:
        s.done += 1


@pytest.mark.gpu
def test_graph_decode_steps_match_eager_steps():
    from kda_serving.model import load_model

    model = load_model(None, device="cuda", dtype=torch.bfloat16, progress=False)
    assert model.decode_capturable
    num_blocks, vocab = 32, model.config.vocab_size
    eager = model.allocate_caches(8, num_blocks + 1, BLOCK)
    gen = torch.Generator().manual_seed(0)
    # prompts of 37, 5 and 20 tokens, each followed by the 4 tokens its decode steps feed
    seqs = [Sequence(torch.randint(3, vocab, (n + 4,), generator=gen).tolist(), slot=slot, blocks=blocks)
            for n, slot, blocks in ((37, 1, [3, 9, 4, 20]), (5, 6, [0, 11]), (20, 4, [30, 7, 2]))]
    model.forward(make_batch([(s, len(s.tokens) - 4) for s in seqs], BLOCK).to("cuda"), eager)
    for s in seqs:
        s.done = len(s.tokens) - 4
    graphed = clone_caches(eager)
    before = clone_caches(eager)
    graphs = DecodeGraphs(model, graphed, max_num_seqs=8, block_size=BLOCK, max_model_len=num_blocks * BLOCK,
                          scratch_slot=num_blocks * BLOCK)

    for step in range(4):
        live = seqs if step < 3 else seqs[:2]  # the last step drops a sequence: another bucket
        _graph_step_matches_eager(model, graphs, eager, live)
    assert set(graphs.graphs) == {(4, 1, MIN_KV_BUCKET), (2, 1, MIN_KV_BUCKET)}

    slots = [s.slot for s in seqs]
    for name, ours, ref in (("recurrent", graphed.recurrent, eager.recurrent), ("conv", graphed.conv, eager.conv)):
        for layer, (a, b) in enumerate(zip(ours, ref)):
            e = rel_error(a[slots], b[slots])
            print(f"{name} state layer {layer}: rel {e:.2e}")
            assert e <= 1e-2
    owned = sorted(b for s in seqs for b in s.blocks)
    for a, b in zip(graphed.kv, eager.kv):
        assert rel_error(a[owned], b[owned]) <= 1e-2
    # Nothing outside the sequences' slots and blocks moved, except the graph's scratch block.
    free_slots = [i for i in range(8) if i not in slots]
    free_blocks = [i for i in range(num_blocks) if i not in owned]
    for pools_g, pools_b in ((graphed.recurrent, before.recurrent), (graphed.conv, before.conv)):
        for a, b in zip(pools_g, pools_b):
            assert torch.equal(a[free_slots], b[free_slots])
    for a, b in zip(graphed.kv, before.kv):
        assert torch.equal(a[free_blocks], b[free_blocks])


@pytest.mark.gpu
def test_graph_steps_pass_the_kda_visit_order():
    """Buckets of VISIT_MIN_SEQS and more pass the KDA decode kernel the step's sequences by slot, padding rows
    included: 10 sequences in shuffled slots (bucket 16, six padding rows), then 7 (bucket 8, captured after
    real steps, when the visit buffer holds real pairs that its warm-up must not run on). Logits and states
    as in eager steps; slots no sequence owns bit-identical."""
    from kda_serving.model import load_model

    model = load_model(None, device="cuda", dtype=torch.bfloat16, progress=False)
    n_seqs, num_slots, blocks_per_seq = 10, 24, 3
    num_blocks, vocab = n_seqs * blocks_per_seq, model.config.vocab_size
    eager = model.allocate_caches(num_slots, num_blocks + 1, BLOCK)
    gen = torch.Generator().manual_seed(1)
    slots = torch.randperm(num_slots, generator=gen)[:n_seqs].tolist()
    seqs = [Sequence(torch.randint(3, vocab, (int(torch.randint(5, 40, (1,), generator=gen)) + 3,),
                                   generator=gen).tolist(),
                     slot=slot, blocks=list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)))
            for i, slot in enumerate(slots)]
    model.forward(make_batch([(s, len(s.tokens) - 3) for s in seqs], BLOCK).to("cuda"), eager)
    for s in seqs:
        s.done = len(s.tokens) - 3
    graphed, before = clone_caches(eager), clone_caches(eager)
    graphs = DecodeGraphs(model, graphed, max_num_seqs=16, block_size=BLOCK, max_model_len=num_blocks * BLOCK,
                          scratch_slot=num_blocks * BLOCK)
    for live in (seqs, seqs, seqs[3:]):
        _graph_step_matches_eager(model, graphs, eager, live)
    assert {nb for nb, _, _ in graphs.graphs} == {16, 8} and 8 >= VISIT_MIN_SEQS
    for ours, ref, old in zip(graphed.recurrent, eager.recurrent, before.recurrent):
        assert rel_error(ours[slots], ref[slots]) <= 1e-2
        free = [i for i in range(num_slots) if i not in slots]
        assert torch.equal(ours[free], old[free])


@pytest.mark.gpu
def test_one_graph_serves_every_key_length_on_the_paged_kernel():
    """MLA on the paged kernel (16 heads, latent 512 + 64): the graphs are captured once per batch bucket at the
    model's length (any_length) and serve sequences of 37 to 1,500 keys, with the block-table columns past each
    step's width holding what earlier steps left there (here: random block ids, never read). Logits and states
    against the same steps run eagerly (which plan their splits from the step's own longest sequence)."""
    from kimi_testing import paged_kernel_model

    model = paged_kernel_model(seed=3)
    assert model.decode_capturable and model.decode_any_length
    num_blocks, vocab = 260, model.config.vocab_size
    eager = model.allocate_caches(8, num_blocks + 1, BLOCK)
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    seqs, used = [], 0
    for n, slot in ((37, 2), (600, 5), (1100, 0), (1500, 7)):
        blocks = perm[used : used + -(-(n + 4) // BLOCK)]
        used += len(blocks)
        seqs.append(Sequence(torch.randint(3, vocab, (n + 4,), generator=gen).tolist(), slot=slot, blocks=blocks))
    for s in seqs:  # one prefill each (the 1,500-token one alone is within the default chunk of the tests)
        model.forward(make_batch([(s, len(s.tokens) - 4)], BLOCK).to("cuda"), eager)
        s.done = len(s.tokens) - 4
    graphed = clone_caches(eager)
    before = clone_caches(eager)
    graphs = DecodeGraphs(model, graphed, max_num_seqs=8, block_size=BLOCK, max_model_len=num_blocks * BLOCK,
                          scratch_slot=num_blocks * BLOCK, any_length=True)
    graphs.block_tables.random_(0, num_blocks)  # stale columns: blocks other sequences hold
    for live in ([0, 1, 2], [3, 0], [2, 1, 3, 0]):
        _graph_step_matches_eager(model, graphs, eager, [seqs[i] for i in live])
    assert set(graphs.graphs) == {(4, 1, graphs.kv_limit), (2, 1, graphs.kv_limit)}
    slots = [s.slot for s in seqs]
    for ours, ref in zip(graphed.recurrent + graphed.conv, eager.recurrent + eager.conv):
        assert rel_error(ours[slots], ref[slots]) <= 1e-2
    owned = sorted(b for s in seqs for b in s.blocks)
    free_blocks = [i for i in range(num_blocks) if i not in owned]
    for a, b, c in zip(graphed.kv, eager.kv, before.kv):
        assert rel_error(a[owned], b[owned]) <= 1e-2
        assert torch.equal(a[free_blocks], c[free_blocks])
