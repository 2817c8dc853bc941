"""Helpers shared by the engine tests."""

import torch


def random_prompts(lengths, vocab, seed=0):
    """Token-id prompts avoiding ids 0-2 (pad, bos, eos)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
