// Pass 2 of the two-pass prefill: the state recurrence over the chunk operands of pass 1 (chunk_ops.cuh).
//
// The recurrence is independent per value row of S [V, K], so a CTA owns a slice of 16 * NW rows of one
// (sequence, head): NW row groups of 16 rows, one warp each, held in registers as m16n8k16 accumulators.
// Per chunk, with the rows of S of a warp (docs/prefill-kernel.md):
//   D^T = S Kg^T - V^T                (S rounded to one bf16 operand; the fp32 accumulators stay the master)
//   U^T = D^T (-Ab)^T                 (tf32: D's fp32 accumulators are the operand as they stand)
//   O^T = S Qg^T + U^T P^T            (the chunk's output rows for this slice)
//   S   = S diag(gate_end) + U^T Kd   (U as one bf16 operand)
// Splitting the state and U into bf16 hi + lo as well (a previous version) doubled the two big products for
// ~15% lower error (worst 2.75e-3 vs 3.16e-3 against the float64 reference, bound 8e-3) and cost 10% of the
// prefill time on an H200 (docs/prefill-kernel.md).
//
// Every product takes its A operand straight from accumulators (see common/mma_sm80.cuh), its B fragments
// by ldmatrix from a kStages-deep ring of chunk stages. One more warp, the producer, fills the ring (a bulk
// copy of the chunk's operands and cp.async of the value slice, StageLoader); the row-group warps meet it only
// at two mbarriers per stage (landed, freed) and never at a CTA barrier, so no copy bookkeeping and no
// waiting for the slowest warp sits on the recurrence's dependent chain (pass 2 at H32, one 8192-token
// sequence: 347 -> 239 us on an H100 with the changes of docs/prefill-kernel.md, "Producer warp").
// (Splitting a row group's key columns over two warps, which exchanged partial products through shared
// memory each chunk, shortened the chain but lost once the copies stopped stalling it: removed. Output warps
// beside the chain warps, taking the 18 output products off the chain, lost too: docs/prefill-kernel.md.)
#pragma once

#include <cuda_bf16.h>
#include <cstddef>
#include <climits>
#include <cstdint>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

#include "common/mbarrier.cuh"
#include "common/mma_sm80.cuh"
#include "prefill/chunk_layout.cuh"
#include "prefill/device_utils.cuh"
#include "prefill/params.h"
#include "prefill/segments.cuh"

namespace kda::prefill {

template <int NW>
struct RecurrenceTraits {
  static_assert(NW == 1 || NW == 2 || NW == 4 || NW == 8, "row groups (warps) per CTA");
  static constexpr int kThreads = 32 * NW + 32;  // NW consumer warps (row groups) and the producer warp
  static constexpr int kProducer = NW;            // the warp that copies the chunks in
  static constexpr int kSlice = 16 * NW;          // value rows per CTA
  static constexpr int kSlices = kDim / kSlice;   // CTAs per (sequence, head)
  static constexpr int kNt = kDim / 8;           // state n tiles (8 key columns each) per warp
  static constexpr int kStages = 4;               // chunks in flight: hides the global latency of a chunk
  // Register budget (__launch_bounds__ minimum CTAs per SM). At 1 ptxas keeps the state and every lane offset
  // in registers (~180) instead of recomputing offsets each chunk: H32, one 8192-token sequence, 0.56 -> 0.42
  // ms. A grid of more than one wave of 4-row-group CTAs runs 3 per SM (<= 136 registers) instead: 6% faster
  // on H96 mixed6, but 12% slower than 1 on a single wave (H64, one sequence): launch_recurrence picks.
  static constexpr int kPackedMinCtasPerSm = NW == 4 ? 3 : 1;
};

template <int NW>
struct alignas(128) RecurrenceStage {
  ChunkOps ops;  // one bulk copy of pass 1's operands, tiled as chunk_layout.cuh describes
  alignas(16) __nv_bfloat16 v[kChunk][RecurrenceTraits<NW>::kSlice];
};

template <int NW>
struct alignas(128) RecurrenceSmem {
  RecurrenceStage<NW> stage[RecurrenceTraits<NW>::kStages];
  uint64_t landed[RecurrenceTraits<NW>::kStages];     // mbarriers: the stage's copies have landed
  uint64_t freed[RecurrenceTraits<NW>::kStages];      // mbarriers: every row group is done reading the stage
  alignas(16) __nv_bfloat16 out[NW][kChunk][16 + 8];  // per warp output staging
};

// The producer warp's copies of a chunk into a stage, all tracked by the stage's `landed` mbarrier: one bulk
// copy (TMA) of the chunk's ChunkOps by lane 0, and the CTA's value slice by cp.async, kVecsPerLane 16-byte
// vectors per lane (rows past the sequence zero-filled), each lane arriving once its copies land. (A bulk
// copy per value row, 17 bulk copies per chunk, was slower.) Taking the copies off the row-group warps removed
// their per-chunk CTA barrier and copy bookkeeping from the recurrence's dependent chain.
template <int NW>
struct StageLoader {
  using T = RecurrenceTraits<NW>;
  static constexpr int kRowVecs = T::kSlice / 8;             // 16-byte vectors per token of the value slice
  static constexpr int kVecsPerLane = kChunk * kRowVecs / 32;  // 1 .. 8
  static constexpr int kArrivals = 1 + 32;                     // lane 0's expect-tx, every lane's cp.async
  static_assert(kChunk * kRowVecs % 32 == 0, "whole vectors per lane");

  const ChunkOps* ops;     // chunk 0 of the sequence, this head
  int64_t ops_step;        // ChunkOps from one chunk to the next
  const __nv_bfloat16* v;  // chunk 0's first token row of the slice
  int64_t v_step;          // elements from one chunk's first token row to the next's
  int64_t v_row;           // elements from one token row to the next

  __device__ __forceinline__ StageLoader(const KdaPrefillParams& p, int64_t first_chunk, int h,
                                         const __nv_bfloat16* v_all, int64_t bos, int v_base) {
    ops = static_cast<const ChunkOps*>(p.workspace) + first_chunk * p.heads + h;
    ops_step = p.heads;
    v_row = static_cast<int64_t>(p.heads) * kDim;
    v = v_all + bos * v_row + static_cast<int64_t>(h) * kDim + v_base;
    v_step = kChunk * v_row;
  }

  // Chunk j (L valid tokens of V) into stage `st`, completing `landed`; called by the whole producer warp.
  __device__ __forceinline__ void issue(RecurrenceStage<NW>& st, uint64_t& landed, int64_t j, int L, int lane) const {
    if (lane == 0) {
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&landed, sizeof(ChunkOps));
      cute::SM90_BULK_COPY_G2S::copy(ops + j * ops_step, &landed, &st.ops, sizeof(ChunkOps));
    }
    const __nv_bfloat16* src = v + j * v_step;
#pragma unroll
    for (int i = 0; i < kVecsPerLane; ++i) {
      const int vec = lane + 32 * i, t = vec / kRowVecs, c = 8 * (vec % kRowVecs);
      const bool valid = t < L;
      cp_async_16(&st.v[t][c], src + (valid ? t * v_row + c : 0), valid);
    }
    cutlass::arch::cpasync_barrier_arrive_noinc(&landed);
  }
};

// ChunkOps' B operands (chunk_layout.cuh) are read by ldsm_x4 (common/mma_sm80.cuh) at this lane's row
// address: the fragments ldsm_b16x16 reads from a padded [16][16] tile. A lane addresses row
// (lane & 7) + 8 (lane >> 4), 16-byte chunk (lane >> 3) & 1 of the tile or k-step.
__device__ __forceinline__ int tile_lane_offset(int lane) {
  return tile_index((lane & 7) + 8 * (lane >> 4), 8 * ((lane >> 3) & 1));
}
// Kg / Qg k-step kk sits at wide_lane_offset(lane, kk % 4) + 64 (kk / 4): the chunk permutation only touches
// the low 3 bits of the chunk index, so k-steps 4..7 are 4..7 shifted by 8 chunks.
__device__ __forceinline__ int wide_lane_offset(int lane, int kk) {
  return wide_index((lane & 7) + 8 * (lane >> 4), 8 * (2 * kk + ((lane >> 3) & 1)));
}

// kSegmented: the CTA is one of the 2 G - 1 runs of a time-segmented sequence (segments.cuh). A separate
// instantiation, so the plain kernel keeps its registers (the run bookkeeping costs ~30 more).
// kMinCtasPerSm: the register budget (RecurrenceTraits).
template <int NW, bool kSegmented, int kMinCtasPerSm>
__global__ void __launch_bounds__(RecurrenceTraits<NW>::kThreads, kMinCtasPerSm)
    recurrence_kernel(const KdaPrefillParams p) {
  using T = RecurrenceTraits<NW>;
  extern __shared__ __align__(128) unsigned char smem_bytes[];
  RecurrenceSmem<NW>& sm = *reinterpret_cast<RecurrenceSmem<NW>*>(smem_bytes);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;  // warp w < NW owns value rows 16 w .. + 15
  const int g8 = lane / 4, q4 = lane % 4;  // fragment coordinates (common/mma_sm80.cuh)
  const int64_t unit = blockIdx.x;
  const int slice = static_cast<int>(unit % T::kSlices);
  const int runs = kSegmented ? segment_runs(p) : 1;  // 2 G - 1 with G time segments (segments.cuh)
  const int run = kSegmented ? static_cast<int>((unit / T::kSlices) % runs) : 0;
  const int h = static_cast<int>((unit / T::kSlices / runs) % p.heads);
  const int64_t rank = unit / T::kSlices / runs / p.heads;  // CTAs of longer sequences first (schedule.cu)
  const int64_t n = p.seq_order != nullptr ? p.seq_order[rank] : rank;
  const SegmentRun sr = kSegmented ? segment_run(run) : SegmentRun{0, false};
  const int v_base = slice * T::kSlice;    // first value row of the CTA
  const int v_warp = v_base + 16 * warp;  // first value row of the warp
  int64_t bos, len;
  seq_bounds(p, n, bos, len);
  // The transition run's "outputs" are the coefficients W of the fix-up (segments.cuh).
  auto* out = static_cast<__nv_bfloat16*>(sr.transition ? segment_w(p) : p.out);
  const auto* v = static_cast<const __nv_bfloat16*>(p.v);

  int64_t slot = n;
  bool has_init = p.initial_state != nullptr;
  if (p.state_pool != nullptr) {
    slot = p.state_indices[n];
    if (slot < 0) {  // padded entry: nothing read or written, outputs zero
      if (run != 0) return;
      for (int64_t i = tid; i < len * (T::kSlice / 8); i += T::kThreads) {
        const int64_t t = i / (T::kSlice / 8);
        const int c = static_cast<int>(i % (T::kSlice / 8)) * 8;
        *reinterpret_cast<uint4*>(out + ((bos + t) * p.heads + h) * kDim + v_base + c) = make_uint4(0, 0, 0, 0);
      }
      return;
    }
    has_init = p.has_initial_state == nullptr || p.has_initial_state[n] != 0;
  }
  const int64_t num_chunks = (len + kChunk - 1) / kChunk;
  const int64_t first_chunk =
      p.cu_seqlens != nullptr ? p.chunk_offsets[n] : n * ((p.seq_len + kChunk - 1) / kChunk);
  int64_t chunk_begin = 0, chunk_end = num_chunks;  // this run's segment of the sequence's chunks
  if constexpr (kSegmented) segment_chunks(p, num_chunks, sr.segment, chunk_begin, chunk_end);
  if (tid == 0) {
#pragma unroll
    for (int b = 0; b < T::kStages; ++b) {
      cutlass::arch::ClusterTransactionBarrier::init(&sm.landed[b], StageLoader<NW>::kArrivals);
      cutlass::arch::ClusterBarrier::init(&sm.freed[b], NW);
    }
    cutlass::arch::fence_barrier_init();  // the initialised barriers, visible to the bulk copies
  }
  __syncthreads();  // the last CTA-wide barrier: from here on the warps meet only at the stage mbarriers

  // Chunk j goes to stage j % kStages; the stage indices rotate instead of taking a 64-bit modulo per chunk.
  if (warp == T::kProducer) {
    const StageLoader<NW> loader(p, first_chunk, h, v, bos, v_base);
    int stage = 0;
    uint32_t phases = 0;  // bit b: the parity of stage b's next release
    for (int64_t j = chunk_begin; j < chunk_end; ++j) {
      if (j - chunk_begin >= T::kStages) {  // the stage's previous chunk, read by every row group
        kda::mbarrier_wait(sm.freed[stage], (phases >> stage) & 1);
        phases ^= 1u << stage;
      }
      // (the transition run's v is zero: it loads no valid rows of it)
      loader.issue(sm.stage[stage], sm.landed[stage], j, sr.transition ? 0 : chunk_tokens(len - j * kChunk), lane);
      stage = stage + 1 == T::kStages ? 0 : stage + 1;
    }
    return;
  }

  float s[T::kNt][4];  // this warp's columns of its 16 state rows, fp32
  if (kSegmented && sr.transition) {  // identity rows
#pragma unroll
    for (int nt = 0; nt < T::kNt; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] = v_warp + g8 + 8 * (i / 2) == 8 * nt + 2 * q4 + i % 2 ? 1.f : 0.f;
  } else if (has_init && sr.segment == 0) {
    const bool pool = p.state_pool != nullptr;
    load_state(s, pool ? p.state_pool : p.initial_state, pool ? p.state_pool_fp32 : p.initial_state_fp32, slot, h,
               pool ? pool_state_stride(p) : dense_state_stride(p), v_warp, lane);
  } else {
#pragma unroll
    for (int nt = 0; nt < T::kNt; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
  }
  // The next checkpoint of the sequence, as the number of chunks done when it is due (positions are positive
  // multiples of 64 tokens, ops/contract.py): the chunks run in stretches up to it, so the chunk loop tests
  // nothing but its counter (a per-chunk position test and its branch were ~5% of pass 2).
  int64_t ck = 0, ck_end = 0;
  int ck_chunk = INT_MAX;
  if (p.ckpt_offsets != nullptr) {
    ck = p.ckpt_offsets[n];
    ck_end = p.ckpt_offsets[n + 1];
    if (ck < ck_end) ck_chunk = static_cast<int>(p.ckpt_pos[ck] / kChunk);
  }
  const int len32 = static_cast<int>(len);  // a sequence's chunk and token counts fit 32 bits

  // Whether the next chunk is known to have landed: tested (not waited for) one chunk ahead, so the barrier's
  // latency overlaps a chunk of work instead of sitting at the top of every chunk.
  bool landed = false;
  // This lane's 16-byte piece of a chunk's output rows (token lane / 2, 8 columns), advanced a chunk at a time
  // rather than recomputed from 64-bit indices every chunk.
  const int out_t = lane / 2, out_half = lane % 2;
  __nv_bfloat16* out_piece =
      out + ((bos + chunk_begin * kChunk + out_t) * p.heads + h) * static_cast<int64_t>(kDim) + v_warp + 8 * out_half;
  const int64_t out_step = static_cast<int64_t>(kChunk) * p.heads * kDim;
  const int tile_lane = tile_lane_offset(lane);
  // -I as this lane's B fragment register of an m16n8k16 product (bf16 -1 where the lane's k row meets its n
  // column; n tile 0 in the first register, n tile 1 in the second).
  const uint32_t neg_eye = (2 * q4 == g8 ? 0xBF80u : 0u) | (2 * q4 + 1 == g8 ? 0xBF800000u : 0u);
  int wide_lane[4];
#pragma unroll
  for (int m = 0; m < 4; ++m) wide_lane[m] = wide_lane_offset(lane, m);
  // With one CTA per SM the registers allow two things the 3-CTAs-per-SM budget (<= 136 registers) does not:
  // the chunk loop unrolled over the ring (below) and the chunk's decays loaded at its start. Within that
  // budget both cost 5-10% on multi-wave 4-row-group grids (H96 mixed6 1.034-1.064 vs 0.959 ms).
  constexpr bool kOneCtaPerSm = kMinCtasPerSm == 1;
  // The k-th chunk of this run sits in stage k % kStages, in that stage's (k / kStages)-th landing.
  auto run_chunk = [&](const int stage, const uint32_t parity, const int j) {
    if (!landed) kda::mbarrier_wait(sm.landed[stage], parity);
    const int next = stage + 1 == T::kStages ? 0 : stage + 1;
    landed = kda::mbarrier_test(sm.landed[next], next == 0 ? parity ^ 1 : parity);
    const RecurrenceStage<NW>& st = sm.stage[stage];
    const int L = chunk_tokens(len32 - j * kChunk);
    // This lane's decays of the chunk (gate_end at its state columns). With one CTA per SM they are loaded
    // here: loaded next to their use in the S update, their latency stalled it.
    auto decay = [&](int nl) { return *reinterpret_cast<const float2*>(&st.ops.gate_end[8 * nl + 2 * q4]); };
    float2 ge[T::kNt];
    if constexpr (kOneCtaPerSm) {
#pragma unroll
      for (int nl = 0; nl < T::kNt; ++nl) ge[nl] = decay(nl);
    }

    // D^T = X^T - V^T with X^T = S Kg^T, and O^T = S Qg^T: [16 rows, C]. -V^T enters D's accumulators exactly
    // by one MMA of V^T (an ldmatrix.trans of the value tile is its A fragment) with -I, instead of ~30
    // instructions converting V to fp32 and subtracting. Separate accumulators for even and odd k-steps keep
    // the dependent MMA chains of D short (the recurrence is latency-bound); O is off that chain.
    float dT[2][4], oT[2][4] = {};
    {
      uint32_t vt[4];  // V^T of the warp's 16 value rows
      ldsm_t16x16<T::kSlice>(&st.v[0][16 * warp], lane, vt);
      float da[2][2][4] = {};  // [k-step parity][n tile][fragment]
#pragma unroll
      for (int kk = 0; kk < kDim / 16; ++kk) {
        uint32_t s_bf[4], bk[4], bq[4];
        acc_to_a(s[2 * kk], s[2 * kk + 1], s_bf);
        ldsm_x4(st.ops.kg + wide_lane[kk % 4] + 64 * (kk / 4), bk);
        ldsm_x4(st.ops.qg + wide_lane[kk % 4] + 64 * (kk / 4), bq);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          mma_16816(da[kk & 1][nt], s_bf, bk[2 * nt], bk[2 * nt + 1]);
          mma_16816(oT[nt], s_bf, bq[2 * nt], bq[2 * nt + 1]);
        }
      }
      // -V last in its chain: the value tile's ldmatrix then has the whole chain to land (first in the chain,
      // its latency stalled the chunk's first product).
      mma_16816(da[1][0], vt, neg_eye, 0u);
      mma_16816(da[1][1], vt, 0u, neg_eye);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) dT[nt][i] = da[0][nt][i] + da[1][nt][i];
      }
    }
    // U^T = (V^T - X^T) Ab^T = D^T (-Ab)^T (pass 1 stores Ab negated), on tf32 tensor cores: D's fp32
    // accumulators are the A fragments as they stand (k-step ks = D's n tile, its tokens taken in the order
    // 0 2 4 6 1 3 5 7: a lane's accumulator columns 2 q, 2 q + 1 are A's k = q, q + 4), and pass 1 stores -Ab
    // in the matching B-fragment order (ab_index), two float4 per lane.
    uint32_t u_bf[4];  // U^T [16 rows, C] as a bf16 A fragment
    {
      const float4 ab_t0 = *reinterpret_cast<const float4*>(&st.ops.ab[4 * lane]);             // U tokens 0..7
      const float4 ab_t1 = *reinterpret_cast<const float4*>(&st.ops.ab[kTileElems / 2 + 4 * lane]);  // 8..15
      float u[2][2][4] = {};  // [k-step][n tile]: independent products, summed
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        const uint32_t a[4] = {__float_as_uint(dT[ks][0]), __float_as_uint(dT[ks][2]), __float_as_uint(dT[ks][1]),
                               __float_as_uint(dT[ks][3])};
        mma_1688_tf32(u[ks][0], a, __float_as_uint(ks ? ab_t0.z : ab_t0.x), __float_as_uint(ks ? ab_t0.w : ab_t0.y));
        mma_1688_tf32(u[ks][1], a, __float_as_uint(ks ? ab_t1.z : ab_t1.x), __float_as_uint(ks ? ab_t1.w : ab_t1.y));
      }
      float uT[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) uT[nt][i] = u[0][nt][i] + u[1][nt][i];
      }
      acc_to_a(uT[0], uT[1], u_bf);
    }

    // S <- S diag(gate_end) + U^T Kd.
#pragma unroll
    for (int pair = 0; pair < T::kNt / 2; ++pair) {
      uint32_t kd[4];
      ldsm_x4(st.ops.kdT[pair] + tile_lane, kd);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int nl = 2 * pair + half;
        const float2 g = kOneCtaPerSm ? ge[nl] : decay(nl);
        s[nl][0] *= g.x, s[nl][1] *= g.y, s[nl][2] *= g.x, s[nl][3] *= g.y;
        mma_16816(s[nl], u_bf, kd[2 * half], kd[2 * half + 1]);
      }
    }

    {  // O^T += U^T P^T, staged per warp, then 16-byte stores of the valid rows.
      auto& ost = sm.out[warp];
      uint32_t pb[4];
      ldsm_x4(st.ops.p + tile_lane, pb);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) mma_16816(oT[nt], u_bf, pb[2 * nt], pb[2 * nt + 1]);
      uint32_t o_bf[4];
      acc_to_a(oT[0], oT[1], o_bf);
      stsm_t16x16<16 + 8>(&ost[0][0], lane, o_bf);  // ost[t][v] = O^T[v][t]
      __syncwarp();
      if (out_t < L) {
        *reinterpret_cast<uint4*>(out_piece) = *reinterpret_cast<const uint4*>(&ost[out_t][8 * out_half]);
      }
      out_piece += out_step;
      __syncwarp();
    }

    // Release the stage to the producer only here, once every value read from it has been consumed. Released
    // right after the last read (as first written), ptxas scheduled the S-update products that use the last
    // Kd^T and gate loads after the arrive, and with 3 CTAs per SM the next bulk copy overwrote the stage
    // under those loads now and then: nondeterministic outputs and checkpoints at 4 row groups, caught by
    // test_many_sequences_and_checkpoints, which now also checks that two runs agree bit for bit.
    __syncwarp();
    if (lane == 0) kda::mbarrier_arrive(sm.freed[stage]);
  };
  const int j0 = static_cast<int>(chunk_begin), end = static_cast<int>(chunk_end);
  for (int j = j0;;) {
    const int stop = ck_chunk < end ? ck_chunk : end;
    while (j < stop) {
      const int k = j - j0;
      const uint32_t parity = (k / T::kStages) & 1;
      if (kOneCtaPerSm && k % T::kStages == 0 && j + T::kStages <= stop) {
        // A ring's worth at a time, from stage 0: each copy of the chunk code has its stage, and so every
        // shared-memory address of the chunk, as a constant (331 -> 302 instructions a chunk at 2 row groups).
#pragma unroll
        for (int b = 0; b < T::kStages; ++b) run_chunk(b, parity, j + b);
        j += T::kStages;
      } else {  // (the last chunks of a run, and every chunk within the 3-CTAs-per-SM budget)
        run_chunk(k % T::kStages, parity, j);
        ++j;
      }
    }
    if (j != ck_chunk) break;  // the segment's last chunk
    do {  // the checkpoints due after j chunks
      store_state(s, p.state_pool, p.state_pool_fp32, p.ckpt_slot[ck], h, pool_state_stride(p), v_warp, lane);
      ++ck;
    } while (ck < ck_end && p.ckpt_pos[ck] == static_cast<int64_t>(j) * kChunk);
    ck_chunk = ck < ck_end ? static_cast<int>(p.ckpt_pos[ck] / kChunk) : INT_MAX;
    if (ck_chunk <= j) ck_chunk = INT_MAX;  // (positions are sorted and distinct per slot: not reached)
  }

  if (kSegmented) {  // segment states go to the fix-up's scratch (segments.cuh), which writes the final state
    store_state(s, segment_states(p), true, segment_state_entry(p, n, h, sr), 0, kDim * kDim, v_warp, lane);
  } else if (p.state_pool != nullptr) {
    store_state(s, p.state_pool, p.state_pool_fp32, slot, h, pool_state_stride(p), v_warp, lane);
  } else if (p.final_state != nullptr) {
    store_state(s, p.final_state, p.final_state_fp32, n, h, dense_state_stride(p), v_warp, lane);
  }
}

}  // namespace kda::prefill
