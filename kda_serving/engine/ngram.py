"""Draft tokens for speculative decoding by prompt lookup: the tokens that followed the last occurrence of the
sequence's current suffix; for a request with a prediction (SamplingParams.prediction, OpenAI's predicted
outputs), first the tokens of the prediction that follow where the output stands in it (PredictionIndex).

For n from `max_n` down to `min_n`, the last n tokens are looked up among the earlier n-grams of the request
(prompt and output); the first hit proposes the (up to) k tokens that followed it. Code edits, quoted
documents, structured data and the loops of small models repeat their context, and there a verified draft
gives several tokens for one step (docs/engine.md, "Speculative decoding").

The index is incremental: one dict per n, hash of the n-gram -> the position just after its latest
occurrence, extended by the tokens appended since the last call, at most INDEX_PER_CALL positions a call: a
long prompt is indexed over its first decode steps (a 128K-token prompt over 128) instead of stalling one step
for every request (about 0.1 s for 128K tokens), and until then drafts come from the part indexed so far.
A step costs O(max_n) per new token.
Keys are hashes, not tuples (a third of the memory; a collision only costs a rejected draft). Plain Python:
no torch.

A verifying step costs 1.2-1.7 decode steps (docs/engine.md), so drafts that keep failing make a request
slower than not drafting. PromptLookup therefore tracks each request's recent acceptance and lets a request
whose drafts were mostly wrong rest for a while (DraftRecord), re-trying after a pause that doubles while it
keeps failing.
"""

from __future__ import annotations


INDEX_PER_CALL = 1024  # positions indexed per propose() call: ~1 ms of Python


class NgramIndex:
    """The n-grams of one token list, min_n <= n <= max_n, for `propose`."""

    def __init__(self, min_n: int, max_n: int):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"NgramIndex: need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self._ends: dict[int, dict[int, int]] = {n: {} for n in range(min_n, max_n + 1)}
        # n-grams ending at positions < _indexed are in the index (an n-gram [i-n, i) "ends at" i)
        self._indexed = 0

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix of
        `tokens` (a list that only grows between calls); [] when no suffix of min_n tokens occurred before."""
        length = len(tokens)
        if k <= 0 or length <= self.min_n:
            return []
        # Index the n-grams that end before the suffix's end (positions up to length - 1), INDEX_PER_CALL at most.
        stop = min(length, max(self._indexed, self.min_n) + INDEX_PER_CALL)
        for end in range(max(self._indexed, self.min_n), stop):
            for n, table in self._ends.items():
                if end >= n:
                    table[hash(tuple(tokens[end - n : end]))] = end
        self._indexed = max(self._indexed, stop)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = self._ends[n].get(hash(tuple(tokens[length - n :])))
            if end is not None:
                return tokens[end : min(end + k, length)]
        return []


class PredictionIndex:
    """Where a request's output stands in its prediction, and what the prediction says comes next.

    While the output is a prefix of the prediction, the next prediction tokens. Once they part (an edit), the
    output's last n tokens (max_n down to min_n) are looked up among the prediction's n-grams, the first
    occurrence at or after the last place found preferred (an edit moves forward through the text), and the
    tokens after it proposed: the output rejoins the prediction after the edit."""

    def __init__(self, prediction: list[int], min_n: int, max_n: int):
        self.prediction = list(prediction)
        self.min_n, self.max_n = min_n, max_n
        self._ends: dict[int, dict[int, list[int]]] = {n: {} for n in range(min_n, max_n + 1)}
        for n, table in self._ends.items():
            for end in range(n, len(self.prediction) + 1):
                table.setdefault(hash(tuple(self.prediction[end - n : end])), []).append(end)
        self._cursor = 0  # the prediction position of the last proposal
        self._matched = 0  # leading output tokens known to equal the prediction's
        self._parted = False  # whether the output has left the prediction once

    def propose(self, output: list[int], k: int) -> list[int]:
        """Up to k prediction tokens to follow `output` (the request's output so far, a list that only grows
        between calls), or []."""
        at = len(output)
        if not self._parted:  # compare only the tokens output since the last call
            if output[self._matched : at] == self.prediction[self._matched : at]:
                self._matched = self._cursor = at
                return self.prediction[at : at + k]
            self._parted = True
        for n in range(min(self.max_n, at), self.min_n - 1, -1):
            ends = self._ends[n].get(hash(tuple(output[at - n :])))
            if ends:
                end = next((e for e in ends if e >= self._cursor), ends[0])
                self._cursor = end
                return self.prediction[end : end + k]
        return []


class DraftRecord:
    """One request's recent drafts: decayed counts of drafts accepted and of drafts judged (a rejection ends a
    run, so a step that accepts m of its k drafts judged m + 1 of them, or k if all held), and the pause."""

    DECAY = 0.8  # per verifying step: about the last five steps count
    MIN_JUDGED = 3.0  # evidence needed before pausing a request (5 steps whose first draft fails)
    MIN_RATE = 0.35  # break-even acceptance per draft, from the measured step costs (docs/engine.md)
    FIRST_PAUSE, MAX_PAUSE = 8, 512  # decode steps

    def __init__(self):
        self.accepted = self.judged = 0.0
        self.pause = 0  # decode steps left without drafts
        self.failures = 0  # pauses in a row

    def record(self, proposed: int, accepted: int) -> None:
        self.accepted = self.DECAY * self.accepted + accepted
        self.judged = self.DECAY * self.judged + (accepted + 1 if accepted < proposed else proposed)
        if self.judged >= self.MIN_JUDGED:
            if self.accepted < self.MIN_RATE * self.judged:
                self.pause = min(self.FIRST_PAUSE << self.failures, self.MAX_PAUSE)
                self.failures += 1
                self.accepted = self.judged = 0.0
            else:
                self.failures = 0


class PromptLookup:
    """The scheduler's draft proposer: up to `num_tokens` drafts per decode from each request's prediction if
    it has one (a PredictionIndex), else its own context (an NgramIndex), both kept on the Sequence, within what
    the request may still generate, unless the request's recent drafts mostly failed (DraftRecord)."""

    def __init__(self, num_tokens: int, min_n: int, max_n: int, max_model_len: int):
        self.num_tokens, self.min_n, self.max_n, self.max_model_len = num_tokens, min_n, max_n, max_model_len

    def limit(self, seq) -> int:
        """The most drafts seq can verify this step: every accepted one must still be a token it may output
        (max_tokens, max_model_len)."""
        room = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens) - 1
        return max(0, min(self.num_tokens, room))

    def propose(self, seq) -> list[int]:
        k = self.limit(seq)
        if k == 0:
            return []
        if seq.ngram is None:
            seq.ngram = NgramIndex(self.min_n, self.max_n)
            seq.draft_record = DraftRecord()
        if seq.draft_record.pause:
            seq.draft_record.pause -= 1
            return []
        drafts = []
        if seq.params.prediction:
            if seq.prediction_index is None:
                seq.prediction_index = PredictionIndex(seq.params.prediction, self.min_n, self.max_n)
            drafts = seq.prediction_index.propose(seq.output_token_ids, k)
        seq.drafts_from_prediction = bool(drafts)
        if not drafts:
            drafts = seq.ngram.propose(seq.token_ids, k)
        if drafts and seq.matcher is not None:  # a grammar-constrained request: only drafts its grammar allows
            drafts = drafts[: seq.matcher.validate_tokens(drafts)]
        return drafts

    def record(self, seq, proposed: int, accepted: int) -> None:
        """After a verifying step: `accepted` of the request's own `proposed` drafts held."""
        if proposed and seq.draft_record is not None:
            seq.draft_record.record(proposed, accepted)
        if proposed and seq.drafts_from_prediction:
            seq.accepted_prediction_tokens += accepted
            seq.rejected_prediction_tokens += proposed - accepted
