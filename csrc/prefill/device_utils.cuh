// Device helpers shared by the prefill kernels: gate activation, chunk bounds, state tiles in registers.
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

#include "prefill/params.h"

namespace kda::prefill {

constexpr int kChunk = 16;  // tokens per chunk: the M of every m16n8k16 product; [C, C] blocks fit one warp
constexpr int kDim = 128;   // K == V

// Tokens of a chunk with `remaining` tokens left in the sequence.
__device__ __forceinline__ int chunk_tokens(int64_t remaining) {
  return remaining < kChunk ? static_cast<int>(remaining) : kChunk;
}

// Element offset of state row v, column c of (entry, head) in a [*, H, V, K] state tensor whose entries lie
// entry_stride elements apart (H * V * K when packed).
__device__ __forceinline__ int64_t state_offset(int64_t entry, int64_t entry_stride, int h, int v, int c) {
  return entry * entry_stride + (static_cast<int64_t>(h) * kDim + v) * kDim + c;
}

// Entry strides of the dense state tensors and of the pool.
__device__ __forceinline__ int64_t dense_state_stride(const KdaPrefillParams& p) {
  return static_cast<int64_t>(p.heads) * kDim * kDim;
}
__device__ __forceinline__ int64_t pool_state_stride(const KdaPrefillParams& p) {
  return p.pool_slot_stride > 0 ? p.pool_slot_stride : dense_state_stride(p);
}

// A warp's part of 16 state rows starting at v0: NT accumulator tiles, tile nt = columns 8 (nt0 + nt) .. + 7.
template <int NT>
__device__ __forceinline__ void load_state(float (&s)[NT][4], const void* base, bool fp32, int64_t entry, int h,
                                           int64_t entry_stride, int v0, int lane, int nt0 = 0) {
  const int g = lane / 4, q = lane % 4;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t off = state_offset(entry, entry_stride, h, v0 + g + 8 * half, 8 * (nt0 + nt) + 2 * q);
      float2 x;
      if (fp32) {
        x = __ldg(reinterpret_cast<const float2*>(static_cast<const float*>(base) + off));
      } else {
        x = __bfloat1622float2(
            __ldg(reinterpret_cast<const __nv_bfloat162*>(static_cast<const __nv_bfloat16*>(base) + off)));
      }
      s[nt][2 * half] = x.x;
      s[nt][2 * half + 1] = x.y;
    }
  }
}

template <int NT>
__device__ __forceinline__ void store_state(const float (&s)[NT][4], void* base, bool fp32, int64_t entry, int h,
                                            int64_t entry_stride, int v0, int lane, int nt0 = 0) {
  const int g = lane / 4, q = lane % 4;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t off = state_offset(entry, entry_stride, h, v0 + g + 8 * half, 8 * (nt0 + nt) + 2 * q);
      if (fp32) {
        *reinterpret_cast<float2*>(static_cast<float*>(base) + off) = make_float2(s[nt][2 * half], s[nt][2 * half + 1]);
      } else {
        *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(base) + off) =
            __floats2bfloat162_rn(s[nt][2 * half], s[nt][2 * half + 1]);
      }
    }
  }
}

}  // namespace kda::prefill
