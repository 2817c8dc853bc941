"""Experiment (not CI): what the priority policy buys an urgent request on a saturated engine.

The embedded default model on the CPU, 4 sequences per step: 8 long background requests (priority 1, 96 tokens
each) fill every place, and every 10 steps an urgent request arrives (priority 0, 8 tokens), six in all. First
come first served, then the priority policy without a prefix cache (a preempted request recomputes) and with
one (it resumes from the entry its preemption made). For each, the urgent and background requests' waits from
arrival to first token and to the end, in engine steps (the unit the scheduler controls; a step's time depends
on its batch), and the run's preemptions, prompt tokens computed (recomputation included) and wall time.

    python benchmarks/experiments/priority_latency.py
"""

from __future__ import annotations

import statistics
import time

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams

BACKGROUND, URGENT, URGENT_EVERY = 8, 6, 10


def run(policy: str, caching: bool) -> dict:
    engine = LLMEngine(EngineConfig(max_num_seqs=4, num_state_slots=8, num_kv_blocks=512,
                                    enable_prefix_caching=caching, prefix_cache_interval=64,
                                    scheduling_policy=policy))
    tokens = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    background = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
    urgent = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    arrived, first, done = {}, {}, {}
    for i in range(BACKGROUND):
        engine.add_request(f"bg{i}", tokens, background, priority=1 if policy == "priority" else 0)
        arrived[f"bg{i}"] = 0
    step, sent, prefill_tokens = 0, 0, 0
    start = time.perf_counter()
    while engine.has_unfinished_requests() or sent < URGENT:
        if sent < URGENT and step == URGENT_EVERY * (sent + 1):
            engine.add_request(f"u{sent}", tokens[: 8 + sent], urgent)  # priority 0 under both policies
            arrived[f"u{sent}"] = step
            sent += 1
        step += 1
        before = engine.last_step
        for out in engine.step():
            first.setdefault(out.request_id, step)
            if out.finished:
                done[out.request_id] = step
        if engine.last_step is not before:  # a step that ran nothing leaves the previous one's StepInfo
            prefill_tokens += engine.last_step.num_prefill_tokens
    wall = time.perf_counter() - start

    def waits(prefix: str, table: dict) -> list[int]:
        return [table[r] - arrived[r] for r in arrived if r.startswith(prefix)]

    return dict(policy=policy, caching=caching, steps=step, wall_s=wall, prefill_tokens=prefill_tokens,
                preemptions=engine.stats().num_preemptions_total, urgent_first=waits("u", first),
                urgent_done=waits("u", done), background_done=waits("bg", done))


def main() -> None:
    for policy, caching in (("fcfs", True), ("priority", False), ("priority", True)):
        r = run(policy, caching)
        print(f"{policy:8s} prefix cache {'on ' if caching else 'off'}: urgent first token after "
              f"{statistics.median(r['urgent_first']):5.1f} steps (max {max(r['urgent_first'])}), done after "
              f"{statistics.median(r['urgent_done']):5.1f} "
              f"(max {max(r['urgent_done'])}); background done after {statistics.median(r['background_done']):5.1f} "
              f"steps (max {max(r['background_done'])}); {r['preemptions']} preemptions, {r['steps']} steps, "
              f"{r['prefill_tokens']} prompt tokens computed, {r['wall_s']:.2f} s", flush=True)


if __name__ == "__main__":
    main()
