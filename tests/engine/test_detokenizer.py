"""Incremental detokenization and stop strings with the embedded model's byte-level BPE tokenizer."""

import pytest

from kda_serving.engine.detokenizer import IncrementalDetokenizer

TEXT = "Hello world, héllo 世界! The end. Encore: 世界 again."


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from kda_serving.model import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def stream(tokenizer, ids, stop=()):
    detok = IncrementalDetokenizer(tokenizer, [tokenizer.encode("Prompt:")[-1]], tuple(stop))
    deltas, stopped = [], False
    for i, t in enumerate(ids):
        stopped = detok.append([t])
        deltas.append(detok.take_delta(finished=stopped or i == len(ids) - 1))
        if stopped:
            break
    return detok.text, deltas, stopped


def test_streamed_deltas_rebuild_the_full_decode(tokenizer):
    ids = tokenizer.encode(TEXT)
    text, deltas, stopped = stream(tokenizer, ids)
    assert not stopped and text == TEXT == "".join(deltas)
    assert all("\ufffd" not in d for d in deltas)  # split multi-byte characters wait for their last byte


def test_stop_string_cuts_text_and_is_never_streamed(tokenizer):
    ids = tokenizer.encode(TEXT)
    text, deltas, stopped = stream(tokenizer, ids, stop=["end. Enc", "xyz"])
    assert stopped and text == "Hello world, héllo 世界! The "
    assert "".join(deltas) == text
    text, deltas, stopped = stream(tokenizer, ids, stop=["世界", "!"])  # earliest match wins
    assert stopped and text == "Hello world, héllo " and "".join(deltas) == text


def test_without_tokenizer_text_stays_empty():
    detok = IncrementalDetokenizer(None, [1, 2], ())
    assert not detok.append([5]) and detok.take_delta(True) == ""


class _WindowOnly:
    """The embedded tokenizer without its Rust backend, so the detokenizer takes its window path."""

    def __init__(self, tokenizer):
        self.decode, self.encode = tokenizer.decode, tokenizer.encode


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_and_window_paths_give_the_same_text_and_deltas(tokenizer, seed):
    """The DecodeStream path (fast tokenizers) against the windowed decode, on random ids (byte pieces that
    split multi-byte characters, special tokens), with and without a stop string."""
    import random

    rng = random.Random(seed)
    pool = list(range(tokenizer.vocab_size)) + tokenizer.all_special_ids
    ids = [rng.choice(pool) for _ in range(400)] + tokenizer.encode(TEXT)
    assert IncrementalDetokenizer(tokenizer, [5], ())._stream is not None
    assert IncrementalDetokenizer(_WindowOnly(tokenizer), [5], ())._stream is None
    for stop in ((), ("世界",)):
        fast = stream(tokenizer, ids, stop)
        window = stream(_WindowOnly(tokenizer), ids, stop)
        assert fast == window and fast[0]
