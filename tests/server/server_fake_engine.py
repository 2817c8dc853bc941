"""A stand-in engine with AsyncLLMEngine's interface, for in-process server tests that must run in milliseconds.

It "generates" a deterministic cycle of lowercase letters, holds one of `max_num_seqs` slots per running
request (others wait), reports the longest prompt prefix it has seen before as cached tokens, and records
aborts, so the HTTP layer's bookkeeping (queueing, freeing, usage) can be checked exactly.
"""

from __future__ import annotations

import asyncio

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kda_serving.engine.outputs import EngineStats, RequestOutput

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


KIMI_TOOL_MARKERS = ["<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                     "<|tool_call_argument_begin|>", "<|tool_call_end|>"]
# A reply in Kimi K2's tool-call format (with tool_markers=True each marker is one token): text, then one call.
KIMI_REPLY = ('Checking.<|tool_calls_section_begin|><|tool_call_begin|>functions.search:0<|tool_call_argument_begin|>'
              '{"q": "kda"}<|tool_call_end|><|tool_calls_section_end|>')


def byte_tokenizer(extra_specials: list[str] = ()) -> PreTrainedTokenizerFast:
    """One token per byte plus a few specials: tiny, offline, and with a chat template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>",
                                                          "<|developer|>", "<|end|>", *extra_specials]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


class FakeEngine:
    model_name = "fake-kda"

    def __init__(self, max_num_seqs: int = 4, max_model_len: int = 256, token_delay: float = 0.001,
                 tool_markers: bool = False):
        self.tokenizer = byte_tokenizer(KIMI_TOOL_MARKERS if tool_markers else [])
        self.script: list[int] | None = None  # when set, the tokens every request outputs (then "stop")
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.token_delay = token_delay
        self.running: set[str] = set()
        self.waiting: set[str] = set()
        self.aborted: list[str] = []
        self.seen_prompts: list[list[int]] = []
        self.seen_params: list = []  # every request's SamplingParams, in arrival order
        self.seen_priorities: list[int] = []
        self.started = False
        self.fail_with: Exception | None = None  # raised by generate() before any output, when set
        self.prediction_counts = (0, 0)  # (accepted, rejected) prediction drafts every output reports
        self.gate: asyncio.Event | None = None  # if given, a running request waits for it before its first token
        self._slots: asyncio.Semaphore | None = None
        self._abort_events: dict[str, asyncio.Event] = {}

    async def start(self):
        self._slots = asyncio.Semaphore(self.max_num_seqs)
        self.started = True

    async def shutdown(self):
        self.started = False

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        if request_id in self._abort_events:
            self._abort_events[request_id].set()

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.running), num_waiting=len(self.waiting),
                           state_slots_used=len(self.running), state_slots_total=self.max_num_seqs,
                           kv_blocks_used=4 * len(self.running), kv_blocks_total=4 * self.max_num_seqs)

    def _cached_prefix(self, prompt: list[int]) -> int:
        best = 0
        for seen in self.seen_prompts:
            n = 0
            for a, b in zip(seen, prompt):
                if a != b:
                    break
                n += 1
            best = max(best, min(n, len(prompt) - 1))
        return best

    async def generate(self, request_id, prompt_token_ids, params, priority=0):
        if self.fail_with is not None:
            raise self.fail_with
        self.seen_params.append(params)
        self.seen_priorities.append(priority)
        aborted = self._abort_events[request_id] = asyncio.Event()
        self.waiting.add(request_id)
        try:
            async with self._slots:
                self.waiting.discard(request_id)
                self.running.add(request_id)
                if self.gate is not None:  # held in flight, deterministically, until the test opens the gate
                    await self.gate.wait()
                cached = self._cached_prefix(prompt_token_ids)
                out_ids: list[int] = []
                text = ""
                while True:
                    await asyncio.sleep(self.token_delay)
                    if aborted.is_set():
                        yield RequestOutput(request_id, prompt_token_ids, out_ids, [], text, "", True, "abort", cached)
                        return
                    if self.script is not None:
                        new = self.script[len(out_ids)]
                    else:
                        new = self.tokenizer.convert_tokens_to_ids(chr(ord("a") + len(out_ids) % 26))
                    out_ids = out_ids + [new]
                    delta = self.tokenizer.decode([new], skip_special_tokens=True)
                    text += delta
                    stop = next((s for s in params.stop if s in text), None)
                    reason = None
                    if stop is not None:
                        delta = delta[: len(delta) - (len(text) - text.index(stop))]
                        text, reason = text[: text.index(stop)], "stop"
                    elif len(out_ids) >= params.max_tokens:
                        reason = "length"
                    elif self.script is not None and len(out_ids) == len(self.script):
                        reason = "stop"
                    lp = [-0.5] if params.logprobs is not None else None
                    top = [{new: -0.5, new + 1: -1.5}] if params.logprobs is not None else None
                    prompt_lp = prompt_top = None
                    if params.prompt_logprobs is not None and len(out_ids) == 1:  # the first update carries them
                        prompt_lp = [None] + [-1.0 - 0.25 * i for i in range(1, len(prompt_token_ids))]
                        prompt_top = [None] + [{t: -1.0} for t in prompt_token_ids[1:]]
                    yield RequestOutput(request_id, prompt_token_ids, list(out_ids), [new], text, delta,
                                        reason is not None, reason, cached, lp, top, prompt_lp, prompt_top,
                                        *self.prediction_counts)
                    if reason is not None:
                        self.seen_prompts.append(list(prompt_token_ids) + out_ids)
                        return
        finally:
            self.waiting.discard(request_id)
            self.running.discard(request_id)
            self._abort_events.pop(request_id, None)
