"""The real `kda-serve` process on the embedded default model, over loopback HTTP: load, disconnects, bad
input, queueing, the official `openai` client, and kill -9 then restart.

One server is shared by the module (starting one costs ~10 s on two cores). It has fewer state slots than the
load test has clients, so requests must queue. `--cpu-threads 1`: on a two-core machine shared with the test
client, a second torch thread only spins. Afterwards "free" means the engine reports no running or waiting
request and no state slot or KV block held by a request (the prefix cache may keep reclaimable ones).
"""

from __future__ import annotations

import asyncio
import os
import importlib.util
import random
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from server_testing import (MAX_REQUEST_BYTES, REPO_ROOT, SERVER_ARGS, ServerProcess, assert_openai_error,
                            check_fuzzed_answer, metrics, mutated_requests, parse_metrics, parse_sse, wait_until_free)

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
WORDS = ["kernel", "state", "chunk", "decay", "gate", "token", "model", "serve", "cache", "prefix"]


@pytest.fixture(scope="module")
def server():
    with ServerProcess(*SERVER_ARGS, api_key=API_KEY) as srv:
        srv.model = httpx.get(srv.base_url + "/v1/models", headers=AUTH).json()["data"][0]["id"]
        yield srv


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 7, 30, 90])))


def test_200_concurrent_streaming_clients_complete_and_free_everything(server):
    rng = random.Random(0)
    prompts = [prompt(rng) for _ in range(200)]
    max_waiting = 0

    async def client_task(client, i):
        if i % 2:
            body = {"model": server.model, "prompt": prompts[i], "max_tokens": 2 + i % 2, "stream": True}
            path = "/v1/completions"
        else:
            body = {"model": server.model, "messages": [{"role": "user", "content": prompts[i]}],
                    "max_tokens": 2 + i % 3, "stream": True, "stream_options": {"include_usage": True}}
            path = "/v1/chat/completions"
        r = await client.post(path, json=body)
        assert r.status_code == 200, r.text
        events, done = parse_sse(r.text)
        assert done, f"client {i}: stream did not end with [DONE]"
        assert not any("error" in e for e in events), events
        reasons = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        assert reasons in (["length"], ["stop"]), (i, reasons)
        if path == "/v1/chat/completions":
            assert events[-1]["usage"]["completion_tokens"] <= body["max_tokens"]

    async def watch(client, stop: asyncio.Event):
        nonlocal max_waiting
        while not stop.is_set():
            m = parse_metrics((await client.get("/metrics")).text)
            max_waiting = max(max_waiting, m["kda_serving_engine_num_waiting"])
            await asyncio.sleep(0.5)

    async def main():
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=300, limits=limits) as client:
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch(client, stop))
            try:
                await asyncio.gather(*(client_task(client, i) for i in range(200)))
            finally:
                stop.set()
                await watcher

    before = metrics(server)
    asyncio.run(main())
    m = wait_until_free(server)
    finished = sum(v for k, v in m.items() if k.startswith("kda_serving_requests_total{"))
    finished -= sum(v for k, v in before.items() if k.startswith("kda_serving_requests_total{"))
    assert finished == 200
    assert max_waiting > 0, "200 clients on 24 state slots never queued"
    ttft = "kda_serving_time_to_first_token_seconds_count"
    assert m[ttft] - before[ttft] == 200


def test_disconnecting_clients_are_aborted_and_freed(server):
    n_stream, n_plain = 6, 2
    before = metrics(server)

    async def stream_then_leave(client):
        body = {"model": server.model, "prompt": "tell me a long story", "max_tokens": 3000, "ignore_eos": True,
                "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    return  # leave after the first token: closing the stream drops the connection

    async def wait_then_leave(client):
        body = {"model": server.model, "prompt": "tell me a long story", "max_tokens": 3000, "ignore_eos": True}
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.post("/v1/completions", json=body), timeout=3)

    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=120) as client:
            await asyncio.gather(*[stream_then_leave(client) for _ in range(n_stream)],
                                 *[wait_then_leave(client) for _ in range(n_plain)])

    started = time.monotonic()
    asyncio.run(main())
    m = wait_until_free(server, timeout=30)
    # 3000 tokens each would take minutes; being free this soon means the engine aborted them.
    assert time.monotonic() - started < 60
    aborted = m['kda_serving_requests_aborted_total{endpoint="completions"}'] - \
        before.get('kda_serving_requests_aborted_total{endpoint="completions"}', 0)
    assert aborted == n_stream + n_plain
    assert m["kda_serving_engine_requests_aborted_total"] - before["kda_serving_engine_requests_aborted_total"] \
        == n_stream + n_plain


def test_malformed_requests_get_openai_errors_and_server_keeps_serving(server):
    url, model = server.base_url, server.model
    chat, comp = url + "/v1/chat/completions", url + "/v1/completions"
    user = [{"role": "user", "content": "hi"}]
    long_prompt = " ".join(["kernel"] * 5000)  # > max_model_len (4096) tokens
    cases = [
        (httpx.post(chat, content=b'{"model": "x", "messages": [', headers=AUTH), 400, None),
        (httpx.post(chat, content=b"\xff\xfe garbage", headers=AUTH), 400, None),
        (httpx.post(chat, json={"model": model, "messages": user, "max_tokens": "ten"}, headers=AUTH), 400,
         "max_tokens"),
        (httpx.post(chat, json={"model": model, "messages": user, "temperature": "hot"}, headers=AUTH), 400,
         "temperature"),
        (httpx.post(chat, json={"model": model, "messages": user, "frobnicate": 1}, headers=AUTH), 400,
         "frobnicate"),
        (httpx.post(chat, json={"model": model, "messages": user, "max_tokens": -5}, headers=AUTH), 400,
         "max_tokens"),
        (httpx.post(chat, json={"model": model, "messages": user, "max_tokens": 10**9}, headers=AUTH), 400,
         "max_tokens"),
        (httpx.post(chat, json={"model": model, "messages": []}, headers=AUTH), 400, "messages"),
        (httpx.post(chat, json={"model": model, "messages": [{"role": "user", "content": long_prompt}]},
                    headers=AUTH), 400, "messages"),
        (httpx.post(comp, json={"model": model, "prompt": long_prompt}, headers=AUTH), 400, "prompt"),
        (httpx.post(chat, json={"model": "gpt-4o", "messages": user}, headers=AUTH), 404, "model"),
        (httpx.post(chat, json={"model": model, "messages": user}), 401, None),
        (httpx.post(chat, json={"model": model, "messages": user}, headers={"Authorization": "Bearer nope"}), 401,
         None),
        (httpx.post(comp, content=b'{"model": "' + b"x" * MAX_REQUEST_BYTES + b'"}', headers=AUTH), 413, None),
        (httpx.get(url + "/v1/unknown", headers=AUTH), 404, None),
    ]
    for i, (response, status, param) in enumerate(cases):
        try:
            assert_openai_error(response, status, param=param)
        except AssertionError as exc:
            raise AssertionError(f"case {i}: {exc}") from None
    m = wait_until_free(server, timeout=10)
    assert m["kda_serving_http_errors_total{status=\"400\"}"] >= 10
    ok = httpx.post(chat, json={"model": model, "messages": user, "max_tokens": 2}, headers=AUTH, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 40)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(request=mutated_requests("kda-serving-tiny", max_work=3))
def test_fuzzed_requests_never_fail_the_real_server(server, request):
    """The in-process fuzz (test_app.py) against the real engine and tokenizer: any JSON in 1-3 fields gets
    200 or an OpenAI-shaped 400/404, never a 500, and the server keeps serving."""
    path, body = request
    if body.get("model") == "kda-serving-tiny":
        body["model"] = server.model
    check_fuzzed_answer(httpx.post(server.base_url + path, json=body, headers=AUTH, timeout=120), body, path)


def test_sampling_fields_reach_the_engine(server):
    comp = server.base_url + "/v1/completions"
    body = {"model": server.model, "prompt": "The kernel", "max_tokens": 8, "temperature": 1.0, "seed": 1234,
            "ignore_eos": True, "logprobs": 2}
    first = httpx.post(comp, json=body, headers=AUTH, timeout=60).json()
    again = httpx.post(comp, json=body, headers=AUTH, timeout=60).json()
    assert first["choices"][0]["text"] == again["choices"][0]["text"]  # seeded: reproducible
    lp = first["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 8
    assert all(v <= 0 for v in lp["token_logprobs"]) and all(len(t) <= 3 for t in lp["top_logprobs"])
    if not any("\ufffd" in t for t in lp["tokens"]):  # a token can be part of a UTF-8 character
        assert "".join(lp["tokens"]) == first["choices"][0]["text"]

    text = first["choices"][0]["text"]
    stop = text[len(text) // 2:][:2]  # a stop string we know the seeded sample reaches
    assert stop, text
    stopped = httpx.post(comp, json={**body, "stop": [stop]}, headers=AUTH, timeout=60).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stop not in stopped["text"]
    assert text.startswith(stopped["text"])

    two = httpx.post(comp, json={**body, "n": 2, "logprobs": None}, headers=AUTH, timeout=60).json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert two["choices"][0]["text"] == text  # choice j is seeded with seed + j
    assert two["usage"]["completion_tokens"] == 16
    wait_until_free(server, timeout=10)


def test_openai_client_scores_a_prompt_with_echo_and_logprobs(server):
    """echo + logprobs through the official client on the real server (how evaluation harnesses score a text):
    one entry per prompt token and per generated token, the first null; the prompt's logprobs equal those of the
    same model in this process (LLM with prompt_logprobs, kda_serving.engine), twice (the second time the
    prompt is in the prefix cache, which such a request does not use)."""
    from openai import OpenAI

    from kda_serving.engine import LLM, SamplingParams

    client = OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    text = "The kernel keeps its state in a slot of the pool"
    local = LLM(num_state_slots=8, num_kv_blocks=64)
    ids = local.tokenizer.encode(text)
    ref = local.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))[0]
    for _ in range(2):
        got = client.completions.create(model=server.model, prompt=text, max_tokens=1, temperature=0, echo=True,
                                        logprobs=2).choices[0]
        lp = got.logprobs
        assert got.text.startswith(text) and len(lp.tokens) == len(ids) + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1 : len(ids)] == pytest.approx(ref.prompt_logprobs[1:], abs=1e-4)
        assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    # max_tokens 0: the prompt alone, the same logprobs, nothing generated
    alone = client.completions.create(model=server.model, prompt=text, max_tokens=0, temperature=0, echo=True,
                                      logprobs=2)
    lp = alone.choices[0].logprobs
    assert alone.choices[0].text == text and alone.choices[0].finish_reason == "length"
    assert len(lp.tokens) == len(ids) and alone.usage.completion_tokens == 0
    assert lp.token_logprobs[1:] == pytest.approx(ref.prompt_logprobs[1:], abs=1e-4)
    wait_until_free(server, timeout=10)


def _load_example(name: str = "chat_multiturn"):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_openai_client_multiturn_chat_reuses_the_prefix(server):
    from openai import OpenAI

    example = _load_example()
    client = OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [server.model]
    turns = example.chat(client, server.model, example.QUESTIONS[:3], max_tokens=8)
    assert all(t["completion_tokens"] >= 1 and isinstance(t["reply"], str) for t in turns)
    counts = [{k: t[k] for k in ("prompt_tokens", "cached_tokens", "completion_tokens")} for t in turns]
    for previous, turn in zip(turns, turns[1:]):
        assert turn["prompt_tokens"] > previous["prompt_tokens"] + previous["completion_tokens"] - 2
        # The conversation so far (system + earlier turns) comes from the prefix cache, even though the earlier
        # tests (the fuzz above all) have left cache entries in nearly every state slot.
        assert turn["cached_tokens"] > 0, counts
        assert turn["cached_tokens"] < turn["prompt_tokens"]
    # The official client raises its own exception classes from our error bodies.
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.model, messages=[])
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_openai_client_responses_api_continues_a_conversation(server):
    """The official client's Responses calls against the real process: a reply, then a second turn with the
    first reply's output item sent back in `input`, its prefix served from the cache, the same turn by
    `previous_response_id` (the same prompt), and a streamed reply whose deltas add up to the final text; a
    forced function call and its output sent back."""
    import json

    import openai
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    first = client.responses.create(model=server.model, instructions="You are terse.", input="Name a color.",
                                    max_output_tokens=6, temperature=0)
    assert first.status in ("completed", "incomplete") and 1 <= first.usage.output_tokens <= 6
    history = [{"role": "user", "content": "Name a color."}, first.output[0].model_dump(exclude_none=True),
               {"role": "user", "content": "Another one?"}]
    second = client.responses.create(model=server.model, instructions="You are terse.", input=history,
                                     max_output_tokens=6, temperature=0)
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens - 2
    assert second.usage.input_tokens_details.cached_tokens > 0
    stream = client.responses.create(model=server.model, input=history, max_output_tokens=6, temperature=0,
                                     stream=True)
    events = list(stream)
    assert events[-1].type in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text
    by_id = client.responses.create(model=server.model, instructions="You are terse.", input="Another one?",
                                    previous_response_id=first.id, max_output_tokens=6, temperature=0)
    assert by_id.usage.input_tokens == second.usage.input_tokens  # the stored conversation: the same prompt
    assert by_id.usage.input_tokens_details.cached_tokens > 0 and by_id.previous_response_id == first.id
    assert client.responses.retrieve(first.id).output_text == first.output_text
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=server.model, input="x", previous_response_id="resp_missing")

    # a forced function call: the grammar makes its arguments follow the parameters; then its output goes back
    weather = {"type": "function", "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
        "additionalProperties": False}}
    called = client.responses.create(model=server.model, input="Weather in Paris?", tools=[weather],
                                     tool_choice={"type": "function", "name": "get_weather"},
                                     max_output_tokens=60, temperature=0)
    (call,) = called.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments)["city"] in ("Paris", "Oslo")
    answer = client.responses.create(model=server.model, max_output_tokens=4, input=[
        {"role": "user", "content": "Weather in Paris?"}, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert answer.output[0].type == "message" and answer.usage.output_tokens >= 1


def test_openai_client_background_responses(server):
    """Background responses against the real process: one fetched when done; one cancelled mid-generation
    (the real engine aborts it and frees its slot and blocks), the server serving on."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    started = client.responses.create(model=server.model, input="Count.", max_output_tokens=5, temperature=0,
                                      background=True)
    assert started.status == "in_progress" and started.background
    deadline = time.monotonic() + 60
    while (done := client.responses.retrieve(started.id)).status == "in_progress":
        assert time.monotonic() < deadline, "background response not done in 60 s"
        time.sleep(0.05)
    assert done.status in ("completed", "incomplete") and 1 <= done.usage.output_tokens <= 5
    long = client.responses.create(model=server.model, input="Talk.", max_output_tokens=2000, temperature=1.0,
                                   background=True)
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    wait_until_free(server)
    assert client.responses.create(model=server.model, input="x", max_output_tokens=2).usage.output_tokens >= 1


def test_openai_client_structured_outputs(server):
    """response_format json_schema through the official client: the real server's reply parses and follows
    the schema (the embedded model's random weights alone would never write it); a schema the grammar
    compiler refuses is a 400."""
    import json

    import openai
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "level": {"enum": [1, 2, 3]}},
              "required": ["ok", "level"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "status", "schema": schema, "strict": True}}
    for seed in range(3):
        r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Status?"}],
                                           max_tokens=100, seed=seed, temperature=1.0, response_format=fmt)
        value = json.loads(r.choices[0].message.content)
        assert r.choices[0].finish_reason == "stop" and isinstance(value["ok"], bool) and value["level"] in (1, 2, 3)
    verdict = _load_example("structured_output").ask(client, server.model, "Is it ready?")  # the example works
    assert verdict["answer"] in ("yes", "no", "unsure") and 0 <= verdict["confidence"] <= 100
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": 7}}}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=4, response_format=bad)
    wait_until_free(server, timeout=10)


def test_openai_client_forced_tool_calls(server):
    """tool_choice 'required' and a named function through the official client: the real server answers
    with tool calls whose arguments parse and follow each function's parameters, and takes the history back
    with the call and its result (a tool message)."""
    import json

    import openai
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer",
                                                                                       "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}}
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
        "additionalProperties": False}}}
    messages = [{"role": "user", "content": "Weather in Paris for two days?"}]
    named = client.chat.completions.create(
        model=server.model, messages=messages, tools=[weather, clock], max_tokens=100, seed=1,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and args["city"] in ("Paris", "Oslo") and 1 <= args["days"] <= 7

    required = client.chat.completions.create(model=server.model, messages=messages, tools=[weather, clock],
                                              tool_choice="required", max_tokens=200, seed=2,
                                              parallel_tool_calls=False)
    calls = required.choices[0].message.tool_calls
    assert required.choices[0].finish_reason == "tool_calls" and len(calls) == 1  # parallel_tool_calls=False
    for c in calls:
        assert c.function.name in ("get_weather", "get_time") and isinstance(json.loads(c.function.arguments), dict)

    history = [*messages, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    follow = client.chat.completions.create(model=server.model, messages=history, max_tokens=4)
    assert follow.choices[0].message.content is not None

    stream = client.chat.completions.create(
        model=server.model, messages=messages, tools=[weather], max_tokens=100, stream=True, seed=1,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    chunks = [c for c in stream]
    streamed = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or []) if c.choices]
    assert len(streamed) == 1 and json.loads(streamed[0].function.arguments) == args  # same seed, same call
    with pytest.raises(openai.BadRequestError):  # 'auto' needs a parser of the model's own format
        client.chat.completions.create(model=server.model, messages=messages, tools=[weather], max_tokens=4)
    wait_until_free(server, timeout=10)


def test_tokenize_counts_what_a_request_uses(server):
    # /tokenize's count is the prompt_tokens a completion and a chat of the same input report.
    text = "the state of a chunk decays by its gate"
    messages = [{"role": "user", "content": text}]
    tok = httpx.post(server.base_url + "/tokenize", json={"model": server.model, "prompt": text}, headers=AUTH).json()
    chat_tok = httpx.post(server.base_url + "/tokenize", json={"model": server.model, "messages": messages},
                          headers=AUTH).json()
    comp = httpx.post(server.base_url + "/v1/completions", json={"model": server.model, "prompt": text,
                                                                  "max_tokens": 1}, headers=AUTH, timeout=60).json()
    chat = httpx.post(server.base_url + "/v1/chat/completions", json={"model": server.model, "messages": messages,
                                                                       "max_tokens": 1}, headers=AUTH,
                      timeout=60).json()
    assert tok["count"] == len(tok["tokens"]) == comp["usage"]["prompt_tokens"]
    assert chat_tok["count"] == chat["usage"]["prompt_tokens"] > tok["count"]
    back = httpx.post(server.base_url + "/detokenize", json={"model": server.model, "tokens": tok["tokens"]},
                      headers=AUTH).json()
    assert back["prompt"] == text
