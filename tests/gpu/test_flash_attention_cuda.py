"""The varlen flash attention kernel (csrc/attention) against the float64 reference of
tests/ops/test_flash_attention.py, on fresh random inputs.

Sizes: heads of 192 for queries and keys and 128 for values (Kimi-Linear-48B's and DeepSeek-V3's MLA in the
expanded form), and 128/128. Keys and values are strided views of one buffer, as the MLA layer's expansion
gives them. Every output and log-sum-exp is poisoned with NaN first and must come back written. Cases:
lengths around the 128-row tiles, empty sequences, causal with as many keys as queries, with context before the
queries (the diagonal at the bottom right) and with fewer keys than queries (rows that see none: zeros and
-inf), many short sequences, one long one, scores in the hundreds (a naive softmax overflows), and repeat
calls bitwise equal.
"""

from __future__ import annotations

import pytest
import torch

from kda_serving.ops import cuda_attention
from kda_serving.ops.flash_attention import flash_attention
from ops.test_flash_attention import compare, make_inputs, reference  # tests/ops/test_flash_attention.py

pytestmark = pytest.mark.gpu


def needs_kernel():
    probe = torch.empty(1, device="cuda", dtype=torch.bfloat16)
    if not cuda_attention.supports(probe, 192, 128):
        pytest.skip("the flash attention kernel needs an SM90 GPU and the built library")


def run(q, k, v, lens_q, lens_k, causal, scale):
    """The op with NaN-poisoned outputs, written into slices of larger buffers (the rows around stay NaN)."""
    Tq, H = q.shape[:2]
    out_buf = torch.full((Tq + 3, H, v.shape[2]), float("nan"), device="cuda")
    lse_buf = torch.full((Tq + 3, H), float("nan"), device="cuda")
    out, lse = flash_attention(q, k, v, lens_q, lens_k, causal=causal, scale=scale, out=out_buf[1 : Tq + 1],
                               lse=lse_buf[1 : Tq + 1])
    torch.cuda.synchronize()
    assert torch.isnan(out_buf[0]).all() and torch.isnan(out_buf[Tq + 1 :]).all(), "wrote outside its rows"
    assert torch.isnan(lse_buf[0]).all() and torch.isnan(lse_buf[Tq + 1 :]).all(), "wrote outside its rows"
    return out, lse


CASES = [  # (lens_q, lens_k non-causal, lens_k causal)
    ([128], [128], [128]),
    ([1, 77, 300, 5], [9, 77, 1000, 5], [1, 77, 300, 5]),
    ([129, 0, 255, 3], [1, 130, 0, 700], [129, 0, 255, 3]),
    ([300, 64], [300, 64], [1000, 191]),  # causal with 700 / 127 keys of context before the queries
    ([200, 50], [200, 50], [70, 10]),  # causal with fewer keys than queries: the first rows see none
    ([3, 1, 4, 1, 5, 9, 2, 6, 5, 3] * 7, [5, 8, 9, 7, 9, 3, 2, 3, 8, 4] * 7, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3] * 7),
    ([2048], [4500], [2048]),
]


@pytest.mark.parametrize("D", [192, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_float64(D, causal, case):
    needs_kernel()
    lens_q, lens_k, lens_kc = CASES[case]
    kl = lens_kc if causal else lens_k
    H = 4 if sum(lens_q) * sum(kl) > 1 << 22 else 8  # the float64 reference is a loop over rows
    q, k, v = make_inputs(lens_q, kl, H, D, 128, torch.bfloat16, "cuda", seed=case * 10 + D + causal, spread=2.0)
    scale = D**-0.5
    out, lse = run(q, k, v, lens_q, kl, causal, scale)
    ref_out, ref_lse = reference(q, k, v, lens_q, kl, causal, scale)
    compare(out, lse, ref_out, ref_lse, f"D {D} causal {causal} {len(lens_q)} seqs", 1e-2, 2e-3)


def test_scores_in_the_hundreds_and_heads_of_48b():
    """32 heads (Kimi-Linear-48B at TP 1), queries scaled so scores reach several hundred: the online softmax
    must rescale without overflow."""
    needs_kernel()
    lens_q, lens_k = [130, 400], [900, 400]
    q, k, v = make_inputs(lens_q, lens_k, 32, 192, 128, torch.bfloat16, "cuda", seed=5, spread=50.0)
    for causal, kl in ((False, lens_k), (True, [530, 400])):
        k_, v_ = k[: sum(kl)], v[: sum(kl)]
        out, lse = run(q, k_, v_, lens_q, kl, causal, 192**-0.5)
        ref_out, ref_lse = reference(q, k_, v_, lens_q, kl, causal, 192**-0.5)
        assert ref_lse.abs().max() > 200  # exp() of such scores overflows fp32 above 88
        compare(out, lse, ref_out, ref_lse, f"scores in the hundreds, causal {causal}", 1e-2, 2e-3)


def test_no_keys_at_all_gives_zeros():
    """Sequences with queries and no keys, none in the call: zeros and -inf, the key tensors never read."""
    needs_kernel()
    q, k, v = make_inputs([5, 130], [0, 0], 4, 192, 128, torch.bfloat16, "cuda", seed=1)
    out, lse = run(q, k, v, [5, 130], [0, 0], False, 0.1)
    assert (out == 0).all() and (lse == float("-inf")).all()


def test_repeat_calls_are_bitwise_equal():
    needs_kernel()
    lens_q, lens_k = [500, 37, 1024], [500, 37, 1024]
    q, k, v = make_inputs(lens_q, lens_k, 8, 192, 128, torch.bfloat16, "cuda", seed=11)
    first = run(q, k, v, lens_q, lens_k, True, 0.1)
    second = run(q, k, v, lens_q, lens_k, True, 0.1)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_bad_layouts_raise():
    needs_kernel()
    q, k, v = make_inputs([4], [4], 2, 192, 128, torch.bfloat16, "cuda", seed=0)
    with pytest.raises(ValueError, match="kda: argument"):  # values of 64: not built
        flash_attention(q, k, v[..., :64], [4], [4], causal=False, scale=0.1)
    misaligned = torch.empty(4 * 2 * 192 + 4, device="cuda", dtype=torch.bfloat16)[4:].view(4, 2, 192)
    with pytest.raises(ValueError, match="kda: argument 'q'"):  # rows not 16-byte aligned
        flash_attention(misaligned, k, v, [4], [4], causal=False, scale=0.1)


def test_more_sequences_than_one_launch_holds():
    """70,000 sequences of one query and one key (the grid holds 65,535 a launch): each row's output is its key's
    value (one key takes all the weight, up to the rounding of exp2(s - s)) and its log-sum-exp the scaled
    score."""
    needs_kernel()
    n = 70_000
    q, k, v = make_inputs([1] * n, [1] * n, 2, 128, 128, torch.bfloat16, "cuda", seed=2)
    out, lse = run(q, k, v, [1] * n, [1] * n, False, 0.125)
    torch.testing.assert_close(out, v.float(), rtol=1e-6, atol=1e-6)
    scores = (q.double() * k.double()).sum(-1) * 0.125
    torch.testing.assert_close(lse.double(), scores, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("rows_as", ["slice", "index"])
def test_merge_kernel_matches_the_torch_ops(parts, rows_as):
    """The merge kernel against the same merge in torch ops (float64), into rows of a larger output: log-sum-exps
    far apart (one part dominates), rows without keys in any part, untouched rows left as they were."""
    from kda_serving.ops.flash_attention import _merge_torch, merge_attention

    needs_kernel()
    R, H, D = 300, 32, 128
    gen = torch.Generator(device="cuda").manual_seed(parts)
    out = torch.randn(R + 50, H, D, device="cuda", generator=gen)
    lse = torch.randn(R + 50, H, device="cuda", generator=gen) * 30
    part_o = torch.randn(parts, R, H, D, device="cuda", generator=gen)
    part_lse = torch.randn(parts, R, H, device="cuda", generator=gen) * 30
    where = slice(20, 20 + R) if rows_as == "slice" else torch.randperm(R + 50, device="cuda", generator=gen)[:R]
    lse_rows = lse[where]
    lse_rows[:7] = float("-inf")
    lse[where] = lse_rows
    part_lse[:, :7] = float("-inf")
    ref_out, ref_lse = out.double(), lse.double()
    _merge_torch(ref_out, ref_lse, None if rows_as == "slice" else where, 20, part_o.double(), part_lse.double())
    merge_attention(out, lse, where, part_o, part_lse)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref_out, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
