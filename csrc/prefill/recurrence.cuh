// Pass 2 of the two-pass prefill: the state recurrence over the chunk operands of pass 1 (chunk_ops.cuh).
//
// The recurrence is independent per value row of S [V, K], so a CTA owns a slice of 16 * NW rows of one
// (sequence, head): NW row groups of 16 rows, one warp each, held in registers as m16n8k16 accumulators.
// Per chunk, with the rows of S of a warp (docs/prefill-kernel.md):
//   X^T = S Kg^T                      (S rounded to one bf16 operand; the fp32 accumulators stay the master)
//   U^T = (V^T - X^T) Ab^T            (hi + lo operands: the 16 x 16 solve is cheap and error-sensitive)
//   O^T = S Qg^T + U^T P^T            (the chunk's output rows for this slice)
//   S   = S diag(gate_end) + U^T Kd   (U as one bf16 operand)
// Splitting the state and U into bf16 hi + lo as well (a previous version) doubled the two big products for
// ~15% lower error (worst 2.75e-3 vs 3.16e-3 against the float64 reference, bound 8e-3) and cost 10% of the
// prefill time on an H200 (docs/prefill-kernel.md).
//
// Every product takes its A operand straight from accumulators (see common/mma_sm80.cuh); the chunk operands
// stream through a kStages-deep cp.async ring with one CTA barrier per chunk, their B fragments read by
// ldmatrix. (Splitting a row group's key columns over two warps, which exchanged partial products through
// shared memory each chunk, shortened the chain but lost once the copies stopped stalling it: removed.)
#pragma once

#include <cuda_bf16.h>
#include <cstddef>
#include <cstdint>

#include "common/mma_sm80.cuh"
#include "prefill/chunk_layout.cuh"
#include "prefill/device_utils.cuh"
#include "prefill/params.h"
#include "prefill/segments.cuh"

namespace kda::prefill {

template <int NW>
struct RecurrenceTraits {
  static_assert(NW == 1 || NW == 2 || NW == 4 || NW == 8, "row groups (warps) per CTA");
  static constexpr int kThreads = 32 * NW;
  static constexpr int kSlice = 16 * NW;         // value rows per CTA
  static constexpr int kSlices = kDim / kSlice;  // CTAs per (sequence, head)
  static constexpr int kNt = kDim / 8;          // state n tiles (8 key columns each) per warp
  static constexpr int kStages = 3;              // chunks in flight: hides the global latency of one chunk
  static constexpr int kRowPad = kDim + 8;       // bf16 stride of Kg/Qg rows: conflict-free ldmatrix
  static constexpr int kTPad = kChunk + 8;       // bf16 stride of KdT/Ab/P rows: conflict-free ldmatrix
};

template <int NW>
struct alignas(16) RecurrenceStage {
  using T = RecurrenceTraits<NW>;
  alignas(16) __nv_bfloat16 kg[kChunk][T::kRowPad];
  alignas(16) __nv_bfloat16 qg[kChunk][T::kRowPad];
  alignas(16) __nv_bfloat16 kdT[kDim][T::kTPad];
  alignas(16) __nv_bfloat16 ab_hi[kChunk][T::kTPad];
  alignas(16) __nv_bfloat16 ab_lo[kChunk][T::kTPad];
  alignas(16) __nv_bfloat16 p[kChunk][T::kTPad];
  alignas(16) float gate_end[kDim];
  alignas(16) __nv_bfloat16 v[kChunk][T::kSlice];
};

template <int NW>
struct alignas(16) RecurrenceSmem {
  RecurrenceStage<NW> stage[RecurrenceTraits<NW>::kStages];
  alignas(16) __nv_bfloat16 out[NW][kChunk][16 + 8];  // per warp output staging
};

// Issues 16-byte copies i = tid, tid + kThreads, ... < kCount of a row-major array with kRowVecs vectors per
// row into shared rows kDstRowBytes apart; src and dst are already this thread's first vector (vector tid).
// Trip count and strides are compile-time, so this is straight-line code with immediate offsets (a predicated
// tail at most).
template <int kCount, int kRowVecs, int kDstRowBytes, int kThreads>
__device__ __forceinline__ void copy_vectors(char* dst, const char* src, int tid) {
  static_assert(kThreads % kRowVecs == 0, "every pass of the threads starts a row");
#pragma unroll
  for (int r = 0; r < (kCount + kThreads - 1) / kThreads; ++r) {
    if (kCount % kThreads == 0 || tid + r * kThreads < kCount) {
      cp_async_16(dst + r * (kThreads / kRowVecs) * kDstRowBytes, src + r * kThreads * 16, true);
    }
  }
}

// The copies of every chunk as one thread issues them: operands (re-padded) and the CTA's value slice (rows
// past the sequence zero-filled). The per-thread offsets are computed once; a chunk then costs two 64-bit
// address products and straight-line cp.async with immediate offsets, which the compiler overlaps with the
// MMAs around them (generic copy loops here, between the chunk barrier and the first products, used to stall
// every chunk: docs/prefill-kernel.md). ChunkOps and RecurrenceStage keep the same field order, so Kg | Qg is
// one [32][128] array (rows padded to kRowPad) and KdT | Ab hi | Ab lo | P one [176][16] array (rows padded to
// kTPad) on both sides.
template <int NW>
struct StageLoader {
  using T = RecurrenceTraits<NW>;
  static constexpr int kThreads = T::kThreads;
  static constexpr int kRowVecs = kDim / 8;          // vectors per Kg / Qg row
  static constexpr int kSmallRows = kDim + 3 * kChunk;  // KdT, Ab hi, Ab lo, P rows of 16 tokens
  static constexpr int kVecV = T::kSlice / 8;        // vectors per token of the value slice
  static_assert(kChunk * kVecV <= kThreads, "at most one V vector per thread");

  const char* ops;         // chunk 0's ChunkOps + 16 * tid
  int64_t ops_step;        // bytes from one chunk's ChunkOps to the next's
  const __nv_bfloat16* v;  // chunk 0's first token row of the slice
  int64_t v_step;          // elements from one chunk's first token row to the next's
  int64_t v_off;           // this thread's vector in a chunk: token v_t, 8 columns
  int v_t;                 // kChunk when the thread copies no V vector
  int dst_rows, dst_small, dst_gate, dst_v;  // this thread's byte offsets in a stage

  __device__ __forceinline__ StageLoader(const ChunkOps* workspace, int64_t first_chunk, int heads, int h,
                                         const __nv_bfloat16* v_all, int64_t bos, int v_base, int tid) {
    ops = reinterpret_cast<const char*>(workspace + first_chunk * heads + h) + 16 * tid;
    ops_step = static_cast<int64_t>(heads) * sizeof(ChunkOps);
    v = v_all + (bos * heads + h) * kDim + v_base;
    v_step = static_cast<int64_t>(kChunk) * heads * kDim;
    const bool has_v = kChunk * kVecV == kThreads || tid < kChunk * kVecV;
    v_t = has_v ? tid / kVecV : kChunk;
    v_off = has_v ? static_cast<int64_t>(v_t) * heads * kDim + (tid % kVecV) * 8 : 0;
    dst_rows = static_cast<int>(offsetof(RecurrenceStage<NW>, kg)) + (tid / kRowVecs) * 2 * T::kRowPad +
               (tid % kRowVecs) * 16;
    dst_small = static_cast<int>(offsetof(RecurrenceStage<NW>, kdT)) + (tid / 2) * 2 * T::kTPad + (tid % 2) * 16;
    dst_gate = static_cast<int>(offsetof(RecurrenceStage<NW>, gate_end)) + 16 * tid;
    dst_v = static_cast<int>(offsetof(RecurrenceStage<NW>, v)) + v_t * 2 * T::kSlice + (tid % kVecV) * 16;
  }

  // Chunk j of the sequence (L valid tokens of V) into stage `st`.
  __device__ __forceinline__ void issue(RecurrenceStage<NW>& st, int64_t j, int L, int tid) const {
    char* base = reinterpret_cast<char*>(&st);
    const char* src = ops + j * ops_step;
    copy_vectors<2 * kChunk * kRowVecs, kRowVecs, 2 * T::kRowPad, kThreads>(base + dst_rows, src, tid);
    copy_vectors<2 * kSmallRows, 2, 2 * T::kTPad, kThreads>(base + dst_small, src + offsetof(ChunkOps, kdT), tid);
    copy_vectors<kDim / 4, 1, 16, kThreads>(base + dst_gate, src + offsetof(ChunkOps, gate_end), tid);
    if (v_t < kChunk) {
      const bool valid = v_t < L;
      cp_async_16(base + dst_v, v + j * v_step + (valid ? v_off : 0), valid);
    }
  }
};
static_assert(offsetof(ChunkOps, qg) == offsetof(ChunkOps, kg) + 2 * kChunk * kDim &&
                  offsetof(ChunkOps, ab_hi) == offsetof(ChunkOps, kdT) + 2 * kDim * kChunk &&
                  offsetof(ChunkOps, ab_lo) == offsetof(ChunkOps, ab_hi) + 2 * kChunk * kChunk &&
                  offsetof(ChunkOps, p) == offsetof(ChunkOps, ab_lo) + 2 * kChunk * kChunk,
              "StageLoader copies Kg | Qg and KdT | Ab | P as single arrays");
static_assert(offsetof(RecurrenceStage<1>, qg) == offsetof(RecurrenceStage<1>, kg) + 2 * kChunk * (kDim + 8) &&
                  offsetof(RecurrenceStage<1>, ab_hi) == offsetof(RecurrenceStage<1>, kdT) + 2 * kDim * (kChunk + 8) &&
                  offsetof(RecurrenceStage<1>, ab_lo) == offsetof(RecurrenceStage<1>, ab_hi) + 2 * kChunk * (kChunk + 8) &&
                  offsetof(RecurrenceStage<1>, p) == offsetof(RecurrenceStage<1>, ab_lo) + 2 * kChunk * (kChunk + 8),
              "RecurrenceStage keeps ChunkOps' field order without gaps");

// kSegmented: the CTA is one of the 2 G - 1 runs of a time-segmented sequence (segments.cuh). A separate
// instantiation, so the plain kernel keeps its registers (the run bookkeeping costs ~30 more).
template <int NW, bool kSegmented>
__global__ void __launch_bounds__(32 * NW) recurrence_kernel(const KdaPrefillParams p) {
  using T = RecurrenceTraits<NW>;
  extern __shared__ __align__(128) unsigned char smem_bytes[];
  RecurrenceSmem<NW>& sm = *reinterpret_cast<RecurrenceSmem<NW>*>(smem_bytes);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;  // warp w owns value rows 16 w .. + 15
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
  // The next checkpoint of the sequence, its position kept in a register so the per-chunk test reads no memory.
  int64_t ck = 0, ck_end = 0, ck_pos = -1;
  if (p.ckpt_offsets != nullptr) {
    ck = p.ckpt_offsets[n];
    ck_end = p.ckpt_offsets[n + 1];
    if (ck < ck_end) ck_pos = p.ckpt_pos[ck];
  }

  const int64_t num_chunks = (len + kChunk - 1) / kChunk;
  const int64_t first_chunk =
      p.cu_seqlens != nullptr ? p.chunk_offsets[n] : n * ((p.seq_len + kChunk - 1) / kChunk);
  int64_t chunk_begin = 0, chunk_end = num_chunks;  // this run's segment of the sequence's chunks
  if constexpr (kSegmented) segment_chunks(p, num_chunks, sr.segment, chunk_begin, chunk_end);
  const StageLoader<NW> loader(static_cast<const ChunkOps*>(p.workspace), first_chunk, p.heads, h, v,
                                              bos, v_base, tid);
  // Chunk j goes to stage j % kStages; the stage indices rotate instead of taking a 64-bit modulo per chunk.
  auto issue = [&](int64_t j, int buffer) {
    if (j < chunk_end) {  // (the transition run's v is zero: it loads no valid rows of it)
      loader.issue(sm.stage[buffer], j, sr.transition ? 0 : chunk_tokens(len - j * kChunk), tid);
    }
    cp_async_commit();  // always commit, so the group count per chunk stays fixed
  };
#pragma unroll
  for (int j = 0; j < T::kStages - 1; ++j) issue(chunk_begin + j, j);
  int stage = 0, next_stage = T::kStages - 1;  // stages of chunk j and of chunk j + kStages - 1

  for (int64_t j = chunk_begin; j < chunk_end; ++j) {
    cute::cp_async_wait<T::kStages - 2>();
    __syncthreads();  // chunk j has landed for everyone; everyone is done with chunk j - 1's stage
    const RecurrenceStage<NW>& st = sm.stage[stage];
    const int64_t t0 = j * kChunk;
    const int L = chunk_tokens(len - t0);

    // X^T = S Kg^T and O^T = S Qg^T: [16 rows, C]. Separate accumulators for even
    // and odd k-steps keep the dependent MMA chains short (the recurrence is latency-bound).
    float xT[2][4], oT[2][4];
    {
      float xa[2][2][4] = {}, oa[2][2][4] = {};  // [k-step parity][n tile][fragment]
#pragma unroll
      for (int kk = 0; kk < kDim / 16; ++kk) {
        uint32_t s_bf[4], bk[4], bq[4];
        acc_to_a(s[2 * kk], s[2 * kk + 1], s_bf);
        ldsm_b16x16<T::kRowPad>(&st.kg[0][16 * kk], lane, bk);
        ldsm_b16x16<T::kRowPad>(&st.qg[0][16 * kk], lane, bq);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          mma_16816(xa[kk & 1][nt], s_bf, bk[2 * nt], bk[2 * nt + 1]);
          mma_16816(oa[kk & 1][nt], s_bf, bq[2 * nt], bq[2 * nt + 1]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          xT[nt][i] = xa[0][nt][i] + xa[1][nt][i];
          oT[nt][i] = oa[0][nt][i] + oa[1][nt][i];
        }
      }
    }
    // The next copies go out while those products are in flight (chunk j - 1's stage is free since the
    // barrier), rather than between the barrier and the products, where they stalled every chunk's chain.
    issue(j + T::kStages - 1, next_stage);
    stage = stage + 1 == T::kStages ? 0 : stage + 1;
    next_stage = next_stage + 1 == T::kStages ? 0 : next_stage + 1;

    // U^T = (V^T - X^T) Ab^T.
    uint32_t u_bf[4];  // U^T [16 rows, C] as a bf16 A fragment
    {
      float rT[2][4];
      uint32_t vt[4];  // V^T of the warp's 16 value rows in accumulator order
      ldsm_t16x16<T::kSlice>(&st.v[0][16 * warp], lane, vt);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const float2 v0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&vt[2 * nt]));
        const float2 v1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&vt[2 * nt + 1]));
        rT[nt][0] = v0.x - xT[nt][0];
        rT[nt][1] = v0.y - xT[nt][1];
        rT[nt][2] = v1.x - xT[nt][2];
        rT[nt][3] = v1.y - xT[nt][3];
      }
      uint32_t r_hi[4], r_lo[4];
      acc_to_a_split(rT[0], rT[1], r_hi, r_lo);
      float uT[2][4];
      uint32_t ab_hi[4], ab_lo[4];
      ldsm_b16x16<T::kTPad>(&st.ab_hi[0][0], lane, ab_hi);
      ldsm_b16x16<T::kTPad>(&st.ab_lo[0][0], lane, ab_lo);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        float u0[4] = {}, u1[4] = {}, u2[4] = {};  // three independent products, summed
        mma_16816(u0, r_hi, ab_hi[2 * nt], ab_hi[2 * nt + 1]);
        mma_16816(u1, r_lo, ab_hi[2 * nt], ab_hi[2 * nt + 1]);
        mma_16816(u2, r_hi, ab_lo[2 * nt], ab_lo[2 * nt + 1]);
#pragma unroll
        for (int i = 0; i < 4; ++i) uT[nt][i] = u0[i] + (u1[i] + u2[i]);
      }
      acc_to_a(uT[0], uT[1], u_bf);
    }

    // S <- S diag(gate_end) + U^T Kd.
#pragma unroll
    for (int pair = 0; pair < T::kNt / 2; ++pair) {
      uint32_t kd[4];
      ldsm_b16x16<T::kTPad>(&st.kdT[16 * pair][0], lane, kd);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int nl = 2 * pair + half;
        const float2 ge = *reinterpret_cast<const float2*>(&st.gate_end[8 * nl + 2 * q4]);
        s[nl][0] *= ge.x, s[nl][1] *= ge.y, s[nl][2] *= ge.x, s[nl][3] *= ge.y;
        mma_16816(s[nl], u_bf, kd[2 * half], kd[2 * half + 1]);
      }
    }

    {  // O^T += U^T P^T, staged per warp, then 16-byte stores of the valid rows.
      auto& ost = sm.out[warp];
      uint32_t pb[4];
      ldsm_b16x16<T::kTPad>(&st.p[0][0], lane, pb);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) mma_16816(oT[nt], u_bf, pb[2 * nt], pb[2 * nt + 1]);
      uint32_t o_bf[4];
      acc_to_a(oT[0], oT[1], o_bf);
      stsm_t16x16<16 + 8>(&ost[0][0], lane, o_bf);  // ost[t][v] = O^T[v][t]
      __syncwarp();
      {
        const int t = lane / 2, half = lane % 2;
        if (t < L) {
          *reinterpret_cast<uint4*>(out + ((bos + t0 + t) * p.heads + h) * kDim + v_warp + 8 * half) =
              *reinterpret_cast<const uint4*>(&ost[t][8 * half]);
        }
      }
      __syncwarp();
    }

    while (ck_pos == t0 + L) {
      store_state(s, p.state_pool, p.state_pool_fp32, p.ckpt_slot[ck], h, pool_state_stride(p), v_warp, lane);
      ++ck;
      ck_pos = ck < ck_end ? p.ckpt_pos[ck] : -1;
    }
  }
  cute::cp_async_wait<0>();

  if (kSegmented) {  // segment states go to the fix-up's scratch (segments.cuh), which writes the final state
    store_state(s, segment_states(p), true, segment_state_entry(p, n, h, sr), 0, kDim * kDim, v_warp, lane);
  } else if (p.state_pool != nullptr) {
    store_state(s, p.state_pool, p.state_pool_fp32, slot, h, pool_state_stride(p), v_warp, lane);
  } else if (p.final_state != nullptr) {
    store_state(s, p.final_state, p.final_state_fp32, n, h, dense_state_stride(p), v_warp, lane);
  }
}

}  // namespace kda::prefill
