"""Varlen attention forward with each row's log-sum-exp: the MLA layers' prompt tokens in the expanded form
(kda_serving/model/mla_prefill.py), whose callers merge a row's parts over several key ranges.

    out, lse = flash_attention(q, k, v, lens_q, lens_k, causal=..., scale=...)

q [Tq, H, D], k [Tk, H, D], v [Tk, H, Dv]; sequence i owns the next lens_q[i] query rows and lens_k[i] key
rows, in order. Per sequence, row j and head h, over the keys l the row sees (all of the sequence's, or with
`causal` those with l <= j + lens_k[i] - lens_q[i], the diagonal aligned at the bottom right):

    out[j, h] = sum_l softmax_l(scale q[j, h] . k[l, h]) v[l, h]       (fp32)
    lse[j, h] = log sum_l exp(scale q[j, h] . k[l, h])                 (fp32; -inf, with a zero row, if none)

Rows of q, k and v may be strided (views of one buffer); the last dimension must be contiguous. CUDA tensors
run the kernel of csrc/attention (SM90, bf16, D 128 or 192, Dv 128: cuda_attention.supports); CPU tensors
torch's CPU flash kernel one sequence at a time, the path the default model runs.
"""

from __future__ import annotations

from itertools import accumulate

import torch

from . import cuda_attention
from .contract import _fail, validate_scale

Tensor = torch.Tensor


@torch.library.custom_op("kda_serving::flash_attention_", mutates_args=("out", "lse"))
def _flash_attention_op(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, causal: bool,
                        scale: float, out: Tensor, lse: Tensor) -> None:
    """CPU implementation (torch's CPU flash kernel per sequence); the CUDA one is registered below."""
    D, Dv = q.shape[2], v.shape[2]
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    for q0, q1, k0, k1 in zip(starts_q, starts_q[1:], starts_k, starts_k[1:]):
        lq, lk = q1 - q0, k1 - k0
        if lq == 0:
            continue
        if lk == 0 or (causal and lk < lq) or Dv > D:  # rows that see no key, or sizes the flash kernel lacks
            o, l = _materialized(q[q0:q1], k[k0:k1], v[k0:k1], causal, scale)
        else:
            vs = v[k0:k1] if Dv == D else torch.nn.functional.pad(v[k0:k1], (0, D - Dv))
            # the CPU flash kernel's is_causal aligns the diagonal at the top left: with more keys than queries
            # the bottom-right diagonal goes in as an additive mask instead
            o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                *(t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], vs)), 0.0, causal and lk == lq,
                attn_mask=_bottom_right_mask(lq, lk, q.dtype) if causal and lk != lq else None, scale=scale)[:2]
            o, l = o[0, :, :, :Dv].transpose(0, 1), l[0].transpose(0, 1)
        out[q0:q1] = o
        lse[q0:q1] = l


def _bottom_right_mask(lq: int, lk: int, dtype) -> Tensor:
    """Additive mask [lq, lk]: row j sees keys up to j + lk - lq."""
    mask = torch.zeros(lq, lk, dtype=dtype)
    return mask.masked_fill_(torch.ones(lq, lk, dtype=torch.bool).triu_(lk - lq + 1), float("-inf"))


def _materialized(q, k, v, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """One sequence with its scores materialised (fp32): rows that see no key get zeros and -inf."""
    lq, lk = q.shape[0], k.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if causal:
        scores.masked_fill_(torch.ones(lq, lk, dtype=torch.bool).triu_(lk - lq + 1), float("-inf"))
    row_lse = torch.logsumexp(scores, dim=-1)  # [H, q]; -inf for a row without keys
    probs = torch.exp(scores - row_lse.clamp_min(torch.finfo(torch.float32).min)[..., None])
    return torch.einsum("hqk,khd->qhd", probs, v.float()), row_lse.t()


@_flash_attention_op.register_kernel("cuda")
def _flash_attention_cuda(q, k, v, cu_q, cu_k, max_q, causal, scale, out, lse):
    cuda_attention.flash_attention(q, k, v, cu_q, cu_k, max_q, causal, scale, out, lse)


@_flash_attention_op.register_fake
def _(*args, **kwargs) -> None:
    return None


def _validate(q, k, v, lens_q, lens_k, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            _fail(TypeError, name, f"expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3 or not t.is_floating_point():
            _fail(ValueError, name, f"expected a float tensor [rows, heads, dim], got {t.dtype} {tuple(t.shape)}")
        if t.device != q.device or t.dtype != q.dtype:
            _fail(ValueError, name, f"is {t.dtype} on {t.device}, but q is {q.dtype} on {q.device}")
        if t.shape[2] > 1 and t.stride(2) != 1:
            _fail(ValueError, name, "the last dimension must be contiguous")
    if k.shape[1:] != q.shape[1:] or v.shape[:2] != k.shape[:2]:
        _fail(ValueError, "k", f"expected k [Tk, {q.shape[1]}, {q.shape[2]}] and v [Tk, {q.shape[1]}, Dv], got "
                               f"{tuple(k.shape)} and {tuple(v.shape)}")
    for name, lens, rows in (("lens_q", lens_q, q.shape[0]), ("lens_k", lens_k, k.shape[0])):
        if not isinstance(lens, (list, tuple)) or any(isinstance(n, bool) or not isinstance(n, int) or n < 0
                                                      for n in lens):
            _fail(TypeError, name, "expected a list of ints >= 0")
        if sum(lens) != rows:
            _fail(ValueError, name, f"the lengths sum to {sum(lens)}, but the tensor has {rows} rows")
    if len(lens_q) != len(lens_k):
        _fail(ValueError, "lens_k", f"expected {len(lens_q)} sequences, got {len(lens_k)}")
    if scale is None or scale <= 0:
        _fail(ValueError, "scale", f"expected a positive float, got {scale!r}")
    validate_scale(scale, q.shape[2])


def cumulative_lengths(lens_q: list[int], lens_k: list[int], device) -> tuple[Tensor, Tensor]:
    """([0, q0, q0 + q1, ...], [0, k0, ...]) as int32 on `device`, both in one copy to it."""
    both = [*accumulate(lens_q, initial=0), *accumulate(lens_k, initial=0)]
    return tuple(torch.tensor(both, dtype=torch.int32).to(device, non_blocking=True).split(len(lens_q) + 1))


def flash_attention(q: Tensor, k: Tensor, v: Tensor, lens_q: list[int], lens_k: list[int], *, causal: bool,
                    scale: float, cu: tuple[Tensor, Tensor] | None = None, out: Tensor | None = None,
                    lse: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Varlen attention forward (module docstring).

    Args:
        q, k, v: [Tq, H, D], [Tk, H, D], [Tk, H, Dv], rows in sequence order (bf16 on CUDA).
        lens_q, lens_k: host lists of each sequence's query and key rows.
        causal: mask keys past each row's diagonal (aligned at the bottom right).
        scale: softmax scale.
        cu: the cumulative lengths as int32 tensors on q's device, where the caller has them.
        out, lse: fp32 [Tq, H, Dv] and [Tq, H] to write into (each with a contiguous last dimension), else new.
    Returns:
        (out, lse).
    """
    _validate(q, k, v, lens_q, lens_k, scale)
    Tq, H = q.shape[:2]
    for name, t, shape in (("out", out, (Tq, H, v.shape[2])), ("lse", lse, (Tq, H))):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.device != q.device
                              or tuple(t.shape) != shape or t.stride(-1) != 1):
            _fail(ValueError, name, f"expected fp32 {shape} on {q.device} with a contiguous last dimension")
    out = torch.empty(Tq, H, v.shape[2], dtype=torch.float32, device=q.device) if out is None else out
    lse = torch.empty(Tq, H, dtype=torch.float32, device=q.device) if lse is None else lse
    if cu is None:
        cu = cumulative_lengths(lens_q, lens_k, q.device)
    if q.is_cuda and not cuda_attention.supports(q, q.shape[2], v.shape[2]):
        _fail(ValueError, "q", f"the CUDA kernel takes bf16 heads of {cuda_attention.QK_DIMS} with values of "
                               f"{cuda_attention.VALUE_DIM} on an SM90 GPU, got {q.dtype} D={q.shape[2]} "
                               f"Dv={v.shape[2]}")
    _flash_attention_op(q, k, v, cu[0], cu[1], max(lens_q, default=0), causal, float(scale), out, lse)
    return out, lse


def _merge_torch(out, lse, rows, row0: int, part_o, part_lse) -> None:
    """merge_attention in torch ops, on any device."""
    index = slice(row0, row0 + part_o.shape[1]) if rows is None else rows
    prev_out, prev_lse = out[index], lse[index]
    m = torch.maximum(prev_lse, part_lse.amax(0))
    finite = torch.where(m == float("-inf"), 0.0, m)  # a row without keys anywhere stays zero and -inf
    w_prev, w = torch.exp(prev_lse - finite), torch.exp(part_lse - finite)
    den = w_prev + w.sum(0)
    merged = (prev_out * w_prev[..., None] + (part_o * w[..., None]).sum(0)) / den.clamp_min(1e-38)[..., None]
    out[index] = torch.where((den > 0)[..., None], merged, 0.0)
    lse[index] = finite + torch.log(den)


@torch.library.custom_op("kda_serving::merge_attention_", mutates_args=("out", "lse"))
def _merge_op(out: Tensor, lse: Tensor, rows: Tensor | None, row0: int, part_o: Tensor, part_lse: Tensor) -> None:
    """CPU implementation (torch ops); on CUDA the kernel below (one launch instead of ~15 on SM90)."""
    _merge_torch(out, lse, rows, row0, part_o, part_lse)


@_merge_op.register_kernel("cuda")
def _merge_cuda(out, lse, rows, row0, part_o, part_lse):
    if cuda_attention.merge_supported(out):
        cuda_attention.merge(out, lse, rows, row0, part_o, part_lse)
    else:  # the library's kernels are built for SM90 only
        _merge_torch(out, lse, rows, row0, part_o, part_lse)


@_merge_op.register_fake
def _(*args, **kwargs) -> None:
    return None


def merge_attention(out: Tensor, lse: Tensor, rows: slice | Tensor, part_o: Tensor, part_lse: Tensor) -> None:
    """Folds n partial attention results into running ones, in place: for each of R rows and each head,

        m = max(lse[row], part_lse[0..n-1, r]);  w = exp(. - m)
        out[row] = (w_prev out[row] + sum_i w_i part_o[i, r]) / (w_prev + sum_i w_i);  lse[row] = m + log(sum)

    summed in order i = 0 .. n - 1 (results repeat). out [rows, H, D] fp32, lse [rows, H] fp32; rows a slice of
    R rows (step 1) or an int64 index of R rows on out's device; part_o [n, R, H, D], part_lse [n, R, H] fp32
    contiguous, each part normalised by its own log-sum-exp (as flash_attention returns them). A row without
    keys in any part stays zero with lse -inf."""
    if part_o.dim() != 4 or part_lse.shape != part_o.shape[:3] or out.dim() != 3 or out.shape[1:] != part_o.shape[2:] \
            or lse.shape != out.shape[:2] or not all(t.dtype == torch.float32 for t in (out, lse, part_o, part_lse)):
        _fail(ValueError, "part_o", f"expected fp32 part_o [n, R, H, D], part_lse [n, R, H], out [rows, H, D] and lse "
                                    f"[rows, H], got {tuple(part_o.shape)}, {tuple(part_lse.shape)}, "
                                    f"{tuple(out.shape)}, {tuple(lse.shape)}")
    if isinstance(rows, slice):
        if rows.step not in (None, 1) or (rows.stop or 0) - (rows.start or 0) != part_o.shape[1]:
            _fail(ValueError, "rows", f"a slice must have step 1 and {part_o.shape[1]} rows")
        row0, index = rows.start or 0, None
    else:
        row0, index = 0, rows
    _merge_op(out, lse, index, row0, part_o.contiguous(), part_lse.contiguous())
