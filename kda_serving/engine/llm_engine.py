"""The synchronous engine: requests in, one step at a time, RequestOutputs out.

A step is schedule -> execute(batch) -> update: the scheduler picks the chunks and decodes, the runner
builds nothing but executes the RaggedBatch, and the update advances every request, samples, detokenizes,
checks the stop conditions and frees (or caches) what finished requests held.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass

import torch

from ..cache import KVBlockManager, PrefixCache, StateSlotPool
from ..model.batch import host_to_device
from .batch_builder import build_batch, prompt_logprob_positions
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .model_runner import ModelRunner
from .ngram import PromptLookup
from .outputs import EngineStats, RequestOutput, StepInfo
from .sampler import DeviceSample, Sampler
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .structured import StructuredDecoding

DEFAULT_MODEL_NAME = "kda-serving-tiny"
PENDING_TOKEN = -1  # stands in token_ids for a token a deferred step sampled and the host has not read yet
log = logging.getLogger(__name__)


@dataclass
class SampledStep:
    """A step's sampled chunks and their tokens (rows in chunk order, a verifying decode's one per token),
    still on the device while `deferred`."""

    chunks: list
    result: DeviceSample
    deferred: bool


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tiktoken.model")


def load_tokenizer(model):
    """The tokenizer stored beside the checkpoint; None for a checkpoint without tokenizer files (token-id
    prompts only, empty text)."""
    path = getattr(model, "path", None)
    if path is None or not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        log.warning("no tokenizer files beside the model at %s: prompts must be token ids, outputs have no text", path)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class LLMEngine:
    def __init__(self, config: EngineConfig, model=None, tokenizer=None):
        """model/tokenizer: already loaded objects to use instead of loading config.model (tests, benchmarks)."""
        if not isinstance(config, EngineConfig):
            raise TypeError(f"LLMEngine: 'config' must be an EngineConfig, got {type(config).__name__}")
        self.config = config
        self.runner = ModelRunner(config, model)
        model = self.runner.model
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        self.model_name = config.served_model_name or (
            os.path.basename(os.path.normpath(config.model)) if config.model else DEFAULT_MODEL_NAME
        )
        self.max_model_len = config.max_model_len
        self.vocab_size = model.config.vocab_size
        eos = tuple(getattr(model.config, "eos_token_ids", ()) or ())
        if not eos and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = (self.tokenizer.eos_token_id,)
        self.eos_token_ids = frozenset(eos)
        self.slots = StateSlotPool(config.num_state_slots)
        self.blocks = KVBlockManager(config.num_kv_blocks, config.block_size)
        self.prefix_cache = (
            PrefixCache(config.prefix_cache_interval, self.slots, self.blocks) if config.enable_prefix_caching else None
        )
        drafter = None
        if config.num_speculative_tokens:
            drafter = PromptLookup(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max,
                                   config.max_model_len)
        self.scheduler = Scheduler(
            config.max_num_seqs, config.max_num_batched_tokens, self.slots, self.blocks, self.prefix_cache,
            policy=config.scheduling_policy, drafter=drafter, uniform_drafts=self.runner.graphs is not None,
        )
        self.device = self.runner.device
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(config.seed)
        self.sampler = Sampler(self._generator)
        self.structured = StructuredDecoding(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self._pin = self.device.type == "cuda"
        self._seqs: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._finished = 0
        self._aborted = 0
        self._steps = 0
        self._draft_tokens = 0
        self._accepted_tokens = 0
        self._finish_reasons: dict[str, int] = {}
        self.last_step: StepInfo | None = None
        self._async = config.async_scheduling
        self._in_flight: SampledStep | None = None  # a deferred step whose tokens are not read back yet

    # ---- requests -----------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids, params: SamplingParams | None = None,
                    priority: int = 0) -> None:
        """Queues a request. Raises TypeError/ValueError for a bad id, prompt, params or priority (lower is
        served first; other than 0 only under scheduling_policy="priority")."""
        params = SamplingParams() if params is None else params
        check_priority(priority, self.config.scheduling_policy, "add_request")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"add_request: 'params' must be SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str):
            raise TypeError(f"add_request: 'request_id' must be a str, got {type(request_id).__name__}")
        if request_id in self._seqs:
            raise ValueError(f"add_request: 'request_id' {request_id!r} is already in use")
        # Checked with C-level passes (the element types as a set, min and max): a turn of a long conversation
        # resends its whole history, and the per-token Python loop this replaces cost ~2 ms at 61K tokens
        # (benchmarks/experiments/turn_host_cost.py).
        if not isinstance(prompt_token_ids, (list, tuple)) or not all(
            issubclass(kind, int) and not issubclass(kind, bool) for kind in set(map(type, prompt_token_ids))
        ):
            raise TypeError("add_request: 'prompt_token_ids' must be a list of ints")
        if not prompt_token_ids:
            raise ValueError("add_request: 'prompt_token_ids' must not be empty")
        low, high = min(prompt_token_ids), max(prompt_token_ids)
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"add_request: 'prompt_token_ids' holds {low if low < 0 else high}, outside the "
                             f"vocabulary [0, {self.vocab_size})")
        bad = [t for t, _ in params.logit_bias if t >= self.vocab_size]
        if bad:
            raise ValueError(
                f"add_request: 'logit_bias' holds token {bad[0]}, outside the vocabulary [0, {self.vocab_size})"
            )
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"add_request: the prompt has {len(prompt_token_ids)} tokens; this engine's limit is "
                f"{self.max_model_len - 1} (max_model_len {self.max_model_len} includes one generated token)"
            )
        matcher = self.structured.matcher(params.structured_output) if params.structured_output else None
        seq = Sequence(request_id, list(prompt_token_ids), params, next(self._arrivals), priority)
        seq.matcher = matcher
        if params.seed is not None and not params.greedy:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(params.seed)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params.stop)
        self._seqs[request_id] = seq
        self._prompt_tokens += len(prompt_token_ids)
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Ends a request now, freeing its slot and blocks; its final output (None if unknown or done)."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.abort(seq)
        self._aborted += 1
        self._finish_reasons["abort"] = self._finish_reasons.get("abort", 0) + 1
        return self._output(seq, [], [], [])

    def abort_all(self) -> list[RequestOutput]:
        """Aborts every unfinished request; their final outputs."""
        return [self.abort_request(request_id) for request_id in list(self._seqs)]

    def has_unfinished_requests(self) -> bool:
        """True while requests run or wait, or a step's tokens are still to be read back."""
        return bool(self._seqs) or self._in_flight is not None

    # ---- the step -----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one step; returns the outputs of the requests it advanced. With asynchronous scheduling a step's
        tokens are read back during the next step() call, after that call has queued its own forward: the
        outputs returned are then those of the previous step (docs/engine.md, Asynchronous scheduling)."""
        out = self.scheduler.schedule()
        previous, self._in_flight = self._in_flight, None
        if not out.chunks:
            return self._finish(previous) if previous is not None else []
        batch = build_batch(out, self.config.block_size, pin_memory=self._pin)
        logits = self.runner.execute(out, batch, self._pending_inputs(out, batch, previous))
        self.scheduler.update(out)
        self._steps += 1
        decodes = sum(c.num_tokens for c in out.chunks
                      if (c.num_tokens == 1 or c.drafts) and c.start >= c.seq.num_prompt_tokens)
        self.last_step = StepInfo(len(out.chunks), out.num_tokens, out.num_tokens - decodes, out.is_decode)
        self._collect_prompt_logprobs(out, logits)
        step = self._sample(out, logits, previous)
        outputs = self._finish(previous) if previous is not None else []
        if step is not None:
            if step.deferred:
                self._defer(step)
            else:
                outputs += self._finish(step)
        return outputs

    def _sample(self, out, logits, previous: SampledStep | None) -> SampledStep | None:
        """Queues the sampling of the step's sampled chunks on the device; deferred (not read back yet) when
        every one of them can run its next decode without its token on the host: all but structured outputs,
        whose grammar mask follows the tokens. A penalized request's token still on the device (previous step)
        joins its penalty counts there."""
        # logits rows, in chunk order: one per chunk, a verifying decode's one per token
        first_row, rows = [], 0
        for c in out.chunks:
            first_row.append(rows)
            rows += len(c.drafts) + 1
        sampled = [c for c in out.chunks if c.sample]
        if not sampled:
            return None
        index, params, generators, histories, constrained, matchers = [], [], [], [], [], []
        banned = ([], [])  # (row, token) pairs: what would end a request before its min_tokens
        for c, first in zip(out.chunks, first_row):
            if not c.sample:
                continue
            seq = c.seq
            if seq.matcher is not None:  # a mask per row: now, and after each draft
                constrained += range(len(index), len(index) + len(c.drafts) + 1)
                matchers.append((seq.matcher, c.drafts))
            # row j samples output token num + j: its stop tokens are banned while that is below min_tokens
            stops = self._stop_tokens(seq.params) if seq.num_output_tokens < seq.params.min_tokens else ()
            for j in range(len(c.drafts) + 1):
                if stops and seq.num_output_tokens + j < seq.params.min_tokens:
                    banned[0].extend([len(index)] * len(stops))
                    banned[1].extend(stops)
                index.append(first + j)
                params.append(seq.params)
                generators.append(seq.generator)
                histories.append(self._history(seq, c.drafts[:j]) if seq.params.penalized else None)
        allowed = (constrained, self.structured.token_mask(matchers, logits.device)) if constrained else None
        result = self.sampler.sample(logits[host_to_device(index, logits.device)], params, generators, histories,
                                     allowed, previous.result.tokens if previous is not None else None, banned)
        deferred = self._async and all(c.seq.matcher is None for c in sampled)
        if deferred:
            result.copy_to_host()
        return SampledStep(sampled, result, deferred)

    def _collect_prompt_logprobs(self, out, logits: torch.Tensor) -> None:
        """Prompt tokens' log probabilities (SamplingParams.prompt_logprobs) from the step's rows past the sampled
        ones (batch_builder.prompt_logprob_positions), into each request's Sequence.prompt_logprobs. Read back at
        once: a wait for the device that only steps carrying such a prompt pay. Done 128 rows at a time, so that
        the log-softmax's copies stay small beside the logits."""
        if not out.prompt_logprob_tokens:  # (none of the step's chunks has such positions otherwise)
            return
        wanted = [(c, positions) for c in out.chunks if len(positions := prompt_logprob_positions(c))]
        rows = logits[sum(len(c.drafts) + 1 for c in out.chunks):]
        targets = host_to_device([c.seq.token_ids[p + 1] for c, positions in wanted for p in positions],
                                 logits.device, torch.int64)
        k = max(c.seq.params.prompt_logprobs for c, _ in wanted)
        chosen, top_vals, top_ids = [], [], []
        for r in range(0, rows.shape[0], 128):
            logp = torch.log_softmax(rows[r : r + 128].float(), dim=-1)
            chosen += logp.gather(1, targets[r : r + 128, None]).squeeze(1).tolist()
            if k:
                vals, ids = logp.topk(min(k, logp.shape[1]), dim=-1)
                top_vals += vals.tolist()
                top_ids += ids.tolist()
        r = 0
        for c, positions in wanted:
            ki = c.seq.params.prompt_logprobs
            for p in positions:
                top = dict(zip(top_ids[r][:ki], top_vals[r][:ki])) if ki else {}
                c.seq.prompt_logprobs[p + 1] = (chosen[r], top)
                r += 1

    def _stop_tokens(self, params: SamplingParams) -> list[int]:
        """The tokens that end a request of these params: its stop_token_ids, and eos unless ignore_eos."""
        eos = () if params.ignore_eos else self.eos_token_ids
        return sorted(set(params.stop_token_ids) | set(eos))

    @staticmethod
    def _history(seq: Sequence, drafts: list[int]) -> tuple:
        """A penalized row's tokens for the sampler: a draft row counts the drafts before it as output; a
        placeholder's token is named by its row in the previous step's tokens, still on the device."""
        if seq.pending_row is not None:
            return seq.token_ids[:-1], seq.num_prompt_tokens, seq.pending_row
        return (seq.token_ids + drafts if drafts else seq.token_ids), seq.num_prompt_tokens

    def _defer(self, step: SampledStep) -> None:
        """Leaves the step's tokens on the device: each request still running gets a placeholder token, which
        the next step feeds from the device (_pending_inputs) and _finish replaces with the real one."""
        for row, chunk in enumerate(step.chunks):
            seq = chunk.seq
            if seq.is_finished:  # aborted, or ended by the previous step's tokens
                continue
            seq.token_ids.append(PENDING_TOKEN)
            seq.pending_row = row
            # Its last token: the scheduler gives it no further decode, which could only be thrown away.
            seq.pending_is_last = self._at_length_limit(seq)
        self._in_flight = step

    def _pending_inputs(self, out, batch, previous: SampledStep | None):
        """The decodes that feed a token the previous step sampled and this host has not read yet, as the
        runner's pending_inputs: (their batch rows, their rows in the previous step's tokens, those tokens);
        None if there are none. Their host input id becomes 0, a valid id the device copy overwrites."""
        if previous is None:
            return None
        rows, sources, row = [], [], 0
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.pending_row is not None and chunk.start == seq.num_tokens - 1:
                rows.append(row)
                sources.append(seq.pending_row)
                batch.input_ids[row] = 0
            row += chunk.num_tokens
        return (rows, sources, previous.result.tokens) if rows else None

    def _finish(self, step: SampledStep) -> list[RequestOutput]:
        """Reads the step's sampled tokens back and advances its requests (skipping those that ended since)."""
        result = step.result.result()
        outputs, row = [], 0
        for c in step.chunks:
            if not c.seq.is_finished:
                outputs.append(self._advance(c, result, row))
            row += len(c.drafts) + 1
        return outputs

    def _advance(self, chunk, result, row: int) -> RequestOutput:
        """Appends a sampled chunk's new tokens (rows row.. of result): the first, and for a verifying decode
        each next one while the token sampled before it equals the draft fed there, up to a stop. Sampling
        every position from the model's own distribution and keeping the run that matches the drafts emits
        exactly what decoding one token at a time would, in distribution (and token for token when greedy)."""
        seq, drafts = chunk.seq, chunk.drafts
        if seq.pending_row is not None:  # the placeholder a deferred step left (_defer)
            seq.token_ids.pop()
            seq.pending_row, seq.pending_is_last = None, False
        sampled = result.token_ids[row : row + len(drafts) + 1]
        accepted = 0
        while accepted < len(drafts) and sampled[accepted] == drafts[accepted]:
            accepted += 1
        new_tokens, reason = [], None
        for token in sampled[: accepted + 1]:
            seq.token_ids.append(token)
            new_tokens.append(token)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                break
        self._generation_tokens += len(new_tokens)
        if drafts:
            self.scheduler.accept(chunk, len(new_tokens))
            self._draft_tokens += len(drafts)
            self._accepted_tokens += len(new_tokens) - 1
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self._seqs[seq.request_id]
            self._finished += 1
            self._finish_reasons[reason] = self._finish_reasons.get(reason, 0) + 1
        lp = top = None
        if seq.params.logprobs is not None:
            lp = result.logprobs[row : row + len(new_tokens)]
            top = result.top_logprobs[row : row + len(new_tokens)]
        return self._output(seq, new_tokens, lp, top)

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        # stop strings count only past min_tokens (the stop tokens were not sampled before it: _sample)
        hit_stop_string = seq.detokenizer.append([token], check_stop=seq.num_output_tokens > p.min_tokens)
        if hit_stop_string or token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if seq.matcher is not None:
            # The grammar is complete (nothing may follow), or refused the token, which only a row whose mask
            # came out empty can sample: the request ends either way.
            if not seq.matcher.consume_token(token) or seq.matcher.is_stopped():
                return "stop"
        if self._at_length_limit(seq):
            return "length"
        return None

    def _at_length_limit(self, seq: Sequence) -> bool:
        """Its last token is its last: max_tokens generated, or the model length reached."""
        return seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len

    def _output(self, seq: Sequence, new_tokens, logprobs, top_logprobs) -> RequestOutput:
        finished = seq.is_finished
        new_tokens, delta = list(new_tokens), seq.detokenizer.take_delta(finished)
        # A cumulative update copies every output token so far: with 256 sequences at 2,000 tokens that was
        # more than half of a no-op model's per-step host time; a delta update costs the same at any length.
        cumulative = seq.params.output_kind == "cumulative"
        prompt_lp = prompt_top = None
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:  # the first update carries them
            seq.prompt_logprobs_sent = True
            prompt_lp = [None if e is None else e[0] for e in seq.prompt_logprobs]
            prompt_top = [None if e is None else e[1] for e in seq.prompt_logprobs]
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            output_token_ids=seq.output_token_ids if cumulative else list(new_tokens),
            new_token_ids=new_tokens,
            text=seq.detokenizer.text if cumulative else delta,
            delta_text=delta,
            finished=finished,
            finish_reason=seq.finish_reason,
            num_cached_tokens=seq.num_cached_tokens or 0,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            prompt_logprobs=prompt_lp,
            prompt_top_logprobs=prompt_top,
            accepted_prediction_tokens=seq.accepted_prediction_tokens,
            rejected_prediction_tokens=seq.rejected_prediction_tokens,
        )

    # ---- accounting ---------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        s, cache = self.scheduler, self.prefix_cache
        request_blocks = s.request_blocks()
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            state_slots_used=s.request_slots(),
            state_slots_cached=cache.num_entries if cache else 0,
            state_slots_total=self.slots.num_slots,
            kv_blocks_used=request_blocks,
            kv_blocks_cached=self.blocks.num_used - request_blocks,  # every used block not a request's is the cache's
            kv_blocks_total=self.blocks.num_blocks,
            prefix_cache_entries=cache.num_entries if cache else 0,
            prefix_cache_queries=s.prefix_queries,
            prefix_cache_hits=s.prefix_hits,
            prefix_cache_query_tokens=s.prefix_query_tokens,
            prefix_cache_hit_tokens=s.prefix_hit_tokens,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generation_tokens,
            requests_finished_total=self._finished,
            requests_aborted_total=self._aborted,
            num_preemptions_total=s.num_preemptions,
            num_steps_total=self._steps,
            spec_draft_tokens_total=self._draft_tokens,
            spec_accepted_tokens_total=self._accepted_tokens,
            finish_reasons=dict(self._finish_reasons),
        )


def check_priority(priority, policy: str, caller: str) -> None:
    """A request's priority: an int, and other than 0 only where the engine schedules by priority (under
    first come first served it would be silently ignored)."""
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise TypeError(f"{caller}: 'priority' must be an int, got {type(priority).__name__}")
    if priority and policy != "priority":
        raise ValueError(f"{caller}: 'priority' {priority} needs scheduling_policy='priority'; this engine serves "
                         "requests first come first served")
