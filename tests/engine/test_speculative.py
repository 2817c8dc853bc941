"""Speculative decoding (EngineConfig.num_speculative_tokens): a verifying step feeds a decode's last token and
its drafts, keeps the states after each, samples every position and keeps the run of sampled tokens that
matches the drafts. Its results must be those of decoding one token at a time: the same tokens under greedy
decoding (CPU, fp32: the same arithmetic), the same log-probabilities, penalties and stops, and the same
distribution when sampling.

The tiny random models never repeat their context, so prompt lookup would hardly ever propose a draft here;
most tests use OracleDrafter, which proposes the tokens the run without speculation produced, some of them
wrong and some lists cut short, so that every acceptance count occurs.
"""

import types

import pytest
import torch

from kda_serving.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from kda_serving.model.caches import ModelCaches

from engine_testing import OracleDrafter, random_prompts
from test_engine_exact import check_greedy_against_hf
from test_engine_exact import engine as exact_engine


def engine(model, **config):
    """test_engine_exact's engine, with state slots for the drafts of 16 sequences."""
    return exact_engine(model, **{"num_state_slots": 96, **config})


def generate(llm, prompts, params, expected=None, p_wrong=0.2, seed=0):
    """Outputs of llm for prompts; with `expected` (request index -> tokens) drafts come from an OracleDrafter."""
    if expected is not None:
        OracleDrafter(llm.engine, {str(i): t for i, t in expected.items()}, p_wrong, seed)
    eng = llm.engine
    for i, prompt in enumerate(prompts):
        eng.add_request(str(i), prompt, params)
    final, logprobs, top = {}, {}, {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            i = int(out.request_id)
            logprobs.setdefault(i, []).extend(out.logprobs or [])
            top.setdefault(i, []).extend(out.top_logprobs or [])
            if out.finished:  # with the whole run's logprobs (an update carries its own tokens' only)
                final[i] = out
                out.logprobs, out.top_logprobs = logprobs[i], top[i]
    free = eng.slots.num_free + eng.stats().state_slots_cached
    assert free == eng.slots.num_slots, "a verify slot leaked"
    return [final[i] for i in range(len(prompts))]


@pytest.mark.parametrize("k, p_wrong", [(1, 0.0), (3, 0.3), (8, 0.1), (4, 0.9)])
def test_greedy_tokens_equal_decoding_one_at_a_time(tiny_model, hf_model, k, p_wrong):
    prompts = random_prompts([1, 9, 40, 77, 130], 211, seed=4)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = generate(engine(tiny_model), prompts, params)
    llm = engine(tiny_model, num_speculative_tokens=k, max_num_batched_tokens=64)
    spec = generate(llm, prompts, params, {i: o.output_token_ids for i, o in enumerate(plain)}, p_wrong)
    assert [o.output_token_ids for o in spec] == [o.output_token_ids for o in plain]
    for prompt, out in zip(prompts, spec):
        check_greedy_against_hf(hf_model, prompt, out.output_token_ids)
    stats = llm.engine.stats()
    assert stats.spec_draft_tokens_total > 0
    if p_wrong < 0.5:
        assert stats.spec_accepted_tokens_total > 0
    assert stats.generation_tokens_total == 24 * len(prompts)
    if p_wrong == 0.0:  # one accepted draft per step, nearly always
        assert stats.num_steps_total < 24 * len(prompts) * 0.6


def test_logprobs_penalties_and_stop_tokens_equal_decoding_one_at_a_time(tiny_model):
    prompts = random_prompts([5, 33, 60], 211, seed=6)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=3, repetition_penalty=1.3,
                            frequency_penalty=0.4, presence_penalty=0.2)
    plain = generate(engine(tiny_model), prompts, params)
    # stop at a token each output holds somewhere in its middle
    stop = [o.output_token_ids[12] for o in plain]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=3, repetition_penalty=1.3,
                            frequency_penalty=0.4, presence_penalty=0.2, stop_token_ids=stop)
    plain = generate(engine(tiny_model), prompts, params)
    spec = generate(engine(tiny_model, num_speculative_tokens=5), prompts, params,
                    {i: o.output_token_ids for i, o in enumerate(plain)}, p_wrong=0.1)
    for a, b in zip(plain, spec):
        assert b.output_token_ids == a.output_token_ids and b.finish_reason == a.finish_reason
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-5)
        assert [sorted(t) for t in b.top_logprobs] == [sorted(t) for t in a.top_logprobs]
    assert any(o.finish_reason == "stop" for o in spec)


def test_min_tokens_bans_stop_tokens_at_every_draft_position(tiny_model):
    """A stop token that wins every step (+100 bias) and min_tokens 6: each verifying row must refuse it exactly
    at the output positions before the sixth, as decoding one token at a time does. With 3 drafts the verifying
    steps cover output positions 1-4 and 5-8, the second across min_tokens. Drafts that are the plain run's
    tokens (the stop at position 6 must be accepted in the step that starts at 5), then drafts with the stop
    token slipped in at position 5 after correct ones (that row must refuse it)."""
    prompts = random_prompts([5, 33], 211, seed=8)
    params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[17], logit_bias={17: 100.0},
                            min_tokens=6)
    plain = generate(engine(tiny_model), prompts, params)
    assert all(len(o.output_token_ids) == 7 and o.output_token_ids[-1] == 17 for o in plain)
    for drafts in ({i: o.output_token_ids for i, o in enumerate(plain)},
                   {i: o.output_token_ids[:5] + [17] + o.output_token_ids[5:] for i, o in enumerate(plain)}):
        spec = generate(engine(tiny_model, num_speculative_tokens=3), prompts, params, drafts, p_wrong=0.0)
        assert [o.output_token_ids for o in spec] == [o.output_token_ids for o in plain]


def test_prompt_logprobs_beside_verifying_steps(tiny_model):
    """A request with prompt logprobs among speculating ones: its prompt's rows come after the verifying rows
    of the step, and its logprobs and tokens are those of an engine without speculation."""
    prompts = random_prompts([5, 33, 40], 211, seed=9)
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)] * 2 + [
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=2)]
    plain = LLM(model_obj=tiny_model, num_state_slots=32, num_kv_blocks=128).generate(prompts[:2] + [prompts[2]],
                                                                                        params)
    llm = LLM(model_obj=tiny_model, num_state_slots=96, num_kv_blocks=128, num_speculative_tokens=3)
    OracleDrafter(llm.engine, {"llm-0": plain[0].output_token_ids, "llm-1": plain[1].output_token_ids}, 0.0, 0)
    eng = llm.engine
    eng.add_request("llm-0", prompts[0], params[0])
    eng.add_request("llm-1", prompts[1], params[1])
    for _ in range(3):  # the first two verify drafts before the third arrives
        eng.step()
    eng.add_request("late", prompts[2], params[2])
    first = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            first.setdefault(out.request_id, out)
    assert first["late"].prompt_logprobs == pytest.approx(plain[2].prompt_logprobs, abs=1e-5)
    assert eng.stats().spec_draft_tokens_total > 0


def test_stop_strings_inside_accepted_drafts():
    # The embedded default model (a real tokenizer): a stop string that the run without speculation meets
    # mid-output ends the speculating run at the same token with the same text, even where the drafts run on.
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompt = [11, 12, 13]
    plain = generate(LLM(), [prompt], params)[0]
    stop = plain.text[len(plain.text) // 2 : len(plain.text) // 2 + 3]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
    plain = generate(LLM(), [prompt], params)[0]
    spec = generate(LLM(num_speculative_tokens=6), [prompt], params, {0: plain.output_token_ids + [5] * 40},
                    p_wrong=0.0)[0]
    assert plain.finish_reason == spec.finish_reason == "stop" and stop not in plain.text
    assert spec.text == plain.text and spec.output_token_ids == plain.output_token_ids


def test_max_tokens_and_model_length_cap_the_drafts(tiny_model):
    prompt = random_prompts([20], 211, seed=8)[0]
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    plain = generate(engine(tiny_model), [prompt], params)[0]
    llm = engine(tiny_model, num_speculative_tokens=16, max_model_len=26)
    spec = generate(llm, [prompt], params, {0: plain.output_token_ids + [5] * 20}, p_wrong=0.0)[0]
    assert spec.output_token_ids == plain.output_token_ids[:6] and spec.finish_reason == "length"
    spec = generate(engine(tiny_model, num_speculative_tokens=16), [prompt], params,
                    {0: plain.output_token_ids + [5] * 20}, p_wrong=0.0)[0]
    assert spec.output_token_ids == plain.output_token_ids


def test_preemption_and_prefix_cache_reuse_with_speculation(tiny_model, hf_model):
    prompts = random_prompts([40, 9, 77, 3], 211, seed=3)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    plain = generate(engine(tiny_model), prompts, params)
    expected = {i: o.output_token_ids for i, o in enumerate(plain)}
    few_blocks = engine(tiny_model, num_kv_blocks=10, block_size=16, num_speculative_tokens=4)
    spec = generate(few_blocks, prompts, params, expected, p_wrong=0.1)
    assert [o.output_token_ids for o in spec] == [o.output_token_ids for o in plain]
    assert few_blocks.engine.stats().num_preemptions_total > 0
    # a follow-up turn restores the first turn's cached state (written from a verify slot) and KV
    llm = engine(tiny_model, num_speculative_tokens=4)
    first = generate(llm, [prompts[2]], params, {0: expected[2]}, p_wrong=0.1)[0]
    follow = prompts[2] + first.output_token_ids + [7, 8, 9]
    again = llm.generate([follow], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert again.num_cached_tokens >= len(prompts[2]) + len(first.output_token_ids) - 1 - 16
    check_greedy_against_hf(hf_model, follow, again.output_token_ids)


def test_prompt_lookup_end_to_end(tiny_model):
    # The real proposer: a prompt that repeats gives drafts whenever the output returns to it.
    prompts = [[5, 6, 7, 8, 9] * 8, random_prompts([50], 211, seed=9)[0] * 2]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    plain = generate(engine(tiny_model), prompts, params)
    llm = engine(tiny_model, num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=3)
    spec = generate(llm, prompts, params)
    assert [o.output_token_ids for o in spec] == [o.output_token_ids for o in plain]
    assert llm.engine.stats().spec_draft_tokens_total > 0


class Bigram:
    """A model whose next-token distribution depends on the last token only, with exact probabilities known:
    softmax(table[last token]). Enough of the model API for LLMEngine (no caches to speak of)."""

    def __init__(self, vocab=6, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, vocab, generator=gen) * 1.5
        self.config = types.SimpleNamespace(vocab_size=vocab, eos_token_ids=())
        self.max_model_len = 64
        self.path = None

    def allocate_caches(self, num_state_slots, num_kv_blocks, block_size, state_dtype):
        return ModelCaches([], [], [])

    def state_slot_bytes(self, state_dtype):
        return 1

    def kv_block_bytes(self, block_size):
        return 1

    def forward(self, batch, caches):
        return self.table[batch.input_ids[batch.logits_indices]]


class GreedyChainDrafter:
    """Drafts the bigram's most likely continuation (mostly accepted) or, with greedy=False, a fixed wrong-ish
    token (mostly rejected)."""

    def __init__(self, model, k, greedy=True):
        self.table, self.num_tokens, self.greedy = model.table, k, greedy

    def limit(self, seq):
        return max(0, min(self.num_tokens, seq.params.max_tokens - seq.num_output_tokens - 1))

    def propose(self, seq):
        drafts, last = [], seq.token_ids[-1]
        for _ in range(self.limit(seq)):
            last = int(self.table[last].argmax()) if self.greedy else (last + 1) % self.table.shape[0]
            drafts.append(last)
        return drafts


@pytest.mark.parametrize("greedy_drafts", [True, False])
def test_sampling_keeps_the_model_distribution(greedy_drafts):
    # 4000 seeded requests sample 4 tokens each (the first from the prompt, then verifying steps of up to 2
    # drafts); the frequencies of every position's token and of each pair of neighbours must match the exact
    # bigram probabilities (total variation; the sampling noise here is about 0.01 and 0.02).
    model, n, length = Bigram(), 4000, 4
    probs = model.table.double().softmax(-1)
    eng = LLMEngine(EngineConfig(max_num_seqs=512, max_num_batched_tokens=4096, num_state_slots=4096,
                                 num_kv_blocks=4096, enable_prefix_caching=False, num_speculative_tokens=2),
                    model=model)
    eng.scheduler.drafter = GreedyChainDrafter(model, 2, greedy_drafts)
    for i in range(n):
        eng.add_request(str(i), [0], SamplingParams(temperature=1.0, max_tokens=length, ignore_eos=True, seed=i))
    outs = []
    while eng.has_unfinished_requests():
        outs += [o.output_token_ids for o in eng.step() if o.finished]
    stats = eng.stats()
    assert stats.spec_draft_tokens_total > n
    assert stats.spec_accepted_tokens_total > (n if greedy_drafts else 0)
    samples = torch.tensor(outs)
    marginal = probs[0]
    for pos in range(length):
        freq = torch.bincount(samples[:, pos], minlength=6).double() / n
        assert 0.5 * float((freq - marginal).abs().sum()) < 0.03, f"position {pos}: {freq} vs {marginal}"
        if pos + 1 < length:
            pair = torch.bincount(samples[:, pos] * 6 + samples[:, pos + 1], minlength=36).double() / n
            exact = (marginal[:, None] * probs).reshape(-1)
            assert 0.5 * float((pair - exact).abs().sum()) < 0.05, f"positions {pos}, {pos + 1}"
        marginal = marginal @ probs


def test_speculation_config_is_validated():
    for bad, kind in (({"num_speculative_tokens": -1}, ValueError), ({"num_speculative_tokens": 17}, ValueError),
                      ({"num_speculative_tokens": True}, TypeError), ({"prompt_lookup_min": 0}, ValueError),
                      ({"prompt_lookup_min": 5, "prompt_lookup_max": 4}, ValueError)):
        with pytest.raises(kind, match="EngineConfig"):
            EngineConfig(**bad)


def test_a_prediction_drafts_the_output_and_changes_nothing_in_it(tiny_model):
    # OpenAI's predicted outputs: the run without speculation's own output as the prediction (a correct one),
    # then an edited one; the outputs must equal plain decoding's either way, and the counts say how the
    # prediction's drafts fared.
    prompts = random_prompts([7, 30], 211, seed=11)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = generate(engine(tiny_model), prompts, params)
    for edit in (False, True):
        llm = engine(tiny_model, num_speculative_tokens=4)
        eng = llm.engine
        for i, (prompt, out) in enumerate(zip(prompts, plain)):
            prediction = list(out.output_token_ids)
            if edit:  # two tokens inside the first verifying step's drafts (outputs 1-4) wrong: a rejection,
                # then the output leaves the prediction and must rejoin it
                prediction[3:5] = [(t + 1) % 211 for t in prediction[3:5]]
            eng.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                           prediction=prediction))
        final = {}
        while eng.has_unfinished_requests():
            for out in eng.step():
                if out.finished:
                    final[int(out.request_id)] = out
        for i, out in final.items():
            assert out.output_token_ids == plain[i].output_token_ids
            # every verifying step also samples one token of its own: 18 of the 23 after the first, all drafted
            assert out.accepted_prediction_tokens >= (8 if edit else 18), (edit, out.accepted_prediction_tokens)
            assert (out.rejected_prediction_tokens > 0) == edit
        assert eng.stats().spec_draft_tokens_total > 0
