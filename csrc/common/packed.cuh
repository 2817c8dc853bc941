// Small device helpers shared by the decode, conv and norm kernels: 8 bf16 values in one 16-byte word <-> 8
// floats, 8 bf16 or fp32 values loaded as floats, and index arrays that may be int32 or int64.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>

namespace kda_serving {

// x by value: taken by reference to global memory, the compiler split the 16-byte load into 4-byte ones.
__device__ __forceinline__ void unpack_bf16x8(uint4 x, float* dst) {
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&x);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    dst[2 * i] = f.x;
    dst[2 * i + 1] = f.y;
  }
}

// 8 consecutive values of a bf16 or fp32 array (16-byte aligned) as floats: one or two 16-byte loads.
__device__ __forceinline__ void load8(const __nv_bfloat16* src, float (&dst)[8]) {
  unpack_bf16x8(*reinterpret_cast<const uint4*>(src), dst);
}

__device__ __forceinline__ void load8(const float* src, float (&dst)[8]) {
  const float4 a = reinterpret_cast<const float4*>(src)[0];
  const float4 b = reinterpret_cast<const float4*>(src)[1];
  dst[0] = a.x, dst[1] = a.y, dst[2] = a.z, dst[3] = a.w;
  dst[4] = b.x, dst[5] = b.y, dst[6] = b.z, dst[7] = b.w;
}

// Rounds to nearest.
__device__ __forceinline__ uint4 pack_bf16x8(const float* src) {
  uint4 x;
  __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&x);
#pragma unroll
  for (int i = 0; i < 4; ++i) pairs[i] = __floats2bfloat162_rn(src[2 * i], src[2 * i + 1]);
  return x;
}

__device__ __forceinline__ int64_t load_index(const void* ptr, bool is_int64, int64_t i) {
  return is_int64 ? static_cast<const int64_t*>(ptr)[i] : static_cast<const int32_t*>(ptr)[i];
}

// The same, read through L2 only (ld.global.cg): it leaves no L1 copy that a later load_index of the same
// entry could find stale (an index read before a PDL wait, while the previous kernel may still write it).
__device__ __forceinline__ int64_t load_index_l2(const void* ptr, bool is_int64, int64_t i) {
  return is_int64 ? __ldcg(static_cast<const long long*>(ptr) + i) : __ldcg(static_cast<const int*>(ptr) + i);
}

}  // namespace kda_serving
