"""Continuous batching with chunked prefill over a state-slot pool, paged KV blocks and the prefix cache.

Each step: running requests first (decodes, one token each, then the next chunks of prompts being
prefilled, in admission order), then waiting requests, first come first served, while the step has token
budget, a sequence place, a free state slot and the KV blocks for the whole prompt (evicting prefix-cache
entries when needed). A decode that needs a new KV block and finds none preempts the most recently admitted
request, which frees its slot and blocks (to a prefix-cache entry it resumes from, while the entry lasts).
Finished and aborted requests free their slot and blocks at once; a finished turn's slot and blocks become a
prefix-cache entry instead.

With speculative decoding (a draft proposer given), the decodes then take draft tokens while the step has
budget, state slots (beyond those admissions may need) and free KV blocks: a verifying decode feeds its
last sampled token and W-1 drafts, W the same for every verifying request of the step, and takes W state slots
for the step, one for the state after each token. After sampling the engine calls `accept` with how many of
them the request keeps; the other slots, and the request's old one, go back to the pool. Short of free slots,
drafts evict least recently used cache entries (the cache then holds that many fewer states); they never
preempt a request or take a block that is not free.

The "priority" policy orders both queues by (priority, arrival), lower first: the waiting queue, and the
running list, whose last request is the one a decode preempts. And before a step, while the first waiting
request outranks the last running one and finds no room (a sequence place, a state slot, its prompt's KV
blocks), the last running request is preempted for it. Equal priorities are served first come first served,
as under "fcfs".

Plain Python: no torch. The engine turns a SchedulerOutput into a RaggedBatch.
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from dataclasses import dataclass, field

from ..cache import KVBlockManager, PrefixCache, StateSlotPool
from .chunk_plan import plan_chunk
from .config import CHECKPOINT_ALIGN, SCHEDULING_POLICIES
from .sequence import Sequence, SequenceStatus

# The most prompt tokens of requests with prompt logprobs a step computes (beyond one per such request): each
# needs a row of logits, [tokens, vocab] in fp32 (335 MB at Kimi-Linear's 163,840-token vocabulary).
PROMPT_LOGPROB_TOKENS_PER_STEP = 512


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first new token position (== tokens already cached)
    num_tokens: int
    sample: bool  # this chunk ends at the last token: its logits give the next output token
    drafts: list[int] = field(default_factory=list)  # a verifying decode's draft tokens (num_tokens - 1 of them)
    proposed: int = 0  # how many of them the drafter proposed (the rest are fillers)
    verify_slots: list[int] = field(default_factory=list)  # where the state after each of its tokens goes


@dataclass
class PendingSave:
    """A prefix-cache entry being written this step: state at `length` tokens of seq into cache slot `slot`."""

    seq: Sequence
    length: int
    slot: int
    boundary_hash: int | None  # chained hash of an aligned save point (None for a branch point)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    state_restores: list[tuple[int, int]] = field(default_factory=list)  # before the step: cache slot -> request slot
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # before the step: copy-on-write src -> dst
    checkpoints: list[tuple[int, int, int]] = field(default_factory=list)  # (chunk index, new-token count, slot)
    state_saves: list[tuple[int, int]] = field(default_factory=list)  # after the step: request slot -> cache slot
    pending_saves: list[PendingSave] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # new tokens of the chunks of requests that want prompt logprobs (0: no chunk has such positions)
    prompt_logprob_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_decode(self) -> bool:
        return bool(self.chunks) and all(c.num_tokens == 1 and c.start > 0 for c in self.chunks)

    @property
    def num_verifying(self) -> int:
        """The verifying decodes, which come first in `chunks`."""
        return sum(1 for c in self.chunks if c.drafts)


class Scheduler:
    def __init__(
        self,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        slots: StateSlotPool,
        blocks: KVBlockManager,
        prefix_cache: PrefixCache | None = None,
        checkpoint_align: int = CHECKPOINT_ALIGN,
        policy: str = "fcfs",
        drafter=None,
        uniform_drafts: bool = False,
    ):
        """drafter: None, or a draft proposer (engine/ngram.py PromptLookup: num_tokens, limit(seq),
        propose(seq)) that turns on speculative decoding. uniform_drafts: every decode of a step verifies
        drafts or none does (see _add_drafts)."""
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"Scheduler: 'policy' must be one of {SCHEDULING_POLICIES}, got {policy!r}")
        self.policy = policy
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.slots = slots
        self.blocks = blocks
        self.cache = prefix_cache
        self.checkpoint_align = checkpoint_align  # the kernel's checkpoint granularity (tests use small ones)
        self.drafter = drafter
        self.uniform_drafts = uniform_drafts
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._pending_hashes: Counter[int] = Counter()  # aligned save points being written this step
        self._slot_reserve = 0  # slots this step's saves must leave free for admissions
        self.num_preemptions = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # ---- queue --------------------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self._queue(seq, front=False)

    def _queue(self, seq: Sequence, front: bool) -> None:
        """Into the waiting queue: at its end (a new request) or front (a preempted one) under fcfs, at its
        (priority, arrival) place under priority."""
        if self.policy == "priority":
            keys = [(s.priority, s.arrival) for s in self.waiting]
            self.waiting.insert(bisect.bisect_right(keys, (seq.priority, seq.arrival)), seq)
        elif front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step -----------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        if self.policy == "priority":
            self._preempt_for_waiting(out)
        # Slots that checkpoints must leave free for requests that could still be admitted this step.
        self._slot_reserve = min(len(self.waiting), self.max_num_seqs - len(self.running))
        # Decodes first, so that running generations never wait behind a long prompt's chunks.
        for seq in [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]:
            if budget == 0:
                break
            if seq.pending_is_last:  # its pending token ends it: a decode after it would be thrown away
                continue
            if seq.status is SequenceStatus.RUNNING and self._grow_blocks(seq, out):
                budget -= self._schedule_chunk(seq, budget, out)
        if self.drafter is not None and budget > 0:
            budget -= self._add_drafts(out, budget)
        for seq in [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]:
            if budget == 0:
                break
            budget -= self._schedule_chunk(seq, budget, out)
        skipped = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            # Preempted while its last token is still on the device: its prompt is not known in full yet.
            admitted = None if seq.pending_row is not None else self._admit(seq, out)
            if admitted is None:
                skipped.append(seq)  # waits for a concurrent request to cache the prefix it shares
                continue
            if not admitted:
                self.waiting.appendleft(seq)
                break
            self._slot_reserve = max(0, self._slot_reserve - 1)
            budget -= self._schedule_chunk(seq, budget, out)
        self.waiting.extendleft(reversed(skipped))
        return out

    def _add_drafts(self, out: SchedulerOutput, budget: int) -> int:
        """Turns this step's decodes (so far the only chunks) into verifying ones where drafts are proposed and
        the step has room; returns the tokens added. Every verifying decode gets the same width W = 1 + the
        longest proposal, shorter ones repeating their last draft (any token is a valid guess), so that the KDA
        layers verify them as one [N, W] block. With `uniform_drafts` (CUDA graphs) it is all the decodes or
        none, so that the step replays one captured graph: all when at least half of them have a proposal (a
        decode without one guesses its last token again), with W shrunk to what every request and the step's
        room allow."""
        proposals = [self.drafter.propose(c.seq) for c in out.chunks]
        own = [len(p) for p in proposals]  # before fillers
        width = 1 + max(own, default=0)
        if width == 1:
            return 0
        if self.uniform_drafts:
            chunks = out.chunks
            if any(c.start == 0 for c in chunks):  # a one-token prompt: its first step must run as a prefill
                return 0
            # A verifying step costs 1.2-1.7 decode steps (docs/engine.md, Speculative decoding), paid by every
            # decode of the step: only worth it when at least half of them have drafts of their own.
            if 2 * sum(1 for p in proposals if p) < len(chunks):
                return 0
            self._free_slots_for_drafts(len(chunks) * width)
            room = min(self.drafter.limit(c.seq) for c in chunks) + 1
            free_slots = self.slots.num_free - self._slot_reserve
            room = min(room, (budget + len(chunks)) // len(chunks), free_slots // len(chunks))
            while room > 1 and self._extra_blocks(chunks, room) > self.blocks.num_free:
                room -= 1
            width = min(width, room)
            if width < 2:
                return 0
            proposals = [p or c.seq.token_ids[-1:] for p, c in zip(proposals, chunks)]
        else:
            self._free_slots_for_drafts(sum(1 for p in proposals if p) * width)
        added = 0
        for chunk, drafts, proposed in zip(out.chunks, proposals, own):
            seq = chunk.seq
            drafts = drafts[: width - 1]
            extra_blocks = self._extra_blocks([chunk], width)
            if (not drafts or chunk.start == 0 or self.drafter.limit(seq) < width - 1 or budget - added < width - 1
                    or self.slots.num_free - self._slot_reserve < width or extra_blocks > self.blocks.num_free):
                continue
            if extra_blocks > 0:
                seq.block_table += self.blocks.allocate(extra_blocks)
            chunk.proposed = min(proposed, width - 1)
            chunk.drafts = drafts + drafts[-1:] * (width - 1 - len(drafts))
            chunk.verify_slots = [self.slots.allocate() for _ in range(width)]
            chunk.num_tokens = width
            added += width - 1
        out.chunks.sort(key=lambda c: not c.drafts)  # stable: verifying decodes first, each group in order
        return added

    def _free_slots_for_drafts(self, need: int) -> None:
        """Frees up to `need` slots beyond the admissions' reserve for this step's drafts, evicting least
        recently used cache entries when the free ones fall short: a full prefix cache would otherwise end
        speculation for good. The slots come back after the step, so the cache only gives up what one step's
        drafts take. Never evicts towards a target that running requests and pinned entries could make
        unreachable (leaving 2 * max_num_seqs slots to them), which would empty the cache for nothing."""
        target = self._slot_reserve + need
        if (self.cache is not None and self.slots.num_free < target
                and target <= self.slots.num_slots - 2 * self.max_num_seqs):
            self.cache.make_room(target, 0)

    def _extra_blocks(self, chunks: list[ScheduledChunk], width: int) -> int:
        """KV blocks the chunks' requests lack for `width` tokens from their start."""
        return sum(max(0, self.blocks.blocks_for(c.start + width) - len(c.seq.block_table)) for c in chunks)

    def accept(self, chunk: ScheduledChunk, num_kept: int) -> None:
        """After a verifying step: the request keeps the state after its first num_kept tokens (its last sampled
        token and the drafts accepted before a stop), from the slot that holds it; the rest go back."""
        if not 1 <= num_kept <= chunk.num_tokens:
            raise ValueError(f"Scheduler.accept: num_kept must be in [1, {chunk.num_tokens}], got {num_kept}")
        seq, kept = chunk.seq, chunk.verify_slots[num_kept - 1]
        record = getattr(self.drafter, "record", None)
        if record is not None:  # the drafts that held, of those the drafter proposed
            record(seq, chunk.proposed, min(num_kept - 1, chunk.proposed))
        for slot in chunk.verify_slots:
            if slot != kept:
                self.slots.free(slot)
        self.slots.free(seq.state_slot)
        seq.state_slot = kept
        seq.num_computed_tokens = chunk.start + num_kept

    def _preempt_for_waiting(self, out: SchedulerOutput) -> None:
        """Priority policy, before anything is scheduled this step: preempts the last running request while the
        first waiting one outranks it and has no room to be admitted."""
        while self.waiting and self.running and self.waiting[0].priority < self.running[-1].priority:
            head = self.waiting[0]
            need = self.blocks.blocks_for(head.num_tokens)  # a prefix-cache hit could need fewer
            room = len(self.running) < self.max_num_seqs and (
                (self.slots.num_free >= 1 and self.blocks.num_free >= need)
                or (self.cache is not None and self.cache.make_room(1, need))
            )
            if room:
                return
            self._preempt(self.running[-1], out)

    def _grow_blocks(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """Gives seq the KV block its next token needs, evicting cache entries or preempting the last request."""
        if self.blocks.blocks_for(seq.num_computed_tokens + 1) <= len(seq.block_table):
            return True
        while True:
            if self.blocks.num_free or (self.cache is not None and self.cache.make_room(0, 1)):
                seq.block_table += self.blocks.allocate(1)
                return True
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False

    def _admit(self, seq: Sequence, out: SchedulerOutput) -> bool | None:
        """Gives a waiting request its slot and blocks (restoring a cached prefix). False: no room, None: wait."""
        bs = self.blocks.block_size
        hit = None
        if self.cache is not None and seq.cache_cursor is None:
            seq.cache_cursor = self.cache.cursor(seq.token_ids, seq.num_prompt_tokens)
        # prompt logprobs need the logits of every prompt position: no cached prefix for such a request
        if self.cache is not None and not seq.wants_prompt_logprobs:
            hit = self.cache.lookup(seq.token_ids, seq.num_tokens - 1, seq.cache_cursor)
            awaited = self.cache.boundary_hashes(seq.token_ids, seq.num_tokens - 1, seq.cache_cursor)
            if any(h in self._pending_hashes for h in awaited[hit.length // self.cache.interval :]):
                return None
        length = hit.length if hit is not None else 0
        shared = hit.blocks[: length // bs] if length else []
        need_blocks = self.blocks.blocks_for(seq.num_tokens) - len(shared)
        if hit is not None and hit.node is not None:
            self.cache.pin(hit.node)
        room = self.slots.num_free >= 1 and self.blocks.num_free >= need_blocks
        if not room and self.cache is not None:
            room = self.cache.make_room(1, need_blocks)
        if not room:
            if hit is not None and hit.node is not None:
                self.cache.unpin(hit.node)
            return False
        seq.state_slot = self.slots.allocate()
        self.blocks.incref(shared)
        fresh = self.blocks.allocate(need_blocks)
        seq.block_table = shared + fresh
        seq.num_computed_tokens = length
        if length:
            out.state_restores.append((hit.slot, seq.state_slot))
            seq.pinned = hit.node
            if length % bs:
                out.block_copies.append((hit.blocks[-1], fresh[0]))
        if hit is not None:
            seq.branch_point = hit.match_len if length < hit.match_len < seq.num_tokens else None
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = length
            if self.cache is not None:
                self.prefix_queries += 1
                self.prefix_query_tokens += seq.num_prompt_tokens
                self.prefix_hit_tokens += length
                self.prefix_hits += length > 0
        seq.status = SequenceStatus.RUNNING
        if self.policy == "priority":  # the running list stays in (priority, arrival) order: its last is preempted
            bisect.insort(self.running, seq, key=lambda s: (s.priority, s.arrival))
        else:
            self.running.append(seq)
        return True

    def _schedule_chunk(self, seq: Sequence, budget: int, out: SchedulerOutput) -> int:
        start, total = seq.num_computed_tokens, seq.num_tokens
        if total - start == 1:  # a decode (or a prompt's last token): no save points, so no plan to make
            out.chunks.append(ScheduledChunk(seq, start, 1, True))
            return 1
        if seq.wants_prompt_logprobs and start < seq.num_prompt_tokens:
            # the step's prompt-logprob rows stay within PROMPT_LOGPROB_TOKENS_PER_STEP (+ one per such request)
            budget = min(budget, max(1, PROMPT_LOGPROB_TOKENS_PER_STEP - out.prompt_logprob_tokens))
        saves = self._save_points(seq, start, total)
        branch = seq.branch_point if self.cache is not None else None
        plan = plan_chunk(start, total, budget, saves, self.checkpoint_align, branch)
        index = len(out.chunks)
        out.chunks.append(ScheduledChunk(seq, start, plan.end - start, plan.end == total))
        if seq.wants_prompt_logprobs:
            out.prompt_logprob_tokens += plan.end - start
        for b in plan.checkpoints:
            slot = self._save_slot(seq, b, out)
            if slot is not None:
                out.checkpoints.append((index, b - start, slot))
        if plan.save_at_end:
            slot = self._save_slot(seq, plan.end, out, evict=plan.end == total)
            if slot is not None:
                out.state_saves.append((seq.state_slot, slot))
        return plan.end - start

    def _save_points(self, seq: Sequence, start: int, total: int) -> set[int]:
        if self.cache is None:
            return set()
        interval = self.cache.interval
        points = set(range((start // interval + 1) * interval, total + 1, interval))
        if total >= self.checkpoint_align:
            # The end of the prompt: a chat follow-up repeats this prompt verbatim, while the reply it carries
            # is re-tokenized and often differs from the generated ids, so the end-of-turn entry misses.
            points.add(total)
        points -= self.cache.cached_lengths(seq.token_ids, seq.cache_cursor, start, total)
        return points

    def _save_slot(self, seq: Sequence, length: int, out: SchedulerOutput, evict: bool = False) -> int | None:
        """A free slot for a new cache entry at length tokens of seq, unless the entry exists or slots are short.

        Short of slots, only the end of a prompt (evict=True) takes one from the least recently used entries:
        a chat follow-up repeats that prompt but carries the reply re-tokenized, so without this entry a cache
        whose entries hold every slot would stop serving new conversations' next turns. Interval checkpoints
        and branch points do not evict: a long prompt would otherwise flush the cache one checkpoint at a time."""
        if self.slots.num_free <= self._slot_reserve:
            if not (evict and self.cache.make_room(self._slot_reserve + 1, 0)):
                return None
        boundary_hash = None
        if length % self.cache.interval == 0:
            boundary_hash = self.cache.boundary_hashes(seq.token_ids, length, seq.cache_cursor)[-1]
            if boundary_hash in self._pending_hashes:
                return None
        slot = self.slots.allocate()
        self._pending_hashes[boundary_hash] += boundary_hash is not None
        out.pending_saves.append(PendingSave(seq, length, slot, boundary_hash))
        return slot

    def update(self, out: SchedulerOutput) -> None:
        """Closes a step: advances computed tokens (a verifying decode's: in `accept`), releases pins and commits
        this step's cache entries."""
        for chunk in out.chunks:
            if not chunk.drafts:
                chunk.seq.num_computed_tokens += chunk.num_tokens
            if chunk.seq.pinned is not None:
                self.cache.unpin(chunk.seq.pinned)
                chunk.seq.pinned = None
        for save in out.pending_saves:
            if save.boundary_hash is not None:
                self._pending_hashes[save.boundary_hash] -= 1
                if not self._pending_hashes[save.boundary_hash]:
                    del self._pending_hashes[save.boundary_hash]
            if not self.cache.insert(save.seq.token_ids, save.length, save.seq.block_table, save.slot,
                                     save.seq.cache_cursor):
                self.slots.free(save.slot)

    # ---- leaving ------------------------------------------------------------------------------------------

    def _release(self, seq: Sequence, cache_it: bool) -> None:
        if seq.pinned is not None:
            self.cache.unpin(seq.pinned)
            seq.pinned = None
        if seq.state_slot is not None:
            kept = False
            if cache_it and self.cache is not None and seq.num_computed_tokens > 0:
                kept = self.cache.insert(seq.token_ids, seq.num_computed_tokens, seq.block_table, seq.state_slot,
                                         seq.cache_cursor)
            if not kept:
                self.slots.free(seq.state_slot)
            seq.state_slot = None
        seq.cache_cursor = None
        self.blocks.decref(seq.block_table)
        seq.block_table = []

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Back to the waiting queue, freeing its slot and blocks. With a prefix cache, its state and KV become a
        cache entry first (it has run nothing this step, so its slot holds the state after its computed
        tokens): readmitted, it resumes from there, unless the room that was wanted evicted the entry."""
        self.running.remove(seq)
        self._release(seq, cache_it=True)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self._queue(seq, front=True)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a request after a step: its state and KV become a prefix-cache entry (stop/length). With
        asynchronous scheduling the request may have been preempted since (waiting, holding nothing), and if it
        runs in the step queued meanwhile, its slot's state will include the token that ended it, which the
        computed tokens then count: the entry is for the state the slot will hold."""
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
            self._release(seq, cache_it=reason in ("stop", "length"))
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, seq: Sequence) -> None:
        """Ends a request between steps, freeing everything it holds."""
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq, cache_it=False)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"

    # ---- accounting ---------------------------------------------------------------------------------------

    def request_slots(self) -> int:
        return len(self.running)

    def request_blocks(self) -> int:
        return len({b for seq in self.running for b in seq.block_table})
