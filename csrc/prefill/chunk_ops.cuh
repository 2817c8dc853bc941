// Pass 1 of the two-pass prefill: the operands of every chunk, all chunks and heads in parallel.
//
// For chunk tokens t, s in [0, C) with e_t = exp(a_t) per channel (docs/prefill-kernel.md):
//   F_t = prod_{r<=t} e_r,  D_ts = prod_{s<r<=t} e_r,  B_s = prod_{s<r<C} e_r
//   Kg = k F, Qg = scale q F, Kd = k B, gate_end = F_{C-1}
//   M[t,s] = b_t sum_c k_t k_s D_ts (s < t),  P[t,s] = scale sum_c q_t k_s D_ts (s <= t)
//   Ab = (I + M)^-1 diag(b)   (forward substitution; stored as bf16 hi + lo)
// q, k are L2-normalised, a is the contract's gate, b = sigmoid(beta). Decays are running products of
// factors in [0, 1], so the unbounded softplus gate stays finite and a zero decay is exact. Tokens past the
// end of the sequence are inert (k = q = 0, a = 0, b = 0), which makes a partial chunk need no special case.
//
// The pair sums M and P are the costly part (136 pairs x 128 channels of running products). With kCrossMma
// the 8 x 8 block of targets t >= 8 and sources s < 8 factors exactly through the anchor token 7,
//   D_ts = (prod_{s<r<=7} e_r) (prod_{8<=r<=t} e_r),   both factors in [0, 1],
// and runs as one warp's tensor-core product (bf16 hi + lo operands); only the two 8 x 8 diagonal blocks
// (72 pairs) stay element-wise. Without it (kept as the simpler reference variant) all 136 pairs are
// element-wise.
//
// One CTA of 128 threads per (chunk, head); nothing depends on the state, so the whole grid runs at once and
// the serial pass 2 (recurrence.cuh) only does tensor-core products.
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

#include "common/mma_sm80.cuh"
#include "prefill/chunk_layout.cuh"
#include "prefill/device_utils.cuh"
#include "prefill/params.h"

namespace kda::prefill {

constexpr int kOpsThreads = 128;                    // one thread per channel in the scans
constexpr int kOpsWarps = kOpsThreads / 32;
constexpr int kPairGroups = kOpsThreads / 8;        // pair sums: 8 source pairs x 16 channel groups
constexpr int kPairCh = kDim / kPairGroups;         // 8 channels per thread
constexpr int kPairSlots = 8 * 17 * 2;              // (source pair, 17 targets, {kk, qk})
constexpr int kHalf = kChunk / 2;                   // diagonal blocks of the kCrossMma variant
constexpr int kOpRow = kDim + 8;                    // bf16 stride of the cross-block MMA operands

struct alignas(16) ChunkOpsSmem {
  alignas(16) float qn[kChunk][kDim];
  alignas(16) float kn[kChunk][kDim];
  alignas(16) float decay[kChunk][kDim];  // the log-decay a, then e = exp(a)
  alignas(16) float pair_partial[kPairSlots][kPairGroups];
  alignas(16) float mkk[kChunk][kChunk];
  float b[kChunk];
  // Cross-block operands (kCrossMma): rows 0..7 k_t F'_t, rows 8..15 q_t F'_t for t = 8..15; and k_s B'_s.
  alignas(16) __nv_bfloat16 cross_a_hi[kChunk][kOpRow];
  alignas(16) __nv_bfloat16 cross_a_lo[kChunk][kOpRow];
  alignas(16) __nv_bfloat16 cross_b_hi[kHalf][kOpRow];
  alignas(16) __nv_bfloat16 cross_b_lo[kHalf][kOpRow];
};

__device__ __forceinline__ void split_store(float x, __nv_bfloat16& hi, __nv_bfloat16& lo) {
  hi = __float2bfloat16(x);
  lo = __float2bfloat16(x - __bfloat162float(hi));
}

// Sums over channel group [c0, c0 + kPairCh) of k_t k_s D_ts and q_t k_s D_ts for source `src` and targets
// t = src .. t_end - 1, written to pair_partial rows (row0 + t - src) * 2 + {0, 1}, column grp.
__device__ __forceinline__ void source_pair_sums(ChunkOpsSmem& sm, int src, int t_end, int row0, int grp) {
  const int c0 = grp * kPairCh;
  float ks[kPairCh], dec[kPairCh];
#pragma unroll
  for (int i = 0; i < kPairCh; i += 4) {
    const float4 x = *reinterpret_cast<const float4*>(&sm.kn[src][c0 + i]);
    ks[i] = x.x, ks[i + 1] = x.y, ks[i + 2] = x.z, ks[i + 3] = x.w;
    dec[i] = dec[i + 1] = dec[i + 2] = dec[i + 3] = 1.f;
  }
  for (int t = src; t < t_end; ++t) {
    float pk = 0.f, pq = 0.f;
#pragma unroll
    for (int i = 0; i < kPairCh; i += 4) {
      const float4 e = *reinterpret_cast<const float4*>(&sm.decay[t][c0 + i]);
      const float4 kt = *reinterpret_cast<const float4*>(&sm.kn[t][c0 + i]);
      const float4 qt = *reinterpret_cast<const float4*>(&sm.qn[t][c0 + i]);
      if (t > src) dec[i] *= e.x, dec[i + 1] *= e.y, dec[i + 2] *= e.z, dec[i + 3] *= e.w;
      const float w0 = ks[i] * dec[i], w1 = ks[i + 1] * dec[i + 1];
      const float w2 = ks[i + 2] * dec[i + 2], w3 = ks[i + 3] * dec[i + 3];
      pk += kt.x * w0 + kt.y * w1 + kt.z * w2 + kt.w * w3;
      pq += qt.x * w0 + qt.y * w1 + qt.z * w2 + qt.w * w3;
    }
    const int idx = (row0 + t - src) * 2;
    sm.pair_partial[idx][grp] = pk;
    sm.pair_partial[idx + 1][grp] = pq;
  }
}

// Sum of the kPairGroups partials of pair_partial row `row`.
__device__ __forceinline__ float sum_groups(const ChunkOpsSmem& sm, int row) {
  float val = 0.f;
#pragma unroll
  for (int i = 0; i < kPairGroups; i += 4) {
    const float4 x = *reinterpret_cast<const float4*>(&sm.pair_partial[row][i]);
    val += (x.x + x.y) + (x.z + x.w);
  }
  return val;
}

// All 136 pairs element-wise: thread (pp, grp) runs sources pp and 15 - pp (17 targets together, so all
// threads do equal work). Rows: (pp * 17 + target slot) * 2 + kind.
__device__ __forceinline__ void all_pair_sums(ChunkOpsSmem& sm, int tid) {
  const int pp = tid / kPairGroups, grp = tid % kPairGroups;
  source_pair_sums(sm, pp, kChunk, pp * 17, grp);
  source_pair_sums(sm, kChunk - 1 - pp, kChunk, pp * 17 + kChunk - pp, grp);
}

// M (times b_t) into shared memory and P (times scale) into the workspace, from all_pair_sums.
__device__ __forceinline__ void reduce_all_pairs(ChunkOpsSmem& sm, ChunkOps& ops, float scale, int tid) {
  for (int o = tid; o < 2 * kChunk * kChunk; o += kOpsThreads) {
    const int kind = o / (kChunk * kChunk), t = (o / kChunk) % kChunk, src = o % kChunk;
    float val = 0.f;
    if (src <= t) {
      const int pp = src < 8 ? src : kChunk - 1 - src;
      const int slot = (src < 8 ? 0 : kChunk - pp) + (t - src);
      val = sum_groups(sm, (pp * 17 + slot) * 2 + kind);
    }
    if (kind == 0) {
      sm.mkk[t][src] = src < t ? sm.b[t] * val : 0.f;
    } else {
      ops.p[t][src] = __float2bfloat16(src <= t ? scale * val : 0.f);
    }
  }
}

// The two 8 x 8 diagonal blocks element-wise: thread (blk, pp, grp) runs sources pp and 7 - pp of block blk
// (9 targets together). Rows: ((blk * 4 + pp) * 9 + target slot) * 2 + kind.
__device__ __forceinline__ void diagonal_pair_sums(ChunkOpsSmem& sm, int tid) {
  const int blk = tid / 64, pp = (tid / kPairGroups) % 4, grp = tid % kPairGroups;
  const int base = kHalf * blk, end = base + kHalf, row0 = (blk * 4 + pp) * 9;
  source_pair_sums(sm, base + pp, end, row0, grp);
  source_pair_sums(sm, base + kHalf - 1 - pp, end, row0 + kHalf - pp, grp);
}

// Targets 8..15 x sources 0..7 on the tensor cores: C = [k F'; q F'] (16 x 128) times (k B')^T (128 x 8),
// hi + lo operands (three products). Rows 0..7 of C are M, rows 8..15 are P (fragment rows g and g + 8).
__device__ __forceinline__ void cross_block_mma(ChunkOpsSmem& sm, ChunkOps& ops, float scale, int lane) {
  const int g8 = lane / 4, q4 = lane % 4;
  float c_hh[4] = {}, c_lh[4] = {}, c_hl[4] = {};
#pragma unroll
  for (int kk = 0; kk < kDim / 16; ++kk) {
    const int c0 = 16 * kk + 2 * q4;
    const uint32_t ah[4] = {lds_u32(&sm.cross_a_hi[g8][c0]), lds_u32(&sm.cross_a_hi[g8 + 8][c0]),
                            lds_u32(&sm.cross_a_hi[g8][c0 + 8]), lds_u32(&sm.cross_a_hi[g8 + 8][c0 + 8])};
    const uint32_t al[4] = {lds_u32(&sm.cross_a_lo[g8][c0]), lds_u32(&sm.cross_a_lo[g8 + 8][c0]),
                            lds_u32(&sm.cross_a_lo[g8][c0 + 8]), lds_u32(&sm.cross_a_lo[g8 + 8][c0 + 8])};
    const uint32_t bh0 = lds_u32(&sm.cross_b_hi[g8][c0]), bh1 = lds_u32(&sm.cross_b_hi[g8][c0 + 8]);
    const uint32_t bl0 = lds_u32(&sm.cross_b_lo[g8][c0]), bl1 = lds_u32(&sm.cross_b_lo[g8][c0 + 8]);
    mma_16816(c_hh, ah, bh0, bh1);
    mma_16816(c_lh, al, bh0, bh1);
    mma_16816(c_hl, ah, bl0, bl1);
  }
  const int t = kHalf + g8, s = 2 * q4;
  float c[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) c[i] = c_hh[i] + (c_lh[i] + c_hl[i]);
  sm.mkk[t][s] = sm.b[t] * c[0];
  sm.mkk[t][s + 1] = sm.b[t] * c[1];
  ops.p[t][s] = __float2bfloat16(scale * c[2]);
  ops.p[t][s + 1] = __float2bfloat16(scale * c[3]);
}

// M and P entries of the diagonal blocks (and zeros above the diagonal) from diagonal_pair_sums; the cross
// block was written by cross_block_mma.
__device__ __forceinline__ void reduce_diagonal_pairs(ChunkOpsSmem& sm, ChunkOps& ops, float scale, int tid) {
  for (int o = tid; o < 2 * kChunk * kChunk; o += kOpsThreads) {
    const int kind = o / (kChunk * kChunk), t = (o / kChunk) % kChunk, src = o % kChunk;
    if (t >= kHalf && src < kHalf) continue;  // cross block
    float val = 0.f;
    if (src <= t) {
      const int blk = t / kHalf, sl = src % kHalf, tl = t % kHalf;
      const int pp = sl < 4 ? sl : kHalf - 1 - sl;
      const int slot = (sl < 4 ? 0 : kHalf - pp) + (tl - sl);
      val = sum_groups(sm, ((blk * 4 + pp) * 9 + slot) * 2 + kind);
    }
    if (kind == 0) {
      sm.mkk[t][src] = src < t ? sm.b[t] * val : 0.f;
    } else {
      ops.p[t][src] = __float2bfloat16(src <= t ? scale * val : 0.f);
    }
  }
}

template <bool kCrossMma>
__global__ void __launch_bounds__(kOpsThreads) chunk_ops_kernel(const KdaPrefillParams p) {
  extern __shared__ __align__(128) unsigned char smem_bytes[];
  ChunkOpsSmem& sm = *reinterpret_cast<ChunkOpsSmem*>(smem_bytes);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int h = static_cast<int>(blockIdx.x % p.heads);
  const int64_t chunk = blockIdx.x / p.heads;
  int64_t n, j;
  if (!locate_chunk(p, chunk, n, j)) return;
  int64_t bos, len;
  seq_bounds(p, n, bos, len);
  const int64_t tok0 = bos + j * kChunk;
  const int L = chunk_tokens(len - j * kChunk);
  ChunkOps& ops = static_cast<ChunkOps*>(p.workspace)[chunk * p.heads + h];

  // 1. Per token (a warp per token, 4 channels per lane): L2 norms, the gate, sigmoid(beta). All loads of
  // the warp's 4 tokens are issued before the first use.
  {
    const auto* q = static_cast<const __nv_bfloat16*>(p.q);
    const auto* k = static_cast<const __nv_bfloat16*>(p.k);
    const auto* g = static_cast<const __nv_bfloat16*>(p.g);
    const auto* beta = static_cast<const __nv_bfloat16*>(p.beta);
    const float rate = __expf(p.A_log[h]);
    const bool use_lb = p.use_lower_bound != 0;
    const float4 dtb = *reinterpret_cast<const float4*>(p.dt_bias + h * kDim + 4 * lane);
    constexpr int kTok = kChunk / kOpsWarps;
    uint2 qr[kTok], kr[kTok], gr[kTok];
    float bl[kTok];
#pragma unroll
    for (int i = 0; i < kTok; ++i) {
      const int t = warp + kOpsWarps * i;
      const bool valid = t < L;
      const int64_t off = ((tok0 + (valid ? t : 0)) * p.heads + h) * kDim + 4 * lane;
      qr[i] = valid ? __ldg(reinterpret_cast<const uint2*>(q + off)) : make_uint2(0, 0);
      kr[i] = valid ? __ldg(reinterpret_cast<const uint2*>(k + off)) : make_uint2(0, 0);
      gr[i] = valid ? __ldg(reinterpret_cast<const uint2*>(g + off)) : make_uint2(0, 0);
      bl[i] = valid ? __bfloat162float(beta[(tok0 + t) * p.heads + h]) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kTok; ++i) {
      const int t = warp + kOpsWarps * i;
      const bool valid = t < L;
      const float2 q01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&qr[i].x));
      const float2 q23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&qr[i].y));
      const float2 k01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&kr[i].x));
      const float2 k23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&kr[i].y));
      const float2 g01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&gr[i].x));
      const float2 g23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&gr[i].y));
      float sq = q01.x * q01.x + q01.y * q01.y + q23.x * q23.x + q23.y * q23.y;
      float sk = k01.x * k01.x + k01.y * k01.y + k23.x * k23.x + k23.y * k23.y;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        sq += __shfl_xor_sync(0xffffffffu, sq, o);
        sk += __shfl_xor_sync(0xffffffffu, sk, o);
      }
      const float rq = rsqrtf(sq + 1e-6f), rk = rsqrtf(sk + 1e-6f);
      *reinterpret_cast<float4*>(&sm.qn[t][4 * lane]) = make_float4(q01.x * rq, q01.y * rq, q23.x * rq, q23.y * rq);
      *reinterpret_cast<float4*>(&sm.kn[t][4 * lane]) = make_float4(k01.x * rk, k01.y * rk, k23.x * rk, k23.y * rk);
      float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
      if (valid) {
        a.x = gate(g01.x, dtb.x, rate, p.lower_bound, use_lb);
        a.y = gate(g01.y, dtb.y, rate, p.lower_bound, use_lb);
        a.z = gate(g23.x, dtb.z, rate, p.lower_bound, use_lb);
        a.w = gate(g23.y, dtb.w, rate, p.lower_bound, use_lb);
      }
      *reinterpret_cast<float4*>(&sm.decay[t][4 * lane]) = a;
      if (lane == 0) sm.b[t] = valid ? 1.f / (1.f + __expf(-bl[i])) : 0.f;
    }
  }
  __syncthreads();

  // 2. Per channel c = tid: running decay products forward (Kg, Qg, gate_end) and backward (Kd).
  {
    const int c = tid;
    float e[kChunk];
    float F = 1.f;
#pragma unroll
    for (int t = 0; t < kChunk; ++t) {
      e[t] = __expf(sm.decay[t][c]);
      F *= e[t];
      ops.kg[t][c] = __float2bfloat16(sm.kn[t][c] * F);
      ops.qg[t][c] = __float2bfloat16(p.scale * sm.qn[t][c] * F);
      sm.decay[t][c] = e[t];
    }
    ops.gate_end[c] = F;
    float Bk = 1.f;
    uint32_t kd[kChunk / 2];
#pragma unroll
    for (int t = kChunk - 1; t >= 0; t -= 2) {
      const float hi = sm.kn[t][c] * Bk;
      Bk *= e[t];
      const float lo = sm.kn[t - 1][c] * Bk;
      Bk *= e[t - 1];
      kd[(t - 1) / 2] = pack_bf16x2(lo, hi);
    }
    *reinterpret_cast<uint4*>(&ops.kdT[c][0]) = make_uint4(kd[0], kd[1], kd[2], kd[3]);
    *reinterpret_cast<uint4*>(&ops.kdT[c][8]) = make_uint4(kd[4], kd[5], kd[6], kd[7]);
    if constexpr (kCrossMma) {
      float Fx = 1.f;  // F'_t = prod_{8<=r<=t} e_r
#pragma unroll
      for (int t = kHalf; t < kChunk; ++t) {
        Fx *= e[t];
        split_store(sm.kn[t][c] * Fx, sm.cross_a_hi[t - kHalf][c], sm.cross_a_lo[t - kHalf][c]);
        split_store(sm.qn[t][c] * Fx, sm.cross_a_hi[t][c], sm.cross_a_lo[t][c]);
      }
      float Bx = 1.f;  // B'_s = prod_{s<r<=7} e_r
#pragma unroll
      for (int t = kHalf - 1; t >= 0; --t) {
        split_store(sm.kn[t][c] * Bx, sm.cross_b_hi[t][c], sm.cross_b_lo[t][c]);
        Bx *= e[t];
      }
    }
  }
  __syncthreads();

  if constexpr (kCrossMma) {
    diagonal_pair_sums(sm, tid);
    if (warp == 0) cross_block_mma(sm, ops, p.scale, lane);
    __syncthreads();
    reduce_diagonal_pairs(sm, ops, p.scale, tid);
  } else {
    all_pair_sums(sm, tid);
    __syncthreads();
    reduce_all_pairs(sm, ops, p.scale, tid);
  }
  __syncthreads();

  // 5. Ab = (I + M)^-1 diag(b): forward substitution, lane j of warp 0 solves column j.
  if (warp == 0 && lane < kChunk) {
    const int col = lane;
    float x[kChunk];
#pragma unroll
    for (int t = 0; t < kChunk; ++t) {
      float acc = t == col ? 1.f : 0.f;
#pragma unroll
      for (int r = 0; r < t; ++r) acc -= sm.mkk[t][r] * x[r];
      x[t] = acc;
    }
    const float bj = sm.b[col];
#pragma unroll
    for (int t = 0; t < kChunk; ++t) {
      const float val = x[t] * bj;
      const __nv_bfloat16 hi = __float2bfloat16(val);
      ops.ab_hi[t][col] = hi;
      ops.ab_lo[t][col] = __float2bfloat16(val - __bfloat162float(hi));
    }
  }
}

}  // namespace kda::prefill
