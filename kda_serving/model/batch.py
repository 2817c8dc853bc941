"""The ragged batch: everything one engine step tells the model, built once per step and read by every layer.

A step packs the scheduled work of many requests (prefill chunks and decodes) into one flat token stream of
length T. Sequence n owns tokens cu_seqlens[n]:cu_seqlens[n+1]. KDA layers read their recurrent and conv
states from slot `state_slots[n]` of their pools (starting from zero where `has_initial_state[n]` is False)
and write them back in place; MLA layers append the new tokens' latent KV at `slot_mapping` and attend over
the blocks listed in `block_tables[n]`.

With speculative decoding a step's first sequences may verify drafts (SpecVerify): each feeds its last
sampled token and W-1 draft tokens, and its KDA layers keep the state after every one of them in slots of
its own, for the engine to adopt the one after the last accepted token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops.contract import (
    KDACheckpoints,
    validate_checkpoints,
    validate_cu_seqlens,
    validate_slot_indices,
    validate_visit_order,
)


def host_to_device(data: list, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.tensor(data, device=device) without its wait for the device: that constructor copies with a
    stream synchronisation, which would idle the GPU while the host queues the next kernels. From pageable
    memory a non-blocking copy is staged before it returns, so `data` need not outlive it."""
    return torch.tensor(data, dtype=dtype).to(device, non_blocking=True)


@dataclass
class StateCheckpoints:
    """KDA states to save inside this step's prefill, for the prefix cache (see docs/kda-contract.md).

    seq[m] indexes the batch's sequences; after its first pos[m] *new* tokens of this step, the recurrent
    state is written to pool slot slot[m] (pos[m] a multiple of the checkpoint alignment).
    """

    seq: torch.Tensor  # [M] int32
    pos: torch.Tensor  # [M] int32
    slot: torch.Tensor  # [M] int32


@dataclass
class SpecVerify:
    """The batch's first `num_seqs` sequences verify drafts: each has exactly `width` tokens (its last sampled
    token and width-1 drafts), the batch's first num_seqs * width tokens. Their KDA layers leave state slot
    state_slots[n] as it was and write the recurrent and conv state after token t to out_slots[n, t].
    `rest` is the batch's other sequences as a batch of their own (None if there are none), for the layers
    that run them apart; the whole batch's logits_indices name every verify token."""

    num_seqs: int
    width: int
    out_slots: torch.Tensor  # [num_seqs, width] int32, distinct, none a state_slots entry
    rest: "RaggedBatch | None"

    @property
    def num_tokens(self) -> int:
        return self.num_seqs * self.width


@dataclass
class RaggedBatch:
    input_ids: torch.Tensor  # [T] int64, the new tokens of all sequences, packed
    positions: torch.Tensor  # [T] int64, absolute position of each token within its sequence
    cu_seqlens: torch.Tensor  # [N+1] int32, new-token boundaries per sequence
    context_lens: torch.Tensor  # [N] int32, tokens already cached for the sequence before this step
    seq_lens: torch.Tensor  # [N] int32, context_lens + new tokens
    state_slots: torch.Tensor  # [N] int32, KDA recurrent/conv state slot of each sequence
    has_initial_state: torch.Tensor  # [N] bool, context_lens > 0
    block_tables: torch.Tensor  # [N, max_blocks] int32, MLA latent-KV blocks per sequence (-1 = none)
    slot_mapping: torch.Tensor  # [T] int64, flat KV-cache slot (block * block_size + offset) of each new token
    # [R] int64, the tokens (index in [0, T)) whose logits the step needs: one per sequence, in order, and
    # every token of a verifying sequence
    logits_indices: torch.Tensor
    query_lens: list[int] = field(default_factory=list)  # host copy of the new-token counts
    # host copy of seq_lens (in a decode-only step, an upper bound of each: a captured decode step pads every
    # sequence to its bucket); MLA layers size their work from it without reading seq_lens back from the device
    kv_lens: list[int] = field(default_factory=list)
    is_decode: bool = False  # every sequence has exactly one new token and a cached context
    checkpoints: StateCheckpoints | None = None
    spec: SpecVerify | None = None
    # [N, 2] int32 (sequence, state slot) pairs by increasing slot, or None: the order in which the KDA decode
    # kernel takes a decode step's sequences (ops.slot_visit_order), as it streams the states faster
    state_visit: torch.Tensor | None = None

    @property
    def decode_only(self) -> bool:
        """Every sequence decodes (one token) or verifies drafts: no prompt tokens in the step."""
        if self.spec is None:
            return self.is_decode
        return self.spec.rest is None or self.spec.rest.is_decode

    @property
    def num_seqs(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def check(self, num_state_slots: int, num_kv_blocks: int, block_size: int) -> None:
        """Checks every index this batch holds against the caches it will index (state pools of
        num_state_slots slots, num_kv_blocks latent-KV blocks of block_size rows); raises ValueError. Run on
        the host tensors, once per step, so that the layers can skip the per-op checks that would copy the
        indices back from the GPU (ops.indices_checked_by_caller). A bad index reaching a CUDA kernel or an
        indexing op would otherwise end the process's CUDA context, taking every request with it."""
        T, N, cpu = self.num_tokens, self.num_seqs, torch.device("cpu")
        validate_cu_seqlens(self.cu_seqlens, T, cpu)
        validate_slot_indices("state_slots", self.state_slots, N, num_state_slots, cpu)
        per_seq = {"context_lens": self.context_lens, "seq_lens": self.seq_lens,
                   "has_initial_state": self.has_initial_state, "block_tables": self.block_tables}
        for name, t in per_seq.items():
            if t.shape[0] != N:
                raise ValueError(f"RaggedBatch.{name}: expected {N} rows, got {t.shape[0]}")
        for name, t in (("positions", self.positions), ("slot_mapping", self.slot_mapping)):
            if t.shape != (T,):
                raise ValueError(f"RaggedBatch.{name}: expected shape ({T},), got {tuple(t.shape)}")
        num_kv_slots = num_kv_blocks * block_size
        if T and (int(self.slot_mapping.min()) < 0 or int(self.slot_mapping.max()) >= num_kv_slots):
            raise ValueError(f"RaggedBatch.slot_mapping: an entry lies outside the {num_kv_slots} KV rows")
        if self.block_tables.numel() and (int(self.block_tables.min()) < -1
                                          or int(self.block_tables.max()) >= num_kv_blocks):
            raise ValueError(f"RaggedBatch.block_tables: a block id lies outside [-1, {num_kv_blocks})")
        # (elementwise, not a boolean index: 45 us against 0.34 ms at 256 tables of 125 blocks)
        holds_keys = torch.arange(self.block_tables.shape[1]) * block_size < self.seq_lens[:, None]
        if bool(((self.block_tables < 0) & holds_keys).any()):
            raise ValueError("RaggedBatch.block_tables: a sequence's keys reach an entry of -1 (no block)")
        if self.logits_indices.dim() != 1 or self.logits_indices.shape[0] < N:
            raise ValueError(f"RaggedBatch.logits_indices: expected at least {N} entries, got "
                             f"{tuple(self.logits_indices.shape)}")
        if N and (int(self.logits_indices.min()) < 0 or int(self.logits_indices.max()) >= T):
            raise ValueError(f"RaggedBatch.logits_indices: an entry lies outside the {T} tokens")
        self.check_host_lengths(block_size)
        if self.spec is not None:
            self._check_spec(num_state_slots, num_kv_blocks, block_size)
        if self.state_visit is not None:
            validate_visit_order(self.state_visit, self.state_slots, N, cpu)
        if self.checkpoints is not None:
            ckpt = self.checkpoints
            validate_checkpoints(KDACheckpoints(ckpt.seq, ckpt.pos, ckpt.slot), N, T, 1, self.cu_seqlens,
                                 num_state_slots, self.state_slots, cpu)

    def check_host_lengths(self, block_size: int) -> None:
        """The host copies (query_lens, kv_lens, where given) against cu_seqlens and seq_lens: the new-token
        counts equal; the key counts equal, or in a decode-only step bound, the sequence lengths, and fit the
        block tables. MLA layers size gathers and attention calls from them; raises ValueError. Reads
        cu_seqlens and seq_lens on the host."""
        N = self.num_seqs
        if self.query_lens and list(self.query_lens) != self.cu_seqlens.diff().tolist():
            raise ValueError("RaggedBatch.query_lens: must equal the new-token counts of cu_seqlens")
        if not self.kv_lens:
            return
        if len(self.kv_lens) != N:
            raise ValueError(f"RaggedBatch.kv_lens: expected {N} entries, got {len(self.kv_lens)}")
        exact, room = not self.decode_only, self.block_tables.shape[1] * block_size
        for n, (kv, length) in enumerate(zip(self.kv_lens, self.seq_lens.tolist())):
            if kv < length or (exact and kv != length) or kv > room:
                raise ValueError(f"RaggedBatch.kv_lens[{n}]: {kv} keys for a sequence of {length} tokens (must be "
                                 f"{'equal' if exact else 'at least'}, and at most the {room} rows of its block table)")

    def _check_spec(self, num_state_slots: int, num_kv_blocks: int, block_size: int) -> None:
        spec, cpu = self.spec, torch.device("cpu")
        nv, width = spec.num_seqs, spec.width
        if not 0 < nv <= self.num_seqs or width < 2 or spec.num_tokens > self.num_tokens:
            raise ValueError(f"RaggedBatch.spec: {nv} sequences of {width} tokens do not fit the batch")
        if not torch.equal(self.cu_seqlens[: nv + 1].long(), torch.arange(nv + 1) * width):
            raise ValueError(f"RaggedBatch.spec: the first {nv} sequences must have {width} tokens each")
        if tuple(spec.out_slots.shape) != (nv, width):
            raise ValueError(f"RaggedBatch.spec.out_slots: expected shape {(nv, width)}, got "
                             f"{tuple(spec.out_slots.shape)}")
        validate_slot_indices("spec.out_slots", spec.out_slots, nv * width, num_state_slots, cpu, allow_pad=False)
        if set(spec.out_slots.reshape(-1).tolist()) & set(self.state_slots.tolist()):
            raise ValueError("RaggedBatch.spec.out_slots: a slot is also a sequence's state slot")
        if (spec.rest is None) != (nv == self.num_seqs):
            raise ValueError("RaggedBatch.spec.rest: must hold exactly the sequences that do not verify")
        if spec.rest is not None:
            spec.rest.check(num_state_slots, num_kv_blocks, block_size)

    def tail(self, first: int) -> "RaggedBatch":
        """Sequences first.. of this batch as a batch of their own (their tokens, indices and checkpoints
        renumbered; logits one per sequence); for SpecVerify.rest."""
        t0 = int(self.cu_seqlens[first])
        ckpt = self.checkpoints
        if ckpt is not None:
            ckpt = StateCheckpoints(ckpt.seq - first, ckpt.pos, ckpt.slot)
        cu = self.cu_seqlens[first:] - t0
        return RaggedBatch(
            input_ids=self.input_ids[t0:],
            positions=self.positions[t0:],
            cu_seqlens=cu,
            context_lens=self.context_lens[first:],
            seq_lens=self.seq_lens[first:],
            state_slots=self.state_slots[first:],
            has_initial_state=self.has_initial_state[first:],
            block_tables=self.block_tables[first:],
            slot_mapping=self.slot_mapping[t0:],
            logits_indices=cu[1:].long() - 1,
            query_lens=list(self.query_lens[first:]),
            kv_lens=list(self.kv_lens[first:]),
            is_decode=all(n == 1 for n in self.query_lens[first:]) and bool(self.context_lens[first:].all()),
            checkpoints=ckpt,
        )

    def to(self, device: torch.device | str) -> "RaggedBatch":
        """The same batch with every tensor on `device` (non-blocking copies from pinned memory where given)."""

        def move(t):
            return t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t

        ckpt = self.checkpoints
        if ckpt is not None:
            ckpt = StateCheckpoints(move(ckpt.seq), move(ckpt.pos), move(ckpt.slot))
        return RaggedBatch(
            input_ids=move(self.input_ids),
            positions=move(self.positions),
            cu_seqlens=move(self.cu_seqlens),
            context_lens=move(self.context_lens),
            seq_lens=move(self.seq_lens),
            state_slots=move(self.state_slots),
            has_initial_state=move(self.has_initial_state),
            block_tables=move(self.block_tables),
            slot_mapping=move(self.slot_mapping),
            logits_indices=move(self.logits_indices),
            query_lens=list(self.query_lens),
            kv_lens=list(self.kv_lens),
            is_decode=self.is_decode,
            checkpoints=ckpt,
            state_visit=move(self.state_visit),
            spec=None if self.spec is None else SpecVerify(
                self.spec.num_seqs, self.spec.width, move(self.spec.out_slots),
                None if self.spec.rest is None else self.spec.rest.to(device),
            ),
        )
