"""Draft tokens for speculative decoding by prompt lookup: the tokens that followed the last occurrence of the
sequence's current suffix.

For n from `max_n` down to `min_n`, the last n tokens are looked up among the earlier n-grams of the request
(prompt and output); the first hit proposes the (up to) k tokens that followed it. Code edits, quoted
documents, structured data and the loops of small models repeat their context, and there a verified draft
gives several tokens for one step (docs/engine.md, "Speculative decoding").

The index is incremental: one dict per n, n-gram -> the position just after its latest occurrence, extended
by the tokens appended since the last call. A step costs O(max_n) per new token; a prompt is indexed once,
on the request's first proposal. Plain Python: no torch.
"""

from __future__ import annotations


class NgramIndex:
    """The n-grams of one token list, min_n <= n <= max_n, for `propose`."""

    def __init__(self, min_n: int, max_n: int):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"NgramIndex: need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self._ends: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}
        # n-grams ending at positions < _indexed are in the index (an n-gram [i-n, i) "ends at" i)
        self._indexed = 0

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix of
        `tokens` (a list that only grows between calls); [] when no suffix of min_n tokens occurred before."""
        length = len(tokens)
        if k <= 0 or length <= self.min_n:
            return []
        # Index every n-gram that ends before the suffix's end: positions up to length - 1.
        for end in range(max(self._indexed, self.min_n), length):
            for n, table in self._ends.items():
                if end >= n:
                    table[tuple(tokens[end - n : end])] = end
        self._indexed = max(self._indexed, length)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = self._ends[n].get(tuple(tokens[length - n :]))
            if end is not None:
                return tokens[end : min(end + k, length)]
        return []


class PromptLookup:
    """The scheduler's draft proposer: up to `num_tokens` drafts per decode from each request's own context
    (an NgramIndex kept on the Sequence), within what the request may still generate."""

    def __init__(self, num_tokens: int, min_n: int, max_n: int, max_model_len: int):
        self.num_tokens, self.min_n, self.max_n, self.max_model_len = num_tokens, min_n, max_n, max_model_len

    def limit(self, seq) -> int:
        """The most drafts seq can verify this step: every accepted one must still be a token it may output
        (max_tokens, max_model_len). A grammar-constrained request takes none: each draft position would need
        its own token mask."""
        if seq.matcher is not None:
            return 0
        room = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens) - 1
        return max(0, min(self.num_tokens, room))

    def propose(self, seq) -> list[int]:
        k = self.limit(seq)
        if k == 0:
            return []
        if seq.ngram is None:
            seq.ngram = NgramIndex(self.min_n, self.max_n)
        return seq.ngram.propose(seq.token_ids, k)
