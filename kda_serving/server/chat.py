"""POST /v1/chat/completions: messages through the tokenizer's chat template, `n` choices."""

from __future__ import annotations

import json
import time
import uuid

from starlette.requests import Request
from starlette.responses import Response

from kda_serving.server.errors import bad_request
from kda_serving.server.generation import Choice
from kda_serving.server.intake import (chat_prompt_ids, check_model, prediction_ids, read_json_body,
                                       resolve_max_tokens, sampling_params)
from kda_serving.server.logprobs import chat_logprobs
from kda_serving.server.protocol import ChatCompletionRequest, parse_request
from kda_serving.server.serving import EndpointFormat, ResponseHeader, respond


async def create_chat_completion(request: Request, server) -> Response:
    engine, config = server.engine, server.config
    req = parse_request(ChatCompletionRequest, await read_json_body(request, config.max_request_bytes))
    check_model(engine, req.model)
    if req.n > config.max_n:
        raise bad_request(f"n: at most {config.max_n} choices per request, got {req.n}", param="n")
    parser = None
    if req.auto_tools():
        parser = server.tool_parser
        if parser is None:
            raise bad_request("tool_choice: 'auto' needs a parser of the model's own tool-call format, and this "
                              f"model's tokenizer has the markers of none (server --tool-call-parser "
                              f"{server.config.tool_call_parser!r}); pass 'required', a named function, or 'none'",
                              param="tool_choice")
    ids = chat_prompt_ids(engine, req)
    max_tokens = resolve_max_tokens(engine, config.max_prompt_tokens, len(ids), req.requested_max_tokens(),
                                    "messages")
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    num_logprobs = req.num_logprobs()
    prediction = prediction_ids(engine, req)
    choices = [Choice(index=j, request_id=f"{response_id}-{j}", prompt_token_ids=ids,
                      params=sampling_params(req, max_tokens, j, num_logprobs, prediction=prediction),
                      priority=req.priority)
               for j in range(req.n)]
    header = ResponseHeader(response_id, int(time.time()), engine.model_name)
    fmt = _format(engine.tokenizer, num_logprobs is not None, req, parser)
    return await respond(request, server, choices, header, fmt, stream=req.stream,
                         include_usage=req.include_usage_in_stream())


def tool_calls(req: ChatCompletionRequest, text: str) -> list[dict] | None:
    """The tool calls a forced reply's text holds (its grammar made it valid JSON), or None if the reply is
    not a forced tool call or, against its grammar, does not parse (then it goes out as text)."""
    forced = req.forced_tools()
    if not forced:
        return None
    try:
        parsed = json.loads(text)
        if req.tool_choice == "required":
            calls = [(str(c["name"]), json.dumps(c["parameters"], separators=(",", ":"))) for c in parsed]
        else:
            calls = [(forced[0].function.name, text.strip())]
    except (ValueError, TypeError, KeyError):
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": n, "arguments": a}}
            for n, a in calls]


def _format(tokenizer, with_logprobs: bool, req: ChatCompletionRequest, parser=None) -> EndpointFormat:
    """parser: the tool-call parser of a tool_choice 'auto' request (its replies may end in tool calls)."""
    forced = bool(req.forced_tools())
    streamed_content: dict[int, str] = {}  # auto tools: the content text each choice has streamed

    def auto_reply(choice: Choice) -> tuple[str, list[dict], str | None]:
        """A tool_choice 'auto' reply whose tool-call section has begun: the text before it, its complete calls
        (the first only with parallel_tool_calls false), and the finish reason they make."""
        reply = parser.parse(choice.output_token_ids)
        calls = reply.calls[:1] if req.parallel_tool_calls is False else reply.calls
        finish = choice.finish_reason
        if calls and finish == "stop" and reply.complete:
            finish = "tool_calls"
        return tokenizer.decode(reply.content_ids, skip_special_tokens=True), calls, finish

    def auto_chunk(choice: Choice, out) -> dict | None:
        """Text streams as usual until the tool-call section starts; the calls go out whole in the last chunk."""
        sent = streamed_content.get(choice.index, "")
        calls, finish = [], choice.finish_reason
        if parser.section_start(choice.output_token_ids) is not None:
            text, calls, finish = auto_reply(choice)
        else:
            text = choice.text if out.finished else sent + out.delta_text
        delta_text = text[len(sent):] if text.startswith(sent) else ""
        streamed_content[choice.index] = sent + delta_text
        first = choice.num_updates == 1
        delta = {"role": "assistant", "content": delta_text} if first else {"content": delta_text}
        if out.finished and calls:
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
        if not delta_text and not out.finished and not first and not (with_logprobs and out.new_token_ids):
            return None
        logprobs = None
        if with_logprobs:
            logprobs = chat_logprobs(tokenizer, out.new_token_ids, out.logprobs or [], out.top_logprobs or [])
        return {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def chunk(choice: Choice, out) -> dict | None:
        if parser is not None:
            return auto_chunk(choice, out)
        if forced:  # the calls go out whole, in the last chunk, once the grammar has made them parse
            if not out.finished:
                return None
            calls = tool_calls(req, choice.text) if choice.finish_reason == "stop" else None
            if calls is not None:
                delta = {"role": "assistant", "content": None,
                         "tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
                return {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": "tool_calls"}
            delta = {"role": "assistant", "content": choice.text}  # cut short (or unparsable): as text
            return {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": choice.finish_reason}
        first = choice.num_updates == 1
        if not first and not out.delta_text and not out.finished and not (with_logprobs and out.new_token_ids):
            return None
        delta = {"role": "assistant", "content": out.delta_text} if first else {"content": out.delta_text}
        if out.finished and not out.delta_text and not first:
            delta = {}
        logprobs = None
        if with_logprobs:
            logprobs = chat_logprobs(tokenizer, out.new_token_ids, out.logprobs or [], out.top_logprobs or [])
        return {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": choice.finish_reason}

    def final(choice: Choice) -> dict:
        logprobs = None
        if with_logprobs:
            logprobs = chat_logprobs(tokenizer, choice.output_token_ids, choice.logprobs, choice.top_logprobs)
        if parser is not None and parser.section_start(choice.output_token_ids) is not None:
            # tool_choice auto, and the reply opened a tool-call section: the text before it, then its calls
            content, calls, finish = auto_reply(choice)
            message = {"role": "assistant", "content": (content or None) if calls else content, "refusal": None}
            if calls:
                message["tool_calls"] = calls
            return {"index": choice.index, "message": message, "logprobs": logprobs, "finish_reason": finish}
        calls = tool_calls(req, choice.text) if forced and choice.finish_reason == "stop" else None
        if calls is not None:
            message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": calls}
            return {"index": choice.index, "message": message, "logprobs": logprobs, "finish_reason": "tool_calls"}
        return {"index": choice.index, "message": {"role": "assistant", "content": choice.text, "refusal": None},
                "logprobs": logprobs, "finish_reason": choice.finish_reason}

    return EndpointFormat("chat", "chat.completion", "chat.completion.chunk", chunk, final)
