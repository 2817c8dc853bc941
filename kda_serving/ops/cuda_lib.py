"""ctypes binding of the CUDA prefill kernel in csrc/prefill (one C-ABI library, kda_serving/_lib/libkda_serving.so).

The library takes raw device pointers and a cudaStream_t, so it needs neither Python nor torch headers at
build time (docs/build.md). `KDA_SERVING_LIB=<path to .so>` overrides where it is loaded from;
`KDA_PREFILL_WARPS` (1, 2, 4 or 8) overrides the row-groups-per-CTA heuristic (benchmarks, tests).

`prefill(...)` expects arguments already validated against docs/kda-contract.md and outputs allocated by
kda_serving/ops/kda.py. It launches on torch.cuda.current_stream(), never synchronises with the host and
allocates only through torch (the two-pass workspace of ~900 bytes per token and head, a small int64
schedule scratch, int64 casts), so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path

import torch

LIB_ENV = "KDA_SERVING_LIB"
WARPS_ENV = "KDA_PREFILL_WARPS"
SEGMENTS_ENV = "KDA_PREFILL_SEGMENTS"  # time segments per sequence (opt-in; unset: none)
# Time segments only for calls with at most this many (sequence, head) pairs: they pay only for a few long
# sequences, and their scratch is 3 (G - 1) fp32 states per pair (256 pairs, G = 8: 344 MB).
SEGMENTS_MAX_PAIRS = 256
CHUNK = 16  # tokens per chunk of the kernels
_DEFAULT_LIB = Path(__file__).resolve().parent.parent / "_lib" / "libkda_serving.so"


class _PrefillParams(ctypes.Structure):
    """Mirror of KdaPrefillParams in csrc/prefill/params.h (same field order)."""

    _fields_ = [
        ("q", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("g", ctypes.c_void_p),
        ("beta", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("A_log", ctypes.c_void_p),
        ("dt_bias", ctypes.c_void_p),
        ("cu_seqlens", ctypes.c_void_p),
        ("initial_state", ctypes.c_void_p),
        ("final_state", ctypes.c_void_p),
        ("state_pool", ctypes.c_void_p),
        ("state_indices", ctypes.c_void_p),
        ("has_initial_state", ctypes.c_void_p),
        ("ckpt_seq_in", ctypes.c_void_p),
        ("ckpt_pos_in", ctypes.c_void_p),
        ("ckpt_slot_in", ctypes.c_void_p),
        ("ckpt_count", ctypes.c_int64),
        ("schedule", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p),
        ("chunk_bound", ctypes.c_int64),
        ("batch", ctypes.c_int64),
        ("seq_len", ctypes.c_int64),
        ("num_seqs", ctypes.c_int64),
        ("heads", ctypes.c_int32),
        ("initial_state_fp32", ctypes.c_int32),
        ("final_state_fp32", ctypes.c_int32),
        ("state_pool_fp32", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("lower_bound", ctypes.c_float),
        ("use_lower_bound", ctypes.c_int32),
        ("warps", ctypes.c_int32),
        ("segments", ctypes.c_int32),
        ("segment_scratch", ctypes.c_void_p),
        ("pool_slot_stride", ctypes.c_int64),
        # Derived by the library (pass 0); left null here.
        ("chunk_offsets", ctypes.c_void_p),
        ("ckpt_offsets", ctypes.c_void_p),
        ("ckpt_seq", ctypes.c_void_p),
        ("ckpt_pos", ctypes.c_void_p),
        ("ckpt_slot", ctypes.c_void_p),
        ("seq_order", ctypes.c_void_p),
    ]


def library_path() -> Path:
    env = os.environ.get(LIB_ENV)
    return Path(env) if env else _DEFAULT_LIB


@lru_cache(maxsize=None)
def _load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.kda_prefill_sm90.argtypes = [ctypes.POINTER(_PrefillParams), ctypes.c_void_p]
    lib.kda_prefill_sm90.restype = ctypes.c_int
    lib.kda_prefill_error_string.argtypes = [ctypes.c_int]
    lib.kda_prefill_error_string.restype = ctypes.c_char_p
    lib.kda_prefill_default_warps.argtypes = [ctypes.c_int64, ctypes.c_int32]
    lib.kda_prefill_default_warps.restype = ctypes.c_int
    lib.kda_prefill_chunk_ops_bytes.argtypes = []
    lib.kda_prefill_chunk_ops_bytes.restype = ctypes.c_int64
    lib.kda_prefill_segment_scratch_bytes.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32]
    lib.kda_prefill_segment_scratch_bytes.restype = ctypes.c_int64
    lib.kda_prefill_schedule_words.argtypes = [ctypes.c_int64, ctypes.c_int64]
    lib.kda_prefill_schedule_words.restype = ctypes.c_int64
    return lib


def load() -> ctypes.CDLL:
    """The loaded library; raises RuntimeError naming the path when it is missing or unloadable."""
    path = library_path()
    if not path.exists():
        raise RuntimeError(f"kda: CUDA library not found at {path} (build it with `python csrc/build.py`)")
    try:
        return _load(str(path))
    except OSError as e:
        raise RuntimeError(f"kda: cannot load CUDA library {path}: {e}") from e


def available() -> bool:
    """True when a CUDA device is visible and the library loads."""
    if not torch.cuda.is_available():
        return False
    try:
        load()
    except RuntimeError:
        return False
    return True


@lru_cache(maxsize=32)
def runs_on(index: int, entry_point: str) -> bool:
    """Whether the library's kernels (built for SM90 only) run on CUDA device `index` and it has `entry_point`
    (a library built before that kernel lacks it): an SM90 GPU, the library loads."""
    if torch.cuda.get_device_capability(index) != (9, 0):
        return False
    try:
        return hasattr(load(), entry_point)
    except RuntimeError:
        return False


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _as_int64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.int64).contiguous()


def _env_override(name: str, allowed: tuple[str, ...]) -> int:
    """The integer the environment variable `name` sets (one of `allowed`), or 0 (= the kernel's heuristic)."""
    value = os.environ.get(name, "")
    if not value:
        return 0
    if value not in allowed:
        raise ValueError(f"kda: {name} must be one of {', '.join(allowed)} here, got {value!r}")
    return int(value)


def _warps_override() -> int:
    return _env_override(WARPS_ENV, ("1", "2", "4", "8"))


def _segments_override() -> int:
    return _env_override(SEGMENTS_ENV, tuple(str(g) for g in range(1, 9)))


def default_warps(num_seqs: int, heads: int) -> int:
    """Row groups per recurrence CTA the kernel's heuristic picks (value slice = 16 * warps rows)."""
    return int(load().kda_prefill_default_warps(num_seqs, heads))


def _chunk_bound(varlen: bool, B: int, T: int, N: int) -> int:
    """Global chunk ids to launch, without a sync: fixed-length rows own ceil(T/16) chunks each; varlen
    sequences at most T // 16 + N (each adds at most one partial chunk; the library's pass 0 computes the exact
    offsets on the device and the extra ids exit)."""
    return T // CHUNK + N if varlen else B * ((T + CHUNK - 1) // CHUNK)


def prefill(q, k, v, g, beta, A_log, dt_bias, scale, lower_bound, cu_seqlens, initial_state, final_state,
            state_pool, state_indices, has_initial_state, ckpt_seq, ckpt_pos, ckpt_slot, out) -> None:
    """Runs the SM90 prefill kernel. Shapes per docs/kda-contract.md (K == V == 128, bf16 activations).

    Writes out [B, T, H, V], final_state [N, H, V, K] (dense mode) or the pool slots of state_indices and
    the checkpoint slots (pool mode). Raises RuntimeError if the launch fails.
    """
    lib = load()
    B, T, H, _ = q.shape
    varlen = cu_seqlens is not None
    N = cu_seqlens.shape[0] - 1 if varlen else B
    cu = _as_int64(cu_seqlens)
    indices = _as_int64(state_indices)
    hist = has_initial_state.contiguous() if has_initial_state is not None else None
    A_log32 = A_log.to(torch.float32).contiguous()
    dt_bias32 = dt_bias.to(torch.float32).contiguous()
    chunk_bound = _chunk_bound(varlen, B, T, N)
    nbytes = max(1, chunk_bound * H * int(lib.kda_prefill_chunk_ops_bytes()))
    workspace = torch.empty(nbytes, dtype=torch.uint8, device=q.device)
    has_ckpt = ckpt_seq is not None and ckpt_seq.numel() > 0
    ckpt = tuple(_as_int64(t) for t in (ckpt_seq, ckpt_pos, ckpt_slot)) if has_ckpt else (None, None, None)
    ckpt_count = ckpt_seq.numel() if has_ckpt else 0
    segments = max(1, _segments_override())  # checked even where it does not apply
    if has_ckpt or N * H > SEGMENTS_MAX_PAIRS:
        segments = 1
    segment_scratch = None
    if segments > 1:
        nbytes = int(lib.kda_prefill_segment_scratch_bytes(B * T, N, H, segments))
        segment_scratch = torch.empty(nbytes, dtype=torch.uint8, device=q.device)
    schedule = None
    if varlen or has_ckpt:
        words = int(lib.kda_prefill_schedule_words(N, ckpt_count))
        schedule = torch.empty(words, dtype=torch.int64, device=q.device)

    params = _PrefillParams(
        q=_ptr(q), k=_ptr(k), v=_ptr(v), g=_ptr(g), beta=_ptr(beta), out=_ptr(out),
        A_log=_ptr(A_log32), dt_bias=_ptr(dt_bias32), cu_seqlens=_ptr(cu),
        initial_state=_ptr(initial_state), final_state=_ptr(final_state), state_pool=_ptr(state_pool),
        state_indices=_ptr(indices), has_initial_state=_ptr(hist),
        ckpt_seq_in=_ptr(ckpt[0]), ckpt_pos_in=_ptr(ckpt[1]), ckpt_slot_in=_ptr(ckpt[2]), ckpt_count=ckpt_count,
        schedule=_ptr(schedule), workspace=_ptr(workspace), chunk_bound=chunk_bound,
        batch=B, seq_len=T, num_seqs=N, heads=H,
        initial_state_fp32=int(initial_state is not None and initial_state.dtype == torch.float32),
        final_state_fp32=int(final_state is not None and final_state.dtype == torch.float32),
        state_pool_fp32=int(state_pool is not None and state_pool.dtype == torch.float32),
        scale=float(scale), lower_bound=0.0 if lower_bound is None else float(lower_bound),
        use_lower_bound=int(lower_bound is not None), warps=_warps_override(),
        segments=segments, segment_scratch=_ptr(segment_scratch),
        pool_slot_stride=0 if state_pool is None or state_pool.shape[0] < 2 else state_pool.stride(0),
    )
    stream = torch.cuda.current_stream(q.device).cuda_stream
    with torch.cuda.device(q.device):
        code = lib.kda_prefill_sm90(ctypes.byref(params), ctypes.c_void_p(stream))
    if code != 0:
        msg = lib.kda_prefill_error_string(code).decode()
        raise RuntimeError(f"kda: prefill kernel launch failed: {msg} (cudaError {code})")
