"""Feed-forward blocks: the dense SwiGLU MLP and the sigmoid-routed mixture of experts with shared experts.

Routing (transformers' KimiLinearTopkRouter, DeepSeek-V3 style), per token, in fp32:
    s = sigmoid(W_router x);  choice = s + e_score_correction_bias
    groups scored by the sum of their top-2 choice values; keep the best topk_group groups
    top_k experts by choice among the kept groups; weights w = s[top_k] (the bias only steers the choice)
    w = w / (sum(w) + 1e-20) if moe_renormalize;  w = w * routed_scaling_factor
    y = sum_e w_e expert_e(x) + shared_experts(x)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import (cuda_moe, linear, moe_experts_gemv, moe_route, moe_sort_pairs, quantize_rows_fp8,
                   silu_mul_quantize_fp8)
from ..ops.moe_routing import route_experts_reference, route_kernel_takes
from .config import ModelConfig
from .fp8 import FP8, fp8_linear, fp8_matmul, quantize_into_


def _param(*shape: int, dtype: torch.dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x) with gate_up [2I, hidden] = [gate; up] and down [hidden, I]."""
    return F.linear(silu_mul(F.linear(x, gate_up)), down)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] = [gate, up] -> silu(gate) * up [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def combine_experts(y: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The experts' outputs y [T * k, hidden] (pairs sorted by expert; pair (t, j) at row inverse[t * k + j])
    -> sum_j weights[t, j] * y[pair (t, j)] per token [T, hidden], in fp32, summed in a fixed order (no
    atomics: deterministic), rounded once. Compiled (KimiLinearModel.compile_plain_ops), the gather, the
    weighting and the sum are one kernel that reads y once; eager, three passes over fp32 copies of it."""
    pairs = y.index_select(0, inverse).view(*weights.shape, -1)
    return (pairs.float() * weights[..., None]).sum(1).to(y.dtype)


# Below this many tokens a step runs the eager activation and expert sum even on a compiled model: a compiled
# call costs more host time than its fused kernels save there (one Kimi-Linear-48B MoE layer on an H200,
# compiled vs eager, benchmarks/experiments/moe_combine.py, logs/session17/h200-moe-combine.log: 0.93 vs 0.63
# ms at 64 tokens, 0.96 vs 0.80 at 512, 1.05 vs 1.18 at 1,024, 1.48 vs 1.72 at 2,049, 3.45 vs 4.27 at 8,192).
FUSED_MIN_TOKENS = 1024
# Steps of at most this many tokens run the routed experts as matrix-vector products on CUDA (ops.moe_experts_gemv:
# each (token, expert) pair streams its expert's weights once), larger ones as grouped GEMMs, whose tiles are
# nearly all padding at a few tokens per expert. The crossover (one 48B layer, H100, benchmarks/bench_moe.py):
# bf16 experts 2.13x at 1 token, 1.13x at 8, 0.74x at 16; e4m3 2.57x, 1.42x, 0.95x (docs/moe-gemv.md).
GEMV_MAX_TOKENS = 8
FP8_GEMV_MAX_TOKENS = 12


def _grouped_gemm_fits(x: torch.Tensor, gate_up: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM GPU kernels take these experts: bf16 tokens on CUDA; bf16 experts
    (torch._grouped_mm) with every row 16-byte aligned (hidden and the intermediate size multiples of 8), or
    e4m3 experts (torch._scaled_grouped_mm, SM90) with both multiples of 16."""
    hidden, two_i = gate_up.shape[2], gate_up.shape[1]
    if not (x.is_cuda and x.dtype == torch.bfloat16):
        return False
    if gate_up.dtype == FP8:
        return (hasattr(torch, "_scaled_grouped_mm") and hidden % 16 == 0 and two_i % 32 == 0
                and torch.cuda.get_device_capability(x.device) == (9, 0))
    return gate_up.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") and hidden % 8 == 0 and two_i % 16 == 0


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, device):
        super().__init__()
        self.gate_up_proj = _param(2 * intermediate, hidden, dtype=dtype, device=device)  # [gate; up]
        self.down_proj = _param(hidden, intermediate, dtype=dtype, device=device)

    # silu_mul, or its compiled version on a compiled model (KimiLinearModel.compile_plain_ops)
    act_fn = staticmethod(silu_mul)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """SwiGLU of x [T, hidden], added to residual [T, hidden] where given."""
        act = self.act_fn if x.shape[0] >= FUSED_MIN_TOKENS else silu_mul
        y = linear(act(linear(x, self.gate_up_proj)), self.down_proj)
        return y if residual is None else residual + y


# The router's formula in torch ops (ops/moe_routing.py): what the CPU runs, compiled on a compiled model where
# the CUDA kernels do not take the layer.
route_experts = route_experts_reference


class MoE(nn.Module):
    """fp8: the routed experts' weights in e4m3 with a scale per output channel (gate_up_proj_scale [E, 2I],
    down_proj_scale [E, hidden]; model/fp8.py), their GEMMs in fp8; else in the model dtype."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device, fp8: bool = False):
        super().__init__()
        E, I, hidden = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.num_experts, self.top_k = E, cfg.num_experts_per_token
        self.num_groups, self.topk_group = cfg.num_expert_group, cfg.topk_group
        self.renormalize, self.scaling = cfg.moe_renormalize, cfg.routed_scaling_factor
        self.router = _param(E, hidden, dtype=dtype, device=device)
        self.e_score_correction_bias = _param(E, dtype=torch.float32, device=device)
        self.fp8 = fp8
        experts_dtype = FP8 if fp8 else dtype
        self.gate_up_proj = _param(E, 2 * I, hidden, dtype=experts_dtype, device=device)  # per expert [gate; up]
        self.down_proj = _param(E, hidden, I, dtype=experts_dtype, device=device)
        if fp8:
            self.gate_up_proj_scale = _param(E, 2 * I, dtype=torch.float32, device=device)
            self.down_proj_scale = _param(E, hidden, dtype=torch.float32, device=device)
        shared = I * cfg.num_shared_experts
        self.shared_experts = DenseMLP(hidden, shared, dtype, device) if shared else None

    @torch.no_grad()
    def quantize_experts_(self) -> None:
        """Replaces the routed experts' weights by their e4m3 quantization with scales (as loading with
        quantization="fp8" would have made them), freeing the originals."""
        if self.fp8:
            return
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(self, name)
            q = _param(*w.shape, dtype=FP8, device=w.device)
            scale = _param(*w.shape[:-1], dtype=torch.float32, device=w.device)
            quantize_into_(q, scale, w)
            setattr(self, name, q)
            setattr(self, f"{name}_scale", scale)
        self.fp8 = True

    @property
    def capturable(self) -> bool:
        """Whether forward runs without a host sync (the grouped GEMMs), so a CUDA graph can capture it."""
        return _grouped_gemm_fits(self.router, self.gate_up_proj)

    # fp8 experts' grouped GEMMs with Hopper's fast accumulation (partial sums kept in the tensor cores' reduced
    # precision instead of promoted to fp32 every few k-steps; KimiLinearModel.set_fp8_fast_accumulation, off by
    # default): a 48B MoE layer 1.03-1.08x faster at 64-4,096 tokens and 1.33x at 8,192, at 3x the GEMMs' error
    # (1.2-1.5e-2 from a float64 emulation of the fp8 arithmetic instead of 3.9-5.7e-3; e4m3 itself is 6.5e-2
    # from the bf16 experts). H100, benchmarks/bench_fp8_quantize.py, docs/quantization.md.
    fast_accumulation = False

    # route_experts, silu_mul and combine_experts, or their compiled versions on a compiled model
    # (KimiLinearModel.compile_plain_ops)
    route_fn = staticmethod(route_experts)
    act_fn = staticmethod(silu_mul)
    combine_fn = staticmethod(combine_experts)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (expert ids [T, top_k] int64, weights [T, top_k] fp32): ops.moe_route's kernels on a
        GPU that runs them (two launches where torch's were six: docs/moe-routing.md), else the torch formula."""
        if route_kernel_takes(x, self.router, self.top_k, self.num_groups):
            return moe_route(x, self.router, self.e_score_correction_bias, self.top_k, self.num_groups,
                             self.topk_group, self.renormalize, self.scaling)
        return self.route_fn(x, self.router, self.e_score_correction_bias, self.top_k, self.num_groups,
                             self.topk_group, self.renormalize, self.scaling)

    # Where the GEMV kernel runs the routed experts of a step of up to FUSED_SHARED_MAX_TOKENS tokens, the shared
    # experts ride along in it (ops.moe_experts_gemv's shared_gate_up / shared_down): no launches of their own,
    # one rounding of the layer's output. Each token's shared pairs stream the shared weights again (from L2 after
    # the first), so the fusion stops paying near 12 tokens: a 48B MoE layer, H200, fused / unfused at 1, 4, 8,
    # 12 tokens, e4m3 experts: 0.041 / 0.049, 0.099 / 0.107, 0.169 / 0.172, 0.235 / 0.232 ms (docs/moe-gemv.md).
    # fuse_shared_experts = False: they run as a DenseMLP beside it, as on the other paths (for comparisons).
    fuse_shared_experts = True
    FUSED_SHARED_MAX_TOKENS = 8

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's output for x [T, hidden], added to the decoder's residual stream [T, hidden] where given
        (inside the GEMV kernel's epilogue when the shared experts ride along: no add kernel)."""
        ids, weights = self.route(x)
        shared = self.shared_experts
        if (shared is not None and self.fuse_shared_experts and x.shape[0] <= self.FUSED_SHARED_MAX_TOKENS
                and self._gemv_takes(x, shared.gate_up_proj)):
            return self._gemv(x, ids, weights, shared, residual)
        out = self._experts(x, ids, weights)
        if shared is not None:
            out = out + shared(x)
        return out if residual is None else residual + out

    def _gemv_takes(self, x: torch.Tensor, shared_gate_up: torch.Tensor | None = None) -> bool:
        """Whether ops.moe_experts_gemv's kernel runs this step's routed experts (and these shared experts)."""
        limit = FP8_GEMV_MAX_TOKENS if self.fp8 else GEMV_MAX_TOKENS
        parts = cuda_moe.shared_parts(self.gate_up_proj, shared_gate_up)
        return x.shape[0] <= limit and parts >= 0 and cuda_moe.supports(x, self.gate_up_proj, self.top_k, parts)

    def _gemv(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, shared: DenseMLP | None = None,
              residual: torch.Tensor | None = None) -> torch.Tensor:
        return moe_experts_gemv(x, ids, weights, self.gate_up_proj, self.down_proj,
                                getattr(self, "gate_up_proj_scale", None), getattr(self, "down_proj_scale", None),
                                shared_gate_up=None if shared is None else shared.gate_up_proj,
                                shared_down=None if shared is None else shared.down_proj, residual=residual)

    def _experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Token-expert pairs sorted by expert, one SwiGLU per expert that has tokens, weighted and summed per
        token in fp32.

        On a GPU the experts run as two grouped GEMMs (torch._grouped_mm, one CUTLASS launch each over all
        experts' row ranges): the loop below costs ~6 launches per active expert and a host sync for the
        counts, which made a 64-sequence decode step of the 4-layer Kimi-Linear-48B-shaped model host-bound
        (docs/engine.md). The CPU keeps the loop: there a launch costs nothing and it is the path the
        transformers comparisons pin down. With fp8 experts the GPU's grouped GEMMs are torch._scaled_grouped_mm
        on rows quantized just before each; the loop runs fp8.fp8_linear, the same arithmetic. Steps of up to
        GEMV_MAX_TOKENS tokens (FP8_GEMV_MAX_TOKENS with fp8 experts) skip the sort on CUDA: ops.moe_experts_gemv,
        both GEMMs, the activation and the weighted sum in two kernels (e4m3 experts dequantized there, the
        activations unquantized; forward also hands it the shared experts)."""
        if self._gemv_takes(x):
            return self._gemv(x, ids, weights)
        fused = x.shape[0] >= FUSED_MIN_TOKENS
        act, combine = (self.act_fn, self.combine_fn) if fused else (silu_mul, combine_experts)
        # the pairs sorted by expert: the token of each sorted row, the row of each pair, the end of each
        # expert's rows (ops.moe_sort_pairs: one kernel on CUDA, no host sync)
        token, pair_row, ends = moe_sort_pairs(ids, self.num_experts)
        if _grouped_gemm_fits(x, self.gate_up_proj):
            if self.fp8:
                # each token quantized once, before its top_k copies are gathered (a row's quantization does
                # not depend on where it goes): k times less quantizing, and the gather moves 1-byte elements
                xq, x_scale = quantize_rows_fp8(x)
                gate_up = torch._scaled_grouped_mm(
                    xq.index_select(0, token), self.gate_up_proj.transpose(1, 2), x_scale.index_select(0, token),
                    self.gate_up_proj_scale, offs=ends, out_dtype=x.dtype, use_fast_accum=self.fast_accumulation)
                # SwiGLU and the quantization in one pass (ops.silu_mul_quantize_fp8: the eager torch ops were a
                # dozen kernels, the compiled function 2.6x its time at 8,192 tokens; docs/quantization.md)
                hq, h_scale = silu_mul_quantize_fp8(gate_up)
                y = torch._scaled_grouped_mm(hq, self.down_proj.transpose(1, 2), h_scale, self.down_proj_scale,
                                             offs=ends, out_dtype=x.dtype, use_fast_accum=self.fast_accumulation)
            else:
                rows = x.index_select(0, token)
                h = act(torch._grouped_mm(rows, self.gate_up_proj.transpose(1, 2), offs=ends))
                y = torch._grouped_mm(h, self.down_proj.transpose(1, 2), offs=ends)
        else:
            rows = x.index_select(0, token)
            y = torch.empty_like(rows)
            start = 0
            for e, end in enumerate(ends.tolist()):
                if end > start:
                    y[start:end] = self._expert(e, rows[start:end])
                    start = end
        return combine(y, pair_row, weights)

    def _expert(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU on its rows [n, hidden], one GEMM at a time (the loop path)."""
        if not self.fp8:
            return swiglu(rows, self.gate_up_proj[e], self.down_proj[e])
        # the activation quantized as the grouped path does it: silu(gate) * up in fp32, then its rows
        hq, h_scale = silu_mul_quantize_fp8(fp8_linear(rows, self.gate_up_proj[e], self.gate_up_proj_scale[e]))
        return fp8_matmul(hq, h_scale, self.down_proj[e], self.down_proj_scale[e], rows.dtype)
