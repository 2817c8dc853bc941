"""The short causal convolution against torch's own conv1d, sequence by sequence."""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kda_testing import cu_seqlens_of, rel_err
from kda_serving.ops import PAD_SLOT, causal_conv1d_decode, causal_conv1d_prefill, causal_conv1d_verify


def conv_truth(x, weight, bias, init):
    """F.conv1d over [W-1 carried inputs, x] for one sequence, float64. x [L, D], init [W-1, D]."""
    W = weight.shape[1]
    if x.shape[0] == 0:
        return x.double(), init
    xs = torch.cat([init, x]).double().t().unsqueeze(0)  # [1, D, W-1+L]
    y = F.conv1d(xs, weight.double().unsqueeze(1), None if bias is None else bias.double(), groups=x.shape[1])
    return F.silu(y[0].t()), torch.cat([init, x])[-(W - 1):]


@pytest.mark.parametrize("lengths", [[1, 2, 3, 7], [0, 5, 64], [17]])
@pytest.mark.parametrize("with_bias", [True, False])
def test_prefill_matches_conv1d(lengths, with_bias):
    gen = torch.Generator().manual_seed(len(lengths))
    D, W, S = 12, 4, 8
    x = torch.randn(sum(lengths), D, generator=gen)
    w = torch.randn(D, W, generator=gen)
    b = torch.randn(D, generator=gen) if with_bias else None
    pool = torch.randn(S, W - 1, D, generator=gen)
    before = pool.clone()
    slots = torch.randperm(S, generator=gen)[: len(lengths)]
    has_init = torch.tensor([n % 2 == 0 for n in range(len(lengths))])
    y = causal_conv1d_prefill(x, w, b, cu_seqlens_of(lengths), pool, slots, has_init)
    start = 0
    for n, L in enumerate(lengths):
        init = before[slots[n]] if has_init[n] else torch.zeros(W - 1, D)
        ref_y, ref_state = conv_truth(x[start:start + L], w, b, init)
        if L:
            assert rel_err(y[start:start + L], ref_y) < 1e-6
        assert torch.allclose(pool[slots[n]], ref_state, atol=1e-7)
        start += L
    for s in set(range(S)) - set(slots.tolist()):
        assert torch.equal(pool[s], before[s])


def test_decode_equals_prefill_token_by_token():
    gen = torch.Generator().manual_seed(1)
    D, W, L = 10, 4, 6
    x = torch.randn(2 * L, D, generator=gen)
    w, b = torch.randn(D, W, generator=gen), torch.randn(D, generator=gen)
    pool_a = torch.randn(4, W - 1, D, generator=gen)
    pool_b = pool_a.clone()
    slots = torch.tensor([3, 1])
    y_pre = causal_conv1d_prefill(x, w, b, cu_seqlens_of([L, L]), pool_a, slots)
    ys = []
    for t in range(L):
        ys.append(causal_conv1d_decode(torch.stack([x[t], x[L + t]]), w, b, pool_b, slots))
    y_dec = torch.stack(ys, 1).reshape(2 * L, D)
    assert torch.allclose(y_pre, y_dec, atol=1e-6)
    assert torch.allclose(pool_a, pool_b, atol=1e-7)


def test_padding_and_bf16():
    gen = torch.Generator().manual_seed(2)
    D, W = 8, 4
    x = torch.randn(5, D, generator=gen).bfloat16()
    w = torch.randn(D, W, generator=gen).bfloat16()
    pool = torch.randn(3, W - 1, D, generator=gen).bfloat16()
    before = pool.clone()
    y = causal_conv1d_prefill(x, w, None, cu_seqlens_of([2, 3]), pool, torch.tensor([PAD_SLOT, 1]))
    assert y.dtype == torch.bfloat16
    assert torch.equal(y[:2], torch.zeros_like(y[:2]))
    assert torch.equal(pool[[0, 2]], before[[0, 2]])
    ref_y, _ = conv_truth(x[2:].float(), w.float(), None, before[1].float())
    assert rel_err(y[2:], ref_y) < 1e-2


def test_split_output_is_the_same_channels_in_parts():
    gen = torch.Generator().manual_seed(3)
    D, W = 12, 4
    x = torch.randn(7, D, generator=gen)
    w = torch.randn(D, W, generator=gen)
    pool_a = torch.randn(3, W - 1, D, generator=gen)
    pool_b = pool_a.clone()
    cu, slots = cu_seqlens_of([3, 4]), torch.tensor([2, 0])
    whole = causal_conv1d_prefill(x, w, None, cu, pool_a, slots)
    parts = causal_conv1d_prefill(x, w, None, cu, pool_b, slots, split=3)
    assert parts.shape == (3, 7, 4) and parts.is_contiguous()
    assert torch.equal(torch.cat(list(parts.unbind(0)), dim=1), whole)
    dec = causal_conv1d_decode(x[:2], w, None, pool_b, slots, split=3)
    assert torch.equal(torch.cat(list(dec.unbind(0)), dim=1), causal_conv1d_decode(x[:2], w, None, pool_a, slots))
    with pytest.raises(ValueError, match="'split'"):
        causal_conv1d_prefill(x, w, None, cu, pool_a, slots, split=5)


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 60)), deadline=None)
@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=6), data=st.data())
def test_prefill_random_batches_match_conv1d(lengths, data):
    """Random ragged batches: sequences of 0-9 tokens (shorter than the window keep part of their old state),
    any mix of carried and fresh states, padded entries (zero output, pool untouched), with and without bias."""
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    D, W, S = 8, 4, 10
    x = torch.randn(sum(lengths), D, generator=gen)
    w = torch.randn(D, W, generator=gen)
    b = torch.randn(D, generator=gen) if data.draw(st.booleans()) else None
    pool = torch.randn(S, W - 1, D, generator=gen)
    before = pool.clone()
    slots = torch.randperm(S, generator=gen)[: len(lengths)]
    pad = data.draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths)))
    slots[torch.tensor(pad)] = PAD_SLOT
    has_init = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths))))
    y = causal_conv1d_prefill(x, w, b, cu_seqlens_of(lengths), pool, slots, has_init)
    start = 0
    for n, L in enumerate(lengths):
        if pad[n]:
            assert torch.equal(y[start:start + L], torch.zeros_like(y[start:start + L]))
        else:
            init = before[slots[n]] if has_init[n] else torch.zeros(W - 1, D)
            ref_y, ref_state = conv_truth(x[start:start + L], w, b, init)
            if L:
                assert rel_err(y[start:start + L], ref_y) < 1e-6
            assert torch.allclose(pool[slots[n]], ref_state.float(), atol=1e-6)
        start += L
    for s in set(range(S)) - {int(i) for i in slots if i != PAD_SLOT}:
        assert torch.equal(pool[s], before[s])


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_verify_equals_decode_token_by_token(pool_dtype):
    # causal_conv1d_verify over T tokens: the outputs of T single-token decodes, the sequence's own slot left as
    # it was, the state after token t in intermediate_slots[n, t]; -1 entries (a padded sequence, a dropped
    # state) write nothing, and a padded sequence's outputs are zeros.
    gen = torch.Generator().manual_seed(4)
    N, T, D, W, S = 4, 5, 12, 4, 32
    x = torch.randn(N, T, D, generator=gen).bfloat16().float()  # inputs a bf16 pool holds exactly
    w, b = torch.randn(D, W, generator=gen), torch.randn(D, generator=gen)
    pool = torch.randn(S, W - 1, D, generator=gen).to(pool_dtype)
    before = pool.clone()
    slots = torch.tensor([3, 0, PAD_SLOT, 9])
    inter = torch.arange(10, 10 + N * T).view(N, T)
    inter[1, 2] = PAD_SLOT
    y = causal_conv1d_verify(x, w, b, pool, slots, inter, split=3)
    assert y.shape == (3, N * T, D // 3) and y.is_contiguous()
    y = torch.cat(list(y.unbind(0)), dim=1).view(N, T, D)
    for n in range(N):
        if slots[n] == PAD_SLOT:
            assert torch.equal(y[n], torch.zeros_like(y[n])) and torch.equal(pool[inter[n]], before[inter[n]])
            continue
        state = before.clone()
        one = slots[n : n + 1]
        for t in range(T):
            ref = causal_conv1d_decode(x[n, t][None], w, b, state, one)[0]
            assert rel_err(y[n, t], ref) < 1e-6, (n, t)
            if inter[n, t] != PAD_SLOT:
                assert torch.equal(pool[inter[n, t]], state[slots[n]]), (n, t)
        assert torch.equal(pool[slots[n]], before[slots[n]])
    assert torch.equal(pool[10 + N * T :], before[10 + N * T :]) and torch.equal(pool[17], before[17])


def test_verify_bad_arguments_raise():
    x, w, pool = torch.randn(2, 3, 6), torch.randn(6, 4), torch.randn(8, 3, 6)
    slots, inter = torch.tensor([0, 1]), torch.tensor([[2, 3, 4], [5, 6, 7]])
    with pytest.raises(ValueError, match="'intermediate_slots': expected shape"):
        causal_conv1d_verify(x, w, None, pool, slots, inter[:, :2].contiguous())
    with pytest.raises(ValueError, match="'intermediate_slots': must differ"):
        causal_conv1d_verify(x, w, None, pool, slots, torch.tensor([[2, 3, 4], [5, 6, 1]]))
    with pytest.raises(ValueError, match="'intermediate_slots': index 9 out of range"):
        causal_conv1d_verify(x, w, None, pool, slots, torch.tensor([[2, 3, 4], [5, 6, 9]]))
    with pytest.raises(ValueError, match="'x': expected 3 dimensions"):
        causal_conv1d_verify(x[0], w, None, pool, slots, inter)
    with pytest.raises(ValueError, match="'state_indices'"):
        causal_conv1d_verify(x, w, None, pool, slots[:1], inter)
