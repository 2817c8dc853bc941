"""Helpers for the server tests: SSE and Prometheus parsing, and running the real `kda-serve` process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from hypothesis import strategies as st

REPO_ROOT = Path(__file__).resolve().parents[2]

# The process tests' server: fewer state slots (24) than the load test has clients, so requests queue; one
# torch thread, since on a two-core machine shared with the test client a second one only spins.
STATE_SLOTS = 24
MAX_REQUEST_BYTES = 256 << 10
SERVER_ARGS = ("--max-num-seqs", "32", "--num-state-slots", str(STATE_SLOTS), "--cpu-threads", "1",
               "--max-request-bytes", str(MAX_REQUEST_BYTES))


def parse_sse(text: str) -> tuple[list[dict], bool]:
    """The JSON events of an SSE body, and whether it ended with `data: [DONE]`."""
    events, done = [], False
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), f"not an SSE data event: {block!r}"
        assert not done, "event after [DONE]"
        data = block[len("data: "):]
        if data == "[DONE]":
            done = True
        else:
            events.append(json.loads(data))
    return events, done


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value} (labels kept verbatim)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m kda_serving.server ARGS` on a free loopback port, killed on exit."""

    def __init__(self, *args: str, port: int | None = None, api_key: str | None = None, startup_timeout=120.0,
                 env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.args = ["--port", str(self.port), "--log-level", "warning", *args]
        if api_key:
            self.args += ["--api-key", api_key]
        self.startup_timeout = startup_timeout
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def spawn(self) -> "ServerProcess":
        """Start the process without waiting for it to be ready."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        fd, self.log_path = tempfile.mkstemp(prefix=f"kda-serve-{self.port}-", suffix=".log")
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "kda_serving.server", *self.args], cwd=REPO_ROOT,
                                         env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def start(self) -> "ServerProcess":
        """Start the process and wait until /health answers 200."""
        self.spawn()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kda-serve exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"kda-serve not healthy within {self.startup_timeout} s:\n{tail}")

    def log_tail(self, chars: int = 4000) -> str:
        return Path(self.log_path).read_text(errors="replace")[-chars:]

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill9()
        if self.proc is not None and os.path.exists(self.log_path):
            os.unlink(self.log_path)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def metrics(srv) -> dict[str, float]:
    return parse_metrics(httpx.get(srv.base_url + "/metrics", timeout=10).text)


def wait_until_free(srv, timeout=60.0) -> dict[str, float]:
    """Poll /metrics until nothing runs, waits, holds a slot/block or an admission ticket; return the last
    scrape."""
    keys = ("num_running", "num_waiting", "state_slots_used", "kv_blocks_used")
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(srv)
        if (all(m[f"kda_serving_engine_{k}"] == 0 for k in keys) and m["kda_serving_http_requests_in_flight"] == 0
                and m["kda_serving_admitted_requests"] == 0):
            return m
        if time.monotonic() > deadline:
            held = {k: m[f"kda_serving_engine_{k}"] for k in keys}
            raise AssertionError(f"engine not free after {timeout} s: {held}")
        time.sleep(0.2)


# ---- fuzzed requests -----------------------------------------------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)
COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "n", "temperature", "top_p", "seed", "stop", "stream",
                     "stream_options", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "user",
                     "top_k", "ignore_eos", "stop_token_ids", "repetition_penalty", "echo", "suffix", "best_of",
                     "priority", "response_format", "min_p", "min_tokens", "prediction"]
CHAT_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "seed",
               "stop", "stream", "stream_options", "logprobs", "top_logprobs", "presence_penalty",
               "frequency_penalty", "logit_bias", "user", "top_k", "tools", "tool_choice", "parallel_tool_calls",
               "response_format", "ignore_eos", "priority", "min_p", "min_tokens", "prediction"]
RESPONSES_FIELDS = ["model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream",
                    "store", "previous_response_id", "metadata", "user", "text", "tools", "tool_choice",
                    "parallel_tool_calls", "truncation", "include", "top_logprobs"]
# (path, a valid body, the fields to mutate, the field that bounds the work)
FUZZED_ENDPOINTS = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2}, COMPLETION_FIELDS, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, CHAT_FIELDS,
     "max_tokens"),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 2}, RESPONSES_FIELDS, "max_output_tokens"),
]


@st.composite
def mutated_requests(draw, model: str, max_work: int | None = None):
    """(path, body): a valid request to one of FUZZED_ENDPOINTS with 1-3 fields replaced by arbitrary JSON, or
    dropped. max_work caps valid integer max_tokens / max_completion_tokens / max_output_tokens / n (a real model
    would otherwise be asked for thousands of tokens)."""
    path, valid, fields, bound = draw(st.sampled_from(FUZZED_ENDPOINTS))
    body = {"model": model, **valid}
    for field in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique=True)):
        if draw(st.integers(0, 5)) == 0:
            body.pop(field, None)
        else:
            body[field] = draw(JSON_VALUES)
    if max_work is not None:
        for field in ("max_tokens", "max_completion_tokens", "max_output_tokens", "n"):
            value = body.get(field)
            if type(value) is int and 1 <= value:
                body[field] = min(value, max_work)
        if bound not in body and "max_completion_tokens" not in body:
            body[bound] = max_work
    return path, body


def check_fuzzed_answer(response: httpx.Response, body: dict, path: str = "/v1/completions") -> None:
    """200 with choices (a stream ending in [DONE]; /v1/responses: output, a stream of typed events ending in
    response.completed or .incomplete), or an OpenAI-shaped 400, or 404 for another model."""
    responses = path == "/v1/responses"
    if response.status_code == 200:
        if body.get("stream") is True:
            events, done = parse_sse(response.text)
            if responses:
                assert events[-1]["type"] in ("response.completed", "response.incomplete"), response.text
                assert not any(e["type"] == "error" for e in events), response.text
            else:
                assert done and not any("error" in e for e in events), response.text
        else:
            assert ("output" if responses else "choices") in response.json(), response.text
    elif response.status_code == 404:
        assert_openai_error(response, 404, param="model")
    else:
        assert_openai_error(response, 400)


async def call_and_disconnect(app, path: str, body: dict, disconnect_after_chunks: int) -> list[bytes]:
    """Drive the ASGI app by hand: POST `body` to `path`, then disconnect once `disconnect_after_chunks` chunks
    arrived (0: 50 ms after the call)."""
    chunks: list[bytes] = []
    gone = asyncio.Event()
    sent_body = False

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if len(chunks) >= disconnect_after_chunks:
                gone.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    if disconnect_after_chunks == 0:
        asyncio.get_running_loop().call_later(0.05, gone.set)
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return chunks
