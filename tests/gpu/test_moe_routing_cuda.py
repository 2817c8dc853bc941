"""The MoE routing kernels (csrc/moe/moe_route.cu: ops.moe_route, ops.moe_sort_pairs) on a GPU.

router_logits against float64 dot products of the same bf16 rows (fp32 sums: ~1e-7 relative); router_topk
against the float64 router (ops/moe_routing.py's formula on float64 logits): the same set of experts wherever
the k-th and (k+1)-th choices are apart by more than fp32 can blur, weights within fp32 rounding, listed in
decreasing order of choice; sort_pairs equal to the stable torch sort, element for element. Routers as real
checkpoints produce them and worse: logits over +-30 (sigmoid saturated, choices tied but for the bias),
exact ties (lowest ids win), a NaN row (still k distinct valid experts), groups. Outputs are poisoned before
each call, so an element a kernel skipped fails. Repeated calls are bit-equal; graph replays equal eager calls.
"""

from __future__ import annotations

import pytest
import torch

from kda_serving.ops import cuda_moe_routing, moe_route, moe_sort_pairs
from kda_serving.ops.moe_routing import ROUTER_KERNEL_MAX_TOKENS, route_kernel_takes, sort_pairs_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Kimi-Linear-48B's router: 256 experts, 8 per token, one group, renormalised, scaled by 2.446
HIDDEN, EXPERTS, TOP_K, SCALING = 2304, 256, 8, 2.446


def _library_or_skip() -> None:
    router = torch.empty(EXPERTS, HIDDEN, dtype=torch.bfloat16, device="cuda")
    if not route_kernel_takes(router, router, TOP_K, 1):
        pytest.skip("needs an SM90 GPU and the library with the MoE routing kernels")


def _router_inputs(T: int, E: int = EXPERTS, hidden: int = HIDDEN, seed: int = 0, logit_scale: float = 3.0):
    """bf16 x [T, hidden] and router [E, hidden] whose logits have about `logit_scale` standard deviation, and a
    bias [E] as trained checkpoints carry (~0.1 spread)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, hidden, generator=gen, device="cuda").to(torch.bfloat16)
    router = (torch.randn(E, hidden, generator=gen, device="cuda") * logit_scale / hidden**0.5).to(torch.bfloat16)
    bias = 0.1 * torch.randn(E, generator=gen, device="cuda")
    return x, router, bias


def _reference(logits64: torch.Tensor, bias: torch.Tensor, top_k: int, groups: int, topk_group: int,
               renormalize: bool, scaling: float):
    """The router in float64 from float64 logits: (choice [T, E] with the dropped groups at -inf, ids sorted by
    decreasing choice, weights)."""
    T, E = logits64.shape
    s = logits64.sigmoid()
    choice = s + bias.double()
    if groups > 1:
        group_scores = choice.view(T, groups, E // groups).topk(2, dim=-1).values.sum(-1)
        best = group_scores.topk(topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // groups, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    w = s.gather(1, ids)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return choice, ids, w * scaling


def _check_route(x, router, bias, top_k=TOP_K, groups=1, topk_group=1, renormalize=True, scaling=SCALING):
    ids, weights = moe_route(x, router, bias, top_k, groups, topk_group, renormalize, scaling)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32 and ids.shape == (x.shape[0], top_k)
    logits64 = x.double() @ router.double().T
    choice, ref_ids, ref_w = _reference(logits64, bias, top_k, groups, topk_group, renormalize, scaling)
    # rows whose k-th and (k+1)-th choices (or group scores) are too close for fp32 to order are skipped
    ordered = choice.sort(-1, descending=True).values
    gap = ordered[:, top_k - 1] - ordered[:, top_k]
    clear = gap > 1e-5
    if 1 < groups and topk_group < groups:  # and those whose group cut is too close
        raw = (logits64.sigmoid() + bias.double()).view(x.shape[0], groups, -1).topk(2, -1).values.sum(-1)
        scores = raw.sort(-1, descending=True).values
        clear &= (scores[:, topk_group - 1] - scores[:, topk_group]) > 1e-5
    assert clear.float().mean() > 0.9, "too few rows with a clear top-k to test"
    assert torch.equal(ids[clear].cpu(), ref_ids[clear].cpu()), "experts differ from the float64 router"
    assert not weights.isnan().any()
    err = (weights[clear].double() - ref_w[clear]).abs().max().item()
    rel = ((weights[clear].double() - ref_w[clear]).norm() / ref_w[clear].norm()).item()
    print(f"route T={x.shape[0]} groups={groups}/{topk_group}: weights max error {err:.2e}, relative {rel:.2e}")
    assert err < 1e-5 * scaling and rel < 2e-6
    # decreasing choice along each row, every id distinct and in range
    chosen = choice.gather(1, ids)
    assert (chosen[:, :-1] >= chosen[:, 1:] - 1e-6).all()
    assert ((ids >= 0) & (ids < router.shape[0])).all()
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all()
    return ids, weights


@pytest.mark.parametrize("T", [1, 3, 8, 64, 257, 1000])
def test_router_matches_float64(T):
    """Both logits paths (the kernel up to ROUTER_KERNEL_MAX_TOKENS tokens, cuBLAS beyond) into the top-k."""
    _library_or_skip()
    x, router, bias = _router_inputs(T, seed=T)
    ids, weights = _check_route(x, router, bias)
    again = moe_route(x, router, bias, TOP_K, 1, 1, True, SCALING)
    assert torch.equal(ids, again[0]) and torch.equal(weights, again[1]), "not repeatable"


@pytest.mark.parametrize("groups,topk_group,E,top_k", [(8, 4, 256, 8), (4, 2, 64, 6), (32, 3, 1024, 16)])
def test_router_groups_match_float64(groups, topk_group, E, top_k):
    _library_or_skip()
    x, router, bias = _router_inputs(40, E=E, hidden=512, seed=groups)
    _check_route(x, router, bias, top_k, groups, topk_group)


def test_router_without_renormalising():
    _library_or_skip()
    x, router, bias = _router_inputs(33, E=384, hidden=1024, seed=5)
    _check_route(x, router, bias, 6, 1, 1, False, 1.0)


def test_router_logits_kernel_against_float64():
    """The logits kernel alone, its output poisoned with NaN first: every element written, fp32-exact sums."""
    _library_or_skip()
    for T, E, hidden in [(1, 256, 2304), (13, 72, 7168), (ROUTER_KERNEL_MAX_TOKENS, 256, 2304)]:
        x, router, _ = _router_inputs(T, E=E, hidden=hidden, seed=E)
        logits = torch.full((T, E), float("nan"), device="cuda")
        cuda_moe_routing.router_logits(x, router, logits)
        ref = x.double() @ router.double().T
        rel = ((logits.double() - ref).norm() / ref.norm()).item()
        err = (logits.double() - ref).abs().max().item()
        print(f"router logits T={T} E={E} hidden={hidden}: relative {rel:.2e}, max error {err:.2e}")
        assert not logits.isnan().any() and rel < 1e-6


def test_router_saturated_and_tied():
    """Logits over +-30 and beyond: sigmoid is 1 or 0 in fp32 for many experts, the bias alone orders them; with
    a zero bias they tie exactly and the lowest ids win, weights then equal."""
    _library_or_skip()
    x, router, bias = _router_inputs(64, seed=9, logit_scale=40.0)
    _check_route(x, router, bias)
    T, E = 16, 256
    x = torch.ones(T, 64, dtype=torch.bfloat16, device="cuda")
    router = torch.full((E, 64), 4.0, dtype=torch.bfloat16, device="cuda")  # every logit 256: sigmoid 1 exactly
    router[3] = -4.0
    ids, weights = moe_route(x, router, torch.zeros(E, device="cuda"), TOP_K, 1, 1, True, SCALING)
    expected = torch.tensor([0, 1, 2, 4, 5, 6, 7, 8], device="cuda").expand(T, -1)
    assert torch.equal(ids, expected)
    torch.testing.assert_close(weights, torch.full_like(weights, SCALING / TOP_K), rtol=1e-6, atol=0)


def test_router_nan_rows_still_choose_valid_experts():
    """A token whose hidden state is NaN (a broken checkpoint) gets k distinct experts in range, not an index
    that would send the experts' kernels out of bounds; the other tokens are unaffected."""
    _library_or_skip()
    x, router, bias = _router_inputs(9, seed=3)
    clean_ids, clean_w = moe_route(x, router, bias, TOP_K, 1, 1, True, SCALING)
    x[4] = float("nan")
    ids, weights = moe_route(x, router, bias, TOP_K, 1, 1, True, SCALING)
    assert ((ids >= 0) & (ids < EXPERTS)).all() and (ids[4].sort().values.diff() > 0).all()
    rest = torch.arange(9, device="cuda") != 4
    assert torch.equal(ids[rest], clean_ids[rest]) and torch.equal(weights[rest], clean_w[rest])


def test_router_topk_writes_every_output():
    _library_or_skip()
    x, router, bias = _router_inputs(21, seed=4)
    logits = (x.float() @ router.float().T).contiguous()
    ids = torch.full((21, TOP_K), -7, dtype=torch.int64, device="cuda")
    weights = torch.full((21, TOP_K), float("nan"), device="cuda")
    cuda_moe_routing.router_topk(logits, bias, TOP_K, 1, 1, True, SCALING, ids, weights)
    assert (ids >= 0).all() and not weights.isnan().any()


def _random_ids(T: int, k: int, E: int, seed: int, skew: bool = False) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if skew:  # most pairs on a few experts, as a hot expert draws them
        return torch.randint(0, 3, (T, k), generator=gen, device="cuda") * (E // 3)
    return torch.rand(T, E, generator=gen, device="cuda").topk(k, dim=-1).indices


@pytest.mark.parametrize("T,k,E", [(1, 8, 256), (8, 8, 256), (64, 8, 256), (128, 8, 256), (129, 8, 256),
                                   (1000, 6, 64), (8192, 8, 256), (300, 16, 1024), (50, 2, 7)])
def test_sort_pairs_equals_stable_torch_sort(T, k, E):
    _library_or_skip()
    for skew in (False, True):
        ids = _random_ids(T, k, E, seed=T + E, skew=skew)
        expected = sort_pairs_reference(ids, E)
        row_token, pair_row, ends = moe_sort_pairs(ids, E)
        for name, got, ref in zip(("row_token", "pair_row", "ends"), (row_token, pair_row, ends), expected):
            assert got.dtype == torch.int32 and torch.equal(got, ref), f"{name} differs (skew={skew})"
        # and what the rows mean: row r holds a pair of token row_token[r] for the expert whose range holds r
        flat = ids.reshape(-1)
        assert torch.equal(pair_row.sort().values, torch.arange(T * k, device="cuda", dtype=torch.int32))
        assert torch.equal(row_token[pair_row.long()].long(), torch.arange(T * k, device="cuda") // k)
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        assert torch.equal((ends - starts).long(), torch.bincount(flat, minlength=E))


def test_sort_pairs_writes_every_output_and_keeps_bad_ids_out():
    """Outputs poisoned first; ids outside [0, E) go past every expert's rows, as the torch formula puts them."""
    _library_or_skip()
    E = 32
    ids = _random_ids(100, 4, E, seed=1)
    ids[3, 1], ids[50, 0], ids[99, 3] = -1, E, 10**12
    row_token = torch.full((400,), -5, dtype=torch.int32, device="cuda")
    pair_row = torch.full((400,), -5, dtype=torch.int32, device="cuda")
    ends = torch.full((E,), -5, dtype=torch.int32, device="cuda")
    cuda_moe_routing.sort_pairs(ids, E, row_token, pair_row, ends)
    for got, ref in zip((row_token, pair_row, ends), sort_pairs_reference(ids, E)):
        assert torch.equal(got, ref)
    assert ends[-1].item() == 397 and sorted(pair_row[[13, 200, 399]].tolist()) == [397, 398, 399]


def test_routing_captured_in_a_cuda_graph():
    """Route and sort captured once, replayed on new inputs: equal to eager calls (no host sync, no allocation
    that the graph would freeze)."""
    _library_or_skip()
    x, router, bias = _router_inputs(24, seed=11)
    static_x = x.clone()
    moe_route(static_x, router, bias, TOP_K, 1, 1, True, SCALING)  # warm-up outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        ids, weights = moe_route(static_x, router, bias, TOP_K, 1, 1, True, SCALING)
        row_token, pair_row, ends = moe_sort_pairs(ids, EXPERTS)
    torch.cuda.current_stream().wait_stream(stream)
    for seed in (12, 13):
        static_x.copy_(_router_inputs(24, seed=seed)[0])
        graph.replay()
        eager_ids, eager_w = moe_route(static_x, router, bias, TOP_K, 1, 1, True, SCALING)
        assert torch.equal(ids, eager_ids) and torch.equal(weights, eager_w)
        for got, ref in zip((row_token, pair_row, ends), moe_sort_pairs(eager_ids, EXPERTS)):
            assert torch.equal(got, ref)


def test_kernel_router_agrees_with_torch_router():
    """The kernels against torch's own fp32 router on CUDA (ops' reference path): the same experts on rows
    without near-ties, weights within fp32 rounding (both sum in their own order)."""
    _library_or_skip()
    from kda_serving.ops.moe_routing import route_experts_reference

    x, router, bias = _router_inputs(100, seed=21)
    ids, weights = moe_route(x, router, bias, TOP_K, 1, 1, True, SCALING)
    tids, tweights = route_experts_reference(x, router, bias, TOP_K, 1, 1, True, SCALING)
    tids, order = tids.sort(-1)
    tweights = tweights.gather(1, order)
    sids, order = ids.sort(-1)
    same = (sids == tids).all(-1)
    assert same.float().mean() > 0.95
    torch.testing.assert_close(weights.gather(1, order)[same], tweights[same], rtol=2e-6, atol=1e-6)


def test_router_takes_unaligned_rows():
    """x as a view that starts 2 bytes into its storage (not 16-byte aligned for the logits kernel's loads):
    cuBLAS's logits instead, the same experts."""
    _library_or_skip()
    x, router, bias = _router_inputs(5, seed=30)
    padded = torch.empty(5 * HIDDEN + 1, dtype=torch.bfloat16, device="cuda")
    view = padded[1:].view(5, HIDDEN)
    view.copy_(x)
    assert view.data_ptr() % 16
    ids, weights = moe_route(view, router, bias, TOP_K, 1, 1, True, SCALING)
    aligned_ids, aligned_weights = moe_route(x, router, bias, TOP_K, 1, 1, True, SCALING)
    assert torch.equal(ids, aligned_ids)
    torch.testing.assert_close(weights, aligned_weights, rtol=1e-6, atol=0)
