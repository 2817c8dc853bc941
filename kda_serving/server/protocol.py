"""Request bodies of the OpenAI API subset we serve, validated strictly.

Strict means: unknown fields are refused (a typo such as `max_token` must not silently fall back to a default),
no type coercion (`"max_tokens": "5"` and `"n": 2.0` are errors), and every range is checked here, before the
engine sees the request, so the answer is a 400 naming the parameter. OpenAI fields we know but do not
implement (`suffix`, ...) are accepted only at their neutral value and refused otherwise. `response_format`
(text, json_object, json_schema) constrains the output (engine/structured.py), and so does a forced tool call
(`tool_choice` 'required' or a named function); 'auto' (the default with tools) reads the calls from the
model's own format (server/tool_parsers.py).
Seven vLLM-style extensions are accepted because the engine has them: `top_k`, `min_p`, `ignore_eos`,
`stop_token_ids`, `min_tokens`, `repetition_penalty`, `priority`.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kda_serving.server.errors import APIError, bad_request

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions `logprobs`
MAX_CHAT_TOP_LOGPROBS = 20  # OpenAI's limit for chat `top_logprobs`
RESPONSES_INCLUDABLE = ("message.output_text.logprobs",)  # the `include` values /v1/responses honours
INT64_MAX = 2**63 - 1
NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function and response-format schema names

NonNegInt = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    """response_format.json_schema: the schema the output must follow (OpenAI's structured outputs)."""

    name: str = Field(pattern=NAME)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check_format(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema: required with type 'json_schema' and only there")
        return self


class _SamplingFields(_Strict):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=INT64_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # OpenAI's hints that change no output: the prefix cache needs no key, and nothing is moderated here
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # vLLM-style extensions the engine implements.
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: no top-k cut
    min_p: float | None = Field(None, ge=0.0, le=1.0)  # 0: no cut
    ignore_eos: bool = False
    stop_token_ids: list[NonNegInt] | None = None
    min_tokens: int = Field(0, ge=0)  # no stop before this many output tokens
    repetition_penalty: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    priority: int = Field(0, ge=-INT64_MAX, le=INT64_MAX)  # lower first; needs --scheduling-policy priority
    response_format: ResponseFormat | None = None  # OpenAI's; on /v1/completions too, as in vLLM
    prediction: Prediction | None = None  # OpenAI's predicted outputs: drafts when speculation is on

    @model_validator(mode="after")
    def _check_shared(self):
        stops = self.stop_list()
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"stop: at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop: stop sequences must be non-empty strings")
        for key, bias in (self.logit_bias or {}).items():
            if not re.fullmatch(r"[0-9]{1,9}", key):
                raise ValueError(f"logit_bias: keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias: biases must be in [-100, 100], got {bias} for token {key}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def structured_output(self) -> tuple[str, str] | None:
        """SamplingParams.structured_output for response_format (None: free text)."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return ("json_object", "")
        return ("json_schema", json.dumps(fmt.json_schema.schema_))

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    """POST /v1/completions. `prompt` is text, token ids, or a batch of either (one choice set per prompt)."""

    prompt: str | list[str] | list[int] | list[list[NonNegInt]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _check_completion(self):
        if self.suffix:
            raise ValueError("suffix: not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: only 1 is supported")
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise ValueError("prompt: must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: a single prompt is a batch of one."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Prediction(_Strict):
    """OpenAI's predicted output: text the reply is expected to be (mostly), e.g. a file being edited."""

    type: Literal["content"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class CalledFunction(_Strict):
    name: str
    arguments: str  # JSON text


class ToolCall(_Strict):
    """A tool call of an earlier assistant turn, sent back in the history."""

    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None  # role "tool": the call this message answers
    # Fields the official client echoes back when an assistant reply is appended to the history as is.
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: Any | None = None
    audio: Any | None = None
    annotations: list[Any] | None = None

    @model_validator(mode="after")
    def _check_message(self):
        if self.function_call is not None or self.audio is not None:
            raise ValueError("function_call (use tool_calls) and audio are not supported")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only assistant messages carry them")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool_call_id: required in tool messages and only there")
        if self.content is None and not self.tool_calls:
            raise ValueError("content: required unless the assistant message carries tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def template_message(self) -> dict[str, Any]:
        """The message as chat templates take it (tool calls and ids included where present)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDef(_Strict):
    name: str = Field(pattern=NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: an object of any shape
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions. The prompt is the tokenizer's chat template applied to `messages`."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if len(self.messages) == 0:
            raise ValueError("messages: must contain at least one message")
        self._check_tools()
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("max_tokens: give max_tokens or max_completion_tokens, not both")
        return self

    def _check_tools(self) -> None:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be distinct")
        choice = self.tool_choice
        if choice == "auto" and not self.tools:
            raise ValueError("tool_choice: needs tools")
        if choice == "required" or isinstance(choice, NamedToolChoice):
            if not self.tools:
                raise ValueError("tool_choice: needs tools")
            if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
                raise ValueError(f"tool_choice: no tool is named {choice.function.name!r}")
            if self.response_format is not None and self.response_format.type != "text":
                raise ValueError("response_format: cannot be combined with a forced tool call")

    def auto_tools(self) -> bool:
        """Whether the model chooses between text and tool calls in its own format (tools given, tool_choice
        'auto' or left out)."""
        return bool(self.tools) and self.tool_choice in (None, "auto")

    def forced_tools(self) -> list[ToolDef]:
        """The tools the reply must call (tool_choice 'required': one or more of them; a named function: that
        one), or [] when the reply is text."""
        choice = self.tool_choice
        if choice == "required":
            return list(self.tools)
        if isinstance(choice, NamedToolChoice):
            return [t for t in self.tools if t.function.name == choice.function.name]
        return []

    def structured_output(self) -> tuple[str, str] | None:
        """A forced tool call is a constrained output: the named function's arguments, or (required) a JSON
        array of {"name", "parameters"} calls, as vLLM does it; compact JSON, no whitespace between tokens
        (llguidance's "x-guidance" option), as tool-call arguments usually are."""
        if self.tool_choice == "required":
            calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                       "parameters": t.function.parameters or {"type": "object"}},
                      "required": ["name", "parameters"], "additionalProperties": False} for t in self.tools]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
            if self.parallel_tool_calls is False:
                schema["maxItems"] = 1
        elif isinstance(self.tool_choice, NamedToolChoice):
            schema = dict(self.forced_tools()[0].function.parameters or {"type": "object"})
        else:
            return super().structured_output()
        return ("json_schema", json.dumps({**schema, "x-guidance": {"whitespace_flexible": False}}))

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates take them, or None (tool_choice 'none' keeps them out of the prompt)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        """How many log-probabilities per token the engine must return (None: none)."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.template_message() for m in self.messages]


class InputText(_Strict):
    """A text part of a Responses API input message (output_text: an earlier reply sent back in the history)."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # echoed back with an earlier reply's output_text
    logprobs: list[Any] | None = None


class InputMessage(_Strict):
    """A Responses API input item: a message. Earlier replies appended as the API returned them carry their
    `id` and `status`, which are accepted and ignored."""

    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]
    id: str | None = None
    status: str | None = None

    def template_message(self) -> dict[str, Any]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class FunctionCallItem(_Strict):
    """A Responses API input item: a function call of an earlier reply, sent back in the history."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # JSON text
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Strict):
    """A Responses API input item: the result of a function call, for the model to read."""

    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None
    id: str | None = None
    status: str | None = None


class ResponsesFunctionTool(_Strict):
    """A Responses API tool: a function, its fields at the top level (chat nests them under `function`)."""

    type: Literal["function"]
    name: str = Field(pattern=NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesToolChoiceFunction(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    """Responses API text.format: plain text, a JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=NAME)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _check_format(self):
        if (self.type == "json_schema") != (self.schema_ is not None and self.name is not None):
            raise ValueError("text.format: name and schema are required with type 'json_schema' and only there")
        return self


class TextConfig(_Strict):
    format: TextFormat | None = None


class ResponsesRequest(_Strict):
    """POST /v1/responses (OpenAI's Responses API): `input` (a string, or messages and function calls with their
    outputs) after `instructions` as a system message; a message and/or function calls out. Function tools work
    as on /v1/chat/completions (chat_request() is that request). `store` (default true) keeps the response for
    `previous_response_id`, whose conversation the server puts before `input` (server/response_store.py);
    `background` answers at once and generates on, for GET to fetch; reasoning settings are refused."""

    model: str
    input: str | list[InputMessage | FunctionCallItem | FunctionCallOutputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    prompt_cache_key: str | None = None  # hints that change no output, as on chat
    safety_identifier: str | None = None
    text: TextConfig | None = None
    tools: list[ResponsesFunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["disabled"] | None = None
    background: bool | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _check_responses(self):
        if self.background and self.stream:
            raise ValueError("background: a background response is not streamed here; poll GET "
                             "/v1/responses/{id}")
        if self.background and self.store is False:
            raise ValueError("background: needs store (a background response is fetched later)")
        unknown = [name for name in self.include or () if name not in RESPONSES_INCLUDABLE]
        if unknown:
            raise ValueError(f"include: {', '.join(map(repr, unknown))} not available here (only "
                             f"{', '.join(RESPONSES_INCLUDABLE)})")
        if isinstance(self.input, list) and len(self.input) == 0:
            raise ValueError("input: must contain at least one message")
        if isinstance(self.input, str) and self.input == "":
            raise ValueError("input: must not be empty")
        return self

    def chat_request(self) -> ChatCompletionRequest:
        """The same request in /v1/chat/completions terms, whose prompt, sampling and tool handling it shares:
        instructions as a system message; a run of function calls as one assistant message carrying them (the
        message before them, if it is the same reply's text); each call's output as a tool message; tools and
        tool_choice nested as chat has them; text.format as response_format. Raises ValueError for what chat
        refuses (a tool_choice naming no tool, ...)."""
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.instructions}] if self.instructions \
            else []
        items = [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for item in items:
            if isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":  # the calls of the reply whose text it was
                    last.setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif isinstance(item, FunctionCallOutputItem):
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
            else:
                messages.append(item.template_message())
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        for name, value in (("max_completion_tokens", self.max_output_tokens), ("temperature", self.temperature),
                            ("top_p", self.top_p), ("parallel_tool_calls", self.parallel_tool_calls)):
            if value is not None:
                body[name] = value
        if self.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in self.tools]
        if isinstance(self.tool_choice, ResponsesToolChoiceFunction):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": fmt.model_dump(
                by_alias=True, exclude={"type"}, exclude_none=True)}
        elif fmt is not None:
            body["response_format"] = {"type": fmt.type}
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None

    def num_logprobs(self) -> int | None:
        """Alternatives per output token when `include` asks for the text's logprobs (`top_logprobs`, 0 by
        default), else None: OpenAI returns logprobs only when included."""
        return (self.top_logprobs or 0) if "message.output_text.logprobs" in (self.include or ()) else None

    def text_config(self) -> dict[str, Any]:
        """The `text` field of the answer: the format in effect."""
        fmt = self.text.format if self.text is not None and self.text.format is not None else None
        return {"format": {"type": "text"} if fmt is None else fmt.model_dump(by_alias=True, exclude_none=True)}


def parse_request(model_cls: type[_Strict], body: Any):
    """Validate a decoded JSON body; an invalid one raises a 400 APIError naming the first bad parameter."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return model_cls.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None


# Pydantic names the member of a union that failed inside the location ("prompt.list[int].0"); cut it there.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|.*\[.*\])$")


def _validation_error(exc: ValidationError) -> APIError:
    err = exc.errors(include_url=False)[0]
    parts = [str(part) for part in err["loc"]]
    union_at = next((i for i, part in enumerate(parts) if _UNION_MEMBER.match(part)), None)
    if union_at is not None:
        loc = ".".join(parts[:union_at])
        return bad_request(f"{loc}: invalid type or value ({err['msg'].lower()} in {'.'.join(parts)})", param=loc)
    loc = ".".join(parts)
    if err["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {loc}", param=loc,
                           code="unrecognized_argument")
    if err["type"] == "missing":
        return bad_request(f"Missing required parameter: '{loc}'.", param=loc, code="missing_required_parameter")
    message = err["msg"]
    if err["type"] == "value_error":
        # Our own validators put the parameter name first: "stop: at most 4 ...".
        message = message.removeprefix("Value error, ")
        name, sep, _ = message.partition(":")
        if sep and " " not in name:  # inside a nested object (a message) the name is relative to it
            return bad_request(message, param=f"{loc}.{name}" if loc else name)
        return bad_request(message, param=loc or None)
    return bad_request(f"{loc}: {message}" if loc else message, param=loc or None)


class TokenizeRequest(_Strict):
    """POST /tokenize (as vLLM): the token ids a prompt, or a conversation through the chat template (with the
    assistant's generation prompt, and `tools` rendered as a chat request would), becomes; nothing generated."""

    model: str
    prompt: str | None = None
    add_special_tokens: bool = True  # prompt only: the tokenizer's special tokens, as /v1/completions adds them
    messages: list[ChatMessage] | None = None
    tools: list[ToolDef] | None = None

    @model_validator(mode="after")
    def _check_tokenize(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give prompt or messages, not both")
        if self.messages is not None and len(self.messages) == 0:
            raise ValueError("messages: must contain at least one message")
        if self.tools is not None and self.messages is None:
            raise ValueError("tools: only with messages")
        return self

    def chat_request(self) -> "ChatCompletionRequest":
        return ChatCompletionRequest(model=self.model, messages=self.messages, tools=self.tools,
                                     tool_choice="auto" if self.tools else None)


class DetokenizeRequest(_Strict):
    """POST /detokenize (as vLLM): the text of token ids."""

    model: str
    tokens: list[NonNegInt]
