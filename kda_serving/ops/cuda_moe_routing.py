"""ctypes binding of the MoE routing kernels (csrc/moe/moe_route.cu) in the C-ABI library.

The public ops (moe_routing.py) pick the kernels where `supports_*` says so and allocate the outputs; the
functions here check what keeps each kernel inside its memory (dtypes, device, contiguity, shapes, alignment),
then enqueue it on torch's current stream. None allocates or synchronises: CUDA-graph capturable.

    router_logits(x [T, hidden] bf16, router [E, hidden] bf16, logits [T, E] fp32)
    router_topk(logits [T, E] fp32, bias [E] fp32, top_k, groups, topk_group, renormalize, scaling,
                ids [T, k] int64, weights [T, k] fp32)
    sort_pairs(ids [T, k] int64, num_experts, row_token [T*k], pair_row [T*k], ends [E] int32)
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import cuda_lib
from .cuda_args import check_aligned, check_launch, cuda_tensor, stream_handle

MAX_HIDDEN = 8192  # router_logits: a tile of 8 tokens' rows in shared memory
MAX_EXPERTS = 1024  # router_topk: 32 per lane; sort_pairs: a shared-memory count per warp and expert
MAX_TOP_K = 32  # a lane each
MAX_GROUPS = 32  # a lane each
ENTRY_POINTS = ("kda_serving_moe_router_logits", "kda_serving_moe_router_topk", "kda_serving_moe_sort_pairs")


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The library loaded by cuda_lib.load(), with the routing entry points typed."""
    lib = cuda_lib.load()
    p, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    signatures = {
        "kda_serving_moe_router_logits": [p, i64, p, i32, i32, i32, p, p],
        "kda_serving_moe_router_topk": [p, p, i32, i32, i32, i32, i32, i32, f32, p, p, p],
        "kda_serving_moe_sort_pairs": [p, i32, i32, i32, p, p, p, p],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=8)
def _runs_on(index: int) -> bool:
    return all(cuda_lib.runs_on(index, name) for name in ENTRY_POINTS)


def _on_sm90(t: torch.Tensor) -> bool:
    return t.is_cuda and _runs_on(t.device.index if t.device.index is not None else torch.cuda.current_device())


def supports_logits(x: torch.Tensor, router: torch.Tensor) -> bool:
    """Whether router_logits takes these: bf16 x and router on an SM90 GPU with the library, hidden a multiple
    of 8 up to 8,192."""
    hidden = router.shape[-1]
    return (x.dtype == torch.bfloat16 and router.dtype == torch.bfloat16 and hidden % 8 == 0
            and hidden <= MAX_HIDDEN and _on_sm90(x))


def supports_topk(router: torch.Tensor, top_k: int, groups: int) -> bool:
    """Whether router_topk takes the logits of this router [E, hidden]: up to 1,024 experts, top_k and groups up
    to 32, on an SM90 GPU."""
    return router.shape[0] <= MAX_EXPERTS and top_k <= MAX_TOP_K and groups <= MAX_GROUPS and _on_sm90(router)


def supports_sort(ids: torch.Tensor, num_experts: int) -> bool:
    """Whether sort_pairs takes these: up to 1,024 experts and 2^31 - 1 pairs, on an SM90 GPU."""
    return num_experts <= MAX_EXPERTS and ids.numel() < 2**31 and _on_sm90(ids)


def _shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"kda: argument '{name}': expected shape {shape}, got {tuple(t.shape)}")


def router_logits(x: torch.Tensor, router: torch.Tensor, logits: torch.Tensor) -> None:
    """logits = x . router^T in fp32 (csrc/moe/moe_route.cu), written in place."""
    dev = x.device
    cuda_tensor("x", x, (torch.bfloat16,), ndim=2)
    cuda_tensor("router", router, (torch.bfloat16,), dev, ndim=2)
    cuda_tensor("logits", logits, (torch.float32,), dev, ndim=2)
    (T, hidden), E = x.shape, router.shape[0]
    _shape("router", router, (E, hidden))
    _shape("logits", logits, (T, E))
    check_aligned("x", x)
    check_aligned("router", router)
    code = library().kda_serving_moe_router_logits(x.data_ptr(), x.stride(0), router.data_ptr(), T, E, hidden,
                                                   logits.data_ptr(), stream_handle(dev))
    check_launch(code, "MoE router logits")


def router_topk(logits: torch.Tensor, bias: torch.Tensor, top_k: int, groups: int, topk_group: int,
                renormalize: bool, scaling: float, ids: torch.Tensor, weights: torch.Tensor) -> None:
    """ids, weights = each token's top_k experts and routing weights (ops/moe_routing.py), written in place."""
    dev = logits.device
    cuda_tensor("logits", logits, (torch.float32,), ndim=2)
    cuda_tensor("bias", bias, (torch.float32,), dev, ndim=1)
    cuda_tensor("ids", ids, (torch.int64,), dev, ndim=2)
    cuda_tensor("weights", weights, (torch.float32,), dev, ndim=2)
    T, E = logits.shape
    _shape("bias", bias, (E,))
    _shape("ids", ids, (T, top_k))
    _shape("weights", weights, (T, top_k))
    code = library().kda_serving_moe_router_topk(logits.data_ptr(), bias.data_ptr(), T, E, top_k, groups,
                                                 topk_group, int(renormalize), scaling, ids.data_ptr(),
                                                 weights.data_ptr(), stream_handle(dev))
    check_launch(code, "MoE router top-k")


def sort_pairs(ids: torch.Tensor, num_experts: int, row_token: torch.Tensor, pair_row: torch.Tensor,
               ends: torch.Tensor) -> None:
    """The (token, expert) pairs of ids [T, k] sorted by expert (ops/moe_routing.py), written in place."""
    dev = ids.device
    cuda_tensor("ids", ids, (torch.int64,), ndim=2)
    for name, t, n in (("row_token", row_token, ids.numel()), ("pair_row", pair_row, ids.numel()),
                       ("ends", ends, num_experts)):
        cuda_tensor(name, t, (torch.int32,), dev, ndim=1)
        _shape(name, t, (n,))
    code = library().kda_serving_moe_sort_pairs(ids.data_ptr(), ids.numel(), ids.shape[1], num_experts,
                                                row_token.data_ptr(), pair_row.data_ptr(), ends.data_ptr(),
                                                stream_handle(dev))
    check_launch(code, "MoE pair sort")
