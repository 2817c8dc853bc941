"""How one request samples and when it stops."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

MAX_LOGPROBS = 20  # top alternatives one token may report; the OpenAI API allows at most 20
OUTPUT_KINDS = ("cumulative", "delta")  # what each RequestOutput of a request carries (SamplingParams)
STRUCTURED_KINDS = ("json_object", "json_schema", "regex")  # structured_output[0]: engine/structured.py


def _check_structured(kind, spec) -> None:
    """The checks of a structured_output that need no tokenizer (the engine compiles the grammar)."""
    if kind not in STRUCTURED_KINDS:
        raise ValueError(f"SamplingParams: 'structured_output' kind must be one of {STRUCTURED_KINDS}, got {kind!r}")
    if not isinstance(spec, str):
        raise TypeError(f"SamplingParams: 'structured_output' spec must be a str, got {type(spec).__name__}")
    if kind == "json_schema":
        try:
            schema = json.loads(spec)
        except ValueError as exc:
            raise ValueError(f"SamplingParams: the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("SamplingParams: a JSON schema must be an object (or a boolean)")
    if kind == "regex" and not spec:
        raise ValueError("SamplingParams: 'structured_output' regex must not be empty")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping for one request.

    temperature 0 is greedy (top_p/top_k/min_p/seed are then ignored). top_k 0 means no top-k cut; min_p cuts
    the tokens less likely than min_p times the most likely one (0: no cut). `stop` strings end the text at (not
    including) the first match; `stop_token_ids` and the tokenizer's eos end it after that token (eos unless
    ignore_eos). Before `min_tokens` output tokens none of them ends it: eos and stop_token_ids are not sampled
    and stop strings are not looked for (vLLM's rule). `logprobs` None returns none; k >= 0 returns the chosen
    token's log probability and the k most likely alternatives for every new token; `prompt_logprobs` k does the
    same for every prompt token after the first (vLLM's field: such a request computes its whole prompt, with
    no prefix-cache hit, and its first update carries them). `seed` makes a sampled request
    reproducible regardless of what it is batched with. Penalties, on the logits the token is chosen from (not
    on the logprobs reported): `repetition_penalty` r divides a positive logit by r and multiplies a negative
    one by r for every token already in the prompt or the output (1 = off); then `frequency_penalty` times
    the token's count in the output and `presence_penalty` for its presence there are subtracted (0 = off;
    OpenAI's range [-2, 2]). `logit_bias` {token id: bias in [-100, 100]} is added to those logits last (-100
    all but bans a token). `output_kind` "cumulative" gives every update the
    output tokens and text so far; "delta" only what the update added (output_token_ids == new_token_ids,
    text == delta_text), which keeps an update's cost independent of the length generated: the server and
    LLM.generate ask for it. `structured_output` constrains the output to a language: ("json_object", "") any
    JSON object, ("json_schema", schema as a JSON string), ("regex", pattern); the request stops when the
    grammar is complete (engine/structured.py). `prediction`: token ids the output is expected to be (OpenAI's
    predicted outputs, e.g. a file being edited); with speculative decoding on, drafts come from it first
    (engine/ngram.py), so the parts of the output that follow it take one verifying step per few tokens. The
    output is the same with or without it.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs; a dict is accepted and converted
    output_kind: str = "cumulative"
    structured_output: tuple[str, str] | None = None  # (kind, spec): engine/structured.py
    prediction: tuple[int, ...] = ()  # the expected output's token ids (drafts for speculative decoding)

    def __post_init__(self):
        if not _is_int(self.max_tokens):
            raise TypeError(f"SamplingParams: 'max_tokens' must be an int, got {type(self.max_tokens).__name__}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams: 'max_tokens' must be at least 1, got {self.max_tokens}")
        if not _is_number(self.temperature):
            raise TypeError(f"SamplingParams: 'temperature' must be a number, got {type(self.temperature).__name__}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"SamplingParams: 'temperature' must be finite and >= 0, got {self.temperature}")
        if not _is_number(self.top_p):
            raise TypeError(f"SamplingParams: 'top_p' must be a number, got {type(self.top_p).__name__}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"SamplingParams: 'top_p' must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k):
            raise TypeError(f"SamplingParams: 'top_k' must be an int, got {type(self.top_k).__name__}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams: 'top_k' must be >= 0 (0 = no limit), got {self.top_k}")
        if not _is_number(self.min_p):
            raise TypeError(f"SamplingParams: 'min_p' must be a number, got {type(self.min_p).__name__}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"SamplingParams: 'min_p' must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not _is_int(self.seed):
            raise TypeError(f"SamplingParams: 'seed' must be an int or None, got {type(self.seed).__name__}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise ValueError(f"SamplingParams: 'seed' must be in [0, 2**63), got {self.seed}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise TypeError("SamplingParams: 'stop' must be a string or a sequence of strings")
        if any(s == "" for s in stop):
            raise ValueError("SamplingParams: 'stop' strings must not be empty")
        object.__setattr__(self, "stop", tuple(stop))
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) for t in ids):
            raise TypeError("SamplingParams: 'stop_token_ids' must be a sequence of ints")
        if any(t < 0 for t in ids):
            raise ValueError("SamplingParams: 'stop_token_ids' must be non-negative token ids")
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"SamplingParams: 'ignore_eos' must be a bool, got {type(self.ignore_eos).__name__}")
        if not _is_int(self.min_tokens):
            raise TypeError(f"SamplingParams: 'min_tokens' must be an int, got {type(self.min_tokens).__name__}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"SamplingParams: 'min_tokens' must be in [0, max_tokens={self.max_tokens}], got "
                             f"{self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is None:
                continue
            if not _is_int(value):
                raise TypeError(f"SamplingParams: '{name}' must be an int or None, got {type(value).__name__}")
            if not (0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"SamplingParams: '{name}' must be in [0, {MAX_LOGPROBS}], got {value}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value):
                raise TypeError(f"SamplingParams: '{name}' must be a number, got {type(value).__name__}")
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"SamplingParams: '{name}' must be in [-2, 2], got {value}")
        if not _is_number(self.repetition_penalty):
            raise TypeError(
                f"SamplingParams: 'repetition_penalty' must be a number, got {type(self.repetition_penalty).__name__}"
            )
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(
                f"SamplingParams: 'repetition_penalty' must be finite and > 0, got {self.repetition_penalty}"
            )
        bias = self.logit_bias
        if isinstance(bias, dict):
            bias = tuple(bias.items())
        if not isinstance(bias, (list, tuple)) or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and _is_int(pair[0]) and _is_number(pair[1])
            for pair in bias
        ):
            raise TypeError("SamplingParams: 'logit_bias' must map token ids (int) to biases (numbers)")
        bias = tuple(sorted((int(t), float(b)) for t, b in bias))
        if any(t < 0 for t, _ in bias) or len({t for t, _ in bias}) != len(bias):
            raise ValueError("SamplingParams: 'logit_bias' token ids must be distinct and non-negative")
        if not all(-100.0 <= b <= 100.0 for _, b in bias):  # NaN fails too
            raise ValueError("SamplingParams: 'logit_bias' values must be in [-100, 100]")
        object.__setattr__(self, "logit_bias", bias)
        prediction = self.prediction
        if not isinstance(prediction, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in prediction):
            raise TypeError("SamplingParams: 'prediction' must be a sequence of non-negative token ids")
        object.__setattr__(self, "prediction", tuple(prediction))
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"SamplingParams: 'output_kind' must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")
        if self.structured_output is not None:
            so = self.structured_output
            if not isinstance(so, (list, tuple)) or len(so) != 2:
                raise TypeError("SamplingParams: 'structured_output' must be None or a (kind, spec) pair")
            _check_structured(*so)
            object.__setattr__(self, "structured_output", tuple(so))
            if self.min_tokens:  # the grammar says where the output may end; a ban on eos could leave no token
                raise ValueError("SamplingParams: 'min_tokens' cannot be combined with 'structured_output'")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

