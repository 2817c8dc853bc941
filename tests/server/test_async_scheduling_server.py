"""The server over a real engine (the embedded default model, CPU) with asynchronous scheduling forced on: the
same answers as the synchronous engine gives (text, tokens, logprobs, usage, finish reasons), whole and
streamed, with stop strings, several choices and seeds; /metrics counts the same tokens."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from server_testing import parse_metrics, parse_sse

from kda_serving.engine import AsyncLLMEngine, EngineConfig
from kda_serving.server.app import create_app
from kda_serving.server.config import ServerConfig

BODIES = [
    {"prompt": "The state of a KDA layer", "max_tokens": 20, "temperature": 0, "logprobs": 2, "ignore_eos": True},
    {"prompt": "Gated delta rule", "max_tokens": 24, "temperature": 0, "stop": [" the", "e"]},
    {"prompt": "Chunked prefill", "max_tokens": 12, "temperature": 0.8, "seed": 3, "n": 2, "ignore_eos": True},
]


def answers(config: EngineConfig):
    """Per body: (the whole answer, the streamed events); then /metrics."""
    engine = AsyncLLMEngine(config)
    app = create_app(engine, ServerConfig())

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                results = []
                for body in BODIES:
                    body = {"model": "kda-serving-tiny", **body}
                    whole = (await client.post("/v1/completions", json=body)).json()
                    stream = await client.post("/v1/completions", json={**body, "stream": True})
                    results.append((whole, parse_sse(stream.text)[0]))
                return results, (await client.get("/metrics")).text

    return asyncio.run(main())


def test_async_scheduling_server_answers_as_the_synchronous_one():
    sync, sync_metrics = answers(EngineConfig(async_scheduling=False))
    deferred, metrics = answers(EngineConfig(async_scheduling=True))
    for (a, a_events), (b, b_events) in zip(sync, deferred):
        assert b["usage"] == a["usage"]
        for ca, cb in zip(a["choices"], b["choices"], strict=True):
            assert (cb["text"], cb["finish_reason"]) == (ca["text"], ca["finish_reason"])
            if ca["logprobs"]:
                assert cb["logprobs"]["tokens"] == ca["logprobs"]["tokens"]
                assert cb["logprobs"]["token_logprobs"] == pytest.approx(ca["logprobs"]["token_logprobs"], abs=1e-5)
        texts = lambda events, i: "".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == i)
        for i, choice in enumerate(a["choices"]):
            assert texts(a_events, i) == texts(b_events, i) == choice["text"]
    assert sync[1][0]["choices"][0]["finish_reason"] == "stop"  # the stop string was met
    names = ("kda_serving_engine_generation_tokens_total", "kda_serving_engine_prompt_tokens_total")
    assert [parse_metrics(metrics)[n] for n in names] == [parse_metrics(sync_metrics)[n] for n in names]
