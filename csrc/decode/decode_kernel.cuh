// KDA decode: T new tokens for each of N sequences, recurrent states in a slot pool, updated in place.
//
// Per sequence n, head h and token t (docs/kda-contract.md), with S the [V, K] state of (n, h):
//   S <- S * exp(a_t)[None, :];   S <- S + b_t (v_t - S k_t) k_t^T;   o_t = scale * S q_t
//
// The step is bandwidth-bound: the whole state (64 KB fp32 per head) is read once and written once per call,
// everything else is a few hundred bytes. So each state element is loaded with 16-byte accesses, kept in a
// register for all T tokens and stored once, and all math is fp32 in registers.
//
// Work split. Value rows of S are independent (the decay and the rank-1 update act along K, both dot products
// reduce along K), so the [V, K] state of one head is cut into kSlicesPerHead slices of kRowsPerCta rows and
// each CTA owns one (sequence, head, slice) with no communication between CTAs. Inside a CTA, kLanesPerRow
// consecutive lanes share a row and reduce its dot products with three shuffles. N = 1, H = 32 gives 256 CTAs,
// enough to spread the 2 MB of state over all 132 SMs.
//
// Token prep. The normalised q, k and the decay exp(a) of one token are the same for every row of a head, so
// each CTA computes them once per token with one thread per key column (kThreads == K) into shared memory;
// the gate's three transcendental ops per column would otherwise be paid for every one of the 128 rows.
// Shared memory is double-buffered over tokens, so one barrier per token suffices.
//
// This kernel handles every case; decode_bf16_step.cuh is a faster one for the commonest (bf16 state, T = 1).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>

#include "common/gate.cuh"
#include "common/pdl.cuh"
#include "common/packed.cuh"
#include "decode/decode_params.h"

namespace kda_serving::decode {

constexpr int kLanesPerRow = 8;                         // lanes sharing one value row: 3 shuffle steps
constexpr int kRowsPerCta = 16;                         // 8 KB of fp32 state per CTA
constexpr int kThreads = kLanesPerRow * kRowsPerCta;    // 128
constexpr int kSlicesPerHead = kHeadDim / kRowsPerCta;  // 8 CTAs per (sequence, head)
constexpr int kElemsPerLane = kHeadDim / kLanesPerRow;  // 16 state elements held per thread
constexpr float kL2Eps = 1e-6f;                         // contract.L2_EPS, under the square root
static_assert(kThreads == kHeadDim, "the token prep maps one thread to one key column");
static_assert(kHeadDim % kRowsPerCta == 0, "slices must tile the value rows");

// Elements of one 16-byte state access.
template <typename StateT>
constexpr int kVecElems = 16 / sizeof(StateT);

// The per-column log-decay a <= 0 (contract.gate_activation).
__device__ __forceinline__ float log_decay(float g_plus_bias, float rate, const DecodeParams& p) {
  return kda::log_decay(g_plus_bias, rate, p.lower_bound, p.use_lower_bound != 0);
}

// 16-byte state chunk `chunk` of a row <-> 4 (fp32) or 8 (bf16) floats. Streaming hints: every state byte is
// touched exactly once per call, so it should not evict the activations that other CTAs re-read.
__device__ __forceinline__ void load_chunk(const float* row, int chunk, float* dst) {
  const float4 x = __ldcs(reinterpret_cast<const float4*>(row) + chunk);
  dst[0] = x.x;
  dst[1] = x.y;
  dst[2] = x.z;
  dst[3] = x.w;
}

__device__ __forceinline__ void load_chunk(const __nv_bfloat16* row, int chunk, float* dst) {
  unpack_bf16x8(__ldcs(reinterpret_cast<const uint4*>(row) + chunk), dst);
}

__device__ __forceinline__ void store_chunk(float* row, int chunk, const float* src) {
  __stcs(reinterpret_cast<float4*>(row) + chunk, make_float4(src[0], src[1], src[2], src[3]));
}

__device__ __forceinline__ void store_chunk(__nv_bfloat16* row, int chunk, const float* src) {
  __stcs(reinterpret_cast<uint4*>(row) + chunk, pack_bf16x8(src));
}

// A lane's chunks are lane, lane + 8, lane + 16, ...: for each access the 8 lanes of a row read 128
// contiguous bytes, and the 4 rows of a warp 4 full 128-byte lines.
template <typename StateT>
__device__ __forceinline__ void load_row(const StateT* row, int lane, float (&s)[kElemsPerLane]) {
  constexpr int kVec = kVecElems<StateT>;
#pragma unroll
  for (int j = 0; j < kElemsPerLane / kVec; ++j) load_chunk(row, lane + kLanesPerRow * j, s + j * kVec);
}

template <typename StateT>
__device__ __forceinline__ void store_row(StateT* row, int lane, const float (&s)[kElemsPerLane]) {
  constexpr int kVec = kVecElems<StateT>;
#pragma unroll
  for (int j = 0; j < kElemsPerLane / kVec; ++j) store_chunk(row, lane + kLanesPerRow * j, s + j * kVec);
}

// Key column of a lane's state element e (the inverse of the chunk layout above).
template <typename StateT>
__device__ __forceinline__ int column_of(int lane, int e) {
  constexpr int kVec = kVecElems<StateT>;
  return (lane + kLanesPerRow * (e / kVec)) * kVec + e % kVec;
}

__device__ __forceinline__ float reduce_row(float x) {
#pragma unroll
  for (int m = kLanesPerRow / 2; m > 0; m /= 2) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

__device__ __forceinline__ float reduce_warp(float x) {
#pragma unroll
  for (int m = 16; m > 0; m /= 2) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

// Per-token values shared by every row of a head, in shared memory (double-buffered over tokens).
struct TokenSmem {
  float q[2][kHeadDim];        // raw q of the token, fp32
  float k[2][kHeadDim];        // raw k
  float decay[2][kHeadDim];    // exp(a)
  float dots[2][3][kThreads / 32];  // per-warp partial q.q, k.k, q.k
};

struct TokenScalars {
  float inv_q;   // 1 / |q| (with the contract's eps)
  float inv_k;   // 1 / |k|
  float qk_hat;  // q_hat . k_hat
};

// Token prep, run by all kThreads threads, thread tid owning key column tid: fills buffer `buf` of `sm` and
// returns the norms. Contains the token's barrier.
__device__ __forceinline__ TokenScalars prepare_token(const DecodeParams& p, TokenSmem& sm, int buf,
                                                      int64_t head_offset, float rate, float bias_col) {
  constexpr int kWarps = kThreads / 32;
  const int tid = threadIdx.x;
  const float qc = __bfloat162float(p.q[head_offset + tid]);
  const float kc = __bfloat162float(p.k[head_offset + tid]);
  const float gc = __bfloat162float(p.g[head_offset + tid]) + bias_col;
  sm.q[buf][tid] = qc;
  sm.k[buf][tid] = kc;
  sm.decay[buf][tid] = __expf(log_decay(gc, rate, p));
  const float qq = reduce_warp(qc * qc), kk = reduce_warp(kc * kc), qk = reduce_warp(qc * kc);
  if (tid % 32 == 0) {
    sm.dots[buf][0][tid / 32] = qq;
    sm.dots[buf][1][tid / 32] = kk;
    sm.dots[buf][2][tid / 32] = qk;
  }
  __syncthreads();
  float sum_qq = 0.f, sum_kk = 0.f, sum_qk = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    sum_qq += sm.dots[buf][0][w];
    sum_kk += sm.dots[buf][1][w];
    sum_qk += sm.dots[buf][2][w];
  }
  TokenScalars ts;
  ts.inv_q = rsqrtf(sum_qq + kL2Eps);
  ts.inv_k = rsqrtf(sum_kk + kL2Eps);
  ts.qk_hat = sum_qk * ts.inv_q * ts.inv_k;
  return ts;
}

// The sequence and state slot of grid position `pos` (params.visit), read after the PDL wait. With a visit
// order the pair is one 8-byte load, so the state loads wait on one round trip, as without.
struct VisitEntry {
  int64_t seq;
  int64_t slot;  // -1: padded entry
};

__device__ __forceinline__ VisitEntry visit_entry(const DecodeParams& p, int64_t pos) {
  if (p.visit == nullptr) return {pos, load_index(p.state_indices, p.indices_int64, pos)};
  const int2 e = *reinterpret_cast<const int2*>(p.visit + 2 * pos);
  return {e.x, e.y};
}

// Called before grid_dependency_wait() by one thread of each CTA: a CTA of the first wave may be scheduled
// while the previous kernel drains (PDL), so it prefetches into L2 the `bytes` of state at element `offset`
// of grid position pos's slot and has them on the way instead of idling (later CTAs skip it: see launch_grid).
// The slot index is read through L2 only (load_index_l2), so the read after the wait cannot find a stale L1
// copy. If the previous kernel is still writing the indices the guess may be stale; then the prefetch is
// wasted, never the result, and the bounds check keeps it inside the pool.
template <typename StateT>
__device__ __forceinline__ void prefetch_state(const DecodeParams& p, int64_t pos, int64_t offset, unsigned bytes) {
  if (blockIdx.x >= p.prefetch_ctas) return;
  const int64_t slot = p.visit != nullptr ? load_index_l2(p.visit, false, 2 * pos + 1)
                                          : load_index_l2(p.state_indices, p.indices_int64, pos);
  if (slot >= 0 && slot < p.pool_slots)
    kda::prefetch_l2(static_cast<const StateT*>(p.state_pool) + slot * p.pool_slot_stride + offset, bytes);
}

// Grid: N * H * kSlicesPerHead CTAs of kThreads, slice fastest (the 8 CTAs of a head share q, k, g in L2).
template <typename StateT>
__global__ void __launch_bounds__(kThreads) kda_decode_kernel(const DecodeParams p) {
  __shared__ __align__(16) TokenSmem sm;

  const int tid = threadIdx.x;
  const int lane = tid % kLanesPerRow;
  const int slice = blockIdx.x % kSlicesPerHead;
  const int64_t seq_head = blockIdx.x / kSlicesPerHead;
  const int h = static_cast<int>(seq_head % p.heads);
  const int64_t pos = seq_head / p.heads;  // position in the visit order
  const int row = slice * kRowsPerCta + tid / kLanesPerRow;  // value row of this lane group
  const int T = p.tokens;
  const int64_t row_offset = (static_cast<int64_t>(h) * kHeadDim + row) * kHeadDim;

  // This CTA's rows are kRowsPerCta contiguous rows from thread 0's `row`.
  if (tid == 0) prefetch_state<StateT>(p, pos, row_offset, kRowsPerCta * kHeadDim * sizeof(StateT));
  kda::grid_dependency_wait();      // launched with PDL: earlier kernels' writes are visible from here on
  kda::allow_dependent_launch();  // the next kernel's CTAs may take SM slots as this grid's last wave drains
  const VisitEntry entry = visit_entry(p, pos);
  const int64_t n = entry.seq, slot = entry.slot;
  const int64_t token0 = n * T;
  if (slot < 0) {  // padded entry: zero outputs, the pool is not touched
    if (lane == 0) {
      for (int t = 0; t < T; ++t) p.out[((token0 + t) * p.heads + h) * kHeadDim + row] = __float2bfloat16(0.f);
    }
    return;
  }

  // Issue the state loads first: nothing below depends on them until the row update.
  StateT* pool = static_cast<StateT*>(p.state_pool);
  const int64_t slot_stride = p.pool_slot_stride;
  float s[kElemsPerLane];  // this lane's part of state row `row`, fp32
  load_row(pool + slot * slot_stride + row_offset, lane, s);

  const float rate = __expf(p.A_log[h]);
  const float bias_col = p.dt_bias[h * kHeadDim + tid];

  for (int t = 0; t < T; ++t) {
    const int buf = t & 1;
    const int64_t token = token0 + t;
    const int64_t head_offset = (token * p.heads + h) * kHeadDim;  // of q, k, g, v and out (K == V)

    const float v_row = __bfloat162float(p.v[head_offset + row]);  // issued before the barrier
    const float b = kda::sigmoid_fast(__bfloat162float(p.beta[token * p.heads + h]));
    const TokenScalars ts = prepare_token(p, sm, buf, head_offset, rate, bias_col);

    // Row update. With S' the decayed state: S k_hat and S q_hat in one pass, then
    // o = scale * (S' q_hat + u (k_hat . q_hat)) with u = b (v - S' k_hat), and S = S' + u k_hat^T.
    float sk = 0.f, sq = 0.f;
#pragma unroll
    for (int e = 0; e < kElemsPerLane; ++e) {
      const int col = column_of<StateT>(lane, e);
      s[e] *= sm.decay[buf][col];
      sk = fmaf(s[e], sm.k[buf][col], sk);
      sq = fmaf(s[e], sm.q[buf][col], sq);
    }
    sk = reduce_row(sk) * ts.inv_k;
    sq = reduce_row(sq) * ts.inv_q;
    const float u = b * (v_row - sk);
    const float uk = u * ts.inv_k;
#pragma unroll
    for (int e = 0; e < kElemsPerLane; ++e) s[e] = fmaf(uk, sm.k[buf][column_of<StateT>(lane, e)], s[e]);
    if (lane == 0) p.out[head_offset + row] = __float2bfloat16(p.scale * (sq + u * ts.qk_hat));

    if (p.intermediate_slots != nullptr) {
      const int64_t dst = load_index(p.intermediate_slots, p.slots_int64, token);
      if (dst >= 0) store_row(pool + dst * slot_stride + row_offset, lane, s);
    }
  }
  if (p.intermediate_slots == nullptr) store_row(pool + slot * slot_stride + row_offset, lane, s);
}

}  // namespace kda_serving::decode
