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

// The first 1024-byte-aligned byte of a dynamic shared-memory buffer, where SW128 blocks can start: the buffer
// itself is only 16-byte aligned, so a kernel allocates 1024 bytes more than its blocks take.
__device__ __forceinline__ unsigned char* align_smem_1024(unsigned char* raw) {
  return raw + ((1024 - (cute::cast_smem_ptr_to_uint(raw) & 1023)) & 1023);
}

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

// Descriptor of an SW128 operand read MN-major whose MN extent spans several 64-column blocks, `block_bytes`
// apart (the leading byte offset); 8-row groups along K lie 1024 bytes apart, as in sw128_desc.
__device__ __forceinline__ uint64_t sw128_desc_mn(const void* smem, uint32_t block_bytes) {
  cute::GmmaDescriptor d;
  d.bitfield.start_address_ = static_cast<uint16_t>(cute::cast_smem_ptr_to_uint(smem) >> 4);
  d.bitfield.leading_byte_offset_ = static_cast<uint16_t>(block_bytes >> 4);
  d.bitfield.stride_byte_offset_ = 1024 >> 4;
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

// The 64 registers of an m64n128 fp32 accumulator fragment, as the argument list CuTe's wgmma atoms take.
#define KDA_WGMMA_D64(d) \
  (d)[0], (d)[1], (d)[2], (d)[3], (d)[4], (d)[5], (d)[6], (d)[7], \
  (d)[8], (d)[9], (d)[10], (d)[11], (d)[12], (d)[13], (d)[14], (d)[15], \
  (d)[16], (d)[17], (d)[18], (d)[19], (d)[20], (d)[21], (d)[22], (d)[23], \
  (d)[24], (d)[25], (d)[26], (d)[27], (d)[28], (d)[29], (d)[30], (d)[31], \
  (d)[32], (d)[33], (d)[34], (d)[35], (d)[36], (d)[37], (d)[38], (d)[39], \
  (d)[40], (d)[41], (d)[42], (d)[43], (d)[44], (d)[45], (d)[46], (d)[47], \
  (d)[48], (d)[49], (d)[50], (d)[51], (d)[52], (d)[53], (d)[54], (d)[55], \
  (d)[56], (d)[57], (d)[58], (d)[59], (d)[60], (d)[61], (d)[62], (d)[63]

template <GmmaMajor kMajorA, GmmaMajor kMajorB>
struct Wgmma<128, kMajorA, kMajorB> {
  static constexpr int kRegs = 64;
  __device__ __forceinline__ static void run(uint64_t a, uint64_t b, float (&d)[64], bool accumulate) {
    cute::SM90::GMMA::MMA_64x128x16_F32BF16BF16_SS<kMajorA, kMajorB>::fma(
        a, b, KDA_WGMMA_D64(d), accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
  }
};

// D (m64 x 128 fp32) += A B with A (m64 x k16, bf16) in registers: a[0..3] hold, as packed pairs, the thread's
// elements at the places an m64nNk16 accumulator fragment holds its first 8 (so a k16 slice of a score
// fragment, packed pair by pair, is this A), and B by descriptor.
template <GmmaMajor kMajorB>
struct WgmmaRs128 {
  __device__ __forceinline__ static void run(const uint32_t (&a)[4], uint64_t b, float (&d)[64]) {
    cute::SM90::GMMA::MMA_64x128x16_F32BF16BF16_RS<GmmaMajor::K, kMajorB>::fma(
        a[0], a[1], a[2], a[3], b, KDA_WGMMA_D64(d), cute::SM90::GMMA::ScaleOut::One);
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
