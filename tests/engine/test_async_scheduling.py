"""Asynchronous scheduling (EngineConfig.async_scheduling): a step is queued before the previous step's tokens are
read back, the decodes feeding those tokens from the device. On the CPU nothing overlaps, but every piece of
bookkeeping runs as on CUDA, so these tests hold the engine to the synchronous one's results: the same tokens,
logprobs, stops, cache entries and freed resources, through preemption, aborts and follow-up turns."""

import pytest

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams
from kda_serving.server.cli import build_parser

from engine_testing import random_prompts

VOCAB = 211


def make_engine(model, async_scheduling, **overrides):
    cfg = dict(device="cpu", max_num_seqs=8, max_num_batched_tokens=64, num_state_slots=24, num_kv_blocks=160,
               prefix_cache_interval=64, async_scheduling=async_scheduling)
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg), model=model)


def run(engine, requests):
    """Adds (id, prompt, params) requests, steps to the end; {id: final output}, and per id the
    concatenated delta updates (tokens, logprobs)."""
    for request_id, prompt, params in requests:
        engine.add_request(request_id, prompt, params)
    final, tokens, logprobs = {}, {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in final, f"{out.request_id} updated after it finished"
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            logprobs.setdefault(out.request_id, []).extend(out.logprobs or [])
            if out.finished:
                final[out.request_id] = out
    assert not engine.scheduler.running and not engine.scheduler.waiting
    return final, tokens, logprobs


def mixed_requests(stop_token=None):
    prompts = random_prompts([5, 40, 1, 90, 17, 3], VOCAB, seed=21)
    params = [
        SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                       stop_token_ids=[stop_token] if stop_token is not None else []),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, output_kind="cumulative"),
    ]
    return [(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]


def test_async_engine_produces_what_the_synchronous_one_does(tiny_model):
    sync_final, sync_tokens, sync_lp = run(make_engine(tiny_model, False), mixed_requests())
    # a stop token from the middle of r3's run, so that r3 ends early in the second pair of runs
    stop = sync_final["r3"].output_token_ids[6]
    sync_final, sync_tokens, sync_lp = run(make_engine(tiny_model, False), mixed_requests(stop))
    engine = make_engine(tiny_model, True)
    final, tokens, logprobs = run(engine, mixed_requests(stop))
    assert final.keys() == sync_final.keys()
    for request_id, ref in sync_final.items():
        out = final[request_id]
        assert tokens[request_id] == sync_tokens[request_id], request_id
        assert (out.finish_reason, out.text) == (ref.finish_reason, ref.text), request_id
        assert logprobs[request_id] == pytest.approx(sync_lp[request_id], abs=1e-5), request_id
    assert final["r3"].finish_reason == "stop" and tokens["r3"][-1] == stop
    assert final["r5"].output_token_ids == tokens["r5"]  # cumulative: the whole output, no placeholder
    stats = engine.stats()
    assert stats.state_slots_used == 0 and stats.kv_blocks_used == 0
    assert stats.generation_tokens_total == sum(len(t) for t in tokens.values())


def test_min_tokens_counts_the_token_in_flight(tiny_model):
    """min_tokens with tokens still on the device: a request whose stop token wins every step (+100 bias) is
    held off for exactly min_tokens tokens, counting its pending one, as the synchronous engine holds it."""
    params = SamplingParams(temperature=0, max_tokens=9, stop_token_ids=[17], logit_bias={17: 100.0}, min_tokens=4)
    results = [run(make_engine(tiny_model, mode), [("m", [5, 6, 7, 8], params)])[1]["m"] for mode in (False, True)]
    assert results[0] == results[1] and len(results[0]) == 5 and results[0][-1] == 17 and 17 not in results[0][:4]


def test_steps_are_deferred_and_outputs_arrive_one_step_later(tiny_model):
    engine = make_engine(tiny_model, True)
    engine.add_request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert engine.step() == []  # the prefill's token is still on the "device"
    assert engine._in_flight is not None and engine._seqs["a"].pending_row == 0
    first = engine.step()  # queues the first decode, then reads the prefill's token
    assert [o.new_token_ids for o in first] == [[engine._seqs["a"].token_ids[3]]]
    second = engine.step()
    third = engine.step()  # its third token ends it: no decode was queued after it
    assert engine.last_step.num_seqs == 1 and third[0].finished and third[0].finish_reason == "length"
    assert not engine.has_unfinished_requests()
    assert len(first[0].new_token_ids + second[0].new_token_ids + third[0].new_token_ids) == 3


def test_penalised_requests_are_deferred_and_count_their_pending_token(tiny_model):
    """A penalised request's next step needs its last token in the penalty counts: with the token still on the
    device it joins them there. Every penalty kind, greedy (so any miscount changes the tokens), beside a plain
    request; the same tokens as the synchronous engine, with its steps deferred."""
    prompts = random_prompts([12, 30, 7], VOCAB, seed=8)
    # A logit bias makes token 50 the greedy choice until its penalty outweighs it, so the counts decide the
    # tokens: one miscounted occurrence changes where it stops or comes back.
    biased = ((50, 6.0),)
    kinds = [dict(frequency_penalty=2.0, logit_bias=biased),
             dict(frequency_penalty=1.0, presence_penalty=2.0, logit_bias=biased),
             dict(repetition_penalty=3.0, frequency_penalty=0.5, logit_bias=biased)]
    requests = [(f"p{i}", p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **k))
                for i, (p, k) in enumerate(zip(prompts, kinds))]
    requests.append(("plain", prompts[0], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)))
    _, sync_tokens, _ = run(make_engine(tiny_model, False), requests)
    engine = make_engine(tiny_model, True)
    deferred = []
    step = engine.step

    def recording_step():
        outputs = step()
        deferred.append(engine._in_flight is not None)
        return outputs

    engine.step = recording_step
    _, tokens, _ = run(engine, requests)
    assert tokens == sync_tokens and sum(deferred) >= 20
    assert all(1 < tokens[r].count(50) < 24 for r in ("p0", "p1", "p2"))  # the penalties steered the choice


def test_structured_requests_are_read_back_at_once():
    engine = LLMEngine(EngineConfig(max_num_seqs=4, num_state_slots=8, num_kv_blocks=64, async_scheduling=True))
    prompt = engine.tokenizer.encode("Answer in JSON:")
    engine.add_request("j", prompt, SamplingParams(temperature=0, max_tokens=6, structured_output=("json_object", "")))
    engine.add_request("q", prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    first = engine.step()  # the grammar's mask for the next token needs this one on the host
    assert engine._in_flight is None and {o.request_id for o in first} == {"j", "q"}
    final = run(engine, [])[0]
    assert final["j"].text.startswith("{") and engine.stats().state_slots_used == 0


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_and_aborts_with_tokens_in_flight(tiny_model, caching):
    """Pools so small that decodes preempt requests whose last token is still on the device; an abort lands
    between steps on a request with a pending token. Results equal the synchronous engine's, and every slot
    and block comes back."""
    prompts = random_prompts([40, 9, 77, 3, 25], VOCAB, seed=3)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    small = dict(num_state_slots=4, num_kv_blocks=10, block_size=16, max_num_seqs=4, enable_prefix_caching=caching)
    requests = [(f"r{i}", p, greedy) for i, p in enumerate(prompts)]
    sync_final, sync_tokens, _ = run(make_engine(tiny_model, False, **small), requests)
    engine = make_engine(tiny_model, True, **small)
    preempted_pending = []
    preempt = engine.scheduler._preempt

    def recording_preempt(seq, out):
        preempted_pending.append(seq.pending_row is not None)
        preempt(seq, out)

    engine.scheduler._preempt = recording_preempt
    final, tokens, _ = run(engine, requests)
    assert any(preempted_pending)  # a request was preempted while its last token was on the device
    assert tokens == sync_tokens

    engine.add_request("x", prompts[0], greedy)
    engine.add_request("y", prompts[1], greedy)
    for _ in range(3):
        engine.step()
    assert engine._seqs["x"].pending_row is not None
    aborted = engine.abort_request("x")
    assert aborted.finish_reason == "abort" and all(t >= 0 for t in aborted.output_token_ids)
    final, tokens, _ = run(engine, [])
    assert final["y"].output_token_ids == sync_final["r1"].output_token_ids
    stats = engine.stats()
    assert stats.state_slots_used == 0 and stats.kv_blocks_used == 0 and stats.num_running == 0


def test_a_follow_up_turn_reuses_the_state_a_deferred_stop_left(tiny_model):
    """A request that stops on a token it has already fed (its decode after the stop was queued) leaves a cache
    entry that includes that token; the next turn restores from it and matches a run without a cache."""
    prompt = random_prompts([70], VOCAB, seed=4)[0]
    probe = run(make_engine(tiny_model, False), [("p", prompt, SamplingParams(temperature=0, max_tokens=8,
                                                                              ignore_eos=True))])[0]["p"]
    stop = probe.output_token_ids[5]
    first = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop_token_ids=[stop])
    engine = make_engine(tiny_model, True)
    turn1 = run(engine, [("t1", prompt, first)])[0]["t1"]
    follow = prompt + turn1.output_token_ids + random_prompts([9], VOCAB, seed=5)[0]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    turn2 = run(engine, [("t2", follow, greedy)])[0]["t2"]
    assert turn2.num_cached_tokens == len(prompt) + len(turn1.output_token_ids)  # the stop token included
    fresh = run(make_engine(tiny_model, False, enable_prefix_caching=False), [("t2", follow, greedy)])[0]["t2"]
    assert turn2.output_token_ids == fresh.output_token_ids


def test_async_scheduling_config_and_flag():
    assert EngineConfig(device="cpu").async_scheduling is False
    assert EngineConfig(device="cuda").async_scheduling is True
    assert EngineConfig(device="cuda", num_speculative_tokens=2).async_scheduling is False
    with pytest.raises(ValueError, match="speculative decoding"):
        EngineConfig(device="cuda", num_speculative_tokens=2, async_scheduling=True)
    with pytest.raises(TypeError, match="async_scheduling"):
        EngineConfig(async_scheduling="yes")
    parser = build_parser()
    assert parser.parse_args(["--no-async-scheduling"]).async_scheduling is False
    assert parser.parse_args(["--async-scheduling"]).async_scheduling is True
    assert parser.parse_args([]).async_scheduling is None
