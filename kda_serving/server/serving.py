"""What /v1/completions and /v1/chat/completions share once the request is turned into choices.

Both answer either one JSON object (after every choice finished) or an SSE stream of chunks; they differ only
in the shape of a chunk and of the final object, which the endpoint passes in as `EndpointFormat`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kda_serving.server.errors import APIError, error_body
from kda_serving.server.generation import Choice, generate_choices
from kda_serving.server.sse import DONE, EventStreamResponse, cancel_on_disconnect, sse_event

logger = logging.getLogger(__name__)

# Answer for a non-streaming request whose client left before it finished (nobody reads it; nginx's code).
CLIENT_CLOSED_REQUEST = 499


@dataclass
class EndpointFormat:
    """How one endpoint shapes its answers.

    chunk(choice, output) -> the choices[] entry of a stream chunk for this engine output, or None to send
    nothing (no new text yet). final(choice) -> the choices[] entry of the complete response.
    """

    name: str  # metric label, e.g. "chat"
    object_name: str  # "text_completion" / "chat.completion"
    chunk_object_name: str  # "text_completion" / "chat.completion.chunk"
    chunk: Callable[[Choice, Any], dict | None]
    final: Callable[[Choice], dict]


@dataclass
class ResponseHeader:
    id: str
    created: int
    model: str

    def fields(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}


def usage(choices: list[Choice]) -> dict:
    """OpenAI usage: each prompt counted once however many choices it has, every choice's tokens counted."""
    first_of_prompt: dict[int, Choice] = {}
    for c in choices:
        first_of_prompt.setdefault(c.prompt_index, c)
    prompt_tokens = sum(len(c.prompt_token_ids) for c in first_of_prompt.values())
    cached_tokens = sum(c.num_cached_tokens for c in first_of_prompt.values())
    completion_tokens = sum(len(c.output_token_ids) for c in choices)
    body = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
    if any(c.params.prediction for c in choices):  # predicted outputs: how the prediction's drafts fared
        body["completion_tokens_details"] = {
            "accepted_prediction_tokens": sum(c.accepted_prediction_tokens for c in choices),
            "rejected_prediction_tokens": sum(c.rejected_prediction_tokens for c in choices)}
    return body


async def respond(request: Request, server, choices: list[Choice], header: ResponseHeader, fmt: EndpointFormat,
                  *, stream: bool, include_usage: bool) -> Response:
    """Run the choices on the engine and answer: an SSE stream of chunks, or one JSON object at the end.

    `server` is the app's ServerState (engine, config, metrics, admission). Called once the request is valid:
    it is admitted here (a 429 past --max-concurrent-requests) and holds its ticket until the answer is over.
    A non-streaming request whose client leaves is aborted like a stream would be; engine refusals become 400s,
    engine failures 500s.
    """
    ticket = server.admission.admit()
    if stream:
        return EventStreamResponse(_events(server, choices, header, fmt, include_usage), on_close=ticket.release)
    try:
        finished = await run_to_end(request, server, choices, fmt.name, header.id)
    finally:
        ticket.release()
    if not finished:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    body_usage = usage(choices)
    server.metrics.count_prompt(body_usage["prompt_tokens"], body_usage["prompt_tokens_details"]["cached_tokens"])
    body = header.fields(fmt.object_name)
    body["choices"] = [fmt.final(c) for c in sorted(choices, key=lambda c: c.index)]
    body["usage"] = body_usage
    return JSONResponse(body)


async def run_to_end(request: Request, server, choices: list[Choice], endpoint: str, response_id: str) -> bool:
    """Run the choices to their end for a non-streaming answer: False if the client left first (its requests
    aborted); the engine refusing them is a 400, failing them a 500 (logged; the server keeps serving)."""

    async def collect():
        server.metrics.in_flight.inc()
        try:
            async with aclosing(generate_choices(server.engine, choices, server.metrics, endpoint)) as outputs:
                async for _ in outputs:
                    pass
            return True
        finally:
            server.metrics.in_flight.dec()

    try:
        finished = await cancel_on_disconnect(request, collect())
    except (TypeError, ValueError) as exc:  # the engine refused the request
        raise APIError(400, str(exc)) from None
    except Exception as exc:  # the engine failed: answer in OpenAI's format and keep serving
        logger.exception("generation failed for %s", response_id)
        raise APIError(500, f"Generation failed: {exc!r}", code="engine_error") from None
    return finished is not None


def stream_error_status(server, exc: Exception, response_id: str) -> int:
    """The HTTP status an error in a stream stands for, counted (and, for an engine failure, logged): the engine
    refusing the request (TypeError, ValueError) is a 400, anything else a 500."""
    status = 400 if isinstance(exc, (TypeError, ValueError)) else 500
    if status == 500:
        logger.exception("generation failed for %s", response_id)
    server.metrics.http_errors.labels(status=str(status)).inc()
    return status


async def _events(server, choices: list[Choice], header: ResponseHeader, fmt: EndpointFormat, include_usage: bool):
    server.metrics.in_flight.inc()
    try:
        async with aclosing(generate_choices(server.engine, choices, server.metrics, fmt.name)) as outputs:
            async for choice, out in outputs:
                entry = fmt.chunk(choice, out)
                if entry is None:
                    continue
                chunk = header.fields(fmt.chunk_object_name)
                chunk["choices"] = [entry]
                if include_usage:
                    chunk["usage"] = None
                yield sse_event(chunk)
        final_usage = usage(choices)
        server.metrics.count_prompt(final_usage["prompt_tokens"],
                                    final_usage["prompt_tokens_details"]["cached_tokens"])
        if include_usage:
            chunk = header.fields(fmt.chunk_object_name)
            chunk["choices"] = []
            chunk["usage"] = final_usage
            yield sse_event(chunk)
    except Exception as exc:  # the 200 and the headers are out: an error can only travel as an event
        status = stream_error_status(server, exc, header.id)
        yield sse_event(error_body(status, str(exc) or type(exc).__name__))
    finally:
        server.metrics.in_flight.dec()
    yield DONE
