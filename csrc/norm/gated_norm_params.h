// Arguments of the gated RMS norm kernel (gated_norm_kernel.cuh), filled by gated_norm_api.cu.
//
// The KDA block's output norm (kda_serving/ops/gated_norm.py), per row of D = head_dim values:
//   out = bf16( weight * (x * rsqrt(mean(x^2) + eps)) * sigmoid(gate) ),  all in fp32
// Rows are (token, head) pairs. Layouts: x bf16, row r at x + r * x_row_stride (a [T, H, D] tensor whose rows
// are evenly spaced: contiguous, or one head's slice of a wider projection); gate and out bf16 [rows, D]
// contiguous, in x's row order; weight [D] fp32 or bf16. Every pointer and x_row_stride 16-byte aligned.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>

namespace kda_serving::norm {

constexpr int kElemsPerChunk = 8;  // one 16-byte bf16 access
constexpr int kMaxHeadDim = 1024;  // a row on one warp, 4 chunks per lane (gated_norm_kernel.cuh)

struct GatedNormParams {
  const __nv_bfloat16* x;
  const __nv_bfloat16* gate;
  const void* weight;
  __nv_bfloat16* out;
  int64_t x_row_stride;  // elements between rows of x, a multiple of kElemsPerChunk
  int64_t rows;          // T * H
  int head_dim;          // D: a multiple of kElemsPerChunk, at most kMaxHeadDim
  float inv_head_dim;    // 1 / D
  float eps;
};

}  // namespace kda_serving::norm
