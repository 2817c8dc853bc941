"""Sampler: greedy, temperature, top-k, min-p, top-p, banned tokens, per-request seeds and logprobs, on synthetic
logits."""

import math

import pytest
import torch

from kda_serving.engine.sampler import Sampler, penalize
from kda_serving.engine.sampling_params import SamplingParams


def sampler(seed=0):
    return Sampler(torch.Generator().manual_seed(seed))


def draw(s, logits, params, n, generators=None):
    counts = torch.zeros(logits.shape[-1])
    for _ in range(n):
        tok = s(logits[None], [params], generators or [None]).token_ids[0]
        counts[tok] += 1
    return counts / n


def test_greedy_picks_argmax_per_row():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1))
    out = sampler()(logits, [SamplingParams(temperature=0)] * 5, [None] * 5)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 5


def test_temperature_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log() * 2.0  # temperature 2 restores probs
    freq = draw(sampler(), logits, SamplingParams(temperature=2.0), 4000)
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_top_k_and_top_p_cut_the_tail():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    freq_k = draw(sampler(), logits, SamplingParams(top_k=2), 2000)
    assert freq_k[2:].sum() == 0 and abs(freq_k[0] - 0.625) < 0.04  # renormalised 0.5 / 0.8
    freq_p = draw(sampler(), logits, SamplingParams(top_p=0.7), 2000)
    assert freq_p[2:].sum() == 0  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 go
    freq_p = draw(sampler(), logits, SamplingParams(top_p=0.85), 2000)
    assert freq_p[3] == 0 and freq_p[2] > 0
    assert draw(sampler(), logits, SamplingParams(top_p=0.01), 200)[0] == 1.0


def _filtered_reference(logits, params):
    """float64, row by row from the definitions by a sort: softmax(l / T) kept on the top_k largest and on the
    tokens at least min_p times as likely as the most likely one, then on the smallest set of the largest whose
    mass (within those) reaches top_p, renormalised. Tokens tied with the last one kept by either cut stay too
    (the sampler's thresholds keep ties; a sort would split them arbitrarily)."""
    out = torch.zeros(logits.shape, dtype=torch.float64)
    for r, p in enumerate(params):
        scaled = logits[r].double() / p.temperature
        if 0 < p.top_k < logits.shape[1]:
            kth = scaled.sort(descending=True).values[p.top_k - 1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
            probs = probs / probs.sum()
        if p.top_p < 1:
            ordered = probs.sort(descending=True).values
            n = int((torch.cumsum(ordered, 0) - ordered < p.top_p).sum())
            probs = probs.masked_fill(probs < ordered[n - 1], 0.0)
        out[r] = probs / probs.sum()
    return out


def _check_filtered(logits, params, rtol=1e-5, atol=1e-7):
    probs = Sampler._filtered_probs(logits, params).double()
    ref = _filtered_reference(logits.cpu(), params)
    probs = probs.cpu()
    assert torch.equal(probs > 0, ref > 0), "kept sets differ"
    torch.testing.assert_close(probs / probs.sum(-1, keepdim=True), ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("rows", [
    [dict(temperature=0.7)] * 3,  # nothing to cut
    [dict(top_k=5), dict(top_k=40, temperature=1.5), dict(top_k=1)],  # a top-k on every row
    [dict(top_k=5), dict(), dict(temperature=0.5)],  # top-k beside none
    [dict(top_p=0.9), dict(top_k=8, top_p=0.5), dict()],  # top-p, within a top-k, beside nothing
    [dict(top_p=0.01), dict(top_p=0.999999), dict(top_p=0.5, temperature=0.05), dict(top_p=0.95, temperature=20)],
    [dict(min_p=0.1), dict(min_p=0.5, top_k=10), dict(min_p=0.05, top_p=0.8, temperature=1.7), dict(min_p=1.0),
     dict(min_p=1e-9, temperature=0.3), dict()],  # min-p alone, within a top-k, before a top-p, at its ends
])
def test_filtered_distribution_matches_the_definition_on_every_path(rows):
    logits = torch.randn(len(rows), 300, generator=torch.Generator().manual_seed(3)) * 3
    _check_filtered(logits, [SamplingParams(**kw) for kw in rows])


@pytest.mark.parametrize("seed", range(6))
def test_top_p_floor_on_a_full_vocabulary_with_ties(seed):
    """163,840 tokens as Kimi-Linear has, logits rounded to bf16 as a bf16 model writes them (so many tokens
    tie), peaked and flat rows, top-p anywhere in (0, 1): the kept set is the definition's, ties kept."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(4, 163840, generator=g) * torch.tensor([[1.0], [4.0], [12.0], [0.01]])).bfloat16().float()
    top_ps = torch.rand(4, generator=g).clamp(min=1e-3).tolist()
    params = [SamplingParams(top_p=p, temperature=t) for p, t in zip(top_ps, (1.0, 0.8, 1.3, 1.0))]
    _check_filtered(logits, params, rtol=1e-4, atol=1e-9)


def test_top_p_floor_when_every_token_ties():
    """A flat row: every token is the boundary one, so all stay whatever top_p; one dominant token with a
    flat rest: it alone reaches 0.5, and with top_p just above its mass every token stays."""
    flat = torch.zeros(1, 1000)
    assert bool((Sampler._filtered_probs(flat, [SamplingParams(top_p=0.3)]) > 0).all())
    peaked = torch.zeros(1, 1000)
    peaked[0, 7] = 10.0
    p7 = float(torch.softmax(peaked[0].double(), 0)[7])
    kept = Sampler._filtered_probs(peaked, [SamplingParams(top_p=0.5)]) > 0
    assert kept[0].nonzero().flatten().tolist() == [7]
    assert bool((Sampler._filtered_probs(peaked, [SamplingParams(top_p=min(p7 + 1e-4, 0.999))]) > 0).all())


@pytest.mark.gpu
def test_top_p_on_cuda_matches_the_definition_and_repeats():
    """64 rows of 163,840 bf16-rounded logits on the GPU (top-p, top-k on every third row, min-p on every
    fourth): the kept sets are the float64 definition's, and a second call keeps exactly the same (the
    histograms' atomic adds are integer adds)."""
    g = torch.Generator().manual_seed(11)
    scale = torch.rand(64, 1, generator=g) * 10 + 0.05
    logits = (torch.randn(64, 163840, generator=g) * scale).bfloat16().float()
    top_ks = torch.randint(0, 3000, (64,), generator=g) * (torch.arange(64) % 3 == 0)  # a top-k on every third row
    min_ps = (torch.rand(64, generator=g) * 0.3) * (torch.arange(64) % 4 == 1)  # a min-p on every fourth row
    params = [SamplingParams(top_p=float(p), top_k=int(k), temperature=float(t), min_p=float(m)) for p, k, t, m in zip(
        torch.rand(64, generator=g).clamp(min=1e-3), top_ks, torch.rand(64, generator=g) + 0.5, min_ps)]
    on_gpu = logits.cuda()
    first = Sampler._filtered_probs(on_gpu, params)
    assert torch.equal(first, Sampler._filtered_probs(on_gpu, params))
    _check_filtered(on_gpu, params, rtol=1e-4, atol=1e-9)


def test_min_p_keeps_the_tokens_at_least_that_likely_relative_to_the_best():
    """probabilities 0.5, 0.3, 0.15, 0.05: min_p 0.25 keeps those >= 0.125 (the first three), renormalised;
    min_p 0.7 the first alone; at temperature 0 min_p changes nothing."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    freq = draw(sampler(), logits, SamplingParams(min_p=0.25), 3000)
    assert freq[3] == 0 and abs(freq[0] - 0.5 / 0.95) < 0.04 and freq[2] > 0
    assert draw(sampler(), logits, SamplingParams(min_p=0.7), 200)[0] == 1.0
    shuffled = logits[torch.tensor([2, 0, 3, 1])]
    assert sampler()(shuffled[None], [SamplingParams(temperature=0, min_p=0.9)], [None]).token_ids == [1]


@pytest.mark.parametrize("min_p", [0.02, 0.3, 0.9])
def test_min_p_keeps_what_transformers_keeps(min_p):
    """The kept set against transformers' MinPLogitsWarper (code nobody here wrote), at temperature 0.8."""
    from transformers.generation.logits_process import MinPLogitsWarper

    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(9)) * 2.5
    ours = Sampler._filtered_probs(logits, [SamplingParams(min_p=min_p, temperature=0.8)] * 8) > 0
    theirs = MinPLogitsWarper(min_p)(torch.zeros(8, 1, dtype=torch.long), logits / 0.8) > float("-inf")
    assert torch.equal(ours, theirs) and bool(ours.any(-1).all())
    assert min_p > 0.1 or int(ours.sum()) > 80  # a low min_p keeps many tokens per row


def test_banned_tokens_are_never_chosen():
    """banned (row, token) pairs lose even a +100 logit bias, greedy or sampled, in their own rows only."""
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=0, logit_bias={4: 100.0}), SamplingParams(logit_bias={4: 100.0}),
              SamplingParams(temperature=0, logit_bias={4: 100.0})]
    banned = ([0, 0, 1], [4, 9, 4])
    for seed in range(20):
        out = sampler(seed)(logits, params, [None] * 3, banned=banned)
        assert out.token_ids[0] not in (4, 9) and out.token_ids[1] != 4 and out.token_ids[2] == 4
    assert sampler()(logits, params, [None] * 3, banned=([], [])).token_ids[0] == 4


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=1.0, seed=42)] * 4

    def run(rows):  # a different engine generator each time: seeded rows must not use it
        gens = [torch.Generator().manual_seed(42) for _ in rows]
        return sampler(seed=len(rows))(logits[rows], [params[i] for i in rows], gens).token_ids

    assert [run([i])[0] for i in range(4)] == run([0, 1, 2, 3])


def test_unseeded_rows_share_one_draw_beside_seeded_rows():
    """Rows without a seed take their noise from one draw of the engine's generator; seeded rows beside them
    keep their own streams. Mixed batches: the seeded rows' tokens are those they get alone, and the unseeded
    rows follow the distribution (every row its own token: 32 rows x 250 steps)."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(34, 1)
    params = [SamplingParams(temperature=1.0, seed=7)] * 2 + [SamplingParams(temperature=1.0)] * 32
    s, counts, seeded = sampler(), torch.zeros(4), []
    alone = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)]
    gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)] + [None] * 32
    expected = []
    for _ in range(250):
        tokens = s(logits, params, gens).token_ids
        seeded.append(tokens[:2])
        expected.append([s(logits[:1], params[:1], [g]).token_ids[0] for g in alone])
        counts += torch.bincount(torch.tensor(tokens[2:]), minlength=4)
    assert seeded == expected
    assert torch.allclose(counts / counts.sum(), probs, atol=0.02), counts / counts.sum()


def test_logprobs_of_chosen_and_top_tokens():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0.8, logprobs=0),
              SamplingParams(temperature=0)]
    out = sampler()(logits, params, [None] * 3)
    ref = torch.log_softmax(logits.double(), -1)
    for i in (0, 1):
        assert math.isclose(out.logprobs[i], float(ref[i, out.token_ids[i]]), abs_tol=1e-5)
    top = ref[0].topk(3)
    assert list(out.top_logprobs[0]) == top.indices.tolist()
    assert all(math.isclose(v, float(t), abs_tol=1e-5) for v, t in zip(out.top_logprobs[0].values(), top.values))
    assert out.top_logprobs[1] == {} and out.logprobs[2] is None and out.top_logprobs[2] is None


@pytest.mark.parametrize("kwargs,error", [
    (dict(max_tokens=0), ValueError), (dict(max_tokens=1.5), TypeError), (dict(temperature=-1), ValueError),
    (dict(temperature=float("nan")), ValueError), (dict(top_p=0), ValueError), (dict(top_p=1.5), ValueError),
    (dict(top_k=-1), ValueError), (dict(seed="x"), TypeError), (dict(stop=[1]), TypeError),
    (dict(stop=[""]), ValueError), (dict(stop_token_ids=[-1]), ValueError), (dict(logprobs=21), ValueError),
    (dict(ignore_eos=1), TypeError), (dict(top_k=True), TypeError),
    (dict(min_p=-0.1), ValueError), (dict(min_p=1.01), ValueError), (dict(min_p=float("nan")), ValueError),
    (dict(min_p="0.1"), TypeError), (dict(min_tokens=-1), ValueError), (dict(min_tokens=17), ValueError),
    (dict(min_tokens=2.0), TypeError), (dict(min_tokens=1, structured_output=("json_object", "")), ValueError),
], ids=lambda x: str(x) if not isinstance(x, type) else x.__name__)
def test_sampling_params_reject_bad_values(kwargs, error):
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_stop():
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "b"], stop_token_ids=[3]).stop_token_ids == (3,)


def reference_penalties(logits, p, tokens, prompt_len):
    """Penalties row by row in float64, token by token: the rule as SamplingParams states it."""
    out = logits.double().clone()
    generated = tokens[prompt_len:]
    for t in set(tokens):
        if p.repetition_penalty != 1.0:
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(generated):
        out[t] -= p.frequency_penalty * generated.count(t) + p.presence_penalty
    return out


def test_penalties_match_the_rule_row_by_row():

    gen = torch.Generator().manual_seed(3)
    vocab = 40
    cases = [
        (SamplingParams(frequency_penalty=0.7), [1, 2, 3, 5, 5, 5, 9], 3),
        (SamplingParams(presence_penalty=-1.5), [4, 4, 7, 7, 7, 8], 2),
        (SamplingParams(repetition_penalty=1.8), [0, 10, 11, 12, 10], 3),
        (SamplingParams(repetition_penalty=0.5, frequency_penalty=2.0, presence_penalty=2.0), [6, 6, 1, 39, 1], 1),
        (SamplingParams(frequency_penalty=1.0), [2, 3], 2),  # nothing generated yet: no change
    ]
    logits = torch.randn(len(cases), vocab, generator=gen) * 3
    got = penalize(logits, [c[0] for c in cases], [(c[1], c[2]) for c in cases])
    for r, (p, tokens, prompt_len) in enumerate(cases):
        ref = reference_penalties(logits[r], p, tokens, prompt_len)
        assert torch.allclose(got[r].double(), ref, rtol=0, atol=1e-5), r
    assert torch.equal(got[4], logits[4])


def test_a_pending_token_counts_as_if_it_were_in_the_history():
    """Asynchronous scheduling: a row's last output token may still be on the device (histories[r] names its
    index in pending_tokens); the penalties are exactly those of the history with the token appended, for every
    kind, whether the token is new, already in the prompt or already generated."""
    gen = torch.Generator().manual_seed(4)
    vocab = 40
    params = [SamplingParams(presence_penalty=1.5), SamplingParams(frequency_penalty=0.7),
              SamplingParams(repetition_penalty=1.8), SamplingParams(repetition_penalty=0.5, frequency_penalty=2.0),
              SamplingParams(presence_penalty=1.0), SamplingParams(repetition_penalty=2.5)]
    histories = [([1, 2, 3, 5], 2), ([4, 4, 7], 1), ([0, 10, 11], 3), ([6, 6, 1], 1), ([2, 3, 9], 2), ([7, 8], 2)]
    last = [33, 5, 10, 6, 9, 25]  # new / generated / in the prompt only / generated twice / generated / new
    logits = torch.randn(len(params), vocab, generator=gen) * 3
    whole = penalize(logits, params, [(t + [x], n) for (t, n), x in zip(histories, last)])
    pending = torch.tensor([99, *reversed(last)])  # in another order, as a previous step's rows would be
    named = penalize(logits, params, [(t, n, len(last) - r) for r, (t, n) in enumerate(histories)], pending)
    assert torch.equal(named, whole)
    mixed = penalize(logits, params, [(t + [x], n) if r % 2 else (t, n, len(last) - r)
                                      for r, ((t, n), x) in enumerate(zip(histories, last))], pending)
    assert torch.equal(mixed, whole)


def test_penalties_steer_the_choice_but_not_the_logprobs():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0], [0.0, 5.0, 4.0, 1.0], [0.0, 5.0, 4.0, 1.0]])
    params = [SamplingParams(temperature=0, logprobs=1, frequency_penalty=2.0),  # 5 - 2*2 = 1 < 4: token 2
              SamplingParams(temperature=0, logprobs=1),  # no penalty: token 1
              SamplingParams(temperature=0, logprobs=1, repetition_penalty=2.0)]  # 5 / 2 = 2.5 < 4: token 2
    histories = [([3, 1, 1], 1), ([3, 1, 1], 1), ([1], 1)]
    out = sampler()(logits, params, [None] * 3, histories)
    assert out.token_ids == [2, 1, 2]
    raw = torch.log_softmax(logits[0], -1)
    assert out.logprobs[0] == pytest.approx(raw[2].item()) and out.logprobs[1] == pytest.approx(raw[1].item())
    with pytest.raises(ValueError, match="histories"):
        sampler()(logits, params, [None] * 3)


def test_sampled_rows_draw_from_the_penalized_distribution():
    logits = torch.tensor([2.0, 2.0, 2.0, 2.0])
    p = SamplingParams(temperature=1.0, presence_penalty=2.0)
    s = sampler(5)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[s(logits[None], [p], [None], [([0, 1], 0)]).token_ids[0]] += 1
    freq = counts / counts.sum()
    expected = torch.softmax(torch.tensor([0.0, 0.0, 2.0, 2.0]), -1)
    assert torch.allclose(freq, expected, atol=0.03)


def test_penalty_params_are_validated():
    for kwargs, error in [(dict(presence_penalty=2.5), ValueError), (dict(frequency_penalty=-3), ValueError),
                          (dict(repetition_penalty=0.0), ValueError),
                          (dict(repetition_penalty=float("nan")), ValueError),
                          (dict(presence_penalty="1"), TypeError)]:
        with pytest.raises(error):
            SamplingParams(**kwargs)


def test_logit_bias_is_added_after_the_penalties_and_not_to_the_logprobs():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0], [0.0, 5.0, 4.0, 1.0]])
    params = [SamplingParams(temperature=0, logprobs=0, logit_bias={1: -100, 3: 3.5}),  # 1 banned; 3 -> 4.5
              SamplingParams(temperature=0, logit_bias={2: 0.5}, frequency_penalty=1.0)]  # 5 - 1 = 4 < 4.5
    out = sampler()(logits, params, [None] * 2, [([], 0), ([9, 1], 1)])
    assert out.token_ids == [3, 2]
    assert out.logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[3].item())
    assert SamplingParams(logit_bias={4: 1, 2: -1}).logit_bias == ((2, -1.0), (4, 1.0))
    for bad, error in [({5: 100.5}, ValueError), ({-1: 1.0}, ValueError), ({"5": 1.0}, TypeError),
                       ({5: float("nan")}, ValueError)]:
        with pytest.raises(error):
            SamplingParams(logit_bias=bad)
