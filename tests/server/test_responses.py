"""POST /v1/responses (server/responses.py) in-process on the stand-in engine: the official `openai` client's
Responses calls (plain and streamed) read our answers, the body and the event stream hold OpenAI's shape, the
prompt is the chat template over instructions and input (function calls and their outputs included), function
tools come back as function_call items (forced, and in the model's own format), stored responses continue
conversations (previous_response_id), are retrieved and deleted, and what is not supported is a 400 naming
it. A client that leaves is tested with the other endpoints' (test_app.py). tests/server/test_server_process.py
repeats a call against the real `kda-serve` process."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from server_fake_engine import KIMI_REPLY, FakeEngine
from server_testing import assert_openai_error, parse_metrics

from kda_serving.server.app import create_app
from kda_serving.server.config import ServerConfig

MODEL = FakeEngine.model_name


def serve(test, engine: FakeEngine | None = None, config: ServerConfig | None = None):
    """Run `await test(http_client, openai_client, engine)` against a started app."""
    engine = engine or FakeEngine()
    app = create_app(engine, config or ServerConfig())

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                client = openai.AsyncOpenAI(api_key="none", base_url="http://test/v1", http_client=http)
                return await test(http, client, engine)

    return asyncio.run(main())


def test_official_client_reads_a_response():
    async def test(http, client, engine):
        resp = await client.responses.create(model=MODEL, input="Hi there", instructions="Be brief.",
                                             max_output_tokens=5, temperature=0, metadata={"k": "v"})
        assert resp.output_text == "abcde" and resp.status == "incomplete"
        assert resp.incomplete_details.reason == "max_output_tokens"
        assert resp.id.startswith("resp_") and resp.object == "response" and resp.model == MODEL
        message = resp.output[0]
        assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
        prompt = engine.tokenizer.decode(engine.seen_prompts[-1][: -5])
        assert prompt == "<|system|>Be brief.<|end|><|user|>Hi there<|end|><|assistant|>"
        assert resp.usage.input_tokens == len(engine.seen_prompts[-1]) - 5 and resp.usage.output_tokens == 5
        assert resp.usage.total_tokens == resp.usage.input_tokens + 5 and resp.metadata == {"k": "v"}
        assert engine.seen_params[-1].temperature == 0 and engine.seen_params[-1].max_tokens == 5

        engine.script = engine.tokenizer.encode("done", add_special_tokens=False)
        again = await client.responses.create(model=MODEL, input=[
            {"role": "user", "content": "Hi there"},
            {"type": "message", "id": message.id, "status": message.status, "role": "assistant",
             "content": [{"type": "output_text", "text": resp.output_text, "annotations": []}]},
            {"role": "user", "content": [{"type": "input_text", "text": "More"}]}])
        assert again.output_text == "done" and again.status == "completed" and again.incomplete_details is None
        assert engine.tokenizer.decode(engine.seen_prompts[-1][:-4]) == (
            "<|user|>Hi there<|end|><|assistant|>abcde<|end|><|user|>More<|end|><|assistant|>")

    serve(test)


def test_streamed_events_in_order():
    async def test(http, client, engine):
        stream = await client.responses.create(model=MODEL, input="Hi", max_output_tokens=4, stream=True)
        events = [event async for event in stream]
        kinds = [e.type for e in events]
        assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"] + ["response.output_text.delta"] * 4 + [
                         "response.output_text.done", "response.content_part.done", "response.output_item.done",
                         "response.incomplete"]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "abcd"
        assert events[0].response.status == "in_progress" and events[0].response.output == []
        final = events[-1].response
        assert final.output_text == "abcd" and final.usage.output_tokens == 4
        assert events[-4].text == "abcd" and events[-2].item.content[0].text == "abcd"
        ids = {e.item_id for e in events if hasattr(e, "item_id")}
        assert ids == {final.output[0].id}
        metrics = parse_metrics((await http.get("/metrics")).text)
        assert metrics['kda_serving_requests_total{endpoint="responses",finish_reason="length"}'] == 1

    serve(test)


def test_structured_output_and_echoed_settings():
    async def test(http, client, engine):
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
        r = await http.post("/v1/responses", json={
            "model": MODEL, "input": "x", "max_output_tokens": 3, "top_p": 0.5, "store": False,
            "text": {"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}}})
        body = r.json()
        assert r.status_code == 200, body
        assert engine.seen_params[-1].structured_output == ("json_schema", json.dumps(schema))
        assert body["text"] == {"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}}
        assert body["top_p"] == 0.5 and body["store"] is False and body["tools"] == []
        r = await http.post("/v1/responses", json={"model": MODEL, "input": "x", "max_output_tokens": 2,
                                                   "text": {"format": {"type": "json_object"}}})
        assert engine.seen_params[-1].structured_output == ("json_object", "")

    serve(test)


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "store": 3}, "store"),
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "tools": [{"type": "function", "name": "f"}]}, "tool_choice"),  # auto: no parser here
    ({"input": "x", "tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function",
                                                                                 "name": "g"}}, "tool_choice"),
    ({"input": []}, "input"),
    ({"input": ""}, "input"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "reasoning": {"effort": "low"}}, "reasoning"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input"),
    ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text"),
    ({"input": "x" * 400}, "input"),
    ({"input": "x" * 200, "max_output_tokens": 100}, "max_output_tokens"),
], ids=["store", "previous", "tools", "auto-no-parser", "unknown-tool", "empty-list", "empty-text", "max-output",
        "reasoning", "role", "schema", "too-long", "over-the-context"])
def test_refused_requests_name_the_parameter(body, param):
    async def test(http, client, engine):
        r = await http.post("/v1/responses", json={"model": MODEL, **body})
        assert_openai_error(r, 400)
        assert param in r.json()["error"]["message"] or r.json()["error"]["param"] == param
        r = await http.post("/v1/responses", json={"model": "other", "input": "x"})
        assert_openai_error(r, 404)
        assert engine.seen_prompts == [] and engine.running == set()

    serve(test)


WEATHER = {"type": "function", "name": "weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


async def _forced_weather_call(client, engine, stream: bool):
    """A forced call of WEATHER for Paris, plain or streamed: (the response, its events or None)."""
    engine.script = engine.tokenizer.encode('{"city": "Paris"}', add_special_tokens=False)
    kwargs = dict(model=MODEL, input="Weather in Paris?", tools=[WEATHER],
                  tool_choice={"type": "function", "name": "weather"})
    if stream:
        events = [e async for e in await client.responses.create(stream=True, **kwargs)]
        return events[-1].response, events
    return await client.responses.create(**kwargs), None


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_forced_function_call_comes_back_as_a_function_call_item(stream):
    async def test(http, client, engine):
        resp, events = await _forced_weather_call(client, engine, stream)
        if stream:
            kinds = [e.type for e in events]
            assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                             "response.function_call_arguments.delta", "response.function_call_arguments.done",
                             "response.output_item.done", "response.completed"]
            assert events[4].arguments == '{"city": "Paris"}' and events[5].item.id == resp.output[0].id
        [call] = resp.output
        assert call.type == "function_call" and call.name == "weather" and call.arguments == '{"city": "Paris"}'
        assert call.call_id.startswith("call_") and resp.status == "completed" and resp.output_text == ""
        params = engine.seen_params[-1]
        assert params.structured_output[0] == "json_schema"  # the arguments' schema forced the output
        assert '"city"' in params.structured_output[1]

        # the call and its output go back in the history: an assistant turn with the call, then a tool turn
        engine.script = engine.tokenizer.encode("Sunny.", add_special_tokens=False)
        follow = await client.responses.create(model=MODEL, tools=[WEATHER], tool_choice="none", input=[
            {"role": "user", "content": "Weather in Paris?"}, call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "22C, sunny"}])
        assert follow.output_text == "Sunny." and follow.output[0].type == "message"
        prompt = engine.tokenizer.decode(engine.seen_prompts[-1])
        assert "<|tool|>22C, sunny<|end|>" in prompt and prompt.index("Weather in Paris?") < prompt.index("22C")

    serve(test)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_auto_tools_read_the_models_own_call_format(stream):
    async def test(http, client, engine):
        engine.script = engine.tokenizer.encode(KIMI_REPLY, add_special_tokens=False)
        kwargs = dict(model=MODEL, input="Search kda", tools=[{"type": "function", "name": "search"}])
        if stream:
            events = [e async for e in await client.responses.create(stream=True, **kwargs)]
            assert [e.type for e in events].count("response.output_item.done") == 2
            assert [e.sequence_number for e in events] == list(range(len(events)))
            resp = events[-1].response
        else:
            resp = await client.responses.create(**kwargs)
        message, call = resp.output
        assert message.type == "message" and resp.output_text == "Checking."
        assert (call.type, call.call_id, call.name, call.arguments) == (
            "function_call", "functions.search:0", "search", '{"q": "kda"}')
        assert resp.tool_choice == "auto" and resp.tools[0].name == "search"

    serve(test, FakeEngine(tool_markers=True))


def test_a_reply_with_text_and_calls_goes_back_as_one_assistant_turn():
    from kda_serving.server.protocol import ResponsesRequest

    req = ResponsesRequest.model_validate({"model": MODEL, "instructions": "Be brief.", "input": [
        {"role": "user", "content": "Search kda"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "search", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "search", "arguments": "{\"q\": 1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "r1"},
        {"type": "function_call_output", "call_id": "c2", "output": "r2"}]})
    messages = req.chat_request().template_messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "tool"]
    assert messages[2]["content"] == "Checking." and [c["id"] for c in messages[2]["tool_calls"]] == ["c1", "c2"]
    assert [m.get("tool_call_id") for m in messages[3:]] == ["c1", "c2"]


@pytest.mark.parametrize("error, status", [(ValueError("refused"), "400"), (RuntimeError("broken"), "500")])
def test_an_engine_error_after_the_stream_began_is_an_error_event(error, status):
    async def test(http, client, engine):
        engine.fail_with = error
        r = await http.post("/v1/responses", json={"model": MODEL, "input": "x", "stream": True})
        events = [json.loads(line[len("data: "):]) for line in r.text.split("\n\n") if line.startswith("data: ")]
        assert r.status_code == 200 and events[-1]["type"] == "error" and str(error) in events[-1]["message"]
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        metrics = parse_metrics((await http.get("/metrics")).text)
        assert metrics[f'kda_serving_http_errors_total{{status="{status}"}}'] == 1
        engine.fail_with = None
        assert (await http.post("/v1/responses", json={"model": MODEL, "input": "x",
                                                       "max_output_tokens": 2})).status_code == 200

    serve(test)


def test_previous_response_id_continues_the_stored_conversation():
    async def test(http, client, engine):
        engine.script = engine.tokenizer.encode("abc", add_special_tokens=False)
        first = await client.responses.create(model=MODEL, input="Hi there", instructions="Be brief.")
        assert first.store is True and first.previous_response_id is None
        got = await client.responses.retrieve(first.id)
        assert got.model_dump() == first.model_dump()

        engine.script = engine.tokenizer.encode("def", add_special_tokens=False)
        second = await client.responses.create(model=MODEL, input="More", previous_response_id=first.id)
        assert second.previous_response_id == first.id and second.output_text == "def"
        prompt = engine.tokenizer.decode(engine.seen_prompts[-1][:-3])
        # the stored conversation, then the new input; the first turn's instructions are not carried over
        assert prompt == "<|user|>Hi there<|end|><|assistant|>abc<|end|><|user|>More<|end|><|assistant|>"

        third = await client.responses.create(model=MODEL, input=[{"role": "user", "content": "Again"}],
                                              previous_response_id=second.id, instructions="Now long.")
        prompt = engine.tokenizer.decode(engine.seen_prompts[-1][:-3])
        assert prompt == ("<|system|>Now long.<|end|><|user|>Hi there<|end|><|assistant|>abc<|end|><|user|>More"
                          "<|end|><|assistant|>def<|end|><|user|>Again<|end|><|assistant|>")
        # a continuation without new instructions starts with the previous turn's tokens: served from cache
        fourth = await client.responses.create(model=MODEL, input="Once more", previous_response_id=second.id)
        assert fourth.usage.input_tokens_details.cached_tokens > len(engine.tokenizer.encode(
            "<|user|>Hi there<|end|><|assistant|>abc", add_special_tokens=False))
        assert third.id != fourth.id and (await client.responses.retrieve(second.id)).id == second.id

    serve(test)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_function_call_and_its_output_continue_by_previous_response_id(stream):
    async def test(http, client, engine):
        call_resp, _ = await _forced_weather_call(client, engine, stream)
        [call] = call_resp.output
        assert (await client.responses.retrieve(call_resp.id)).output[0].call_id == call.call_id  # stored
        engine.script = engine.tokenizer.encode("Sunny.", add_special_tokens=False)
        follow = await client.responses.create(
            model=MODEL, tools=[WEATHER], tool_choice="none", previous_response_id=call_resp.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "22C, sunny"}])
        assert follow.output_text == "Sunny."
        prompt = engine.tokenizer.decode(engine.seen_prompts[-1])
        assert "<|tool|>22C, sunny<|end|>" in prompt and prompt.index("Weather in Paris?") < prompt.index("22C")

    serve(test)


def test_unstored_deleted_and_unknown_responses():
    async def test(http, client, engine):
        kept = await client.responses.create(model=MODEL, input="a", max_output_tokens=2)
        not_kept = await client.responses.create(model=MODEL, input="b", max_output_tokens=2, store=False)
        assert not_kept.store is False
        for response_id in (not_kept.id, "resp_unknown"):
            r = await http.get(f"/v1/responses/{response_id}")
            assert_openai_error(r, 404)
            r = await http.post("/v1/responses", json={"model": MODEL, "input": "c",
                                                       "previous_response_id": response_id})
            assert_openai_error(r, 400)
            assert r.json()["error"]["param"] == "previous_response_id"
        scraped = parse_metrics((await http.get("/metrics")).text)
        assert scraped["kda_serving_stored_responses"] == 1 and scraped["kda_serving_stored_response_bytes"] > 0
        assert await client.responses.delete(kept.id) is None
        assert_openai_error(await http.get(f"/v1/responses/{kept.id}"), 404)
        assert_openai_error(await http.delete(f"/v1/responses/{kept.id}"), 404)

    serve(test)


def test_the_store_keeps_within_its_budget_and_can_be_off():
    async def test(http, client, engine):
        first = await client.responses.create(model=MODEL, input="first", max_output_tokens=2)
        second = await client.responses.create(model=MODEL, input="second", max_output_tokens=2)
        # the budget holds one response of this size: the least recently used went
        assert_openai_error(await http.get(f"/v1/responses/{first.id}"), 404)
        assert (await client.responses.retrieve(second.id)).id == second.id

    serve(test, config=ServerConfig(max_stored_response_bytes=1600))  # each takes ~1,200: room for one

    async def off(http, client, engine):
        resp = await client.responses.create(model=MODEL, input="x", max_output_tokens=2)
        assert resp.store is False  # the default, when the server keeps nothing
        for name in ("store", "background"):
            r = await http.post("/v1/responses", json={"model": MODEL, "input": "x", name: True})
            assert_openai_error(r, 400)
            assert r.json()["error"]["param"] == name

    serve(off, config=ServerConfig(max_stored_response_bytes=0))


def test_response_store_evicts_least_recently_used_and_refuses_oversize():
    from kda_serving.server.response_store import ResponseStore

    def body(i):
        return {"id": f"resp_{i}", "output": []}

    store = ResponseStore(max_bytes=3 * 80)  # each entry below takes 73
    for i in range(3):
        assert store.put(body(i), [{"role": "user", "content": "x" * 10}])
    assert store.get("resp_0") is not None  # now the most recently used
    store.put(body(3), [{"role": "user", "content": "x" * 10}])
    assert store.get("resp_1") is None and store.get("resp_0") is not None and len(store) == 3
    assert store.bytes_used <= store.max_bytes
    assert not store.put(body(4), [{"role": "user", "content": "x" * 1000}]) and store.get("resp_4") is None
    assert store.delete("resp_0") and not store.delete("resp_0") and len(store) == 2


def test_input_items_list_a_stored_conversation():
    async def test(http, client, engine):
        first = await client.responses.create(model=MODEL, input="Hi there", max_output_tokens=2)
        second = await client.responses.create(model=MODEL, previous_response_id=first.id, max_output_tokens=2,
                                               input=[{"type": None, "role": "user",
                                                       "content": [{"type": "input_text", "text": "More"}]}])
        page = await client.responses.input_items.list(second.id, order="asc")
        items = page.data
        assert [(i.type, i.role) for i in items] == [("message", "user"), ("message", "assistant"),
                                                     ("message", "user")]
        assert items[0].content[0].text == "Hi there" and items[0].content[0].type == "input_text"
        assert items[1].id == first.output[0].id and items[1].content[0].text == first.output_text
        assert all(i.id for i in items) and [i.status for i in items] == ["completed", "incomplete", "completed"]
        # the same items keep their ids from turn to turn
        assert (await client.responses.input_items.list(first.id)).data[0].id == items[0].id
        newest = (await http.get(f"/v1/responses/{second.id}/input_items")).json()  # newest first by default
        assert [i["id"] for i in newest["data"]] == [i.id for i in reversed(items)] and not newest["has_more"]
        limited = (await http.get(f"/v1/responses/{second.id}/input_items",
                                  params={"order": "asc", "limit": 1, "after": items[0].id})).json()
        assert [i["id"] for i in limited["data"]] == [items[1].id] and limited["has_more"]
        assert limited["first_id"] == limited["last_id"] == items[1].id
        for params, param in (({"order": "up"}, "order"), ({"limit": 0}, "limit"), ({"limit": "x"}, "limit"),
                              ({"after": "msg_nope"}, "after")):
            r = await http.get(f"/v1/responses/{second.id}/input_items", params=params)
            assert_openai_error(r, 400)
            assert r.json()["error"]["param"] == param
        assert_openai_error(await http.get("/v1/responses/resp_nope/input_items"), 404)

    serve(test)


async def _until_done(client, response_id: str):
    for _ in range(500):
        resp = await client.responses.retrieve(response_id)
        if resp.status not in ("queued", "in_progress"):
            return resp
        await asyncio.sleep(0.01)
    raise AssertionError(f"{response_id} still in progress")


def test_background_response_answers_at_once_and_is_fetched_when_done():
    async def test(http, client, engine):
        engine.token_delay = 0.01
        started = await client.responses.create(model=MODEL, input="Hi", max_output_tokens=20, background=True)
        assert started.status == "in_progress" and started.background is True and started.output == []
        done = await _until_done(client, started.id)
        assert done.status == "incomplete" and done.output_text == "abcdefghijklmnopqrst" and done.background
        assert done.usage.output_tokens == 20 and engine.running == set()
        follow = await client.responses.create(model=MODEL, input="More", previous_response_id=done.id,
                                               max_output_tokens=2)
        assert "abcdefghijklmnopqrst" in engine.tokenizer.decode(engine.seen_prompts[-1]) and follow.output_text

    serve(test)


@pytest.mark.parametrize("how", ["cancel", "delete", "shutdown"])
def test_background_response_cancelled_aborts_its_engine_request(how):
    app_box = {}

    async def test(http, client, engine):
        engine.token_delay = 0.05  # 200 tokens: 10 s unless cancelled
        started = await client.responses.create(model=MODEL, input="Hi", max_output_tokens=200, background=True)
        while not engine.running:
            await asyncio.sleep(0.005)
        app_box["id"] = started.id
        if how == "cancel":
            cancelled = await client.responses.cancel(started.id)
            assert cancelled.status == "cancelled" and cancelled.id == started.id
            assert (await client.responses.retrieve(started.id)).status == "cancelled"
            assert (await client.responses.cancel(started.id)).status == "cancelled"  # again: the same answer
        elif how == "delete":
            await client.responses.delete(started.id)
            assert_openai_error(await http.get(f"/v1/responses/{started.id}"), 404)
        if how != "shutdown":
            assert engine.aborted == [started.id] and engine.running == set()
        app_box["engine"] = engine

    engine = FakeEngine()
    app = create_app(engine, ServerConfig())

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                client = openai.AsyncOpenAI(api_key="none", base_url="http://test/v1", http_client=http)
                await test(http, client, engine)
        # the app has shut down: a background response still running was cancelled first
        server = app.state.server
        assert server.background == {}
        if how == "shutdown":
            assert server.responses.get(app_box["id"]).body["status"] == "cancelled"
            assert engine.aborted == [app_box["id"]]

    asyncio.run(main())


def test_background_refusals_and_failures():
    async def test(http, client, engine):
        for body, param in (({"background": True, "stream": True}, "background"),
                            ({"background": True, "store": False}, "background")):
            r = await http.post("/v1/responses", json={"model": MODEL, "input": "x", **body})
            assert_openai_error(r, 400)
            assert r.json()["error"]["param"] == param
        plain = await client.responses.create(model=MODEL, input="x", max_output_tokens=2)
        r = await http.post(f"/v1/responses/{plain.id}/cancel")
        assert_openai_error(r, 400)  # not a background response in progress
        assert_openai_error(await http.post("/v1/responses/resp_nope/cancel"), 404)
        engine.fail_with = RuntimeError("engine broke")
        started = await client.responses.create(model=MODEL, input="y", max_output_tokens=2, background=True)
        failed = await _until_done(client, started.id)
        assert failed.status == "failed" and failed.error.code == "server_error" and "engine broke" in \
            failed.error.message
        engine.fail_with = None
        assert (await client.responses.create(model=MODEL, input="z", max_output_tokens=2)).output_text  # serving on

    serve(test)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_reply_the_engine_aborted_is_cancelled_not_completed(stream):
    async def test(http, client, engine):
        engine.token_delay = 0.02

        async def abort_when_running():
            while not engine.running:
                await asyncio.sleep(0.005)
            engine.abort(next(iter(engine.running)))

        aborter = asyncio.create_task(abort_when_running())
        if stream:
            events = [e async for e in await client.responses.create(model=MODEL, input="x", max_output_tokens=100,
                                                                     stream=True)]
            assert events[-1].type == "response.incomplete"
            resp = events[-1].response
        else:
            resp = await client.responses.create(model=MODEL, input="x", max_output_tokens=100)
        await aborter
        assert resp.status == "cancelled" and resp.usage.output_tokens < 100

    serve(test)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_text_logprobs_when_included(stream):
    async def test(http, client, engine):
        kwargs = dict(model=MODEL, input="Hi", max_output_tokens=3, top_logprobs=2,
                      include=["message.output_text.logprobs"])
        if stream:
            events = [e async for e in await client.responses.create(stream=True, **kwargs)]
            deltas = [e for e in events if e.type == "response.output_text.delta"]
            assert [lp.token for e in deltas for lp in e.logprobs] == ["a", "b", "c"]
            done = next(e for e in events if e.type == "response.output_text.done")
            assert [lp.token for lp in done.logprobs] == ["a", "b", "c"]
            resp = events[-1].response
        else:
            resp = await client.responses.create(**kwargs)
        logprobs = resp.output[0].content[0].logprobs
        assert [(lp.token, lp.logprob) for lp in logprobs] == [("a", -0.5), ("b", -0.5), ("c", -0.5)]
        assert [t.token for t in logprobs[0].top_logprobs] == ["a", "b"] and logprobs[0].bytes == [97]
        assert engine.seen_params[-1].logprobs == 2
        # without include: none asked of the engine, none in the part
        plain = await client.responses.create(model=MODEL, input="Hi", max_output_tokens=3, top_logprobs=2)
        assert engine.seen_params[-1].logprobs is None and not plain.output[0].content[0].logprobs
        r = await http.post("/v1/responses", json={"model": MODEL, "input": "x", "include": ["reasoning"]})
        assert_openai_error(r, 400)
        assert r.json()["error"]["param"] == "include"

    serve(test)
