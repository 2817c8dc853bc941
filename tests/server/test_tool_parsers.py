"""Tool calls in Kimi K2's format (server/tool_parsers.py), split on the marker tokens' ids."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from server_fake_engine import KIMI_TOOL_MARKERS, byte_tokenizer

from kda_serving.server.tool_parsers import KimiK2ToolCalls, tool_parser_for

SB, SE, CB, AB, CE = KIMI_TOOL_MARKERS


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer(KIMI_TOOL_MARKERS)


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_text_then_calls(tokenizer):
    parser = KimiK2ToolCalls(tokenizer)
    reply = parser.parse(ids(tokenizer, f'Let me check.{SB}{CB}functions.get_weather:0{AB}{{"city": "Paris"}}{CE}'
                                        f"{CB}functions.now:1{AB}{{}}{CE}{SE}"))
    assert tokenizer.decode(reply.content_ids) == "Let me check." and reply.complete
    assert reply.calls == [
        {"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "functions.now:1", "type": "function", "function": {"name": "now", "arguments": "{}"}},
    ]


def test_plain_text_has_no_calls(tokenizer):
    parser = KimiK2ToolCalls(tokenizer)
    reply = parser.parse(ids(tokenizer, "Just text: functions.f:0 {}"))
    assert not reply.has_calls and reply.complete and tokenizer.decode(reply.content_ids).startswith("Just")
    assert parser.section_start(ids(tokenizer, "no section")) is None


@pytest.mark.parametrize("tail, calls", [
    (f"{CB}functions.a:0{AB}{{}}{CE}{CB}functions.b:1{AB}{{\"x\"", 1),  # cut inside the second call
    (f"{CB}functions.a:0{AB}{{}}{CE}", 1),  # the section never closed
    (f"{CB}functions.a:0", 0),  # cut in the first header
    ("", 0),  # only the section marker
])
def test_cut_short_keeps_complete_calls(tokenizer, tail, calls):
    reply = KimiK2ToolCalls(tokenizer).parse(ids(tokenizer, f"x{SB}{tail}"))
    assert len(reply.calls) == calls and not reply.complete
    assert tokenizer.decode(reply.content_ids) == "x"


def test_parser_selection(tokenizer):
    assert isinstance(tool_parser_for(tokenizer, "auto"), KimiK2ToolCalls)
    assert tool_parser_for(tokenizer, "none") is None
    plain = byte_tokenizer()
    assert tool_parser_for(plain, "auto") is None
    with pytest.raises(ValueError, match="no single token"):
        tool_parser_for(plain, "kimi_k2")
    with pytest.raises(ValueError, match="unknown"):
        tool_parser_for(tokenizer, "hermes")


def test_markers_found_by_name_when_encode_splits_them(tokenizer):
    # Tokenizers whose encode() reads special tokens in text as plain text (tiktoken-based ones may) still
    # know the markers by name.
    class PlainTextEncode:
        unk_token_id = None

        def __init__(self, inner):
            self.inner = inner

        def convert_tokens_to_ids(self, token):
            return self.inner.convert_tokens_to_ids(token)

        def decode(self, ids, **kw):
            return self.inner.decode(ids, **kw)

        def encode(self, text, add_special_tokens=False):  # every character a token
            return [self.inner.convert_tokens_to_ids("a")] * len(text)

    parser = tool_parser_for(PlainTextEncode(tokenizer), "auto")
    assert isinstance(parser, KimiK2ToolCalls) and parser.section_begin == tokenizer.convert_tokens_to_ids(SB)


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.sampled_from([SB, SE, CB, AB, CE, "functions.f:0", "functions.:1", ":", "{}", "x", "é"]),
                       max_size=14))
def test_any_reply_parses_without_error(pieces):
    # Whatever a model writes around the markers: no exception, the content is the reply up to the first
    # section marker, and every call it returns has a name and came from a complete begin..end run.
    tok = byte_tokenizer(KIMI_TOOL_MARKERS)
    parser = KimiK2ToolCalls(tok)
    token_ids = ids(tok, "".join(pieces))
    reply = parser.parse(token_ids)
    start = parser.section_start(token_ids)
    assert reply.content_ids == token_ids[: len(token_ids) if start is None else start]
    assert len(reply.calls) <= sum(1 for p in pieces if p == CE)
    assert all(c["function"]["name"] for c in reply.calls)
