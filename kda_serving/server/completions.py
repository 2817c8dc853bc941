"""POST /v1/completions: text (or token-id) prompts, possibly batched, `n` choices each."""

from __future__ import annotations

import time
import uuid

from starlette.requests import Request
from starlette.responses import Response

from kda_serving.server.errors import bad_request
from kda_serving.server.generation import Choice
from kda_serving.server.intake import (check_model, completion_prompt_ids, prediction_ids, read_json_body,
                                       resolve_max_tokens, sampling_params)
from kda_serving.server.logprobs import completion_logprobs
from kda_serving.server.protocol import CompletionRequest, parse_request
from kda_serving.server.serving import EndpointFormat, ResponseHeader, respond


async def create_completion(request: Request, server) -> Response:
    engine, config = server.engine, server.config
    req = parse_request(CompletionRequest, await read_json_body(request, config.max_request_bytes))
    check_model(engine, req.model)
    prompts = req.prompts()
    if len(prompts) * req.n > config.max_n:
        raise bad_request(f"n: {len(prompts)} prompts x n={req.n} choices is more than the limit of {config.max_n}",
                          param="n")
    response_id = f"cmpl-{uuid.uuid4().hex}"
    prediction = prediction_ids(engine, req)
    choices = []
    for p, prompt in enumerate(prompts):
        ids = completion_prompt_ids(engine, prompt)
        max_tokens = resolve_max_tokens(engine, config.max_prompt_tokens, len(ids), req.max_tokens, "prompt",
                                        scoring=req.echo)
        if max_tokens == 0 and req.min_tokens:
            raise bad_request(f"min_tokens: must be 0 with max_tokens 0, got {req.min_tokens}", param="min_tokens")
        for j in range(req.n):
            index = p * req.n + j
            choices.append(Choice(index=index, request_id=f"{response_id}-{index}", prompt_token_ids=ids,
                                  params=sampling_params(req, max(max_tokens, 1), j, req.logprobs,
                                                         req.logprobs if req.echo else None, prediction),
                                  prompt_index=p, priority=req.priority, prompt_only=max_tokens == 0))
    header = ResponseHeader(response_id, int(time.time()), engine.model_name)
    # echo: each choice's text starts with its prompt (a token-id prompt decoded).
    echoes = [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in prompts] if req.echo else None
    return await respond(request, server, choices, header,
                         _format(engine.tokenizer, req.logprobs is not None, echoes),
                         stream=req.stream, include_usage=req.include_usage_in_stream())


def _format(tokenizer, with_logprobs: bool, echoes: list[str] | None) -> EndpointFormat:
    """With echo and logprobs the prompt's tokens come first in `logprobs` (the first one's logprob null, as
    OpenAI's legacy API gives it), from the engine's prompt logprobs; the generated tokens' offsets start after
    the echoed text."""
    text_offsets: dict[int, int] = {}  # per choice, where the next streamed token starts in its text
    echoed: set[int] = set()  # streamed choices whose prompt went out

    def with_prompt(choice: Choice, echo: str, prompt_lp, prompt_top, generated: dict) -> dict:
        if not echo or prompt_lp is None:
            return generated
        prompt = completion_logprobs(tokenizer, choice.prompt_token_ids, prompt_lp, prompt_top, 0)
        tops = [part["top_logprobs"] or [None] * len(part["tokens"]) for part in (prompt, generated)]
        return {"tokens": prompt["tokens"] + generated["tokens"],
                "token_logprobs": prompt["token_logprobs"] + generated["token_logprobs"],
                "top_logprobs": tops[0] + tops[1], "text_offset": prompt["text_offset"] + generated["text_offset"]}

    def chunk(choice: Choice, out) -> dict | None:
        echo = ""
        if echoes is not None and choice.index not in echoed:
            echoed.add(choice.index)
            echo = echoes[choice.prompt_index]
        if not echo and not out.delta_text and not out.finished and not (with_logprobs and out.new_token_ids):
            return None
        logprobs = None
        if with_logprobs:
            offset = text_offsets.get(choice.index, 0) + len(echo)
            logprobs = completion_logprobs(tokenizer, out.new_token_ids, out.logprobs or [], out.top_logprobs or [],
                                           offset)
            text_offsets[choice.index] = offset + sum(len(t) for t in logprobs["tokens"])
            logprobs = with_prompt(choice, echo, out.prompt_logprobs, out.prompt_top_logprobs, logprobs)
        return {"index": choice.index, "text": echo + out.delta_text, "logprobs": logprobs,
                "finish_reason": choice.finish_reason}

    def final(choice: Choice) -> dict:
        echo = echoes[choice.prompt_index] if echoes is not None else ""
        logprobs = None
        if with_logprobs:
            logprobs = completion_logprobs(tokenizer, choice.output_token_ids, choice.logprobs, choice.top_logprobs,
                                           len(echo))
            logprobs = with_prompt(choice, echo, choice.prompt_logprobs, choice.prompt_top_logprobs, logprobs)
        return {"index": choice.index, "text": echo + choice.text, "logprobs": logprobs,
                "finish_reason": choice.finish_reason}

    return EndpointFormat("completions", "text_completion", "text_completion", chunk, final)
