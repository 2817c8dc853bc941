"""A MoE layer's routing: each token's experts and weights, and the (token, expert) pairs sorted by expert.

    ids, weights = moe_route(x, router, bias, top_k, num_groups, topk_group, renormalize, scaling)
    row_token, pair_row, ends = moe_sort_pairs(ids, num_experts)

moe_route is transformers' KimiLinearTopkRouter (DeepSeek-V3 style), per token, in fp32:

    s = sigmoid(x . router^T);  choice = s + bias
    groups (num_groups > 1) scored by the sum of their two best choices; the topk_group best are kept
    ids = the top_k experts by choice among the kept groups; weights = s[ids] (the bias only steers the choice)
    weights = weights / (sum(weights) + 1e-20) if renormalize;  weights = weights * scaling

x [T, hidden], router [E, hidden] (x's dtype), bias [E] fp32 -> ids [T, top_k] int64, weights [T, top_k] fp32.
The products are formed in fp32 from x and router as given (F.linear on both cast to fp32).

moe_sort_pairs sorts pair p = t * k + j of ids [T, k] by ids[p], stably: row_token [T*k] int32 is the token of
the pair at each sorted row (the rows to gather for the grouped GEMMs), pair_row [T*k] int32 the sorted row of
each pair (where to find its output), ends [E] int32 the end of each expert's rows (the grouped GEMMs' offsets).
Ids must lie in [0, E); one that does not sorts after every expert's rows, past ends[E - 1].

Both are torch custom ops with fake implementations. On an SM90 GPU with the library they run
csrc/moe/moe_route.cu (cuda_moe_routing.py): the router in two kernels (its logits for steps of up to
ROUTER_KERNEL_MAX_TOKENS tokens, cuBLAS's beyond; the top-k), the sort in one (up to SORT_KERNEL_MAX_PAIRS pairs);
elsewhere the torch formulas below,
which the kernels are tested against (docs/moe-routing.md). The kernels list the top_k experts in decreasing order
of choice, ties to the lower id; torch's order is its own: the same set, and a near-tie may differ in the last bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Steps of at most this many tokens compute the router's logits in the kernel (a warp per expert over tiles of
# 8 tokens, each router row read once per tile), longer ones with cuBLAS (docs/moe-routing.md).
ROUTER_KERNEL_MAX_TOKENS = 128
# Steps of at most this many (token, expert) pairs sort them in the kernel (one CTA), more with torch's radix
# sort, which many CTAs make faster there (docs/moe-routing.md).
SORT_KERNEL_MAX_PAIRS = 16384


def route_experts_reference(x: Tensor, router: Tensor, bias: Tensor, top_k: int, num_groups: int, topk_group: int,
                            renormalize: bool, scaling: float) -> tuple[Tensor, Tensor]:
    """The router (module doc) in torch ops: x [T, hidden] -> (ids [T, top_k] int64, weights [T, top_k] fp32)."""
    return _select(F.linear(x.float(), router.float()), bias, top_k, num_groups, topk_group, renormalize, scaling)


def _select(logits: Tensor, bias: Tensor, top_k: int, num_groups: int, topk_group: int, renormalize: bool,
            scaling: float) -> tuple[Tensor, Tensor]:
    T, E = logits.shape
    scores = logits.sigmoid()
    choice = scores + bias
    if num_groups > 1:
        per_group = choice.view(T, num_groups, E // num_groups)
        group_scores = per_group.topk(2, dim=-1).values.sum(-1)  # [T, G]
        best = group_scores.topk(topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // num_groups, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * scaling


def sort_pairs_reference(ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """moe_sort_pairs (module doc) in torch ops: a stable argsort of the flattened ids."""
    flat = ids.reshape(-1)
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # the kernel's bucket of bad ids
    order = key.argsort(stable=True)
    row_token = (order // ids.shape[1]).int()
    experts = torch.arange(1, num_experts + 1, device=ids.device)
    ends = torch.searchsorted(key[order], experts, right=False).int()
    pair_row = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device)).int()
    return row_token, pair_row, ends


def route_kernel_takes(x: Tensor, router: Tensor, top_k: int, num_groups: int) -> bool:
    """Whether moe_route runs these on the CUDA kernels (at least the top-k; the logits from bf16 x and router
    of up to ROUTER_KERNEL_MAX_TOKENS tokens), not the torch formula."""
    if not x.is_cuda:
        return False
    from . import cuda_moe_routing

    return cuda_moe_routing.supports_topk(router, top_k, num_groups)


# ------------------------------------------------------------------------------------------ the custom ops


@torch.library.custom_op("kda_serving::moe_route", mutates_args=())
def _route_op(x: Tensor, router: Tensor, bias: Tensor, top_k: int, num_groups: int, topk_group: int,
              renormalize: bool, scaling: float) -> tuple[Tensor, Tensor]:
    """CPU implementation (the CUDA one is registered below)."""
    return route_experts_reference(x, router, bias, top_k, num_groups, topk_group, renormalize, scaling)


@_route_op.register_kernel("cuda")
def _route_cuda(x, router, bias, top_k, num_groups, topk_group, renormalize, scaling):
    from . import cuda_moe_routing as k

    T, E = x.shape[0], router.shape[0]
    if not route_kernel_takes(x, router, top_k, num_groups):
        return route_experts_reference(x, router, bias, top_k, num_groups, topk_group, renormalize, scaling)
    x, router = x.contiguous(), router.contiguous()
    aligned = x.data_ptr() % 16 == router.data_ptr() % 16 == 0  # the kernel's 16-byte loads (a view may not be)
    if T <= ROUTER_KERNEL_MAX_TOKENS and aligned and k.supports_logits(x, router):
        logits = torch.empty(T, E, dtype=torch.float32, device=x.device)
        k.router_logits(x, router, logits)
    else:
        logits = F.linear(x.float(), router.float())
    ids = torch.empty(T, top_k, dtype=torch.int64, device=x.device)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    k.router_topk(logits, bias.contiguous(), top_k, num_groups, topk_group, renormalize, scaling, ids, weights)
    return ids, weights


@_route_op.register_fake
def _(x, router, bias, top_k, num_groups, topk_group, renormalize, scaling):
    T = x.shape[0]
    return x.new_empty(T, top_k, dtype=torch.int64), x.new_empty(T, top_k, dtype=torch.float32)


@torch.library.custom_op("kda_serving::moe_sort_pairs", mutates_args=())
def _sort_op(ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """CPU implementation (the CUDA one is registered below)."""
    return sort_pairs_reference(ids, num_experts)


@_sort_op.register_kernel("cuda")
def _sort_cuda(ids, num_experts):
    from . import cuda_moe_routing as k

    if not k.supports_sort(ids, num_experts) or ids.numel() > SORT_KERNEL_MAX_PAIRS:
        return sort_pairs_reference(ids, num_experts)
    pairs = ids.numel()
    row_token = torch.empty(pairs, dtype=torch.int32, device=ids.device)
    pair_row = torch.empty(pairs, dtype=torch.int32, device=ids.device)
    ends = torch.empty(num_experts, dtype=torch.int32, device=ids.device)
    k.sort_pairs(ids.contiguous(), num_experts, row_token, pair_row, ends)
    return row_token, pair_row, ends


@_sort_op.register_fake
def _(ids, num_experts):
    pairs = ids.numel()
    return (ids.new_empty(pairs, dtype=torch.int32), ids.new_empty(pairs, dtype=torch.int32),
            ids.new_empty(num_experts, dtype=torch.int32))


# -------------------------------------------------------------------------------------------- public API


def _tensor(name: str, t) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"kda: argument '{name}': expected a torch.Tensor, got {type(t).__name__}")
    return t


def moe_route(x: Tensor, router: Tensor, bias: Tensor, top_k: int, num_groups: int = 1, topk_group: int = 1,
              renormalize: bool = True, scaling: float = 1.0) -> tuple[Tensor, Tensor]:
    """Each token's top_k experts and their routing weights (module doc): (ids [T, top_k] int64, weights
    [T, top_k] fp32)."""
    for name, t in (("x", x), ("router", router), ("bias", bias)):
        _tensor(name, t)
        if t.device != x.device:
            raise ValueError(f"kda: argument '{name}': is on {t.device}, but x is on {x.device}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"kda: argument 'x': expected float [T, hidden], got {x.dtype} {tuple(x.shape)}")
    if router.dim() != 2 or router.shape[1] != x.shape[1] or router.dtype != x.dtype:
        raise ValueError(f"kda: argument 'router': expected {x.dtype} [E, {x.shape[1]}], got {router.dtype} "
                         f"{tuple(router.shape)}")
    E = router.shape[0]
    if bias.dtype != torch.float32 or tuple(bias.shape) != (E,):
        raise ValueError(f"kda: argument 'bias': expected fp32 [{E}], got {bias.dtype} {tuple(bias.shape)}")
    if num_groups < 1 or E % num_groups or (num_groups > 1 and E // num_groups < 2):
        raise ValueError(f"kda: argument 'num_groups': must divide the {E} experts into groups of at least 2, "
                         f"got {num_groups}")
    if not 1 <= topk_group <= num_groups:
        raise ValueError(f"kda: argument 'topk_group': must be in [1, {num_groups}], got {topk_group}")
    if not 1 <= top_k <= topk_group * (E // num_groups):
        raise ValueError(f"kda: argument 'top_k': must be in [1, {topk_group * (E // num_groups)}] (the experts "
                         f"of the kept groups), got {top_k}")
    return torch.ops.kda_serving.moe_route(x, router, bias, int(top_k), int(num_groups), int(topk_group),
                                           bool(renormalize), float(scaling))


def moe_sort_pairs(ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """The (token, expert) pairs of ids [T, k] sorted by expert (module doc): (row_token [T*k], pair_row [T*k],
    ends [num_experts]), int32."""
    _tensor("ids", ids)
    if ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[1] < 1:
        raise ValueError(f"kda: argument 'ids': expected int64 [T, k] with k >= 1, got {ids.dtype} "
                         f"{tuple(ids.shape)}")
    if num_experts < 1:
        raise ValueError(f"kda: argument 'num_experts': must be >= 1, got {num_experts}")
    return torch.ops.kda_serving.moe_sort_pairs(ids, int(num_experts))
