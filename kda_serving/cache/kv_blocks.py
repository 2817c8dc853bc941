"""Ids of the paged MLA latent-KV blocks, reference counted so a prefix can be shared."""

from __future__ import annotations


class KVBlockManager:
    """Hands out block ids 0..num_blocks-1 with reference counts.

    A block holds `block_size` consecutive tokens' latent KV for every MLA layer. Requests and prefix-cache
    entries each hold one reference per block they use; a block returns to the free list when its last
    reference goes. Blocks that are shared (count > 1) are read-only: whoever appends to a partly filled
    shared block copies it first (copy-on-write, done by the engine).
    """

    def __init__(self, num_blocks: int, block_size: int):
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"KVBlockManager: 'num_blocks' must be a positive int, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"KVBlockManager: 'block_size' must be a positive int, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks with one reference each, or None (nothing taken) if fewer than n are free."""
        if n > len(self._free):
            return None
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def incref(self, blocks) -> None:
        for b in blocks:
            if self._refs[b] <= 0:
                raise ValueError(f"KVBlockManager: block {b} is free and cannot gain a reference")
            self._refs[b] += 1

    def decref(self, blocks) -> None:
        """Drops one reference per listed block; blocks left with none are free again."""
        for b in blocks:
            if self._refs[b] <= 0:
                raise ValueError(f"KVBlockManager: block {b} is already free (double free)")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def ref_count(self, block: int) -> int:
        return self._refs[block]
