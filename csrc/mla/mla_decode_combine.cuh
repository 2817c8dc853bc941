// Merge of a paged MLA decode's splits (mla_decode_split.cuh writes one partial output per split with its running
// max and sum; this kernel turns them into the normalised output).
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

#include "common/pdl.cuh"
#include "mla/mla_decode_params.h"

namespace kda_serving::mla {

// Merges the splits of one (sequence, head): o = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s. A sequence with
// no keys (padding) gets zeros. Grid N * H CTAs of kCombineColThreads * groups threads (combine_groups).
// Warp 0 first turns every split's max into its weight (in shared memory); then each group of threads takes
// every groups-th split, 4 columns per thread, with several loads in flight, and the groups' sums meet in shared
// memory. (The first version had 128 threads walk all splits serially, two dependent loads per split: 18.5 us
// for the 64 splits of one 4096-key sequence on an H100.)
constexpr int kCombineColThreads = kValueDim / 4;
constexpr int kCombineMaxGroups = 4;
constexpr int kMaxSplits = 1024;  // the weights' shared-memory array; the C ABI refuses more splits

// Groups of a combine CTA: enough to keep several partials in flight per thread at many splits, one at a few
// (where more, short-lived threads only cost scheduling).
inline int combine_groups(int num_splits) { return num_splits >= 16 ? 4 : num_splits >= 8 ? 2 : 1; }

__global__ void __launch_bounds__(kCombineColThreads * kCombineMaxGroups)
    mla_decode_combine_kernel(const MlaDecodeParams p, int heads) {
  __shared__ float weight_s[kMaxSplits];
  __shared__ float4 acc_s[kCombineMaxGroups - 1][kCombineColThreads];
  __shared__ float inv_l_s;
  const int64_t nh = blockIdx.x;  // n * heads + h
  const int64_t n = nh / heads, h = nh % heads;
  const int tid = threadIdx.x;
  const int S = p.num_splits, groups = blockDim.x / kCombineColThreads;
  kda::grid_dependency_wait();  // the split kernel's partials
  if (tid < 32) {
    const float* ml = p.part_ml + (n * S * heads + h) * 2;  // split s at ml[s * heads * 2]
    float m_max = -INFINITY;
    for (int s = tid; s < S; s += 32) m_max = fmaxf(m_max, ml[static_cast<int64_t>(s) * heads * 2]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m_max = fmaxf(m_max, __shfl_xor_sync(0xffffffffu, m_max, o));
    float l = 0.f;
    for (int s = tid; s < S; s += 32) {
      const float m = ml[static_cast<int64_t>(s) * heads * 2];
      // An empty split (m = -inf) weighs 0 and its o_s, never written, is not read.
      const float wgt = m == -INFINITY ? 0.f : exp2f(m - m_max);
      weight_s[s] = wgt;
      l += wgt * ml[static_cast<int64_t>(s) * heads * 2 + 1];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    if (tid == 0) inv_l_s = l > 0.f ? 1.f / l : 0.f;
  }
  __syncthreads();
  const int group = tid / kCombineColThreads, col = 4 * (tid % kCombineColThreads);
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
  for (int s = group; s < S; s += groups) {
    const float wgt = weight_s[s];
    if (wgt != 0.f) {
      const float4 v = *reinterpret_cast<const float4*>(p.part_o + ((n * S + s) * heads + h) * kValueDim + col);
      acc.x += wgt * v.x;
      acc.y += wgt * v.y;
      acc.z += wgt * v.z;
      acc.w += wgt * v.w;
    }
  }
  if (group > 0) acc_s[group - 1][tid % kCombineColThreads] = acc;
  __syncthreads();
  if (group > 0) return;
#pragma unroll
  for (int g = 0; g < groups - 1; ++g) {
    const float4 v = acc_s[g][tid];
    acc.x += v.x;
    acc.y += v.y;
    acc.z += v.z;
    acc.w += v.w;
  }
  const float inv = inv_l_s;
  __nv_bfloat16* out = p.out + nh * kValueDim + col;
  *reinterpret_cast<__nv_bfloat162*>(out) = __floats2bfloat162_rn(acc.x * inv, acc.y * inv);
  *reinterpret_cast<__nv_bfloat162*>(out + 2) = __floats2bfloat162_rn(acc.z * inv, acc.w * inv);
}

}  // namespace kda_serving::mla
