// Varlen flash attention forward on warpgroup tensor cores (SM90) for the MLA layers' prompt tokens in the
// expanded form (kda_serving/model/mla_prefill.py): heads of 192 (or 128) for queries and keys, 128 for values,
// bf16 in, fp32 out with each row's log-sum-exp, so the caller can merge the parts of a row's keys.
//
// CTA (query tile of 128 rows, head, sequence), three roles:
//   - a producer warp: one thread issues every TMA load. Q once; then key and value tiles of 128 keys into two
//     stages, each completing on its `full` barrier, the stage reused once the eight consumer warps have
//     arrived on its `empty` barrier;
//   - two consumer warpgroups, 64 query rows each, per tile:
//       S [64, 128 keys] = Q K^T        wgmma m64n128k16, both operands from shared memory (K-major)
//       online softmax on S's fragment, in registers (each row lives in one quad of lanes)
//       O [64, 128]     += P V          wgmma m64n128k16 with P from registers (the score fragment, packed to
//                                      bf16 pair by pair, is the A fragment) and V read MN-major
// Every tile operand is stored as TMA writes it: 128-byte-swizzled column blocks of 64 columns, one per box
// (common/wgmma_sm90.cuh). The two warpgroups drift apart by themselves, so one's softmax overlaps the
// other's products.
//
// Masking. Keys past the sequence (the last tile's box runs into the next sequence's rows, or past the tensor,
// where TMA reads zeros) and, when causal, keys past a row's diagonal get -inf before the softmax; tiles past
// the CTA's last row's diagonal are not loaded. Rows past the sequence are computed and not written. The heaviest query tiles launch first (causal: the last rows see the most keys).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cstdint>

#include <cute/arch/copy_sm90_tma.hpp>

#include "attention/flash_attn_params.h"
#include "common/mbarrier.cuh"
#include "common/wgmma_sm90.cuh"

namespace kda_serving::attn {

constexpr int kConsumerThreads = 256;
constexpr int kThreads = kConsumerThreads + 32;  // + the producer warp
constexpr int kConsumerWarps = kConsumerThreads / 32;

template <int kQkBlocks>
struct FlashSmem {
  static constexpr int kVBlocks = kValueDim / 64;
  static constexpr int kQBlock = kBlockM * 128;   // one column block of Q: 128 rows of 128 bytes
  static constexpr int kKvBlock = kBlockN * 128;  // one column block of a key or value tile
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kQkBlocks * kQBlock;
  static constexpr int kV = kK + kStages * kQkBlocks * kKvBlock;
  static constexpr int kBars = kV + kStages * kVBlocks * kKvBlock;  // uint64: q_full, full[2], empty[2]
  static constexpr int kEnd = kBars + (1 + 2 * kStages) * 8;
  static constexpr int kBytes = kEnd + 1024;  // + alignment of the dynamic buffer to 1024 bytes
  static constexpr uint32_t kQBytes = kQkBlocks * kQBlock;
  static constexpr uint32_t kTileBytes = (kQkBlocks + kVBlocks) * kKvBlock;
};

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <int kQkBlocks>
__global__ void __launch_bounds__(kThreads, 1)
    flash_attn_kernel(const FlashAttnParams p, const __grid_constant__ CUtensorMap q_map,
                      const __grid_constant__ CUtensorMap k_map, const __grid_constant__ CUtensorMap v_map) {
  using L = FlashSmem<kQkBlocks>;
  using ScoreMma = kda::Wgmma<128, kda::GmmaMajor::K, kda::GmmaMajor::K>;
  using ValueMma = kda::WgmmaRs128<kda::GmmaMajor::MN>;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = kda::align_smem_1024(smem_raw);
  unsigned char* q_s = smem + L::kQ;
  unsigned char* k_s = smem + L::kK;
  unsigned char* v_s = smem + L::kV;
  uint64_t* q_full = reinterpret_cast<uint64_t*>(smem + L::kBars);
  uint64_t* full = q_full + 1;
  uint64_t* empty = full + kStages;

  const int seq = blockIdx.z, head = blockIdx.y;
  const int q0 = p.cu_q[seq], len_q = p.cu_q[seq + 1] - q0;
  const int k0 = p.cu_k[seq], len_k = p.cu_k[seq + 1] - k0;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kBlockM;
  if (m0 >= len_q) return;
  const int shift = len_k - len_q;  // causal: row i sees keys j <= i + shift
  const int key_end = p.causal ? min(len_k, max(0, m0 + kBlockM + shift)) : len_k;
  const int num_tiles = (key_end + kBlockN - 1) / kBlockN;
  const int tid = threadIdx.x;

  if (tid == 0) {
    kda::mbarrier_init(*q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      kda::mbarrier_init(full[s], 1);
      kda::mbarrier_init(empty[s], kConsumerWarps);
    }
    kda::fence_mbarrier_init();
  }
  __syncthreads();

  if (tid >= kConsumerThreads) {  // the producer warp
    if (tid == kConsumerThreads) {
      kda::mbarrier_arrive_expect_tx(*q_full, L::kQBytes);
#pragma unroll
      for (int cb = 0; cb < kQkBlocks; ++cb)
        cute::SM90_TMA_LOAD_3D::copy(&q_map, q_full, 0, q_s + cb * L::kQBlock, cb * 64, head, q0 + m0);
      for (int t = 0; t < num_tiles; ++t) {
        const int s = t % kStages;
        if (t >= kStages) kda::mbarrier_wait(empty[s], ((t / kStages) - 1) & 1);
        kda::mbarrier_arrive_expect_tx(full[s], L::kTileBytes);
        const int row = k0 + t * kBlockN;
#pragma unroll
        for (int cb = 0; cb < kQkBlocks; ++cb)
          cute::SM90_TMA_LOAD_3D::copy(&k_map, &full[s], 0, k_s + (s * kQkBlocks + cb) * L::kKvBlock, cb * 64,
                                       head, row);
#pragma unroll
        for (int cb = 0; cb < L::kVBlocks; ++cb)
          cute::SM90_TMA_LOAD_3D::copy(&v_map, &full[s], 0, v_s + (s * L::kVBlocks + cb) * L::kKvBlock, cb * 64,
                                       head, row);
      }
    }
    return;
  }

  // A consumer thread: rows row_lo and row_lo + 8 of the sequence; fragment element 4 j + e holds key (or value
  // column) 8 j + 2 qd + (e & 1) of row row_lo + 8 (e >> 1).
  const int wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const int g = lane >> 2, qd = lane & 3;
  const int wg_row0 = m0 + 64 * wg;
  const int row_lo = wg_row0 + 16 * warp + g;
  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  kda::mbarrier_wait(*q_full, 0);
  for (int t = 0; t < num_tiles; ++t) {
    const int s = t % kStages;
    kda::mbarrier_wait(full[s], (t / kStages) & 1);

    float sc[64];
    kda::fence_accumulator(sc);
    cute::warpgroup_arrive();
#pragma unroll
    for (int cb = 0; cb < kQkBlocks; ++cb) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint64_t a = kda::sw128_desc(q_s + cb * L::kQBlock + wg * 64 * 128 + kk * 32);
        const uint64_t b = kda::sw128_desc(k_s + (s * kQkBlocks + cb) * L::kKvBlock + kk * 32);
        ScoreMma::run(a, b, sc, cb > 0 || kk > 0);
      }
    }
    cute::warpgroup_commit_batch();
    cute::warpgroup_wait<0>();
    kda::fence_accumulator(sc);

    const int key0 = t * kBlockN;
    // Warpgroup-uniform: whether any of this tile's keys is past the sequence or past a row's diagonal.
    if (key0 + kBlockN > len_k || (p.causal && key0 + kBlockN - 1 > wg_row0 + shift)) {
#pragma unroll
      for (int j = 0; j < 16; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + 8 * j + 2 * qd + (e & 1);
          const int row = row_lo + 8 * (e >> 1);
          if (key >= len_k || (p.causal && key > row + shift)) sc[4 * j + e] = -INFINITY;
        }
      }
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      mx[0] = fmaxf(mx[0], fmaxf(sc[4 * j], sc[4 * j + 1]));
      mx[1] = fmaxf(mx[1], fmaxf(sc[4 * j + 2], sc[4 * j + 3]));
    }
    float m_use[2], alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      const float m_new = fmaxf(m_run[h], mx[h] * p.scale_log2);
      m_use[h] = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet: nothing to rescale, p = 0
      alpha[h] = exp2f(m_run[h] - m_use[h]);
      m_run[h] = m_new;
    }
    float sum[2] = {0.f, 0.f};
    uint32_t pa[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int h = i & 1;  // elements 2 i, 2 i + 1: row half (i & 1)
      const float p0 = exp2f(fmaf(sc[2 * i], p.scale_log2, -m_use[h]));
      const float p1 = exp2f(fmaf(sc[2 * i + 1], p.scale_log2, -m_use[h]));
      sum[h] += p0 + p1;
      pa[i] = pack_bf16(p0, p1);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) l_run[h] = l_run[h] * alpha[h] + sum[h];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] *= alpha[(i >> 1) & 1];

    kda::fence_accumulator(o);
    cute::warpgroup_arrive();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t a[4] = {pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3]};
      ValueMma::run(a, kda::sw128_desc_mn(v_s + s * L::kVBlocks * L::kKvBlock + kk * 16 * 128, L::kKvBlock), o);
    }
    cute::warpgroup_commit_batch();
    cute::warpgroup_wait<0>();
    kda::fence_accumulator(o);
    if (lane == 0) kda::mbarrier_arrive(empty[s]);  // this warp is done with the stage
  }

  // Each row's sum over its quad; normalise and write the rows inside the sequence.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
    const int row = row_lo + 8 * h;
    if (row >= len_q) continue;
    const bool any = l_run[h] > 0.f;
    const float inv = any ? 1.f / l_run[h] : 0.f;
    const int64_t r = static_cast<int64_t>(q0 + row);
    float* out_row = p.out + r * p.out_row_stride + static_cast<int64_t>(head) * p.out_head_stride;
#pragma unroll
    for (int j = 0; j < 16; ++j)
      *reinterpret_cast<float2*>(out_row + 8 * j + 2 * qd) = make_float2(o[4 * j + 2 * h] * inv,
                                                                        o[4 * j + 2 * h + 1] * inv);
    if (qd == 0)
      p.lse[r * p.lse_row_stride + head] = any ? (m_run[h] + log2f(l_run[h])) * 0.6931471805599453f : -INFINITY;
  }
}

}  // namespace kda_serving::attn
