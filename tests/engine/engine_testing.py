"""Helpers shared by the engine tests."""

import torch


def random_prompts(lengths, vocab, seed=0):
    """Token-id prompts avoiding ids 0-2 (pad, bos, eos)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


class OracleDrafter:
    """A stand-in for the engine's draft proposer (engine/ngram.py PromptLookup) that knows what each request
    will output: drafts are the next tokens of `expected[request_id]` (or of `expected[tuple(prompt ids)]`,
    for requests named by a server), e.g. the request's output from a run without speculation, each replaced
    by a wrong one with probability p_wrong and the list cut short at random, so that every acceptance count
    (none, some, all) occurs. limit() is the real one."""

    def __init__(self, engine, expected: dict, p_wrong: float = 0.2, seed: int = 0):
        import random

        from kda_serving.engine.ngram import PromptLookup

        cfg = engine.config
        self._lookup = PromptLookup(cfg.num_speculative_tokens, cfg.prompt_lookup_min, cfg.prompt_lookup_max,
                                    cfg.max_model_len)
        self.num_tokens = cfg.num_speculative_tokens
        self.expected, self.p_wrong, self.rng = expected, p_wrong, random.Random(seed)
        self.vocab = engine.vocab_size
        engine.scheduler.drafter = self

    def limit(self, seq) -> int:
        return self._lookup.limit(seq)

    def propose(self, seq) -> list[int]:
        n = seq.num_output_tokens
        expected = self.expected.get(seq.request_id) or self.expected.get(tuple(seq.prompt_token_ids), [])
        drafts = list(expected[n : n + self.limit(seq)])
        drafts = [(t + 1) % self.vocab if self.rng.random() < self.p_wrong else t for t in drafts]
        return drafts[: self.rng.randint(0, len(drafts))] if self.rng.random() < 0.3 else drafts
