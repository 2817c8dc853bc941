"""From an HTTP request to engine work: body limits, JSON, model name, tokens, length limits, sampling params.

Everything here runs before the engine sees the request, so every refusal is a 4xx in OpenAI's format and no
engine state is touched by a bad request.
"""

from __future__ import annotations

import json

from starlette.requests import ClientDisconnect, Request

from kda_serving.engine import SamplingParams
from kda_serving.server.errors import APIError, bad_request
from kda_serving.server.protocol import INT64_MAX, ChatCompletionRequest, CompletionRequest


async def read_json_body(request: Request, max_bytes: int):
    """The decoded JSON body; 413 past `max_bytes` (checked while reading, not after), 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise _too_large(max_bytes)
    except ClientDisconnect:
        raise bad_request("The client disconnected while sending the request body.") from None
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise bad_request(f"The request body is not valid JSON: {exc}", code="invalid_json") from None


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"The request body exceeds the limit of {max_bytes} bytes.", code="request_too_large")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


def check_model(engine, model: str) -> None:
    if model != engine.model_name:
        raise APIError(404, f"The model '{model}' does not exist. This server serves '{engine.model_name}'.",
                       param="model", code="model_not_found")


def completion_prompt_ids(engine, prompt: str | list[int]) -> list[int]:
    """Token ids of one /v1/completions prompt (text is tokenized with the tokenizer's special tokens)."""
    if isinstance(prompt, str):
        return text_ids(engine, prompt, "prompt", add_special_tokens=True)
    vocab = vocab_size(engine)
    bad = next((t for t in prompt if t >= vocab), None)
    if bad is not None:
        raise bad_request(f"prompt: token id {bad} is out of range for a vocabulary of {vocab}", param="prompt")
    return list(prompt)


def chat_prompt_ids(engine, request: ChatCompletionRequest, param: str = "messages") -> list[int]:
    """Token ids of the chat template applied to the messages, ending with the assistant's generation prompt;
    param: the request field errors name (/v1/responses: "input")."""
    try:
        text = engine.tokenizer.apply_chat_template(request.template_messages(), tools=request.template_tools(),
                                                    add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja raises TemplateError or plain exceptions for conversations it refuses
        raise bad_request(f"{param}: the chat template rejected the conversation: {exc}", param=param)
    # The template writes the special tokens (bos, role markers) itself.
    return text_ids(engine, text, param, add_special_tokens=False)


def text_ids(engine, text: str, param: str, add_special_tokens: bool) -> list[int]:
    """Token ids of text; a 400 naming `param` for text the tokenizer refuses."""
    try:
        return list(engine.tokenizer.encode(text, add_special_tokens=add_special_tokens))
    except (TypeError, ValueError) as exc:  # e.g. a lone UTF-16 surrogate ("\ud800"), which JSON allows
        raise bad_request(f"{param}: the text cannot be tokenized ({exc})", param=param) from None


def vocab_size(engine) -> int:
    return int(getattr(engine, "vocab_size", None) or len(engine.tokenizer))


def resolve_max_tokens(engine, max_prompt_tokens: int | None, prompt_len: int, requested: int | None,
                       prompt_param: str, max_param: str = "max_tokens", scoring: bool = False) -> int:
    """The number of tokens to generate, after checking the prompt and the total against the model's limits
    (max_param: the request's name for the output limit). scoring: the request echoes its prompt, and 0 (score
    the prompt, generate nothing) is allowed."""
    max_model_len = int(engine.max_model_len)
    limit = min(max_prompt_tokens or max_model_len - 1, max_model_len - 1)
    if prompt_len == 0:
        raise bad_request(f"{prompt_param}: the prompt is empty after tokenization", param=prompt_param)
    if prompt_len > limit:
        raise bad_request(f"{prompt_param}: the prompt has {prompt_len} tokens, more than the limit of {limit}.",
                          param=prompt_param, code="context_length_exceeded")
    if requested is None:
        return max_model_len - prompt_len
    if requested < (0 if scoring else 1):
        hint = "" if scoring or requested < 0 else " (0, to score a prompt without generating, needs echo)"
        raise bad_request(f"{max_param}: must be at least {0 if scoring else 1}, got {requested}{hint}",
                          param=max_param)
    if prompt_len + requested > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the {prompt_param}, {requested} in the completion). "
            f"Please reduce the length of the {prompt_param} or completion.",
            param=max_param, code="context_length_exceeded")
    return requested


def prediction_ids(engine, request: CompletionRequest | ChatCompletionRequest) -> tuple[int, ...]:
    """The token ids of the request's `prediction` (none without one); a 400 when it is longer than the model's
    context, where no output could follow it."""
    if request.prediction is None:
        return ()
    ids = engine.tokenizer.encode(request.prediction.text(), add_special_tokens=False)
    if len(ids) > engine.max_model_len:
        raise bad_request(f"prediction: {len(ids)} tokens, more than the model's context of "
                          f"{engine.max_model_len}", param="prediction")
    return tuple(ids)


def sampling_params(request: CompletionRequest | ChatCompletionRequest, max_tokens: int, choice: int,
                    logprobs: int | None, prompt_logprobs: int | None = None,
                    prediction: tuple[int, ...] = ()) -> SamplingParams:
    """The engine's SamplingParams for choice number `choice` (seeded choices get distinct seeds)."""
    kwargs = {"prediction": prediction}
    if request.temperature is not None:
        kwargs["temperature"] = request.temperature
    if request.top_p is not None:
        kwargs["top_p"] = request.top_p
    if request.top_k is not None:
        kwargs["top_k"] = max(request.top_k, 0)
    if request.min_p is not None:
        kwargs["min_p"] = request.min_p
    if request.seed is not None:
        kwargs["seed"] = (request.seed + choice) % (INT64_MAX + 1)
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        if getattr(request, name) is not None:
            kwargs[name] = getattr(request, name)
    if request.logit_bias:
        kwargs["logit_bias"] = {int(token): bias for token, bias in request.logit_bias.items()}
    structured = request.structured_output()
    if structured is not None:
        kwargs["structured_output"] = structured
    try:
        return SamplingParams(max_tokens=max_tokens, stop=tuple(request.stop_list()),
                              stop_token_ids=tuple(request.stop_token_ids or ()), ignore_eos=request.ignore_eos,
                              min_tokens=request.min_tokens,
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs, output_kind="delta", **kwargs)
    except (TypeError, ValueError) as exc:
        raise bad_request(str(exc)) from None
