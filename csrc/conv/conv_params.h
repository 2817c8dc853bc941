// Arguments of the short causal convolution kernels (conv_kernel.cuh), filled by conv_api.cu.
//
// Depthwise causal conv of kernel width kWidth over channels D (kda_serving/ops/conv.py):
//   y_t = act(bias + sum_{w < W} weight[:, w] * x_{t - (W-1) + w}),  x before a sequence = its conv state
// Layouts (contiguous): x, out [T, D] (prefill) or [N, D] (decode) bf16; weight [D, W] and bias [D] bf16 or
// fp32; conv_pool [S, W-1, D] bf16 or fp32 holding each slot's last W-1 inputs, oldest first;
// state_indices [N] int32/int64 (-1: padded entry, zero output, pool untouched); cu_seqlens [N+1];
// has_initial_state [N] bool or null (all true).
// Split output: with out_parts P > 1, out is [P, rows, D / P] (channel d of row t goes to part d / (D / P)),
// so a conv over the fused q|k|v projection writes q, k and v as three contiguous tensors.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>

namespace kda_serving::conv {

constexpr int kWidth = 4;  // Kimi-Linear's short_conv_kernel_size; the only width built

struct ConvParams {
  const __nv_bfloat16* x;
  const void* weight;
  const void* bias;  // null: no bias
  void* conv_pool;
  int64_t pool_slot_stride;  // elements between slots (>= (W-1)*D; larger when slots live inside bigger pages)
  const void* state_indices;
  const void* cu_seqlens;          // prefill only
  const bool* has_initial_state;   // prefill only; null: every sequence continues its state
  __nv_bfloat16* out;
  int64_t tokens;    // T (prefill) or N (decode): rows of x
  int64_t num_seqs;  // N
  int channels;      // D, a multiple of kChannelsPerThread * out_parts
  int out_parts;     // P: 1 for out [rows, D]
  bool bias_bf16;
  bool silu;
  bool indices_int64;
  bool cu_seqlens_int64;
};

}  // namespace kda_serving::conv
