"""A verifying step (RaggedBatch.spec: W tokens per sequence, the KDA recurrent and conv state after every token
kept in slots of its own) against W single-token decode steps of the same sequences.

The embedded default model (KDA + MLA + MoE) prefills three prompts; then the verifying step runs on one copy
of the caches and W decode steps on another. Logit row t of each sequence must equal decode step t's, and
state slot out_slots[n, t] the state the decode steps left after token t: in float32 on the CPU to float
rounding (1e-5 relative; the step's matrix shapes differ), in bf16 on the GPU to bf16 noise (1e-2), where
the step also replays as a CUDA graph; a second GPU model has its MLA layer on the paged kernel, one query
per token. The
sequence's own slot, and every slot and block it does not own, stay as they were.
"""

from __future__ import annotations

import pytest
import torch
from kimi_testing import Sequence, clone_caches, make_batch, rel_error

from kda_serving.model.batch import SpecVerify

BLOCK, W = 16, 4
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]



@pytest.mark.parametrize("device", DEVICES)
def test_verify_step_equals_decode_steps(device):
    from kda_serving.model import load_model

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = load_model(None, device=device, dtype=dtype, progress=False)
    assert not model.decode_any_length  # 4 MLA heads of latent 128 + 32: the torch-ops attention
    _check_verify_step(model, ((37, 1, [3, 9, 4, 20]), (5, 6, [0, 11]), (14, 4, [30, 7])), num_blocks=32)


@pytest.mark.gpu
def test_verify_step_on_the_paged_kernel_equals_decode_steps():
    """The same with MLA on the paged kernel: each verifying token a query of its own key count over its
    sequence's block-table row (table_rows, no copy of the row), and the graph captured once at the model's
    length (any_length) serving sequences of 37 to 1,300 keys."""
    from kimi_testing import paged_kernel_model

    model = paged_kernel_model(seed=2)
    assert model.decode_any_length
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(3)).tolist()
    lens = (37, 1300, 600)
    starts = [0, 3, 3 + 82]
    seqs = [(n, slot, perm[a : a + -(-(n + W) // BLOCK)]) for n, slot, a in zip(lens, (1, 6, 4), starts)]
    _check_verify_step(model, seqs, num_blocks=200)


def _check_verify_step(model, specs, num_blocks: int) -> None:
    """specs: (prompt length, state slot, blocks) per sequence; see the module docstring."""
    from kda_serving.engine.cuda_graphs import DecodeGraphs

    device = model.device.type
    tol = 1e-5 if device == "cpu" else 1e-2
    num_slots, vocab = 24, model.config.vocab_size
    base = model.allocate_caches(num_slots + 1, num_blocks + 1, BLOCK)  # + the graphs' scratch slot and block
    gen = torch.Generator().manual_seed(1)
    seqs = [Sequence(torch.randint(3, vocab, (n + W,), generator=gen).tolist(), slot=slot, blocks=blocks)
            for n, slot, blocks in specs]
    model.forward(make_batch([(s, len(s.tokens) - W) for s in seqs], BLOCK).to(device), base)
    for s in seqs:
        s.done = len(s.tokens) - W
    out_slots = torch.tensor([[8 + 4 * i + t for t in range(W)] for i in range(len(seqs))], dtype=torch.int32)
    batch = make_batch([(s, W) for s in seqs], BLOCK)  # logits for every token
    batch.spec = SpecVerify(len(seqs), W, out_slots, None)
    assert not batch.is_decode and batch.decode_only
    batch.check(num_slots + 1, num_blocks + 1, BLOCK)

    decoded, verified = clone_caches(base), clone_caches(base)
    steps = []
    for t in range(W):
        steps.append(model.forward(make_batch([(s, 1) for s in seqs], BLOCK).to(device), decoded))
        kept = [[layer[s.slot].clone() for s in seqs] for layer in decoded.recurrent + decoded.conv]
        steps[-1] = (steps[-1], kept)
        for s in seqs:
            s.done += 1
    for s in seqs:
        s.done -= W
    runs = [("eager", model.forward(batch.to(device), verified), verified)]
    if device == "cuda":
        graphed = clone_caches(base)
        graphs = DecodeGraphs(model, graphed, max_num_seqs=4, block_size=BLOCK, max_model_len=num_blocks * BLOCK,
                              scratch_slot=num_blocks * BLOCK, max_width=W, scratch_state_slot=num_slots,
                              any_length=model.decode_any_length)
        runs.append(("graph", graphs.run(batch), graphed))
        assert set(graphs.graphs) == {(4, W, graphs.kv_limit if model.decode_any_length else 512)}
    owned_slots = {s.slot for s in seqs} | set(out_slots.reshape(-1).tolist())
    owned_blocks = {b for s in seqs for b in s.blocks}
    for name, logits, caches in runs:
        logits = logits.view(len(seqs), W, -1)
        for t, (ref, kept) in enumerate(steps):
            err = rel_error(logits[:, t], ref)
            print(f"{device} {name} token {t}: logits rel {err:.2e}")
            assert err <= tol
            pools = caches.recurrent + caches.conv
            for layer, (pool, states) in enumerate(zip(pools, kept)):
                for n, state in enumerate(states):
                    assert rel_error(pool[out_slots[n, t]], state) <= tol, (name, t, layer, n)
        for pools, before in ((caches.recurrent, base.recurrent), (caches.conv, base.conv)):
            for a, b in zip(pools, before):
                for s in seqs:  # the sequence's own slot is only read
                    assert torch.equal(a[s.slot], b[s.slot])
                others = [i for i in range(num_slots) if i not in owned_slots]
                assert torch.equal(a[others], b[others])
        for a, b, d in zip(caches.kv, base.kv, decoded.kv):
            others = [i for i in range(num_blocks) if i not in owned_blocks]
            assert torch.equal(a[others], b[others])
            owned = sorted(owned_blocks)
            assert rel_error(a[owned], d[owned]) <= tol  # the latents the verified tokens appended
