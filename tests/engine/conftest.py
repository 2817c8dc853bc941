"""Engine test fixtures: a tiny random Kimi-Linear checkpoint made with transformers' own model, loaded by
both transformers (the reference) and kda_serving.model (what the engine runs)."""

import pytest

from model.kimi_testing import make_hf_model, save_hf_checkpoint  # tests/model/kimi_testing.py


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(transformers KimiLinearForCausalLM fp32, checkpoint directory): 3 KDA + 1 MLA layers, MoE, vocab 211."""
    hf, _ = make_hf_model(seed=7)
    path = save_hf_checkpoint(hf, str(tmp_path_factory.mktemp("tiny-kimi")))
    return hf, path


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from kda_serving.model import load_model

    return load_model(tiny_checkpoint[1], device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="session")
def hf_model(tiny_checkpoint):
    return tiny_checkpoint[0]
