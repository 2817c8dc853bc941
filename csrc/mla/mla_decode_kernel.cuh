// Paged MLA decode attention on tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate), split over keys.
//
// Per sequence n and head h:  o_h = sum_j softmax_j(scale q_h . k_j) k_j[:512], with k_j the latent row of key j
// (576 values) in the paged cache. All heads share the keys (multi-query attention of head size 576), so one
// CTA takes all H heads of one sequence: H = 16 or 32 rows of M, and each key row is read from memory once.
//
// Grid (num_splits, N), two CTAs per SM. CTA (s, n) walks keys [s * keys_per_split, (s + 1) * keys_per_split) of
// sequence n in tiles of 32, loaded by cp.async (16-byte chunks, zero-filled past the sequence) into a double
// buffer while the previous tile is used. Warps form a (H / 16) x 4 grid: warp (mh, w) computes the scores of
// heads 16 mh .. 16 mh + 15 against keys 8 w .. 8 w + 7 of the tile, the four warps of a head tile agree on the
// running max through shared memory, write their probabilities (bf16) to shared memory, and then each
// accumulates the output columns 128 w .. 128 w + 127 of its heads over all 32 keys (16 fp32 accumulator tiles
// in registers, rescaled in place when the max grows: the C fragment layout puts rows g and g + 8 in known
// registers). A split writes its unnormalised output with its max and sum; mla_decode_combine_kernel merges the
// splits (or the split kernel normalises directly when there is one split). Both launch with PDL
// (common/pdl.cuh), so the merge kernel's launch overlaps the split kernel's last CTAs.
//
// Shared memory rows are 584 elements (576 + 8): a 1168-byte stride spreads the 8 rows of an ldmatrix over all
// banks, where 1152 bytes would put them in the same ones. At 32 heads a CTA holds 113 KB of shared memory and
// <= 128 registers per thread, so that two fit on an SM (one CTA of 8 warps, with 64-key tiles, left the SM
// latency bound: docs/mla-decode-kernel.md).
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

#include "common/mma_sm80.cuh"
#include "common/pdl.cuh"
#include "mla/mla_decode_params.h"

namespace kda_serving::mla {

constexpr int kTileKeys = 32;
constexpr int kRowStride = kLatentDim + 8;      // shared-memory row of Q and K, elements
constexpr int kPStride = kTileKeys + 8;         // shared-memory row of P
constexpr int kChunksPerRow = kLatentDim / 8;   // 16-byte chunks of a latent row
constexpr int kWarpsPerHeadTile = 4;
constexpr int kValueColsPerWarp = kValueDim / kWarpsPerHeadTile;  // 128
constexpr int kKeysPerWarp = kTileKeys / kWarpsPerHeadTile;       // 8
static_assert(kLatentDim % 64 == 0 && kValueDim % (16 * kWarpsPerHeadTile) == 0 && kKeysPerWarp == 8,
              "whole MMA tiles, k steps in fours, one n tile of keys per warp");

template <int kMTiles>
struct MlaSmem {
  static constexpr int kHeads = 16 * kMTiles;
  static constexpr size_t kQ = size_t(kHeads) * kRowStride;       // elements
  static constexpr size_t kK = size_t(2) * kTileKeys * kRowStride;
  static constexpr size_t kP = size_t(kHeads) * kPStride;
  static constexpr size_t kBytes = (kQ + kK + kP) * 2 + size_t(kWarpsPerHeadTile) * kHeads * sizeof(float) +
                                   size_t(2) * kTileKeys * sizeof(int64_t);
};

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <int kMTiles>
__global__ void __launch_bounds__(128 * kMTiles, 2) mla_decode_split_kernel(const MlaDecodeParams p) {
  constexpr int kHeads = 16 * kMTiles;
  constexpr int kThreads = 128 * kMTiles;
  using Smem = MlaSmem<kMTiles>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* k_s = q_s + Smem::kQ;                 // [2][kTileKeys][kRowStride]
  __nv_bfloat16* p_s = k_s + Smem::kK;                 // [kHeads][kPStride]
  float* red_s = reinterpret_cast<float*>(p_s + Smem::kP);  // [kWarpsPerHeadTile][kHeads]
  int64_t* rows_s = reinterpret_cast<int64_t*>(red_s + kWarpsPerHeadTile * kHeads);  // [2][kTileKeys], -1: none

  const int split = blockIdx.x, n = blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int mh = warp / kWarpsPerHeadTile, w = warp % kWarpsPerHeadTile;
  const int g = lane >> 2, qd = lane & 3;
  const int row0 = 16 * mh + g, row1 = row0 + 8;  // the two heads this thread's fragments hold

  // Launched with PDL: q (and possibly the cache rows) come from the kernels before this one.
  kda::grid_dependency_wait();
  kda::allow_dependent_launch();  // the merge kernel may take idle SMs now; it waits for this grid to finish
  const int len = p.seq_lens[n];
  const int k_begin = split * p.keys_per_split;
  const int k_end = min(len, k_begin + p.keys_per_split);
  const int64_t part = static_cast<int64_t>(n) * p.num_splits + split;
  if (k_begin >= k_end) {  // nothing to attend: an empty partial (or, alone, a zero output)
    if (p.num_splits == 1) {
      for (int i = tid; i < kHeads * kValueDim; i += kThreads)
        p.out[static_cast<int64_t>(n) * kHeads * kValueDim + i] = __float2bfloat16(0.f);
    } else {
      for (int i = tid; i < kHeads; i += kThreads) {
        p.part_ml[(part * kHeads + i) * 2] = -INFINITY;
        p.part_ml[(part * kHeads + i) * 2 + 1] = 0.f;
      }
    }
    return;
  }

  // Q of all heads, then the first two key tiles: three cp.async groups.
  const __nv_bfloat16* q_n = p.q + static_cast<int64_t>(n) * kHeads * kLatentDim;
  for (int i = tid; i < kHeads * kChunksPerRow; i += kThreads) {
    const int r = i / kChunksPerRow, c = i % kChunksPerRow;
    kda::cp_async_16(q_s + r * kRowStride + 8 * c, q_n + r * kLatentDim + 8 * c, true);
  }
  const int32_t* table = p.block_tables + static_cast<int64_t>(n) * p.block_table_stride;
  // The cache row of each key of a tile, looked up once (32 threads) before the copies that use it: a block
  // table load inside the copy loop would stall every thread once per 16-byte chunk.
  // lookup_row(t) issues the block-table load of this thread's key of tile t (threads < kTileKeys); its value is
  // consumed by store_row, so a tile's lookup can be issued before the math of the tile before it and its
  // latency hidden behind that math.
  auto lookup_row = [&](int t) -> int64_t {
    const int j = k_begin + t * kTileKeys + tid;
    if (tid >= kTileKeys || j >= k_end) return -1;
    const int blk = j / p.block_size;  // a key past the table or a bad block id reads zeros, never outside
    return blk < p.block_table_width ? static_cast<int64_t>(table[blk]) * p.block_size + j % p.block_size : -1;
  };
  auto store_row = [&](int64_t row, int buf) {
    if (tid < kTileKeys) rows_s[buf * kTileKeys + tid] = row < 0 || row >= p.kv_rows ? -1 : row;
  };
  auto find_rows = [&](int t, int buf) { store_row(lookup_row(t), buf); };
  auto load_tile = [&](int buf) {  // after find_rows(., buf) and a barrier
    __nv_bfloat16* dst = k_s + buf * kTileKeys * kRowStride;
    for (int i = tid; i < kTileKeys * kChunksPerRow; i += kThreads) {
      const int key = i / kChunksPerRow, c = i % kChunksPerRow;
      const int64_t row = rows_s[buf * kTileKeys + key];
      kda::cp_async_16(dst + key * kRowStride + 8 * c, p.kv + (row < 0 ? 0 : row) * kLatentDim + 8 * c, row >= 0);
    }
  };
  const int num_tiles = (k_end - k_begin + kTileKeys - 1) / kTileKeys;
  find_rows(0, 0);
  if (num_tiles > 1) find_rows(1, 1);
  __syncthreads();
  load_tile(0);
  cute::cp_async_fence();
  if (num_tiles > 1) load_tile(1);
  cute::cp_async_fence();

  float o[kValueColsPerWarp / 8][4] = {};  // output columns 128 w + 8 i .. + 7 of heads row0 (o[i][0..1]), row1
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};  // per head row, this thread's keys only (l)

  for (int t = 0; t < num_tiles; ++t) {
    cute::cp_async_wait<1>();  // tile t (and Q) have landed; tile t + 1 may still be in flight
    __syncthreads();
    const __nv_bfloat16* k_tile = k_s + (t & 1) * kTileKeys * kRowStride;
    const int64_t next_row = t + 2 < num_tiles ? lookup_row(t + 2) : -1;  // used after this tile's math

    // Scores of 16 heads x this warp's 8 keys (C fragment layout), four independent MMA chains over the 576
    // columns, summed at the end.
    float s0[4] = {}, sb[4] = {}, sc[4] = {}, sd[4] = {};
    const __nv_bfloat16* q_rows = q_s + 16 * mh * kRowStride;
    const __nv_bfloat16* k_rows = k_tile + kKeysPerWarp * w * kRowStride;
#pragma unroll 1
    for (int kk = 0; kk < kLatentDim / 16; kk += 4) {
      uint32_t a0[4], a1[4], a2[4], a3[4], b01[4], b23[4];
      kda::ldsm_a16x16<kRowStride>(q_rows + 16 * kk, lane, a0);
      kda::ldsm_a16x16<kRowStride>(q_rows + 16 * kk + 16, lane, a1);
      kda::ldsm_a16x16<kRowStride>(q_rows + 16 * kk + 32, lane, a2);
      kda::ldsm_a16x16<kRowStride>(q_rows + 16 * kk + 48, lane, a3);
      kda::ldsm_b8x32<kRowStride>(k_rows + 16 * kk, lane, b01);
      kda::ldsm_b8x32<kRowStride>(k_rows + 16 * kk + 32, lane, b23);
      kda::mma_16816(s0, a0, b01[0], b01[1]);
      kda::mma_16816(sb, a1, b01[2], b01[3]);
      kda::mma_16816(sc, a2, b23[0], b23[1]);
      kda::mma_16816(sd, a3, b23[2], b23[3]);
    }
    // Base-2 scaled scores; keys past the sequence get -inf.
    const int key0 = k_begin + t * kTileKeys + kKeysPerWarp * w + 2 * qd;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float sum = (s0[e] + sb[e]) + (sc[e] + sd[e]);
      s0[e] = key0 + (e & 1) < k_end ? sum * p.scale_log2 : -INFINITY;
    }
    const float mx0 = quad_max(fmaxf(s0[0], s0[1]));
    const float mx1 = quad_max(fmaxf(s0[2], s0[3]));
    if (qd == 0) {
      red_s[w * kHeads + row0] = mx0;
      red_s[w * kHeads + row1] = mx1;
    }
    __syncthreads();
    float m_new[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int v = 0; v < kWarpsPerHeadTile; ++v) {
      m_new[0] = fmaxf(m_new[0], red_s[v * kHeads + row0]);
      m_new[1] = fmaxf(m_new[1], red_s[v * kHeads + row1]);
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // m_new == -inf only while every key so far was masked: nothing to scale
      alpha[r] = m_new[r] == -INFINITY ? 1.f : exp2f(m_run[r] - m_new[r]);
      m_run[r] = m_new[r];
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) s0[e] = s0[e] == -INFINITY ? 0.f : exp2f(s0[e] - m_run[e >> 1]);
    l_run[0] = alpha[0] * l_run[0] + (s0[0] + s0[1]);
    l_run[1] = alpha[1] * l_run[1] + (s0[2] + s0[3]);
#pragma unroll
    for (int i = 0; i < kValueColsPerWarp / 8; ++i) {
      o[i][0] *= alpha[0];
      o[i][1] *= alpha[0];
      o[i][2] *= alpha[1];
      o[i][3] *= alpha[1];
    }
    // P (bf16) of this warp's 8 keys into the head tile's rows.
    const int pk = kKeysPerWarp * w + 2 * qd;
    *reinterpret_cast<uint32_t*>(p_s + row0 * kPStride + pk) = kda::pack_bf16x2(s0[0], s0[1]);
    *reinterpret_cast<uint32_t*>(p_s + row1 * kPStride + pk) = kda::pack_bf16x2(s0[2], s0[3]);
    __syncthreads();

    // O += P V over the tile's 32 keys, for this warp's 128 value columns.
    const __nv_bfloat16* p_rows = p_s + 16 * mh * kPStride;
#pragma unroll
    for (int ks = 0; ks < kTileKeys / 16; ++ks) {
      uint32_t a[4];
      kda::ldsm_a16x16<kPStride>(p_rows + 16 * ks, lane, a);
      const __nv_bfloat16* v_tile = k_tile + 16 * ks * kRowStride + kValueColsPerWarp * w;
#pragma unroll
      for (int i = 0; i < kValueColsPerWarp / 16; ++i) {
        uint32_t b[4];  // b[0], b[2]: columns 16 i .. + 7; b[1], b[3]: columns 16 i + 8 .. + 15
        kda::ldsm_t16x16<kRowStride>(v_tile + 16 * i, lane, b);
        kda::mma_16816(o[2 * i], a, b[0], b[2]);
        kda::mma_16816(o[2 * i + 1], a, b[1], b[3]);
      }
    }
    if (t + 2 < num_tiles) store_row(next_row, t & 1);  // the buffer's rows were read by this tile's copies only
    __syncthreads();  // every warp is done with this buffer and with P; the new rows are visible
    if (t + 2 < num_tiles) load_tile(t & 1);
    cute::cp_async_fence();
  }

  // Sum of each head row over the quad (its 16 keys per warp), then over the four warps of the head tile.
  const float l0 = quad_sum(l_run[0]), l1 = quad_sum(l_run[1]);
  if (qd == 0) {
    red_s[w * kHeads + row0] = l0;
    red_s[w * kHeads + row1] = l1;
  }
  __syncthreads();
  float l_tot[2] = {0.f, 0.f};
#pragma unroll
  for (int v = 0; v < kWarpsPerHeadTile; ++v) {
    l_tot[0] += red_s[v * kHeads + row0];
    l_tot[1] += red_s[v * kHeads + row1];
  }
  const int col = kValueColsPerWarp * w + 2 * qd;
  if (p.num_splits == 1) {
    const float inv0 = 1.f / l_tot[0], inv1 = 1.f / l_tot[1];  // > 0: the split holds a real key
    __nv_bfloat16* out0 = p.out + (static_cast<int64_t>(n) * kHeads + row0) * kValueDim + col;
    __nv_bfloat16* out1 = p.out + (static_cast<int64_t>(n) * kHeads + row1) * kValueDim + col;
#pragma unroll
    for (int i = 0; i < kValueColsPerWarp / 8; ++i) {
      *reinterpret_cast<__nv_bfloat162*>(out0 + 8 * i) = __floats2bfloat162_rn(o[i][0] * inv0, o[i][1] * inv0);
      *reinterpret_cast<__nv_bfloat162*>(out1 + 8 * i) = __floats2bfloat162_rn(o[i][2] * inv1, o[i][3] * inv1);
    }
    return;
  }
  float* po0 = p.part_o + (part * kHeads + row0) * kValueDim + col;
  float* po1 = p.part_o + (part * kHeads + row1) * kValueDim + col;
#pragma unroll
  for (int i = 0; i < kValueColsPerWarp / 8; ++i) {
    *reinterpret_cast<float2*>(po0 + 8 * i) = make_float2(o[i][0], o[i][1]);
    *reinterpret_cast<float2*>(po1 + 8 * i) = make_float2(o[i][2], o[i][3]);
  }
  if (w == 0 && qd == 0) {
    p.part_ml[(part * kHeads + row0) * 2] = m_run[0];
    p.part_ml[(part * kHeads + row0) * 2 + 1] = l_tot[0];
    p.part_ml[(part * kHeads + row1) * 2] = m_run[1];
    p.part_ml[(part * kHeads + row1) * 2 + 1] = l_tot[1];
  }
}

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
