"""The embedded default model: reproducible files, a working chat tokenizer, weights transformers agrees with."""

from __future__ import annotations

import json
import os

import pytest
import torch
from kimi_testing import Sequence, hf_logits, logit_error, run_step

from kda_serving.model import default_model_path, load_model
from kda_serving.model import default_model as dm


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory):
    """default_model_path() with the cache pointed at a fresh directory (so first-use generation runs)."""
    cache = str(tmp_path_factory.mktemp("cache"))
    old = os.environ.get("KDA_SERVING_CACHE")
    os.environ["KDA_SERVING_CACHE"] = cache
    try:
        path = default_model_path()
        assert path.startswith(cache) and default_model_path() == path  # second call: cached
        yield path
    finally:
        if old is None:
            del os.environ["KDA_SERVING_CACHE"]
        else:
            os.environ["KDA_SERVING_CACHE"] = old


def test_generator_reproduces_committed_files(tmp_path, default_dir):
    """`python -m kda_serving.model.default_model --out DIR` recreates the committed tokenizer and config
    byte for byte (tokenizer retrained from corpus.txt), and the weights of the cached model exactly."""
    dm.main(["--out", str(tmp_path)])
    for name in (*dm.TOKENIZER_FILES, *dm.CONFIG_FILES):
        with open(tmp_path / name, "rb") as a, open(os.path.join(dm.PACKAGE_DIR, name), "rb") as b:
            assert a.read() == b.read(), f"{name} differs from the committed file"
    with open(tmp_path / dm.WEIGHTS, "rb") as a, open(os.path.join(default_dir, dm.WEIGHTS), "rb") as b:
        assert a.read() == b.read()


def test_tokenizer_and_chat_template(default_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_dir)
    with open(os.path.join(default_dir, "config.json")) as f:
        config = json.load(f)
    assert len(tok) == config["vocab_size"]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == config["eos_token_id"]
    text = "Hello! How are you today? def add(a, b): return a + b"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text) / 2  # a real BPE, not bytes
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there."}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there.<|im_end|>\n" \
                     "<|im_start|>assistant\n"
    ids = tok(prompt)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert ids.count(tok.eos_token_id) == 2


def test_default_model_shape(default_dir):
    model = load_model(None, progress=False)
    cfg = model.config
    assert cfg.layer_types == ("kda", "kda", "kda", "mla") and cfg.mlp_types == ("dense", "moe", "moe", "moe")
    assert cfg.linear_head_dim == 128 and cfg.max_model_len == 4096 and cfg.num_experts == 8
    assert model.path == default_dir
    size = os.path.getsize(os.path.join(default_dir, dm.WEIGHTS))
    assert 1e6 < size < 16e6


def test_default_model_matches_transformers(default_dir):
    from transformers import KimiLinearForCausalLM

    hf = KimiLinearForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()
    model = load_model(default_dir, progress=False)
    caches = model.allocate_caches(4, 16, 16)
    tokens = torch.randint(0, model.config.vocab_size, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    seq = Sequence(tokens, slot=2, blocks=[3, 9, 0, 5, 1])
    run_step(model, caches, [(seq, 66)], 16)
    for _ in range(4):
        run_step(model, caches, [(seq, 1)], 16)
    max_rel, fro = logit_error(torch.cat(seq.logits), hf_logits(hf, tokens))
    assert max_rel < 1e-4, f"{max_rel:.2e} ({fro:.2e})"
