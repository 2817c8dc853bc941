"""Running one API request's choices on the engine: fan-out, merging, metrics, and abort on every exit path.

An API request becomes one engine request per choice (`n` choices per prompt, several prompts for a batched
/v1/completions call). `generate_choices` runs them concurrently and yields their outputs as they come, tagged
with the choice index. Whatever way the consumer stops (normal end, client disconnect cancelling the task, an
exception), the `finally` aborts every engine request that has not finished, so its state slot and KV blocks are
freed at once instead of generating for nobody.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from kda_serving.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


@dataclass
class Choice:
    """One engine request: choice `index` of the API response, generated from `prompt_token_ids`."""

    index: int
    request_id: str
    prompt_token_ids: list[int]
    params: Any  # kda_serving.engine.SamplingParams
    prompt_index: int = 0  # which prompt of a batched completion request it answers
    priority: int = 0  # the request's scheduling priority (lower first)
    # max_tokens 0 with echo: the prompt is scored, nothing generated. The engine has no prefill-only request,
    # so it samples one token (params.max_tokens 1), which the outputs drop before anything reads them.
    prompt_only: bool = False
    # Filled while it runs, from the engine's delta updates (intake.sampling_params asks for them).
    output_token_ids: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    num_updates: int = 0
    logprobs: list[float] = field(default_factory=list)  # of each output token, when requested
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None  # of each prompt token (the first None), when requested
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    accepted_prediction_tokens: int = 0  # drafts from the request's prediction kept, so far
    rejected_prediction_tokens: int = 0
    _first_token_at: float | None = None
    _last_token_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


async def generate_choices(engine, choices: list[Choice], metrics: ServerMetrics, endpoint: str,
                           ) -> AsyncIterator[tuple[Choice, Any]]:
    """Yield (choice, RequestOutput) for every output of every choice, in arrival order.

    Each choice is updated (text, tokens, finish reason, cached tokens) before its output is yielded. Unfinished
    engine requests are aborted when the iteration ends for any reason; run it under `contextlib.aclosing`.
    """
    started = time.perf_counter()
    tasks: list[asyncio.Task] = []
    refused = False  # the engine rejected the request outright: nothing to count as aborted
    try:
        if len(choices) == 1:
            choice = choices[0]
            async with aclosing(engine.generate(choice.request_id, choice.prompt_token_ids, choice.params,
                                                    choice.priority)) as it:
                async for out in it:
                    yield choice, _record(choice, out, metrics, started, endpoint)
            return

        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            try:
                async with aclosing(engine.generate(choice.request_id, choice.prompt_token_ids, choice.params,
                                                    choice.priority)) as it:
                    async for out in it:
                        await queue.put((choice, out, None))
            except Exception as exc:  # handed to the consumer, which re-raises it in its own task
                await queue.put((choice, None, exc))
            finally:
                queue.put_nowait((choice, None, None))

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        running = len(tasks)
        while running:
            choice, out, exc = await queue.get()
            if exc is not None:
                raise exc
            if out is None:
                running -= 1
                continue
            yield choice, _record(choice, out, metrics, started, endpoint)
    except (TypeError, ValueError):
        refused = True
        raise
    finally:
        for task in tasks:
            task.cancel()
        for choice in choices:
            if not choice.finished:
                await _abort(engine, choice.request_id)
                if not refused:
                    metrics.aborted.labels(endpoint=endpoint).inc()


def _prompt_only(out):
    """A prompt-only choice's engine output without the token it had to sample: no tokens, text or their
    logprobs, and a finished one ends at its length limit (of 0), whatever the token was."""
    return dataclasses.replace(out, output_token_ids=[], new_token_ids=[], text="", delta_text="", logprobs=None,
                               top_logprobs=None, finish_reason="length" if out.finished else out.finish_reason)


def _record(choice: Choice, out, metrics: ServerMetrics, started: float, endpoint: str):
    """Fold one engine output into the choice and the latency/token metrics; returns the output as the
    consumer sees it (a prompt-only choice's without its sampled token)."""
    if choice.prompt_only:
        out = _prompt_only(out)
    now = time.perf_counter()
    new_tokens = len(out.new_token_ids)
    if new_tokens:
        if choice._first_token_at is None:
            choice._first_token_at = now
            metrics.time_to_first_token.observe(now - started)
        else:
            gap = (now - choice._last_token_at) / new_tokens
            for _ in range(new_tokens):
                metrics.inter_token_latency.observe(gap)
        choice._last_token_at = now
        metrics.generation_tokens.inc(new_tokens)
    choice.output_token_ids += out.new_token_ids
    choice.text_parts.append(out.delta_text)
    choice.num_cached_tokens = int(out.num_cached_tokens or 0)
    choice.accepted_prediction_tokens = int(getattr(out, "accepted_prediction_tokens", 0) or 0)
    choice.rejected_prediction_tokens = int(getattr(out, "rejected_prediction_tokens", 0) or 0)
    choice.num_updates += 1
    if out.logprobs:
        choice.logprobs.extend(out.logprobs)
    if out.top_logprobs:
        choice.top_logprobs.extend(out.top_logprobs)
    if out.prompt_logprobs is not None:
        choice.prompt_logprobs, choice.prompt_top_logprobs = out.prompt_logprobs, out.prompt_top_logprobs
    if out.finished:
        choice.finish_reason = out.finish_reason or "stop"
        metrics.requests.labels(endpoint=endpoint, finish_reason=choice.finish_reason).inc()
        metrics.request_latency.observe(now - started)
    return out


async def _abort(engine, request_id: str) -> None:
    try:
        result = engine.abort(request_id)
        if inspect.isawaitable(result):
            await result
    except Exception:  # an abort failing must not mask why we abort; the engine logs its own state
        logger.exception("engine.abort(%s) failed", request_id)
