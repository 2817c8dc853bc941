// Pass 1 of the two-pass prefill: the operands of every chunk, all chunks and heads in parallel.
//
// For chunk tokens t, s in [0, C) with e_t = exp(a_t) per channel (docs/prefill-kernel.md):
//   F_t = prod_{r<=t} e_r,  D_ts = prod_{s<r<=t} e_r,  B_s = prod_{s<r<C} e_r
//   Kg = k F, Qg = scale q F, Kd = k B, gate_end = F_{C-1}
//   M[t,s] = b_t sum_c k_t k_s D_ts (s < t),  P[t,s] = scale sum_c q_t k_s D_ts (s <= t)
//   Ab = (I + M)^-1 diag(b)   (forward substitution; stored negated, fp32)
// q, k are L2-normalised, a is the contract's gate, b = sigmoid(beta). Decays are running products of
// factors in [0, 1], never exp of a positive number nor a ratio of products, so the unbounded softplus gate
// stays finite and a zero decay is exact. Tokens past the end of the sequence are inert (k = q = 0, a = 0,
// b = 0), which makes a partial chunk need no special case.
//
// Layout: one CTA of 4 warps per (chunk, head); warp w owns the 4-token block 4w .. 4w + 3 and each lane 4
// channels of it, in registers from the load to the stores. Channel-wise running products cross blocks
// through one exchange of the 4 block products (2 KB of shared memory), so q, k and the decays never make a
// round trip through shared memory (the previous design's limit: shared-memory bound at 80% L1 throughput).
//
// The 120 pairs (t > s) of M and P split by the highest bit in which t and s differ, a binary tree of blocks:
//   level 1: t in 8..15, s in 0..7     (64 pairs)  D_ts = (prod_{s<r<=7} e_r)(prod_{8<=r<=t} e_r)
//   level 2: t in 4..7 x s in 0..3 and t in 12..15 x s in 8..11   (32 pairs), anchors 3 and 11
//   levels 3-4 and the diagonal: pairs inside one 4-token block   (24 pairs + 16 diagonal P entries)
// At levels 1 and 2 the decay factors exactly through the anchor into two products, each in [0, 1], so
// the pair sums are one tensor-core product each ([k F'; q F'] x (k B')^T on tf32: 10 mantissa bits, like the
// -Ab of pass 2's U product; the hi + lo bf16 split that gave ~fp32 cost 12 instructions per 4 values stored).
// The pairs inside a block are formed by the owning warp from its registers and
// reduced across lanes with one reduce-scatter (16 shuffles for 16 sums).
//
// Nothing here depends on the state, so the whole grid runs at once and the serial pass 2
// (recurrence.cuh) only does tensor-core products.
#pragma once

#include <cuda_bf16.h>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common/gate.cuh"
#include "common/mma_sm80.cuh"
#include "common/warp_reduce.cuh"
#include "prefill/chunk_layout.cuh"
#include "prefill/device_utils.cuh"
#include "prefill/params.h"

namespace kda::prefill {

constexpr int kOpsThreads = 128;
constexpr int kOpsWarps = kOpsThreads / 32;
// Pass 1 is near its memory floor only with enough CTAs in flight: 5 per SM (<= 102 registers). Uncapped,
// ptxas once took 122 registers for the same code (4 CTAs per SM) and the pass lost 17%.
constexpr int kOpsMinCtasPerSm = 5;
constexpr int kBlockTokens = kChunk / kOpsWarps;  // 4 tokens per warp
constexpr int kLaneCh = kDim / 32;                // 4 channels per lane
constexpr unsigned kFullMask = 0xffffffffu;
static_assert(kBlockTokens == 4 && kLaneCh == 4, "the in-block pair list below is written for 4 x 4");

// Operands of one tree level's product, fp32 for tf32 tensor cores: A rows 0..7 = k of the 8 targets, rows
// 8..15 = q of them (times the decay from the anchor to the target); B rows = k of the 8 sources (times the
// decay from the source to the anchor). Rows padded by 16 bytes: the 8 rows of an ldmatrix hit distinct banks.
constexpr int kLevelRow = kDim + 4;
struct alignas(16) LevelOperands {
  alignas(16) float a[kChunk][kLevelRow];
  alignas(16) float b[kChunk / 2][kLevelRow];
};

struct alignas(16) ChunkOpsSmem {
  LevelOperands level[2];
  alignas(16) float block_decay[kOpsWarps][kDim];  // product of e over each warp's 4 tokens, per channel
  alignas(16) float mkk[kChunk][kChunk];           // b_t * sum k_t k_s D_ts (s < t)
  alignas(16) float pqk[kChunk][kChunk];           // scale * sum q_t k_s D_ts (s <= t)
  float b[kChunk];
  // Kd^T, gathered from the four warps' 4-token blocks so it leaves as whole 32-byte rows (written directly,
  // each lane's 8 bytes were a quarter sector: pass 1's L2 throughput was at 79% with 17 of 32 bytes used
  // per stored sector). Rows of four 8-byte units (4 tokens each) plus one of padding; unit u of row r sits
  // at u ^ (r / 16 % 4), so the 16 lanes of a half-warp, which write rows 4 apart, hit 16 distinct bank pairs.
  uint2 kdT[kDim][kChunk / 4 + 1];
};

__device__ __forceinline__ int kd_unit(int row, int unit) { return unit ^ ((row >> 4) & 3); }

// Writes x (4 channels) into row `row` of a level operand at channel c0.
__device__ __forceinline__ void store4(float (*rows)[kLevelRow], int row, int c0, const float (&x)[kLaneCh]) {
  *reinterpret_cast<float4*>(&rows[row][c0]) = make_float4(x[0], x[1], x[2], x[3]);
}

// The 6 token pairs (t > s) inside a 4-token block, in the order (1,0) (2,0) (2,1) (3,0) (3,1) (3,2): target and
// source of pair x. Used with compile-time x in the pair sums and with a lane's x when storing them.
__host__ __device__ constexpr int block_pair_target(int x) { return x >= 3 ? 3 : (x >= 1 ? 2 : 1); }
__host__ __device__ constexpr int block_pair_source(int x) {
  return x - block_pair_target(x) * (block_pair_target(x) - 1) / 2;
}
static_assert(block_pair_target(2) == 2 && block_pair_source(2) == 1 && block_pair_target(5) == 3 &&
                  block_pair_source(5) == 2 && block_pair_source(3) == 0,
              "in-block pair order");

// C[16 x 8] = A B^T of one level on tf32 tensor cores (m16n8k8; fragments in common/mma_sm80.cuh). A
// 16-byte ldmatrix row is 4 fp32 values, so ldmatrix.x4 hands each lane exactly its tf32 fragment words: A of
// one k-step (rows 0..7 / 8..15 x columns 0..3 / 4..7) and B of two (columns 0..3 / 4..7 of each). The
// operands keep 10 mantissa bits, like -Ab in pass 2's U product and more than P's bf16 storage.
__device__ __forceinline__ void level_product(const LevelOperands& op, int lane, float (&c)[4]) {
  const int m = lane >> 3, r = lane & 7;
  const float* a_row = &op.a[8 * (m & 1) + r][4 * (m >> 1)];
  const float* b_row = &op.b[r][4 * (m & 1) + 8 * (m >> 1)];
  float c0[4] = {}, c1[4] = {};  // even and odd k-steps: two short dependent chains
#pragma unroll
  for (int kk = 0; kk < kDim / 8; kk += 2) {
    uint32_t a0[4], a1[4], b[4];
    ldsm_x4(a_row + 8 * kk, a0);
    ldsm_x4(a_row + 8 * (kk + 1), a1);
    ldsm_x4(b_row + 8 * kk, b);
    mma_1688_tf32(c0, a0, b[0], b[1]);
    mma_1688_tf32(c1, a1, b[2], b[3]);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) c[i] = c0[i] + c1[i];
}

// kLowerBound: the gate form (common/gate.cuh), a template argument so the per-element gate is straight-line.
template <bool kLowerBound>
__global__ void __launch_bounds__(kOpsThreads, kOpsMinCtasPerSm) chunk_ops_kernel(const KdaPrefillParams p) {
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
  const int t0 = kBlockTokens * warp;  // first token of this warp's block
  const int c0 = kLaneCh * lane;       // first channel of this lane

  // 1. Loads: 4 tokens x 4 channels of q, k, g per lane (8-byte vectors), beta per token.
  float q[kBlockTokens][kLaneCh], k[kBlockTokens][kLaneCh], e[kBlockTokens][kLaneCh], b[kBlockTokens];
  {
    const auto* qp = static_cast<const __nv_bfloat16*>(p.q);
    const auto* kp = static_cast<const __nv_bfloat16*>(p.k);
    const auto* gp = static_cast<const __nv_bfloat16*>(p.g);
    const auto* betap = static_cast<const __nv_bfloat16*>(p.beta);
    uint2 qr[kBlockTokens], kr[kBlockTokens], gr[kBlockTokens];
#pragma unroll
    for (int i = 0; i < kBlockTokens; ++i) {
      const bool valid = t0 + i < L;
      const int64_t off = ((tok0 + (valid ? t0 + i : 0)) * p.heads + h) * kDim + c0;
      qr[i] = valid ? __ldg(reinterpret_cast<const uint2*>(qp + off)) : make_uint2(0, 0);
      kr[i] = valid ? __ldg(reinterpret_cast<const uint2*>(kp + off)) : make_uint2(0, 0);
      gr[i] = valid ? __ldg(reinterpret_cast<const uint2*>(gp + off)) : make_uint2(0, 0);
      b[i] = valid ? __bfloat162float(betap[(tok0 + t0 + i) * p.heads + h]) : 0.f;
    }
    const float rate = __expf(p.A_log[h]);
    const float4 dtb = *reinterpret_cast<const float4*>(p.dt_bias + h * kDim + c0);
    // The gate's constants folded once per channel: each element is then one FFMA and three MUFU ops.
    const DecayFactor<kLowerBound> decay_of[kLaneCh] = {{rate, dtb.x, p.lower_bound}, {rate, dtb.y, p.lower_bound},
                                                        {rate, dtb.z, p.lower_bound}, {rate, dtb.w, p.lower_bound}};
#pragma unroll
    for (int i = 0; i < kBlockTokens; ++i) {
      const bool valid = t0 + i < L;
      const float2 q01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&qr[i].x));
      const float2 q23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&qr[i].y));
      const float2 k01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&kr[i].x));
      const float2 k23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&kr[i].y));
      const float2 g01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&gr[i].x));
      const float2 g23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&gr[i].y));
      q[i][0] = q01.x, q[i][1] = q01.y, q[i][2] = q23.x, q[i][3] = q23.y;
      k[i][0] = k01.x, k[i][1] = k01.y, k[i][2] = k23.x, k[i][3] = k23.y;
      const float g[kLaneCh] = {g01.x, g01.y, g23.x, g23.y};
#pragma unroll
      for (int c = 0; c < kLaneCh; ++c) {  // (computed for padding too, then selected: no branch per element)
        const float decay = decay_of[c](g[c]);  // (a call inside the select would become a branch)
        e[i][c] = valid ? decay : 1.f;
      }
      b[i] = valid ? sigmoid_fast(b[i]) : 0.f;
    }
  }
#pragma unroll
  for (int i = 0; i < kBlockTokens; ++i) {
    if (lane == i) sm.b[t0 + i] = b[i];
  }

  // 2. L2 norms of the 4 q and 4 k rows: reduce-scatter the 8 per-lane partial sums, then gather. From here on
  // q holds scale * q / |q|.
  {
    float part[2 * kBlockTokens];
#pragma unroll
    for (int i = 0; i < kBlockTokens; ++i) {
      part[i] = q[i][0] * q[i][0] + q[i][1] * q[i][1] + q[i][2] * q[i][2] + q[i][3] * q[i][3];
      part[kBlockTokens + i] = k[i][0] * k[i][0] + k[i][1] * k[i][1] + k[i][2] * k[i][2] + k[i][3] * k[i][3];
    }
    reduce_scatter_step<8>(part, lane, 16);
    reduce_scatter_step<4>(part, lane, 8);
    reduce_scatter_step<2>(part, lane, 4);
    float sum = part[0];
    sum += __shfl_xor_sync(kFullMask, sum, 2);
    sum += __shfl_xor_sync(kFullMask, sum, 1);  // lanes 4v .. 4v + 3 hold the total of value v
    // q also takes the attention scale here: every use of q (Qg, P) is scaled, so nothing downstream multiplies.
    const float inv = rsqrtf(sum + 1e-6f) * (lane < 4 * kBlockTokens ? p.scale : 1.f);
#pragma unroll
    for (int i = 0; i < kBlockTokens; ++i) {
      const float iq = __shfl_sync(kFullMask, inv, 4 * i), ik = __shfl_sync(kFullMask, inv, 4 * (kBlockTokens + i));
#pragma unroll
      for (int c = 0; c < kLaneCh; ++c) q[i][c] *= iq, k[i][c] *= ik;
    }
  }

  // 3. Running products inside the block per channel: prefix pre[i] = prod_{i'<=i} e, suffix suf[i] =
  // prod_{i'>i} e; the block product goes to shared memory for the other warps.
  float pre[kBlockTokens][kLaneCh], suf[kBlockTokens][kLaneCh];
#pragma unroll
  for (int c = 0; c < kLaneCh; ++c) {
    pre[0][c] = e[0][c];
#pragma unroll
    for (int i = 1; i < kBlockTokens; ++i) pre[i][c] = pre[i - 1][c] * e[i][c];
    suf[kBlockTokens - 1][c] = 1.f;
#pragma unroll
    for (int i = kBlockTokens - 2; i >= 0; --i) suf[i][c] = suf[i + 1][c] * e[i + 1][c];
  }
  *reinterpret_cast<float4*>(&sm.block_decay[warp][c0]) =
      make_float4(pre[3][0], pre[3][1], pre[3][2], pre[3][3]);

  // 4. Pairs inside the block (levels 3-4) and the diagonal of P: 16 sums, one reduce-scatter. Value v
  // lands in lanes 2v, 2v + 1. Order: M of the 6 block pairs, P of them, P (0,0) .. (3,3).
  {
    float v[16];
#pragma unroll
    for (int x = 0; x < 6; ++x) {
      const int t = block_pair_target(x), s = block_pair_source(x);
      float mk = 0.f, pq = 0.f;
#pragma unroll
      for (int c = 0; c < kLaneCh; ++c) {
        float d = 1.f;  // prod_{s<r<=t} e_r
#pragma unroll
        for (int r = s + 1; r <= t; ++r) d *= e[r][c];
        const float w = k[s][c] * d;
        mk = fmaf(k[t][c], w, mk);
        pq = fmaf(q[t][c], w, pq);
      }
      v[x] = mk;
      v[6 + x] = pq;
    }
#pragma unroll
    for (int i = 0; i < kBlockTokens; ++i) {
      v[12 + i] = q[i][0] * k[i][0] + q[i][1] * k[i][1] + q[i][2] * k[i][2] + q[i][3] * k[i][3];
    }
    reduce_scatter_step<16>(v, lane, 16);
    reduce_scatter_step<8>(v, lane, 8);
    reduce_scatter_step<4>(v, lane, 4);
    reduce_scatter_step<2>(v, lane, 2);
    const float sum = v[0] + __shfl_xor_sync(kFullMask, v[0], 1);
    const int idx = lane / 2;
    const int pair = idx < 6 ? idx : idx - 6;  // pair index of the M and P lists
    const int t = block_pair_target(pair), s = block_pair_source(pair);
    __syncwarp();  // sm.b of this block, written above by lanes 0..3
    if ((lane & 1) == 0) {
      if (idx < 6) {
        sm.mkk[t0 + t][t0 + s] = sm.b[t0 + t] * sum;
      } else if (idx < 12) {
        sm.pqk[t0 + t][t0 + s] = sum;
      } else {
        sm.pqk[t0 + idx - 12][t0 + idx - 12] = sum;
      }
    }
  }
  __syncthreads();  // block products exchanged

  // 5. Decays across blocks: before = prod over earlier blocks, after = over later blocks. Then Kg, Qg,
  // gate_end and Kd to the workspace, and the operands of tree levels 1 and 2 to shared memory.
  {
    float before[kLaneCh], after[kLaneCh];
    // What depends on the warp's place in the chunk, compiled once per warp index so that it is a constant: the
    // block products the warp multiplies and the level operands it writes. With the index at run time these
    // were ~60 selects a warp (and the stores' row arithmetic); as one code path per warp, pass 1 took 3-6% less.
    auto by_warp = [&](auto warp_constant) {
      constexpr int w = decltype(warp_constant)::value;
      float bd[kOpsWarps][kLaneCh];
#pragma unroll
      for (int o = 0; o < kOpsWarps; ++o) {
        if (o == w) continue;
        const float4 x = *reinterpret_cast<const float4*>(&sm.block_decay[o][c0]);
        bd[o][0] = x.x, bd[o][1] = x.y, bd[o][2] = x.z, bd[o][3] = x.w;
      }
#pragma unroll
      for (int c = 0; c < kLaneCh; ++c) {
        before[c] = w > 0 ? bd[0][c] : 1.f;
#pragma unroll
        for (int o = 1; o < w; ++o) before[c] *= bd[o][c];
        after[c] = w < kOpsWarps - 1 ? bd[kOpsWarps - 1][c] : 1.f;
#pragma unroll
        for (int o = kOpsWarps - 2; o > w; --o) after[c] *= bd[o][c];
      }
      // Level 1 (anchor 7): blocks 0, 1 are sources (decay to token 7), blocks 2, 3 targets (decay from 8).
      // Level 2 (anchors 3 and 11): blocks 0, 2 are sources, blocks 1, 3 targets, each inside its half.
      LevelOperands& l1 = sm.level[0];
      LevelOperands& l2 = sm.level[1];
      constexpr int tw = kBlockTokens * w, half = w / 2;
#pragma unroll
      for (int i = 0; i < kBlockTokens; ++i) {
        float x[kLaneCh], y[kLaneCh];
        if constexpr (w < 2) {  // level 1 source: prod_{s<r<=7} e_r (block 1's product too for block 0)
#pragma unroll
          for (int c = 0; c < kLaneCh; ++c) x[c] = w == 0 ? k[i][c] * (suf[i][c] * bd[1][c]) : k[i][c] * suf[i][c];
          store4(l1.b, tw + i, c0, x);
        } else {  // level 1 target: prod_{8<=r<=t} e_r (block 2's product too for block 3)
#pragma unroll
          for (int c = 0; c < kLaneCh; ++c) {
            const float f = w == 3 ? pre[i][c] * bd[2][c] : pre[i][c];
            x[c] = k[i][c] * f, y[c] = q[i][c] * f;
          }
          store4(l1.a, tw - 8 + i, c0, x);
          store4(l1.a, tw + i, c0, y);  // rows 8 + (t - 8)
        }
        if constexpr (w % 2 == 0) {  // level 2 source: prod_{s<r<=anchor} e_r = in-block suffix
#pragma unroll
          for (int c = 0; c < kLaneCh; ++c) x[c] = k[i][c] * suf[i][c];
          store4(l2.b, 4 * half + i, c0, x);
        } else {  // level 2 target: in-block prefix
#pragma unroll
          for (int c = 0; c < kLaneCh; ++c) x[c] = k[i][c] * pre[i][c], y[c] = q[i][c] * pre[i][c];
          store4(l2.a, 4 * half + i, c0, x);
          store4(l2.a, 8 + 4 * half + i, c0, y);
        }
      }
    };
    switch (warp) {
      case 0: by_warp(std::integral_constant<int, 0>{}); break;
      case 1: by_warp(std::integral_constant<int, 1>{}); break;
      case 2: by_warp(std::integral_constant<int, 2>{}); break;
      default: by_warp(std::integral_constant<int, 3>{}); break;
    }
#pragma unroll
    for (int i = 0; i < kBlockTokens; ++i) {
      float kg[kLaneCh], qg[kLaneCh];
#pragma unroll
      for (int c = 0; c < kLaneCh; ++c) {
        const float F = before[c] * pre[i][c];
        kg[c] = k[i][c] * F;
        qg[c] = q[i][c] * F;
      }
      const int at = wide_index(t0 + i, c0);  // the warp writes the token's whole 256-byte row
      *reinterpret_cast<uint2*>(&ops.kg[at]) = make_uint2(pack_bf16x2(kg[0], kg[1]), pack_bf16x2(kg[2], kg[3]));
      *reinterpret_cast<uint2*>(&ops.qg[at]) = make_uint2(pack_bf16x2(qg[0], qg[1]), pack_bf16x2(qg[2], qg[3]));
    }
#pragma unroll
    for (int c = 0; c < kLaneCh; ++c) {  // Kd^T row of channel c0 + c: this block's 4 tokens, 8 bytes
      float kd[kBlockTokens];
#pragma unroll
      for (int i = 0; i < kBlockTokens; ++i) kd[i] = k[i][c] * (suf[i][c] * after[c]);
      sm.kdT[c0 + c][kd_unit(c0 + c, warp)] = make_uint2(pack_bf16x2(kd[0], kd[1]), pack_bf16x2(kd[2], kd[3]));
    }
    if (warp == kOpsWarps - 1) {
      *reinterpret_cast<float4*>(&ops.gate_end[c0]) = make_float4(
          before[0] * pre[3][0], before[1] * pre[3][1], before[2] * pre[3][2], before[3] * pre[3][3]);
    }
  }
  __syncthreads();  // level operands and Kd^T ready

  // 6. Levels 1 and 2 on the tensor cores (warps 0 and 1). C row r < 8: M of target r, r >= 8: P of target
  // r - 8; column: source. Level 2 keeps only target/source pairs of the same half. Meanwhile warps 2 and 3
  // store Kd^T, 16 bytes per lane.
  if (warp >= 2) {
    constexpr int kVecs = kDim * kChunk / 8, kStoreThreads = kOpsThreads - 64;
#pragma unroll
    for (int r = 0; r < kVecs / kStoreThreads; ++r) {
      const int i = tid - 64 + r * kStoreThreads, row = i / 2, half = i % 2;
      const uint2 lo = sm.kdT[row][kd_unit(row, 2 * half)], hi = sm.kdT[row][kd_unit(row, 2 * half + 1)];
      __nv_bfloat16* dst = &ops.kdT[row / 16][tile_index(row % 16, 8 * half)];
      *reinterpret_cast<uint4*>(dst) = make_uint4(lo.x, lo.y, hi.x, hi.y);
    }
  }
  if (warp < 2) {
    float c[4];
    level_product(sm.level[warp], lane, c);
    const int g8 = lane / 4, q4 = lane % 4;
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      const int col = 2 * q4 + x;
      if (warp == 0) {
        const int t = 8 + g8, s = col;
        sm.mkk[t][s] = sm.b[t] * c[x];
        sm.pqk[t][s] = c[2 + x];
      } else if ((g8 < 4) == (col < 4)) {
        const int t = 4 + (g8 < 4 ? g8 : 8 + g8 - 4), s = col < 4 ? col : 8 + col - 4;
        sm.mkk[t][s] = sm.b[t] * c[x];
        sm.pqk[t][s] = c[2 + x];
      }
    }
  }
  __syncthreads();  // M and P complete

  // 7. Warp 0: Ab = (I + M)^-1 diag(b) by forward substitution, lane j solving column j. Warps 1-3: P.
  if (warp == 0) {
    if (lane < kChunk) {
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
      for (int t = 0; t < kChunk; ++t) ops.ab[ab_index(t, col)] = -x[t] * bj;  // negated: pass 2 forms X - V
    }
  } else {
    for (int o = tid - 32; o < kChunk * kChunk / 4; o += kOpsThreads - 32) {  // 4 entries of one row each
      const int t = o / 4, s0 = 4 * (o % 4);
      const float4 row = *reinterpret_cast<const float4*>(&sm.pqk[t][s0]);
      const float val[4] = {s0 <= t ? row.x : 0.f, s0 + 1 <= t ? row.y : 0.f, s0 + 2 <= t ? row.z : 0.f,
                            s0 + 3 <= t ? row.w : 0.f};
      *reinterpret_cast<uint2*>(&ops.p[tile_index(t, s0)]) =
          make_uint2(pack_bf16x2(val[0], val[1]), pack_bf16x2(val[2], val[3]));
    }
  }
}

}  // namespace kda::prefill
