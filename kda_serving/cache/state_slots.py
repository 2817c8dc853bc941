"""Ids of the KDA state slots: which of the model's state-pool rows are free."""

from __future__ import annotations


class StateSlotPool:
    """Hands out slot ids 0..num_slots-1, each to one owner at a time (a running request or a cache entry).

    A slot holds one sequence's KDA recurrent and conv states for every KDA layer; the tensors live in the
    model's caches, this class only does the bookkeeping. Freed slots are reused lowest-id first, so a
    lightly loaded engine touches few rows.
    """

    def __init__(self, num_slots: int):
        if not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"StateSlotPool: 'num_slots' must be a positive int, got {num_slots!r}")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # a stack: pop() gives the lowest free id
        self._in_use = [False] * num_slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self) -> int | None:
        """A free slot id, or None when every slot is taken."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._in_use[slot] = True
        return slot

    def free(self, slot: int) -> None:
        if not (0 <= slot < self.num_slots):
            raise ValueError(f"StateSlotPool: slot {slot} out of range [0, {self.num_slots})")
        if not self._in_use[slot]:
            raise ValueError(f"StateSlotPool: slot {slot} is already free (double free)")
        self._in_use[slot] = False
        self._free.append(slot)
        if len(self._free) > 1 and self._free[-1] > self._free[-2]:
            self._free.sort(reverse=True)

    def is_used(self, slot: int) -> bool:
        return self._in_use[slot]
