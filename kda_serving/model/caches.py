"""The model's per-request memory: KDA state slots and MLA latent-KV blocks, allocated once by the engine.

A request owns one state slot (the same index in every KDA layer's pools) and a list of KV blocks (the same
block ids in every MLA layer's cache). Slots and blocks are handed out by the engine's managers; the model
only reads and writes them through the RaggedBatch of each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import host_to_device


@dataclass
class ModelCaches:
    recurrent: list[torch.Tensor]  # per KDA layer: [S, H, V, K] fp32 recurrent states
    conv: list[torch.Tensor]  # per KDA layer: [S, W-1, conv_dim], the last W-1 conv inputs (oldest first)
    kv: list[torch.Tensor]  # per MLA layer: [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]

    @property
    def num_state_slots(self) -> int:
        return int(self.recurrent[0].shape[0]) if self.recurrent else 0

    @property
    def num_kv_blocks(self) -> int:
        return int(self.kv[0].shape[0]) if self.kv else 0

    def copy_states(self, src_slots: list[int], dst_slots: list[int]) -> None:
        """State slot dst_slots[i] <- src_slots[i], in every KDA layer (recurrent and conv), in place."""
        if len(src_slots) != len(dst_slots):
            raise ValueError(
                f"copy_states: 'src_slots' has {len(src_slots)} entries but 'dst_slots' has {len(dst_slots)}"
            )
        if not src_slots:
            return
        for name, slots in (("src_slots", src_slots), ("dst_slots", dst_slots)):
            for s in slots:
                if isinstance(s, bool) or not isinstance(s, int):
                    raise TypeError(f"copy_states: '{name}' must hold ints, got {type(s).__name__}")
                if not 0 <= s < self.num_state_slots:
                    raise ValueError(f"copy_states: '{name}' slot {s} out of range [0, {self.num_state_slots})")
        if len(set(dst_slots)) != len(dst_slots):
            raise ValueError("copy_states: 'dst_slots' must be distinct")
        device = self.recurrent[0].device
        src = host_to_device(src_slots, device, torch.long)
        dst = host_to_device(dst_slots, device, torch.long)
        for pool in (*self.recurrent, *self.conv):
            pool.index_copy_(0, dst, pool.index_select(0, src))
