// Warpgroup tensor-core helpers on CuTe's SM90 GMMA atoms (wgmma.mma_async m64nNk16, bf16 in, fp32 accumulate,
// both operands in shared memory), for operand tiles in the 128-byte-swizzled layout.
//
// The layout ("SW128"). A tile is stored in column blocks of 64 bf16 (128 bytes) per row: row r of a block lies at
// r * 128 bytes, and its 16-byte chunk c at ((c ^ (r % 8)) * 16). Blocks are 1024-byte aligned. Read with rows
// as M (or N) and the 64 columns as K, a block is a K-major operand; read with rows as K and columns as M, the
// same bytes are an MN-major operand (the transposed A of wgmma). Either way 8-row groups lie 1024 bytes apart,
// the descriptor's stride byte offset. A k-step of 16 columns inside a K-major block starts 32 bytes further on:
// the swizzle is applied to the final address, so the start address may step inside the 128-byte row.
//
// Accumulator fragment of m64nN fp32 (warp w of the warpgroup, g = lane / 4, q = lane % 4), N / 8 groups of 4:
//   d[4j + 0..1] = D[16w + g][8j + 2q .. 2q + 1]    d[4j + 2..3] = D[16w + g + 8][8j + 2q .. 2q + 1]
#pragma once

#include <cstdint>

#include <cute/arch/mma_sm90_desc.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cute/arch/util.hpp>

namespace kda {

using GmmaMajor = cute::SM90::GMMA::Major;

// Byte offset of element (row, col) of an SW128 column block (64 columns of bf16).
__device__ __forceinline__ uint32_t sw128_offset(int row, int col) {
  return static_cast<uint32_t>(row * 128 + ((((col >> 3) ^ row) & 7) << 4) + (col & 7) * 2);
}

// Descriptor of an SW128 operand starting at `smem` (a block base, or a block base plus a 32-byte k-step).
__device__ __forceinline__ uint64_t sw128_desc(const void* smem) {
  cute::GmmaDescriptor d;
  d.bitfield.start_address_ = static_cast<uint16_t>(cute::cast_smem_ptr_to_uint(smem) >> 4);
  d.bitfield.leading_byte_offset_ = 1;      // unused by swizzled layouts whose M/N extent is one 128-byte row
  d.bitfield.stride_byte_offset_ = 1024 >> 4;  // 8-row groups
  d.bitfield.base_offset_ = 0;
  d.bitfield.layout_type_ = static_cast<uint8_t>(cute::SM90::GMMA::LayoutType::B128);
  return d.desc_;
}

// D (m64 x N fp32 fragment, N / 2 registers) = A B (+ D when accumulate), A and B by descriptor.
template <int N, GmmaMajor kMajorA, GmmaMajor kMajorB>
struct Wgmma;

template <GmmaMajor kMajorA, GmmaMajor kMajorB>
struct Wgmma<32, kMajorA, kMajorB> {
  static constexpr int kRegs = 16;
  __device__ __forceinline__ static void run(uint64_t a, uint64_t b, float (&d)[16], bool accumulate) {
    cute::SM90::GMMA::MMA_64x32x16_F32BF16BF16_SS<kMajorA, kMajorB>::fma(
        a, b, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9], d[10], d[11], d[12], d[13], d[14], d[15],
        accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
  }
};

template <GmmaMajor kMajorA, GmmaMajor kMajorB>
struct Wgmma<16, kMajorA, kMajorB> {
  static constexpr int kRegs = 8;
  __device__ __forceinline__ static void run(uint64_t a, uint64_t b, float (&d)[8], bool accumulate) {
    cute::SM90::GMMA::MMA_64x16x16_F32BF16BF16_SS<kMajorA, kMajorB>::fma(
        a, b, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7],
        accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
  }
};

// Keeps the compiler from moving accesses of an accumulator across wgmma's asynchronous window.
template <int R>
__device__ __forceinline__ void fence_accumulator(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) cute::warpgroup_fence_operand(d[i]);
}

// Makes this thread's generic-proxy writes to shared memory (plain stores, completed cp.async copies) visible
// to the async proxy that wgmma reads operands through; call before the barrier that publishes them.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Barrier of `threads` threads (a multiple of 32) on hardware barrier `id` (1..15; 0 is __syncthreads').
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace kda
