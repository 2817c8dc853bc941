"""kda-serve-batch (server/batch.py): OpenAI Batch API files answered through the server's own endpoints.

On the stand-in engine: every kind of line (answered requests on each endpoint, a request the endpoint refuses,
lines that are no request: bad JSON, no custom_id, a repeated one, another method or url, a body that is no
object, stream: true), outputs in the input's order in the Batch API's output format, the counts, and a window
smaller than the batch. Then the real command on the embedded default model: its answers equal the same requests
sent to kda-serve's app one at a time (greedy), and bad arguments exit 2 before the model loads.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from server_fake_engine import FakeEngine

from kda_serving.server import batch
from kda_serving.server.app import create_app
from kda_serving.server.config import ServerConfig

MODEL = FakeEngine.model_name


def _line(custom_id, url="/v1/chat/completions", body=None, method="POST") -> str:
    body = body if body is not None else {"model": MODEL, "messages": [{"role": "user", "content": custom_id}],
                                          "max_tokens": 3}
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def _run(lines: list[str], max_concurrency: int = 8) -> tuple[list[dict], dict]:
    app = create_app(FakeEngine(), ServerConfig())
    out: list[dict] = []
    counts = asyncio.run(asyncio.wait_for(batch.run_batch(app, lines, out.append, max_concurrency), 30))
    return out, counts


@pytest.mark.parametrize("max_concurrency", [1, 3, 64])
def test_batch_answers_every_line_in_order(max_concurrency):
    lines = [
        _line("chat"),
        _line("completion", "/v1/completions", {"model": MODEL, "prompt": "abc", "max_tokens": 2}),
        _line("response", "/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 4}),
        _line("refused", "/v1/completions", {"model": MODEL, "prompt": "abc", "max_tokens": -1}),
        "{not json",
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}),
        _line("chat"),  # repeated custom_id
        _line("get", method="GET"),
        _line("embeddings", "/v1/embeddings"),
        json.dumps({"custom_id": "nobody", "method": "POST", "url": "/v1/completions", "body": [1]}),
        _line("streamed", body={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}),
        "",  # blank: skipped
        _line("last", "/v1/completions", {"model": MODEL, "prompt": "z", "max_tokens": 1}),
    ]
    out, counts = _run(lines, max_concurrency)
    assert [o["custom_id"] for o in out] == ["chat", "completion", "response", "refused", None, None, "chat",
                                             "get", "embeddings", "nobody", "streamed", "last"]
    assert counts == {"requests": 12, "succeeded": 4, "failed": 8}
    assert len({o["id"] for o in out}) == 12 and all(o["id"].startswith("batch_req_") for o in out)
    for o, obj in zip([out[0], out[1], out[2], out[11]], ["chat.completion", "text_completion", "response",
                                                          "text_completion"]):
        assert o["error"] is None and o["response"]["status_code"] == 200
        assert o["response"]["request_id"].startswith("req_") and o["response"]["body"]["object"] == obj
    assert out[0]["response"]["body"]["usage"]["completion_tokens"] == 3
    refused = out[3]["response"]
    assert refused["status_code"] == 400 and refused["body"]["error"]["param"] == "max_tokens"
    expected_errors = ["invalid_json", "missing_custom_id", "duplicate_custom_id", "invalid_method", "invalid_url",
                       "invalid_body", "invalid_body"]
    for o, code in zip(out[4:11], expected_errors):
        assert o["response"] is None and o["error"]["code"] == code and o["error"]["message"]


def test_batch_keeps_the_engine_busy_up_to_the_window():
    """With a window of 4 the stand-in engine never holds more than 4 requests, and all 20 are answered."""
    engine = FakeEngine(max_num_seqs=64, token_delay=0.002)
    app = create_app(engine, ServerConfig())
    seen_at_once = []
    lines = [_line(f"q{i}") for i in range(20)]

    def write(out):
        seen_at_once.append(len(engine.running) + len(engine.waiting))

    counts = asyncio.run(asyncio.wait_for(batch.run_batch(app, lines, write, 4), 30))
    assert counts == {"requests": 20, "succeeded": 20, "failed": 0}
    assert max(seen_at_once) <= 4


def test_batch_command_matches_the_server(tmp_path, capsys):
    """The real command on the embedded default model (CPU): each answer's text and usage equal the same request
    sent to kda-serve's app alone, greedy."""
    from kda_serving.engine import AsyncLLMEngine, EngineConfig

    bodies = [
        ("/v1/chat/completions", {"model": "kda-serving-tiny", "temperature": 0, "max_tokens": 6,
                                  "messages": [{"role": "user", "content": "What is a delta rule?"}]}),
        ("/v1/completions", {"model": "kda-serving-tiny", "temperature": 0, "max_tokens": 6,
                             "prompt": "The state of a KDA layer"}),
        ("/v1/completions", {"model": "kda-serving-tiny", "temperature": 0, "max_tokens": 4, "prompt": "Hello"}),
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": url, "body": body}) + "\n"
                                for i, (url, body) in enumerate(bodies)))
    results = tmp_path / "results.jsonl"
    assert batch.main(["-i", str(requests), "-o", str(results), "--max-concurrency", "2"]) == 0
    assert "3 requests, 3 succeeded, 0 failed" in capsys.readouterr().err
    got = [json.loads(line) for line in results.read_text().splitlines()]

    app = create_app(AsyncLLMEngine(EngineConfig()), ServerConfig())

    async def alone():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                return [(await client.post(url, json=body)).json() for url, body in bodies]

    expected = asyncio.run(alone())
    for out, want in zip(got, expected):
        body = out["response"]["body"]
        assert out["response"]["status_code"] == 200
        text = lambda b: b["choices"][0].get("text", b["choices"][0].get("message", {}).get("content"))  # noqa: E731
        assert text(body) == text(want) and body["usage"] == want["usage"]


@pytest.mark.parametrize("argv,message", [
    (["-o", "x.jsonl"], "--input-file"),
    (["-i", "/nonexistent/requests.jsonl", "-o", "x.jsonl"], "cannot read --input-file"),
    (["-i", "-", "-o", "-", "--max-concurrency", "0"], "--max-concurrency"),
    (["-i", "-", "-o", "-", "--max-num-seqs", "0"], "max_num_seqs"),
])
def test_batch_command_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        batch.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
