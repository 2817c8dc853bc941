// Merges partial attention results by their log-sum-exps (MergeParams, flash_attn_params.h): the MLA layers'
// prompt tokens attend over their new keys and, in pieces, over their cached context (mla_prefill.py), and
// each row's parts meet here, one warp per (row, head), in a fixed order, so results repeat.
#pragma once

#include <cstdint>

#include "attention/flash_attn_params.h"

namespace kda_serving::attn {

constexpr int kMergeWarps = 4;

__global__ void __launch_bounds__(kMergeWarps * 32) attention_merge_kernel(const MergeParams p) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kMergeWarps + threadIdx.x / 32;
  if (item >= p.num_rows * p.heads) return;
  const int lane = threadIdx.x % 32;
  const int64_t r = item / p.heads;
  const int h = static_cast<int>(item % p.heads);
  const int64_t row = p.rows != nullptr ? p.rows[r] : p.row0 + r;
  float* out = p.out + row * p.out_row_stride + h * p.out_head_stride;
  float* lse = p.lse + row * p.lse_row_stride + h;
  const int64_t part_stride = p.num_rows * p.heads;  // between one partial's (row, head) and the next's

  const float prev = *lse;
  float m = prev;
  for (int i = 0; i < p.num_parts; ++i) m = fmaxf(m, p.part_lse[i * part_stride + item]);
  if (m == -INFINITY) {  // no key in any part: the row stays zero, its log-sum-exp -inf
    for (int c = lane * 4; c < p.dim; c += 128) *reinterpret_cast<float4*>(out + c) = make_float4(0, 0, 0, 0);
    if (lane == 0) *lse = -INFINITY;
    return;
  }
  const float w_prev = expf(prev - m);
  float den = w_prev;
  for (int i = 0; i < p.num_parts; ++i) den += expf(p.part_lse[i * part_stride + item] - m);
  const float inv = 1.f / den;
  for (int c = lane * 4; c < p.dim; c += 128) {
    float4 acc = *reinterpret_cast<const float4*>(out + c);
    acc.x *= w_prev, acc.y *= w_prev, acc.z *= w_prev, acc.w *= w_prev;
    for (int i = 0; i < p.num_parts; ++i) {
      const float w = expf(p.part_lse[i * part_stride + item] - m);
      const float4 o = *reinterpret_cast<const float4*>(p.part_o + (i * part_stride + item) * p.dim + c);
      acc.x += w * o.x, acc.y += w * o.y, acc.z += w * o.z, acc.w += w * o.w;
    }
    acc.x *= inv, acc.y *= inv, acc.z *= inv, acc.w *= inv;
    *reinterpret_cast<float4*>(out + c) = acc;
  }
  __syncwarp();  // every lane has read the old log-sum-exp
  if (lane == 0) *lse = m + logf(den);
}

}  // namespace kda_serving::attn
