"""One request's state as the engine tracks it."""

from __future__ import annotations

import enum
from typing import Any

from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted and to be recomputed)
    RUNNING = "running"  # holds a state slot and KV blocks
    FINISHED = "finished"


class Sequence:
    """A request: its tokens, how many of them the caches hold, and the cache resources it owns.

    token_ids = prompt + output. The engine computes token_ids[num_computed_tokens:] (a prefill, possibly in
    chunks, then one token per decode step); the logits of the last token give the next output token.
    state_slot and block_table are owned by the request while it runs (block_table may begin with blocks it
    shares, read-only, with the prefix cache). A block_table list only grows by appends; the scheduler replaces
    the list, never edits it, when the request is (re)admitted or released, which is what lets batch_builder
    convert only its new blocks each step.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival: int,
                 priority: int = 0):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.params = params
        self.arrival = arrival
        self.priority = priority  # the "priority" scheduling policy serves lower values first
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens: int | None = None  # prompt tokens restored from the prefix cache (first admission)
        self.state_slot: int | None = None
        self.block_table: list[int] = []
        self.block_row_cache = None  # batch_builder.block_row's int32 copy: (the list, its length then, tensor)
        self.pinned = None  # the prefix-cache node whose state this request restores in its next step
        self.cache_cursor = None  # its place in the prefix-cache tree while it runs (cache.PathCursor)
        self.branch_point: int | None = None  # where the prompt leaves a cached path (a save point)
        self.finish_reason: str | None = None
        self.generator: Any = None  # the per-request torch.Generator of a seeded request
        self.detokenizer: Any = None
        self.matcher: Any = None  # the grammar matcher of a structured output (engine/structured.py)
        self.ngram: Any = None  # the n-gram index of its tokens that draft proposals read (engine/ngram.py)
        self.draft_record: Any = None  # how its recent drafts fared (engine/ngram.py DraftRecord)
        self.prediction_index: Any = None  # its prediction's n-grams (engine/ngram.py PredictionIndex)
        self.drafts_from_prediction = False  # whether its last drafts came from the prediction
        self.accepted_prediction_tokens = 0  # drafts from the prediction that verification kept
        self.rejected_prediction_tokens = 0  # ... and that it did not
        # SamplingParams.prompt_logprobs: per prompt token, (its log probability, {token: logprob} of the most
        # likely ones), filled as the prompt's chunks run (the first stays None); None when not asked for
        self.prompt_logprobs: list[tuple[float, dict[int, float]] | None] | None = None
        if params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(prompt_token_ids)
        self.prompt_logprobs_sent = False
        # Asynchronous scheduling: while the step that sampled its last token is deferred, token_ids ends with
        # a placeholder, pending_row is that token's row in the step's samples and pending_is_last says it ends
        # the request (max_tokens or the model length). None/False otherwise.
        self.pending_row: int | None = None
        self.pending_is_last = False
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Its prompt's logprobs are asked for and not yet sent (a request resumed after its first update
        computes its prompt again without them)."""
        return self.prompt_logprobs is not None and not self.prompt_logprobs_sent

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens known on the host (not a pending placeholder)."""
        end = len(self.token_ids) - (self.pending_row is not None)
        return self.token_ids[len(self.prompt_token_ids) : end]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, slot={self.state_slot}, blocks={len(self.block_table)})"
        )
