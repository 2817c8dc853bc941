"""Tool calls in a model's own output format, for `tool_choice: "auto"`: the reply's token ids -> its text
content and its calls.

Kimi-Linear-Instruct writes tool calls as Kimi K2 does, after any text:

    <|tool_calls_section_begin|>
    <|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>
    ...
    <|tool_calls_section_end|>

Every marker is one special token, so the reply is split on token ids, not on text (the detokenizer drops
special tokens from the text). The call id is the header itself (`functions.get_weather:0`), as the model's
chat template writes ids back into the history; the name is the header without its `functions.` namespace
and `:index` suffix. A reply whose section is cut short (max_tokens) keeps the calls that are complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ParsedReply:
    content_ids: list[int]  # the tokens before the tool-call section (all of them without one)
    calls: list[dict] = field(default_factory=list)  # OpenAI tool calls: {"id", "type", "function": {...}}
    complete: bool = True  # False when a section was opened but not properly closed

    @property
    def has_calls(self) -> bool:
        return bool(self.calls)


class KimiK2ToolCalls:
    """The Kimi K2 / Kimi-Linear tool-call format (above)."""

    name = "kimi_k2"
    SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
    CALL_BEGIN, ARGUMENT_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"

    def __init__(self, tokenizer):
        ids = {}
        for marker in (self.SECTION_BEGIN, self.SECTION_END, self.CALL_BEGIN, self.ARGUMENT_BEGIN, self.CALL_END):
            token_id = _single_token_id(tokenizer, marker)
            if token_id is None:
                raise ValueError(f"{self.name}: the tokenizer has no single token {marker!r}")
            ids[marker] = token_id
        self.tokenizer = tokenizer
        self.section_begin, self.section_end = ids[self.SECTION_BEGIN], ids[self.SECTION_END]
        self.call_begin, self.argument_begin, self.call_end = (ids[self.CALL_BEGIN], ids[self.ARGUMENT_BEGIN],
                                                               ids[self.CALL_END])

    def section_start(self, token_ids: list[int]) -> int | None:
        """Where the tool-call section begins in token_ids (None: not yet, or never)."""
        try:
            return token_ids.index(self.section_begin)
        except ValueError:
            return None

    def parse(self, token_ids: list[int]) -> ParsedReply:
        start = self.section_start(token_ids)
        if start is None:
            return ParsedReply(list(token_ids))
        reply = ParsedReply(list(token_ids[:start]), complete=False)
        i, n = start + 1, len(token_ids)
        while i < n and token_ids[i] == self.call_begin:
            header_end = _find(token_ids, self.argument_begin, i + 1)
            call_end = _find(token_ids, self.call_end, header_end + 1) if header_end is not None else None
            if call_end is None:
                return reply  # cut short inside a call
            header = self._text(token_ids[i + 1 : header_end]).strip()
            arguments = self._text(token_ids[header_end + 1 : call_end]).strip()
            name = header.split(".", 1)[1] if header.startswith("functions.") else header
            name = name.rsplit(":", 1)[0] if ":" in name else name
            if not name:
                return reply
            reply.calls.append({"id": header, "type": "function", "function": {"name": name, "arguments": arguments}})
            i = call_end + 1
        reply.complete = i < n and token_ids[i] == self.section_end
        return reply

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


TOOL_PARSERS = {KimiK2ToolCalls.name: KimiK2ToolCalls}


def tool_parser_for(tokenizer, name: str | None = "auto"):
    """The parser `name` for this tokenizer; "auto": the first whose markers the tokenizer has (None if none);
    None / "none": no parser. Raises ValueError for an unknown name or a tokenizer without its markers."""
    if name in (None, "none") or tokenizer is None:
        return None
    if name == "auto":
        for parser in TOOL_PARSERS.values():
            try:
                return parser(tokenizer)
            except ValueError:
                continue
        return None
    if name not in TOOL_PARSERS:
        raise ValueError(f"tool parser {name!r} is unknown (known: {', '.join(TOOL_PARSERS)})")
    return TOOL_PARSERS[name](tokenizer)


def _single_token_id(tokenizer, text: str) -> int | None:
    """The id of the token spelled `text`: looked up as a token first (tokenizers whose encode() reads special
    tokens in text as plain text, as tiktoken-based ones may, still know them by name), else by encoding."""
    try:
        token_id = tokenizer.convert_tokens_to_ids(text)
    except (AttributeError, KeyError, TypeError, ValueError):
        token_id = None
    if (isinstance(token_id, int) and token_id >= 0 and token_id != getattr(tokenizer, "unk_token_id", None)
            and tokenizer.decode([token_id], skip_special_tokens=False) == text):
        return token_id
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def _find(ids: list[int], token: int, start: int) -> int | None:
    try:
        return ids.index(token, start)
    except ValueError:
        return None
