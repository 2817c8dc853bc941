"""flash-linear-attention backend: fla's `chunk_kda` and `fused_recurrent_kda` run on kda-serving's kernels.

fla (>= 0.6) dispatches `chunk_kda` through a backend registry (fla/backends.py): each backend has a priority
(lower runs first; FlashKDA is 3), an availability test, an enable switch (an environment variable) and a
verifier per function that returns (accepted, reason). `register()` adds our backend to the registry of
`chunk_kda` and to the "kda" operation registry that dispatches `fused_recurrent_kda_fwd`, at priority 2 so
it is tried before FlashKDA. Calls it does not accept fall through to the next backend, and finally to fla's
Triton kernels; fla logs which backend took each function once.

What we accept (what the CUDA kernels support, docs/kda-contract.md): CUDA tensors, bf16 q/k/v/g/beta,
K == V == 128, as many value heads as key heads, the gate, the q/k L2 norm and the beta sigmoid all done in
the kernel (`use_gate_in_kernel`, `use_qk_l2norm_in_kernel`, `use_beta_sigmoid_in_kernel`), A_log and
dt_bias given in fp32, either gate form (`lower_bound` in [-5, 0), or None for the softplus gate that FlashKDA
rejects), initial/final states in either layout (`state_v_first` or not: K-first states are transposed on
the way in and out), varlen `cu_seqlens`, inference only (no backward). Set KDA_SERVING_FLA=0 to turn it off.

Example:
    >>> import kda_serving.integrations.fla_backend as kda_fla
    >>> kda_fla.register()
    >>> from fla.ops.kda import chunk_kda
    >>> o, ht = chunk_kda(q, k, v, g, beta, A_log=A_log, dt_bias=dt_bias, use_gate_in_kernel=True,
    ...                   use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
    ...                   initial_state=h0, output_final_state=True, state_v_first=True)   # runs on kda-serving
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from kda_serving.ops import kda_prefill
from kda_serving.ops.contract import CUDA_HEAD_DIM

from .switches import FLA_SWITCH, integration_enabled, log_once

BACKEND_TYPE = "kda_serving"
PRIORITY = 2  # before FlashKDA (3); fla's default priority is 5
REQUIRE_CUDA = True  # our kernels are CUDA-only; tests on a CPU machine turn this off to exercise the mapping


def _bind(function, args, kwargs) -> dict[str, Any]:
    """The call's arguments by name, defaults filled in, extra keyword arguments flattened in."""
    bound = inspect.signature(inspect.unwrap(function)).bind(*args, **kwargs)
    bound.apply_defaults()
    named = dict(bound.arguments)
    named.update(named.pop("kwargs", {}) or {})
    return named


def _tensor_reason(a: dict[str, Any], state_name: str) -> str | None:
    """Why our kernels cannot take these activations/parameters/state, or None if they can."""
    q, k, v, g, beta = (a[n] for n in ("q", "k", "v", "g", "beta"))
    tensors = [t for t in (q, k, v, g, beta) if isinstance(t, torch.Tensor)]
    if len(tensors) != 5:
        return "q, k, v, g and beta must be tensors"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "kda-serving has no backward pass (inference only)"
    if REQUIRE_CUDA and not q.is_cuda:
        return f"kda-serving kernels run on CUDA, got {q.device}"
    if any(t.device != q.device for t in tensors):
        return "q, k, v, g and beta must be on one device"
    if any(t.dtype != torch.bfloat16 for t in tensors):
        return f"kda-serving needs bfloat16 activations, got {q.dtype}"
    if q.dim() != 4 or k.shape != q.shape or g.shape != q.shape or v.dim() != 4:
        return "q, k, g must be [B, T, H, K] and v [B, T, H, V]"
    B, T, H, K = q.shape
    if K != CUDA_HEAD_DIM or v.shape[-1] != CUDA_HEAD_DIM:
        return f"kda-serving needs K == V == {CUDA_HEAD_DIM}, got K={K}, V={v.shape[-1]}"
    if tuple(v.shape[:3]) != (B, T, H):
        return f"kda-serving does not support grouped value heads (HV={v.shape[2]} != H={H})"
    if tuple(beta.shape) != (B, T, H):
        return "beta must be [B, T, H] (one beta per head)"
    A_log, dt_bias = a.get("A_log"), a.get("dt_bias")
    if not isinstance(A_log, torch.Tensor) or not isinstance(dt_bias, torch.Tensor):
        return "kda-serving needs A_log and dt_bias tensors"
    if A_log.dtype != torch.float32 or dt_bias.dtype != torch.float32:
        return "kda-serving needs fp32 A_log and dt_bias"
    if A_log.numel() != H or dt_bias.numel() != H * K or A_log.device != q.device or dt_bias.device != q.device:
        return f"A_log must hold {H} and dt_bias {H * K} values on {q.device}"
    lower_bound = a.get("lower_bound")
    if lower_bound is not None and not (-5.0 <= float(lower_bound) < 0.0):
        return f"lower_bound must be in [-5, 0), got {lower_bound}"
    if a.get("cu_seqlens") is not None and B != 1:
        return "cu_seqlens needs batch size 1"
    state = a.get(state_name)
    if state is not None and (state.dtype not in (torch.float32, torch.bfloat16) or state.device != q.device):
        return "initial_state must be fp32 or bf16 on q's device"
    return None


def _flags_reason(a: dict[str, Any]) -> str | None:
    if not (a["use_gate_in_kernel"] and a["use_qk_l2norm_in_kernel"] and a["use_beta_sigmoid_in_kernel"]):
        return "kda-serving fuses the gate, q/k L2 norm and beta sigmoid: set all three *_in_kernel flags"
    if a["allow_neg_eigval"]:
        return "kda-serving does not support allow_neg_eigval"
    if "transpose_state_layout" in a:
        return "the deprecated transpose_state_layout is left to fla"
    return None


def chunk_kda_call_reason(args: tuple, kwargs: dict) -> str | None:
    """Why a `chunk_kda(*args, **kwargs)` call cannot run on kda-serving, or None if it can."""
    from fla.ops.kda import chunk_kda

    a = _bind(chunk_kda, args, kwargs)
    reason = _flags_reason(a) or _tensor_reason(a, "initial_state")
    if reason:
        return reason
    if a["cp_context"] is not None:
        return "kda-serving does not support context parallelism"
    if a["return_intermediate_states"]:
        return "kda-serving does not return per-chunk intermediate states"
    state = a["initial_state"]
    N = a["q"].shape[0] if a["cu_seqlens"] is None else a["cu_seqlens"].numel() - 1
    if state is not None and tuple(state.shape) != (N, a["q"].shape[2], CUDA_HEAD_DIM, CUDA_HEAD_DIM):
        return f"initial_state must be [N={N}, H, 128, 128]"
    return None


def fused_recurrent_kda_call_reason(args: tuple, kwargs: dict) -> str | None:
    """Why a `fused_recurrent_kda_fwd(*args, **kwargs)` call cannot run on kda-serving, or None if it can."""
    from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd

    a = _bind(fused_recurrent_kda_fwd, args, kwargs)
    reason = _flags_reason(a) or _tensor_reason(a, "initial_state")
    if reason:
        return reason
    if a["num_accepted_tokens"] is not None:
        return "speculative num_accepted_tokens is left to fla"
    indices = a["ssm_state_indices"]
    if indices is not None and indices.dim() != 1:
        return "per-token ssm_state_indices are left to fla"
    if a["inplace_final_state"]:
        if a["initial_state"] is None:
            return "inplace_final_state needs initial_state"
        if not a["state_v_first"]:
            return "an in-place state pool must be V-first ([S, H, V, K])"
        if not a["initial_state"].is_contiguous():
            return "the in-place state pool must be contiguous"
    out = a["out"]
    if out is not None and (out.shape != a["v"].shape or out.dtype != a["v"].dtype):
        return "out must be shaped like v"
    return None


def _state_in(state: torch.Tensor | None, v_first: bool) -> torch.Tensor | None:
    if state is None:
        return None
    return (state if v_first else state.transpose(-1, -2)).contiguous()


def _state_out(state: torch.Tensor | None, v_first: bool) -> torch.Tensor | None:
    if state is None or v_first:
        return state
    return state.transpose(-1, -2).contiguous()


def run_chunk_kda(args: tuple, kwargs: dict):
    """`chunk_kda` on kda-serving: returns (o [B, T, H, V], final_state [N, H, ., .] fp32 or None)."""
    from fla.ops.kda import chunk_kda

    a = _bind(chunk_kda, args, kwargs)
    q = a["q"]
    H, K = q.shape[2], q.shape[3]
    v_first = bool(a["state_v_first"])
    state = _state_in(a["initial_state"], v_first)
    if state is not None:
        state = state.float()  # fla keeps states in fp32; ours returns the final state in the initial's dtype
    result = kda_prefill(
        q.contiguous(), a["k"].contiguous(), a["v"].contiguous(), a["g"].contiguous(), a["beta"].contiguous(),
        a["A_log"].reshape(H).contiguous(), a["dt_bias"].reshape(H, K).contiguous(),
        scale=a["scale"], lower_bound=a["lower_bound"], cu_seqlens=a["cu_seqlens"], initial_state=state,
        output_final_state=bool(a["output_final_state"]),
    )
    return result.out, _state_out(result.final_state, v_first)


def run_fused_recurrent_kda(args: tuple, kwargs: dict):
    """`fused_recurrent_kda_fwd` on kda-serving: returns (o, final_state) like fla's."""
    from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd

    a = _bind(fused_recurrent_kda_fwd, args, kwargs)
    q = a["q"]
    B, H, K = q.shape[0], q.shape[2], q.shape[3]
    common = dict(scale=a["scale"], lower_bound=a["lower_bound"], cu_seqlens=a["cu_seqlens"])
    tensors = (q.contiguous(), a["k"].contiguous(), a["v"].contiguous(), a["g"].contiguous(),
               a["beta"].contiguous(), a["A_log"].reshape(H).contiguous(), a["dt_bias"].reshape(H, K).contiguous())
    if a["inplace_final_state"]:
        pool = a["initial_state"]
        N = B if a["cu_seqlens"] is None else a["cu_seqlens"].numel() - 1
        indices = a["ssm_state_indices"]
        if indices is None:
            indices = torch.arange(N, device=q.device, dtype=torch.int32)
        o = kda_prefill(*tensors, **common, state_pool=pool, state_indices=indices).out
        final = pool
    else:
        v_first = bool(a["state_v_first"])
        state = _state_in(a["initial_state"], v_first)
        result = kda_prefill(*tensors, **common, initial_state=None if state is None else state.float(),
                             output_final_state=bool(a["output_final_state"]))
        o, final = result.out, _state_out(result.final_state, v_first)
    if a["out"] is not None:
        a["out"].copy_(o)
        o = a["out"]
    return o, final


def _backend_class():
    """Our fla backend class (built on first use: fla is imported only when the plugin is registered)."""
    from fla.backends import BaseBackend

    class KDAServingFLABackend(BaseBackend):
        """kda-serving's SM90 KDA kernels for fla's chunk_kda / fused_recurrent_kda (inference only)."""

        backend_type = BACKEND_TYPE
        package_name = None
        env_var = FLA_SWITCH
        default_enable = True
        priority = PRIORITY

        @classmethod
        def is_available(cls) -> bool:
            return torch.cuda.is_available() or not REQUIRE_CUDA

        def chunk_kda_verifier(self, *args, **kwargs):
            reason = chunk_kda_call_reason(args, kwargs)
            return reason is None, reason

        def chunk_kda(self, *args, **kwargs):
            return run_chunk_kda(args, kwargs)

        def fused_recurrent_kda_fwd_verifier(self, *args, **kwargs):
            reason = fused_recurrent_kda_call_reason(args, kwargs)
            return reason is None, reason

        def fused_recurrent_kda_fwd(self, *args, **kwargs):
            return run_fused_recurrent_kda(args, kwargs)

    return KDAServingFLABackend


def register() -> bool:
    """Adds our backend to fla's chunk_kda and "kda" registries (replacing an earlier registration of ours,
    so calling it again is harmless). Returns False when KDA_SERVING_FLA=0."""
    if not integration_enabled(FLA_SWITCH):
        log_once("fla-off", "kda-serving: %s=0, fla keeps its own KDA backends", FLA_SWITCH)
        return False
    import fla.ops.kda.fused_recurrent  # noqa: F401  (defines the "kda" operation registry)
    from fla.backends import register as fla_register
    from fla.ops.kda import chunk_kda

    backend = _backend_class()
    fla_register(chunk_kda)(backend)
    fla_register("kda")(backend)
    log_once("fla-on", "kda-serving: registered as fla backend %r (priority %d)", BACKEND_TYPE, PRIORITY)
    return True
