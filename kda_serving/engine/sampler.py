"""Picks each sequence's next token from its logits: penalties, then greedy or temperature / top-k / min-p /
top-p sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.batch import host_to_device
from ..ops.sampling import top_k_floor, top_p_floor
from .sampling_params import SamplingParams


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float | None]  # of the chosen token, where asked for
    top_logprobs: list[dict[int, float] | None]


class DeviceSample:
    """A step's choice still on the device: the tokens, and the logprobs of the rows that want them.

    `copy_to_host()` starts copying it into pinned host memory and returns at once; `result()` then waits
    only for that copy, where a .tolist() of the device tensors would wait for everything queued on the
    stream since, the next step's forward included (asynchronous scheduling, docs/engine.md)."""

    def __init__(self, n: int, tokens: torch.Tensor, want: list[tuple[int, int]], chosen, top_vals, top_ids):
        self.n, self.tokens, self.want = n, tokens, want  # want: (row, how many top logprobs) per row asking
        self._tensors = [tokens, chosen, top_vals, top_ids]
        self._host = None
        self._done = None

    def copy_to_host(self) -> DeviceSample:
        if self._host is None and self.tokens.device.type == "cuda":
            self._host = [None if t is None else t.to("cpu", non_blocking=True) for t in self._tensors]
            self._done = torch.cuda.Event()
            self._done.record()
        return self

    def result(self) -> SampleResult:
        if self._host is not None:
            self._done.synchronize()
            tokens, chosen, top_vals, top_ids = self._host
        else:
            tokens, chosen, top_vals, top_ids = self._tensors
        logprobs: list[float | None] = [None] * self.n
        top: list[dict[int, float] | None] = [None] * self.n
        if self.want:
            chosen_list = chosen.tolist()
            vals = top_vals.tolist() if top_vals is not None else None
            ids = top_ids.tolist() if top_ids is not None else None
            for j, (i, ki) in enumerate(self.want):
                logprobs[i] = chosen_list[j]
                top[i] = dict(zip(ids[j][:ki], vals[j][:ki])) if ki else {}
        return SampleResult(tokens.tolist(), logprobs, top)


class Sampler:
    """Samples rows of logits [N, vocab] (fp32), one SamplingParams per row.

    Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which draws from p exactly and
    lets each row take its noise from its own generator: a seeded request gets the same tokens whatever it
    is batched with. Unseeded rows share the engine's generator. Logprobs are of the full (temperature 1)
    distribution, as the OpenAI API reports them, before penalties and logit biases.

    Penalties (SamplingParams) need each penalized row's tokens: histories[i] = (token ids, prompt length) (or
    the three-part form of `penalize`) for a penalized row i; other rows' entries are not read.
    Their counts are rebuilt every step, in one bincount over the penalized rows' tokens, so a penalized
    request costs host time in proportion to its length; unpenalized rows cost nothing.
    """

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], generators: list,
                 histories: list[tuple[list[int], int]] | None = None,
                 allowed: tuple[list[int], torch.Tensor] | None = None,
                 banned: tuple[list[int], list[int]] | None = None) -> SampleResult:
        """allowed: (rows, [len(rows), vocab] bool) the only tokens those rows may choose (structured
        outputs), applied after penalties and biases. banned: (rows, token ids), pairs that may not be chosen
        (the tokens that would end a request before its min_tokens), applied with the biases."""
        return self.sample(logits, params, generators, histories, allowed, banned=banned).result()

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], generators: list,
               histories: list[tuple] | None = None,
               allowed: tuple[list[int], torch.Tensor] | None = None,
               pending_tokens: torch.Tensor | None = None,
               banned: tuple[list[int], list[int]] | None = None) -> DeviceSample:
        """The same choice as __call__, left on the logits' device: nothing here waits for it. A history may
        name its row's last output token by its index in pending_tokens, a previous step's tokens still on the
        device (penalize)."""
        logits = logits.float()
        n, vocab = logits.shape
        scores = logits  # what the token is chosen from
        penalized = [i for i, p in enumerate(params) if p.penalized]
        biased = [i for i, p in enumerate(params) if p.logit_bias]
        banned = banned if banned is not None and banned[0] else None
        if penalized or biased or allowed is not None or banned is not None:
            scores = logits.clone()
        if penalized:
            if histories is None:
                raise ValueError("Sampler: penalties need the rows' token histories")
            rows = host_to_device(penalized, logits.device)
            scores[rows] = penalize(logits[rows], [params[i] for i in penalized], [histories[i] for i in penalized],
                                    pending_tokens)
        if biased:
            rows, ids, bias = zip(*[(i, t, b) for i in biased for t, b in params[i].logit_bias])
            scores.index_put_((host_to_device(rows, logits.device), host_to_device(ids, logits.device)),
                              host_to_device(bias, logits.device), accumulate=True)
        if banned is not None:
            rows, ids = (host_to_device(x, logits.device, torch.int64) for x in banned)
            scores.index_put_((rows, ids), scores.new_full((len(banned[0]),), float("-inf")))
        if allowed is not None:
            rows = host_to_device(allowed[0], logits.device)
            scores[rows] = scores[rows].masked_fill(~allowed[1], float("-inf"))
        tokens = scores.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            rows = host_to_device(random_rows, logits.device)
            probs = self._filtered_probs(scores[rows], [params[i] for i in random_rows])
            noise = torch.empty_like(probs)
            # A seeded row draws from its own generator; the unseeded ones share one draw of the engine's (a
            # draw per row costs a launch each: 1.0 ms more for 256 rows on an H200, docs/engine.md)
            shared = [j for j, i in enumerate(random_rows) if generators[i] is None]
            if len(shared) == len(random_rows):
                noise.exponential_(generator=self.generator)
            else:
                for j, i in enumerate(random_rows):
                    if generators[i] is not None:
                        noise[j].exponential_(generator=generators[i])
                if shared:
                    draw = torch.empty((len(shared), vocab), device=noise.device).exponential_(generator=self.generator)
                    noise.index_copy_(0, host_to_device(shared, noise.device), draw)
            noise.clamp_(min=torch.finfo(noise.dtype).tiny)
            tokens[rows] = (probs / noise).argmax(dim=-1)
        want = [(i, params[i].logprobs) for i, p in enumerate(params) if p.logprobs is not None]
        chosen = top_vals = top_ids = None
        if want:
            rows = host_to_device([i for i, _ in want], logits.device)
            logp = torch.log_softmax(logits[rows], dim=-1)
            chosen = logp.gather(1, tokens[rows].unsqueeze(1)).squeeze(1)
            k = max(ki for _, ki in want)
            if k:
                top_vals, top_ids = logp.topk(min(k, vocab), dim=-1)
        return DeviceSample(n, tokens, want, chosen, top_vals, top_ids)

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Softmax of logits / temperature with everything outside each row's top-k, min-p and top-p sets set to
        0, not renormalised (the race compares a row's entries only with each other). Top-p applies to what the
        other two keep, renormalised, as in vLLM; the top-k and min-p cuts commute (the most likely token
        survives both, and min-p's threshold on the logits is the row's largest logit + log(min_p)).

        Nothing is sorted: each cut is a threshold per row found by a radix search (kda_serving.ops.sampling),
        the k-th largest logit and the smallest probability of the top-p set. Sorting every row of a
        163,840-token vocabulary cost as much as the decode step before it (docs/engine.md, "Top-k and top-p
        without a sort"). Tokens tied with either threshold all stay, as in vLLM's top-k: the kept set is then
        a little larger than k, or than the smallest set reaching top_p, but never depends on how a sort breaks
        ties."""
        device = logits.device
        temps = host_to_device([p.temperature for p in params], device).unsqueeze(1)
        logits = logits / temps
        vocab = logits.shape[1]
        ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]  # vocab: no cut
        if min(ks) < vocab:
            kth = top_k_floor(logits, ks).unsqueeze(1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if any(p.min_p > 0 for p in params):
            log_min_p = host_to_device([p.min_p for p in params], device).log().unsqueeze(1)  # 0 -> -inf: no cut
            logits = logits.masked_fill(logits < logits.amax(dim=-1, keepdim=True) + log_min_p, float("-inf"))
        probs = logits.softmax(dim=-1)
        if any(p.top_p < 1 for p in params):
            floor = top_p_floor(probs, [p.top_p for p in params]).unsqueeze(1)
            probs = probs.masked_fill(probs < floor, 0.0)
        return probs


def penalize(logits: torch.Tensor, params: list[SamplingParams], histories: list[tuple], pending_tokens=None
             ) -> torch.Tensor:
    """logits [R, vocab] of R rows with their penalties applied (a new tensor).

    histories[r] = (token ids, prompt length) or (token ids, prompt length, i): with i, the row's last output
    token is pending_tokens[i], on the device and not in the host list yet (asynchronous scheduling).

    Repetition first (every token of the prompt or the output: a positive logit divided by r, a negative one
    multiplied by r), then the output counts: minus frequency_penalty * count minus presence_penalty * (count > 0).
    This is vLLM's order and transformers' repetition rule.
    """
    rows, vocab = logits.shape
    device = logits.device
    out_keys, seen_keys = [], []  # row * vocab + token id, for one bincount each
    pending_rows, pending_src = [], []
    for r, (history, p) in enumerate(zip(histories, params)):
        tokens, prompt_len = history[0], history[1]
        base = r * vocab
        out_keys += [base + t for t in tokens[prompt_len:]]
        if p.repetition_penalty != 1.0:
            seen_keys += [base + t for t in tokens]
        if len(history) > 2 and history[2] is not None:
            pending_rows.append(r)
            pending_src.append(history[2])
    # counted where the logits are: [R, vocab] never crosses to the host (integer counts: deterministic on CUDA)
    out_keys = host_to_device(out_keys, device, torch.int64)
    seen_keys = host_to_device(seen_keys, device, torch.int64) if seen_keys else None
    if pending_rows:  # each one more output token, still on the device (asynchronous scheduling)
        keys = (host_to_device(pending_rows, device, torch.int64) * vocab
                + pending_tokens.index_select(0, host_to_device(pending_src, device, torch.int64)))
        out_keys = torch.cat((out_keys, keys))
        if seen_keys is not None:  # a row without a repetition penalty loses nothing by having it "seen"
            seen_keys = torch.cat((seen_keys, keys))
    counts = torch.bincount(out_keys, minlength=rows * vocab)
    counts = counts.view(rows, vocab).to(logits.dtype)
    result = logits
    if seen_keys is not None:
        seen = torch.bincount(seen_keys, minlength=rows * vocab)
        rep = host_to_device([p.repetition_penalty for p in params], device, logits.dtype)[:, None]
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        result = torch.where(seen.view(rows, vocab) > 0, penalized, logits)
    freq = host_to_device([p.frequency_penalty for p in params], device, logits.dtype)[:, None]
    pres = host_to_device([p.presence_penalty for p in params], device, logits.dtype)[:, None]
    return result - freq * counts - pres * (counts > 0).to(logits.dtype)
