"""POST /tokenize and /detokenize (vLLM's extras): a prompt or conversation to token ids and back, so that a
client can count tokens, or check what the chat template makes of a conversation, without generating."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from kda_serving.server.errors import bad_request
from kda_serving.server.intake import (chat_prompt_ids, check_model, completion_prompt_ids, read_json_body,
                                       text_ids, vocab_size)
from kda_serving.server.protocol import DetokenizeRequest, TokenizeRequest, parse_request


async def tokenize(request: Request, server) -> JSONResponse:
    engine = server.engine
    req = parse_request(TokenizeRequest, await read_json_body(request, server.config.max_request_bytes))
    check_model(engine, req.model)
    _check_tokenizer(engine)
    if req.messages is not None:
        ids = chat_prompt_ids(engine, req.chat_request())
    elif req.add_special_tokens:
        ids = completion_prompt_ids(engine, req.prompt)
    else:
        ids = text_ids(engine, req.prompt, "prompt", add_special_tokens=False)
    return JSONResponse({"count": len(ids), "max_model_len": int(engine.max_model_len), "tokens": ids})


async def detokenize(request: Request, server) -> JSONResponse:
    engine = server.engine
    req = parse_request(DetokenizeRequest, await read_json_body(request, server.config.max_request_bytes))
    check_model(engine, req.model)
    _check_tokenizer(engine)
    vocab = vocab_size(engine)
    bad = next((t for t in req.tokens if t >= vocab), None)
    if bad is not None:
        raise bad_request(f"tokens: token id {bad} is out of range for a vocabulary of {vocab}", param="tokens")
    return JSONResponse({"prompt": engine.tokenizer.decode(req.tokens)})


def _check_tokenizer(engine) -> None:
    if engine.tokenizer is None:
        raise bad_request("This model has no tokenizer: prompts must be token ids.")
