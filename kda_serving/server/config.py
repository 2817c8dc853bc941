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
    first; 0 stores none.
    """

    api_key: str | None = None
    max_request_bytes: int = 4 << 20
    max_prompt_tokens: int | None = None
    max_n: int = 16
    tool_call_parser: str = "auto"
    max_stored_response_bytes: int = 64 << 20

    def __post_init__(self):
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("ServerConfig: 'api_key' must be a non-empty string or None")
        for name in ("max_request_bytes", "max_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ServerConfig: '{name}' must be a positive int, got {value!r}")
        value = self.max_stored_response_bytes
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"ServerConfig: 'max_stored_response_bytes' must be an int >= 0, got {value!r}")
        from .tool_parsers import TOOL_PARSERS

        if self.tool_call_parser not in ("auto", "none", *TOOL_PARSERS):
            raise ValueError(f"ServerConfig: 'tool_call_parser' must be one of auto, none, {', '.join(TOOL_PARSERS)}; "
                             f"got {self.tool_call_parser!r}")
        limit = self.max_prompt_tokens
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ValueError(f"ServerConfig: 'max_prompt_tokens' must be a positive int or None, got {limit!r}")
