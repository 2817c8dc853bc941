"""The Kimi-Linear model the engine runs: loading, the ragged-batch forward, and the state/KV caches.

    model = load_model(path_or_None, device="cpu")          # None: the embedded tiny default model
    caches = model.allocate_caches(num_state_slots, num_kv_blocks, block_size)
    logits = model(batch, caches)                           # RaggedBatch -> fp32 [N, vocab]
"""

from __future__ import annotations

import os

import torch

from ..ops.contract import CUDA_HEAD_DIM
from .batch import RaggedBatch, StateCheckpoints
from .caches import ModelCaches
from .config import ModelConfig
from .kimi_linear import KimiLinearModel
from .loader import load_weights

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"load_model: 'dtype' {dtype!r} not supported (expected one of {sorted(_DTYPES)})")
        dtype = _DTYPES[dtype]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"load_model: 'dtype' must be a torch.dtype or a string, got {type(dtype).__name__}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"load_model: 'dtype' must be float32 or bfloat16, got {dtype}")
    if device.type == "cuda" and dtype != torch.bfloat16:
        raise ValueError("load_model: on CUDA the KDA kernels need 'dtype' bfloat16")
    return dtype


def default_model_path() -> str:
    """Directory of the embedded tiny default model (weights generated on first use; see default_model.py)."""
    from .default_model import default_model_path as _path  # lazy: keeps `python -m ...default_model` clean

    return _path()


def load_model(path: str | os.PathLike | None = None, device="cpu", dtype=None, progress: bool = True,
               quantization: str | None = None) -> KimiLinearModel:
    """Loads a Hugging Face `kimi_linear` checkpoint directory (None: the embedded default model).

    dtype defaults to bfloat16 on CUDA and float32 on the CPU. quantization: None, or "fp8" to hold the routed
    experts in e4m3, quantized while loading (model/fp8.py). Unsupported configs raise ValueError before any
    weight is read.
    """
    if path is None:
        path = default_model_path()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_model: 'path' must be a str, os.PathLike or None, got {type(path).__name__}")
    path = os.fspath(path)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"load_model: 'device' {device!r} is not a device") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("load_model: 'device' is CUDA but no CUDA device is available")
    dtype = _resolve_dtype(dtype, device)
    cfg = ModelConfig.from_file(path)
    if device.type == "cuda" and cfg.linear_head_dim != CUDA_HEAD_DIM:
        raise ValueError(
            f"kimi_linear config: 'linear_attn_config.head_dim' is {cfg.linear_head_dim}; the CUDA KDA kernels "
            f"need {CUDA_HEAD_DIM} (run this model on the CPU)"
        )
    if device.type == "cuda":
        _check_weights_fit(cfg, dtype, quantization, device)
    model = KimiLinearModel(cfg, dtype=dtype, device=device, path=path, quantization=quantization)
    load_weights(model, path, progress=progress)
    return model.eval()


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype, quantization: str | None = None) -> int:
    """Bytes of the model's weights at these settings (a parameter-only model on the meta device: no memory)."""
    model = KimiLinearModel(cfg, dtype=dtype, device="meta", quantization=quantization)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _check_weights_fit(cfg: ModelConfig, dtype: torch.dtype, quantization: str | None, device) -> None:
    """ValueError, before any allocation, if the weights alone exceed the GPU's free memory (a CUDA
    out-of-memory error halfway through the loading otherwise), pointing at fp8 experts where those fit."""
    free, _ = torch.cuda.mem_get_info(device)
    need = weight_bytes(cfg, dtype, quantization)
    if need <= free:
        return
    hint = ""
    if quantization is None and cfg.num_experts:
        fp8 = weight_bytes(cfg, dtype, "fp8")
        hint = (f"; with fp8 experts (quantization='fp8', kda-serve --quantization fp8) they take {fp8 / 1e9:.1f} GB"
                + ("" if fp8 <= free else ", still too many"))
    raise ValueError(f"load_model: the weights take {need / 1e9:.1f} GB in {str(dtype).removeprefix('torch.')}"
                     f"{' with fp8 experts' if quantization else ''}, but {device} has {free / 1e9:.1f} GB free{hint}")


__all__ = [
    "KimiLinearModel",
    "ModelCaches",
    "ModelConfig",
    "RaggedBatch",
    "StateCheckpoints",
    "default_model_path",
    "load_model",
    "weight_bytes",
]
