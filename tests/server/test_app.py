"""The HTTP layer in-process, on a stand-in engine: wire format, usage, errors, auth, limits, metrics, aborts.

These run in milliseconds; tests/server/test_server_process.py repeats the essentials against the real
`kda-serve` process on the embedded model.
"""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from server_fake_engine import KIMI_REPLY, FakeEngine
from server_testing import (assert_openai_error, call_and_disconnect, check_fuzzed_answer, mutated_requests,
                            parse_metrics, parse_sse)

from kda_serving.server.app import create_app
from kda_serving.server.config import ServerConfig

MODEL = FakeEngine.model_name


def serve(test, engine: FakeEngine | None = None, config: ServerConfig | None = None, headers=None):
    """Run `await test(client, engine)` against a started app."""
    engine = engine or FakeEngine()
    app = create_app(engine, config or ServerConfig())

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as client:
                return await test(client, engine)

    return asyncio.run(main())


def letters(n: int) -> str:
    return "".join(chr(ord("a") + i % 26) for i in range(n))


def test_models():
    async def test(client, engine):
        listing = (await client.get("/v1/models")).json()
        assert listing["object"] == "list"
        assert [m["id"] for m in listing["data"]] == [MODEL]
        assert listing["data"][0]["max_model_len"] == engine.max_model_len
        assert (await client.get(f"/v1/models/{MODEL}")).json()["id"] == MODEL
        assert_openai_error(await client.get("/v1/models/other"), 404, param="model")
        assert (await client.get("/health")).json() == {"status": "ok"}

    serve(test)


def test_completion_text_usage_and_stream_agree():
    async def test(client, engine):
        body = {"model": MODEL, "prompt": "hello world", "max_tokens": 7}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["object"] == "text_completion" and out["model"] == MODEL and out["id"].startswith("cmpl-")
        [choice] = out["choices"]
        assert choice == {"index": 0, "text": letters(7), "logprobs": None, "finish_reason": "length"}
        prompt_tokens = len(engine.tokenizer.encode("hello world"))
        assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 7,
                                "total_tokens": prompt_tokens + 7, "prompt_tokens_details": {"cached_tokens": 0}}

        r = await client.post("/v1/completions", json={**body, "stream": True,
                                                       "stream_options": {"include_usage": True}})
        assert r.headers["content-type"].startswith("text/event-stream")
        events, done = parse_sse(r.text)
        assert done
        *chunks, last = events
        assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
        assert "".join(c["choices"][0]["text"] for c in chunks) == letters(7)
        assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == 7
        # The second identical prompt is found in the (stand-in) prefix cache and usage says so.
        assert last["usage"]["prompt_tokens_details"]["cached_tokens"] == prompt_tokens - 1

    serve(test)


def test_chat_stream_n_choices():
    async def test(client, engine):
        body = {"model": MODEL, "messages": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                "max_tokens": 5, "n": 3, "stream": True}
        r = await client.post("/v1/chat/completions", json=body)
        events, done = parse_sse(r.text)
        assert done and all(e["object"] == "chat.completion.chunk" for e in events)
        texts, roles, reasons = {}, {}, {}
        for e in events:
            [c] = e["choices"]
            roles.setdefault(c["index"], c["delta"].get("role"))
            texts[c["index"]] = texts.get(c["index"], "") + c["delta"].get("content", "")
            reasons[c["index"]] = c["finish_reason"]
        assert texts == {i: letters(5) for i in range(3)}
        assert roles == {i: "assistant" for i in range(3)}
        assert reasons == {i: "length" for i in range(3)}

        r = await client.post("/v1/chat/completions", json={**body, "stream": False, "n": 1})
        out = r.json()
        assert out["object"] == "chat.completion"
        assert out["choices"][0]["message"] == {"role": "assistant", "content": letters(5), "refusal": None}
        prompt = engine.tokenizer.apply_chat_template([{"role": "system", "content": "be brief"},
                                                       {"role": "user", "content": "hi"}],
                                                      add_generation_prompt=True, tokenize=False)
        assert out["usage"]["prompt_tokens"] == len(engine.tokenizer.encode(prompt, add_special_tokens=False))

    serve(test)


def test_batched_prompts_stop_and_token_ids():
    async def test(client, engine):
        for prompt, prompt_tokens in ((["one", "three"], len(engine.tokenizer.encode("one three")) - 1),
                                      ([[65, 66, 67], [68]], 4)):
            r = await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "n": 2,
                                                           "max_tokens": 10, "stop": ["e", "zz"]})
            out = r.json()
            assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
            assert all(c["text"] == "abcd" and c["finish_reason"] == "stop" for c in out["choices"])
            assert out["usage"]["prompt_tokens"] == prompt_tokens
            assert out["usage"]["completion_tokens"] == 4 * 5  # "abcde": the stop string's token is generated
        mixed = await client.post("/v1/completions", json={"model": MODEL, "prompt": ["one", [65]]})
        assert_openai_error(mixed, 400, param="prompt")

    serve(test)


def test_logprobs_shapes():
    async def test(client, engine):
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3, "logprobs": 1})
        lp = r.json()["choices"][0]["logprobs"]
        assert lp["tokens"] == ["a", "b", "c"] and lp["token_logprobs"] == [-0.5] * 3
        assert lp["text_offset"] == [0, 1, 2] and lp["top_logprobs"][0] == {"a": -0.5, "b": -1.5}
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "logprobs": True,
                                                            "top_logprobs": 1, "stream": True,
                                                            "messages": [{"role": "user", "content": "x"}]})
        events, _ = parse_sse(r.text)
        content = [t for e in events for t in (e["choices"][0]["logprobs"] or {"content": []})["content"]]
        assert [t["token"] for t in content] == ["a", "b"]
        assert content[0]["bytes"] == [97] and content[0]["top_logprobs"][1]["token"] == "b"

    serve(test)


BAD_REQUESTS = {
    "wrong type max_tokens": ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    "float n": ({"prompt": "x", "n": 2.0}, 400, "n"),
    "unknown field": ({"prompt": "x", "max_token": 5}, 400, "max_token"),
    "negative max_tokens": ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    "zero max_tokens": ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    "huge max_tokens": ({"prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),
    "prompt too long": ({"prompt": "y" * 300}, 400, "prompt"),
    "empty prompt": ({"prompt": ""}, 400, "prompt"),
    "unknown model": ({"prompt": "x", "model": "gpt-9"}, 404, "model"),
    "missing model": ({"prompt": "x", "model": None}, 400, "model"),
    "token id out of range": ({"prompt": [1, 10**6]}, 400, "prompt"),
    "temperature out of range": ({"prompt": "x", "temperature": 5.0}, 400, "temperature"),
    "nan temperature": ('{"model": "fake-kda", "prompt": "x", "temperature": NaN}', 400, None),
    "too many stops": ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    "n over limit": ({"prompt": "x", "n": 17}, 400, "n"),
    "invalid json": ("{not json", 400, None),
    "json array": ("[1, 2]", 400, None),
    "negative seed": ({"prompt": "x", "seed": -3}, 400, "seed"),
    "presence_penalty out of range": ({"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    "frequency_penalty out of range": ({"prompt": "x", "frequency_penalty": -2.01}, 400, "frequency_penalty"),
    "zero repetition_penalty": ({"prompt": "x", "repetition_penalty": 0.0}, 400, "repetition_penalty"),
    "float priority": ({"prompt": "x", "priority": 1.5}, 400, "priority"),
    "min_p out of range": ({"prompt": "x", "min_p": 1.5}, 400, "min_p"),
    "negative min_tokens": ({"prompt": "x", "min_tokens": -1}, 400, "min_tokens"),
    "min_tokens over max_tokens": ({"prompt": "x", "max_tokens": 2, "min_tokens": 3}, 400, None),
    "min_tokens with a response_format": ({"prompt": "x", "min_tokens": 1, "response_format": {
        "type": "json_object"}}, 400, None),
    "unknown response_format": ({"prompt": "x", "response_format": {"type": "xml"}}, 400, "response_format.type"),
    "json_schema without a schema": ({"prompt": "x", "response_format": {"type": "json_schema"}}, 400,
                                     "response_format.json_schema"),
    "json_schema name": ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
        "name": "has space", "schema": {}}}}, 400, "response_format.json_schema.name"),
    "huge priority": ({"prompt": "x", "priority": 2**64}, 400, "priority"),
    "logit_bias key not a token id": ({"prompt": "x", "logit_bias": {"hello": 1.0}}, 400, "logit_bias"),
    "logit_bias out of range": ({"prompt": "x", "logit_bias": {"5": 101.0}}, 400, "logit_bias"),
    "lone surrogate": ('{"model": "fake-kda", "prompt": "a\\ud800b"}', 400, "prompt"),
    "deep nesting": ('{"model": "fake-kda", "prompt": ' + "[" * 100000 + "]" * 100000 + "}", 400, None),
}

BAD_CHAT_REQUESTS = {
    "empty messages": ({"messages": []}, 400, "messages"),
    "no content": ({"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    "bad role": ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    "image part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
                   "messages.0.content"),
    "tools": ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400,
              "tools.0.function"),
    "tool_choice auto": ({"messages": [{"role": "user", "content": "x"}],
                          "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool_choice"),
    "unknown named tool": ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {
        "type": "function", "function": {"name": "g"}}, "tools": [{"type": "function", "function": {"name": "f"}}]},
        400, "tool_choice"),
    "tool message without an id": ({"messages": [{"role": "tool", "content": "42"}]}, 400,
                                   "messages.0.tool_call_id"),
    "both max tokens": ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                         "max_completion_tokens": 2}, 400, "max_tokens"),
    "messages not a list": ({"messages": "hi"}, 400, "messages"),
    "lone surrogate": ('{"model": "fake-kda", "messages": [{"role": "user", "content": "\\ud800"}]}', 400,
                       "messages"),
}


def test_penalties_and_biases_reach_the_engine_and_updates_are_deltas():
    async def test(client, engine):
        penalties = {"presence_penalty": 0.5, "frequency_penalty": -0.25, "repetition_penalty": 1.3,
                     "logit_bias": {"7": -100, "12": 2.5}}
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3, **penalties})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "abc"
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "frequency_penalty": 2,
                                                            "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ab"
        first, second = engine.seen_params
        assert (first.presence_penalty, first.frequency_penalty, first.repetition_penalty) == (0.5, -0.25, 1.3)
        assert first.logit_bias == ((7, -100.0), (12, 2.5)) and second.logit_bias == ()
        assert (second.presence_penalty, second.frequency_penalty, second.repetition_penalty) == (0.0, 2.0, 1.0)
        assert first.output_kind == second.output_kind == "delta"

    serve(test)


def test_min_p_and_min_tokens_reach_the_engine():
    async def test(client, engine):
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3,
                                                       "min_p": 0.2, "min_tokens": 2})
        assert r.status_code == 200
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2,
                                                            "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200
        first, second = engine.seen_params
        assert (first.min_p, first.min_tokens) == (0.2, 2) and (second.min_p, second.min_tokens) == (0.0, 0)

    serve(test)


def test_response_format_reaches_the_engine():
    async def test(client, engine):
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
        fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 1, "response_format": fmt,
                                                            "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200
        for body in ({"response_format": {"type": "json_object"}}, {"response_format": {"type": "text"}}, {}):
            r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1, **body})
            assert r.status_code == 200
        assert [p.structured_output for p in engine.seen_params] == [
            ("json_schema", json.dumps(schema)), ("json_object", ""), None, None]

    serve(test)


def test_echo_puts_the_prompt_before_the_completion():
    async def test(client, engine):
        body = {"model": MODEL, "prompt": ["x y", "hi"], "max_tokens": 2, "echo": True, "n": 2}
        r = await client.post("/v1/completions", json=body)
        assert [c["text"] for c in r.json()["choices"]] == ["x yab", "x yab", "hiab", "hiab"]
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            events, done = parse_sse((await s.aread()).decode())
        assert done
        texts = {}
        for e in events:
            for c in e.get("choices", []):
                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        assert [texts[i] for i in range(4)] == ["x yab", "x yab", "hiab", "hiab"]
        r = await client.post("/v1/completions", json={**body, "echo": False})
        assert [c["text"] for c in r.json()["choices"]] == ["ab"] * 4
        ids = engine.tokenizer.encode("hi there")  # a token-id prompt echoes as its decoded text
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 1, "echo": True})
        assert r.json()["choices"][0]["text"] == engine.tokenizer.decode(ids) + "a"

    serve(test)


def test_echo_with_logprobs_scores_the_prompt():
    """echo + logprobs (how evaluation harnesses score a text): the engine is asked for the prompt's logprobs,
    and `logprobs` lists the prompt's tokens first (the first one's logprob and alternatives null), then the
    completion's, offsets running through the echoed text; streamed, the first chunk carries the prompt's."""
    async def test(client, engine):
        prompt = "x yz"
        ids = engine.tokenizer.encode(prompt)
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "echo": True, "logprobs": 1}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200
        lp = r.json()["choices"][0]["logprobs"]
        assert engine.seen_params[-1].prompt_logprobs == 1 and engine.seen_params[-1].logprobs == 1
        n = len(ids)
        assert len(lp["tokens"]) == n + 2 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:n] == [-1.0 - 0.25 * i for i in range(1, n)]
        assert lp["token_logprobs"][n:] == [-0.5, -0.5] and lp["tokens"][n:] == ["a", "b"]
        assert lp["text_offset"][n:] == [len(prompt), len(prompt) + 1]
        assert lp["text_offset"] == sorted(lp["text_offset"])
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            events, done = parse_sse((await s.aread()).decode())
        streamed = [c["logprobs"] for e in events for c in e.get("choices", []) if c.get("logprobs")]
        assert done and streamed[0]["token_logprobs"][:n] == lp["token_logprobs"][:n]
        assert sum((part["tokens"] for part in streamed), []) == lp["tokens"]
        assert sum((part["text_offset"] for part in streamed), []) == lp["text_offset"]
        r = await client.post("/v1/completions", json={**body, "echo": False})
        assert engine.seen_params[-1].prompt_logprobs is None and len(r.json()["choices"][0]["logprobs"]["tokens"]) == 2

    serve(test)


def test_max_tokens_zero_with_echo_scores_the_prompt_alone():
    """max_tokens 0 with echo (OpenAI's legacy way to score a text): the answer is the prompt, its logprobs and
    nothing generated (the token the engine had to sample is dropped: no text, logprob or usage), finish_reason
    "length", streamed or not; without echo, or below 0, a 400 that says so."""
    async def test(client, engine):
        prompt = "x yz"
        n = len(engine.tokenizer.encode(prompt))
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, "n": 2}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert engine.seen_params[-1].max_tokens == 1 and engine.seen_params[-1].prompt_logprobs == 1
        for c in out["choices"]:
            assert c["text"] == prompt and c["finish_reason"] == "length"
            lp = c["logprobs"]
            assert len(lp["tokens"]) == n and lp["token_logprobs"][0] is None
            assert lp["token_logprobs"][1:] == [-1.0 - 0.25 * i for i in range(1, n)]
        assert out["usage"]["completion_tokens"] == 0 and out["usage"]["prompt_tokens"] == n
        async with client.stream("POST", "/v1/completions",
                                 json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
            events, done = parse_sse((await s.aread()).decode())
        assert done
        chunks = [c for e in events for c in e.get("choices", [])]
        for i in range(2):
            mine = [c for c in chunks if c["index"] == i]
            assert "".join(c["text"] for c in mine) == prompt and mine[-1]["finish_reason"] == "length"
            streamed = sum((c["logprobs"]["tokens"] for c in mine if c["logprobs"]), [])
            assert streamed == out["choices"][i]["logprobs"]["tokens"]
        assert events[-1]["usage"]["completion_tokens"] == 0
        for bad, needle in (({"echo": False}, "needs echo"), ({"max_tokens": -1}, "at least 0"),
                            ({"min_tokens": 1}, "min_tokens")):
            r = await client.post("/v1/completions", json={**body, **bad})
            assert r.status_code == 400 and needle in r.json()["error"]["message"], (bad, r.text)

    serve(test)


def test_forced_tool_calls_become_constrained_requests():
    async def test(client, engine):
        params = {"type": "object", "properties": {"q": {"type": "string"}}}
        tools = [{"type": "function", "function": {"name": "search", "parameters": params}},
                 {"type": "function", "function": {"name": "noop"}}]
        msgs = [{"role": "user", "content": "x"}]
        for choice in ({"type": "function", "function": {"name": "search"}}, "required"):
            r = await client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "messages": msgs,
                                                                "tools": tools, "tool_choice": choice})
            # The fake engine's "ab" is no JSON: a reply that does not parse goes out as text, never a 500.
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ab"
        named, required = (json.loads(p.structured_output[1]) for p in engine.seen_params)
        assert named == {**params, "x-guidance": {"whitespace_flexible": False}}
        assert [c["properties"]["name"] for c in required["items"]["anyOf"]] == [{"const": "search"},
                                                                                 {"const": "noop"}]
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "messages": msgs,
                                                            "tools": tools, "tool_choice": "none"})
        assert r.status_code == 200 and engine.seen_params[-1].structured_output is None

    serve(test)




@pytest.mark.parametrize("reply, content, calls, finish", [
    (KIMI_REPLY, "Checking.", [("functions.search:0", "search", '{"q": "kda"}')], "tool_calls"),
    ("Only text.", "Only text.", [], "stop"),
])
def test_auto_tool_choice_reads_the_models_own_format(reply, content, calls, finish):
    # A model whose tokenizer has Kimi's markers: tool_choice auto (the default with tools) answers with the
    # text before the section as content and the section's calls as tool_calls, streamed or not; the tools
    # reach the chat template and the request is unconstrained.
    async def test(client, engine):
        engine.script = engine.tokenizer.encode(reply, add_special_tokens=False)
        tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": tools}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        [choice] = r.json()["choices"]
        assert choice["finish_reason"] == finish and choice["message"]["content"] == content
        got = [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in choice["message"].get(
            "tool_calls") or []]
        assert got == calls and engine.seen_params[-1].structured_output is None
        r = await client.post("/v1/chat/completions", json={**body, "stream": True, "tool_choice": "auto"})
        events, done = parse_sse(r.text)
        assert done
        deltas = [e["choices"][0]["delta"] for e in events]
        assert "".join(d.get("content") or "" for d in deltas) == content
        streamed = [c for d in deltas for c in d.get("tool_calls", [])]
        assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in streamed] == calls
        assert events[-1]["choices"][0]["finish_reason"] == finish

    serve(test, FakeEngine(tool_markers=True))


def test_auto_tool_calls_through_the_openai_client():
    # The official client parses the answer (and accumulates the stream) into its own tool-call objects.
    import openai

    engine = FakeEngine(tool_markers=True)
    engine.script = engine.tokenizer.encode(KIMI_REPLY, add_special_tokens=False)
    app = create_app(engine, ServerConfig())
    tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "x"}]

    async def main():
        async with app.router.lifespan_context(app):
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test/v1")
            client = openai.AsyncOpenAI(api_key="unused", base_url="http://test/v1", http_client=http)
            reply = await client.chat.completions.create(model=MODEL, messages=messages, tools=tools)
            [call] = reply.choices[0].message.tool_calls
            assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content == "Checking."
            assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
                "functions.search:0", "search", {"q": "kda"})
            stream = await client.chat.completions.create(model=MODEL, messages=messages, tools=tools, stream=True)
            chunks = [c async for c in stream]
            calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
            assert [(t.function.name, t.function.arguments) for t in calls] == [("search", '{"q": "kda"}')]
            await http.aclose()

    asyncio.run(main())


def test_auto_tool_choice_keeps_one_call_without_parallel_tool_calls():
    async def test(client, engine):
        call = ("<|tool_call_begin|>functions.search:{i}<|tool_call_argument_begin|>{{}}<|tool_call_end|>")
        reply = f"<|tool_calls_section_begin|>{call.format(i=0)}{call.format(i=1)}<|tool_calls_section_end|>"
        engine.script = engine.tokenizer.encode(reply, add_special_tokens=False)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "search"}}]}
        both = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]["tool_calls"]
        one = (await client.post("/v1/chat/completions", json={**body, "parallel_tool_calls": False})).json()
        assert [c["id"] for c in both] == ["functions.search:0", "functions.search:1"]
        assert [c["id"] for c in one["choices"][0]["message"]["tool_calls"]] == ["functions.search:0"]

    serve(test, FakeEngine(tool_markers=True))


def test_a_named_tool_parser_the_tokenizer_lacks_fails_the_start():
    app = create_app(FakeEngine(), ServerConfig(tool_call_parser="kimi_k2"))

    async def main():
        async with app.router.lifespan_context(app):
            pass

    with pytest.raises(RuntimeError, match="tool-call-parser: kimi_k2: the tokenizer has no single token"):
        asyncio.run(main())


def test_auto_tool_choice_cut_short_keeps_the_engines_finish_reason():
    async def test(client, engine):
        engine.script = engine.tokenizer.encode(KIMI_REPLY, add_special_tokens=False)
        tools = [{"type": "function", "function": {"name": "search"}}]
        r = await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": tools, "max_tokens": 14})
        [choice] = r.json()["choices"]
        assert choice["finish_reason"] == "length" and choice["message"]["content"] == "Checking."
        assert "tool_calls" not in choice["message"]  # the call was cut before it ended

    serve(test, FakeEngine(tool_markers=True))


def test_priority_reaches_the_engine():
    async def test(client, engine):
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": ["x", "y"], "max_tokens": 1,
                                                        "priority": -3})
        assert r.status_code == 200
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 1, "n": 2, "priority": 7,
                                                            "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert engine.seen_priorities == [-3, -3, 7, 7, 0]

    serve(test)


def _send_bad(client, path: str, body):
    if isinstance(body, str):
        return client.post(path, content=body.encode(), headers={"content-type": "application/json"})
    body = {"model": MODEL, **body}
    if body["model"] is None:
        del body["model"]
    return client.post(path, json=body)


@pytest.mark.parametrize("path, case", [("/v1/completions", c) for c in BAD_REQUESTS] +
                         [("/v1/chat/completions", c) for c in BAD_CHAT_REQUESTS],
                         ids=list(BAD_REQUESTS) + [f"chat {c}" for c in BAD_CHAT_REQUESTS])
def test_malformed_requests_get_openai_errors_and_touch_no_engine_state(path, case):
    body, status, param = (BAD_REQUESTS if path == "/v1/completions" else BAD_CHAT_REQUESTS)[case]

    async def test(client, engine):
        assert_openai_error(await _send_bad(client, path, body), status, param=param)
        assert engine.seen_prompts == [] and not engine.running and not engine.waiting
        good = await client.post("/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2})
        assert good.status_code == 200 and good.json()["choices"][0]["text"] == "ab"

    serve(test)


def test_http_errors_and_body_limit():
    async def test(client, engine):
        assert_openai_error(await client.get("/v1/nothing-here"), 404)
        assert_openai_error(await client.get("/v1/completions"), 405)
        big = {"model": MODEL, "prompt": "x" * 5000}
        assert_openai_error(await client.post("/v1/completions", json=big), 413)
        metrics = parse_metrics((await client.get("/metrics")).text)
        assert metrics['kda_serving_http_errors_total{status="413"}'] == 1
        assert metrics['kda_serving_http_errors_total{status="404"}'] == 1

    serve(test, config=ServerConfig(max_request_bytes=4096))


def test_prompt_token_limit():
    async def test(client, engine):
        assert (await client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 10,
                                                           "max_tokens": 1})).status_code == 200
        err = assert_openai_error(await client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 11}),
                                  400, param="prompt")
        assert err["code"] == "context_length_exceeded"

    serve(test, config=ServerConfig(max_prompt_tokens=10))


def test_tokenize_and_detokenize():
    async def test(client, engine):
        tok = engine.tokenizer
        r = (await client.post("/tokenize", json={"model": MODEL, "prompt": "hello"})).json()
        assert r == {"count": 5, "max_model_len": engine.max_model_len, "tokens": tok.encode("hello")}
        messages = [{"role": "user", "content": "hi"}]
        r = (await client.post("/tokenize", json={"model": MODEL, "messages": messages})).json()
        assert tok.decode(r["tokens"]) == "<|user|>hi<|end|><|assistant|>"  # the chat template, as a chat sees it
        back = (await client.post("/detokenize", json={"model": MODEL, "tokens": tok.encode("héllo")})).json()
        assert back == {"prompt": "héllo"}
        for path, body, status, param in (
            ("/tokenize", {"model": MODEL, "prompt": "x", "messages": messages}, 400, "prompt"),
            ("/tokenize", {"model": MODEL}, 400, "prompt"),
            ("/tokenize", {"model": MODEL, "prompt": "x", "tools": []}, 400, "tools"),
            ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model"),
            ("/detokenize", {"model": MODEL, "tokens": [1, 10**6]}, 400, "tokens"),
            ("/detokenize", {"model": MODEL, "tokens": [-1]}, 400, "tokens.0"),
        ):
            assert_openai_error(await client.post(path, json=body), status, param=param)
        assert engine.seen_params == []  # nothing was generated

    serve(test)


def test_bearer_auth():
    async def test(client, engine):
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        err = assert_openai_error(await client.post("/v1/completions", json=body), 401)
        assert err["type"] == "authentication_error"
        assert_openai_error(await client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert_openai_error(await client.get("/v1/models", headers={"Authorization": "secret"}), 401)
        ok = await client.post("/v1/completions", json=body, headers={"Authorization": "Bearer secret"})
        assert ok.status_code == 200
        assert_openai_error(await client.post("/tokenize", json={"model": MODEL, "prompt": "x"}), 401)
        assert_openai_error(await client.post("/detokenize", json={"model": MODEL, "tokens": [1]}), 401)
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200

    serve(test, config=ServerConfig(api_key="secret"))


def test_metrics_count_requests_tokens_latency_and_engine_state():
    async def test(client, engine):
        for _ in range(3):
            await client.post("/v1/completions", json={"model": MODEL, "prompt": "abcdef", "max_tokens": 4})
        m = parse_metrics((await client.get("/metrics")).text)
        assert m['kda_serving_requests_total{endpoint="completions",finish_reason="length"}'] == 3
        assert m["kda_serving_generation_tokens_total"] == 12
        assert m["kda_serving_prompt_tokens_total"] == 18
        assert m["kda_serving_cached_prompt_tokens_total"] == 10  # 5 of 6 tokens on the 2nd and 3rd request
        assert m["kda_serving_prefix_cache_hit_rate"] == pytest.approx(10 / 18)
        assert m["kda_serving_time_to_first_token_seconds_count"] == 3
        assert m["kda_serving_inter_token_latency_seconds_count"] == 9
        assert m["kda_serving_engine_state_slots_used"] == 0
        assert m["kda_serving_engine_state_slots_total"] == engine.max_num_seqs
        assert m["kda_serving_http_requests_in_flight"] == 0

    serve(test)


def test_more_requests_than_slots_queue_and_complete():
    async def test(client, engine):
        body = {"model": MODEL, "prompt": "q", "max_tokens": 5, "stream": True}
        responses = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(12)))
        for r in responses:
            events, done = parse_sse(r.text)
            assert done and "".join(e["choices"][0]["text"] for e in events) == letters(5)
        assert not engine.running and not engine.waiting and not engine.aborted

    serve(test, engine=FakeEngine(max_num_seqs=2))


@pytest.mark.parametrize("failure, status", [(ValueError("params rejected"), 400), (RuntimeError("engine died"), 500)],
                         ids=["engine refuses", "engine fails"])
def test_engine_errors_become_openai_errors(failure, status):
    async def test(client, engine):
        engine.fail_with = failure
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        err = assert_openai_error(await client.post("/v1/completions", json=body), status)
        assert str(failure) in err["message"] or status == 500
        r = await client.post("/v1/completions", json={**body, "stream": True})
        assert r.status_code == 200  # the stream had started: the error travels as an event
        events, done = parse_sse(r.text)
        assert done and events[-1]["error"]["type"] == ("invalid_request_error" if status == 400 else "internal_error")
        engine.fail_with = None
        assert (await client.post("/v1/completions", json=body)).status_code == 200
        m = parse_metrics((await client.get("/metrics")).text)
        assert m.get('kda_serving_requests_aborted_total{endpoint="completions"}', 0) == (0 if status == 400 else 2)

    serve(test)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
@pytest.mark.parametrize("endpoint, body, after, choices", [
    ("completions", {"prompt": "p", "max_tokens": 200, "n": 2}, 3, 2),
    ("responses", {"input": "p", "max_output_tokens": 200}, 6, 1),  # (its first events carry no text)
])
def test_client_disconnect_aborts_engine_requests(stream, endpoint, body, after, choices):
    engine = FakeEngine(token_delay=0.005)
    app = create_app(engine)

    async def main():
        async with app.router.lifespan_context(app):
            chunks = await call_and_disconnect(app, f"/v1/{endpoint}", {"model": MODEL, **body, "stream": stream},
                                               after if stream else 0)
            assert len(chunks) < 30  # it stopped long before the 200 tokens
            assert len(engine.aborted) == choices and len({rid.rsplit("-", 1)[0] for rid in engine.aborted}) == 1
            await asyncio.sleep(0.05)  # the stand-in ends its generators on its next tick
            assert not engine.running and not engine.waiting
            m = parse_metrics(app.state.server.metrics.render().decode())
            assert m[f'kda_serving_requests_aborted_total{{endpoint="{endpoint}"}}'] == choices
            assert m["kda_serving_http_requests_in_flight"] == 0

    asyncio.run(main())


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(request=mutated_requests(MODEL))
def test_fuzzed_requests_never_fail_the_server(request):
    """Any JSON in any field: 200, or an OpenAI-shaped 400 (404 for another model's name), never a 500, and
    nothing left behind in the engine (FUZZ_EXAMPLES=N for a longer run)."""
    path, body = request

    async def test(client, engine):
        r = await client.post(path, json=body)
        event(f"HTTP {r.status_code}")
        check_fuzzed_answer(r, body, path)
        assert not engine.running and not engine.waiting, "a finished request left engine state behind"
        good = await client.post("/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2})
        assert good.status_code == 200 and good.json()["choices"][0]["text"] == "ab"

    serve(test)


def test_predicted_outputs_reach_the_engine_and_usage_reports_them():
    """OpenAI's `prediction` on both endpoints: its text tokenized into SamplingParams.prediction (the engine
    drafts from it when speculation is on; tests/engine/test_speculative.py), the engine's counts of the
    prediction's drafts kept and rejected in usage.completion_tokens_details; a prediction past the model's
    context is a 400 naming it."""

    async def test(client, engine):
        engine.prediction_counts = (3, 1)
        r = await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "prediction": {"type": "content", "content": [{"type": "text", "text": "ab"}, {"type": "text",
                                                                                         "text": "cd"}]}})
        assert r.status_code == 200, r.text
        assert engine.seen_params[-1].prediction == tuple(engine.tokenizer.encode("abcd", add_special_tokens=False))
        assert r.json()["usage"]["completion_tokens_details"] == {"accepted_prediction_tokens": 3,
                                                                  "rejected_prediction_tokens": 1}
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "n": 2,
                                                       "prediction": {"type": "content", "content": "ab"}})
        assert r.json()["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] == 6  # both choices
        plain = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert "completion_tokens_details" not in plain.json()["usage"] and engine.seen_params[-1].prediction == ()
        for bad in ({"type": "content", "content": "x" * 300}, {"type": "file", "content": "x"}):
            r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "prediction": bad})
            assert_openai_error(r, 400)
            assert r.json()["error"]["param"].startswith("prediction")

    serve(test)


def test_openai_hints_that_change_nothing_are_accepted():
    """prompt_cache_key and safety_identifier (OpenAI's caching and abuse-tracking hints) are accepted on every
    generation endpoint and change nothing: the prefix cache keys on the tokens themselves."""

    async def test(client, engine):
        hints = {"prompt_cache_key": "conv-1", "safety_identifier": "user-7"}
        for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 2}),
                           ("/v1/responses", {"input": "hi", "max_output_tokens": 2})):
            with_hints = await client.post(path, json={"model": MODEL, **body, **hints})
            without = await client.post(path, json={"model": MODEL, **body})
            assert with_hints.status_code == without.status_code == 200, with_hints.text
            assert engine.seen_params[-1] == engine.seen_params[-2]

    serve(test)
