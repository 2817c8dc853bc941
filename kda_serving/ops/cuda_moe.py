"""ctypes binding of the small-batch MoE kernel (csrc/moe/moe_gemv.cu) in the C-ABI library.

The public op (moe_experts.py) validates the call and allocates out and the fp32 activation workspace; the
function here checks what keeps the kernel inside its memory (dtypes, device, contiguity, sizes, alignment),
then enqueues its two kernels on torch's current stream. It neither allocates nor synchronises, so it can be
captured in a CUDA graph.

    moe_gemv(x, ids, weights, gate_up, gate_up_scale, down, down_scale, shared_gate_up, shared_down, h, residual,
             out)
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import cuda_lib
from .cuda_args import check_aligned, check_launch, cuda_tensor, stream_handle

ROW_MULTIPLE = 256  # hidden and the expert width: whole 8-element loads for each lane's share of a row
MAX_SHARED_BYTES = 96 * 1024  # the token's activations (fp32) in shared memory: hidden, and top_k * inter
MAX_PAIRS = 65535  # tokens * (top_k + shared parts): the first kernel's grid y
FP8 = torch.float8_e4m3fn


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The library loaded by cuda_lib.load(), with the MoE entry point typed."""
    lib = cuda_lib.load()
    fn = lib.kda_serving_moe_gemv
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    fn.argtypes = [p, i64, p, p, i32, i32, i32, p, p, p, p, i32, i32, i32, p, p, i32, p, p, p, p]
    fn.restype = ctypes.c_int
    return lib


def supports(x: torch.Tensor, gate_up: torch.Tensor, top_k: int, shared_parts: int = 0) -> bool:
    """Whether the kernel takes these experts: bf16 tokens on an SM90 GPU with the library, bf16 or e4m3
    experts [E, 2I, hidden] with hidden and I multiples of 256 and the activations (top_k routed and
    shared_parts shared ones per token, I wide) within shared memory."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and gate_up.dtype in (torch.bfloat16, FP8)):
        return False
    hidden, inter = gate_up.shape[2], gate_up.shape[1] // 2
    pairs = top_k + shared_parts
    return (hidden % ROW_MULTIPLE == 0 and inter % ROW_MULTIPLE == 0 and 4 * hidden <= MAX_SHARED_BYTES
            and 4 * pairs * inter <= MAX_SHARED_BYTES and x.shape[0] * pairs <= MAX_PAIRS
            and _runs_on(x.device.index or 0))


def shared_parts(gate_up: torch.Tensor, shared_gate_up: torch.Tensor | None) -> int:
    """How many expert-wide parts the shared experts [2S, hidden] make (S / I), 0 without them; -1 where the
    kernel cannot take them (not bf16, or S not a multiple of the routed experts' width I)."""
    if shared_gate_up is None:
        return 0
    inter, width = gate_up.shape[1] // 2, shared_gate_up.shape[0] // 2
    if shared_gate_up.dtype != torch.bfloat16 or width % inter or shared_gate_up.shape[1] != gate_up.shape[2]:
        return -1
    return width // inter


@functools.lru_cache(maxsize=8)
def _runs_on(index: int) -> bool:
    return cuda_lib.runs_on(index, "kda_serving_moe_gemv")


def moe_gemv(x, ids, weights, gate_up, gate_up_scale, down, down_scale, shared_gate_up, shared_down, h, residual,
             out) -> None:
    """out [T, hidden] = (residual[t] +) sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) (+ shared(x[t]))
    (moe_experts.py); h [T * (k + P), inter] fp32 is the kernel's workspace, P = shared_parts(gate_up,
    shared_gate_up)."""
    dev = x.device
    cuda_tensor("x", x, (torch.bfloat16,), ndim=2)
    T, hidden = x.shape
    cuda_tensor("ids", ids, (torch.int64,), dev, ndim=2)
    k = ids.shape[1]
    cuda_tensor("weights", weights, (torch.float32,), dev, ndim=2)
    fp8 = gate_up.dtype == FP8
    cuda_tensor("gate_up", gate_up, (torch.bfloat16, FP8), dev, ndim=3)
    E, two_i = gate_up.shape[:2]
    inter = two_i // 2
    cuda_tensor("down", down, (gate_up.dtype,), dev, ndim=3)
    if shared_gate_up is not None:
        cuda_tensor("shared_gate_up", shared_gate_up, (torch.bfloat16,), dev, ndim=2)
        cuda_tensor("shared_down", shared_down, (torch.bfloat16,), dev, ndim=2)
    parts = shared_parts(gate_up, shared_gate_up)
    if parts < 0:
        raise ValueError(f"kda: argument 'shared_gate_up': the MoE kernel takes shared experts [2S, {hidden}] with "
                         f"S a multiple of {inter}, got {tuple(shared_gate_up.shape)}")
    expected = {"ids": (T, k), "weights": (T, k), "gate_up": (E, 2 * inter, hidden), "down": (E, hidden, inter),
                "h": (T * (k + parts), inter), "out": (T, hidden)}
    if parts:
        expected.update({"shared_gate_up": (2 * parts * inter, hidden), "shared_down": (hidden, parts * inter)})
    cuda_tensor("h", h, (torch.float32,), dev)
    cuda_tensor("out", out, (torch.bfloat16,), dev)
    if residual is not None:
        cuda_tensor("residual", residual, (torch.bfloat16,), dev)
        expected["residual"] = (T, hidden)
    if fp8:
        cuda_tensor("gate_up_scale", gate_up_scale, (torch.float32,), dev)
        cuda_tensor("down_scale", down_scale, (torch.float32,), dev)
        expected.update({"gate_up_scale": (E, 2 * inter), "down_scale": (E, hidden)})
    args = {"ids": ids, "weights": weights, "gate_up": gate_up, "down": down, "h": h, "out": out,
            "gate_up_scale": gate_up_scale, "down_scale": down_scale, "shared_gate_up": shared_gate_up,
            "shared_down": shared_down, "residual": residual}
    for name, shape in expected.items():
        if tuple(args[name].shape) != shape:
            raise ValueError(f"kda: argument '{name}': expected shape {shape}, got {tuple(args[name].shape)}")
    if not supports(x, gate_up, k, parts):
        raise ValueError(f"kda: argument 'gate_up': the MoE kernel needs hidden and the expert width multiples of "
                         f"{ROW_MULTIPLE} with their activations within {MAX_SHARED_BYTES} bytes, got hidden "
                         f"{hidden}, width {inter}, top_k {k}, {T} tokens")
    for name in ("gate_up", "down", "h", "out") + (("shared_gate_up", "shared_down") if parts else ()):
        check_aligned(name, args[name])
    check_aligned("x", x)
    code = library().kda_serving_moe_gemv(
        x.data_ptr(), hidden, ids.data_ptr(), weights.data_ptr(), T, k, E, gate_up.data_ptr(),
        gate_up_scale.data_ptr() if fp8 else None, down.data_ptr(), down_scale.data_ptr() if fp8 else None,
        int(fp8), hidden, inter, shared_gate_up.data_ptr() if parts else None,
        shared_down.data_ptr() if parts else None, parts, h.data_ptr(),
        residual.data_ptr() if residual is not None else None, out.data_ptr(), stream_handle(dev))
    check_launch(code, "MoE GEMV")
