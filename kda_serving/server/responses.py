"""POST /v1/responses: OpenAI's Responses API, its stateless text subset (protocol.ResponsesRequest).

`instructions` and `input` go through the chat template like /v1/chat/completions messages; the answer is one
`message` output item holding one `output_text` part. Nothing is stored, so a conversation is continued by
sending its history (earlier replies' output items included, as the API returned them) in `input`.

Streaming answers are OpenAI's typed events, each a `data:` line with its `type` and `sequence_number`:
response.created, response.in_progress, response.output_item.added, response.content_part.added, then
response.output_text.delta per piece of text, and response.output_text.done, response.content_part.done,
response.output_item.done and response.completed (response.incomplete when max_output_tokens cut the reply).
An error after the stream began travels as an `error` event.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import aclosing

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kda_serving.engine import SamplingParams
from kda_serving.server.errors import bad_request
from kda_serving.server.generation import Choice, generate_choices
from kda_serving.server.intake import chat_prompt_ids, check_model, read_json_body, resolve_max_tokens
from kda_serving.server.protocol import ResponsesRequest, parse_request
from kda_serving.server.serving import CLIENT_CLOSED_REQUEST, run_to_end
from kda_serving.server.sse import EventStreamResponse, sse_event

logger = logging.getLogger(__name__)
ENDPOINT = "responses"  # metric label


async def create_response(request: Request, server) -> Response:
    engine, config = server.engine, server.config
    req = parse_request(ResponsesRequest, await read_json_body(request, config.max_request_bytes))
    check_model(engine, req.model)
    ids = chat_prompt_ids(engine, req, param="input")
    max_tokens = resolve_max_tokens(engine, config.max_prompt_tokens, len(ids), req.max_output_tokens, "input",
                                    "max_output_tokens")
    answer = _Answer(req, f"resp_{uuid.uuid4().hex}", engine.model_name)
    choice = Choice(index=0, request_id=answer.id, prompt_token_ids=ids, params=_sampling_params(req, max_tokens))
    if req.stream:
        return EventStreamResponse(_events(server, choice, answer))
    if not await run_to_end(request, server, [choice], ENDPOINT, answer.id):
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    server.metrics.count_prompt(len(ids), choice.num_cached_tokens)
    return JSONResponse(answer.body(choice))


def _sampling_params(req: ResponsesRequest, max_tokens: int) -> SamplingParams:
    kwargs = {name: getattr(req, name) for name in ("temperature", "top_p") if getattr(req, name) is not None}
    structured = req.structured_output()
    if structured is not None:
        kwargs["structured_output"] = structured
    try:
        return SamplingParams(max_tokens=max_tokens, output_kind="delta", **kwargs)
    except (TypeError, ValueError) as exc:
        raise bad_request(str(exc)) from None


class _Answer:
    """The response object at each stage: in progress (no output yet), then complete or incomplete."""

    def __init__(self, req: ResponsesRequest, response_id: str, model: str):
        self.req, self.id, self.model = req, response_id, model
        self.created_at = int(time.time())
        self.message_id = f"msg_{uuid.uuid4().hex}"

    def status(self, choice: Choice) -> str:
        if not choice.finished:
            return "in_progress"
        return "incomplete" if choice.finish_reason == "length" else "completed"

    def message(self, choice: Choice) -> dict:
        status = self.status(choice)
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [] if status == "in_progress" else [self.part(choice.text)]}

    @staticmethod
    def part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": []}

    def body(self, choice: Choice) -> dict:
        req, status = self.req, self.status(choice)
        usage = None
        if choice.finished:
            prompt, output = len(choice.prompt_token_ids), len(choice.output_token_ids)
            usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": choice.num_cached_tokens},
                     "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": prompt + output}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": self.model,
            "output": [] if status == "in_progress" else [self.message(choice)],
            "parallel_tool_calls": False, "previous_response_id": None, "store": False,
            "temperature": req.temperature, "top_p": req.top_p, "text": req.text_config(), "tool_choice": "none",
            "tools": [], "truncation": "disabled", "user": req.user, "metadata": req.metadata or {},
            "usage": usage,
        }


async def _events(server, choice: Choice, answer: _Answer):
    sequence = 0

    def event(kind: str, **fields) -> bytes:
        nonlocal sequence
        payload = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        return sse_event(payload)

    where = {"item_id": answer.message_id, "output_index": 0, "content_index": 0}
    server.metrics.in_flight.inc()
    try:
        yield event("response.created", response=answer.body(choice))
        yield event("response.in_progress", response=answer.body(choice))
        yield event("response.output_item.added", output_index=0, item=answer.message(choice))
        yield event("response.content_part.added", part=answer.part(""), **where)
        async with aclosing(generate_choices(server.engine, [choice], server.metrics, ENDPOINT)) as outputs:
            async for _, out in outputs:
                if out.delta_text:
                    yield event("response.output_text.delta", delta=out.delta_text, logprobs=[], **where)
        server.metrics.count_prompt(len(choice.prompt_token_ids), choice.num_cached_tokens)
        yield event("response.output_text.done", text=choice.text, logprobs=[], **where)
        yield event("response.content_part.done", part=answer.part(choice.text), **where)
        yield event("response.output_item.done", output_index=0, item=answer.message(choice))
        body = answer.body(choice)
        yield event(f"response.{'incomplete' if body['status'] == 'incomplete' else 'completed'}", response=body)
    except Exception as exc:  # the 200 and the headers are out: an error can only travel as an event
        status = 400 if isinstance(exc, (TypeError, ValueError)) else 500
        if status == 500:
            logger.exception("generation failed for %s", answer.id)
        server.metrics.http_errors.labels(status=str(status)).inc()
        yield event("error", code="invalid_request_error" if status == 400 else "engine_error",
                    message=str(exc) or type(exc).__name__, param=None)
    finally:
        server.metrics.in_flight.dec()
