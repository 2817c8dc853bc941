"""ctypes bindings of the decode and short-conv kernels (csrc/decode, csrc/conv) in the C-ABI library.

The public ops (kda.py, conv.py) validate arguments against the contract and allocate outputs; the functions
here check only what keeps the kernels inside their memory (dtypes, contiguity, device, sizes, alignment),
then enqueue the kernel on torch's current stream. They neither allocate nor synchronise, so a decode step
can be captured in a CUDA graph.

    decode(q, k, v, g, beta, A_log, dt_bias, scale, lower_bound, state_pool, state_indices, intermediate_slots,
           out, visit=None)                   q, k, g [N, T, H, 128]; v, out [N, T, H, 128]; beta [N, T, H]
    conv_prefill(x, weight, bias, cu_seqlens, conv_pool, state_indices, has_initial_state, silu, out)
    conv_decode(x, weight, bias, conv_pool, state_indices, silu, out)        x, out [T or N, D]; weight [D, 4]

The conv functions also take out [P, rows, D / P]: the output split into P contiguous parts (channel d goes
to part d // (D / P)), so one conv over a fused q|k|v projection writes q, k and v as separate tensors.

The library is the one kda_serving.ops.cuda_lib.load() finds ($KDA_SERVING_LIB, else kda_serving/_lib/).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import cuda_lib
from .cuda_args import check_aligned, check_launch, cuda_tensor, stream_handle

HEAD_DIM = 128  # csrc/decode/decode_params.h kHeadDim
CONV_WIDTH = 4  # csrc/conv/conv_params.h kWidth
CONV_CHANNEL_ALIGN = 8  # channels per thread (one 16-byte bf16 access)

_P = ctypes.c_void_p
_I = ctypes.c_int
_L = ctypes.c_int64
_F = ctypes.c_float

_SIGNATURES = {
    "kda_serving_decode": [_P, _P, _P, _P, _P, _P, _P, _P, _I, _L, _L, _P, _I, _P, _I, _P, _P, _L, _I, _I, _F, _I,
                           _F, _P],
    "kda_serving_conv_prefill": [_P, _P, _I, _P, _I, _P, _I, _L, _P, _I, _P, _I, _P, _P, _I, _L, _L, _I, _I, _I,
                                 _P],
    "kda_serving_conv_decode": [_P, _P, _I, _P, _I, _P, _I, _L, _P, _I, _P, _I, _L, _I, _I, _I, _P],
}


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The library loaded by cuda_lib.load(), with the decode/conv entry points typed."""
    lib = cuda_lib.load()
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = _I
    return lib


def _pool(name: str, t, dtypes, device, ndim: int) -> int:
    """A state pool: each slot contiguous, the slot dimension with any stride (vLLM keeps a layer's conv and
    recurrent states of one sequence in one page). Returns the slot stride in elements."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"kda: argument '{name}': expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"kda: argument '{name}': expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"kda: argument '{name}': the pool has no slots")
    if not t[0].is_contiguous():
        raise ValueError(f"kda: argument '{name}': each slot must be contiguous")
    cuda_tensor(name, t[0], dtypes, device)
    stride = t.stride(0) if t.shape[0] > 1 else t[0].numel()
    if stride < t[0].numel() or (stride * t.element_size()) % 16:
        raise ValueError(f"kda: argument '{name}': slot stride {stride} must cover a slot and keep 16-byte alignment")
    check_aligned(name, t)
    return stride


_INDEX = (torch.int32, torch.int64)
_BF16 = (torch.bfloat16,)
_FP32 = (torch.float32,)
_STATE = (torch.float32, torch.bfloat16)


def decode(q, k, v, g, beta, A_log, dt_bias, scale, lower_bound, state_pool, state_indices, intermediate_slots,
           out, visit=None) -> None:
    """T tokens for each of N sequences (docs/kda-contract.md, Decode); writes out and the pool in place.

    visit: None, or int32 [N, 2] (sequence, its slot) pairs, the order in which the kernel takes the sequences
    (a permutation: ops.kda.slot_visit_order). The kernel reads each slot from it, not from state_indices."""
    dev = cuda_tensor("q", q, _BF16, ndim=4).device
    N, T, H, K = q.shape
    for name, t in (("k", k), ("v", v), ("g", g), ("out", out)):
        cuda_tensor(name, t, _BF16, dev)
        if tuple(t.shape) != (N, T, H, HEAD_DIM):
            raise ValueError(f"kda: argument '{name}': expected shape {(N, T, H, HEAD_DIM)}, got {tuple(t.shape)}")
    if K != HEAD_DIM:
        raise ValueError(f"kda: argument 'q': the CUDA decode kernel needs K == V == {HEAD_DIM}, got K={K}")
    if tuple(cuda_tensor("beta", beta, _BF16, dev).shape) != (N, T, H):
        raise ValueError(f"kda: argument 'beta': expected shape {(N, T, H)}, got {tuple(beta.shape)}")
    if tuple(cuda_tensor("A_log", A_log, _FP32, dev).shape) != (H,):
        raise ValueError(f"kda: argument 'A_log': expected shape {(H,)}, got {tuple(A_log.shape)}")
    if tuple(cuda_tensor("dt_bias", dt_bias, _FP32, dev).shape) != (H, K):
        raise ValueError(f"kda: argument 'dt_bias': expected shape {(H, K)}, got {tuple(dt_bias.shape)}")
    pool_stride = _pool("state_pool", state_pool, _STATE, dev, ndim=4)
    if tuple(state_pool.shape[1:]) != (H, HEAD_DIM, HEAD_DIM):
        raise ValueError(f"kda: argument 'state_pool': expected shape (S, {H}, {HEAD_DIM}, {HEAD_DIM}), "
                         f"got {tuple(state_pool.shape)}")
    if cuda_tensor("state_indices", state_indices, _INDEX, dev).numel() != N:
        raise ValueError(f"kda: argument 'state_indices': expected {N} entries, got {state_indices.numel()}")
    slots_ptr, slots_int64 = None, 0
    if intermediate_slots is not None:
        if tuple(cuda_tensor("intermediate_slots", intermediate_slots, _INDEX, dev).shape) != (N, T):
            raise ValueError(f"kda: argument 'intermediate_slots': expected shape {(N, T)}, "
                             f"got {tuple(intermediate_slots.shape)}")
        slots_ptr, slots_int64 = intermediate_slots.data_ptr(), int(intermediate_slots.dtype == torch.int64)
    visit_ptr = None
    if visit is not None:
        if tuple(cuda_tensor("visit", visit, (torch.int32,), dev).shape) != (N, 2):
            raise ValueError(f"kda: argument 'visit': expected shape {(N, 2)}, got {tuple(visit.shape)}")
        if visit.data_ptr() % 8:  # each pair is one 8-byte load
            raise ValueError("kda: argument 'visit': the data must be 8-byte aligned")
        visit_ptr = visit.data_ptr()
    code = library().kda_serving_decode(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), g.data_ptr(), beta.data_ptr(), A_log.data_ptr(),
        dt_bias.data_ptr(), state_pool.data_ptr(), int(state_pool.dtype == torch.bfloat16), pool_stride,
        state_pool.shape[0],
        state_indices.data_ptr(), int(state_indices.dtype == torch.int64), slots_ptr, slots_int64, visit_ptr,
        out.data_ptr(), N, T, H, float(scale), int(lower_bound is not None),
        0.0 if lower_bound is None else float(lower_bound), stream_handle(dev),
    )
    check_launch(code, "decode")


def _conv_common(x, weight, bias, conv_pool, state_indices, out):
    dev = cuda_tensor("x", x, _BF16, ndim=2).device
    rows, D = x.shape
    if D % CONV_CHANNEL_ALIGN:
        raise ValueError(f"kda: argument 'x': the CUDA conv kernel needs D % {CONV_CHANNEL_ALIGN} == 0, got D={D}")
    cuda_tensor("weight", weight, _STATE, dev, ndim=2)
    if tuple(weight.shape) != (D, CONV_WIDTH):
        raise ValueError(f"kda: argument 'weight': the CUDA conv kernel needs shape {(D, CONV_WIDTH)}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(cuda_tensor("bias", bias, _STATE, dev).shape) != (D,):
        raise ValueError(f"kda: argument 'bias': expected shape {(D,)}, got {tuple(bias.shape)}")
    _pool("conv_pool", conv_pool, _STATE, dev, ndim=3)
    if tuple(conv_pool.shape[1:]) != (CONV_WIDTH - 1, D):
        raise ValueError(f"kda: argument 'conv_pool': expected shape (S, {CONV_WIDTH - 1}, {D}), "
                         f"got {tuple(conv_pool.shape)}")
    cuda_tensor("state_indices", state_indices, _INDEX, dev)
    parts = _output_parts(cuda_tensor("out", out, _BF16, dev), rows, D)
    for name, t in (("x", x), ("weight", weight), ("out", out)):
        check_aligned(name, t)
    return dev, rows, D, parts


def _output_parts(out: torch.Tensor, rows: int, D: int) -> int:
    """P for out [rows, D] (1) or the split layout [P, rows, D / P]; ValueError for anything else."""
    parts = out.shape[0] if out.dim() == 3 else 1
    split_ok = parts >= 1 and D % (CONV_CHANNEL_ALIGN * parts) == 0
    want = (rows, D) if out.dim() == 2 else (parts, rows, D // max(parts, 1))
    if out.dim() not in (2, 3) or not split_ok or tuple(out.shape) != want:
        raise ValueError(f"kda: argument 'out': expected shape {(rows, D)} or (P, {rows}, {D} / P) with "
                         f"{D} / P a multiple of {CONV_CHANNEL_ALIGN}, got {tuple(out.shape)}")
    return parts


def _conv_dtype_args(weight, bias, conv_pool, state_indices):
    return (
        weight.data_ptr(), int(weight.dtype == torch.bfloat16),
        None if bias is None else bias.data_ptr(), int(bias is not None and bias.dtype == torch.bfloat16),
        conv_pool.data_ptr(), int(conv_pool.dtype == torch.bfloat16),
        conv_pool.stride(0) if conv_pool.shape[0] > 1 else conv_pool[0].numel(),
        state_indices.data_ptr(), int(state_indices.dtype == torch.int64),
    )


def conv_prefill(x, weight, bias, cu_seqlens, conv_pool, state_indices, has_initial_state, silu: bool,
                 out) -> None:
    """Causal conv over packed sequences x [T, D] (cu_seqlens [N+1]); conv_pool updated in place."""
    dev, T, D, parts = _conv_common(x, weight, bias, conv_pool, state_indices, out)
    N = cuda_tensor("cu_seqlens", cu_seqlens, _INDEX, dev, ndim=1).numel() - 1
    if N < 0 or state_indices.numel() != N:
        raise ValueError(f"kda: argument 'state_indices': expected {max(N, 0)} entries (one per sequence), "
                         f"got {state_indices.numel()}")
    hist_ptr = None
    if has_initial_state is not None:
        if cuda_tensor("has_initial_state", has_initial_state, (torch.bool,), dev).numel() != N:
            raise ValueError(f"kda: argument 'has_initial_state': expected {N} entries")
        hist_ptr = has_initial_state.data_ptr()
    code = library().kda_serving_conv_prefill(
        x.data_ptr(), *_conv_dtype_args(weight, bias, conv_pool, state_indices), cu_seqlens.data_ptr(),
        int(cu_seqlens.dtype == torch.int64), hist_ptr, out.data_ptr(), parts, T, N, D, CONV_WIDTH,
        int(bool(silu)), stream_handle(dev),
    )
    check_launch(code, "conv prefill")


def conv_decode(x, weight, bias, conv_pool, state_indices, silu: bool, out) -> None:
    """One token per sequence: x [N, D] -> out [N, D]; the conv state of each slot shifts by one."""
    dev, N, D, parts = _conv_common(x, weight, bias, conv_pool, state_indices, out)
    if state_indices.numel() != N:
        raise ValueError(f"kda: argument 'state_indices': expected {N} entries, got {state_indices.numel()}")
    code = library().kda_serving_conv_decode(
        x.data_ptr(), *_conv_dtype_args(weight, bias, conv_pool, state_indices), out.data_ptr(), parts, N, D,
        CONV_WIDTH, int(bool(silu)), stream_handle(dev),
    )
    check_launch(code, "conv decode")
