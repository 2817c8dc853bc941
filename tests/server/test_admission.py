"""Backpressure (server/admission.py, --max-concurrent-requests) in-process on the stand-in engine: past the limit
a generation request gets a 429 in OpenAI's shape with Retry-After, without reaching the engine, and counted in
/metrics; every way an admitted request ends gives its slot back exactly once (plain, streamed, engine errors,
the client leaving before, during or instead of the stream, background responses done, failed, cancelled,
deleted or shut down); a malformed request is refused before it could take one.

A request is held in flight by the stand-in's gate (FakeEngine.gate), not by timing; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import openai
import pytest
from server_fake_engine import FakeEngine
from server_testing import assert_openai_error, call_and_disconnect, parse_metrics, parse_sse

from kda_serving.server.admission import Admission
from kda_serving.server.app import create_app
from kda_serving.server.config import ServerConfig

MODEL = FakeEngine.model_name
TIMEOUT = 10.0  # seconds any one wait may take; the whole test is bounded by a few of them

COMPLETION = ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 3})
CHAT = ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3})
RESPONSE = ("/v1/responses", {"model": MODEL, "input": "x", "max_output_tokens": 3})


async def until(condition, timeout: float = TIMEOUT) -> None:
    """Wait until `condition()` holds, failing after `timeout` seconds."""

    async def poll():
        while not condition():
            await asyncio.sleep(0.002)

    await asyncio.wait_for(poll(), timeout)


def serve(test, limit: int = 1, engine: FakeEngine | None = None):
    """Run `await test(http, client, engine, app)` against a started app with --max-concurrent-requests `limit`;
    the app's shutdown is part of the run."""
    engine = engine or FakeEngine()
    app = create_app(engine, ServerConfig(max_concurrent_requests=limit))

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=TIMEOUT) as http:
                client = openai.AsyncOpenAI(api_key="none", base_url="http://test/v1", http_client=http,
                                            max_retries=0)
                return await test(http, client, engine, app)

    return asyncio.run(asyncio.wait_for(main(), 6 * TIMEOUT))


def admitted(app) -> int:
    """The admitted count, as /metrics reports it (checked against the Admission object itself)."""
    server = app.state.server
    gauge = parse_metrics(server.metrics.render().decode())["kda_serving_admitted_requests"]
    assert gauge == server.admission.admitted
    return server.admission.admitted


async def post(http, path: str, body: dict, **extra) -> httpx.Response:
    return await asyncio.wait_for(http.post(path, json={**body, **extra}), TIMEOUT)


async def assert_admits_again(http, app) -> None:
    """Nothing is admitted, and a new request gets its slot and a full answer."""
    assert admitted(app) == 0
    r = await post(http, *COMPLETION)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "abc"
    assert admitted(app) == 0


def test_tickets_count_once_and_the_limit_refuses():
    admission = Admission(2)
    first, second = admission.try_acquire(), admission.try_acquire()
    assert first is not None and second is not None and admission.admitted == 2
    assert admission.try_acquire() is None and admission.admitted == 2
    first.release()
    first.release()  # a second release changes nothing
    assert admission.admitted == 1
    third = admission.try_acquire()
    assert third is not None and admission.admitted == 2
    second.release()
    third.release()
    assert admission.admitted == 0
    unlimited = Admission(0)
    tickets = [unlimited.try_acquire() for _ in range(100)]
    assert all(tickets) and unlimited.admitted == 100  # no limit, counted all the same


# The request that holds the only slot: each way a request can hold one.
HELD = {
    "completion": (*COMPLETION, {}),
    "chat stream": (*CHAT, {"stream": True}),
    "response": (*RESPONSE, {}),
    "response stream": (*RESPONSE, {"stream": True}),
    "background response": (*RESPONSE, {"background": True}),
}
# Refused while the slot is held: every endpoint, plain, streamed and in the background.
REFUSED = [(*COMPLETION, {}), (*COMPLETION, {"stream": True}), (*CHAT, {}), (*CHAT, {"stream": True}),
           (*RESPONSE, {}), (*RESPONSE, {"stream": True}), (*RESPONSE, {"background": True})]


@pytest.mark.parametrize("held", list(HELD))
def test_past_the_limit_a_request_gets_429_at_once_and_the_first_completes(held):
    path, body, extra = HELD[held]

    async def test(http, client, engine, app):
        engine.gate = asyncio.Event()
        first = asyncio.create_task(post(http, path, body, **extra))
        await until(lambda: engine.running)
        assert admitted(app) == 1
        for refused_path, refused_body, refused_extra in REFUSED:
            r = await post(http, refused_path, refused_body, **refused_extra)
            err = assert_openai_error(r, 429)
            assert err["type"] == "requests" and err["code"] == "rate_limit_exceeded", err
            assert "--max-concurrent-requests" in err["message"]
            assert r.headers["retry-after"] == "1"
        with pytest.raises(openai.RateLimitError):  # the official client's class for it
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert len(engine.seen_params) == 1  # none of them reached the engine
        m = parse_metrics((await http.get("/metrics")).text)
        assert m['kda_serving_http_errors_total{status="429"}'] == len(REFUSED) + 1
        assert m["kda_serving_admitted_requests"] == 1

        engine.gate.set()
        r = await asyncio.wait_for(first, TIMEOUT)
        assert r.status_code == 200, r.text
        if extra.get("stream"):
            events, _ = parse_sse(r.text)
            assert events[-1].get("type") in (None, "response.incomplete") and "error" not in events[-1]
        elif extra.get("background"):
            await until(lambda: admitted(app) == 0)
            done = await client.responses.retrieve(r.json()["id"])
            assert done.status == "incomplete" and done.output_text == "abc"
        else:
            assert "abc" in r.text
        await assert_admits_again(http, app)

    serve(test)


async def _gone_before_the_body(app, path: str, body: dict, how: str) -> None:
    """Drive the app by hand as a client that is gone before the stream's body starts: its `send` of the response
    start fails (a closed socket), or never returns while the client disconnects."""
    sent_body = False
    gone = asyncio.Event()

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        if how == "disconnects":
            return {"type": "http.disconnect"}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            if how == "send fails":
                raise OSError("connection reset")
            await asyncio.Event().wait()  # a client that reads nothing

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 5000),
             "server": ("127.0.0.1", 8000)}
    with contextlib.suppress(OSError):
        await asyncio.wait_for(app(scope, receive, send), TIMEOUT)
    gone.set()


async def _background(http, client, engine, app, end: str) -> None:
    if end == "fails":
        engine.fail_with = RuntimeError("engine broke")
    else:
        engine.gate = asyncio.Event()
    started = (await post(http, *RESPONSE, background=True)).json()
    assert started["status"] == "in_progress"
    if end == "fails":  # (it may have failed before its answer went out)
        await until(lambda: admitted(app) == 0)
        assert (await client.responses.retrieve(started["id"])).status == "failed"
        engine.fail_with = None
        return
    await until(lambda: engine.running)
    assert admitted(app) == 1
    if end == "done":
        engine.gate.set()
        await until(lambda: admitted(app) == 0)
        assert (await client.responses.retrieve(started["id"])).status == "incomplete"
    elif end == "cancelled":
        assert (await client.responses.cancel(started["id"])).status == "cancelled"
        assert admitted(app) == 0  # given back before the cancel answered
    elif end == "deleted":
        await client.responses.delete(started["id"])
        assert admitted(app) == 0
    engine.gate = None


async def _ends(http, client, engine, app, end: str) -> None:
    """Drive one admitted request to its end, `end` naming how."""
    if end in ("completion", "chat", "response"):
        path, body = {"completion": COMPLETION, "chat": CHAT, "response": RESPONSE}[end]
        assert (await post(http, path, body)).status_code == 200
    elif end in ("completion stream", "chat stream", "response stream"):
        path, body = {"completion stream": COMPLETION, "chat stream": CHAT, "response stream": RESPONSE}[end]
        r = await post(http, path, body, stream=True)
        events, _ = parse_sse(r.text)
        assert r.status_code == 200 and events and not any("error" in e or e.get("type") == "error" for e in events)
    elif end.startswith("engine "):  # "engine refuses|fails[ stream]"
        engine.fail_with = ValueError("params rejected") if "refuses" in end else RuntimeError("engine died")
        for path, body in (COMPLETION, RESPONSE):
            r = await post(http, path, body, stream=end.endswith("stream"))
            if end.endswith("stream"):
                assert r.status_code == 200 and "error" in r.text
            else:
                assert_openai_error(r, 400 if "refuses" in end else 500)
        engine.fail_with = None
    elif end.startswith("client leaves"):  # during a stream (after some chunks), or before a plain answer
        engine.token_delay = 0.005
        stream = end.endswith("mid-stream")
        aborted = len(engine.aborted)
        for path, body, after in ((COMPLETION[0], {**COMPLETION[1], "max_tokens": 200}, 3),
                                  (CHAT[0], {**CHAT[1], "max_tokens": 200}, 3),
                                  (RESPONSE[0], {**RESPONSE[1], "max_output_tokens": 200}, 6)):
            await call_and_disconnect(app, path, {**body, "stream": stream}, after if stream else 0)
            assert admitted(app) == 0
        assert len(engine.aborted) == aborted + 3  # each left long before its 200 tokens
        engine.token_delay = 0.001
    elif end.startswith("client gone before the body"):
        how = end.rsplit(": ", 1)[1]
        generated = len(engine.seen_params)
        for path, body in (COMPLETION, RESPONSE):
            await _gone_before_the_body(app, path, {**body, "stream": True}, how)
            assert admitted(app) == 0
        assert len(engine.seen_params) == generated  # neither stream's body ever started
    elif end.startswith("background "):
        await _background(http, client, engine, app, end.split(" ", 1)[1])
    else:
        raise AssertionError(end)


ENDS = ["completion", "chat", "response", "completion stream", "chat stream", "response stream",
        "engine refuses", "engine fails", "engine refuses stream", "engine fails stream",
        "client leaves before the answer", "client leaves mid-stream",
        "client gone before the body: send fails", "client gone before the body: disconnects",
        "background done", "background fails", "background cancelled", "background deleted"]


@pytest.mark.parametrize("end", ENDS)
def test_every_end_gives_the_slot_back(end):
    async def test(http, client, engine, app):
        await _ends(http, client, engine, app, end)
        await until(lambda: not engine.running and not engine.waiting)
        await assert_admits_again(http, app)
        await _ends(http, client, engine, app, end)  # the slot came back whole: the same end works again
        await assert_admits_again(http, app)

    serve(test)


def test_a_background_response_at_shutdown_gives_its_slot_back():
    box = {}

    async def test(http, client, engine, app):
        engine.gate = asyncio.Event()  # never opened: the shutdown cancels it
        started = (await post(http, *RESPONSE, background=True)).json()
        await until(lambda: engine.running)
        assert admitted(app) == 1
        box["id"], box["app"] = started["id"], app

    serve(test)
    server = box["app"].state.server
    assert server.admission.admitted == 0 and server.background == {}
    assert server.responses.get(box["id"]).body["status"] == "cancelled"


MALFORMED = [
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -5}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 300, "max_tokens": 1}, 400),  # past max_model_len
    ("/v1/completions", {"model": "other", "prompt": "x"}, 404),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 99}, 400),
    ("/v1/responses", {"model": MODEL, "input": "x", "previous_response_id": "resp_nope"}, 400),
    ("/v1/responses", {"model": MODEL, "input": "x", "background": True, "stream": True}, 400),
]


def test_a_malformed_request_never_takes_a_slot():
    """Validation comes first: with the only slot taken a malformed request still gets its 400 (not a 429),
    and with the slot free it leaves it free."""

    async def test(http, client, engine, app):
        engine.gate = asyncio.Event()
        held = asyncio.create_task(post(http, *COMPLETION))
        await until(lambda: engine.running)
        for path, body, status in MALFORMED:
            assert_openai_error(await post(http, path, body), status)
            assert admitted(app) == 1
        engine.gate.set()
        assert (await asyncio.wait_for(held, TIMEOUT)).status_code == 200
        for path, body, status in MALFORMED:
            assert_openai_error(await post(http, path, body), status)
            assert admitted(app) == 0
        m = parse_metrics((await http.get("/metrics")).text)
        assert 'kda_serving_http_errors_total{status="429"}' not in m
        assert len(engine.seen_params) == 1
        await assert_admits_again(http, app)

    serve(test)


def test_without_a_limit_every_request_is_admitted_and_counted():
    async def test(http, client, engine, app):
        engine.gate = asyncio.Event()
        held = [asyncio.create_task(post(http, *COMPLETION)) for _ in range(6)]
        await until(lambda: len(engine.running) + len(engine.waiting) == 6)
        assert admitted(app) == 6
        engine.gate.set()
        assert [r.status_code for r in await asyncio.wait_for(asyncio.gather(*held), TIMEOUT)] == [200] * 6
        assert admitted(app) == 0

    serve(test, limit=0, engine=FakeEngine(max_num_seqs=2))
