"""Structured outputs: a request's tokens constrained to a JSON schema, any JSON object, or a regular expression.

Each constrained request holds a grammar matcher (llguidance, which compiles the grammar against the tokenizer's
vocabulary). Every step the matcher gives the set of tokens that keep the output a prefix of the language; the
sampler chooses among them only, and the chosen token advances the matcher. When the grammar is complete the
request stops ("stop"). Reported logprobs stay the model's, before the mask, like penalties and biases.

llguidance is imported on first use: an engine that serves no constrained request never loads it.
"""

from __future__ import annotations

import torch


class StructuredDecoding:
    """One engine's grammar compiler: matchers for requests, and each step's token masks."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._ll_tokenizer = None

    def matcher(self, structured_output: tuple[str, str]):
        """A fresh matcher for one request. ValueError if the grammar does not compile or llguidance is missing."""
        try:
            import llguidance
            import llguidance.hf
        except ImportError:
            raise ValueError("structured outputs need the llguidance package (pip install llguidance)") from None
        if self._tokenizer is None:
            raise ValueError("structured outputs need a tokenizer; this engine has none")
        if self._ll_tokenizer is None:
            eos = self._eos[0] if len(self._eos) == 1 else (self._eos or None)
            self._ll_tokenizer = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self._vocab_size, eos_token=eos)
        kind, spec = structured_output
        if kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(spec)
        else:
            schema = spec if kind == "json_schema" else '{"type": "object"}'
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar)
        if matcher.is_error():
            raise ValueError(f"structured_output: the grammar does not compile: {matcher.get_error()}")
        return matcher

    def token_mask(self, requests: list, device: torch.device) -> torch.Tensor:
        """[rows, vocab] bool on device: the tokens each matcher allows next. requests: (matcher, drafts) pairs,
        each giving len(drafts) + 1 rows (speculative decoding): the mask now, then after each draft in turn.
        Past a draft the grammar refuses, rows are unconstrained: sampling stops accepting before it (the mask
        of the row before excludes it), so they are never kept. The matchers end where they began."""
        words = (self._vocab_size + 31) // 32
        bits = torch.zeros(sum(len(d) + 1 for _, d in requests), words, dtype=torch.int32)
        row = 0
        for m, drafts in requests:  # what llguidance.torch.fill_next_token_bitmask does, without its import
            valid = m.validate_tokens(drafts) if drafts else 0
            for j in range(len(drafts) + 1):
                if j <= valid:
                    m.unsafe_compute_mask_ptr(bits[row].data_ptr(), words * 4)
                    if j < valid:
                        m.consume_token(drafts[j])
                row += 1
            if valid:
                m.rollback(valid)
        bits = bits.to(device, non_blocking=True)  # pageable memory: staged before the call returns
        shifts = torch.arange(32, device=device, dtype=torch.int32)
        allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool()  # bit b of word w: token 32 w + b
        allowed = allowed.view(bits.shape[0], words * 32)[:, : self._vocab_size]
        # A row with nothing allowed (a matcher gone wrong, or past a refused draft) stays unconstrained rather
        # than sampling from an empty set; the engine ends a request whose matcher refuses the token it keeps.
        # No host sync: decided on the device.
        return allowed | ~allowed.any(dim=1, keepdim=True)
