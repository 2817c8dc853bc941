"""build_batch's block tables: incrementally converted rows (block_row) must equal a fresh conversion."""

import random

import pytest

import torch

from kda_serving.engine.batch_builder import VISIT_MIN_SEQS, block_row, build_batch
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


def _checked_batch():
    """Two sequences (a 130-token prompt with a checkpoint after 128 tokens, and a decode) on 16-token blocks."""
    a, b = Sequence("a", list(range(3, 133)), SamplingParams(), 0), Sequence("b", [4] * 40, SamplingParams(), 1)
    a.state_slot, a.block_table = 2, list(range(9))
    b.state_slot, b.block_table = 5, [20, 21, 22]
    out = SchedulerOutput(chunks=[ScheduledChunk(a, 0, 130, True), ScheduledChunk(b, 39, 1, True)],
                          checkpoints=[(0, 128, 7)])
    return build_batch(out, block_size=16)


@pytest.mark.parametrize("field,value,match", [
    ("cu_seqlens", [0, 130, 132], "must end at T=131"),
    ("cu_seqlens", [0, 131, 131], None),  # fine: an empty sequence
    ("state_slots", [2, 8], "out of range"),
    ("state_slots", [5, 5], "distinct"),
    ("state_slots", [-1, 5], None),  # fine: a padded entry
    ("logits_indices", [129, 131], "outside the 131 tokens"),
    ("has_initial_state", [False], "expected 2 rows"),
    ("ckpt.slot", [5], "must differ from state_indices"),
    ("ckpt.slot", [8], "out of range"),
    ("ckpt.pos", [64 + 32], "multiples of 64"),
    ("ckpt.pos", [192], "beyond the end"),
    ("ckpt.seq", [2], "out of range"),
])
def test_ragged_batch_check_names_the_bad_index(field, value, match):
    """RaggedBatch.check, run on the host once per eager step in place of the ops' own index checks, catches
    every index that would send a kernel or an indexing op outside its cache."""
    batch = _checked_batch()
    batch.check(num_state_slots=8, num_kv_blocks=23, block_size=16)  # the batch as built passes
    name = field.removeprefix("ckpt.")
    holder = batch.checkpoints if field.startswith("ckpt.") else batch
    setattr(holder, name, torch.tensor(value, dtype=getattr(holder, name).dtype))
    if field == "cu_seqlens":  # the host copy follows (RaggedBatch.check_host_lengths checks they agree)
        batch.query_lens = batch.cu_seqlens.diff().tolist()
    if match is None:
        batch.check(num_state_slots=8, num_kv_blocks=23, block_size=16)
    else:
        with pytest.raises(ValueError, match=match):
            batch.check(num_state_slots=8, num_kv_blocks=23, block_size=16)


@pytest.mark.parametrize("field,value,match", [
    ("query_lens", [129, 1], "query_lens"),
    ("kv_lens", [130], "expected 2 entries"),
    ("kv_lens", [131, 40], r"kv_lens\[0\]: 131 keys .*must be equal"),  # a step with prompt tokens: exact
    ("kv_lens", [130, 39], r"kv_lens\[1\]"),
])
def test_ragged_batch_check_holds_the_host_lengths_to_the_tensors(field, value, match):
    """query_lens and kv_lens, the host copies the MLA layers size their gathers and attention calls from,
    must agree with cu_seqlens and seq_lens."""
    batch = _checked_batch()
    setattr(batch, field, value)
    with pytest.raises(ValueError, match=match):
        batch.check(num_state_slots=8, num_kv_blocks=23, block_size=16)


def test_decode_steps_may_bound_their_key_lengths():
    """A decode-only step's kv_lens may exceed seq_lens (a captured step pads to its bucket), not its tables."""
    a, b = Sequence("a", [3] * 30, SamplingParams(), 0), Sequence("b", [4] * 40, SamplingParams(), 1)
    a.state_slot, a.block_table = 2, [1, 2]
    b.state_slot, b.block_table = 5, [20, 21, 22]
    out = SchedulerOutput(chunks=[ScheduledChunk(a, 29, 1, True), ScheduledChunk(b, 39, 1, True)])
    batch = build_batch(out, block_size=16)
    assert batch.is_decode
    batch.kv_lens = [32, 48]
    batch.check(num_state_slots=8, num_kv_blocks=23, block_size=16)
    batch.kv_lens = [49, 48]  # past the three blocks a row of the table holds
    with pytest.raises(ValueError, match=r"kv_lens\[0\]"):
        batch.check(num_state_slots=8, num_kv_blocks=23, block_size=16)


def test_decode_steps_carry_the_kda_visit_order():
    """A decode step lists its sequences by increasing state slot for the KDA decode kernel; the check holds
    the pairs to state_slots; a step with prompt tokens has none."""
    slots = [6, 1, 7, 3, 0, 9, 2, 4]
    assert len(slots) == VISIT_MIN_SEQS
    seqs = [Sequence(str(i), [3] * 20, SamplingParams(), i) for i in range(len(slots))]
    for seq, slot in zip(seqs, slots):
        seq.state_slot, seq.block_table = slot, [slot]
    batch = build_batch(SchedulerOutput(chunks=[ScheduledChunk(s, 19, 1, True) for s in seqs]), block_size=32)
    assert batch.is_decode
    assert batch.state_visit.tolist() == [[4, 0], [1, 1], [6, 2], [3, 3], [7, 4], [0, 6], [2, 7], [5, 9]]
    batch.check(num_state_slots=10, num_kv_blocks=10, block_size=32)
    assert torch.equal(batch.to("cpu").state_visit, batch.state_visit)
    batch.state_visit[[0, 1], 1] = batch.state_visit[[1, 0], 1]  # two slots swapped between sequences
    with pytest.raises(ValueError, match="visit_order"):
        batch.check(num_state_slots=10, num_kv_blocks=10, block_size=32)
    small = build_batch(SchedulerOutput(chunks=[ScheduledChunk(s, 19, 1, True) for s in seqs[:3]]), block_size=32)
    assert small.is_decode and small.state_visit is None  # a step of a few sequences: no order to pass
    assert _checked_batch().state_visit is None


def test_ragged_batch_check_finds_keys_without_a_block():
    """A sequence whose keys reach a table entry of -1 (no block) would send the paged kernel outside the
    cache: refused."""
    batch = _checked_batch()
    batch.block_tables[1, 2] = -1  # b's third block, holding its keys 32..39
    with pytest.raises(ValueError, match="block_tables"):
        batch.check(num_state_slots=8, num_kv_blocks=23, block_size=16)


def test_ragged_batch_check_bounds_the_kv_blocks():
    batch = _checked_batch()
    with pytest.raises(ValueError, match="slot_mapping"):
        batch.check(num_state_slots=8, num_kv_blocks=22, block_size=16)  # block 22 is past the cache
    batch = _checked_batch()
    batch.block_tables[1, 3] = 23  # past the cache, though beyond the sequence's end (no key reads it)
    with pytest.raises(ValueError, match="block_tables"):
        batch.check(num_state_slots=8, num_kv_blocks=23, block_size=16)
