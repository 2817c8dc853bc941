"""ops.flash_attention on the CPU (torch's CPU flash kernel per sequence) against a float64 reference written
here, and its argument checks. The CUDA kernel's tests (tests/gpu/test_flash_attention_cuda.py) use the same
reference and cases."""

from __future__ import annotations

import math

import pytest
import torch

from kda_serving.ops.flash_attention import flash_attention


def reference(q, k, v, lens_q, lens_k, causal: bool, scale: float):
    """float64 (out [Tq, H, Dv], lse [Tq, H]) one sequence, head and row at a time from the definition: row j of
    a sequence sees key l when not causal or l <= j + len_k - len_q; a row that sees none gets zeros and -inf."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    Tq, H, _ = q.shape
    out = torch.zeros(Tq, H, v.shape[2], dtype=torch.float64)
    lse = torch.full((Tq, H), -math.inf, dtype=torch.float64)
    q0 = k0 = 0
    for lq, lk in zip(lens_q, lens_k):
        for j in range(lq):
            seen = lk if not causal else max(0, min(lk, j + lk - lq + 1))
            if seen == 0:
                continue
            s = torch.einsum("hd,khd->hk", q[q0 + j], k[k0 : k0 + seen]) * scale  # [H, seen]
            row_lse = torch.logsumexp(s, dim=-1)
            out[q0 + j] = torch.einsum("hk,khd->hd", torch.exp(s - row_lse[:, None]), v[k0 : k0 + seen])
            lse[q0 + j] = row_lse
        q0, k0 = q0 + lq, k0 + lk
    return out, lse


def make_inputs(lens_q, lens_k, H, D, Dv, dtype, device, seed, spread=1.0):
    """q [Tq, H, D]; k and v strided views of one [Tk, H, D + Dv] buffer, as the MLA layer's expansion gives."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(sum(lens_q), H, D, generator=gen) * spread).to(device, dtype)
    kv = torch.randn(sum(lens_k), H, D + Dv, generator=gen).to(device, dtype)
    return q, kv[..., :D], kv[..., D:]


def compare(out, lse, ref_out, ref_lse, what, rel_tol, lse_tol):
    assert torch.isfinite(out).all(), f"{what}: non-finite output (unwritten or NaN)"
    assert not torch.isnan(lse).any(), f"{what}: NaN log-sum-exp (unwritten?)"
    out, lse = out.double().cpu(), lse.double().cpu()
    err = ((out - ref_out).norm() / ref_out.norm().clamp_min(1e-30)).item()
    max_err = (out - ref_out).abs().max().item()
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen), f"{what}: rows without keys must get lse -inf, the others finite"
    assert (out[~seen] == 0).all(), f"{what}: rows without keys must be zero"
    lse_err = (lse[seen] - ref_lse[seen]).abs().max().item() if seen.any() else 0.0
    print(f"{what}: |out-ref|/|ref| {err:.2e} (max {max_err:.2e}), max lse err {lse_err:.2e}")
    assert err < rel_tol and lse_err < lse_tol, what


CASES = [  # (lens_q, lens_k for the non-causal call, lens_k for the causal one)
    ([5, 0, 17, 3, 9], [5, 4, 40, 3, 0], [5, 0, 40, 2, 9]),  # empty sequences; causal keys < queries
    ([1], [1], [1]),
    ([33, 70], [300, 70], [33, 100]),  # causal with context before the queries (bottom right)
]


@pytest.mark.parametrize("lens_q,lens_k,lens_k_causal", CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D,Dv", [(24, 16), (16, 16), (8, 24)])
def test_cpu_path_matches_float64(lens_q, lens_k, lens_k_causal, causal, D, Dv):
    kl = lens_k_causal if causal else lens_k
    q, k, v = make_inputs(lens_q, kl, 3, D, Dv, torch.float32, "cpu", seed=sum(kl) + D, spread=3.0)
    out, lse = flash_attention(q, k, v, lens_q, kl, causal=causal, scale=D**-0.5)
    ref_out, ref_lse = reference(q, k, v, lens_q, kl, causal, D**-0.5)
    assert out.dtype == lse.dtype == torch.float32 and out.shape == (sum(lens_q), 3, Dv)
    compare(out, lse, ref_out, ref_lse, f"cpu {lens_q} causal {causal} D {D} Dv {Dv}", 1e-5, 1e-5)


def test_writes_into_given_buffers_and_bf16():
    lens_q, lens_k = [7, 20], [30, 20]
    q, k, v = make_inputs(lens_q, lens_k, 2, 16, 8, torch.bfloat16, "cpu", seed=3)
    big = torch.full((40, 2, 8), float("nan"))
    big_lse = torch.full((40, 2), float("nan"))
    out, lse = flash_attention(q, k, v, lens_q, lens_k, causal=False, scale=0.25, out=big[5:32], lse=big_lse[5:32])
    assert out.data_ptr() == big[5:].data_ptr() and lse.data_ptr() == big_lse[5:].data_ptr()
    assert torch.isnan(big[:5]).all() and torch.isnan(big[32:]).all()
    ref_out, ref_lse = reference(q, k, v, lens_q, lens_k, False, 0.25)
    compare(big[5:32], big_lse[5:32], ref_out, ref_lse, "cpu bf16 into buffers", 1e-2, 1e-2)


@pytest.mark.parametrize("bad,err", [
    (dict(q=torch.zeros(4, 2, 8, dtype=torch.int32)), ValueError),
    (dict(q=torch.zeros(4, 8)), ValueError),
    (dict(k=torch.zeros(6, 3, 8)), ValueError),
    (dict(v=torch.zeros(6, 2, 4, dtype=torch.float64)), ValueError),
    (dict(lens_q=[2, 1]), ValueError),
    (dict(lens_k=[6]), ValueError),
    (dict(lens_k=[7, -1]), TypeError),
    (dict(lens_q=[2.0, 2]), TypeError),
    (dict(scale=-1.0), ValueError),
    (dict(scale=float("nan")), ValueError),
    (dict(k=torch.zeros(6, 2, 8).transpose(0, 2).contiguous().transpose(0, 2)), ValueError),
    (dict(out=torch.zeros(4, 2, 8)), ValueError),  # values are 4 wide
    (dict(lse=torch.zeros(4, 2, dtype=torch.float64)), ValueError),
])
def test_bad_arguments_raise_naming_them(bad, err):
    args = dict(q=torch.zeros(4, 2, 8), k=torch.zeros(6, 2, 8), v=torch.zeros(6, 2, 4), lens_q=[2, 2],
                lens_k=[3, 3], scale=0.5, out=None, lse=None)
    args.update(bad)
    with pytest.raises(err, match="kda: argument"):
        flash_attention(args["q"], args["k"], args["v"], args["lens_q"], args["lens_k"], causal=False,
                        scale=args["scale"], out=args["out"], lse=args["lse"])


@pytest.mark.parametrize("rows_as", ["slice", "index"])
def test_merging_parts_equals_attention_over_all_keys(rows_as):
    """flash_attention over the first keys, then merge_attention of the rest's parts (each attended alone) into
    it: the float64 attention over all keys. Rows given as a slice of a larger buffer or as an index."""
    from kda_serving.ops.flash_attention import merge_attention

    H, D, Dv, Q = 3, 16, 8, 5
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(Q, H, D, generator=gen) * 2
    k = torch.randn(40, H, D, generator=gen)
    v = torch.randn(40, H, Dv, generator=gen)
    out = torch.full((Q + 4, H, Dv), float("nan"))
    lse = torch.full((Q + 4, H), float("nan"))
    where = slice(2, 2 + Q) if rows_as == "slice" else torch.tensor([6, 0, 3, 8, 1])
    first_o, first_l = flash_attention(q, k[:10], v[:10], [Q], [10], causal=False, scale=0.4)
    out[where], lse[where] = first_o, first_l
    parts = [flash_attention(q, k[a:b], v[a:b], [Q], [b - a], causal=False, scale=0.4)
             for a, b in ((10, 25), (25, 40))]
    merge_attention(out, lse, where, torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    ref_out, ref_lse = reference(q, k, v, [Q], [40], False, 0.4)
    compare(out[where], lse[where], ref_out, ref_lse, f"merge, rows as {rows_as}", 1e-5, 1e-5)
    untouched = torch.ones(Q + 4, dtype=torch.bool)
    untouched[where] = False
    assert torch.isnan(out[untouched]).all() and torch.isnan(lse[untouched]).all()


def test_merge_keeps_rows_without_keys_at_zero():
    from kda_serving.ops.flash_attention import merge_attention

    out, lse = torch.zeros(2, 1, 4), torch.tensor([[float("-inf")], [0.5]])
    part_o = torch.ones(1, 2, 1, 4)
    part_lse = torch.tensor([[[float("-inf")], [0.5]]])
    merge_attention(out, lse, slice(0, 2), part_o, part_lse)
    assert (out[0] == 0).all() and lse[0, 0] == float("-inf")
    torch.testing.assert_close(out[1], torch.full((1, 4), 0.5))  # half its weight from the part's ones
    torch.testing.assert_close(lse[1], torch.tensor([0.5 + math.log(2)]))


def test_merge_rejects_mismatched_parts():
    from kda_serving.ops.flash_attention import merge_attention

    out, lse = torch.zeros(4, 2, 8), torch.zeros(4, 2)
    with pytest.raises(ValueError, match="kda: argument 'part_o'"):
        merge_attention(out, lse, slice(0, 3), torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="kda: argument 'rows'"):
        merge_attention(out, lse, slice(0, 2), torch.zeros(1, 3, 2, 8), torch.zeros(1, 3, 2))
