"""Log probabilities in the two shapes OpenAI uses: the legacy completions one and the chat one.

The engine gives, for each new token, its log probability and a {token_id: logprob} dict of the most likely
alternatives; here tokens become the text they decode to.
"""

from __future__ import annotations


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[float | None],
                        top: list[dict[int, float] | None], text_offset: int) -> dict:
    """/v1/completions `logprobs` for these tokens; `text_offset` is where the first one starts in the text. A
    None (an echoed prompt's first token) stays null."""
    tokens = [_token_text(tokenizer, t) for t in token_ids]
    offsets = []
    for text in tokens:
        offsets.append(text_offset)
        text_offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": list(logprobs),
        "top_logprobs": [None if alts is None else {_token_text(tokenizer, t): lp for t, lp in alts.items()}
                         for alts in top] or None,
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[float], top: list[dict[int, float]]) -> dict:
    """Chat `logprobs` ({"content": [...]}) for these tokens."""
    content = []
    for i, (token_id, lp) in enumerate(zip(token_ids, logprobs)):
        alts = top[i] if i < len(top) else {}
        content.append({**_chat_token(tokenizer, token_id, lp),
                        "top_logprobs": [_chat_token(tokenizer, t, a) for t, a in alts.items()]})
    return {"content": content, "refusal": None}


def _chat_token(tokenizer, token_id: int, logprob: float) -> dict:
    text = _token_text(tokenizer, token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
