"""Prompt-lookup drafts (engine/ngram.py) against a brute-force search, and the proposer's limits."""

from hypothesis import given, settings
from hypothesis import strategies as st

from kda_serving.engine.ngram import NgramIndex, PromptLookup
from kda_serving.engine.sampling_params import SamplingParams
from kda_serving.engine.sequence import Sequence


def brute_force(tokens, k, min_n, max_n):
    """The longest suffix of min_n..max_n tokens that occurred earlier; the k tokens after its latest
    earlier occurrence (fewer where the context ends)."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        for end in range(length - 1, n - 1, -1):
            if tokens[end - n : end] == suffix:
                return tokens[end : min(end + k, length)]
    return []


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(0, 3), min_size=0, max_size=60), grow=st.lists(st.integers(1, 5), max_size=8),
       k=st.integers(0, 6), bounds=st.tuples(st.integers(1, 4), st.integers(0, 3)))
def test_incremental_index_equals_brute_force(tokens, grow, k, bounds):
    min_n, max_n = bounds[0], bounds[0] + bounds[1]
    index = NgramIndex(min_n, max_n)
    # the index is fed a list that grows between calls, as a request's tokens do
    cuts = [len(tokens)]
    for g in grow:
        cuts.append(cuts[-1] + g)
    full = tokens + [(7 * i) % 4 for i in range(cuts[-1] - len(tokens))]
    for cut in cuts:
        assert index.propose(full[:cut], k) == brute_force(full[:cut], k, min_n, max_n), cut


def test_prompt_lookup_limits():
    lookup = PromptLookup(num_tokens=4, min_n=1, max_n=3, max_model_len=100)
    seq = Sequence("a", [1, 2, 3, 4, 1, 2], SamplingParams(max_tokens=10), 0)
    assert lookup.propose(seq) == [3, 4, 1, 2]
    seq.token_ids += [3] * 7  # 7 of 10 outputs: 2 more may follow the next one
    assert lookup.limit(seq) == 2
    seq.params = SamplingParams(max_tokens=50)
    assert lookup.limit(seq) == 4
    short = PromptLookup(num_tokens=4, min_n=1, max_n=3, max_model_len=len(seq.token_ids) + 2)
    assert short.limit(seq) == 1

    class FirstTokenOnly:  # a grammar that allows only the first of the drafts
        def validate_tokens(self, tokens):
            return min(1, len(tokens))

    seq.matcher = FirstTokenOnly()  # a grammar-constrained request: the drafts its grammar allows
    assert lookup.limit(seq) == 4 and len(lookup.propose(seq)) == 1


def test_failing_drafts_pause_a_request_and_it_tries_again():
    lookup = PromptLookup(num_tokens=3, min_n=1, max_n=2, max_model_len=1000)
    seq = Sequence("a", [1, 2, 3] * 10, SamplingParams(max_tokens=500), 0)
    assert lookup.propose(seq) == [1, 2, 3]
    pauses = []
    for _ in range(3):
        failures = 0
        while not seq.draft_record.pause:  # every draft wrong: paused once the evidence suffices
            lookup.record(seq, 3, 0)
            failures += 1
        assert failures == 5  # judged decays by 0.8 a step: 2.95 after four, 3.36 after five
        n = 0
        while not lookup.propose(seq):
            n += 1
        pauses.append(n)
    assert pauses == [8, 16, 32]  # doubling while it keeps failing
    for _ in range(4):
        lookup.record(seq, 3, 3)
    assert seq.draft_record.failures == 0 and lookup.propose(seq)  # drafts that hold: no pause


def test_good_drafts_never_pause():
    lookup = PromptLookup(num_tokens=4, min_n=1, max_n=2, max_model_len=1000)
    seq = Sequence("a", [5, 6] * 10, SamplingParams(max_tokens=500), 0)
    for _ in range(50):
        assert lookup.propose(seq)
        lookup.record(seq, 4, 2)  # 2 of 3 judged each time


def test_a_long_prompt_is_indexed_over_several_calls():
    from kda_serving.engine.ngram import INDEX_PER_CALL

    tokens = [(i * 7919) % 5000 for i in range(2 * INDEX_PER_CALL + 100)]  # a suffix that occurred only late
    tokens += tokens[INDEX_PER_CALL + 50 : INDEX_PER_CALL + 53]
    index = NgramIndex(2, 3)
    answers = [index.propose(tokens, 4) for _ in range(3)]
    assert answers[0] == []  # only the first INDEX_PER_CALL positions indexed yet
    assert answers[2] == brute_force(tokens, 4, 2, 3) == tokens[INDEX_PER_CALL + 53 : INDEX_PER_CALL + 57]


def test_prediction_drafts_follow_the_output_through_an_edit():
    from kda_serving.engine.ngram import PredictionIndex

    index = PredictionIndex(list(range(10, 30)), min_n=2, max_n=3)
    assert index.propose([], 3) == [10, 11, 12]  # nothing generated: the prediction's start
    assert index.propose([10, 11, 12], 4) == [13, 14, 15, 16]  # still the prediction
    assert index.propose([10, 11, 12, 13, 99, 98], 3) == []  # an edit: no n-gram of it in the prediction
    # the output rejoins the prediction (..., 16, 17): drafts resume after that point
    assert index.propose([10, 11, 12, 13, 99, 98, 16, 17], 3) == [18, 19, 20]
    repeated = PredictionIndex([1, 2, 3, 1, 2, 4, 1, 2, 5], min_n=2, max_n=2)
    assert repeated.propose([7, 1, 2], 1) == [3]  # the first occurrence
    assert repeated.propose([7, 1, 2, 3, 8, 1, 2], 1) == [3]  # at or after the last place found (end 2)
    assert repeated.propose([7, 1, 2, 3, 8, 4, 1, 2], 1) == [3]


def test_prompt_lookup_prefers_the_prediction_and_counts_its_drafts():
    lookup = PromptLookup(num_tokens=3, min_n=1, max_n=2, max_model_len=100)
    seq = Sequence("a", [1, 2, 3, 1, 2], SamplingParams(max_tokens=20, prediction=[40, 41, 42, 43]), 0)
    assert lookup.propose(seq) == [40, 41, 42] and seq.drafts_from_prediction
    lookup.record(seq, proposed=3, accepted=1)
    assert (seq.accepted_prediction_tokens, seq.rejected_prediction_tokens) == (1, 2)
    seq.token_ids += [40, 41]
    assert lookup.propose(seq) == [42, 43]
    seq.token_ids += [7, 1, 2]  # off the prediction, nothing of it to rejoin: the context's lookup instead
    assert lookup.propose(seq) == [40, 41, 7] and not seq.drafts_from_prediction
    lookup.record(seq, proposed=3, accepted=3)
    assert (seq.accepted_prediction_tokens, seq.rejected_prediction_tokens) == (1, 2)
