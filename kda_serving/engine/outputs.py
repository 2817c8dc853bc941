"""What the engine hands back: per-request outputs and engine-wide counters."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """One update of one request. `output_token_ids` and `text` are cumulative (SamplingParams.output_kind
    "cumulative", the default) or, for "delta", equal to `new_token_ids` and `delta_text`, which with `logprobs`
    and `top_logprobs` always cover only what this update added.

    finish_reason: "stop" (eos, a stop token or a stop string), "length" (max_tokens or the model's length
    limit), "abort", or None while running. num_cached_tokens: prompt tokens restored from the prefix cache.
    logprobs[i]: log probability of new_token_ids[i] (None unless SamplingParams.logprobs is set);
    top_logprobs[i]: {token_id: logprob} of the SamplingParams.logprobs most likely tokens at that step.
    prompt_logprobs / prompt_top_logprobs: the same for every prompt token (None for the first), in the
    request's first update only, where SamplingParams.prompt_logprobs asks for them.
    accepted_prediction_tokens / rejected_prediction_tokens: so far, the drafts taken from
    SamplingParams.prediction that verification kept / did not keep (0 without a prediction or speculation).
    """

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    new_token_ids: list[int]
    text: str
    delta_text: str
    finished: bool
    finish_reason: str | None
    num_cached_tokens: int = 0
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


@dataclass(frozen=True)
class StepInfo:
    """What the last engine step ran (for benchmarks and metrics)."""

    num_seqs: int
    num_tokens: int  # new tokens in the ragged batch
    num_prefill_tokens: int  # of which prompt (chunk) tokens; the rest are decodes
    is_decode: bool


@dataclass
class EngineStats:
    """A snapshot of the engine's queues, memory and counters (totals since start).

    `*_used` counts what running requests hold; `*_cached` what only the prefix cache holds (reclaimable at
    any time). With no request running, state_slots_used == kv_blocks_used == 0.
    """

    num_running: int = 0
    num_waiting: int = 0
    state_slots_used: int = 0
    state_slots_cached: int = 0
    state_slots_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_cached: int = 0
    kv_blocks_total: int = 0
    prefix_cache_entries: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_query_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    requests_finished_total: int = 0
    requests_aborted_total: int = 0
    num_preemptions_total: int = 0
    num_steps_total: int = 0
    spec_draft_tokens_total: int = 0  # draft tokens verified (speculative decoding)
    spec_accepted_tokens_total: int = 0  # of which accepted: tokens gained over one per step
    finish_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def spec_acceptance_rate(self) -> float:
        """Fraction of verified draft tokens that were accepted (speculative decoding)."""
        return self.spec_accepted_tokens_total / self.spec_draft_tokens_total if self.spec_draft_tokens_total else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Fraction of queried prompt tokens served from the cache."""
        return self.prefix_cache_hit_tokens / self.prefix_cache_query_tokens if self.prefix_cache_query_tokens else 0.0
