"""Steps with prompt tokens through piecewise graphs (engine/prompt_graphs.py) against the same steps run eagerly.

Four steps on two copies of the caches, one eager (model.forward), one through PromptGraphs: a packed prefill of
three prompts (62 tokens: bucket 64); a mixed step of two decodes, a prompt chunk and a new 70-token prompt that
checkpoints its state at token 64 (bucket 96); a step whose first two sequences verify 3 tokens each, the rest
a prompt chunk (speculative decoding beside a prompt); and a step of 3 tokens (bucket 16). Logits of every token
and every written state and KV row must match the eager step's; pool slots and KV blocks that no sequence owns
stay bit-identical (padding rows write only the scratch KV block).

On the CPU the graphs are stand-ins that re-run their piece on replay into the same output tensors (so the
buffers, padding, slicing and the model's cut into pieces are what is tested), in float32 to float rounding
(1e-5: padded matrix shapes may round differently). On the GPU the pieces are real CUDA graphs, in bf16 to
bf16 noise (1e-2, as the decode graphs' test), for the embedded default model (KDA + MLA + MoE) and a model
whose MLA takes the flash and paged kernels.
"""

from __future__ import annotations

import pytest
import torch
from kimi_testing import Sequence, clone_caches, make_batch, rel_error

from kda_serving.engine.prompt_graphs import PromptGraphs, token_buckets
from kda_serving.model.batch import SpecVerify, StateCheckpoints
from kda_serving.ops import indices_checked_by_caller

BLOCK = 16



class _Rerun:
    """A CPU stand-in for a captured piece: replay runs it again and copies its outputs where capture left them."""

    def __init__(self, run, out):
        self.run, self.out = run, out

    def replay(self):
        for name, t in self.run().items():
            self.out[name].copy_(t)


class CPUPieces(PromptGraphs):
    def _warm_up(self, batch, rows):
        pass

    def _capture_piece(self, i, inputs, batch):
        def run():
            return self.model.piece(i, inputs, batch, self.caches)

        out = run()
        return _Rerun(run, out), out


def test_token_buckets():
    assert token_buckets(512) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    assert token_buckets(100) == [16, 24, 32, 48, 64, 96, 100]
    assert token_buckets(16) == [16] and token_buckets(5) == [5]
    with pytest.raises(ValueError):
        token_buckets(0)


def test_pieces_compose_to_the_forward():
    """The model's piece/mix API is its forward cut in pieces: run in order on one batch it gives the
    forward's logits bit for bit."""
    from kda_serving.model import load_model

    model = load_model(None, device="cpu", dtype=torch.float32, progress=False)
    caches = model.allocate_caches(4, 8, BLOCK)
    seq = Sequence(list(range(3, 40)), slot=1, blocks=[5, 2, 7])
    batch = make_batch([(seq, 37)], BLOCK)
    ref = model.forward(batch, clone_caches(caches))
    with torch.inference_mode():
        carry = model.piece(0, {}, batch, caches)
        for i in range(len(model.layers)):
            carry["mixer_out"] = model.mix(i, carry, batch, caches)
            assert carry["mixer_out"].shape == (37, *model.mix_shape(i))
            carry = model.piece(i + 1, carry, batch, caches)
        assert torch.equal(model.logits(carry["h"], batch), ref)


def test_prompt_steps_match_eager_steps_cpu():
    from kda_serving.model import load_model

    model = load_model(None, device="cpu", dtype=torch.float32, progress=False)
    _check_prompt_steps(model, CPUPieces, tol=1e-5)


@pytest.mark.gpu
def test_prompt_steps_match_eager_steps_cuda():
    from kda_serving.model import load_model

    model = load_model(None, device="cuda", dtype=torch.bfloat16, progress=False)
    assert model.decode_capturable
    _check_prompt_steps(model, PromptGraphs, tol=1e-2)


@pytest.mark.gpu
def test_prompt_steps_on_the_mla_kernels_match_eager_steps():
    """MLA on the CUDA kernels: the 70-token prompt and the others' short chunks take the paged kernel one query
    each, and with EXPANDED_MIN_QUERIES lowered, the long ones the flash kernel in the expanded form."""
    from kimi_testing import paged_kernel_model

    from kda_serving.model import mla_block

    model = paged_kernel_model(seed=4)
    _check_prompt_steps(model, PromptGraphs, tol=1e-2)
    saved = mla_block.EXPANDED_MIN_QUERIES
    try:
        mla_block.EXPANDED_MIN_QUERIES = 16
        _check_prompt_steps(model, PromptGraphs, tol=1e-2)
    finally:
        mla_block.EXPANDED_MIN_QUERIES = saved


def _check_prompt_steps(model, graphs_class, tol: float) -> None:
    device, vocab = model.device, model.config.vocab_size
    num_slots, num_blocks = 16, 40
    eager = model.allocate_caches(num_slots, num_blocks + 1, BLOCK)  # + the scratch block
    gen = torch.Generator().manual_seed(0)
    for pool in eager.recurrent + eager.conv + eager.kv:  # stale contents everywhere, as in a running engine
        pool.copy_(torch.randn(pool.shape, generator=gen).to(pool.dtype) * 0.1)
    before = clone_caches(eager)
    graphed = clone_caches(eager)
    graphs = graphs_class(model, graphed, max_tokens=128, scratch_slot=num_blocks * BLOCK)

    def seq(n, slot, blocks):
        return Sequence(torch.randint(3, vocab, (n,), generator=gen).tolist(), slot=slot, blocks=blocks)

    a, b, c = seq(45, 1, [3, 9, 4]), seq(30, 6, [0, 11]), seq(40, 4, [30, 7, 2])
    d = seq(75, 9, [12, 13, 14, 15, 16])
    steps = [
        ([(a, 37), (b, 5), (c, 20)], None, None),  # 62 tokens
        # two decodes, a chunk, a new prompt that checkpoints its state after 64 tokens into slot 12
        ([(a, 1), (b, 9), (c, 1), (d, 70)], StateCheckpoints(*(torch.tensor([v], dtype=torch.int32)
                                                               for v in (3, 64, 12))), None),
        ([(a, 3), (c, 3), (b, 8)], None, torch.tensor([[13, 14, 15], [2, 3, 5]], dtype=torch.int32)),
        ([(d, 3)], None, None),
    ]
    for step, (chunks, ckpt, out_slots) in enumerate(steps):
        batch = make_batch(chunks, BLOCK, checkpoints=ckpt)
        if out_slots is not None:
            batch.spec = SpecVerify(2, 3, out_slots, batch.tail(2))
        batch.check(num_slots, num_blocks + 1, BLOCK)
        ref = model.forward(batch.to(device), eager)
        with torch.inference_mode(), indices_checked_by_caller():
            out = graphs.run(batch, batch.to(device))
        assert out.shape == ref.shape and torch.isfinite(out).all()
        err = rel_error(out, ref)
        print(f"step {step} ({batch.num_tokens} tokens, bucket {graphs.bucket(batch.num_tokens)}): logits rel "
              f"{err:.2e}")
        assert err <= tol
        for s, n in chunks:
            s.done += n
    assert set(graphs.captured) == {16, 64, 96}

    slots = [1, 6, 4, 9, 12, 13, 14, 15, 2, 3, 5]
    for name, ours, ref in (("recurrent", graphed.recurrent, eager.recurrent), ("conv", graphed.conv, eager.conv)):
        for layer, (x, y) in enumerate(zip(ours, ref)):
            e = rel_error(x[slots], y[slots])
            print(f"{name} state layer {layer}: rel {e:.2e}")
            assert e <= tol
    owned = sorted({blk for s in (a, b, c, d) for blk in s.blocks})
    for x, y in zip(graphed.kv, eager.kv):
        assert rel_error(x[owned], y[owned]) <= tol
    free_slots = [i for i in range(num_slots) if i not in slots]
    free_blocks = [i for i in range(num_blocks) if i not in owned]
    for x, y in zip(graphed.recurrent + graphed.conv, before.recurrent + before.conv):
        assert torch.equal(x[free_slots], y[free_slots])
    for x, y in zip(graphed.kv, before.kv):
        assert torch.equal(x[free_blocks], y[free_blocks])
