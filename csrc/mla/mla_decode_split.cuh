// Paged MLA decode attention on warpgroup tensor cores (wgmma, SM90), split over keys: CTA (split, sequence)
// writes its partial output with its running max and sum, and mla_decode_combine.cuh merges the splits (or the
// CTA normalises directly when there is one split).
//
// Per sequence n and head h:  o_h = sum_j softmax_j(scale q_h . k_j) k_j[:512], with k_j the latent row of key j
// (576 values) in the paged cache. All heads share the keys (multi-query attention of head size 576), so one
// CTA takes all H = 16 or 32 heads and reads each key row from memory once.
//
// Why wgmma. The first kernel (mma.sync, one warp per 16 heads x 8 keys) was bound by shared memory, not DRAM:
// each warp re-read its heads' Q for every 32-key tile, about 9 bytes through shared memory per byte of cache
// (docs/mla-decode-kernel.md). Here the keys are the M dimension and the heads the N dimension of the
// products, so the tensor cores read every byte of Q, K and V once per 64-key tile, straight from shared memory:
//   S^T [64 keys, H] = K [64 keys, 576] Q^T [576, H]          (wgmma m64nHk16, both operands K-major)
//   O^T [512, H]    += V^T [512, 64 keys] P^T [64 keys, H]   (V^T is the same tile read MN-major)
// Every tile operand is stored in 128-byte-swizzled column blocks of 64 columns (common/wgmma_sm90.cuh), which
// serve both readings of the cache tile.
//
// CTA (split, sequence) of two warpgroups, one CTA per SM (191 KB of shared memory at H = 32): warpgroup 0
// computes S^T, the online softmax over keys (each head a column) and writes P^T (bf16) and each head's rescale
// factor; then both accumulate O^T, warpgroup g the value columns 256 g .. 256 g + 255 (4 m64 blocks, 64 fp32
// registers a thread at H = 32). Tiles of 64 keys are loaded into two stages, with the block-table lookups for
// tile t + 2 issued before tile t's math. When the cache's block size is a multiple of 16, by TMA: one thread
// issues 4 x 9 boxes of 16 rows x 64 columns (a tensor map over the cache, 128-byte swizzle, rows past the
// cache zero-filled) completing on the stage's mbarrier; keys past the split are zeroed in shared memory after
// they land (their rows belong to the sequence's last block and may hold anything). Otherwise by cp.async,
// 16 bytes a thread at a time, zero-filled per key.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cstdint>

#include <cute/arch/copy_sm90_tma.hpp>

#include "common/mbarrier.cuh"
#include "common/mma_sm80.cuh"
#include "common/pdl.cuh"
#include "common/wgmma_sm90.cuh"
#include "mla/mla_decode_params.h"

namespace kda_serving::mla {

constexpr int kWgTileKeys = 64;
constexpr int kWgThreads = 256;
constexpr int kLatentBlocks = kLatentDim / 64;            // 9 column blocks of 64
constexpr int kValueBlocksPerWg = kValueDim / 64 / 2;     // 4: each warpgroup's m64 blocks of O^T
constexpr int kLatentChunks = kLatentDim / 8;             // 16-byte chunks of a latent row
constexpr int kTmaRows = 16;                              // rows of one TMA box (the block size's divisor)
constexpr int kTmaGroups = kWgTileKeys / kTmaRows;        // boxes along the keys of a tile
constexpr uint32_t kTileBytes = kWgTileKeys * kLatentDim * 2;
static_assert(kLatentDim % 64 == 0 && kValueDim % 128 == 0, "whole column blocks");

template <int kHeads>
struct WgSmem {
  static constexpr int kQBlock = kHeads * 128;            // bytes of one column block of Q (kHeads rows)
  static constexpr int kKvBlock = kWgTileKeys * 128;      // one column block of a key tile
  static constexpr int kStage = kLatentBlocks * kKvBlock;
  static constexpr int kQ = 0;
  static constexpr int kKv = kQ + kLatentBlocks * kQBlock;
  static constexpr int kPt = kKv + 2 * kStage;            // P^T [kHeads][64 keys], one column block
  static constexpr int kRed = kPt + kHeads * 128;         // float [4 warps][kHeads]
  static constexpr int kAlpha = kRed + 4 * kHeads * 4;    // float [kHeads]: this tile's rescale of O
  static constexpr int kL = kAlpha + kHeads * 4;          // float [kHeads]: final sums
  static constexpr int kM = kL + kHeads * 4;              // float [kHeads]: final maxima
  static constexpr int kRows = kM + kHeads * 4;           // int64 [2][64]: cache row of each key (TMA: of each
                                                          // 16-key group), -1 = none
  static constexpr int kBars = kRows + 2 * kWgTileKeys * 8;  // uint64 [2]: TMA completion of each stage
  static constexpr int kEnd = kBars + 2 * 8;
  static constexpr int kBytes = kEnd + 1024;              // + alignment of the dynamic buffer to 1024 bytes
  static_assert(kQBlock % 1024 == 0 && kKv % 1024 == 0 && kPt % 1024 == 0, "SW128 blocks are 1024-byte aligned");
};

template <int kHeads>
__global__ void __launch_bounds__(kWgThreads, 1)
    mla_decode_split_kernel(const MlaDecodeParams p, const __grid_constant__ CUtensorMap kv_map, int use_tma) {
  using L = WgSmem<kHeads>;
  using ScoreMma = kda::Wgmma<kHeads, kda::GmmaMajor::K, kda::GmmaMajor::K>;
  using PvMma = kda::Wgmma<kHeads, kda::GmmaMajor::MN, kda::GmmaMajor::K>;
  constexpr int kAcc = ScoreMma::kRegs;     // fp32 registers of one m64 x kHeads fragment
  constexpr int kGroups = kHeads / 8;       // 8-head groups j of a fragment; a thread holds heads 8 j + 2 q + e
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = kda::align_smem_1024(smem_raw);
  unsigned char* q_s = smem + L::kQ;
  unsigned char* kv_s = smem + L::kKv;
  unsigned char* pt_s = smem + L::kPt;
  float* red_s = reinterpret_cast<float*>(smem + L::kRed);
  float* alpha_s = reinterpret_cast<float*>(smem + L::kAlpha);
  float* l_s = reinterpret_cast<float*>(smem + L::kL);
  float* m_s = reinterpret_cast<float*>(smem + L::kM);
  int64_t* rows_s = reinterpret_cast<int64_t*>(smem + L::kRows);
  uint64_t* bars_s = reinterpret_cast<uint64_t*>(smem + L::kBars);

  const int split = blockIdx.x, n = blockIdx.y;
  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const int g = lane >> 2, qd = lane & 3;
  auto head_of = [&](int j, int e) { return 8 * j + 2 * qd + e; };  // fragment column (head) of d[4 j + e (+2)]
  // Warpgroup 0: reduces each of this thread's per-head values v[2 j + e] over the 8 lanes holding other rows of
  // the same heads, and publishes the warp's result per head in red_s[warp][head] for the four warps to read.
  // (kHeads / 8 is kGroups, which nvcc 13.0 crashes on here: a local constexpr in a lambda's parameter type.)
  auto publish_per_head = [&](float(&v)[2 * (kHeads / 8)], auto op) {
#pragma unroll
    for (int i = 0; i < 2 * (kHeads / 8); ++i) {
#pragma unroll
      for (int o_ = 4; o_ < 32; o_ <<= 1) v[i] = op(v[i], __shfl_xor_sync(0xffffffffu, v[i], o_));
    }
    if (g == 0) {
#pragma unroll
      for (int j = 0; j < kHeads / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) red_s[warp * kHeads + head_of(j, e)] = v[2 * j + e];
    }
    kda::named_barrier(1, 128);
  };

  // Launched with PDL: q (and possibly the cache rows) come from the kernels before this one.
  kda::grid_dependency_wait();
  kda::allow_dependent_launch();  // the merge kernel may take idle SMs now; it waits for this grid to finish
  const int len = p.seq_lens[n];
  // This query's keys in num_splits equal shares of whole tiles (the trailing splits of a short query get none).
  const int tiles_per_split = ((len + kWgTileKeys - 1) / kWgTileKeys + p.num_splits - 1) / p.num_splits;
  const int keys_per_split = max(tiles_per_split, 1) * kWgTileKeys;
  const int k_begin = split * keys_per_split;
  const int k_end = min(len, k_begin + keys_per_split);
  const int64_t part = static_cast<int64_t>(n) * p.num_splits + split;
  if (k_begin >= k_end) {  // nothing to attend: an empty partial (or, alone, a zero output)
    if (p.num_splits == 1) {
      for (int i = tid; i < kHeads * kValueDim; i += kWgThreads)
        p.out[static_cast<int64_t>(n) * kHeads * kValueDim + i] = __float2bfloat16(0.f);
    } else {
      for (int i = tid; i < kHeads; i += kWgThreads) {
        p.part_ml[(part * kHeads + i) * 2] = -INFINITY;
        p.part_ml[(part * kHeads + i) * 2 + 1] = 0.f;
      }
    }
    return;
  }

  const __nv_bfloat16* q_n = p.q + static_cast<int64_t>(n) * kHeads * kLatentDim;
  for (int i = tid; i < kHeads * kLatentChunks; i += kWgThreads) {
    const int r = i / kLatentChunks, c = i % kLatentChunks;
    kda::cp_async_16(q_s + (c / 8) * L::kQBlock + kda::sw128_offset(r, (c % 8) * 8), q_n + r * kLatentDim + 8 * c,
                     true);
  }
  const int64_t table_row = p.table_rows != nullptr ? p.table_rows[n] : n;
  const bool table_row_valid = table_row >= 0 && table_row < p.block_table_rows;
  const int32_t* table = p.block_tables + (table_row_valid ? table_row : 0) * p.block_table_stride;
  // lookup_row(t) issues the block-table load of this thread's key of tile t (cp.async: threads < 64, one key
  // each; TMA: threads < 4, one 16-key group each); store_row publishes it, so the lookup for tile t + 2 is
  // issued before tile t's math and its latency hidden behind it.
  const int lookups = use_tma ? kTmaGroups : kWgTileKeys, key_step = use_tma ? kTmaRows : 1;
  auto lookup_row = [&](int t) -> int64_t {
    const int j = k_begin + t * kWgTileKeys + tid * key_step;
    if (tid >= lookups || j >= k_end) return -1;
    const int blk = j / p.block_size;  // a key past the table or a bad block id reads zeros, never outside
    return table_row_valid && blk < p.block_table_width
               ? static_cast<int64_t>(table[blk]) * p.block_size + j % p.block_size
               : -1;
  };
  auto store_row = [&](int64_t row, int buf) {
    if (tid < lookups) rows_s[buf * kWgTileKeys + tid] = row < 0 || row >= p.kv_rows ? -1 : row;
  };
  auto load_tile = [&](int buf) {  // after store_row(., buf) and a barrier; absent rows are zero-filled
    unsigned char* dst = kv_s + buf * L::kStage;
    if (use_tma) {
      if (tid == 0) {
        kda::mbarrier_arrive_expect_tx(bars_s[buf], kTileBytes);  // out-of-bounds boxes count in full
#pragma unroll 1
        for (int grp = 0; grp < kTmaGroups; ++grp) {
          const int64_t row = rows_s[buf * kWgTileKeys + grp];
          const int32_t crd_row = row < 0 ? -kTmaRows : static_cast<int32_t>(row);  // -16: a box of zeros
#pragma unroll
          for (int cb = 0; cb < kLatentBlocks; ++cb)
            cute::SM90_TMA_LOAD_2D::copy(&kv_map, &bars_s[buf], 0, dst + cb * L::kKvBlock + grp * kTmaRows * 128,
                                         cb * 64, crd_row);
        }
      }
      return;
    }
    for (int i = tid; i < kWgTileKeys * kLatentChunks; i += kWgThreads) {
      const int key = i / kLatentChunks, c = i % kLatentChunks;
      const int64_t row = rows_s[buf * kWgTileKeys + key];
      kda::cp_async_16(dst + (c / 8) * L::kKvBlock + kda::sw128_offset(key, (c % 8) * 8),
                       p.kv + (row < 0 ? 0 : row) * kLatentDim + 8 * c, row >= 0);
    }
  };
  if (use_tma && tid == 0) {
    kda::mbarrier_init(bars_s[0], 1);
    kda::mbarrier_init(bars_s[1], 1);
    kda::fence_mbarrier_init();
  }
  const int num_tiles = (k_end - k_begin + kWgTileKeys - 1) / kWgTileKeys;
  store_row(lookup_row(0), 0);
  if (num_tiles > 1) store_row(lookup_row(1), 1);
  __syncthreads();  // the rows, and the barriers' initialisation
  load_tile(0);
  cute::cp_async_fence();
  if (num_tiles > 1) load_tile(1);
  if (!use_tma) cute::cp_async_fence();

  float o[kValueBlocksPerWg][kAcc];
#pragma unroll
  for (int mb = 0; mb < kValueBlocksPerWg; ++mb)
#pragma unroll
    for (int i = 0; i < kAcc; ++i) o[mb][i] = 0.f;
  // Per head this thread holds (index 2 j + e): running max (base 2) and its keys' share of the running sum.
  float m_run[2 * kGroups], l_run[2 * kGroups], alpha[2 * kGroups];
#pragma unroll
  for (int i = 0; i < 2 * kGroups; ++i) m_run[i] = -INFINITY, l_run[i] = 0.f;

  for (int t = 0; t < num_tiles; ++t) {
    unsigned char* kv_tile = kv_s + (t & 1) * L::kStage;
    if (use_tma) {
      if (t == 0) cute::cp_async_wait<0>();  // Q
      kda::mbarrier_wait(bars_s[t & 1], (t >> 1) & 1);
      // Keys past the split: their rows (the rest of the sequence's last block) may hold anything, NaN too.
      const int valid = k_end - (k_begin + t * kWgTileKeys);
      for (int i = max(valid, 0) * kLatentChunks + tid; i < kWgTileKeys * kLatentChunks; i += kWgThreads) {
        const int key = i / kLatentChunks, c = i % kLatentChunks;
        *reinterpret_cast<uint4*>(kv_tile + (c / 8) * L::kKvBlock + kda::sw128_offset(key, (c % 8) * 8)) =
            make_uint4(0, 0, 0, 0);
      }
    } else {
      cute::cp_async_wait<1>();  // tile t (and Q) have landed; tile t + 1 may still be in flight
    }
    kda::fence_proxy_async_smem();
    __syncthreads();
    const int64_t next_row = t + 2 < num_tiles ? lookup_row(t + 2) : -1;  // used after this tile's math

    if (wg == 0) {
      float s[kAcc];
      kda::fence_accumulator(s);
      cute::warpgroup_arrive();
#pragma unroll
      for (int ks = 0; ks < kLatentDim / 16; ++ks) {
        const uint64_t a = kda::sw128_desc(kv_tile + (ks / 4) * L::kKvBlock + (ks % 4) * 32);
        const uint64_t b = kda::sw128_desc(q_s + (ks / 4) * L::kQBlock + (ks % 4) * 32);
        ScoreMma::run(a, b, s, ks > 0);
      }
      cute::warpgroup_commit_batch();
      cute::warpgroup_wait<0>();
      kda::fence_accumulator(s);

      // Base-2 scaled scores; keys past the split get -inf. Rows of this thread: keys 16 warp + g (+ 8).
      const int key_lo = k_begin + t * kWgTileKeys + 16 * warp + g;
      float mx[2 * kGroups];
#pragma unroll
      for (int j = 0; j < kGroups; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key_lo + 8 * (e >> 1);
          s[4 * j + e] = key < k_end ? s[4 * j + e] * p.scale_log2 : -INFINITY;
        }
        mx[2 * j] = fmaxf(s[4 * j], s[4 * j + 2]);
        mx[2 * j + 1] = fmaxf(s[4 * j + 1], s[4 * j + 3]);
      }
      publish_per_head(mx, [](float a, float b) { return fmaxf(a, b); });
#pragma unroll
      for (int j = 0; j < kGroups; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = 2 * j + e, h = head_of(j, e);
          float m_new = m_run[i];
#pragma unroll
          for (int w = 0; w < 4; ++w) m_new = fmaxf(m_new, red_s[w * kHeads + h]);
          // m_new == -inf only while every key so far was masked: nothing to rescale
          alpha[i] = m_new == -INFINITY ? 1.f : exp2f(m_run[i] - m_new);
          m_run[i] = m_new;
          if (warp == 0 && g == 0) alpha_s[h] = alpha[i];
        }
      }
      // P = 2^(s - m), into P^T [head][key] as bf16; this thread's keys' share of each head's sum.
#pragma unroll
      for (int j = 0; j < kGroups; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = 2 * j + (e & 1);
          const float pe = s[4 * j + e] == -INFINITY ? 0.f : exp2f(s[4 * j + e] - m_run[i]);
          s[4 * j + e] = pe;
          *reinterpret_cast<__nv_bfloat16*>(pt_s + kda::sw128_offset(head_of(j, e & 1), 16 * warp + g + 8 * (e >> 1))) =
              __float2bfloat16(pe);
        }
        l_run[2 * j] = alpha[2 * j] * l_run[2 * j] + (s[4 * j] + s[4 * j + 2]);
        l_run[2 * j + 1] = alpha[2 * j + 1] * l_run[2 * j + 1] + (s[4 * j + 1] + s[4 * j + 3]);
      }
      kda::fence_proxy_async_smem();  // P^T is read by wgmma
    }
    __syncthreads();  // P^T and the rescale factors are published
    if (wg == 1) {
#pragma unroll
      for (int j = 0; j < kGroups; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) alpha[2 * j + e] = alpha_s[head_of(j, e)];
    }

    // O^T = alpha O^T + V^T P^T over this warpgroup's value columns.
#pragma unroll
    for (int mb = 0; mb < kValueBlocksPerWg; ++mb) {
#pragma unroll
      for (int i = 0; i < kAcc; ++i) o[mb][i] *= alpha[2 * (i / 4) + (i & 1)];
      kda::fence_accumulator(o[mb]);
    }
    cute::warpgroup_arrive();
#pragma unroll
    for (int ks = 0; ks < kWgTileKeys / 16; ++ks) {  // consecutive products into different accumulators
#pragma unroll
      for (int mb = 0; mb < kValueBlocksPerWg; ++mb) {
        const uint64_t a = kda::sw128_desc(kv_tile + (kValueBlocksPerWg * wg + mb) * L::kKvBlock + ks * 16 * 128);
        const uint64_t b = kda::sw128_desc(pt_s + ks * 32);
        PvMma::run(a, b, o[mb], true);
      }
    }
    cute::warpgroup_commit_batch();
    cute::warpgroup_wait<0>();
#pragma unroll
    for (int mb = 0; mb < kValueBlocksPerWg; ++mb) kda::fence_accumulator(o[mb]);

    if (t + 2 < num_tiles) store_row(next_row, t & 1);  // the buffer's rows were read by this tile's copies only
    __syncthreads();  // every warpgroup is done with this stage and with P^T; the new rows are visible
    if (t + 2 < num_tiles) load_tile(t & 1);
    if (!use_tma) cute::cp_async_fence();
  }

  // Each head's sum over the split: warpgroup 0's threads hold their keys' shares; over g, then the 4 warps.
  if (wg == 0) {
    publish_per_head(l_run, [](float a, float b) { return a + b; });
    if (warp == 0 && g == 0) {
#pragma unroll
      for (int j = 0; j < kGroups; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int h = head_of(j, e);
          l_s[h] = red_s[h] + red_s[kHeads + h] + red_s[2 * kHeads + h] + red_s[3 * kHeads + h];
          m_s[h] = m_run[2 * j + e];
        }
      }
    }
  }
  __syncthreads();

  // O^T fragment element (mb, i): head head_of(i / 4, i % 2), value column 256 wg + 64 mb + 16 warp + g (+ 8 for
  // i % 4 >= 2); acc_offset is its place in a [kHeads, kValueDim] output.
  const int col0 = kValueBlocksPerWg * 64 * wg + 16 * warp + g;
  auto acc_offset = [&](int mb, int i) {
    return head_of(i / 4, i & 1) * kValueDim + col0 + 64 * mb + 8 * ((i & 3) >> 1);
  };
  if (p.num_splits == 1) {
    __nv_bfloat16* out_n = p.out + static_cast<int64_t>(n) * kHeads * kValueDim;
#pragma unroll
    for (int mb = 0; mb < kValueBlocksPerWg; ++mb)
#pragma unroll
      for (int i = 0; i < kAcc; ++i)  // l > 0: the split holds a real key
        out_n[acc_offset(mb, i)] = __float2bfloat16(o[mb][i] / l_s[head_of(i / 4, i & 1)]);
    return;
  }
  float* po = p.part_o + part * kHeads * kValueDim;
#pragma unroll
  for (int mb = 0; mb < kValueBlocksPerWg; ++mb)
#pragma unroll
    for (int i = 0; i < kAcc; ++i) po[acc_offset(mb, i)] = o[mb][i];
  for (int h = tid; h < kHeads; h += kWgThreads) {
    p.part_ml[(part * kHeads + h) * 2] = m_s[h];
    p.part_ml[(part * kHeads + h) * 2 + 1] = l_s[h];
  }
}

}  // namespace kda_serving::mla
