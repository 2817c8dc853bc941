"""`kda-serve-batch`: a file of OpenAI Batch API requests answered offline by the server's own endpoints.

    kda-serve-batch -i requests.jsonl -o results.jsonl [--max-concurrency 64] [the engine flags of kda-serve]
    python -m kda_serving.server.batch -i - -o -        # stdin to stdout

Input: one request per line in the Batch API's format,

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": ..., "messages": ...}}

with url /v1/chat/completions, /v1/completions or /v1/responses. Output: one line per request line, in the input's
order, in the Batch API's output format,

    {"id": "batch_req_...", "custom_id": "q1", "response": {"status_code": 200, "request_id": "req_...",
     "body": {...the endpoint's answer...}}, "error": null}

A request the endpoint refuses is answered the same way with its status and OpenAI error body (as the Batch API
does); a line that is no request at all (not JSON, no custom_id or body, another method or url, `stream: true`, a
custom_id seen before) gets `"response": null` and `"error": {"code": ..., "message": ...}`. Blank lines are
skipped. A bad line never stops the run, and each result is written (and flushed) as soon as it and those
before it are done, so an interrupted run keeps what it finished.

Every request goes through the same app as kda-serve (validation, tokenization, limits, the prefix cache, the
engine), in-process over ASGI with no network; up to --max-concurrency requests are in flight at once, so the
engine batches them as it would a server's concurrent clients.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterable

from kda_serving.server import cli

BATCH_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


def _output(custom_id: str | None, response: dict | None = None, error: dict | None = None) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response, "error": error}


def _line_error(custom_id: str | None, code: str, message: str) -> dict:
    return _output(custom_id, error={"code": code, "message": message})


def parse_line(text: str, seen_ids: set[str]) -> tuple[dict | None, dict | None]:
    """One input line -> (the request {custom_id, url, body}, None), or (None, its error output line)."""
    try:
        item = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, _line_error(None, "invalid_json", f"the line is not JSON: {exc.msg} (column {exc.colno})")
    if not isinstance(item, dict):
        return None, _line_error(None, "invalid_request", "the line must be a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return None, _line_error(None, "missing_custom_id", "'custom_id' must be a non-empty string")
    if custom_id in seen_ids:
        return None, _line_error(custom_id, "duplicate_custom_id", f"custom_id {custom_id!r} was used before")
    seen_ids.add(custom_id)
    if item.get("method") != "POST":
        return None, _line_error(custom_id, "invalid_method", f"'method' must be POST, got {item.get('method')!r}")
    url = item.get("url")
    if url not in BATCH_URLS:
        return None, _line_error(custom_id, "invalid_url", f"'url' must be one of {', '.join(BATCH_URLS)}, got "
                                                           f"{url!r}")
    body = item.get("body")
    if not isinstance(body, dict):
        return None, _line_error(custom_id, "invalid_body", "'body' must be a JSON object (the endpoint's request)")
    if body.get("stream"):
        return None, _line_error(custom_id, "invalid_body", "a batch answers whole responses: 'stream' must be off")
    return {"custom_id": custom_id, "url": url, "body": body}, None


async def _answer(client, request: dict) -> dict:
    """The endpoint's answer to one request as an output line."""
    try:
        response = await client.post(request["url"], json=request["body"])
    except Exception as exc:  # noqa: BLE001 - one request failing must not end the batch
        logging.getLogger(__name__).exception("batch request %s failed", request["custom_id"])
        return _line_error(request["custom_id"], "internal_error", f"{type(exc).__name__}: {exc}")
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"message": response.text or f"HTTP {response.status_code}"}}
    return _output(request["custom_id"], response={"status_code": response.status_code,
                                                    "request_id": f"req_{uuid.uuid4().hex}", "body": body})


async def run_batch(app, lines: Iterable[str], write: Callable[[dict], None], max_concurrency: int = 64) -> dict:
    """Answer every request line through `app` (started and stopped here), calling write(output line) in the
    input's order; returns the counts {"requests", "succeeded" (status 200), "failed"}."""
    import httpx

    counts = {"requests": 0, "succeeded": 0, "failed": 0}

    def emit(out: dict) -> None:
        counts["requests"] += 1
        ok = out["response"] is not None and out["response"]["status_code"] == 200
        counts["succeeded" if ok else "failed"] += 1
        write(out)

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=None) as client:
            window: collections.deque[asyncio.Future] = collections.deque()  # in input order
            seen: set[str] = set()
            for text in lines:
                if not text.strip():
                    continue
                request, error = parse_line(text, seen)
                if request is None:
                    done = asyncio.get_running_loop().create_future()
                    done.set_result(error)
                    window.append(done)
                else:
                    window.append(asyncio.ensure_future(_answer(client, request)))
                while len(window) >= max_concurrency or (window and window[0].done()):
                    emit(await window.popleft())
            while window:
                emit(await window.popleft())
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kda-serve-batch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("batch")
    io.add_argument("-i", "--input-file", required=True, help="JSONL of Batch API requests ('-': stdin)")
    io.add_argument("-o", "--output-file", required=True, help="JSONL of their results ('-': stdout)")
    io.add_argument("--max-concurrency", type=int, default=64, help="requests in flight at once")
    cli.add_request_arguments(io)
    io.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    cli.add_engine_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.max_concurrency < 1:
        parser.error(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    try:
        source = sys.stdin if args.input_file == "-" else open(args.input_file, encoding="utf-8")
    except OSError as exc:
        parser.error(f"cannot read --input-file: {exc}")

    from kda_serving.engine import AsyncLLMEngine
    from kda_serving.server.app import create_app
    from kda_serving.server.config import ServerConfig

    try:
        engine_config = cli.engine_config_from(args)
        # no stored responses: they would end with the process (a /v1/responses body asking store: true is a 400)
        server_config = ServerConfig(max_prompt_tokens=args.max_prompt_tokens, max_n=args.max_n,
                                     tool_call_parser=args.tool_call_parser, max_stored_response_bytes=0)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    cli.apply_cpu_threads(args, parser)
    try:
        sink = sys.stdout if args.output_file == "-" else open(args.output_file, "w", encoding="utf-8")
    except OSError as exc:
        parser.error(f"cannot write --output-file: {exc}")

    def write(out: dict) -> None:
        sink.write(json.dumps(out, ensure_ascii=False) + "\n")
        sink.flush()

    app = create_app(AsyncLLMEngine(engine_config), server_config)
    started = time.perf_counter()
    with contextlib.ExitStack() as files:  # the files opened here closed, stdin and stdout left open
        for f in (source, sink):
            if f not in (sys.stdin, sys.stdout):
                files.enter_context(f)
        counts = asyncio.run(run_batch(app, source, write, args.max_concurrency))
    print(f"kda-serve-batch: {counts['requests']} requests, {counts['succeeded']} succeeded, {counts['failed']} "
          f"failed, in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
