"""CUDA graphs for decode steps: one captured forward per (batch bucket, key-length bucket), replayed.

A GPU decode step is mostly host work: ~265 kernel launches, custom-op dispatch and argument checks for a few
ms of kernels (docs/engine.md). Replaying a captured graph costs one launch. What a graph needs:

- Fixed shapes. A step of N sequences runs the graph of the smallest batch bucket >= N (powers of two up to
  max_num_seqs); the extra rows are padding: state slot -1 (the KDA and conv kernels skip them and write
  zero outputs), sequence length 0, and their MLA latent goes to a scratch KV slot that no request owns. MLA
  gathers keys up to a key-length bucket (from 512 tokens in quarter-octave steps, >= every sequence's length
  and block table) and masks each sequence at its real length, so one graph serves every length in its
  bucket.
- Static inputs. The graph reads the step from persistent device buffers; each step copies its batch into
  them (a few small host-to-device copies) before the replay.
- No host syncs inside. The ops skip their host-side index checks while capturing; MLA takes its key lengths
  from RaggedBatch.kv_lens (host); the MoE runs its grouped GEMMs (KimiLinearModel.decode_capturable).

The graphs of every batch bucket at the smallest key-length bucket are captured when the engine starts
(`capture_batch_buckets`, ~50 ms each on an H100), longer contexts' on the first step that needs them; all go
into one shared memory pool: steps replay one at a time and each step's logits are consumed (sampled) before
the next replay, so graphs may share memory.
"""

from __future__ import annotations

import logging

import torch

from ..model.batch import RaggedBatch

log = logging.getLogger(__name__)

MIN_KV_BUCKET = 512  # tokens: below this the padded key gather costs less than a second graph


def batch_bucket(n: int, max_num_seqs: int) -> int:
    """The smallest power of two >= n, capped at max_num_seqs (itself a bucket)."""
    if not 1 <= n <= max_num_seqs:
        raise ValueError(f"decode batch of {n} sequences outside [1, {max_num_seqs}]")
    return min(1 << (n - 1).bit_length(), max_num_seqs)


def kv_bucket(max_kv_len: int, block_size: int, limit: int) -> int:
    """Key-length bucket in tokens, >= max(max_kv_len, MIN_KV_BUCKET): a multiple of a quarter of the power of
    two at or below it (so at most a quarter more keys are gathered than needed: 16,448 -> 20,480 rather than
    32,768), a multiple of block_size, at most `limit` (the model length rounded up to whole blocks)."""
    n = max(max_kv_len, MIN_KV_BUCKET)
    quarter = max((1 << (n.bit_length() - 1)) // 4, block_size)
    bucket = -(-n // quarter) * quarter
    bucket = -(-bucket // block_size) * block_size
    return min(bucket, limit)


class DecodeGraphs:
    """Captured decode steps of `model` over `caches`; `run(batch)` returns the step's logits [N, vocab].

    scratch_slot: a flat KV-cache slot outside every request's blocks, where padding rows write their latent.
    """

    def __init__(self, model, caches, max_num_seqs: int, block_size: int, max_model_len: int, scratch_slot: int):
        self.model, self.caches = model, caches
        self.max_num_seqs, self.block_size = max_num_seqs, block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.kv_limit = self.max_blocks * block_size
        self.scratch_slot = scratch_slot
        dev, n = model.device, max_num_seqs
        i32, i64 = dict(dtype=torch.int32, device=dev), dict(dtype=torch.int64, device=dev)
        # The step's inputs, rewritten before every replay (rows past the step's N hold padding).
        self.input_ids = torch.zeros(n, **i64)
        self.positions = torch.zeros(n, **i64)
        self.seq_lens = torch.zeros(n, **i32)
        self.state_slots = torch.full((n,), -1, **i32)
        self.block_tables = torch.full((n, self.max_blocks), -1, **i32)
        self.slot_mapping = torch.full((n,), scratch_slot, **i64)
        # Constant for decode: one token per sequence.
        self.cu_seqlens = torch.arange(n + 1, **i32)
        self.logits_indices = torch.arange(n, **i64)
        self.has_initial_state = torch.ones(n, dtype=torch.bool, device=dev)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def batch_buckets(self) -> list[int]:
        return sorted({batch_bucket(n, self.max_num_seqs) for n in range(1, self.max_num_seqs + 1)})

    def capture_batch_buckets(self) -> None:
        """Captures every batch bucket at the smallest key-length bucket, so that short-context decode steps
        never wait for a capture."""
        kv = kv_bucket(1, self.block_size, self.kv_limit)
        for nb in self.batch_buckets():
            if (nb, kv) not in self.graphs:
                self.graphs[(nb, kv)] = self._capture(nb, kv)

    def run(self, batch: RaggedBatch) -> torch.Tensor:
        """batch: a decode step (is_decode, host tensors, kv_lens given). Returns fp32 logits [N, vocab]."""
        n = batch.num_seqs
        nb = batch_bucket(n, self.max_num_seqs)
        width = batch.block_tables.shape[1]
        kv = kv_bucket(max(max(batch.kv_lens), width * self.block_size), self.block_size, self.kv_limit)
        key = (nb, kv)
        if key not in self.graphs:
            self.graphs[key] = self._capture(nb, kv)
        graph, logits = self.graphs[key]
        self._load(batch, n, nb, width, kv // self.block_size)
        graph.replay()
        return logits[:n]

    def _load(self, batch: RaggedBatch, n: int, nb: int, width: int, graph_width: int) -> None:
        """Copies the step into the static buffers; rows n..nb-1 become padding. Only the first graph_width
        block-table columns are read by the graph."""
        self._pad(n, nb, graph_width)
        for dst, src in ((self.input_ids, batch.input_ids), (self.positions, batch.positions),
                         (self.seq_lens, batch.seq_lens), (self.state_slots, batch.state_slots),
                         (self.slot_mapping, batch.slot_mapping)):
            dst[:n].copy_(src, non_blocking=True)
        self.block_tables[:n, :width].copy_(batch.block_tables, non_blocking=True)
        self.block_tables[:n, width:graph_width].fill_(-1)

    def _pad(self, start: int, end: int, graph_width: int) -> None:
        self.input_ids[start:end] = 0
        self.positions[start:end] = 0
        self.seq_lens[start:end] = 0
        self.state_slots[start:end] = -1
        self.slot_mapping[start:end] = self.scratch_slot
        self.block_tables[start:end, :graph_width] = -1

    def _static_batch(self, nb: int, kv: int) -> RaggedBatch:
        return RaggedBatch(
            input_ids=self.input_ids[:nb],
            positions=self.positions[:nb],
            cu_seqlens=self.cu_seqlens[: nb + 1],
            context_lens=self.seq_lens[:nb],  # not read by a decode step
            seq_lens=self.seq_lens[:nb],
            state_slots=self.state_slots[:nb],
            has_initial_state=self.has_initial_state[:nb],
            block_tables=self.block_tables[:nb, : kv // self.block_size],
            slot_mapping=self.slot_mapping[:nb],
            logits_indices=self.logits_indices[:nb],
            query_lens=[1] * nb,
            kv_lens=[kv] * nb,
            is_decode=True,
        )

    def _capture(self, nb: int, kv: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm-up and capture on an all-padding batch: nothing but the scratch KV slot is written."""
        self._pad(0, nb, kv // self.block_size)
        batch = self._static_batch(nb, kv)
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(stream):  # lazy initialisation (cuBLAS workspaces, library load) outside capture
            self.model.forward(batch, self.caches)
        torch.cuda.current_stream(self.model.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model.forward(batch, self.caches)
        self.pool = graph.pool()
        log.info("captured the decode graph for %d sequences, keys up to %d tokens", nb, kv)
        return graph, logits
