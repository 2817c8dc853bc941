"""Offline generation: LLM(model).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

import dataclasses

from .config import EngineConfig
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class LLM:
    """Runs batches of prompts to completion.

        llm = LLM()                                   # the embedded default model on the CPU
        outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=8))
        print(outs[0].text)

    model: a checkpoint directory or None; **config: any EngineConfig field. `model_obj`/`tokenizer` take an
    already loaded model (tests, benchmarks).
    """

    def __init__(self, model: str | None = None, *, model_obj=None, tokenizer=None, **config):
        self.engine = LLMEngine(EngineConfig(model=model, **config), model=model_obj, tokenizer=tokenizer)
        self._next_id = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params=None, priority=None) -> list[RequestOutput]:
        """prompts: a string, a list of strings, or a list of token-id lists. sampling_params: one
        SamplingParams for all or one per prompt. priority: None, or one int per prompt (lower served first;
        needs scheduling_policy="priority"). Returns the final output of each prompt, in order, with every
        token's logprobs (and the prompt's) where asked for."""
        prompt_ids = self._tokenize(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompt_ids)
        elif isinstance(sampling_params, (list, tuple)) and len(sampling_params) == len(prompt_ids):
            params = list(sampling_params)
        else:
            raise ValueError("generate: 'sampling_params' must be one SamplingParams or one per prompt")
        if priority is None:
            priority = [0] * len(prompt_ids)
        elif not isinstance(priority, (list, tuple)) or len(priority) != len(prompt_ids):
            raise ValueError("generate: 'priority' must be None or one int per prompt")
        ids = []
        try:
            for tokens, p, rank in zip(prompt_ids, params, priority):
                request_id = f"llm-{self._next_id}"
                self._next_id += 1
                # Delta updates, summed here: an update then costs the same at any output length.
                self.engine.add_request(request_id, tokens, dataclasses.replace(p, output_kind="delta"), rank)
                ids.append(request_id)
        except (TypeError, ValueError):
            for request_id in ids:  # all or nothing: a bad prompt leaves no request of this call behind
                self.engine.abort_request(request_id)
            raise
        final: dict[str, RequestOutput] = {}
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        text: dict[str, list[str]] = {i: [] for i in ids}
        logprobs: dict[str, list] = {i: [] for i in ids}
        top: dict[str, list] = {i: [] for i in ids}
        prompt_lp: dict[str, tuple] = {}  # the first update's prompt logprobs, where asked for
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.request_id not in tokens:  # not this call's (one left by an interrupted call)
                    continue
                tokens[out.request_id] += out.new_token_ids
                text[out.request_id].append(out.delta_text)
                if out.logprobs is not None:
                    logprobs[out.request_id] += out.logprobs
                    top[out.request_id] += out.top_logprobs
                if out.prompt_logprobs is not None:
                    prompt_lp[out.request_id] = out.prompt_logprobs, out.prompt_top_logprobs
                if out.finished:
                    final[out.request_id] = out
        for request_id, out in final.items():  # the whole generation, as one cumulative update
            out.output_token_ids, out.new_token_ids = tokens[request_id], list(tokens[request_id])
            out.text = out.delta_text = "".join(text[request_id])
            if out.logprobs is not None:
                out.logprobs, out.top_logprobs = logprobs[request_id], top[request_id]
            if request_id in prompt_lp:
                out.prompt_logprobs, out.prompt_top_logprobs = prompt_lp[request_id]
        return [final[i] for i in ids]

    def _tokenize(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise TypeError("generate: 'prompts' must be a string or a non-empty list of strings or token-id lists")
        result = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("generate: this engine has no tokenizer; pass token-id lists")
                result.append(self.tokenizer.encode(p))
            elif isinstance(p, (list, tuple)):
                result.append(list(p))
            else:
                raise TypeError(f"generate: a prompt must be a string or a token-id list, got {type(p).__name__}")
        return result
