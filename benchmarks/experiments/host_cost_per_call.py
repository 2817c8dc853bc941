"""Host time of one call of each kind the model makes in an eager step (experiment, not part of CI): a custom op
through torch.ops, the same CUDA implementation called directly, the public op function, one aten kernel, a
GEMM, and the RMS norm compiled and eager. Each is the host time of 200 calls queued without waiting for the
device (the device drained between kinds).

    python benchmarks/experiments/host_cost_per_call.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/common.py

from common import host_us  # noqa: E402

from kda_serving.model.norm import rms_norm  # noqa: E402
from kda_serving.ops import gated_norm  # noqa: E402
from kda_serving.ops.gated_norm import _gated_rms_norm_cuda  # noqa: E402


@torch.inference_mode()
def main() -> None:
    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(64, 32, 128, device=dev, dtype=bf16)
    gate, weight, out = torch.randn_like(x), torch.ones(128, device=dev), torch.empty_like(x)
    h = torch.randn(64, 2304, device=dev, dtype=bf16)
    proj, norm_weight = torch.randn(2304, 2304, device=dev, dtype=bf16), torch.ones(2304, device=dev)
    compiled = torch.compile(rms_norm, dynamic=True)
    for tokens in (1, 2):  # as KimiLinearModel.compile_plain_ops warms it up
        compiled(torch.ones(tokens, 2304, device=dev, dtype=bf16), norm_weight, 1e-5)
    calls = {
        "torch.ops gated_rms_norm_": lambda: torch.ops.kda_serving.gated_rms_norm_(x, gate, weight, 1e-5, out),
        "its CUDA implementation": lambda: _gated_rms_norm_cuda(x, gate, weight, 1e-5, out),
        "public gated_rms_norm": lambda: gated_norm.gated_rms_norm(x, gate, weight, 1e-5),
        "x + 1 (one aten kernel)": lambda: x.add(1),
        "F.linear 64 x 2304 x 2304": lambda: torch.nn.functional.linear(h, proj),
        "compiled rms_norm, 64 tokens": lambda: compiled(h, norm_weight, 1e-5),
        "eager rms_norm, 64 tokens": lambda: rms_norm(h, norm_weight, 1e-5),
    }
    print(torch.cuda.get_device_name())
    for name, fn in calls.items():
        print(f"{name:30s} {host_us(fn, n=200):7.1f} us host per call")


if __name__ == "__main__":
    main()
