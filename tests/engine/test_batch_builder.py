"""build_batch's block tables: incrementally converted rows (block_row) must equal a fresh conversion."""

import random

import torch

from kda_serving.engine.batch_builder import block_row, build_batch
from kda_serving.engine.sampling_params import SamplingParams
from kda_serving.engine.scheduler import ScheduledChunk, SchedulerOutput
from kda_serving.engine.sequence import Sequence


def padded(tables):
    width = max((len(t) for t in tables), default=0)
    return torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32).reshape(len(tables), width)


def test_block_row_follows_appends_and_replacements():
    seq = Sequence("r", [5, 6, 7], SamplingParams(), 0)
    assert block_row(seq).tolist() == []
    seq.block_table = [3, 4]
    assert block_row(seq).tolist() == [3, 4]
    seq.block_table += [9]  # a block appended in place (scheduler._grow_blocks)
    assert block_row(seq).tolist() == [3, 4, 9]
    assert block_row(seq).tolist() == [3, 4, 9]  # unchanged: the cached row
    seq.block_table = [7]  # re-admitted: a new list, even if it were as long
    assert block_row(seq).tolist() == [7]
    seq.block_table = [8]
    assert block_row(seq).tolist() == [8]
    seq.block_table = []  # released
    assert block_row(seq).tolist() == []


def test_build_batch_block_tables_match_fresh_conversion_over_many_steps():
    rng = random.Random(0)
    seqs = [Sequence(str(i), [3] * 4, SamplingParams(), i) for i in range(6)]
    next_block = iter(range(10**6))
    for i, seq in enumerate(seqs):
        seq.state_slot = i
        seq.block_table = [next(next_block) for _ in range(rng.randint(1, 3))]
    for _ in range(60):
        for seq in seqs:
            r = rng.random()
            if r < 0.4:
                seq.block_table += [next(next_block)]
            elif r < 0.5:
                seq.block_table = [next(next_block) for _ in range(rng.randint(0, 4))]
        chosen = rng.sample(seqs, rng.randint(1, len(seqs)))
        out = SchedulerOutput(chunks=[ScheduledChunk(s, 0, 1, True) for s in chosen])
        for s in chosen:  # build_batch maps positions to slots through the table; give position 0 a block
            if not s.block_table:
                s.block_table = [next(next_block)]
        batch = build_batch(out, block_size=16)
        expected = padded([s.block_table for s in chosen])
        assert batch.block_tables.dtype == torch.int32
        assert torch.equal(batch.block_tables, expected)
