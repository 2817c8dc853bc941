"""CUDA graphs for decode steps: one captured forward per (batch bucket, width, key-length bucket), replayed.

A GPU decode step is mostly host work: ~265 kernel launches, custom-op dispatch and argument checks for a few
ms of kernels (docs/engine.md). Replaying a captured graph costs one launch. What a graph needs:

- Fixed shapes. A step of N sequences runs the graph of the smallest batch bucket >= N (powers of two up to
  max_num_seqs); the extra rows are padding: state slot -1 (the KDA and conv kernels skip them and write
  zero outputs), sequence length 0, and their MLA latent goes to a scratch KV slot that no request owns.
- Key lengths. On the paged MLA kernel (KimiLinearModel.decode_any_length) one graph serves every length:
  the kernel reads each sequence's key count and block-table row on the device and divides the keys among
  a fixed number of CTAs there, so the graph is captured once, at the model's length, with block tables of
  full width, and no step waits for a capture when a conversation grows. (A capture per length bucket cost
  a multi-turn conversation ~22 ms before the first token of nearly every turn: docs/engine.md.) The
  torch-ops attention instead gathers keys up to a key-length bucket (from 512 tokens in quarter-octave
  steps, >= every sequence's length and block table) and masks each sequence at its real length: a graph
  per bucket there.
- Static inputs. The graph reads the step from persistent device buffers; each step copies its batch into
  them (a few small host-to-device copies) before the replay.
- No host syncs inside. The ops skip their host-side index checks while capturing; MLA takes its key lengths
  from RaggedBatch.kv_lens (host); the MoE runs its grouped GEMMs (KimiLinearModel.decode_capturable).

Speculative decoding's verifying steps (every sequence W tokens: its last one and W-1 drafts, the KDA states
after each kept in slots of their own, RaggedBatch.spec) replay graphs of width W.
Their padding rows verify nothing (state slot -1, length 0) and send the states they would keep to one scratch
state slot beside the pool, as their latents go to the scratch KV slot.

The graphs of every batch bucket and width (at the smallest key-length bucket, or the one of every length) are
captured when the engine starts (`capture_batch_buckets`, ~50 ms each on an H100), longer buckets' on the first
step that needs them; all go into one shared memory pool: steps replay one at a time and each step's logits are
consumed (sampled) before the next replay, so graphs may share memory.
"""

from __future__ import annotations

import contextlib
import gc
import logging

import torch

from ..model.batch import RaggedBatch, SpecVerify
from ..ops import indices_checked_by_caller, slot_visit_order
from .batch_builder import VISIT_MIN_SEQS  # also the bucket from which a decode graph passes the order

log = logging.getLogger(__name__)

MIN_KV_BUCKET = 512  # tokens: below this the padded key gather costs less than a second graph


@contextlib.contextmanager
def collector_paused():
    """Python's garbage collector held off during a capture. A collection there may destroy unreachable CUDA
    graphs (another engine's) and free their memory pools, calls that invalidate the capture ("operation failed
    due to a previous error during capture"); in the tests, where engines come and go, it did."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def warm_up(device: torch.device, fn) -> None:
    """Runs fn() once eagerly on a side stream, as a capture wants before it: lazy initialisation (cuBLAS
    workspaces and kernel choices for these shapes, library loads) happens outside the graph."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)


def capture(fn, pool):
    """(graph, fn()'s outputs): fn captured into the memory pool `pool` (None: a new one; the graph's is
    graph.pool()), the garbage collector paused (collector_paused)."""
    graph = torch.cuda.CUDAGraph()
    with collector_paused(), torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


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
    """Captured decode and verifying steps of `model` over `caches`; `run(batch)` returns the step's logits.

    scratch_slot: a flat KV-cache slot outside every request's blocks, where padding rows write their latent.
    scratch_state_slot: a state slot outside the pool's, where padding rows of a verifying step write the
    states they would keep. max_width: the widest verifying step (1 + the most drafts; 1 without speculation).
    any_length: one graph per batch bucket and width serves every key length (model.decode_any_length).
    """

    def __init__(self, model, caches, max_num_seqs: int, block_size: int, max_model_len: int, scratch_slot: int,
                 max_width: int = 1, scratch_state_slot: int | None = None, any_length: bool = False):
        self.model, self.caches = model, caches
        self.max_num_seqs, self.block_size = max_num_seqs, block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.kv_limit = self.max_blocks * block_size
        self.any_length = any_length
        self.scratch_slot, self.scratch_state_slot = scratch_slot, scratch_state_slot
        if max_width > 1 and scratch_state_slot is None:
            raise ValueError("DecodeGraphs: verifying steps need a scratch state slot")
        self.max_width = max_width
        dev, n, t = model.device, max_num_seqs, max_num_seqs * max_width
        i32, i64 = dict(dtype=torch.int32, device=dev), dict(dtype=torch.int64, device=dev)
        # The step's inputs, rewritten before every replay (rows past the step's N hold padding). Token buffers
        # hold up to max_width tokens per sequence; a step of width W uses their first nb * W entries.
        self.input_ids = torch.zeros(t, **i64)
        self.positions = torch.zeros(t, **i64)
        self.slot_mapping = torch.full((t,), scratch_slot, **i64)
        self.out_slots = torch.full((t,), -1 if scratch_state_slot is None else scratch_state_slot, **i32)
        self.seq_lens = torch.zeros(n, **i32)
        self.state_slots = torch.full((n,), -1, **i32)
        # (row, slot) pairs in the KDA decode kernel's visit order, a padding row (row, -1); host copy of the
        # padding pairs, appended to a step's own before the one copy
        self._pad_visit = torch.stack((torch.arange(n, dtype=torch.int32), torch.full((n,), -1, dtype=torch.int32)), 1)
        self.state_visit = self._pad_visit.to(dev)
        self.block_tables = torch.full((n, self.max_blocks), -1, **i32)
        # Constant: one token per sequence (decode) or W (cu_seqlens made per width).
        self.cu_seqlens = torch.arange(n + 1, **i32)
        self.logits_indices = torch.arange(t, **i64)
        self.has_initial_state = torch.ones(n, dtype=torch.bool, device=dev)
        self._cu_seqlens = {1: self.cu_seqlens}  # per width; kept alive as long as the graphs that read them
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def batch_buckets(self) -> list[int]:
        return sorted({batch_bucket(n, self.max_num_seqs) for n in range(1, self.max_num_seqs + 1)})

    def key_bucket(self, max_kv_len: int) -> int:
        """The key length a step's graph is captured at: the model's with any_length, else the step's bucket."""
        return self.kv_limit if self.any_length else kv_bucket(max_kv_len, self.block_size, self.kv_limit)

    def capture_batch_buckets(self) -> None:
        """Captures every batch bucket of decode and verifying steps (every width) at the smallest key-length
        bucket (with any_length, the only one), so that short-context steps never wait for a capture."""
        kv = self.key_bucket(1)
        gc.collect()  # what is unreachable goes before the captures, not during one (capture)
        for w in range(1, self.max_width + 1):
            for nb in self.batch_buckets():
                if (nb, w, kv) not in self.graphs:
                    self.graphs[(nb, w, kv)] = self._capture(nb, w, kv)

    @staticmethod
    def step_width(batch: RaggedBatch) -> int | None:
        """1 for a decode step, W for a step in which every sequence verifies W tokens, None for any other."""
        if batch.checkpoints is not None or not batch.kv_lens:
            return None
        if batch.is_decode:
            return 1
        spec = batch.spec
        return spec.width if spec is not None and spec.rest is None else None

    def run(self, batch: RaggedBatch, patch: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """batch: a decode or all-verifying step (step_width not None; host tensors, kv_lens given). patch:
        (token rows, device token ids) that replace those rows' input ids (tokens not read back yet). Returns
        fp32 logits [N * W, vocab]."""
        n, w = batch.num_seqs, self.step_width(batch)
        if w is None or w > self.max_width:
            raise ValueError(f"DecodeGraphs.run: not a step these graphs replay (width {w})")
        nb = batch_bucket(n, self.max_num_seqs)
        width = batch.block_tables.shape[1]
        kv = self.key_bucket(max(max(batch.kv_lens), width * self.block_size))
        key = (nb, w, kv)
        if key not in self.graphs:
            self.graphs[key] = self._capture(nb, w, kv)
        graph, logits = self.graphs[key]
        self._load(batch, n, nb, w, width, kv // self.block_size)
        if patch is not None:
            self.input_ids.index_copy_(0, *patch)
        graph.replay()
        return logits[: n * w]

    def _load(self, batch: RaggedBatch, n: int, nb: int, w: int, width: int, graph_width: int) -> None:
        """Copies the step into the static buffers; rows n..nb-1 become padding. Only the first graph_width
        block-table columns are read by the graph; with any_length only a sequence's own blocks (those holding
        its keys), so the columns past the step's width keep what earlier steps left there."""
        self._pad(n, nb, w, graph_width)
        for dst, src in ((self.input_ids, batch.input_ids), (self.positions, batch.positions),
                         (self.slot_mapping, batch.slot_mapping)):
            dst[: n * w].copy_(src, non_blocking=True)
        for dst, src in ((self.seq_lens, batch.seq_lens), (self.state_slots, batch.state_slots)):
            dst[:n].copy_(src, non_blocking=True)
        if self._passes_visit(nb, w):  # the padding rows' pairs after the step's: any order is a valid one
            visit = batch.state_visit if batch.state_visit is not None else slot_visit_order(batch.state_slots)
            self.state_visit[:nb].copy_(torch.cat((visit, self._pad_visit[n:nb])), non_blocking=True)
        if w > 1:
            self.out_slots[: n * w].copy_(batch.spec.out_slots.reshape(-1), non_blocking=True)
        self.block_tables[:n, :width].copy_(batch.block_tables, non_blocking=True)
        if not self.any_length:  # the torch-ops attention gathers every column up to the bucket
            self.block_tables[:n, width:graph_width].fill_(-1)

    def _pad(self, start: int, end: int, w: int, graph_width: int) -> None:
        tokens = slice(start * w, end * w)
        self.input_ids[tokens] = 0
        self.positions[tokens] = 0
        self.slot_mapping[tokens] = self.scratch_slot
        if self.scratch_state_slot is not None:
            self.out_slots[tokens] = self.scratch_state_slot
        self.seq_lens[start:end] = 0
        self.state_slots[start:end] = -1
        if not self.any_length:  # with any_length a padding row's length 0 reads no column
            self.block_tables[start:end, :graph_width] = -1

    @staticmethod
    def _passes_visit(nb: int, w: int) -> bool:
        """Whether the graph of bucket nb and width w passes the KDA decode kernel its visit order."""
        return w == 1 and nb >= VISIT_MIN_SEQS

    def _static_batch(self, nb: int, w: int, kv: int) -> RaggedBatch:
        t = nb * w
        if w not in self._cu_seqlens:
            self._cu_seqlens[w] = self.cu_seqlens * w
        spec = None
        if w > 1:
            spec = SpecVerify(nb, w, self.out_slots[:t].view(nb, w), None)
        return RaggedBatch(
            input_ids=self.input_ids[:t],
            positions=self.positions[:t],
            cu_seqlens=self._cu_seqlens[w][: nb + 1],
            context_lens=self.seq_lens[:nb],  # not read by a decode or verifying step
            seq_lens=self.seq_lens[:nb],
            state_slots=self.state_slots[:nb],
            has_initial_state=self.has_initial_state[:nb],
            block_tables=self.block_tables[:nb, : kv // self.block_size],
            slot_mapping=self.slot_mapping[:t],
            logits_indices=self.logits_indices[:t],
            query_lens=[w] * nb,
            kv_lens=[kv] * nb,
            is_decode=w == 1,
            spec=spec,
            state_visit=self.state_visit[:nb] if self._passes_visit(nb, w) else None,
        )

    def _capture(self, nb: int, w: int, kv: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm-up and capture on an all-padding batch: nothing but the scratch KV slot (and state slot) is
        written."""
        self._pad(0, nb, w, kv // self.block_size)
        self.state_visit.copy_(self._pad_visit)  # the warm-up runs the kernels: no real slot may be listed
        batch = self._static_batch(nb, w, kv)
        # the warm-up with the index checks off as in capture: the padding rows of a verifying step share the
        # scratch state slot
        with indices_checked_by_caller():
            warm_up(self.model.device, lambda: self.model.forward(batch, self.caches))
        graph, logits = capture(lambda: self.model.forward(batch, self.caches), self.pool)
        self.pool = graph.pool()
        log.info("captured the %s graph for %d sequences, keys up to %d tokens",
                 "decode" if w == 1 else f"verify (width {w})", nb, kv)
        return graph, logits
