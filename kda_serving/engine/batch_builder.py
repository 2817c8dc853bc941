"""Turns the scheduler's decisions into the step's RaggedBatch (host tensors; the runner moves them)."""

from __future__ import annotations

import torch

from ..model.batch import RaggedBatch, SpecVerify, StateCheckpoints
from ..ops import slot_visit_order
from .scheduler import SchedulerOutput
from .sequence import Sequence

# Decode steps of at least this many sequences carry the KDA decode kernel's visit order (their sequences by
# slot, docs/decode-kernel.md): below it the KDA grid is about one wave at H = 32, with little to reorder, and
# the order costs 17-32 us of host time per step (torch argsort of up to 256 slots, this 2-core machine).
VISIT_MIN_SEQS = 8


def block_row(seq: Sequence) -> torch.Tensor:
    """seq.block_table as an int32 tensor, converting only the blocks appended since the last call.

    Converting every table every step cost time in proportion to the context (a no-op model, 256 sequences:
    ~0.9 ms more per step at 2,000 tokens each than at the start). A table only grows while it is the same
    list object (Sequence), so the copy stays valid for the blocks it has.
    """
    table, cached = seq.block_table, seq.block_row_cache
    if cached is not None and cached[0] is table:
        if cached[1] == len(table):
            return cached[2]
        row = torch.cat((cached[2], torch.tensor(table[cached[1] :], dtype=torch.int32)))
    else:
        row = torch.tensor(table, dtype=torch.int32)
    seq.block_row_cache = (table, len(table), row)
    return row


def prompt_logprob_positions(chunk) -> range:
    """The positions of a chunk whose logits give prompt tokens' log probabilities (SamplingParams.
    prompt_logprobs): position p predicts token p + 1, so every position of the chunk before the prompt's last."""
    seq = chunk.seq
    if not seq.wants_prompt_logprobs or chunk.drafts:
        return range(0)
    return range(chunk.start, min(chunk.start + chunk.num_tokens, seq.num_prompt_tokens - 1))


def build_batch(out: SchedulerOutput, block_size: int, pin_memory: bool = False) -> RaggedBatch:
    """One RaggedBatch for the scheduled chunks, in chunk order (sequence n = out.chunks[n]).

    Every sequence gets a logits row (logits_indices = its last new token); rows of prefill chunks that do
    not end the prompt are simply not sampled. A verifying decode (chunk.drafts, first in out.chunks) feeds its
    last token and its drafts and gets a row for each of them. After all of those come the rows of the
    positions that give prompt logprobs (prompt_logprob_positions), chunk by chunk.
    """
    input_ids, positions, slot_mapping = [], [], []
    cu_seqlens, context_lens, seq_lens, state_slots, query_lens, logits_indices = [0], [], [], [], [], []
    for chunk in out.chunks:
        seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
        end = start + n
        if chunk.drafts:
            input_ids += seq.token_ids[start : start + 1] + chunk.drafts
            logits_indices += range(cu_seqlens[-1], cu_seqlens[-1] + n - 1)
        else:
            input_ids += seq.token_ids[start:end]
        positions += range(start, end)
        table = seq.block_table
        slot_mapping += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        cu_seqlens.append(cu_seqlens[-1] + n)
        context_lens.append(start)
        seq_lens.append(end)
        state_slots.append(seq.state_slot)
        query_lens.append(n)
        logits_indices.append(cu_seqlens[-1] - 1)
    if out.prompt_logprob_tokens:  # (none of the step's chunks has such positions otherwise)
        for chunk, offset in zip(out.chunks, cu_seqlens):  # offset: the chunk's first token in the batch
            logits_indices += [offset + p - chunk.start for p in prompt_logprob_positions(chunk)]
    # [N, longest table], -1 past each table's end; one masked scatter (256 tables of 125 blocks: 0.10 ms, where
    # the masked assignment took 0.27-0.37 ms and torch's pad_sequence ~3x that)
    rows = [block_row(c.seq) for c in out.chunks]
    lens = torch.tensor([len(c.seq.block_table) for c in out.chunks])
    block_tables = torch.full((len(rows), int(lens.max()) if rows else 0), -1, dtype=torch.int32)
    if rows:
        block_tables.masked_scatter_(torch.arange(block_tables.shape[1]) < lens[:, None], torch.cat(rows))

    def tensor(data, dtype):
        t = torch.tensor(data, dtype=dtype)
        return t.pin_memory() if pin_memory else t

    checkpoints = None
    if out.checkpoints:
        seq_idx, pos, slot = zip(*out.checkpoints)
        checkpoints = StateCheckpoints(
            tensor(list(seq_idx), torch.int32), tensor(list(pos), torch.int32), tensor(list(slot), torch.int32)
        )
    context = tensor(context_lens, torch.int32)
    slots = tensor(state_slots, torch.int32)
    batch = RaggedBatch(
        input_ids=tensor(input_ids, torch.int64),
        positions=tensor(positions, torch.int64),
        cu_seqlens=tensor(cu_seqlens, torch.int32),
        context_lens=context,
        seq_lens=tensor(seq_lens, torch.int32),
        state_slots=slots,
        has_initial_state=context > 0,
        block_tables=block_tables.pin_memory() if pin_memory else block_tables,
        slot_mapping=tensor(slot_mapping, torch.int64),
        logits_indices=tensor(logits_indices, torch.int64),
        query_lens=query_lens,
        kv_lens=seq_lens,
        is_decode=out.is_decode,
        checkpoints=checkpoints,
        state_visit=slot_visit_order(slots) if out.is_decode and len(state_slots) >= VISIT_MIN_SEQS else None,
    )
    num_verifying = out.num_verifying
    if num_verifying:
        verifying = out.chunks[:num_verifying]
        if any(not c.drafts for c in verifying) or len({c.num_tokens for c in verifying}) != 1:
            raise ValueError("build_batch: verifying decodes must come first, all of one width")
        rest = batch.tail(num_verifying) if num_verifying < len(out.chunks) else None
        batch.spec = SpecVerify(num_verifying, verifying[0].num_tokens,
                                tensor([c.verify_slots for c in verifying], torch.int32), rest)
    return batch
