"""Where a prefill chunk ends and which prefix-cache save points it can write.

The prefill kernel can write a KDA state checkpoint inside a chunk only at a multiple of CHECKPOINT_ALIGN
new tokens from the chunk's start (docs/kda-contract.md), and the engine can copy the state at the chunk's
end. So a save point b in (start, end] is reachable when b == end, or when start and b - start are both
multiples of the alignment. A chunk that is not the prompt's last and would skip a save point ends at it
instead (the tokens move to the next chunk, no extra step); the last chunk is never cut, so saving never
delays the first token.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import CHECKPOINT_ALIGN


@dataclass(frozen=True)
class ChunkPlan:
    end: int  # the chunk covers token positions [start, end)
    checkpoints: tuple[int, ...]  # save points written inside the chunk by the kernel (absolute positions)
    save_at_end: bool  # the state at `end` is a save point: copy it after the step


def plan_chunk(
    start: int, total: int, budget: int, save_points, align: int = CHECKPOINT_ALIGN, branch: int | None = None
) -> ChunkPlan:
    """Plans the chunk of a prefill from `start` with at most `budget` tokens of `total`.

    branch: a branch point (where the prompt leaves a cached path). Every position up to it is shared, so
    when it is out of reach in a last chunk, the reachable checkpoint just below it is saved instead.
    """
    if not (0 <= start < total) or budget < 1:
        raise ValueError(f"plan_chunk: need 0 <= start < total and budget >= 1, got {start}, {total}, {budget}")
    end = min(total, start + budget)
    points = set(save_points)
    if branch is not None and start < branch <= total:
        points.add(branch)

    def inside(b: int) -> bool:
        return start % align == 0 and (b - start) % align == 0

    if end < total:
        skipped = [b for b in points if start < b < end and not inside(b)]
        if skipped:
            end = max(skipped)
    checkpoints = {b for b in points if start < b < end and inside(b)}
    if branch is not None and start < branch < end and not inside(branch) and start % align == 0:
        below = branch - (branch - start) % align
        if below > start:
            checkpoints.add(below)
    return ChunkPlan(end, tuple(sorted(checkpoints)), end in points)
