"""The checks the ctypes bindings share (kda_serving/ops/cuda_args.py), on the CPU: each error names the
argument, and a failed launch becomes a RuntimeError naming the kernel and the CUDA error."""

import pytest
import torch

from kda_serving.ops import cuda_args


def test_cuda_tensor_errors_name_the_argument():
    with pytest.raises(TypeError, match="'q': expected a torch.Tensor"):
        cuda_args.cuda_tensor("q", [1.0], (torch.bfloat16,))
    with pytest.raises(TypeError, match="'q': dtype torch.float32 not supported"):
        cuda_args.cuda_tensor("q", torch.zeros(4), (torch.bfloat16,))
    with pytest.raises(ValueError, match="'q': must be on a CUDA device, is on cpu"):
        cuda_args.cuda_tensor("q", torch.zeros(4, dtype=torch.bfloat16), (torch.bfloat16,))


def test_check_aligned():
    base = torch.zeros(16, dtype=torch.bfloat16)
    cuda_args.check_aligned("x", base)
    with pytest.raises(ValueError, match="'x': the CUDA kernel needs 16-byte aligned data"):
        cuda_args.check_aligned("x", base[1:])


def test_check_launch(monkeypatch):
    monkeypatch.setattr(cuda_args, "_error_string", lambda: (lambda code: b"out of memory"))
    cuda_args.check_launch(0, "decode")  # cudaSuccess
    with pytest.raises(RuntimeError, match=r"kda: decode kernel launch failed: out of memory \(cudaError 2\)"):
        cuda_args.check_launch(2, "decode")
