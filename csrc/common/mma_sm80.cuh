// Warp-level tensor-core helpers on CuTe's SM80 atoms (mma.sync m16n8k16, bf16 in, fp32 accumulate) and
// cp.async with zero fill. Fragment layouts (PTX ISA, m16n8k16, g = lane / 4, q = lane % 4):
//   A 16x16 row-major: a[0] = A[g][2q..2q+1]  a[1] = A[g+8][2q..]  a[2] = A[g][2q+8..]  a[3] = A[g+8][2q+8..]
//   B 16x8  (k x n)  : b[0] = B[2q..2q+1][g]  b[1] = B[2q+8..2q+9][g]
//   C 16x8  fp32     : c[0..1] = C[g][2q..2q+1]  c[2..3] = C[g+8][2q..2q+1]
// So two C tiles side by side (columns 0..7 and 8..15) are exactly one A fragment: an accumulator feeds the
// next product without a trip through shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/copy_sm90.hpp>
#include <cute/arch/mma_sm80.hpp>

namespace kda {

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// x ~= hi + lo with both halves in bf16: 16 mantissa bits, enough to carry an fp32 state through bf16 MMAs.
// hi is x truncated to bf16 (its upper 16 bits), so x - hi is exact and no bf16 -> fp32 conversion is needed:
// 6 instructions a pair instead of 8, for a residual of 2^-16 |x| instead of 2^-17 (lo rounded to bf16).
__device__ __forceinline__ void split_bf16x2(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  const uint32_t h0 = __float_as_uint(x0) & 0xffff0000u, h1 = __float_as_uint(x1) & 0xffff0000u;
  hi = __byte_perm(h0, h1, 0x7632);  // the upper halves: x0's in the low 16 bits, x1's in the high
  lo = pack_bf16x2(x0 - __uint_as_float(h0), x1 - __uint_as_float(h1));
}

// d += A * B for one 16x8x16 tile.
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  cute::SM80_16x8x16_F32BF16BF16F32_TN::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0, b1,
                                             d[0], d[1], d[2], d[3]);
}

// d += A * B for one 16x8x8 tile on tf32 tensor cores: fp32 operand bits, of which the hardware uses the upper
// 19 (sign, exponent, 10 mantissa bits). A: a[0] = A[g][q], a[1] = A[g + 8][q], a[2] = A[g][q + 4],
// a[3] = A[g + 8][q + 4]; B: b0 = B[q][g], b1 = B[q + 4][g] (g = lane / 4, q = lane % 4).
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  cute::SM80_16x8x8_F32TF32TF32F32_TN::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0, b1, d[0], d[1], d[2],
                                           d[3]);
}

// A fragment from two fp32 accumulator tiles (columns 0..7 in c0, 8..15 in c1), rounded to bf16.
__device__ __forceinline__ void acc_to_a(const float (&c0)[4], const float (&c1)[4], uint32_t (&a)[4]) {
  a[0] = pack_bf16x2(c0[0], c0[1]);
  a[1] = pack_bf16x2(c0[2], c0[3]);
  a[2] = pack_bf16x2(c1[0], c1[1]);
  a[3] = pack_bf16x2(c1[2], c1[3]);
}

// 16-byte global -> shared copy that fills zeros when !pred (the source is not read then).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool pred) {
  cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
      *reinterpret_cast<const cute::uint128_t*>(gmem_src), *reinterpret_cast<cute::uint128_t*>(smem_dst), pred);
}

// ldmatrix.x4 with this lane's row address (16 bytes of one of the four 8 x 8 b16 matrices).
__device__ __forceinline__ void ldsm_x4(const void* row, uint32_t (&d)[4]) {
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(row), d[0], d[1], d[2], d[3]);
}

__device__ __forceinline__ uint32_t lds_u32(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// A fragment of a 16 (m) x 16 (k) bf16 tile stored m-major in shared memory (row stride kStride elements, rows
// 16-byte aligned): matrices 0..3 of the ldmatrix.x4 are (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7,
// k 8-15), (rows 8-15, k 8-15), i.e. a[0..3] in the order above.
template <int kStride>
__device__ __forceinline__ void ldsm_a16x16(const __nv_bfloat16* tile, int lane, uint32_t (&a)[4]) {
  const __nv_bfloat16* row = tile + ((lane & 7) + 8 * ((lane >> 3) & 1)) * kStride + 8 * (lane >> 4);
  ldsm_x4(row, a);
}

// B fragments of two adjacent n tiles from a 16 (n) x 16 (k) bf16 tile stored n-major in shared memory (row
// stride kStride elements, rows 16-byte aligned): one ldmatrix.x4 instead of eight 4-byte loads.
// d[0], d[1] = (b0, b1) of n rows 0..7; d[2], d[3] = those of n rows 8..15.
template <int kStride>
__device__ __forceinline__ void ldsm_b16x16(const __nv_bfloat16* tile, int lane, uint32_t (&d)[4]) {
  const __nv_bfloat16* row = tile + ((lane & 7) + 8 * (lane >> 4)) * kStride + 8 * ((lane >> 3) & 1);
  ldsm_x4(row, d);
}

// B fragments of one n tile over two k steps from an 8 (n) x 32 (k) bf16 tile stored n-major in shared memory
// (row stride kStride elements, rows 16-byte aligned): d[0], d[1] = (b0, b1) of k 0..15; d[2], d[3] of k 16..31.
template <int kStride>
__device__ __forceinline__ void ldsm_b8x32(const __nv_bfloat16* tile, int lane, uint32_t (&d)[4]) {
  ldsm_x4(tile + (lane & 7) * kStride + 8 * (lane >> 3), d);
}

// The transpose of a 16 (k) x 16 (m) bf16 tile stored k-major (row stride kStride elements) in accumulator
// order: d[0] = X[g][2q..2q+1], d[1] = X[g+8][2q..], d[2] = X[g][8+2q..], d[3] = X[g+8][8+2q..] for X = tile^T,
// i.e. the bf16 pairs of the C fragments of n tiles 0 and 1 (ldmatrix.x4.trans).
template <int kStride>
__device__ __forceinline__ void ldsm_t16x16(const __nv_bfloat16* tile, int lane, uint32_t (&d)[4]) {
  const int m = lane >> 3;
  const __nv_bfloat16* row = tile + ((lane & 7) + 8 * (m >> 1)) * kStride + 8 * (m & 1);
  cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(row), d[0], d[1], d[2], d[3]);
}

// The inverse of ldsm_t16x16 (stmatrix.x4.trans, SM90): stores the A fragment `s` of a 16 (m) x 16 (k) matrix
// X as its transpose, tile[k][m] (k-major, row stride kStride elements, rows 16-byte aligned). Turns a warp's
// accumulator pair (e.g. O^T, value rows x tokens) into token-major rows in one instruction instead of eight
// 2-byte stores.
template <int kStride>
__device__ __forceinline__ void stsm_t16x16(__nv_bfloat16* tile, int lane, const uint32_t (&s)[4]) {
  const int m = lane >> 3;
  __nv_bfloat16* row = tile + ((lane & 7) + 8 * (m >> 1)) * kStride + 8 * (m & 1);
  cute::SM90_U16x8_STSM_T::copy(s[0], s[1], s[2], s[3], *reinterpret_cast<cute::uint128_t*>(row));
}

}  // namespace kda
