"""ops.moe_route and ops.moe_sort_pairs on the CPU (their torch formulas, which the CUDA kernels are tested
against in tests/gpu/test_moe_routing_cuda.py): the router against a float64 one written out per token, the sort
against Python's stable sort, and the arguments each op refuses."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kda_serving.ops import moe_route, moe_sort_pairs


def _router_per_token(x, router, bias, top_k, groups, topk_group, renormalize, scaling):
    """float64, one token at a time, in plain Python over the experts: sets of ids and their weights."""
    out = []
    for row in x.double():
        s = torch.sigmoid(router.double() @ row).tolist()
        choice = [si + bi for si, bi in zip(s, bias.double().tolist())]
        E = len(choice)
        per = E // groups
        group_score = [sum(sorted(choice[g * per:(g + 1) * per])[-2:]) for g in range(groups)]
        kept = sorted(range(groups), key=lambda g: -group_score[g])[:topk_group] if groups > 1 else [0]
        candidates = [e for e in range(E) if e // per in kept]
        ids = sorted(candidates, key=lambda e: -choice[e])[:top_k]
        w = [s[e] for e in ids]
        total = sum(w) + 1e-20
        out.append({e: (wi / total if renormalize else wi) * scaling for e, wi in zip(ids, w)})
    return out


@pytest.mark.parametrize("groups,topk_group,renormalize", [(1, 1, True), (4, 2, True), (8, 3, False)])
def test_route_matches_float64_per_token(groups, topk_group, renormalize):
    gen = torch.Generator().manual_seed(groups)
    x, router = torch.randn(23, 48, generator=gen), torch.randn(64, 48, generator=gen) / 4
    bias = 0.1 * torch.randn(64, generator=gen)
    ids, weights = moe_route(x, router, bias, 6, groups, topk_group, renormalize, 2.446)
    assert ids.shape == weights.shape == (23, 6) and ids.dtype == torch.int64 and weights.dtype == torch.float32
    for t, ref in enumerate(_router_per_token(x, router, bias, 6, groups, topk_group, renormalize, 2.446)):
        got = dict(zip(ids[t].tolist(), weights[t].tolist()))
        assert got.keys() == ref.keys()
        for e in ref:
            assert got[e] == pytest.approx(ref[e], rel=1e-5)


def test_sort_pairs_is_a_stable_sort_by_expert():
    gen = torch.Generator().manual_seed(0)
    T, k, E = 37, 4, 10
    ids = torch.randint(0, E, (T, k), generator=gen)
    ids[5, 2], ids[20, 0] = -3, E + 4  # outside [0, E): after every expert's rows
    row_token, pair_row, ends = moe_sort_pairs(ids, E)
    assert row_token.dtype == pair_row.dtype == ends.dtype == torch.int32
    flat = ids.reshape(-1).tolist()
    bucket = [e if 0 <= e < E else E for e in flat]
    order = sorted(range(T * k), key=lambda p: bucket[p])  # Python's sort is stable
    assert row_token.tolist() == [p // k for p in order]
    assert pair_row.tolist() == [order.index(p) for p in range(T * k)]
    assert ends.tolist() == [sum(b <= e for b in bucket) for e in range(E)]
    assert sorted(pair_row[[5 * k + 2, 20 * k]].tolist()) == [T * k - 2, T * k - 1]


def test_route_and_sort_refuse_bad_arguments():
    x, router, bias = torch.randn(3, 16), torch.randn(8, 16), torch.zeros(8)
    with pytest.raises(TypeError, match="'x'"):
        moe_route(x.tolist(), router, bias, 2)
    with pytest.raises(ValueError, match="'router'"):
        moe_route(x, router[:, :8], bias, 2)
    with pytest.raises(ValueError, match="'router'"):
        moe_route(x, router.double(), bias, 2)
    with pytest.raises(ValueError, match="'bias'"):
        moe_route(x, router, bias[:4], 2)
    with pytest.raises(ValueError, match="'num_groups'"):
        moe_route(x, router, bias, 2, 3)
    with pytest.raises(ValueError, match="'topk_group'"):
        moe_route(x, router, bias, 2, 4, 5)
    with pytest.raises(ValueError, match="'top_k'"):
        moe_route(x, router, bias, 5, 4, 2)  # two kept groups of two experts hold 4
    with pytest.raises(ValueError, match="'ids'"):
        moe_sort_pairs(torch.zeros(3, 2, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="'num_experts'"):
        moe_sort_pairs(torch.zeros(3, 2, dtype=torch.int64), 0)


@settings(max_examples=60, deadline=None)
@given(T=st.integers(0, 40), k=st.integers(1, 6), E=st.integers(1, 24), seed=st.integers(0, 2**31 - 1),
       bad=st.booleans())
def test_sort_pairs_property(T, k, E, seed, bad):
    """Any shape, ids in range or not: row_token / pair_row / ends describe Python's stable sort by expert."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-2 if bad else 0, E + 2 if bad else E, (T, k), generator=gen)
    row_token, pair_row, ends = moe_sort_pairs(ids, E)
    bucket = [e if 0 <= e < E else E for e in ids.reshape(-1).tolist()]
    order = sorted(range(T * k), key=lambda p: bucket[p])
    assert row_token.tolist() == [p // k for p in order]
    assert [order[r] for r in pair_row.tolist()] == list(range(T * k))
    assert ends.tolist() == [sum(b <= e for b in bucket) for e in range(E)]
