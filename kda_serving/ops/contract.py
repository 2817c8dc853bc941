"""The KDA operator contract: argument validation and the gate activation, shared by every backend.

See docs/kda-contract.md for the full statement. In short, per sequence and head, with state S [V, K]:

    q, k   <- L2-normalised (eps 1e-6 under the square root);  b = sigmoid(beta)
    a      <- lower_bound * sigmoid(exp(A_log) * (g + dt_bias))     (lower_bound form)
              -exp(A_log) * softplus(g + dt_bias)                   (lower_bound None: Kimi-Linear-48B)
    S      <- S * exp(a)[None, :]
    S      <- S + b * (v - S k) k^T
    o      <- scale * S q

Shapes: q, k, g [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; A_log [H]; dt_bias [H, K]. Varlen: B == 1 with
cu_seqlens [N+1]. States: dense initial_state [N, H, V, K], or a pool [S, H, V, K] indexed by
state_indices [N] with has_initial_state [N]. Violations raise TypeError/ValueError naming the argument.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F

L2_EPS = 1e-6
PAD_SLOT = -1  # a state index that marks a padded batch entry: nothing read or written
CHECKPOINT_ALIGN = 64  # prefill checkpoints sit on multiples of this many tokens
CUDA_HEAD_DIM = 128  # K == V the CUDA kernels are built for
STATE_DTYPES = (torch.float32, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
REFERENCE_DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.float16)


class KDACheckpoints(NamedTuple):
    """States to write during a prefill: after pos[m] tokens of sequence seq[m], into state_pool[slot[m]]."""

    seq: torch.Tensor  # [M] int32/int64
    pos: torch.Tensor  # [M] int32/int64, positive multiples of CHECKPOINT_ALIGN
    slot: torch.Tensor  # [M] int32/int64


@dataclass(frozen=True)
class KDAProblem:
    """What validation learned about a call: sizes and the state mode, for the backends to use."""

    batch: int  # B
    tokens: int  # T
    heads: int  # H
    key_dim: int  # K
    value_dim: int  # V
    num_seqs: int  # N
    state_mode: str  # "none" | "dense" | "pool"
    varlen: bool


def _fail(kind: type[Exception], name: str, message: str):
    raise kind(f"kda: argument '{name}': {message}")


def _check_pool(name: str, t, ndim: int, dtypes, device) -> torch.Tensor:
    """A slot pool [S, ...]: each slot contiguous, the slot dimension with any non-overlapping stride (serving
    engines such as vLLM keep several state tensors of one sequence inside one page)."""
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, name, f"expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        _fail(ValueError, name, f"expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        _fail(ValueError, name, "the pool has no slots")
    _check_tensor(name, t[0], ndim - 1, dtypes, device)
    if t.shape[0] > 1 and t.stride(0) < t[0].numel():
        _fail(ValueError, name, f"slot stride {t.stride(0)} is smaller than a slot ({t[0].numel()} elements)")
    return t


def _check_tensor(name: str, t, ndim: int | None = None, dtypes=None, device=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, name, f"expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        _fail(ValueError, name, f"expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        _fail(TypeError, name, f"dtype {str(t.dtype).replace('torch.', '')} not supported (expected {allowed})")
    if device is not None and t.device != device:
        _fail(ValueError, name, f"is on {t.device}, but q is on {device}")
    if not t.is_contiguous():
        _fail(ValueError, name, "must be contiguous")
    return t


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]):
    if tuple(t.shape) != tuple(shape):
        _fail(ValueError, name, f"expected shape {tuple(shape)}, got {tuple(t.shape)}")


_indices_checked_by_caller: ContextVar[bool] = ContextVar("kda_serving_indices_checked_by_caller", default=False)


@contextmanager
def indices_checked_by_caller() -> Iterator[None]:
    """Within this scope the ops skip their checks of index *values* (cu_seqlens, slot indices, checkpoints).

    Those checks copy the index tensors to the host: for CUDA tensors a device synchronisation each, about 12
    per KDA layer in a prefill step with prefix-cache checkpoints, after each of which the host no longer runs
    ahead of the GPU (docs/engine.md, "Host synchronisation"). A caller that built the indices itself and
    checked them once on the host (the engine: RaggedBatch.check; vLLM's and SGLang's metadata builders)
    opts out of them here. Types, shapes, dtypes and devices are still checked, as that costs no
    synchronisation. CUDA-graph capture skips the same checks.
    """
    token = _indices_checked_by_caller.set(True)
    try:
        yield
    finally:
        _indices_checked_by_caller.reset(token)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def skip_index_value_checks() -> bool:
    """Whether the index value checks (which read index tensors on the host) are skipped here."""
    return _indices_checked_by_caller.get() or _capturing()


def activation_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    return (torch.bfloat16,) if device.type == "cuda" else REFERENCE_DTYPES


def validate_gate_params(A_log, dt_bias, lower_bound, H: int, K: int, device) -> None:
    _check_tensor("A_log", A_log, 1, (torch.float32, torch.float64), device)
    _check_shape("A_log", A_log, (H,))
    _check_tensor("dt_bias", dt_bias, 2, (torch.float32, torch.float64), device)
    _check_shape("dt_bias", dt_bias, (H, K))
    if lower_bound is not None:
        if isinstance(lower_bound, bool) or not isinstance(lower_bound, (int, float)):
            _fail(TypeError, "lower_bound", f"expected a float or None, got {type(lower_bound).__name__}")
        if not (-5.0 <= float(lower_bound) < 0.0):
            _fail(ValueError, "lower_bound", f"must be in [-5, 0), got {lower_bound}")


def validate_scale(scale, K: int) -> float:
    if scale is None:
        return K**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        _fail(TypeError, "scale", f"expected a float, got {type(scale).__name__}")
    if not (scale == scale) or scale in (float("inf"), float("-inf")):
        _fail(ValueError, "scale", f"must be finite, got {scale}")
    return float(scale)


def validate_cu_seqlens(cu_seqlens, T: int, device) -> int:
    """Checks cu_seqlens [N+1] against T tokens; returns N."""
    _check_tensor("cu_seqlens", cu_seqlens, 1, INDEX_DTYPES, device)
    if cu_seqlens.shape[0] < 2:
        _fail(ValueError, "cu_seqlens", "needs at least 2 entries ([0, T] for one sequence)")
    if not skip_index_value_checks():
        host = cu_seqlens.detach().cpu()
        if int(host[0]) != 0:
            _fail(ValueError, "cu_seqlens", f"must start at 0, starts at {int(host[0])}")
        if bool((host[1:] < host[:-1]).any()):
            _fail(ValueError, "cu_seqlens", "must be non-decreasing")
        if int(host[-1]) != T:
            _fail(ValueError, "cu_seqlens", f"must end at T={T}, ends at {int(host[-1])}")
    return int(cu_seqlens.shape[0]) - 1


def validate_slot_indices(name: str, indices, count: int, pool_size: int, device, allow_pad: bool = True):
    _check_tensor(name, indices, indices.dim() if isinstance(indices, torch.Tensor) else 1, INDEX_DTYPES, device)
    if indices.numel() != count:
        _fail(ValueError, name, f"expected {count} entries, got {indices.numel()}")
    if skip_index_value_checks() or count == 0:
        return
    host = indices.detach().cpu().reshape(-1)
    real = host[host != PAD_SLOT] if allow_pad else host
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= pool_size):
        bad = int(real[(real < 0) | (real >= pool_size)][0])
        _fail(ValueError, name, f"index {bad} out of range for a pool of {pool_size} slots")
    if real.numel() != torch.unique(real).numel():
        _fail(ValueError, name, "indices must be distinct (two sequences cannot share a state slot)")


def validate_kda_args(
    q,
    k,
    v,
    g,
    beta,
    A_log,
    dt_bias,
    *,
    scale=None,
    lower_bound=None,
    cu_seqlens=None,
    initial_state=None,
    state_pool=None,
    state_indices=None,
    has_initial_state=None,
    checkpoints: KDACheckpoints | None = None,
    cuda_kernel: bool | None = None,
) -> KDAProblem:
    """Checks a prefill call against the contract and returns its sizes. Raises TypeError/ValueError."""
    if not isinstance(q, torch.Tensor):
        _fail(TypeError, "q", f"expected a torch.Tensor, got {type(q).__name__}")
    device = q.device
    if cuda_kernel is None:
        cuda_kernel = device.type == "cuda"
    dtypes = (torch.bfloat16,) if cuda_kernel else REFERENCE_DTYPES
    _check_tensor("q", q, 4, dtypes, device)
    B, T, H, K = q.shape
    _check_tensor("k", k, 4, (q.dtype,), device)
    _check_shape("k", k, (B, T, H, K))
    _check_tensor("v", v, 4, (q.dtype,), device)
    if tuple(v.shape[:3]) != (B, T, H):
        _fail(ValueError, "v", f"expected shape ({B}, {T}, {H}, V), got {tuple(v.shape)}")
    V = v.shape[3]
    _check_tensor("g", g, 4, (q.dtype,), device)
    _check_shape("g", g, (B, T, H, K))
    _check_tensor("beta", beta, 3, (q.dtype,), device)
    _check_shape("beta", beta, (B, T, H))
    if H == 0 or K == 0 or V == 0:
        _fail(ValueError, "q", f"heads and head sizes must be positive, got H={H}, K={K}, V={V}")
    if cuda_kernel and (K != CUDA_HEAD_DIM or V != CUDA_HEAD_DIM):
        _fail(ValueError, "q", f"the CUDA kernels need K == V == {CUDA_HEAD_DIM}, got K={K}, V={V}")
    validate_gate_params(A_log, dt_bias, lower_bound, H, K, device)
    validate_scale(scale, K)

    varlen = cu_seqlens is not None
    if varlen:
        if B != 1:
            _fail(ValueError, "cu_seqlens", f"varlen input needs batch size 1, got B={B}")
        N = validate_cu_seqlens(cu_seqlens, T, device)
    else:
        N = B

    mode = "none"
    if initial_state is not None and state_pool is not None:
        _fail(ValueError, "initial_state", "give either a dense initial_state or a state_pool, not both")
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, 4, STATE_DTYPES, device)
        _check_shape("initial_state", initial_state, (N, H, V, K))
        mode = "dense"
    if state_pool is not None:
        _check_pool("state_pool", state_pool, 4, STATE_DTYPES, device)
        if tuple(state_pool.shape[1:]) != (H, V, K):
            _fail(ValueError, "state_pool", f"expected shape (S, {H}, {V}, {K}), got {tuple(state_pool.shape)}")
        if state_indices is None:
            _fail(ValueError, "state_indices", "is required with state_pool")
        validate_slot_indices("state_indices", state_indices, N, state_pool.shape[0], device)
        if has_initial_state is not None:
            _check_tensor("has_initial_state", has_initial_state, 1, (torch.bool,), device)
            if has_initial_state.shape[0] != N:
                _fail(ValueError, "has_initial_state", f"expected {N} entries, got {has_initial_state.shape[0]}")
        mode = "pool"
    elif state_indices is not None or has_initial_state is not None:
        name = "state_indices" if state_indices is not None else "has_initial_state"
        _fail(ValueError, name, "only meaningful with state_pool")

    if checkpoints is not None:
        _validate_checkpoints(checkpoints, mode, N, T, B, cu_seqlens, state_pool, state_indices, device)
    return KDAProblem(B, T, H, K, V, N, mode, varlen)


def _validate_checkpoints(ckpt, mode, N, T, B, cu_seqlens, state_pool, state_indices, device):
    if not isinstance(ckpt, KDACheckpoints):
        _fail(TypeError, "checkpoints", f"expected KDACheckpoints, got {type(ckpt).__name__}")
    if mode != "pool":
        _fail(ValueError, "checkpoints", "need pool mode (state_pool and state_indices)")
    validate_checkpoints(ckpt, N, T, B, cu_seqlens, state_pool.shape[0], state_indices, device)


def validate_checkpoints(ckpt: KDACheckpoints, N: int, T: int, B: int, cu_seqlens, pool_size: int, state_indices,
                         device) -> None:
    """Checks prefill checkpoints for N sequences (B rows of T tokens, or varlen cu_seqlens) and a pool of
    pool_size slots, where the sequences' own states go to state_indices."""
    for name in ("seq", "pos", "slot"):
        _check_tensor(f"checkpoints.{name}", getattr(ckpt, name), 1, INDEX_DTYPES, device)
    M = ckpt.seq.shape[0]
    if ckpt.pos.shape[0] != M or ckpt.slot.shape[0] != M:
        _fail(ValueError, "checkpoints", "seq, pos and slot must have the same length")
    validate_slot_indices("checkpoints.slot", ckpt.slot, M, pool_size, device, allow_pad=False)
    if skip_index_value_checks() or M == 0:
        return
    seq, pos = ckpt.seq.cpu(), ckpt.pos.cpu()
    if int(seq.min()) < 0 or int(seq.max()) >= N:
        _fail(ValueError, "checkpoints.seq", f"sequence index out of range [0, {N})")
    lens = (cu_seqlens.cpu().diff() if cu_seqlens is not None else torch.full((B,), T))[seq.long()]
    if bool(((pos <= 0) | (pos % CHECKPOINT_ALIGN != 0)).any()):
        _fail(ValueError, "checkpoints.pos", f"positions must be positive multiples of {CHECKPOINT_ALIGN}")
    if bool((pos > lens).any()):
        _fail(ValueError, "checkpoints.pos", "a position lies beyond the end of its sequence")
    slots = set(ckpt.slot.cpu().tolist())
    if slots & set(state_indices.cpu().tolist()):
        _fail(ValueError, "checkpoints.slot", "checkpoint slots must differ from state_indices")


def gate_activation(g: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, lower_bound) -> torch.Tensor:
    """The per-channel log-decay a <= 0 from the raw gate g [..., H, K], in g's dtype (use fp32/fp64 inputs)."""
    x = g + dt_bias.to(g.dtype)
    rate = A_log.to(g.dtype).exp().unsqueeze(-1)
    if lower_bound is None:
        return -rate * F.softplus(x)
    return lower_bound * torch.sigmoid(rate * x)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


def seq_bounds(problem: KDAProblem, cu_seqlens) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence."""
    if problem.varlen:
        cu = cu_seqlens.detach().cpu().tolist()
        return [(0, cu[n], cu[n + 1]) for n in range(problem.num_seqs)]
    return [(b, 0, problem.tokens) for b in range(problem.batch)]


def validate_decode_args(
    q, k, v, g, beta, A_log, dt_bias, state_pool, state_indices, *, scale=None, lower_bound=None,
    intermediate_slots=None, visit_order=None, cuda_kernel: bool | None = None,
) -> KDAProblem:
    """Checks a decode call: q, k, g [N, T, H, K]; v [N, T, H, V]; beta [N, T, H]; pool [S, H, V, K]."""
    if not isinstance(q, torch.Tensor):
        _fail(TypeError, "q", f"expected a torch.Tensor, got {type(q).__name__}")
    device = q.device
    _check_tensor("q", q, 4, activation_dtypes(device), device)
    N, T, H, K = q.shape
    _check_tensor("k", k, 4, (q.dtype,), device)
    _check_shape("k", k, (N, T, H, K))
    _check_tensor("v", v, 4, (q.dtype,), device)
    if tuple(v.shape[:3]) != (N, T, H):
        _fail(ValueError, "v", f"expected shape ({N}, {T}, {H}, V), got {tuple(v.shape)}")
    V = v.shape[3]
    _check_tensor("g", g, 4, (q.dtype,), device)
    _check_shape("g", g, (N, T, H, K))
    _check_tensor("beta", beta, 3, (q.dtype,), device)
    _check_shape("beta", beta, (N, T, H))
    if T == 0:
        _fail(ValueError, "q", "decode needs at least one token per sequence (T >= 1)")
    if cuda_kernel is None:
        cuda_kernel = device.type == "cuda"
    if cuda_kernel and (K != CUDA_HEAD_DIM or V != CUDA_HEAD_DIM):
        _fail(ValueError, "q", f"the CUDA kernels need K == V == {CUDA_HEAD_DIM}, got K={K}, V={V}")
    validate_gate_params(A_log, dt_bias, lower_bound, H, K, device)
    validate_scale(scale, K)
    _check_pool("state_pool", state_pool, 4, STATE_DTYPES, device)
    if tuple(state_pool.shape[1:]) != (H, V, K):
        _fail(ValueError, "state_pool", f"expected shape (S, {H}, {V}, {K}), got {tuple(state_pool.shape)}")
    validate_slot_indices("state_indices", state_indices, N, state_pool.shape[0], device)
    if intermediate_slots is not None:
        _check_tensor("intermediate_slots", intermediate_slots, 2, INDEX_DTYPES, device)
        _check_shape("intermediate_slots", intermediate_slots, (N, T))
        validate_slot_indices("intermediate_slots", intermediate_slots, N * T, state_pool.shape[0], device)
        if not skip_index_value_checks():
            inter = set(intermediate_slots.cpu().reshape(-1).tolist()) - {PAD_SLOT}
            if inter & (set(state_indices.cpu().tolist()) - {PAD_SLOT}):
                _fail(ValueError, "intermediate_slots", "must differ from state_indices")
    if visit_order is not None:
        validate_visit_order(visit_order, state_indices, N, device)
    return KDAProblem(N, T, H, K, V, N, "pool", False)


def validate_visit_order(visit_order, state_indices, N: int, device) -> None:
    """visit_order [N, 2] int32: (n, state_indices[n]) for every sequence n once, in any order."""
    _check_tensor("visit_order", visit_order, 2, (torch.int32,), device)
    _check_shape("visit_order", visit_order, (N, 2))
    if skip_index_value_checks() or N == 0:
        return
    host = visit_order.detach().cpu().long()
    if not torch.equal(host[:, 0].sort().values, torch.arange(N)):
        _fail(ValueError, "visit_order", "column 0 must hold every sequence 0 .. N-1 once")
    if not torch.equal(host[:, 1], state_indices.detach().cpu().long()[host[:, 0]]):
        _fail(ValueError, "visit_order", "column 1 must be the slot state_indices gives its sequence")


def validate_conv_args(x, weight, bias, conv_pool, state_indices, *, cu_seqlens=None, has_initial_state=None,
                       activation="silu", decode=False) -> int:
    """Checks a short-conv call. x [T, D] (prefill, with cu_seqlens) or [N, D] (decode); weight [D, W];
    conv_pool [S, W-1, D]. Returns N."""
    if not isinstance(x, torch.Tensor):
        _fail(TypeError, "x", f"expected a torch.Tensor, got {type(x).__name__}")
    device = x.device
    _check_tensor("x", x, 2, activation_dtypes(device), device)
    T, D = x.shape
    _check_tensor("weight", weight, 2, (x.dtype, torch.float32), device)
    if weight.shape[0] != D or weight.shape[1] < 2:
        _fail(ValueError, "weight", f"expected shape ({D}, W) with W >= 2, got {tuple(weight.shape)}")
    W = weight.shape[1]
    if bias is not None:
        _check_tensor("bias", bias, 1, (x.dtype, torch.float32), device)
        _check_shape("bias", bias, (D,))
    if activation not in ("silu", None):
        _fail(ValueError, "activation", f"expected 'silu' or None, got {activation!r}")
    _check_pool("conv_pool", conv_pool, 3, (torch.float32, torch.bfloat16, torch.float16, torch.float64), device)
    if tuple(conv_pool.shape[1:]) != (W - 1, D):
        _fail(ValueError, "conv_pool", f"expected shape (S, {W - 1}, {D}), got {tuple(conv_pool.shape)}")
    if decode:
        N = T
    else:
        if cu_seqlens is None:
            _fail(ValueError, "cu_seqlens", "is required for the prefill convolution")
        N = validate_cu_seqlens(cu_seqlens, T, device)
        if has_initial_state is not None:
            _check_tensor("has_initial_state", has_initial_state, 1, (torch.bool,), device)
            if has_initial_state.shape[0] != N:
                _fail(ValueError, "has_initial_state", f"expected {N} entries, got {has_initial_state.shape[0]}")
    validate_slot_indices("state_indices", state_indices, N, conv_pool.shape[0], device)
    return N


def validate_conv_verify_args(x, weight, bias, conv_pool, state_indices, intermediate_slots, activation="silu") -> bool:
    """Checks a speculative-verify conv call: x [N, T, D], T tokens after each sequence's conv state;
    intermediate_slots [N, T] (the conv state after each token goes there). Returns whether an entry of either
    index list is padding (-1); False without looking where the index values are not checked here."""
    if not isinstance(x, torch.Tensor):
        _fail(TypeError, "x", f"expected a torch.Tensor, got {type(x).__name__}")
    _check_tensor("x", x, 3, activation_dtypes(x.device), x.device)
    N, T, D = x.shape
    if T < 1:
        _fail(ValueError, "x", "verify needs at least one token per sequence (T >= 1)")
    validate_conv_args(x.view(N * T, D)[:N], weight, bias, conv_pool, state_indices, activation=activation,
                       decode=True)
    _check_tensor("intermediate_slots", intermediate_slots, 2, INDEX_DTYPES, x.device)
    _check_shape("intermediate_slots", intermediate_slots, (N, T))
    validate_slot_indices("intermediate_slots", intermediate_slots, N * T, conv_pool.shape[0], x.device)
    if skip_index_value_checks():
        return False
    inter, seqs = intermediate_slots.cpu().reshape(-1).tolist(), state_indices.cpu().tolist()
    if (set(inter) - {PAD_SLOT}) & (set(seqs) - {PAD_SLOT}):
        _fail(ValueError, "intermediate_slots", "must differ from state_indices")
    return PAD_SLOT in inter or PAD_SLOT in seqs
