"""Decode steps replayed from CUDA graphs (engine/cuda_graphs.py) against the same steps run eagerly.

GPU tests: the embedded default model (KDA + MLA + MoE) in bf16 runs a packed prefill, then decode steps of
3, 3, 3 and 2 sequences, each both eagerly on one copy of the caches and through the graphs on another. The
graph runs padded batches (bucket 4, then 2) and gathers keys up to its 512-token bucket, so it may round
differently from the eager step, never by more than bf16 noise: logits and every written state within 1e-2
(relative norm) of the eager ones, which a wrong row, slot, position or key length would exceed by orders of
magnitude; pool slots and KV blocks no sequence owns stay bit-identical (the padding rows write only the
scratch block). The bucket arithmetic is plain Python and tested on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams
from kda_serving.engine.cuda_graphs import MIN_KV_BUCKET, DecodeGraphs, batch_bucket, kv_bucket
from kda_serving.model.batch import RaggedBatch

BLOCK = 16


def test_batch_bucket_is_the_next_power_of_two_capped():
    assert [batch_bucket(n, 48) for n in (1, 2, 3, 4, 5, 17, 32, 33, 48)] == [1, 2, 4, 4, 8, 32, 32, 48, 48]
    for bad in (0, 49):
        with pytest.raises(ValueError):
            batch_bucket(bad, 48)


def test_kv_bucket_covers_the_longest_sequence():
    assert kv_bucket(1, 16, 1 << 20) == MIN_KV_BUCKET
    assert kv_bucket(513, 16, 1 << 20) == 640  # quarter-octave steps: 512, 640, 768, 896, 1024, 1280, ...
    assert kv_bucket(4096, 16, 1 << 20) == 4096
    assert kv_bucket(16448, 16, 1 << 20) == 20480
    assert kv_bucket(7000, 16, 6000) == 6000  # capped at the model length in whole blocks
    for n in range(1, 70000, 37):
        b = kv_bucket(n, 16, 1 << 20)
        assert n <= b <= max(MIN_KV_BUCKET, 5 * n / 4 + 16) and b % 16 == 0


def _batch(seqs, tokens, block_size=BLOCK) -> RaggedBatch:
    """Host RaggedBatch running tokens[i] for each (slot, blocks, done) in seqs: a prefill chunk when several
    tokens are given, else a decode step."""
    ids, positions, cu, ctx, slot_map = [], [], [0], [], []
    width = max(len(blocks) for _, blocks, _ in seqs)
    tables = torch.full((len(seqs), width), -1, dtype=torch.int32)
    for i, ((slot, blocks, done), toks) in enumerate(zip(seqs, tokens)):
        pos = list(range(done, done + len(toks)))
        ids += toks
        positions += pos
        cu.append(cu[-1] + len(toks))
        ctx.append(done)
        slot_map += [blocks[p // block_size] * block_size + p % block_size for p in pos]
        tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    ctx_t = torch.tensor(ctx, dtype=torch.int32)
    lens = [c + len(t) for c, t in zip(ctx, tokens)]
    return RaggedBatch(
        input_ids=torch.tensor(ids), positions=torch.tensor(positions), cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        context_lens=ctx_t, seq_lens=torch.tensor(lens, dtype=torch.int32),
        state_slots=torch.tensor([s for s, _, _ in seqs], dtype=torch.int32), has_initial_state=ctx_t > 0,
        block_tables=tables, slot_mapping=torch.tensor(slot_map), logits_indices=torch.tensor(cu[1:]) - 1,
        query_lens=[len(t) for t in tokens], kv_lens=lens, is_decode=all(len(t) == 1 for t in tokens) and all(ctx),
    )


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _clone(caches):
    return type(caches)(*[[t.clone() for t in pools] for pools in (caches.recurrent, caches.conv, caches.kv)])


@pytest.mark.gpu
def test_graph_decode_steps_match_eager_steps():
    from kda_serving.model import load_model

    model = load_model(None, device="cuda", dtype=torch.bfloat16, progress=False)
    assert model.decode_capturable
    num_blocks, vocab = 32, model.config.vocab_size
    eager = model.allocate_caches(8, num_blocks + 1, BLOCK)
    gen = torch.Generator().manual_seed(0)
    # (state slot, KV blocks, tokens done); prompts of 37, 5 and 20 tokens
    seqs = [[1, [3, 9, 4, 20], 0], [6, [0, 11], 0], [4, [30, 7, 2], 0]]
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (37, 5, 20)]
    model.forward(_batch(seqs, prompts).to("cuda"), eager)
    for s, p in zip(seqs, prompts):
        s[2] = len(p)
    graphed = _clone(eager)
    before = _clone(eager)
    graphs = DecodeGraphs(model, graphed, max_num_seqs=8, block_size=BLOCK, max_model_len=num_blocks * BLOCK,
                          scratch_slot=num_blocks * BLOCK)

    for step in range(4):
        live = seqs if step < 3 else seqs[:2]  # the last step drops a sequence: another bucket
        tokens = [[int(torch.randint(3, vocab, (1,), generator=gen))] for _ in live]
        batch = _batch(live, tokens)
        ref = model.forward(batch.to("cuda"), eager)
        out = graphs.run(batch)
        torch.cuda.synchronize()
        assert out.shape == ref.shape and torch.isfinite(out).all()
        err = _rel(out, ref)
        print(f"step {step} ({len(live)} sequences): logits rel {err:.2e}")
        assert err <= 1e-2
        for s in live:
            s[2] += 1
    assert set(graphs.graphs) == {(4, MIN_KV_BUCKET), (2, MIN_KV_BUCKET)}

    slots = [s[0] for s in seqs]
    for name, ours, ref in (("recurrent", graphed.recurrent, eager.recurrent), ("conv", graphed.conv, eager.conv)):
        for layer, (a, b) in enumerate(zip(ours, ref)):
            e = _rel(a[slots], b[slots])
            print(f"{name} state layer {layer}: rel {e:.2e}")
            assert e <= 1e-2
    owned = sorted(b for s in seqs for b in s[1])
    for a, b in zip(graphed.kv, eager.kv):
        assert _rel(a[owned], b[owned]) <= 1e-2
    # Nothing outside the sequences' slots and blocks moved, except the graph's scratch block.
    free_slots = [i for i in range(8) if i not in slots]
    free_blocks = [i for i in range(num_blocks) if i not in owned]
    for pools_g, pools_b in ((graphed.recurrent, before.recurrent), (graphed.conv, before.conv)):
        for a, b in zip(pools_g, pools_b):
            assert torch.equal(a[free_slots], b[free_slots])
    for a, b in zip(graphed.kv, before.kv):
        assert torch.equal(a[free_blocks], b[free_blocks])


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_engine_decodes_through_graphs(state_dtype):
    """The engine replays graphs for its decode steps and produces the requested tokens (fp32 or bf16 KDA
    states: the bf16 pools take the decode kernel's bf16 fast path inside the graph)."""
    engine = LLMEngine(EngineConfig(device="cuda", max_num_seqs=8, num_state_slots=16, num_kv_blocks=64,
                                    kda_state_dtype=state_dtype))
    assert engine.runner.caches.recurrent[0].dtype == getattr(torch, state_dtype)
    graphs = engine.runner.graphs
    assert graphs is not None and set(graphs.graphs) == {(nb, MIN_KV_BUCKET) for nb in (1, 2, 4, 8)}
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for i, n in enumerate((9, 30, 4)):
        engine.add_request(str(i), list(range(5, 5 + n)), params)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert sorted(finished) == ["0", "1", "2"]
    assert all(len(o.output_token_ids) == 12 for o in finished.values())
    assert len(graphs.graphs) == 4  # every step fit a graph captured at start-up
