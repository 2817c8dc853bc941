"""The short causal convolution Kimi-Linear applies to q, k and v before KDA (depthwise, kernel W=4, SiLU).

The conv state of a sequence is its last W-1 inputs, kept in a pool `conv_pool [S, W-1, D]` (token-major, so
a decode step reads and writes D contiguous values per row) and indexed like the KDA state pool.

    y_t = act(bias + sum_{w < W} weight[:, w] * x_{t - (W-1) + w})        (x before the sequence = conv state)

Prefill runs over a packed varlen batch (x [T, D], cu_seqlens [N+1]); decode takes one token per sequence
(x [N, D]). Both update the pool in place; index -1 marks a padded entry (zero output, no state change).
Registered as torch custom ops like the KDA ops; CPU tensors run the PyTorch code here, CUDA tensors the
kernels in csrc/conv through kda_serving/ops/cuda_decode.py.

Verify (speculative decoding) takes T tokens per sequence (x [N, T, D]) and, like kda_decode with
intermediate_slots, leaves the sequence's slot as it was and writes the conv state after each token to a slot
of its own. Its work is a few multiply-adds per channel and token, so one PyTorch implementation serves both
devices (a handful of tensor ops, without host reads when no entry is padded: capturable in a CUDA graph).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .contract import PAD_SLOT, validate_conv_args, validate_conv_verify_args

Tensor = torch.Tensor


def _write_output(out: Tensor, y: Tensor) -> None:
    """out is [rows, D], or [P, rows, D / P] when the caller asked for the channels split into P parts."""
    if out.dim() == 3:
        y = y.view(y.shape[0], out.shape[0], out.shape[2]).transpose(0, 1)
    out.copy_(y.to(out.dtype))


def _split_output(x: Tensor, split: int) -> Tensor:
    if isinstance(split, bool) or not isinstance(split, int) or split < 1 or x.shape[1] % split:
        raise ValueError(f"kda: argument 'split': must be a positive divisor of D={x.shape[1]}, got {split!r}")
    if split == 1:
        return torch.empty_like(x)
    return x.new_empty((split, x.shape[0], x.shape[1] // split))


def _finish(y: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    if bias is not None:
        y = y + bias.float()
    return F.silu(y) if silu else y


def _taps(windows: Tensor, weight: Tensor) -> Tensor:
    """sum_w windows[..., w, d] * weight[d, w] (the CPU ops' convolution). A multiply and a sum over the W taps:
    torch.einsum made it a batched product over the channels, 2-4x slower on the CPU (16 x 4 x 768: 153 vs 76 us;
    1024 tokens: 20.5 vs 4.7 ms)."""
    return (windows * weight.float().t()).sum(-2)


def _shifted_taps(buf: Tensor, first: Tensor, weight: Tensor) -> Tensor:
    """y[t] = sum_w buf[first[t] + w] * weight[:, w]: the prefill's convolution over rows of buf, one gather and
    one fused multiply-add per tap. Gathering the [T, W, D] windows first and reducing them (_taps) ran 7x
    slower on the CPU (2,048 tokens x 768 channels: 28.6 vs 4.2 ms)."""
    weight = weight.float()
    y = buf.index_select(0, first) * weight[:, 0]
    for w in range(1, weight.shape[1]):
        y.addcmul_(buf.index_select(0, first + w), weight[:, w])
    return y


@torch.library.custom_op("kda_serving::causal_conv1d_prefill_", mutates_args=("out", "conv_pool"))
def _conv_prefill_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], cu_seqlens: Tensor, conv_pool: Tensor,
                     state_indices: Tensor, has_initial_state: Optional[Tensor], silu: bool, out: Tensor) -> None:
    T, D = x.shape
    W = weight.shape[1]
    lens = cu_seqlens.detach().cpu().long().diff()
    N = lens.numel()
    idx = state_indices.long()
    real = idx != PAD_SLOT
    start = torch.zeros((N, W - 1, D), dtype=torch.float32, device=x.device)
    use = real if has_initial_state is None else real & has_initial_state
    start[use] = conv_pool[idx[use]].float()
    # One buffer holding, per sequence, its W-1 carried inputs followed by its new ones.
    seg = lens + (W - 1)
    seg_start = torch.cumsum(seg, 0) - seg
    buf = torch.empty((int(seg.sum()), D), dtype=torch.float32, device=x.device)
    seq_of_tok = torch.repeat_interleave(torch.arange(N), lens)
    tok_off = torch.arange(T) - (torch.cumsum(lens, 0) - lens)[seq_of_tok]
    buf[(seg_start[seq_of_tok] + (W - 1) + tok_off).to(x.device)] = x.float()
    carry_pos = (seg_start.unsqueeze(1) + torch.arange(W - 1)).reshape(-1)
    buf[carry_pos.to(x.device)] = start.reshape(-1, D)
    first = (seg_start[seq_of_tok] + tok_off).to(x.device)  # token t's window: rows first[t] .. first[t] + W-1
    y = _finish(_shifted_taps(buf, first, weight), bias, silu)
    y[~real.to(y.device)[seq_of_tok.to(y.device)]] = 0
    _write_output(out, y)
    tail = (seg_start + seg - (W - 1)).unsqueeze(1) + torch.arange(W - 1)  # [N, W-1] last W-1 of each segment
    new_state = buf[tail.to(x.device)]
    conv_pool[idx[real]] = new_state[real].to(conv_pool.dtype)


@_conv_prefill_op.register_kernel("cuda")
def _conv_prefill_cuda(x, weight, bias, cu_seqlens, conv_pool, state_indices, has_initial_state, silu, out):
    from . import cuda_decode

    cuda_decode.conv_prefill(x, weight, bias, cu_seqlens, conv_pool, state_indices, has_initial_state, silu, out)


@_conv_prefill_op.register_fake
def _(*args, **kwargs) -> None:
    return None


@torch.library.custom_op("kda_serving::causal_conv1d_decode_", mutates_args=("out", "conv_pool"))
def _conv_decode_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], conv_pool: Tensor, state_indices: Tensor,
                    silu: bool, out: Tensor) -> None:
    idx = state_indices.long()
    real = idx != PAD_SLOT
    N, D = x.shape
    W = weight.shape[1]
    window = torch.zeros((N, W, D), dtype=torch.float32, device=x.device)
    window[real, : W - 1] = conv_pool[idx[real]].float()
    window[:, W - 1] = x.float()
    y = _finish(_taps(window, weight), bias, silu)
    y[~real] = 0
    _write_output(out, y)
    conv_pool[idx[real]] = window[real, 1:].to(conv_pool.dtype)


@_conv_decode_op.register_kernel("cuda")
def _conv_decode_cuda(x, weight, bias, conv_pool, state_indices, silu, out):
    from . import cuda_decode

    cuda_decode.conv_decode(x, weight, bias, conv_pool, state_indices, silu, out)


@_conv_decode_op.register_fake
def _(*args, **kwargs) -> None:
    return None


@torch.library.custom_op("kda_serving::causal_conv1d_verify_", mutates_args=("out", "conv_pool"))
def _conv_verify_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], conv_pool: Tensor, state_indices: Tensor,
                    intermediate_slots: Tensor, has_pad: bool, silu: bool, out: Tensor) -> None:
    N, T, D = x.shape
    W = weight.shape[1]
    idx = state_indices.long()
    real = idx != PAD_SLOT
    # per sequence: its W-1 carried inputs, then its T new ones
    buf = torch.cat((conv_pool[idx.clamp(min=0)].float() * real[:, None, None], x.float()), dim=1)
    windows = buf.unfold(1, W, 1)  # [N, T, D, W]: window t ends at token t
    # einsum, not _taps: this op also runs on CUDA (inside verify graphs), where its GPU tests measured this form
    y = _finish(torch.einsum("ntdw,dw->ntd", windows, weight.float()), bias, silu)
    _write_output(out, (y * real[:, None, None]).view(N * T, D))
    # the state after token t is the W-1 inputs ending there: buf rows t+1 .. t+W-1
    states = buf.unfold(1, W - 1, 1)[:, 1:].transpose(2, 3).reshape(N * T, W - 1, D).to(conv_pool.dtype)
    inter = intermediate_slots.long().reshape(-1)
    if has_pad:  # which entries to write is read on the host
        keep = torch.nonzero((inter != PAD_SLOT) & real.repeat_interleave(T)).squeeze(1)
        inter, states = inter[keep], states[keep]
    conv_pool[inter] = states


@_conv_verify_op.register_fake
def _(*args, **kwargs) -> None:
    return None


def causal_conv1d_prefill(x: Tensor, weight: Tensor, bias: Tensor | None, cu_seqlens: Tensor, conv_pool: Tensor,
                          state_indices: Tensor, has_initial_state: Tensor | None = None,
                          activation: str | None = "silu", split: int = 1) -> Tensor:
    """Causal depthwise conv over packed sequences. x [T, D]; weight [D, W]; bias [D] or None;
    cu_seqlens [N+1]; conv_pool [S, W-1, D] (read where has_initial_state, then overwritten with each
    sequence's last W-1 inputs); state_indices [N]. Returns y [T, D] in x's dtype, or with split=P the
    channels as P contiguous parts [P, T, D / P] (a fused q|k|v conv hands back q, k, v without copies)."""
    validate_conv_args(x, weight, bias, conv_pool, state_indices, cu_seqlens=cu_seqlens,
                       has_initial_state=has_initial_state, activation=activation)
    out = _split_output(x, split)
    torch.ops.kda_serving.causal_conv1d_prefill_(x, weight, bias, cu_seqlens, conv_pool, state_indices,
                                                 has_initial_state, activation == "silu", out)
    return out


def causal_conv1d_decode(x: Tensor, weight: Tensor, bias: Tensor | None, conv_pool: Tensor, state_indices: Tensor,
                         activation: str | None = "silu", split: int = 1) -> Tensor:
    """One new token per sequence: x [N, D] -> y [N, D] (or [split, N, D / split], as in the prefill);
    conv_pool [S, W-1, D] shifted in place."""
    validate_conv_args(x, weight, bias, conv_pool, state_indices, activation=activation, decode=True)
    out = _split_output(x, split)
    torch.ops.kda_serving.causal_conv1d_decode_(x, weight, bias, conv_pool, state_indices, activation == "silu", out)
    return out


def causal_conv1d_verify(x: Tensor, weight: Tensor, bias: Tensor | None, conv_pool: Tensor, state_indices: Tensor,
                         intermediate_slots: Tensor, activation: str | None = "silu", split: int = 1) -> Tensor:
    """T tokens per sequence after its conv state: x [N, T, D] -> y [N * T, D] (or [split, N * T, D / split]).
    conv_pool[state_indices[n]] is only read; the state after token t goes to conv_pool[intermediate_slots[n, t]]
    (-1: not kept), as kda_decode's intermediate states do. Skipping -1 entries needs a host read of the
    indices: within indices_checked_by_caller() (and in CUDA-graph capture) neither index list may hold -1."""
    has_pad = validate_conv_verify_args(x, weight, bias, conv_pool, state_indices, intermediate_slots, activation)
    N, T, D = x.shape
    out = _split_output(x.view(N * T, D), split)
    torch.ops.kda_serving.causal_conv1d_verify_(x, weight, bias, conv_pool, state_indices, intermediate_slots,
                                                has_pad, activation == "silu", out)
    return out
