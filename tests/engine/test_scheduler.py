"""The scheduler, state-slot pool, KV blocks and prefix cache, driven by a simulated model (no torch).

The simulated executor tracks *what* each state slot and KV block holds: a slot holds the token prefix its
state summarises, a KV position holds its token. Before every chunk runs, the request's restored state must
be exactly its first `start` tokens and its block table must hold those tokens: that checks prefix hits,
checkpoints, copy-on-write and sharing without a model. Invariants after every step: no slot or block leaked
or shared between two owners that could write it, pinned entries alive, budgets respected.
"""

import random
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kda_serving.cache import KVBlockManager, PrefixCache, StateSlotPool
from kda_serving.engine.chunk_plan import plan_chunk
from kda_serving.engine.sampling_params import SamplingParams
from kda_serving.engine.scheduler import Scheduler
from kda_serving.engine.sequence import Sequence, SequenceStatus


class SimDrafter:
    """Random drafts of random length (tokens 0-2, as the simulated model samples): about a third of each is
    accepted, so every acceptance count occurs."""

    def __init__(self, num_tokens, rng):
        self.num_tokens, self.rng = num_tokens, rng

    def limit(self, seq):
        return max(0, min(self.num_tokens, seq.params.max_tokens - seq.num_output_tokens - 1))

    def propose(self, seq):
        return [self.rng.randrange(3) for _ in range(self.rng.randint(0, self.limit(seq)))]


class SimEngine:
    def __init__(self, slots=8, blocks=64, block_size=2, interval=8, align=4, max_seqs=4, budget=16, cache=True,
                 seed=0, policy="fcfs", drafts=0, uniform=False):
        self.slots = StateSlotPool(slots)
        self.blocks = KVBlockManager(blocks, block_size)
        self.cache = PrefixCache(interval, self.slots, self.blocks) if cache else None
        self.sched = Scheduler(max_seqs, budget, self.slots, self.blocks, self.cache, checkpoint_align=align,
                               policy=policy)
        self.state = {}  # slot -> token tuple
        self.kv = {}  # block -> list of tokens (None = never written)
        self.rng = random.Random(seed)
        self.n = 0
        self.finished: list[Sequence] = []
        self.max_batch_tokens = budget
        if drafts:
            self.sched.drafter = SimDrafter(drafts, random.Random(seed + 1))
            self.sched.uniform_drafts = uniform
        self.accepted = 0

    def add(self, prompt, max_tokens=3, priority=0):
        seq = Sequence(f"r{self.n}", prompt, SamplingParams(max_tokens=max_tokens), self.n, priority)
        self.n += 1
        self.sched.add(seq)
        return seq

    def step(self):
        out = self.sched.schedule()
        bs = self.blocks.block_size
        assert out.num_tokens <= self.max_batch_tokens
        assert len(self.sched.running) <= self.sched.max_num_seqs
        assert len({c.seq.state_slot for c in out.chunks}) == len(out.chunks)
        verifying = [c for c in out.chunks if c.drafts]
        assert out.chunks[: len(verifying)] == verifying and len({c.num_tokens for c in verifying}) <= 1
        written = [s for c in verifying for s in c.verify_slots]
        assert len(set(written)) == len(written) and not set(written) & {c.seq.state_slot for c in out.chunks}
        for c in verifying:
            assert c.start > 0 and c.num_tokens == len(c.drafts) + 1 == len(c.verify_slots)
        if self.sched.uniform_drafts and verifying:  # all of the step's decodes, or none
            # a decode runs its request's last token after a cached context; a one-token chunk cut from the middle
            # of a prompt by the step's budget is no decode
            assert all(c.drafts for c in out.chunks if c.num_tokens == 1 and 0 < c.start == c.seq.num_tokens - 1)
        for src, dst in out.state_restores:
            self.state[dst] = self.state[src]
        for src, dst in out.block_copies:
            self.kv[dst] = list(self.kv[src])
        for c in out.chunks:
            seq, start = c.seq, c.start
            if start:
                assert self.state.get(seq.state_slot) == tuple(seq.token_ids[:start]), f"bad restored state for {seq}"
            for p in range(start):
                assert self.kv[seq.block_table[p // bs]][p % bs] == seq.token_ids[p], f"bad KV at {p} for {seq}"
            assert len(seq.block_table) * bs >= start + c.num_tokens
        for index, pos, slot in out.checkpoints:
            c = out.chunks[index]
            assert pos % self.sched.checkpoint_align == 0 and 0 < pos <= c.num_tokens
            self.state[slot] = tuple(c.seq.token_ids[: c.start + pos])
        for c in out.chunks:
            seq = c.seq
            fed = seq.token_ids[c.start : c.start + 1] + c.drafts if c.drafts else seq.token_ids[c.start : c.start + c.num_tokens]
            for p, token in enumerate(fed, c.start):
                block = seq.block_table[p // bs]
                self.kv.setdefault(block, [None] * bs)[p % bs] = token
            if c.drafts:  # the state after each fed token, in its own slot; the request's slot only read
                for t, slot in enumerate(c.verify_slots):
                    self.state[slot] = tuple(seq.token_ids[: c.start] + fed[: t + 1])
            else:
                self.state[seq.state_slot] = tuple(seq.token_ids[: c.start + c.num_tokens])
        for src, dst in out.state_saves:
            self.state[dst] = self.state[src]
        self.sched.update(out)
        for c in out.chunks:
            if c.sample:  # as LLMEngine._advance: keep sampled tokens while they match the drafts fed
                seq = c.seq
                sampled = [self.rng.randrange(3) for _ in range(c.num_tokens if c.drafts else 1)]
                kept, done = 0, False
                while not done:
                    seq.token_ids.append(sampled[kept])
                    kept += 1
                    done = seq.num_output_tokens >= seq.params.max_tokens
                    if kept == len(sampled) or sampled[kept - 1] != c.drafts[kept - 1]:
                        break
                if c.drafts:
                    self.sched.accept(c, kept)
                    self.accepted += kept - 1
                if done:
                    self.sched.finish(seq, "length")
                    self.finished.append(seq)
        self.check_invariants()
        return out

    def check_invariants(self):
        running = self.sched.running
        slots = [s.state_slot for s in running]
        assert None not in slots and len(set(slots)) == len(slots)
        cache_slots = [n.slot for n in self.cache._nodes() if n.slot is not None] if self.cache else []
        assert not set(slots) & set(cache_slots) and len(set(cache_slots)) == len(cache_slots)
        assert self.slots.num_used == len(slots) + len(cache_slots)
        refs = Counter(b for s in running for b in s.block_table)
        if self.cache:
            refs.update(b for n in self.cache._nodes() for b in n.blocks)
        assert self.blocks.num_used == len(refs)
        assert all(self.blocks.ref_count(b) == c for b, c in refs.items())
        for s in self.sched.waiting:
            assert s.state_slot is None and not s.block_table and s.status is SequenceStatus.WAITING
        if self.sched.policy == "priority":
            for queue in (list(self.sched.waiting), running):
                keys = [(s.priority, s.arrival) for s in queue]
                assert keys == sorted(keys), "priority queues must stay in (priority, arrival) order"

    def run(self, max_steps=500):
        for _ in range(max_steps):
            if not self.sched.has_work():
                return
            self.step()
        raise AssertionError("requests did not finish")

    def drain_cache(self):
        if self.cache:
            self.cache.clear()
        assert self.slots.num_free == self.slots.num_slots and self.blocks.num_free == self.blocks.num_blocks


def test_scheduler_and_caches_import_without_torch():
    import subprocess

    code = (
        "import sys; import kda_serving.engine.scheduler, kda_serving.cache, kda_serving.engine.chunk_plan; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_chunked_prefill_respects_token_budget_and_finishes():
    sim = SimEngine(budget=5, cache=False)
    a = sim.add(list(range(12)), max_tokens=2)
    b = sim.add([1, 2, 3], max_tokens=4)
    out = sim.step()
    assert [(c.seq, c.start, c.num_tokens) for c in out.chunks] == [(a, 0, 5)]
    out = sim.step()
    assert [(c.seq, c.num_tokens) for c in out.chunks] == [(a, 5)]
    out = sim.step()  # a's last 2 prompt tokens, then b's first 3 tokens fill the budget
    assert [(c.seq, c.num_tokens, c.sample) for c in out.chunks] == [(a, 2, True), (b, 3, True)]
    out = sim.step()
    assert out.is_decode
    sim.run()
    assert a.is_finished and b.is_finished and a.num_output_tokens == 2 and b.num_output_tokens == 4
    sim.drain_cache()


def test_decodes_are_not_starved_by_a_long_prefill():
    sim = SimEngine(budget=8, cache=False, blocks=128)
    a = sim.add([1, 2], max_tokens=20)
    sim.step()
    long = sim.add(list(range(60)), max_tokens=1)
    while not long.is_finished:
        out = sim.step()
        assert any(c.seq is a for c in out.chunks) and out.num_tokens <= 8


def test_requests_wait_for_state_slots_and_run_when_freed():
    sim = SimEngine(slots=2, cache=False, max_seqs=8)
    seqs = [sim.add([i, i + 1, i + 2], max_tokens=3) for i in range(5)]
    sim.step()
    assert len(sim.sched.running) == 2 and len(sim.sched.waiting) == 3
    sim.run()
    assert all(s.is_finished for s in seqs)
    sim.drain_cache()


def test_max_num_seqs_limits_running():
    sim = SimEngine(slots=16, cache=False, max_seqs=3, budget=100)
    for i in range(6):
        sim.add([i] * 4, max_tokens=5)
    sim.step()
    assert len(sim.sched.running) == 3
    sim.run()


def test_abort_frees_slot_and_blocks_at_once():
    sim = SimEngine(cache=False)
    a = sim.add(list(range(10)), max_tokens=50)
    b = sim.add([5, 6], max_tokens=50)
    sim.step()
    sim.step()
    assert sim.slots.num_used == 2
    sim.sched.abort(a)
    sim.check_invariants()
    assert a.finish_reason == "abort" and a.state_slot is None and not a.block_table
    sim.sched.abort(b)
    assert sim.slots.num_used == 0 and sim.blocks.num_used == 0


def test_abort_of_waiting_request():
    sim = SimEngine(slots=1, cache=False)
    sim.add([1, 2, 3])
    w = sim.add([4, 5, 6])
    sim.step()
    sim.sched.abort(w)
    assert w not in sim.sched.waiting and w.finish_reason == "abort"
    sim.run()
    sim.drain_cache()


def test_preemption_when_kv_blocks_run_out():
    sim = SimEngine(slots=4, blocks=6, block_size=2, cache=False, budget=32)
    a = sim.add([1, 2, 3], max_tokens=6)  # grows to 8 tokens: 4 blocks
    b = sim.add([4, 5, 6], max_tokens=6)
    sim.run()
    assert a.is_finished and b.is_finished and sim.sched.num_preemptions > 0
    sim.drain_cache()


def test_priority_policy_admits_by_priority_then_arrival():
    sim = SimEngine(slots=1, cache=False, policy="priority")
    order = []
    seqs = [sim.add([i, 1, 2], max_tokens=2, priority=p) for i, p in enumerate([5, 1, 5, 0, 1])]
    while sim.sched.has_work():
        sim.step()
        order += [s.request_id for s in sim.sched.running if s.request_id not in order]
    assert order == ["r3", "r1", "r4", "r0", "r2"]  # priority 0, then 1 and 5, each in arrival order
    assert all(s.is_finished for s in seqs)


def test_priority_policy_preempts_a_lower_priority_request_for_a_waiting_one():
    sim = SimEngine(slots=2, cache=False, max_seqs=8, policy="priority")
    low = [sim.add([i] * 3, max_tokens=20, priority=3) for i in range(2)]
    sim.step()
    assert sim.sched.running == low
    urgent = sim.add([9, 9, 9], max_tokens=2, priority=0)
    out = sim.step()
    assert out.preempted == [low[1]] and urgent.status is SequenceStatus.RUNNING
    assert [c.seq for c in out.chunks if c.seq is low[1]] == []  # a preempted request runs nothing this step
    sim.run()
    assert all(s.is_finished for s in [*low, urgent])
    sim.drain_cache()


def test_a_preempted_request_resumes_from_its_cache_entry():
    """With a prefix cache, preemption keeps the state and KV as an entry: readmitted, the request restores
    them and computes only what follows (the simulated executor checks the restored state is right)."""
    sim = SimEngine(slots=3, blocks=64, cache=True, max_seqs=1, budget=16, policy="priority")
    low = sim.add(list(range(10)), max_tokens=12, priority=5)
    for _ in range(6):
        sim.step()
    computed = low.num_computed_tokens
    assert computed > 10
    sim.add([7, 7, 7], max_tokens=2, priority=0)
    assert sim.step().preempted == [low]
    restored = None
    while not low.is_finished:
        out = sim.step()
        for c in out.chunks:
            if c.seq is low and restored is None:
                restored = c.start
    assert restored == computed  # resumed where it stopped, not from token 0
    sim.run()
    sim.drain_cache()


def test_priority_policy_never_preempts_for_an_equal_priority():
    sim = SimEngine(slots=1, cache=False, policy="priority")
    first = sim.add([1, 2, 3], max_tokens=5, priority=2)
    sim.step()
    second = sim.add([4, 5, 6], max_tokens=2, priority=2)
    sim.step()
    assert first.status is SequenceStatus.RUNNING and second.status is SequenceStatus.WAITING
    assert sim.sched.num_preemptions == 0


def test_priority_policy_decode_preempts_the_lowest_priority_request():
    sim = SimEngine(slots=4, blocks=6, block_size=2, cache=False, budget=32, policy="priority")
    low = sim.add([1, 2, 3], max_tokens=6, priority=9)
    high = sim.add([4, 5, 6], max_tokens=6, priority=0)
    preempted = []
    while sim.sched.has_work():
        preempted += sim.step().preempted
    assert preempted and all(s is low for s in preempted)
    assert low.is_finished and high.is_finished
    sim.drain_cache()


def test_speculative_decodes_keep_the_state_after_the_last_accepted_token():
    # SimEngine.step checks, before each chunk, that the request's slot holds exactly its computed tokens and
    # its KV blocks their tokens: after a verifying step that is the state the accepted count picked.
    sim = SimEngine(slots=40, blocks=300, budget=32, max_seqs=4, drafts=4)
    seqs = [sim.add([1, 2, 0, 1] * (i + 1), max_tokens=30) for i in range(4)]
    steps = verifying_steps = 0
    while sim.sched.has_work():
        verifying_steps += sim.step().num_verifying > 0
        steps += 1
    assert all(s.num_output_tokens == 30 for s in seqs)
    assert verifying_steps > 5 and sim.accepted > 10 and steps < 30 - sim.accepted // 4 + 2
    sim.drain_cache()


def test_drafts_take_only_free_slots_and_blocks():
    # 4 requests in 6 slots: a step's drafts fit for at most one request (width <= 2 leaves no slot for the
    # others); nothing is evicted or preempted for them, and no slot or block leaks.
    sim = SimEngine(slots=6, blocks=40, block_size=2, budget=16, max_seqs=4, drafts=3, cache=False)
    for i in range(4):
        sim.add([i % 3, 1, 2], max_tokens=12)
    while sim.sched.has_work():
        out = sim.step()
        assert sum(len(c.verify_slots) for c in out.chunks) <= 6 - len(out.chunks)
    assert sim.sched.num_preemptions == 0
    sim.drain_cache()


def test_uniform_drafts_verify_every_decode_of_a_step_or_none():
    sim = SimEngine(slots=60, blocks=300, budget=32, max_seqs=4, drafts=3, uniform=True)
    seqs = [sim.add([1, 2, 0, 1] * (i + 1), max_tokens=20 + 3 * i) for i in range(4)]
    verifying_steps = 0
    while sim.sched.has_work():
        out = sim.step()  # checks the all-or-none rule
        verifying_steps += out.num_verifying > 0
    assert verifying_steps > 5 and all(s.is_finished for s in seqs)
    sim.drain_cache()


class SomeDrafter(SimDrafter):
    """Two drafts for the requests whose id is in `ids`, none for the others."""

    def __init__(self, ids):
        super().__init__(2, random.Random(0))
        self.ids = ids

    def propose(self, seq):
        return [1, 1] if seq.request_id in self.ids else []


@pytest.mark.parametrize("proposing, verifies", [({"r0"}, False), ({"r0", "r2"}, True), (set(), False)])
def test_uniform_drafts_need_proposals_for_half_the_decodes(proposing, verifies):
    sim = SimEngine(slots=60, blocks=300, budget=32, max_seqs=4, drafts=2, uniform=True)
    for i in range(4):
        sim.add([1, 2, 0, 1], max_tokens=20)
    sim.step()  # the prompts
    sim.sched.drafter = SomeDrafter(proposing)
    out = sim.step()
    assert out.num_verifying == (4 if verifies else 0)
    if verifies:  # the others guess their last token again
        others = [c for c in out.chunks if c.seq.request_id not in proposing]
        assert all(c.drafts == [c.seq.token_ids[c.start]] * 2 for c in others)


def test_drafts_evict_cache_entries_when_slots_run_short():
    # Finished conversations fill the cache's slots; the next request's drafts still get slots, from the
    # least recently used entries, and only as many as one step needs.
    sim = SimEngine(slots=24, blocks=400, budget=32, max_seqs=2, drafts=3)
    sim.sched.drafter = None
    for i in range(24):
        sim.add([10 + i, 1, 2, 3], max_tokens=2)
    sim.run()
    entries = sim.cache.num_entries
    assert sim.slots.num_free < 4 and entries > 20
    sim.sched.drafter = SimDrafter(3, random.Random(5))
    seq = sim.add([2, 2, 2], max_tokens=12)
    verified = 0
    while sim.sched.has_work():
        verified += sim.step().num_verifying
    assert seq.is_finished and verified > 0
    assert sim.cache.num_entries >= entries - 4 - 1  # one step's width, and the admission's slot
    sim.drain_cache()


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="policy"):
        Scheduler(4, 16, StateSlotPool(4), KVBlockManager(8, 2), policy="lifo")


def test_multi_turn_hits_end_of_turn_entry():
    sim = SimEngine(interval=8, align=4, block_size=2)
    turn1 = sim.add([1] * 11, max_tokens=3)
    sim.run()
    cached_len = turn1.num_computed_tokens  # 13: prompt + 2 of the 3 generated tokens went through the model
    turn2 = sim.add(turn1.token_ids + [2, 2, 2], max_tokens=2)
    sim.run()
    assert turn2.num_cached_tokens == cached_len == 13
    sim.drain_cache()


def test_prompt_checkpoints_at_interval_and_branch_point():
    sim = SimEngine(interval=8, align=4, block_size=2, budget=64)
    base = [1, 0, 1, 0, 2, 2, 1, 1] * 3  # 24 tokens
    a = sim.add(base + [0, 0, 0], max_tokens=1)
    sim.run()
    b = sim.add(base[:20] + [2, 2, 2, 2, 2], max_tokens=1)
    sim.run()
    assert b.num_cached_tokens == 16  # the checkpoint at 16; b leaves a's path at 22 (base[20:22] == [2, 2])
    c = sim.add(base[:20] + [2, 2, 0, 1], max_tokens=1)
    sim.run()
    # b's last chunk [16, 25) cannot checkpoint at 22 (not 4-aligned from 16): it saved 20, just below
    assert c.num_cached_tokens == 20
    sim.drain_cache()


def test_concurrent_identical_prefix_waits_for_the_first_and_shares():
    sim = SimEngine(interval=8, align=4, block_size=2, budget=8, slots=8)
    prompt = [2, 1] * 12
    a = sim.add(prompt + [0], max_tokens=2)
    b = sim.add(prompt + [1], max_tokens=2)
    sim.run()
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == 24
    sim.drain_cache()


def test_eviction_makes_room_but_never_takes_pinned_or_running():
    sim = SimEngine(slots=3, blocks=40, interval=8, align=4, block_size=2)
    for i in range(6):
        sim.add([i % 3] * 10, max_tokens=2)
        sim.run()
    assert sim.cache.num_entries <= 3
    sim.drain_cache()


def test_a_full_cache_still_saves_the_end_of_each_prompt():
    """Every slot held by cache entries: the next chat turn must still get its end-of-prompt entry (evicting the
    least recently used one), since its reply comes back re-tokenized and the end-of-turn entry then misses."""
    sim = SimEngine(slots=3, blocks=64, interval=8, align=4, block_size=2)
    for filler in ([3] * 10, [4] * 10, [5] * 10):
        sim.add(filler, max_tokens=2)
        sim.run()
    assert sim.slots.num_free == 0, "the fillers' entries hold every slot"
    prompt = [6, 7] * 6  # 12 tokens: a save point at 8 (interval) and at 12 (end of prompt)
    sim.add(prompt, max_tokens=3)
    sim.run()
    follow_up = sim.add(prompt + [9, 9] + [6] * 5, max_tokens=1)  # the reply "re-tokenized" to other ids
    sim.run()
    assert follow_up.num_cached_tokens == len(prompt)
    sim.drain_cache()


@pytest.mark.parametrize("start,total,budget,points,expected", [
    (0, 100, 40, {64}, (40, (), False)),
    (0, 100, 80, {64}, (80, (64,), False)),
    (0, 64, 80, {64}, (64, (), True)),
    (10, 200, 100, {64, 50}, (64, (), True)),  # unaligned start: cut at the last save point, copy there
    (10, 60, 100, {50}, (60, (), False)),  # last chunk: never cut
    (64, 300, 200, {128, 256, 100}, (100, (), True)),
])
def test_plan_chunk(start, total, budget, points, expected):
    plan = plan_chunk(start, total, budget, points)
    assert (plan.end, plan.checkpoints, plan.save_at_end) == expected


def test_plan_chunk_branch_points():
    # a middle chunk is cut exactly at the branch point; a last chunk checkpoints the aligned point below it
    assert plan_chunk(0, 500, 300, set(), branch=100) == plan_chunk(0, 500, 300, {100})
    assert plan_chunk(0, 500, 300, set(), branch=100).end == 100
    last = plan_chunk(0, 200, 300, set(), branch=100)
    assert (last.end, last.checkpoints, last.save_at_end) == (200, (64,), False)


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from(["new", "follow", "step", "step", "abort"]), st.integers(0, 10**6)),
                 min_size=5, max_size=60),
    slots=st.integers(2, 10),
    blocks=st.integers(24, 80),
    budget=st.integers(3, 24),
    cache=st.booleans(),
    policy=st.sampled_from(["fcfs", "priority"]),
    drafts=st.sampled_from([0, 0, 1, 3]),
    uniform=st.booleans(),
)
def test_random_workloads_keep_every_invariant(ops, slots, blocks, budget, cache, policy, drafts, uniform):
    sim = SimEngine(slots=slots, blocks=blocks, block_size=2, interval=8, align=4, max_seqs=4, budget=budget,
                    cache=cache, policy=policy, drafts=drafts, uniform=uniform)
    rng = random.Random(len(ops))
    bases = [[rng.randrange(3) for _ in range(30)] for _ in range(3)]
    live: list[Sequence] = []
    for op, x in ops:
        if op == "new":
            base = bases[x % 3]
            prompt = base[: 1 + x % 29] + [x % 3] * (x % 5)
            live.append(sim.add(prompt, max_tokens=1 + x % 4, priority=x % 3))
        elif op == "follow" and sim.finished:
            prev = sim.finished[x % len(sim.finished)]
            if prev.num_tokens + 6 < blocks * 2 - 2:
                live.append(sim.add(prev.token_ids + [x % 3, 1], max_tokens=1 + x % 3, priority=x % 2))
        elif op == "abort" and live:
            seq = live[x % len(live)]
            if not seq.is_finished:
                sim.sched.abort(seq)
                sim.check_invariants()
        elif sim.sched.has_work():
            sim.step()
    sim.run(max_steps=2000)
    assert all(s.is_finished for s in live)
    if cache:
        assert sim.slots.num_used == sim.cache.num_entries
    sim.drain_cache()
