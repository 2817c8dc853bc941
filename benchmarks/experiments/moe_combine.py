"""The MoE layer's work around its grouped GEMMs (experiment, not part of CI): one Kimi-Linear-48B MoE layer
(256 experts, top 8, 1 shared; bench_engine.py's random bf16 weights) at several token counts, timed by CUDA
events, three ways in the same run:

  before    session 16's code as the engine ran it (compiled router): rows gathered by advanced indexing,
            silu(gate) * up eagerly, the outputs scattered back to token order, then an fp32 copy, the
            weighting and the sum as three passes
  eager     this code with the compiled pieces off (index_select gather, one gather back by the inverse
            order); its output must equal `before`'s with the eager router bit for bit
  compiled  this code with the compiled pieces on, forced at every token count (the model uses them from
            moe.FUSED_MIN_TOKENS: the activation and the experts' gather-weight-sum each one fused kernel);
            its distance from `before` (same router) is printed

    python benchmarks/experiments/moe_combine.py [--tokens 64,2049,8192]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_engine import random_kimi48b_model  # noqa: E402
from common import time_ms  # noqa: E402

from kda_serving.model import moe as moe_module  # noqa: E402
from kda_serving.model.moe import MoE  # noqa: E402


def before(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """MoE.forward as of session 16."""
    ids, weights = moe.route(x)
    flat_ids = ids.reshape(-1)
    order = flat_ids.argsort(stable=True)
    rows = x[order // moe.top_k]
    experts = torch.arange(1, moe.num_experts + 1, device=x.device)
    ends = torch.searchsorted(flat_ids[order], experts, right=False).to(torch.int32)
    gate, up = torch._grouped_mm(rows, moe.gate_up_proj.transpose(1, 2), offs=ends).chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, moe.down_proj.transpose(1, 2), offs=ends)
    pairs = torch.empty_like(y)
    pairs[order] = y
    pairs = pairs.float().view(*ids.shape, -1) * weights[..., None]
    out = pairs.sum(1).to(x.dtype)
    return out + moe.shared_experts(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="64,2049,8192")
    args = ap.parse_args()
    model = random_kimi48b_model(torch.device("cuda"))
    moe = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE))
    print(torch.cuda.get_device_name())
    gen = torch.Generator(device="cuda").manual_seed(0)
    threshold = moe_module.FUSED_MIN_TOKENS
    with torch.inference_mode():
        for T in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(T, model.config.hidden_size, generator=gen, device="cuda").to(torch.bfloat16)
            model.compile_plain_ops(False)
            eager_equal = torch.equal(moe(x), before(moe, x))
            t_eager = time_ms(lambda: moe(x))
            model.compile_plain_ops(True)
            t_before = time_ms(lambda: before(moe, x))
            moe_module.FUSED_MIN_TOKENS = 0
            ref, out = before(moe, x), moe(x)
            diff = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            t_compiled = time_ms(lambda: moe(x))
            moe_module.FUSED_MIN_TOKENS = threshold
            print(f"T {T:5d}: before {t_before:.3f} ms  eager {t_eager:.3f} ms (bit-equal to before: "
                  f"{eager_equal})  compiled {t_compiled:.3f} ms (rel diff {diff:.1e})", flush=True)


if __name__ == "__main__":
    main()
