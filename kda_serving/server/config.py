"""The HTTP layer's own settings (the engine has its EngineConfig), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    """Limits and access control of one server.

    api_key: when set, every /v1 request needs `Authorization: Bearer <api_key>` (/health and /metrics stay
    open for probes and scrapers). max_request_bytes: larger request bodies get a 413 before they are parsed.
    max_prompt_tokens: longer prompts get a 400; None means the engine's max_model_len minus one generated
    token. max_n: the most choices (n times the number of prompts) one request may ask for.
    tool_call_parser: how `tool_choice: "auto"` replies are read for tool calls (server/tool_parsers.py):
    "auto" picks the format whose markers the model's tokenizer has (Kimi-Linear: kimi_k2), "none" refuses
    "auto" requests, or a format's name. max_stored_response_bytes: the JSON text of the /v1/responses answers
    kept for `previous_response_id` and retrieval (server/response_store.py), least recently used evicted
    first; 0 stores none. max_concurrent_requests: the most generation requests (/v1/completions,
    /v1/chat/completions, /v1/responses, background ones included) in flight at once; past it a request gets a
    429 with Retry-After without reaching the engine (server/admission.py). 0, the default, means no limit, as
    in vLLM: the engine already queues what its batch cannot take, and the right bound depends on the
    deployment (the clients' patience, prompt sizes, a proxy's own limits), so it is the operator's to set.
    """

    api_key: str | None = None
    max_request_bytes: int = 4 << 20
    max_prompt_tokens: int | None = None
    max_n: int = 16
    tool_call_parser: str = "auto"
    max_stored_response_bytes: int = 64 << 20
    max_concurrent_requests: int = 0

    def __post_init__(self):
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("ServerConfig: 'api_key' must be a non-empty string or None")
        for name in ("max_request_bytes", "max_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ServerConfig: '{name}' must be a positive int, got {value!r}")
        for name in ("max_stored_response_bytes", "max_concurrent_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ServerConfig: '{name}' must be an int >= 0, got {value!r}")
        from .tool_parsers import TOOL_PARSERS

        if self.tool_call_parser not in ("auto", "none", *TOOL_PARSERS):
            raise ValueError(f"ServerConfig: 'tool_call_parser' must be one of auto, none, {', '.join(TOOL_PARSERS)}; "
                             f"got {self.tool_call_parser!r}")
        limit = self.max_prompt_tokens
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ValueError(f"ServerConfig: 'max_prompt_tokens' must be a positive int or None, got {limit!r}")
