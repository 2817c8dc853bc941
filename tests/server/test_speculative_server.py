"""The server over a real engine (the embedded default model, CPU) with speculative decoding on: updates that
carry several tokens each come out, streamed or not, as without speculation (the same text, tokens and usage;
log-probabilities to float rounding: a verifying step's matrix shapes differ from a decode's), and /metrics
counts the drafts."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx
import pytest
from server_testing import parse_metrics, parse_sse

from kda_serving.engine import LLM, AsyncLLMEngine, EngineConfig, SamplingParams
from kda_serving.server.app import create_app
from kda_serving.server.config import ServerConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from engine_testing import OracleDrafter  # noqa: E402

PROMPT = "The state of a KDA layer"


def answers(config: EngineConfig, expected=None) -> tuple[dict, dict, str]:
    """(completion with logprobs, the same streamed, /metrics) from a server over an engine of `config`."""
    engine = AsyncLLMEngine(config)
    app = create_app(engine, ServerConfig())
    body = {"model": "kda-serving-tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "logprobs": 2,
            "ignore_eos": True}

    async def main():
        async with app.router.lifespan_context(app):
            if expected is not None:
                OracleDrafter(engine.engine, expected, p_wrong=0.2)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                whole = (await client.post("/v1/completions", json=body)).json()
                stream = await client.post("/v1/completions", json={**body, "stream": True})
                metrics = (await client.get("/metrics")).text
                return whole, parse_sse(stream.text)[0], metrics

    return asyncio.run(main())


def test_speculating_server_answers_as_without_speculation():
    llm = LLM()
    ids = llm.engine.tokenizer.encode(PROMPT)
    plain_ids = llm.generate([ids], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].output_token_ids
    plain, plain_events, _ = answers(EngineConfig())
    spec, spec_events, metrics = answers(EngineConfig(num_speculative_tokens=4), {tuple(ids): plain_ids})
    assert spec["usage"] == plain["usage"]
    [a], [b] = plain["choices"], spec["choices"]
    assert (b["text"], b["finish_reason"], b["logprobs"]["tokens"]) == (a["text"], a["finish_reason"],
                                                                         a["logprobs"]["tokens"])
    assert b["logprobs"]["token_logprobs"] == pytest.approx(a["logprobs"]["token_logprobs"], abs=1e-4)
    for events in (plain_events, spec_events):
        assert "".join(e["choices"][0]["text"] for e in events) == plain["choices"][0]["text"]
        tokens = [t for e in events for t in e["choices"][0]["logprobs"]["tokens"]]
        assert tokens == plain["choices"][0]["logprobs"]["tokens"]
    assert len(spec_events) < len(plain_events)  # updates of several tokens
    values = parse_metrics(metrics)
    assert values["kda_serving_engine_spec_accepted_tokens_total"] > 0
    assert values["kda_serving_engine_spec_draft_tokens_total"] >= values["kda_serving_engine_spec_accepted_tokens_total"]
    rate = values["kda_serving_engine_spec_accepted_tokens_total"] / values["kda_serving_engine_spec_draft_tokens_total"]
    assert values["kda_serving_engine_spec_acceptance_rate"] == pytest.approx(rate)
