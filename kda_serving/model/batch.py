"""The ragged batch: everything one engine step tells the model, built once per step and read by every layer.

A step packs the scheduled work of many requests (prefill chunks and decodes) into one flat token stream of
length T. Sequence n owns tokens cu_seqlens[n]:cu_seqlens[n+1]. KDA layers read their recurrent and conv
states from slot `state_slots[n]` of their pools (starting from zero where `has_initial_state[n]` is False)
and write them back in place; MLA layers append the new tokens' latent KV at `slot_mapping` and attend over
the blocks listed in `block_tables[n]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops.contract import KDACheckpoints, validate_checkpoints, validate_cu_seqlens, validate_slot_indices


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
    logits_indices: torch.Tensor  # [N] int64, index in [0, T) of the token whose logits each sequence needs
    query_lens: list[int] = field(default_factory=list)  # host copy of the new-token counts
    # host copy of seq_lens, or an upper bound of each (a captured decode step pads every sequence to its
    # bucket); MLA layers size their key blocks from it without reading seq_lens back from the device
    kv_lens: list[int] = field(default_factory=list)
    is_decode: bool = False  # every sequence has exactly one new token and a cached context
    checkpoints: StateCheckpoints | None = None

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
                   "has_initial_state": self.has_initial_state, "logits_indices": self.logits_indices,
                   "block_tables": self.block_tables}
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
        if N and (int(self.logits_indices.min()) < 0 or int(self.logits_indices.max()) >= T):
            raise ValueError(f"RaggedBatch.logits_indices: an entry lies outside the {T} tokens")
        if self.checkpoints is not None:
            ckpt = self.checkpoints
            validate_checkpoints(KDACheckpoints(ckpt.seq, ckpt.pos, ckpt.slot), N, T, 1, self.cu_seqlens,
                                 num_state_slots, self.state_slots, cpu)

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
        )
