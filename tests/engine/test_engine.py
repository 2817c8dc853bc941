"""LLMEngine / LLM behaviour: stop conditions, length limits, seeds, logprobs, aborts, bad requests."""

import pytest
import torch

from kda_serving.engine import EngineConfig, LLM, LLMEngine, SamplingParams

from engine_testing import random_prompts


def make_llm(model, **config):
    config.setdefault("num_state_slots", 16)
    config.setdefault("num_kv_blocks", 128)
    config.setdefault("prefix_cache_interval", 64)
    return LLM(model_obj=model, **config)


@pytest.fixture(scope="module")
def llm(tiny_model):
    return make_llm(tiny_model)


def test_stop_token_ids_and_max_tokens(llm):
    prompt = random_prompts([12], 211, seed=10)[0]
    ref = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert ref.finish_reason == "length" and len(ref.output_token_ids) == 8
    stop_at = ref.output_token_ids[3]
    first = ref.output_token_ids.index(stop_at)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_at]))[0]
    assert out.finish_reason == "stop" and out.output_token_ids == ref.output_token_ids[: first + 1]


def test_min_tokens_holds_off_every_stop(llm):
    """A +100 bias makes a stop token (a stop_token_id, or eos) every step's choice: without min_tokens the request
    stops at its first token, with min_tokens 4 the stop token is banned for the first 4 and ends it at the
    fifth; greedy or sampled, one request at a time or batched (rows of other requests untouched)."""
    prompt = random_prompts([12], 211, seed=11)[0]
    eos = min(llm.engine.eos_token_ids)
    for stop in (dict(stop_token_ids=[17]), dict()):
        token = 17 if stop else eos
        for temperature in (0.0, 1.0):
            base = dict(temperature=temperature, seed=3, max_tokens=8, logit_bias={token: 100.0}, **stop)
            free, held, other = llm.generate([prompt] * 3, [
                SamplingParams(**base), SamplingParams(min_tokens=4, **base),
                SamplingParams(**{**base, "stop_token_ids": [], "logit_bias": {}}, ignore_eos=True)])
            assert free.output_token_ids == [token] and free.finish_reason == "stop"
            assert len(held.output_token_ids) == 5 and held.finish_reason == "stop"
            assert held.output_token_ids[-1] == token and token not in held.output_token_ids[:4]
            assert other.finish_reason == "length" and len(other.output_token_ids) == 8


def test_min_tokens_holds_off_stop_strings():
    """The default model (with a tokenizer): a stop string that the text reaches at its first tokens ends it
    there without min_tokens; with min_tokens 6 the search starts with the seventh token's text (and the end of
    the text before it that a match could start in), as vLLM's detokenizer does."""
    llm = LLM(num_state_slots=8, num_kv_blocks=64)
    prompt = "The quick brown fox"
    ref = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    texts = [llm.tokenizer.decode(ref.output_token_ids[: i + 1], skip_special_tokens=True) for i in range(12)]
    stop = texts[1][-1]  # in the text by the second token
    early = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))[0]
    assert early.finish_reason == "stop" and early.text == ref.text[: ref.text.index(stop)]
    assert len(early.output_token_ids) <= 2
    held = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop],
                                               min_tokens=6))[0]
    cut = ref.text.find(stop, len(texts[5]) - (len(stop) - 1))
    assert held.output_token_ids == ref.output_token_ids[: len(held.output_token_ids)]
    if cut < 0:
        assert held.finish_reason == "length" and held.text == ref.text
    else:
        assert held.finish_reason == "stop" and held.text == ref.text[:cut]
    assert len(held.output_token_ids) > 6 and len(held.text) > len(early.text)


def test_max_model_len_ends_generation_and_rejects_long_prompts(tiny_model):
    llm = make_llm(tiny_model, max_model_len=20)
    out = llm.generate([list(range(3, 18))], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.output_token_ids) == 5
    with pytest.raises(ValueError, match="limit is 19"):
        llm.generate([list(range(3, 23))], SamplingParams())


@pytest.mark.parametrize("prompt,error,match", [
    ([], ValueError, "must not be empty"),
    ([3, 500], ValueError, "outside the vocabulary"),
    ([3, -1], ValueError, "outside the vocabulary"),
    ([3, "a"], TypeError, "list of ints"),
    ([3, True], TypeError, "list of ints"),
    ([3, 4.0], TypeError, "list of ints"),
    ("abc", TypeError, "list of ints"),
])
def test_add_request_rejects_bad_prompts(llm, prompt, error, match):
    with pytest.raises(error, match=match):
        llm.engine.add_request("bad", prompt, SamplingParams())
    assert not llm.engine.has_unfinished_requests()


def test_duplicate_request_id_and_bad_params(llm):
    llm.engine.add_request("dup", [3, 4], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="already in use"):
        llm.engine.add_request("dup", [3, 4], SamplingParams())
    with pytest.raises(TypeError, match="params"):
        llm.engine.add_request("x", [3, 4], {"max_tokens": 3})
    while llm.engine.has_unfinished_requests():
        llm.engine.step()


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    prompts = random_prompts([9, 30, 4], 211, seed=11)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=6, ignore_eos=True)
    alone = llm.generate([prompts[0]], seeded)[0].output_token_ids
    mixed = llm.generate(prompts, [seeded, SamplingParams(temperature=1.0, max_tokens=6), SamplingParams(max_tokens=3)])
    assert mixed[0].output_token_ids == alone
    other = llm.generate([prompts[0]], SamplingParams(temperature=1.0, seed=99, max_tokens=6, ignore_eos=True))[0]
    greedy = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert len({tuple(alone), tuple(other.output_token_ids), tuple(greedy.output_token_ids)}) > 1


def test_logprobs_returned_for_every_token(llm):
    prompt = random_prompts([7], 211, seed=12)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, logprobs=2, ignore_eos=True))[0]
    assert len(out.logprobs) == len(out.top_logprobs) == 5
    for tok, lp, top in zip(out.output_token_ids, out.logprobs, out.top_logprobs):
        assert lp <= 0 and next(iter(top)) == tok and abs(top[tok] - lp) < 1e-6 and len(top) == 2


def test_abort_frees_slots_and_blocks_at_once(tiny_model):
    engine = LLMEngine(
        EngineConfig(num_state_slots=4, num_kv_blocks=64, enable_prefix_caching=False), model=tiny_model
    )
    prompts = random_prompts([40, 10, 25, 3, 8], 211, seed=13)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=100, ignore_eos=True))
    for _ in range(3):
        engine.step()
    stats = engine.stats()
    assert stats.num_running == 4 and stats.num_waiting == 1 and stats.state_slots_used == 4
    out = engine.abort_request("r1")
    assert out.finished and out.finish_reason == "abort"
    assert engine.stats().state_slots_used == 3 and engine.abort_request("r1") is None
    for i in (0, 2, 3, 4):
        engine.abort_request(f"r{i}")
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == stats.state_slots_used == stats.kv_blocks_used == 0
    assert engine.slots.num_free == 4 and engine.blocks.num_free == 64 and stats.requests_aborted_total == 5
    assert engine.step() == []


def test_bf16_kda_states_fit_more_slots_in_the_same_budget(tiny_model):
    """kda_state_dtype="bfloat16": bf16 recurrent pools, more slots from the same CPU budget in proportion to
    the smaller slot (its recurrent part halves, the conv windows keep their size), and the engine serves."""
    fp32, bf16 = (LLMEngine(EngineConfig(kda_state_dtype=d, cpu_cache_bytes=8 << 20), model=tiny_model)
                  for d in ("float32", "bfloat16"))
    assert all(p.dtype == torch.bfloat16 for p in bf16.runner.caches.recurrent)
    ratio = tiny_model.state_slot_bytes(torch.float32) / tiny_model.state_slot_bytes(torch.bfloat16)
    assert ratio > 1.4 and abs(bf16.config.num_state_slots - ratio * fp32.config.num_state_slots) <= ratio + 1
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for i, prompt in enumerate(random_prompts([9, 30], 211, seed=21)):
        bf16.add_request(str(i), prompt, params)
    done = {}
    while bf16.has_unfinished_requests():
        done.update((out.request_id, out.output_token_ids) for out in bf16.step() if out.finished)
    assert sorted(done) == ["0", "1"] and all(len(tokens) == 6 for tokens in done.values())


def test_text_stop_strings_with_the_default_model():
    llm = LLM(num_state_slots=8, num_kv_blocks=64)
    prompt = "The quick brown fox"
    ref = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert ref.text and ref.text == llm.tokenizer.decode(ref.output_token_ids, skip_special_tokens=True)
    stop = ref.text[len(ref.text) // 2 : len(ref.text) // 2 + 3]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == ref.text[: ref.text.index(stop)]
    assert llm.engine.model_name == "kda-serving-tiny" and llm.engine.tokenizer is not None


def test_engine_config_validation():
    with pytest.raises(ValueError, match="device"):
        EngineConfig(device="tpu")
    with pytest.raises(ValueError, match="prefix_cache_interval"):
        EngineConfig(prefix_cache_interval=100)
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=24)
    with pytest.raises(TypeError, match="max_num_seqs"):
        EngineConfig(max_num_seqs="8")
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_seqs=64, max_num_batched_tokens=32)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="kda_state_dtype"):
        EngineConfig(kda_state_dtype="float16")
    with pytest.raises(TypeError, match="enable_cuda_graphs"):
        EngineConfig(enable_cuda_graphs=1)
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineConfig(scheduling_policy="lifo")
    with pytest.raises(ValueError, match="prompt_graph_tokens"):
        EngineConfig(prompt_graph_tokens=-1)
    with pytest.raises(TypeError, match="prompt_graph_tokens"):
        EngineConfig(prompt_graph_tokens=True)
    assert EngineConfig(device="cuda").dtype == "bfloat16" and EngineConfig().dtype == "float32"
    with pytest.raises(TypeError, match="torch_compile"):
        EngineConfig(torch_compile="yes")
    assert EngineConfig(device="cuda").torch_compile and not EngineConfig().torch_compile


def test_torch_compile_flag_reaches_the_model(tiny_model):
    """The engine compiles the model's plain pieces when asked and puts the eager ones back when not (a model
    object shared by several engines, as in the benchmarks)."""
    from kda_serving.model.norm import rms_norm
    from kda_serving.server.cli import build_parser

    LLMEngine(EngineConfig(torch_compile=True, num_state_slots=4, num_kv_blocks=32), model=tiny_model)
    assert tiny_model.norm_fn is not rms_norm
    LLMEngine(EngineConfig(num_state_slots=4, num_kv_blocks=32), model=tiny_model)
    assert tiny_model.norm_fn is rms_norm and tiny_model.layers[0].norm_fn is rms_norm
    parser = build_parser()
    assert parser.parse_args(["--no-torch-compile"]).torch_compile is False
    assert parser.parse_args([]).torch_compile is None


def test_generate_is_all_or_nothing_on_a_bad_prompt(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[3, 4], []], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("stop", [(), ("e",)])
def test_delta_updates_sum_to_the_cumulative_ones(stop):
    """output_kind="delta" (what the server and LLM.generate ask for) carries only what each update added;
    summed, its updates give the cumulative request's, update by update, text (stop strings cut) included."""
    llm = LLM(num_state_slots=8, num_kv_blocks=64)
    engine = llm.engine
    prompt = llm.tokenizer.encode("The quick brown fox")
    for kind in ("cumulative", "delta"):
        engine.add_request(kind, prompt, SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, stop=stop,
                                                        output_kind=kind))
    tokens, text, updates = {"cumulative": [], "delta": []}, {"cumulative": "", "delta": ""}, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            text[out.request_id] += out.delta_text
            if out.request_id == "cumulative":
                assert out.output_token_ids == tokens["cumulative"] and out.text.startswith(text["cumulative"])
            else:
                assert out.output_token_ids == out.new_token_ids and out.text == out.delta_text
            if out.finished:
                updates.append((out.request_id, out.finish_reason, out.text))
    assert tokens["delta"] == tokens["cumulative"] and len(tokens["delta"]) > 0
    assert text["delta"] == text["cumulative"] and text["delta"]
    final = dict((rid, (reason, t)) for rid, reason, t in updates)
    assert final["cumulative"] == (final["delta"][0], text["cumulative"])
    if stop:
        assert final["delta"][0] == "stop" and "e" not in text["delta"]
    generated = llm.generate(llm.tokenizer.decode(prompt), SamplingParams(temperature=0, max_tokens=14,
                                                                          ignore_eos=True, stop=stop))[0]
    assert generated.output_token_ids == tokens["delta"] and generated.text == text["delta"]


def test_output_kind_is_validated():
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="final")


def test_penalties_follow_the_rule_over_the_generated_tokens(llm):
    """A greedy request with frequency and presence penalties picks, at every step, the argmax of the model's
    own top logprobs (unpenalized one-token requests on the same prefix) minus the penalties of the tokens it
    generated so far; the prompt's tokens are not penalized. The prompt is one whose unpenalized output repeats
    a token, so the penalties have something to change."""
    n = 16
    greedy = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, frequency_penalty=1.5, presence_penalty=1.0)
    for seed in range(20):
        # The prompt ends with the model's own continuation, so its tokens are likely candidates again and a
        # penalty wrongly applied to them would show.
        base = random_prompts([10], 211, seed=seed)[0]
        prompt = base + llm.generate([base], greedy)[0].output_token_ids[:8]
        plain = llm.generate([prompt], greedy)[0].output_token_ids
        if len(set(plain)) < n:
            break
    else:
        pytest.fail("no prompt among 20 gave an unpenalized output that repeats a token")
    out = llm.generate([prompt], params)[0].output_token_ids
    assert len(out) == n and out != plain
    for t in range(n):
        step = llm.generate([prompt + out[:t]], SamplingParams(temperature=0, max_tokens=1, logprobs=20))[0]
        so_far = out[:t]
        scores = {tok: lp - 1.5 * so_far.count(tok) - 1.0 * (tok in so_far) for tok, lp in step.top_logprobs[0].items()}
        assert out[t] == max(scores, key=scores.get), t


def test_logit_bias_bans_a_token_and_is_checked_against_the_vocabulary(llm):
    prompt = random_prompts([10], 211, seed=2)[0]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    plain = llm.generate([prompt], greedy)[0].output_token_ids
    banned = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                   logit_bias={plain[0]: -100}))[0].output_token_ids
    assert banned[0] != plain[0] and plain[0] not in banned
    with pytest.raises(ValueError, match="logit_bias"):
        llm.engine.add_request("too-big", prompt, SamplingParams(logit_bias={211: 1.0}))


def test_a_corrupt_batch_is_refused_on_the_host_before_the_model_runs(tiny_model, monkeypatch):
    """The runner checks each eager step's batch once on the host (RaggedBatch.check) and lets the ops skip their
    own index checks: a slot index gone wrong must still be refused, before any layer touches the pools."""
    engine = LLMEngine(EngineConfig(num_state_slots=4, num_kv_blocks=64), model=tiny_model)
    engine.add_request("r", [5, 6, 7, 8], SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()
    calls = []
    forward = engine.runner.model.forward
    monkeypatch.setattr(engine.runner.model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    engine._seqs["r"].state_slot = 4  # one past the pool
    with pytest.raises(ValueError, match="state_slots"):
        engine.step()
    assert calls == []


def _run_to_end(engine) -> tuple[dict[str, list[int]], list[str]]:
    """Every request's output tokens, and the order in which they finished."""
    tokens, finished = {}, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] = out.output_token_ids
            if out.finished:
                finished.append(out.request_id)
    return tokens, finished


@pytest.mark.parametrize("caching", [False, True])
def test_priority_policy_serves_an_urgent_request_first_and_loses_nothing(tiny_model, caching):
    """Two sequence places held by long low-priority generations: an urgent request preempts the later of them
    at once, finishes first, and every generation equals the same prompt run alone. The preempted one
    recomputes (no prefix cache) or resumes from the cache entry its preemption made."""
    config = dict(num_state_slots=4, num_kv_blocks=64, max_num_seqs=2, enable_prefix_caching=caching,
                  prefix_cache_interval=64)
    engine = LLMEngine(EngineConfig(**config, scheduling_policy="priority"), model=tiny_model)
    prompts = random_prompts([12, 9, 7], 211, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    engine.add_request("low0", prompts[0], params, priority=5)
    engine.add_request("low1", prompts[1], params, priority=5)
    for _ in range(3):
        engine.step()
    engine.add_request("urgent", prompts[2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                       priority=-1)
    tokens, finished = _run_to_end(engine)
    stats = engine.stats()
    assert finished[0] == "urgent" and stats.num_preemptions_total == 1
    alone = LLMEngine(EngineConfig(**config), model=tiny_model)
    for i, (name, rank) in enumerate([("low0", 5), ("low1", 5), ("urgent", -1)]):
        alone.add_request(name, prompts[i], params if name != "urgent" else
                          SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        assert _run_to_end(alone)[0][name] == tokens[name], name


def test_llm_generate_takes_one_priority_per_prompt(llm):
    prompts = [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="one int per prompt"):
        llm.generate(prompts, SamplingParams(max_tokens=1), priority=[0])
    with pytest.raises(ValueError, match="scheduling_policy"):  # the default engine serves first come first
        llm.generate(prompts, SamplingParams(max_tokens=1), priority=[0, 1])
    assert not llm.engine.has_unfinished_requests()  # all or nothing
    assert len(llm.generate(prompts, SamplingParams(max_tokens=1), priority=[0, 0])) == 2


def test_priority_needs_the_priority_policy_and_an_int(tiny_model):
    engine = LLMEngine(EngineConfig(num_state_slots=2, num_kv_blocks=16), model=tiny_model)
    with pytest.raises(ValueError, match="scheduling_policy='priority'"):
        engine.add_request("r", [1, 2], priority=3)
    engine.add_request("r0", [1, 2], priority=0)  # the default priority is fine under fcfs
    prio = LLMEngine(EngineConfig(num_state_slots=2, num_kv_blocks=16, scheduling_policy="priority"),
                     model=tiny_model)
    for bad in (1.5, "1", True, None):
        with pytest.raises(TypeError, match="priority"):
            prio.add_request("r", [1, 2], priority=bad)
    assert not prio.has_unfinished_requests()


def test_prompt_logprobs_equal_transformers(tiny_model, hf_model):
    """SamplingParams.prompt_logprobs against transformers' own forward of the prompt (fp32, code nobody here
    wrote): every prompt token after the first gets log_softmax(logits of the token before)[token] and the k
    most likely alternatives; the first gets None. Prompts of 70 and 45 tokens in chunks of at most 32 tokens
    (so the rows of several steps, mixed with another request's decodes, are stitched together), one beside a
    request without them; a second run of the same prompt gets them all again, its prefix not taken from the
    cache. One update carries them, the first."""
    from model.kimi_testing import hf_logits

    llm = make_llm(tiny_model, max_num_batched_tokens=32, max_num_seqs=4)
    prompts = random_prompts([70, 45, 20], 211, seed=12)
    params = [SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=3),
              SamplingParams(temperature=0, max_tokens=5, prompt_logprobs=0),
              SamplingParams(temperature=0, max_tokens=4)]
    for attempt in range(2):
        outs = llm.generate(prompts, params)
        assert outs[2].prompt_logprobs is None and outs[2].prompt_top_logprobs is None
        for out, prompt, p in zip(outs[:2], prompts, params):
            ref = torch.log_softmax(hf_logits(hf_model, prompt).double(), dim=-1)
            lp, top = out.prompt_logprobs, out.prompt_top_logprobs
            assert len(lp) == len(top) == len(prompt) and lp[0] is None and top[0] is None
            want = [float(ref[i - 1, prompt[i]]) for i in range(1, len(prompt))]
            assert lp[1:] == pytest.approx(want, abs=1e-4)
            for i in range(1, len(prompt)):
                expect = ref[i - 1].topk(p.prompt_logprobs)
                assert sorted(top[i]) == sorted(expect.indices.tolist())
                assert sorted(top[i].values()) == pytest.approx(sorted(expect.values.tolist()), abs=1e-4)
            assert out.num_cached_tokens == 0
    assert llm.engine.stats().prefix_cache_entries > 0  # the cache had the prompts the second time


def test_prompt_logprobs_in_the_first_update_only(tiny_model):
    engine = LLMEngine(EngineConfig(num_state_slots=8, num_kv_blocks=64), model=tiny_model)
    engine.add_request("a", list(range(5, 25)), SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1,
                                                                output_kind="delta"))
    updates = []
    while engine.has_unfinished_requests():
        updates += engine.step()
    assert updates[0].prompt_logprobs is not None and len(updates[0].prompt_logprobs) == 20
    assert all(u.prompt_logprobs is None and u.prompt_top_logprobs is None for u in updates[1:])


def test_prompt_logprob_rows_per_step_are_bounded(tiny_model, monkeypatch):
    """Three such requests of 300 tokens with a step budget of 2,048: each step computes at most
    PROMPT_LOGPROB_TOKENS_PER_STEP of their prompt tokens (+ 1 per request), and all complete."""
    from kda_serving.engine import scheduler

    monkeypatch.setattr(scheduler, "PROMPT_LOGPROB_TOKENS_PER_STEP", 100)
    engine = LLMEngine(EngineConfig(num_state_slots=8, num_kv_blocks=256, max_num_batched_tokens=2048),
                       model=tiny_model)
    for i, prompt in enumerate(random_prompts([300, 300, 300], 211, seed=13)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0))
    first = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            first.setdefault(out.request_id, out)
        assert engine.last_step is None or engine.last_step.num_prefill_tokens <= 100 + 3
    assert sorted(first) == ["0", "1", "2"] and all(len(o.prompt_logprobs) == 300 for o in first.values())
    assert all(v is not None for o in first.values() for v in o.prompt_logprobs[1:])
