"""KDA operators: the contract (contract.py), the float64 truth (reference.py), the chunked CPU path
(chunked.py), the public custom ops (kda.py, conv.py, gated_norm.py, mla_decode.py, flash_attention.py,
paged_rows.py, gemv.py, moe_experts.py, moe_routing.py, fp8_quantize.py, and the sampler's cuts in
sampling.py) and the CUDA library bindings (cuda_lib.py, cuda_decode.py, cuda_norm.py, cuda_mla.py,
cuda_attention.py, cuda_gemv.py, cuda_moe.py, cuda_moe_routing.py, cuda_fp8.py, cuda_sampling.py, their shared
checks in cuda_args.py). See docs/kda-contract.md."""

from .contract import CHECKPOINT_ALIGN, PAD_SLOT, KDACheckpoints, indices_checked_by_caller
from .conv import causal_conv1d_decode, causal_conv1d_prefill, causal_conv1d_verify
from .flash_attention import flash_attention, merge_attention
from .fp8_quantize import quantize_rows_fp8, silu_mul_quantize_fp8
from .gated_norm import gated_rms_norm
from .gemv import gemv, linear
from .kda import flash_kda_fwd, kda_decode, kda_prefill, slot_visit_order
from .mla_decode import mla_decode
from .moe_experts import moe_experts_gemv
from .moe_routing import moe_route, moe_sort_pairs
from .paged_rows import gather_paged_rows
from .reference import KDAOutput, kda_recurrent_reference
from .sampling import top_k_floor, top_p_floor

__all__ = [
    "CHECKPOINT_ALIGN",
    "PAD_SLOT",
    "KDACheckpoints",
    "KDAOutput",
    "causal_conv1d_decode",
    "causal_conv1d_prefill",
    "causal_conv1d_verify",
    "flash_attention",
    "flash_kda_fwd",
    "gather_paged_rows",
    "gated_rms_norm",
    "gemv",
    "indices_checked_by_caller",
    "kda_decode",
    "kda_prefill",
    "kda_recurrent_reference",
    "linear",
    "merge_attention",
    "mla_decode",
    "moe_experts_gemv",
    "moe_route",
    "moe_sort_pairs",
    "quantize_rows_fp8",
    "silu_mul_quantize_fp8",
    "slot_visit_order",
    "top_k_floor",
    "top_p_floor",
]
