"""Random workloads on the real engine (the tiny checkpoint, CPU): adds with assorted sampling parameters,
follow-up turns that reuse a finished conversation, aborts, and steps, on pools small enough that prefix-cache
eviction and preemption happen. Every request must end exactly once, within its limits, every slot and block
must come back, and a greedy request must produce the tokens it produces alone on an engine without a prefix
cache (or, on a numerical tie of the MoE router, alone with its prompt chunked finer): reuse, eviction,
preemption and batching never change a result. Some requests ask for their prompt's logprobs (sent once, equal
to those of the same run alone) or a min_tokens. Both with and without asynchronous
scheduling, whose deferred tokens meet every one of those events.

The scheduler's bookkeeping is fuzzed against a simulated model in test_scheduler.py; this runs the same kind
of workloads through the model itself."""

import os

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams

from engine_testing import random_prompts

VOCAB = 211
MAX_TOKENS = 24
MAX_MODEL_LEN = 160


def _engine(model, **overrides):
    cfg = dict(device="cpu", max_num_seqs=4, max_num_batched_tokens=48, block_size=4, num_state_slots=7,
               num_kv_blocks=44, prefix_cache_interval=64, max_model_len=MAX_MODEL_LEN)
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg), model=model)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def engines(tiny_model, request):
    """(the engine under test, synchronous or with asynchronous scheduling; two reference engines: no prefix
    cache, one sequence at a time, prompts in chunks of 48 and of 4 tokens)."""
    reference = dict(enable_prefix_caching=False, max_num_seqs=1, num_state_slots=2, num_kv_blocks=96)
    return (_engine(tiny_model, async_scheduling=request.param), _engine(tiny_model, **reference),
            _engine(tiny_model, **reference, max_num_batched_tokens=4))


ADD = st.tuples(st.just("add"), st.integers(1, 100), st.integers(0, 10**6), st.integers(1, MAX_TOKENS),
                st.sampled_from([0.0, 0.0, 0.8]), st.sampled_from([None, 0, 2]), st.booleans(),
                st.sampled_from([None, None, 1]), st.sampled_from([0, 0, 3]))  # prompt_logprobs, min_tokens
OPS = st.one_of(
    ADD, ADD, ADD,  # adds weighted up, so that the pools run short
    st.tuples(st.just("follow_up"), st.integers(0, 10**6), st.integers(1, 40)),
    st.tuples(st.just("abort"), st.integers(0, 10**6)),
    st.tuples(st.just("step"), st.integers(1, 3)),
)


def _alone(reference: LLMEngine, prompt, params) -> list[int]:
    return _alone_with_prompt_logprobs(reference, prompt, params)[0]


def _alone_with_prompt_logprobs(reference: LLMEngine, prompt, params) -> tuple[list[int], list | None]:
    reference.add_request("ref", prompt, params)
    tokens, prompt_logprobs = None, None
    while reference.has_unfinished_requests():
        for out in reference.step():
            tokens = out.output_token_ids
            prompt_logprobs = prompt_logprobs or out.prompt_logprobs
    return tokens, prompt_logprobs


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 40)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=st.lists(OPS, min_size=1, max_size=16))
@example(ops=[("add", 46, 66101, 16, 0.0, None, False, None, 0), ("follow_up", 63586, 15)])  # a router tie
def test_random_workloads_end_cleanly_and_greedy_results_match_an_isolated_run(engines, ops):
    engine, reference, fine_reference = engines
    before = engine.stats()
    requests = {}  # id -> (prompt, params)
    finished = {}  # id -> the final RequestOutput
    prompt_logprobs = {}  # id -> the prompt logprobs its first update carried
    n = 0

    def collect(outputs):
        for out in outputs:
            if out.prompt_logprobs is not None:
                assert out.request_id not in prompt_logprobs, f"{out.request_id} sent its prompt logprobs twice"
                prompt_logprobs[out.request_id] = out.prompt_logprobs
            if out.finished:
                assert out.request_id not in finished, f"{out.request_id} finished twice"
                finished[out.request_id] = out

    for op in ops:
        if op[0] == "add":
            _, length, seed, max_tokens, temperature, logprobs, penalize, prompt_lp, min_tokens = op
            prompt = random_prompts([length], VOCAB, seed=seed)[0]
            params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=seed,
                                    logprobs=logprobs, presence_penalty=0.5 if penalize else 0.0,
                                    prompt_logprobs=prompt_lp, min_tokens=min(min_tokens, max_tokens))
        elif op[0] == "follow_up":
            while not any(r.finish_reason == "length" for r in finished.values()) \
                    and engine.has_unfinished_requests():  # a turn to follow up on
                collect(engine.step())
            done = [r for r in finished.values() if r.finish_reason == "length"]
            if not done:
                continue
            prev = done[op[1] % len(done)]
            prompt = prev.prompt_token_ids + prev.output_token_ids + random_prompts([op[2]], VOCAB, seed=op[1])[0]
            if len(prompt) + MAX_TOKENS > MAX_MODEL_LEN:
                continue
            params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        elif op[0] == "abort":
            live = [i for i in requests if i not in finished]
            if live:
                victim = live[op[1] % len(live)]
                out = engine.abort_request(victim)
                if out is not None:
                    collect([out])
            continue
        else:
            for _ in range(op[1]):
                collect(engine.step())
            continue
        request_id = f"fz{n}"
        n += 1
        engine.add_request(request_id, prompt, params)
        requests[request_id] = (prompt, params)
    while engine.has_unfinished_requests():
        collect(engine.step())

    assert set(finished) == set(requests), "every request ends exactly once"
    stats = engine.stats()
    # What the workload exercised (--hypothesis-show-statistics)
    event(f"preempted: {stats.num_preemptions_total > before.num_preemptions_total}")
    event(f"prefix-cache hit: {stats.prefix_cache_hits > before.prefix_cache_hits}")
    event(f"aborted: {stats.requests_aborted_total > before.requests_aborted_total}")
    assert stats.state_slots_used == 0 and stats.kv_blocks_used == 0 and stats.num_running == 0
    for request_id, out in finished.items():
        prompt, params = requests[request_id]
        if out.finish_reason == "abort":
            assert len(out.output_token_ids) <= params.max_tokens
            continue
        assert out.finish_reason == "length" and len(out.output_token_ids) == params.max_tokens
        if params.prompt_logprobs is not None:  # every prompt token's, the first None, as the request runs alone
            event("prompt logprobs")
            got = prompt_logprobs[request_id]
            assert len(got) == len(prompt) and got[0] is None and all(v is not None and v <= 0 for v in got[1:])
            want = _alone_with_prompt_logprobs(reference, prompt, params)[1]
            if got[1:] != pytest.approx(want[1:], abs=1e-4):  # a router tie (below): a finer chunking gives it
                want = _alone_with_prompt_logprobs(fine_reference, prompt, params)[1]
                assert got[1:] == pytest.approx(want[1:], abs=1e-4), request_id
        if params.temperature == 0.0 and params.presence_penalty == 0.0:
            alone = _alone(reference, prompt, params)
            if out.output_token_ids != alone:
                # A tie in fp32: the tiny model's MoE router can hold two experts within 1e-7 of each other, and
                # then how a prompt is chunked decides which one a token takes (the example below: a follow-up's
                # third token is 4 with chunks of 32+ tokens, 160 with chunks of 4-16 and in the engine, which
                # computed the tied position as a decode). Such a result is right if a finer chunking gives it;
                # a real error matches neither.
                event("greedy result on a numerical tie")
                assert out.output_token_ids == _alone(fine_reference, prompt, params), request_id
