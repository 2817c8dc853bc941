"""The sampler's cuts without a sort: each row's top-k floor (its k-th largest logit) and top-p floor (the
smallest probability its top-p set keeps).

Both are one search, the radix floor: for a row of floats x and a target, the largest value v such that the
weight of the row's entries >= v reaches the target.
- top-k: every entry weighs 1 and the target is k, so v is the k-th largest value; keeping x >= v keeps the
  top k (and any entry tied with the k-th).
- top-p: x holds probabilities, each weighing its mass, and the target is top_p, so v is the probability of
  the token with which the mass, summed from the most likely token down, first reaches top_p; keeping p >= v
  keeps the smallest set reaching top_p (and any token tied with its last one).
Masses are summed in fixed point, units of 2**-50 (MASS_ONE), truncated: integer sums are exact in any order,
so the floor is the same on every run, on either device. A token below 2**-50 counts as 0; a row of 163,840
tokens loses at most 1.5e-10 of its mass to this.

Sorting each row of Kimi-Linear's 163,840-token vocabulary instead cost as much as the decode step before it
(docs/engine.md, "Top-k and top-p without a sort"). The search fixes the 32-bit key of v (the float's bits,
made to order as the values do) 11, 11 and 10 bits at a time: one histogram of the row's weight by the next
digit, among the entries matching the digits fixed so far, per level. CPU tensors run radix_floor_torch; CUDA
tensors run the kernel in csrc/sampling (a row split among CTAs when few rows would leave SMs idle), which
gives the same floor bit for bit. Registered as a torch custom op with a fake implementation; the CUDA one
allocates its scratch through torch and never synchronises, so it can be captured in a CUDA graph.

    >>> kth = top_k_floor(logits, [50, 20])                 # [2] fp32, logits [2, V] fp32
    >>> logits = logits.masked_fill(logits < kth[:, None], float("-inf"))
    >>> probs = logits.softmax(-1)
    >>> probs = probs.masked_fill(probs < top_p_floor(probs, [0.9, 1.0])[:, None], 0.0)
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

MASS_ONE = 2.0 ** 50  # csrc/sampling/radix_floor.cu kMassOne
DIGIT_BITS = (11, 11, 10)  # csrc/sampling/radix_floor.cu kDigitBits
NO_CUT = 2 ** 62  # a top-p target no row's mass reaches: the floor is then 0.0 and nothing is cut
_SIGN = 2 ** 31
_LOW32 = 2 ** 32 - 1


def _keys(x: Tensor, by_mass: bool) -> Tensor:
    """x fp32 -> int64 keys in [0, 2**32) that order as the values do (probabilities: their bits)."""
    u = x.contiguous().view(torch.int32).long() & _LOW32
    return u if by_mass else torch.where(u >= _SIGN, u ^ _LOW32, u | _SIGN)


def _values(keys: Tensor, by_mass: bool) -> Tensor:
    """The inverse of _keys."""
    u = keys if by_mass else torch.where(keys >= _SIGN, keys & (_SIGN - 1), keys ^ _LOW32)
    return torch.where(u >= _SIGN, u - 2 ** 32, u).to(torch.int32).view(torch.float32)


def radix_floor_torch(x: Tensor, target: Tensor, by_mass: bool) -> Tensor:
    """x [R, V] fp32, target [R] int64 (>= 1) -> [R] fp32: per row the largest v with weight(x >= v) >= target
    (module doc); a target over the row's whole weight gives the smallest key's value (0.0 for probabilities).
    The kernel's algorithm in PyTorch, on any device: what CPU tensors run."""
    rows = x.shape[0]
    keys = _keys(x, by_mass)
    weights = (x * MASS_ONE).long() if by_mass else torch.ones_like(keys)
    target = target.view(rows, 1)
    prefix = torch.zeros(rows, 1, dtype=torch.int64, device=x.device)  # the key's digits fixed so far
    above = torch.zeros(rows, 1, dtype=torch.int64, device=x.device)  # weight of the keys above the prefix
    fixed = 0
    for bits in DIGIT_BITS:
        shift = 32 - fixed - bits
        matching = (keys >> (shift + bits)) == prefix
        digits = (keys >> shift) & ((1 << bits) - 1)
        hist = torch.zeros(rows, 1 << bits, dtype=torch.int64, device=x.device)
        hist.scatter_add_(1, digits, weights * matching)
        # reach[d]: above + the weight of the digits >= d, falling with d; reach[1 << bits] = above
        reach = torch.nn.functional.pad(hist.flip(1).cumsum(1).flip(1), (0, 1)) + above
        digit = ((reach[:, :-1] >= target).sum(1, keepdim=True) - 1).clamp_(min=0)  # the largest that reaches
        above = reach.gather(1, digit + 1)
        prefix = (prefix << bits) | digit
        fixed += bits
    return _values(prefix.view(rows), by_mass)


@torch.library.custom_op("kda_serving::radix_floor_", mutates_args=("out",))
def _radix_floor_op(x: Tensor, target: Tensor, by_mass: bool, out: Tensor) -> None:
    """CPU implementation (the CUDA one is registered below). Writes out [R] fp32."""
    out.copy_(radix_floor_torch(x, target, by_mass))


@_radix_floor_op.register_kernel("cuda")
def _radix_floor_cuda(x, target, by_mass, out):
    from . import cuda_sampling

    cuda_sampling.radix_floor(x, target, by_mass, out)


@_radix_floor_op.register_fake
def _(*args, **kwargs) -> None:
    return None


def _validate(name: str, x, per_row: list) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"kda: argument '{name}': expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"kda: argument '{name}': expected torch.float32, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"kda: argument '{name}': expected rows [R, V] with V >= 1, got shape {tuple(x.shape)}")
    if len(per_row) != x.shape[0]:
        raise ValueError(f"kda: expected one value per row of '{name}' ({x.shape[0]}), got {len(per_row)}")


def _floor(x: Tensor, target: list[int], by_mass: bool) -> Tensor:
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    target = torch.tensor(target, dtype=torch.int64).to(x.device, non_blocking=True)
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    torch.ops.kda_serving.radix_floor_(x, target, by_mass, out)
    return out


def top_k_floor(logits: Tensor, ks: list[int]) -> Tensor:
    """[R] fp32: the ks[r]-th largest value of each row of logits [R, V] (fp32); ks[r] in [1, V] (V: no cut,
    the row's smallest value)."""
    _validate("logits", logits, ks)
    vocab = logits.shape[1]
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
            raise ValueError(f"kda: top_k_floor: each k must be an int in [1, {vocab}], got {k!r}")
    return _floor(logits, ks, by_mass=False)


def top_p_floor(probs: Tensor, top_ps: list[float]) -> Tensor:
    """[R] fp32: the smallest probability each row's top-p set keeps, for probs [R, V] (fp32, rows of a softmax)
    and top_ps[r] in (0, 1] (1: no cut, the floor is 0.0)."""
    _validate("probs", probs, top_ps)
    for p in top_ps:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"kda: top_p_floor: each top_p must be in (0, 1], got {p!r}")
    return _floor(probs, [NO_CUT if p >= 1 else math.ceil(p * MASS_ONE) for p in top_ps], by_mass=True)
