"""/v1/responses: OpenAI's Responses API (protocol.ResponsesRequest), with stored responses.

The request is answered as its /v1/chat/completions twin (ResponsesRequest.chat_request) would be: the same
chat template over `instructions` and `input`, the same sampling, the same function tools (`tool_choice`
'required' or a named function: grammar-forced calls; 'auto': the model's own call format, read back by the
server's tool-call parser). The answer is a `message` output item with one `output_text` part and/or one
`function_call` item per call. A conversation is continued either by sending its history in `input` (earlier
replies' output items and `function_call_output` items included) or by naming the last response in
`previous_response_id`: the server keeps each response (unless `store: false`) with its conversation
(server/response_store.py) and puts that before the new input. GET /v1/responses/{id} returns a stored response,
GET /v1/responses/{id}/input_items lists its input items (newest first unless `order=asc`, `limit`, `after` /
`before` an item id), DELETE /v1/responses/{id} forgets it. `background: true` answers at once with the
response in progress and generates on in a task of the server's; GET fetches it, POST
/v1/responses/{id}/cancel ends it ("cancelled", its engine request aborted), as does the server's shutdown.

Streaming answers are OpenAI's typed events, each a `data:` line with its `type` and `sequence_number`:
response.created, response.in_progress, then per output item response.output_item.added, its content
(response.content_part.added, response.output_text.delta ..., response.output_text.done,
response.content_part.done; or response.function_call_arguments.delta and .done) and
response.output_item.done, and last response.completed (response.incomplete when max_output_tokens cut the
reply, or the engine ended it: status "cancelled"). Text streams as it is generated; a request with tools
sends its items once the reply is complete (its calls are known only then). An error after the stream began
travels as an `error` event.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from contextlib import aclosing

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kda_serving.server.chat import tool_calls
from kda_serving.server.errors import APIError, bad_request
from kda_serving.server.generation import Choice, generate_choices
from kda_serving.server.intake import (chat_prompt_ids, check_model, read_json_body, resolve_max_tokens,
                                       sampling_params)
from kda_serving.server.logprobs import chat_logprobs
from kda_serving.server.protocol import ResponsesRequest, parse_request
from kda_serving.server.serving import CLIENT_CLOSED_REQUEST, run_to_end, stream_error_status
from kda_serving.server.sse import EventStreamResponse, sse_event

ENDPOINT = "responses"  # metric label
logger = logging.getLogger(__name__)


async def create_response(request: Request, server) -> Response:
    engine, config = server.engine, server.config
    body = await read_json_body(request, config.max_request_bytes)
    req = parse_request(ResponsesRequest, body)
    check_model(engine, req.model)
    if (req.store or req.background) and server.responses.max_bytes == 0:
        name = "background" if req.background else "store"
        raise bad_request(f"{name}: this server keeps no responses (--max-stored-response-bytes 0)", param=name)
    if req.previous_response_id is not None:
        previous = server.responses.get(req.previous_response_id)
        if previous is None:
            raise bad_request(f"Previous response with id '{req.previous_response_id}' not found (never stored, "
                              "deleted, or evicted).", param="previous_response_id")
        body = {**body, "input": previous.conversation + _as_items(body["input"])}
        req = parse_request(ResponsesRequest, body)
    try:
        chat = req.chat_request()
    except ValueError as exc:
        message = str(exc)
        named = re.match(r"([a-z_]+):", message)
        raise bad_request(message, param=named.group(1) if named else None) from None
    parser = None
    if chat.auto_tools():
        parser = server.tool_parser
        if parser is None:
            raise bad_request("tool_choice: 'auto' needs a parser of the model's own tool-call format, and this "
                              "model's tokenizer has the markers of none; pass 'required', a named function, or "
                              "'none'", param="tool_choice")
    ids = chat_prompt_ids(engine, chat, param="input")
    max_tokens = resolve_max_tokens(engine, config.max_prompt_tokens, len(ids), req.max_output_tokens, "input",
                                    "max_output_tokens")
    answer = _Answer(req, chat, parser, engine.tokenizer, f"resp_{uuid.uuid4().hex}", engine.model_name,
                     store=req.store is not False and server.responses.max_bytes > 0)
    conversation = _as_items(body["input"])
    choice = Choice(index=0, request_id=answer.id, prompt_token_ids=ids,
                    params=sampling_params(chat, max_tokens, 0, req.num_logprobs()))
    ticket = server.admission.admit()  # held until the answer (or the background run) is over
    if req.stream:
        return EventStreamResponse(_events(server, choice, answer, conversation), on_close=ticket.release)
    if req.background:
        try:
            server.responses.put(answer.body(choice), conversation)
            task = asyncio.create_task(_run_in_background(server, choice, answer, conversation))
        except BaseException:  # no task to give the ticket back: give it back here
            ticket.release()
            raise
        task.add_done_callback(lambda _: ticket.release())  # runs however the task ends, even cancelled unstarted
        server.background[answer.id] = task
        return JSONResponse(answer.body(choice))
    try:
        finished = await run_to_end(request, server, [choice], ENDPOINT, answer.id)
    finally:
        ticket.release()
    if not finished:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    server.metrics.count_prompt(len(ids), choice.num_cached_tokens)
    return JSONResponse(_finished(server, answer, choice, conversation))


async def retrieve_response(request: Request, server) -> Response:
    return JSONResponse(_stored(server, request.path_params["response_id"]).body)


async def delete_response(request: Request, server) -> Response:
    response_id = request.path_params["response_id"]
    _stored(server, response_id)
    await _cancel(server, response_id)
    server.responses.delete(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


async def cancel_response(request: Request, server) -> Response:
    response_id = request.path_params["response_id"]
    entry = _stored(server, response_id)
    if not await _cancel(server, response_id) and entry.body["status"] != "cancelled":
        raise bad_request(f"Only a background response in progress can be cancelled; '{response_id}' is "
                          f"{entry.body['status']}.", param="response_id")
    return JSONResponse(_stored(server, response_id).body)


async def _cancel(server, response_id: str) -> bool:
    """Cancels the background task generating `response_id`, if one runs; waits until it has stored the
    cancelled response. Whether one ran."""
    task = server.background.get(response_id)
    if task is None:
        return False
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return True


async def _run_in_background(server, choice: Choice, answer: _Answer, conversation: list) -> None:
    """A background response's generation: stored when done, or as cancelled or failed."""
    server.metrics.in_flight.inc()
    try:
        async with aclosing(generate_choices(server.engine, [choice], server.metrics, ENDPOINT)) as outputs:
            async for _ in outputs:
                pass
        server.metrics.count_prompt(len(choice.prompt_token_ids), choice.num_cached_tokens)
        _finished(server, answer, choice, conversation)
    except asyncio.CancelledError:  # cancel, DELETE or shutdown; generate_choices aborted the engine request
        server.responses.put(answer.body(choice, status="cancelled"), conversation)
    except Exception as exc:  # the engine refused or failed it: kept as failed, the server serves on
        status = stream_error_status(server, exc, answer.id)
        error = {"code": "invalid_request_error" if status == 400 else "server_error",
                 "message": str(exc) or type(exc).__name__}
        server.responses.put(answer.body(choice, status="failed", error=error), conversation)
    finally:
        server.metrics.in_flight.dec()
        server.background.pop(answer.id, None)


def _stored(server, response_id: str):
    entry = server.responses.get(response_id)
    if entry is None:
        raise APIError(404, f"No response with id '{response_id}' is stored (never stored, deleted, or evicted).",
                       param="response_id", code="not_found")
    return entry


async def list_input_items(request: Request, server) -> Response:
    entry = _stored(server, request.path_params["response_id"])
    query = request.query_params
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request(f"order: must be 'asc' or 'desc', got {order!r}", param="order")
    try:
        limit = int(query.get("limit", 20))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise bad_request(f"limit: must be an integer from 1 to 100, got {query.get('limit')!r}", param="limit")
    items = entry.conversation[: entry.inputs][:: 1 if order == "asc" else -1]
    ids = [item["id"] for item in items]
    start, end = 0, len(items)
    for cursor, param in ((query.get("after"), "after"), (query.get("before"), "before")):
        if cursor is not None:
            if cursor not in ids:
                raise bad_request(f"{param}: no input item '{cursor}' in this response", param=param)
            if param == "after":
                start = ids.index(cursor) + 1
            else:
                end = ids.index(cursor)
    page = items[start:end][:limit]
    return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                         "last_id": page[-1]["id"] if page else None, "has_more": start + len(page) < end})


def _as_items(raw_input) -> list[dict]:
    """A request's `input` (validated) as items in the form OpenAI lists them: each typed, with an id and a
    status; a string is one user message, a message's string content one text part. Items the client sent with
    an id keep it. Still valid `input` items, so a stored conversation goes back in as it is."""
    raw = [{"role": "user", "content": raw_input}] if isinstance(raw_input, str) else raw_input
    items = []
    for item in raw:
        item = {key: value for key, value in item.items() if value is not None}  # an id sent as null gets one
        kind = item.get("type", "message")
        if kind == "message":
            content = item["content"]
            if isinstance(content, str):
                part = "output_text" if item["role"] == "assistant" else "input_text"
                content = [{"type": part, "text": content, **({"annotations": []} if part == "output_text" else {})}]
            item = {**item, "type": "message", "content": content}
        prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}[kind]
        items.append({"id": f"{prefix}_{uuid.uuid4().hex}", "status": "completed", **item})
    return items


def _finished(server, answer: _Answer, choice: Choice, conversation: list) -> dict:
    """The finished response's body, stored after its input items (earlier turns' included) when asked."""
    body = answer.body(choice)
    if answer.store and not server.responses.put(body, conversation):
        logger.warning("response %s not stored: its conversation alone exceeds --max-stored-response-bytes",
                       answer.id)
    return body


class _Answer:
    """The response object at each stage: in progress (no output yet), then complete or incomplete."""

    def __init__(self, req: ResponsesRequest, chat, parser, tokenizer, response_id: str, model: str, store: bool):
        self.req, self.chat, self.parser, self.tokenizer = req, chat, parser, tokenizer
        self.id, self.model, self.store = response_id, model, store
        self.created_at = int(time.time())
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self._items: list[dict] | None = None

    @property
    def has_tools(self) -> bool:
        """Whether the reply may hold function calls (then it streams whole, once complete)."""
        return self.parser is not None or bool(self.chat.forced_tools())

    def status(self, choice: Choice) -> str:
        if not choice.finished:
            return "in_progress"
        # "abort": the engine ended it unfinished (its shutdown, an abort from elsewhere)
        return {"length": "incomplete", "abort": "cancelled"}.get(choice.finish_reason, "completed")

    def message(self, text: str | None, status: str, logprobs: list | None = None) -> dict:
        """The message item; text None: in progress, no content part yet."""
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [] if text is None else [self.part(text, logprobs)]}

    def part(self, text: str, logprobs: list | None = None) -> dict:
        """An output_text part; with `include` asking for logprobs, those of its tokens (`logprobs`)."""
        part = {"type": "output_text", "text": text, "annotations": []}
        if self.req.num_logprobs() is not None:
            part["logprobs"] = logprobs or []
        return part

    def logprobs(self, token_ids: list[int], logprobs: list[float] | None, top: list | None) -> list:
        """Chat-shaped logprobs entries of these tokens ([] when not asked for)."""
        if self.req.num_logprobs() is None or not logprobs:
            return []
        return chat_logprobs(self.tokenizer, token_ids, logprobs, top or [])["content"]

    def items(self, choice: Choice) -> list[dict]:
        """The finished reply's output items: its text as a message (unless it is only calls), then its calls."""
        if self._items is None:
            text, calls = choice.text, []
            if self.parser is not None and self.parser.section_start(choice.output_token_ids) is not None:
                reply = self.parser.parse(choice.output_token_ids)
                calls = reply.calls[:1] if self.req.parallel_tool_calls is False else reply.calls
                text = self.tokenizer.decode(reply.content_ids, skip_special_tokens=True)
            elif self.chat.forced_tools() and choice.finish_reason == "stop":
                calls = tool_calls(self.chat, choice.text) or []
                text = "" if calls else text
            status = self.status(choice)
            # the text's logprobs where the text is the whole reply (with calls parsed out of it, none)
            logprobs = [] if calls else self.logprobs(choice.output_token_ids, choice.logprobs, choice.top_logprobs)
            self._items = ([self.message(text, status, logprobs)] if text or not calls else []) + [
                {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": c["id"],
                 "name": c["function"]["name"], "arguments": c["function"]["arguments"], "status": "completed"}
                for c in calls]
        return self._items

    def body(self, choice: Choice, status: str | None = None, error: dict | None = None) -> dict:
        """The response object; `status` (and `error`) for an end other than the generation's own: a background
        response cancelled or failed."""
        req, status = self.req, status or self.status(choice)
        usage = None
        if choice.finished:
            prompt, output = len(choice.prompt_token_ids), len(choice.output_token_ids)
            usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": choice.num_cached_tokens},
                     "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": prompt + output}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "error": error, "background": bool(req.background),
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": self.model,
            "output": self.items(choice) if choice.finished else [],
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id, "store": self.store, "temperature": req.temperature,
            "top_p": req.top_p, "text": req.text_config(),
            "tool_choice": _tool_choice(req), "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "truncation": "disabled", "user": req.user, "metadata": req.metadata or {}, "usage": usage,
        }


def _tool_choice(req: ResponsesRequest):
    if req.tool_choice is None:
        return "auto" if req.tools else "none"
    return req.tool_choice if isinstance(req.tool_choice, str) else req.tool_choice.model_dump()


async def _events(server, choice: Choice, answer: _Answer, conversation: list):
    sequence = 0

    def event(kind: str, **fields) -> bytes:
        nonlocal sequence
        payload = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        return sse_event(payload)

    def text_events(part: dict, index: int, streamed: bool) -> list[bytes]:
        """A message item's text part (already sent as deltas when `streamed`) closed out: the done events."""
        where = {"item_id": answer.message_id, "output_index": index, "content_index": 0}
        text, logprobs = part["text"], part.get("logprobs", [])
        deltas = [] if streamed or not text else [event("response.output_text.delta", delta=text,
                                                        logprobs=logprobs, **where)]
        return deltas + [event("response.output_text.done", text=text, logprobs=logprobs, **where),
                         event("response.content_part.done", part=part, **where)]

    incremental = not answer.has_tools
    where = {"item_id": answer.message_id, "output_index": 0, "content_index": 0}
    server.metrics.in_flight.inc()
    try:
        yield event("response.created", response=answer.body(choice))
        yield event("response.in_progress", response=answer.body(choice))
        if incremental:
            yield event("response.output_item.added", output_index=0, item=answer.message(None, "in_progress"))
            yield event("response.content_part.added", part=answer.part(""), **where)
        async with aclosing(generate_choices(server.engine, [choice], server.metrics, ENDPOINT)) as outputs:
            async for _, out in outputs:
                if incremental and out.delta_text:
                    yield event("response.output_text.delta", delta=out.delta_text, **where,
                                logprobs=answer.logprobs(out.new_token_ids, out.logprobs, out.top_logprobs))
        server.metrics.count_prompt(len(choice.prompt_token_ids), choice.num_cached_tokens)
        for index, item in enumerate(answer.items(choice)):
            if item["type"] == "message":
                part = item["content"][0]
                if not incremental:
                    yield event("response.output_item.added", output_index=index,
                                item=answer.message(None, "in_progress"))
                    yield event("response.content_part.added", part=answer.part(""), item_id=item["id"],
                                output_index=index, content_index=0)
                for chunk in text_events(part, index, incremental):
                    yield chunk
            else:
                yield event("response.output_item.added", output_index=index,
                            item={**item, "arguments": "", "status": "in_progress"})
                call = {"item_id": item["id"], "output_index": index}
                yield event("response.function_call_arguments.delta", delta=item["arguments"], **call)
                yield event("response.function_call_arguments.done", arguments=item["arguments"], **call)
            yield event("response.output_item.done", output_index=index, item=item)
        body = _finished(server, answer, choice, conversation)
        yield event(f"response.{'completed' if body['status'] == 'completed' else 'incomplete'}", response=body)
    except Exception as exc:  # the 200 and the headers are out: an error can only travel as an event
        status = stream_error_status(server, exc, answer.id)
        yield event("error", code="invalid_request_error" if status == 400 else "engine_error",
                    message=str(exc) or type(exc).__name__, param=None)
    finally:
        server.metrics.in_flight.dec()
