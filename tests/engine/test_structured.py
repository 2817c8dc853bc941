"""Structured outputs on the embedded default model (CPU): outputs constrained to a JSON schema, a regular
expression or any JSON object, whatever the random weights would rather say."""

import json
import re

import pytest

from kda_serving.engine import EngineConfig, LLMEngine, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["color", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(max_num_seqs=8, num_state_slots=16, num_kv_blocks=256))


def run(engine, requests: dict[str, SamplingParams]) -> dict:
    prompt = engine.tokenizer.encode("Answer in the requested format:")
    for request_id, params in requests.items():
        engine.add_request(request_id, prompt, params)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def test_json_schema_outputs_parse_and_follow_the_schema(engine):
    so = ("json_schema", json.dumps(SCHEMA))
    outs = run(engine, {f"s{seed}": SamplingParams(temperature=1.0, seed=seed, max_tokens=200, structured_output=so)
                        for seed in range(6)})
    for out in outs.values():
        assert out.finish_reason == "stop", out.text
        value = json.loads(out.text)
        assert set(value) == {"color", "n"} and value["color"] in ("red", "green", "blue")
        assert isinstance(value["n"], int) and 0 <= value["n"] <= 99


def test_regex_outputs_match_and_free_text_is_unchanged(engine):
    pattern = "(yes|no)-[0-9]{2}"
    outs = run(engine, {
        **{f"r{seed}": SamplingParams(temperature=1.0, seed=seed, max_tokens=20, structured_output=("regex", pattern))
           for seed in range(4)},
        "free": SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
    })
    for seed in range(4):
        assert outs[f"r{seed}"].finish_reason == "stop" and re.fullmatch(pattern, outs[f"r{seed}"].text)
    alone = run(engine, {"free-alone": SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)})
    assert outs["free"].output_token_ids == alone["free-alone"].output_token_ids  # its batch-mates' masks


def test_constrained_requests_verify_drafts_with_a_mask_per_position():
    # With speculation on, a grammar-constrained request verifies drafts too, each row masked by the grammar
    # after the drafts before it: both requests come out as without speculation.
    from engine_testing import OracleDrafter

    plain = LLMEngine(EngineConfig(max_num_seqs=8, num_state_slots=16, num_kv_blocks=256))
    free = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    so = SamplingParams(temperature=0.0, max_tokens=200, structured_output=("json_schema", json.dumps(SCHEMA)))
    expected = run(plain, {"free": free, "s": so})
    spec = LLMEngine(EngineConfig(max_num_seqs=8, num_state_slots=64, num_kv_blocks=256, num_speculative_tokens=3))
    # a fifth of the drafts wrong: some of them tokens the grammar refuses there
    OracleDrafter(spec, {k: v.output_token_ids for k, v in expected.items()}, p_wrong=0.2)
    outs = run(spec, {"free": free, "s": so})
    assert outs["free"].output_token_ids == expected["free"].output_token_ids
    assert outs["s"].output_token_ids == expected["s"].output_token_ids and json.loads(outs["s"].text)
    stats = spec.stats()
    assert stats.spec_draft_tokens_total > 15 and stats.spec_accepted_tokens_total > 0  # both requests drafted


def test_masks_along_drafts(engine):
    # Rows: the mask now, then after each draft; a draft the grammar refuses leaves the rows after it
    # unconstrained (never kept), and the matcher ends where it began.
    import torch

    tok = engine.tokenizer
    matcher = engine.structured.matcher(("regex", "(yes|no)-[0-9]{2}"))
    yes, dash, four = (tok.encode(t, add_special_tokens=False)[0] for t in ("y", "-", "4"))
    drafts = tok.encode("yes-4", add_special_tokens=False)
    rows = engine.structured.token_mask([(matcher, drafts), (matcher, [four, yes])], torch.device("cpu"))
    assert rows.shape == (len(drafts) + 1 + 3, engine.vocab_size)
    assert all(bool(rows[j, drafts[j]]) for j in range(len(drafts)))  # each draft allowed where it is fed
    assert bool(rows[len(drafts) - 2, dash]) and not bool(rows[0, dash])
    assert not bool(rows[len(drafts) + 1, four]) and rows[len(drafts) + 2].all() and rows[len(drafts) + 3].all()
    assert matcher.validate_tokens(drafts) == len(drafts)  # back at the start


def test_json_object_starts_an_object(engine):
    out = run(engine, {"o": SamplingParams(temperature=0.0, max_tokens=8, structured_output=("json_object", ""))})
    assert out["o"].text.lstrip().startswith("{")


def test_bad_grammars_are_refused_and_nothing_is_queued(engine):
    with pytest.raises(ValueError, match="grammar"):
        engine.add_request("bad", [1, 2], SamplingParams(structured_output=("json_schema", '{"type": 5}')))
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="not valid JSON"):
        SamplingParams(structured_output=("json_schema", "{nope"))
    with pytest.raises(ValueError, match="kind"):
        SamplingParams(structured_output=("xml", ""))
    with pytest.raises(TypeError, match="pair"):
        SamplingParams(structured_output="json")


def test_a_row_whose_mask_is_empty_stays_unconstrained():
    """A matcher that allows nothing (it never should) must not leave the sampler an empty set."""
    import ctypes

    import torch

    from kda_serving.engine.structured import StructuredDecoding

    class Allows:
        def __init__(self, tokens):
            self.tokens = tokens

        def unsafe_compute_mask_ptr(self, ptr, nbytes):
            words = torch.zeros(nbytes // 4, dtype=torch.int32)
            for t in self.tokens:
                words[t // 32] |= 1 << (t % 32)
            ctypes.memmove(ptr, words.data_ptr(), nbytes)

    mask = StructuredDecoding(None, 70, [1]).token_mask([(Allows([3, 64, 69]), []), (Allows([]), [])],
                                                        torch.device("cpu"))
    assert mask.shape == (2, 70)
    assert mask[0].nonzero().flatten().tolist() == [3, 64, 69]
    assert bool(mask[1].all())


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_structured_outputs_on_cuda_through_decode_graphs():
    """The same constraints on a CUDA engine whose decode steps replay graphs: the mask is applied to the
    logits the graph returns, on the device, and the outputs still parse, match and follow the schema."""
    engine = LLMEngine(EngineConfig(device="cuda", max_num_seqs=8, num_state_slots=16, num_kv_blocks=256))
    assert engine.runner.graphs is not None
    so = ("json_schema", json.dumps(SCHEMA))
    outs = run(engine, {
        **{f"s{seed}": SamplingParams(temperature=1.0, seed=seed, max_tokens=200, structured_output=so)
           for seed in range(4)},
        "r": SamplingParams(temperature=1.0, seed=9, max_tokens=20, structured_output=("regex", "(yes|no)-[0-9]{2}")),
        "free": SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
    })
    for seed in range(4):
        value = json.loads(outs[f"s{seed}"].text)
        assert outs[f"s{seed}"].finish_reason == "stop" and value["color"] in ("red", "green", "blue")
    assert re.fullmatch("(yes|no)-[0-9]{2}", outs["r"].text)
    assert len(outs["free"].output_token_ids) == 12
