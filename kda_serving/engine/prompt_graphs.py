"""Piecewise CUDA graphs for steps with prompt tokens: the token-wise parts captured per token count, the mixers
eager between them.

A short step with prompt tokens is bound by the host: on an H100, 4 Kimi-Linear-48B-shaped layers spent 13.2 ms
queueing the forward of one 64-token prompt against 2.5 ms of GPU time, about 200 launches at 8-27 us each
(docs/engine.md). Its sequences' lengths change every step, so it cannot be captured whole as a decode step is
(cuda_graphs.py); but most of its kernels never look at the sequences. The model's forward is cut where it does
(KimiLinearModel.piece / .mix):

- Pieces (captured): the embedding, the norms, the mixers' projections and the MLA cache write, the output
  projections, the MLPs and MoEs. They see only the step's tokens (batch.input_ids and batch.slot_mapping), so
  one capture per token count serves every step of that count. A piece runs from a layer's mixer to the next.
- Mixers (eager, between the replays): the short convolution and the KDA recurrence, and MLA attention. They
  read the real batch (cu_seqlens, state slots, block tables, checkpoints, speculative verification) and plan
  their launches on the host as an eager step does.

vLLM splits its forward the same way ("piecewise" CUDA graphs around attention).

- Token buckets: a step of T tokens replays the pieces of the smallest bucket >= T (token_buckets). Its rows
  T.. are padding: token 0, whose latent goes to the scratch KV slot that no request owns (as the decode
  graphs' padding does). The mixers see rows :T only; each writes rows :T of its output buffer, so the pieces'
  padding rows read stale values there. Every piece works row by row (GEMMs, norms, the MoE routes each
  token on its own), so a padding row never reaches a real one.
- Memory: the pieces of every bucket share one pool with the decode graphs. A piece's outputs are kept only
  until the next piece is captured, as an eager step frees them once read: at replay they are dead by then
  too. The pool so holds about one eager step's activations at the largest bucket rather than one set per
  piece; the runner reaches the outputs through non-owning views (_borrow).
- Steps over max_tokens run eagerly: there the GPU's work hides the host's (8 prompts of 1,024 tokens: 9.7
  ms of host under 21 ms of GPU).
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.batch import RaggedBatch
from ..ops import indices_checked_by_caller
from .cuda_graphs import capture, warm_up

log = logging.getLogger(__name__)

MIN_BUCKET = 16  # tokens; the smallest step with prompt tokens (a short turn) is about this size


def token_buckets(max_tokens: int) -> list[int]:
    """16, 24, 32, 48, 64, 96, ... (powers of two and 1.5 times them: at most half the rows padding, a third
    past 24) below max_tokens, then max_tokens itself."""
    if max_tokens < 1:
        raise ValueError(f"token_buckets: max_tokens must be >= 1, got {max_tokens}")
    buckets, b = [], MIN_BUCKET
    while b < max_tokens:
        buckets.append(b)
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3
    return buckets + [max_tokens]


def _borrow(t: torch.Tensor) -> torch.Tensor:
    """A tensor over t's memory that does not keep it allocated (how torch's own CUDA-graph trees hand out
    graph outputs): once t is freed, its memory may serve a later capture into the same pool, which is what
    lets the pieces of a step share memory (module doc)."""
    storage = t.untyped_storage()
    borrowed = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), t.device, storage.nbytes())
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(borrowed, t.storage_offset(), t.shape, t.stride())


@dataclass
class _Bucket:
    """The captured pieces of one token count: graphs[i] runs piece i, whose outputs are carries[i]."""

    graphs: list
    carries: list[dict[str, torch.Tensor]]


class PromptGraphs:
    """Steps of up to max_tokens tokens of `model` (the KimiLinearModel piece API) over `caches`, replayed from
    piecewise CUDA graphs; `run` returns a step's logits. scratch_slot: a flat KV-cache slot outside every
    request's blocks, where padding rows write their latent. pool: a graph memory pool to share (the decode
    graphs'), or None."""

    def __init__(self, model, caches, max_tokens: int, scratch_slot: int, pool=None):
        self.model, self.caches = model, caches
        self.buckets = token_buckets(max_tokens)
        self.max_tokens = max_tokens
        self.scratch_slot = scratch_slot
        self.num_layers = len(model.layers)
        dev, rows = model.device, self.buckets[-1]
        # the pieces' inputs, rewritten before every replay (rows past the step's tokens hold padding)
        self.input_ids = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((rows,), scratch_slot, dtype=torch.int64, device=dev)
        # each mixer's output, where the next piece reads it: one buffer per shape, shared by the layers (a
        # piece has read it before the next mixer writes it) and by the buckets (their first rows)
        shapes = {model.mix_shape(i) for i in range(self.num_layers)}
        self.mixer_out = {s: torch.zeros(rows, *s, dtype=model.dtype, device=dev) for s in shapes}
        self.captured: dict[int, _Bucket] = {}
        self.pool = pool

    def bucket(self, num_tokens: int) -> int:
        if not 1 <= num_tokens <= self.max_tokens:
            raise ValueError(f"PromptGraphs: a step of {num_tokens} tokens outside [1, {self.max_tokens}]")
        return next(b for b in self.buckets if b >= num_tokens)

    def capture_all(self) -> None:
        """Captures every bucket (at engine start, so that no step waits for a capture); logs the time taken
        and the memory the pool grew by."""
        gc.collect()  # what is unreachable goes before the captures, not during one (cuda_graphs.capture)
        start, reserved = time.perf_counter(), torch.cuda.memory_reserved(self.model.device)
        for b in reversed(self.buckets):  # the largest first: the smaller ones' temporaries fit in its blocks
            if b not in self.captured:
                self.captured[b] = self._capture(b)
        self.capture_seconds = time.perf_counter() - start
        self.capture_bytes = torch.cuda.memory_reserved(self.model.device) - reserved
        log.info("captured the prompt-step pieces of %d token counts up to %d in %.2f s (%.0f MiB more reserved)",
                 len(self.buckets), self.max_tokens, self.capture_seconds, self.capture_bytes / 2**20)

    def run(self, batch: RaggedBatch, device_batch: RaggedBatch,
            patch: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """batch: the step on the host (checked); device_batch: the same on the device. patch: (token rows, device
        token ids) that replace those rows' input ids. Returns fp32 logits [R, vocab]. The caller turns the
        mixers' index checks off (indices_checked_by_caller), as for an eager step."""
        T = batch.num_tokens
        rows = self.bucket(T)
        if rows not in self.captured:
            self.captured[rows] = self._capture(rows)
        captured = self.captured[rows]
        pad = rows - T
        self.input_ids[:rows].copy_(F.pad(batch.input_ids, (0, pad)), non_blocking=True)
        self.slot_mapping[:rows].copy_(F.pad(batch.slot_mapping, (0, pad), value=self.scratch_slot),
                                       non_blocking=True)
        if patch is not None:
            self.input_ids.index_copy_(0, *patch)
        model, caches = self.model, self.caches
        for i in range(self.num_layers):
            captured.graphs[i].replay()
            carry = {name: t[:T] for name, t in captured.carries[i].items()}
            self.mixer_out[model.mix_shape(i)][:T].copy_(model.mix(i, carry, device_batch, caches))
        captured.graphs[-1].replay()
        return model.logits(captured.carries[-1]["h"][:T], device_batch)

    def _static_batch(self, rows: int) -> RaggedBatch:
        """What the pieces read of a step of `rows` tokens: its tokens and KV slots (the rest is a placeholder
        one-sequence batch; no piece reads it)."""
        dev = self.model.device
        one = torch.ones(1, dtype=torch.int32, device=dev)
        return RaggedBatch(
            input_ids=self.input_ids[:rows], positions=torch.arange(rows, device=dev),
            cu_seqlens=torch.tensor([0, rows], dtype=torch.int32, device=dev), context_lens=one - 1,
            seq_lens=one * rows, state_slots=-one, has_initial_state=one.bool().logical_not(),
            block_tables=-one[None], slot_mapping=self.slot_mapping[:rows],
            logits_indices=torch.tensor([rows - 1], device=dev), query_lens=[rows], kv_lens=[rows],
        )

    def _piece_inputs(self, i: int, carry: dict, rows: int) -> dict:
        if i == 0:
            return {}
        return {**carry, "mixer_out": self.mixer_out[self.model.mix_shape(i - 1)][:rows]}

    @torch.inference_mode()
    def _capture(self, rows: int) -> _Bucket:
        """Warm-up, then one capture per piece on an all-padding step (only the scratch KV slot is written)."""
        self.input_ids[:rows] = 0
        self.slot_mapping[:rows] = self.scratch_slot
        batch = self._static_batch(rows)
        with indices_checked_by_caller():
            self._warm_up(batch, rows)
            graphs, carries, held = [], [], {}
            for i in range(self.num_layers + 1):
                graph, held = self._capture_piece(i, self._piece_inputs(i, held, rows), batch)
                # the outputs of piece i - 1 are released here: at replay they are dead once piece i has run
                graphs.append(graph)
                carries.append({name: _borrow(t) for name, t in held.items()})
        log.debug("captured the prompt-step pieces for %d tokens", rows)
        return _Bucket(graphs, carries)

    def _warm_up(self, batch: RaggedBatch, rows: int) -> None:
        """The pieces run once eagerly, in order, before their capture (cuda_graphs.warm_up)."""
        def pieces():
            carry = {}
            for i in range(self.num_layers + 1):
                carry = self.model.piece(i, self._piece_inputs(i, carry, rows), batch, self.caches)

        warm_up(self.model.device, pieces)

    def _capture_piece(self, i: int, inputs: dict, batch: RaggedBatch) -> tuple[torch.cuda.CUDAGraph, dict]:
        graph, out = capture(lambda: self.model.piece(i, inputs, batch, self.caches), self.pool)
        self.pool = graph.pool()
        return graph, out
