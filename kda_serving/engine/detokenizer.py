"""Incremental detokenization with stop strings.

Decoding token by token gets spaces and multi-byte characters wrong, and decoding everything each step is
quadratic. So each step decodes a short window: the tokens since `prefix_offset`, compared with the same
window without the new tokens; the difference is the new text. A window that ends in the replacement
character (an incomplete UTF-8 sequence) waits for more tokens. While stop strings are set, the last
(longest stop - 1) characters are held back from the stream, so text that a stop string later cuts is never
sent.
"""

from __future__ import annotations

_PROMPT_CONTEXT = 5  # prompt tokens decoded with the first outputs, so the first word gets its leading space


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""
        self._sent = 0  # characters of text already handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def append(self, token_ids: list[int]) -> bool:
        """Adds output tokens; True when the text now contains a stop string (and was cut before it)."""
        if self.tokenizer is None:
            return False
        self._ids += token_ids
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return False
        new = full_text[len(prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        search_from = max(0, len(self.text) - self._holdback)
        self.text += new
        hits = [at for at in (self.text.find(s, search_from) for s in self.stop) if at >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def take_delta(self, finished: bool) -> str:
        """The text not yet handed out; all of it once finished, else short of a possible stop-string start."""
        upto = len(self.text) if finished or not self.stop else max(self._sent, len(self.text) - self._holdback)
        delta = self.text[self._sent : upto]
        self._sent = upto
        return delta
