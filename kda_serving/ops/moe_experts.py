"""The routed experts of a few tokens, as matrix-vector products: the MoE layers' decode steps.

    out = moe_experts_gemv(x, ids, weights, gate_up, down[, gate_up_scale, down_scale]
                           [, shared_gate_up=.., shared_down=..][, residual=..])

x [T, hidden]; ids [T, k] int64 the experts each token chose and weights [T, k] fp32 their routing weights
(model/moe.py's route_experts); gate_up [E, 2I, hidden] each expert's [gate; up] rows and down [E, hidden, I],
in the model dtype, or e4m3 with fp32 scales [E, 2I] and [E, hidden] per output row (model/fp8.py). Per token,

    out[t] = sum_j weights[t, j] * down_e (silu(gate_e x[t]) * up_e x[t]),   e = ids[t, j]

summed in order j = 0 .. k-1, in fp32, rounded once to x's dtype. With e4m3 experts the weights are
dequantized in the products and the activations stay in fp32 (W8A16; the grouped fp8 GEMMs of larger steps
also quantize the activations). Given the layer's shared experts too (a SwiGLU MLP in x's dtype,
shared_gate_up [2S, hidden] = [gate; up] and shared_down [hidden, S]), their output joins the sum in fp32
before the rounding: out[t] += shared_down (silu(gate_s x[t]) * up_s x[t]). On CUDA they need S a multiple of I
(cuda_moe.shared_parts), and then cost the MoE layer no kernel of its own. Given the decoder layer's residual
stream [T, hidden] (x's dtype), out = residual + the above, still rounded once: its add is no kernel either.

Registered as a torch custom op like the KDA ops. CUDA tensors run csrc/moe/moe_gemv.cu through cuda_moe.py
(bf16 tokens on SM90; docs/moe-gemv.md): each (token, expert) pair streams its expert's weights once, where a
grouped GEMM at a token or a few per expert spends its time in tile latency. CPU tensors run the same formula
in torch ops, the reference the kernel is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
FP8 = torch.float8_e4m3fn


def _dequantized(w: Tensor, scale: Tensor | None) -> Tensor:
    return w.float() if scale is None else w.float() * scale.float()[..., None]


def moe_experts_torch(x, ids, weights, gate_up, gate_up_scale, down, down_scale, shared_gate_up=None,
                      shared_down=None, residual=None) -> Tensor:
    """The formula in torch ops, in fp32, on any device (each pair's experts gathered whole: for few tokens)."""
    T, k = ids.shape
    inter = gate_up.shape[1] // 2
    flat = ids.reshape(-1)
    w1 = _dequantized(gate_up[flat], None if gate_up_scale is None else gate_up_scale[flat])  # [T*k, 2I, H]
    w2 = _dequantized(down[flat], None if down_scale is None else down_scale[flat])  # [T*k, H, I]
    xs = x.float().repeat_interleave(k, dim=0)  # pair p = t * k + j
    gate_up_out = torch.bmm(w1, xs[:, :, None])[..., 0]
    h = F.silu(gate_up_out[:, :inter]) * gate_up_out[:, inter:]
    y = torch.bmm(w2, h[:, :, None])[..., 0].view(T, k, -1)
    out = torch.zeros(T, y.shape[-1], dtype=torch.float32, device=x.device)
    for j in range(k):  # in order, as the kernel sums
        out += weights[:, j, None].float() * y[:, j]
    if shared_gate_up is not None:
        g, u = (x.float() @ shared_gate_up.float().T).chunk(2, dim=-1)
        out += (F.silu(g) * u) @ shared_down.float().T
    if residual is not None:
        out += residual.float()
    return out.to(x.dtype)


@torch.library.custom_op("kda_serving::moe_experts_gemv_", mutates_args=("out",))
def _moe_experts_op(x: Tensor, ids: Tensor, weights: Tensor, gate_up: Tensor, gate_up_scale: Tensor | None,
                    down: Tensor, down_scale: Tensor | None, shared_gate_up: Tensor | None,
                    shared_down: Tensor | None, residual: Tensor | None, out: Tensor) -> None:
    """CPU implementation (the CUDA one is registered below)."""
    out.copy_(moe_experts_torch(x, ids, weights, gate_up, gate_up_scale, down, down_scale, shared_gate_up,
                                shared_down, residual))


@_moe_experts_op.register_kernel("cuda")
def _moe_experts_cuda(x, ids, weights, gate_up, gate_up_scale, down, down_scale, shared_gate_up, shared_down,
                      residual, out):
    from . import cuda_moe

    parts = max(cuda_moe.shared_parts(gate_up, shared_gate_up), 0)  # a bad one is reported by moe_gemv
    h = torch.empty(x.shape[0] * (ids.shape[1] + parts), gate_up.shape[1] // 2, dtype=torch.float32,
                    device=x.device)
    # (the router's outputs may come strided from a compiled function; the kernel reads them densely)
    cuda_moe.moe_gemv(x.contiguous(), ids.contiguous(), weights.contiguous(), gate_up, gate_up_scale, down,
                      down_scale, shared_gate_up, shared_down, h,
                      None if residual is None else residual.contiguous(), out)


@_moe_experts_op.register_fake
def _(*args, **kwargs) -> None:
    return None


def _validate(x, ids, weights, gate_up, down, gate_up_scale, down_scale, shared_gate_up, shared_down,
              residual) -> None:
    """What holds on every device; the kernel's own limits are checked by cuda_moe.py."""
    tensors = {"x": x, "ids": ids, "weights": weights, "gate_up": gate_up, "down": down}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"kda: argument '{name}': expected a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"kda: argument '{name}': is on {t.device}, but x is on {x.device}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"kda: argument 'x': expected float [T, hidden], got {x.dtype} {tuple(x.shape)}")
    if ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"kda: argument 'ids': expected int64 [{x.shape[0]}, k], got {ids.dtype} {tuple(ids.shape)}")
    if weights.dtype != torch.float32 or weights.shape != ids.shape:
        raise ValueError(f"kda: argument 'weights': expected fp32 {tuple(ids.shape)}, got {weights.dtype} "
                         f"{tuple(weights.shape)}")
    if gate_up.dim() != 3 or gate_up.shape[1] % 2 or gate_up.shape[2] != x.shape[1]:
        raise ValueError(f"kda: argument 'gate_up': expected [E, 2I, {x.shape[1]}], got {tuple(gate_up.shape)}")
    E, two_i, hidden = gate_up.shape
    if tuple(down.shape) != (E, hidden, two_i // 2) or down.dtype != gate_up.dtype:
        raise ValueError(f"kda: argument 'down': expected {gate_up.dtype} {(E, hidden, two_i // 2)}, got "
                         f"{down.dtype} {tuple(down.shape)}")
    fp8 = gate_up.dtype == FP8
    for name, scale, shape in (("gate_up_scale", gate_up_scale, (E, two_i)), ("down_scale", down_scale, (E, hidden))):
        if fp8 != (scale is not None):
            raise ValueError(f"kda: argument '{name}': required with e4m3 experts and only with them")
        if scale is not None and (scale.dtype != torch.float32 or tuple(scale.shape) != shape
                                  or scale.device != x.device):
            raise ValueError(f"kda: argument '{name}': expected fp32 {shape} on {x.device}, got {scale.dtype} "
                             f"{tuple(scale.shape)} on {scale.device}")
    if (shared_gate_up is None) != (shared_down is None):
        raise ValueError("kda: arguments 'shared_gate_up' and 'shared_down': give both or neither")
    if shared_gate_up is not None:
        for name, t in (("shared_gate_up", shared_gate_up), ("shared_down", shared_down)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"kda: argument '{name}': expected a torch.Tensor, got {type(t).__name__}")
            if t.device != x.device or t.dtype != x.dtype:
                raise ValueError(f"kda: argument '{name}': expected {x.dtype} on {x.device}, got {t.dtype} on "
                                 f"{t.device}")
        if shared_gate_up.dim() != 2 or shared_gate_up.shape[0] % 2 or shared_gate_up.shape[1] != hidden:
            raise ValueError(f"kda: argument 'shared_gate_up': expected [2S, {hidden}], got "
                             f"{tuple(shared_gate_up.shape)}")
        if tuple(shared_down.shape) != (hidden, shared_gate_up.shape[0] // 2):
            raise ValueError(f"kda: argument 'shared_down': expected {(hidden, shared_gate_up.shape[0] // 2)}, got "
                             f"{tuple(shared_down.shape)}")
    if residual is not None and (not isinstance(residual, torch.Tensor) or residual.shape != x.shape
                                 or residual.dtype != x.dtype or residual.device != x.device):
        got = (f"{residual.dtype} {tuple(residual.shape)} on {residual.device}" if isinstance(residual, torch.Tensor)
               else type(residual).__name__)
        raise ValueError(f"kda: argument 'residual': expected {x.dtype} {tuple(x.shape)} on {x.device}, got {got}")


def moe_experts_gemv(x: Tensor, ids: Tensor, weights: Tensor, gate_up: Tensor, down: Tensor,
                     gate_up_scale: Tensor | None = None, down_scale: Tensor | None = None, *,
                     shared_gate_up: Tensor | None = None, shared_down: Tensor | None = None,
                     residual: Tensor | None = None) -> Tensor:
    """The routed experts' weighted sum per token, plus the shared experts and the residual where given (module
    docstring): [T, hidden] in x's dtype."""
    _validate(x, ids, weights, gate_up, down, gate_up_scale, down_scale, shared_gate_up, shared_down, residual)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.kda_serving.moe_experts_gemv_(x, ids, weights, gate_up, gate_up_scale, down, down_scale,
                                            shared_gate_up, shared_down, residual, out)
    return out
