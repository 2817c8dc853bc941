// Pass 2 of the two-pass prefill: the state recurrence over the chunk operands of pass 1 (chunk_ops.cuh).
//
// The recurrence is independent per value row of S [V, K], so a CTA owns a slice of 16 * NW rows of one
// (sequence, head) and each warp 16 of them, held in registers as m16n8k16 accumulators. Per chunk a warp
// computes, with its rows of S (docs/prefill-kernel.md):
//   X^T = S Kg^T                      (S rounded to one bf16 operand; the fp32 accumulators stay the master)
//   U^T = (V^T - X^T) Ab^T            (hi + lo operands: the 16 x 16 solve is cheap and error-sensitive)
//   O^T = S Qg^T + U^T P^T            (the chunk's output rows for this slice)
//   S   = S diag(gate_end) + U^T Kd   (U as one bf16 operand)
// Splitting the state and U into bf16 hi + lo as well (a previous version) doubled the two big products for
// ~15% lower error (worst 2.75e-3 vs 3.16e-3 against the float64 reference, bound 8e-3) and cost 10% of the
// prefill time on an H200 (docs/prefill-kernel.md).
// Every product takes its A operand straight from accumulators (see common/mma_sm80.cuh), so the only shared
// memory traffic is the chunk operands, streamed through a STAGES-deep cp.async ring, one barrier per chunk.
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

#include "common/mma_sm80.cuh"
#include "prefill/chunk_layout.cuh"
#include "prefill/device_utils.cuh"
#include "prefill/params.h"

namespace kda::prefill {

template <int NW>
struct RecurrenceTraits {
  static_assert(NW == 1 || NW == 2 || NW == 4 || NW == 8, "warps per CTA");
  static constexpr int kThreads = 32 * NW;
  static constexpr int kSlice = 16 * NW;         // value rows per CTA
  static constexpr int kSlices = kDim / kSlice;  // CTAs per (sequence, head)
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
  alignas(16) __nv_bfloat16 out[NW][kChunk][16 + 8];  // per-warp output staging (warp-private)
};

// Issues the copies of one chunk: operands (re-padded) and the CTA's value slice (rows >= L zero-filled).
template <int NW>
__device__ __forceinline__ void load_stage(RecurrenceStage<NW>& st, const ChunkOps& ops, const __nv_bfloat16* v,
                                           int64_t tok0, int L, int heads, int h, int v_base, int tid) {
  using T = RecurrenceTraits<NW>;
  for (int i = tid; i < kChunk * (kDim / 8); i += T::kThreads) {  // Kg, Qg: 16 vectors per row
    const int t = i / (kDim / 8), c = (i % (kDim / 8)) * 8;
    cp_async_16(&st.kg[t][c], &ops.kg[t][c], true);
    cp_async_16(&st.qg[t][c], &ops.qg[t][c], true);
  }
  for (int i = tid; i < kDim * 2; i += T::kThreads) {  // KdT: 2 vectors per row
    const int c = i / 2, t = (i % 2) * 8;
    cp_async_16(&st.kdT[c][t], &ops.kdT[c][t], true);
  }
  for (int i = tid; i < kChunk * 2; i += T::kThreads) {  // Ab hi/lo, P: 2 vectors per row
    const int t = i / 2, s = (i % 2) * 8;
    cp_async_16(&st.ab_hi[t][s], &ops.ab_hi[t][s], true);
    cp_async_16(&st.ab_lo[t][s], &ops.ab_lo[t][s], true);
    cp_async_16(&st.p[t][s], &ops.p[t][s], true);
  }
  for (int i = tid; i < kDim / 4; i += T::kThreads) cp_async_16(&st.gate_end[4 * i], &ops.gate_end[4 * i], true);
  constexpr int kVecV = T::kSlice / 8;
  for (int i = tid; i < kChunk * kVecV; i += T::kThreads) {
    const int t = i / kVecV, c = (i % kVecV) * 8;
    const bool valid = t < L;
    cp_async_16(&st.v[t][c], v + ((tok0 + (valid ? t : 0)) * heads + h) * kDim + v_base + c, valid);
  }
}

template <int NW>
__global__ void __launch_bounds__(32 * NW) recurrence_kernel(const KdaPrefillParams p) {
  using T = RecurrenceTraits<NW>;
  extern __shared__ __align__(128) unsigned char smem_bytes[];
  RecurrenceSmem<NW>& sm = *reinterpret_cast<RecurrenceSmem<NW>*>(smem_bytes);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g8 = lane / 4, q4 = lane % 4;  // fragment coordinates (common/mma_sm80.cuh)
  const int64_t unit = blockIdx.x;
  const int slice = static_cast<int>(unit % T::kSlices);
  const int h = static_cast<int>((unit / T::kSlices) % p.heads);
  const int64_t n = unit / T::kSlices / p.heads;
  const int v_base = slice * T::kSlice;  // first value row of the CTA
  const int v_warp = v_base + 16 * warp;  // first value row of the warp
  int64_t bos, len;
  seq_bounds(p, n, bos, len);
  auto* out = static_cast<__nv_bfloat16*>(p.out);
  const auto* v = static_cast<const __nv_bfloat16*>(p.v);

  int64_t slot = n;
  bool has_init = p.initial_state != nullptr;
  if (p.state_pool != nullptr) {
    slot = p.state_indices[n];
    if (slot < 0) {  // padded entry: nothing read or written, outputs zero
      for (int64_t i = tid; i < len * (T::kSlice / 8); i += T::kThreads) {
        const int64_t t = i / (T::kSlice / 8);
        const int c = static_cast<int>(i % (T::kSlice / 8)) * 8;
        *reinterpret_cast<uint4*>(out + ((bos + t) * p.heads + h) * kDim + v_base + c) = make_uint4(0, 0, 0, 0);
      }
      return;
    }
    has_init = p.has_initial_state == nullptr || p.has_initial_state[n] != 0;
  }
  float s[16][4];  // the warp's 16 state rows, fp32
  if (has_init) {
    const bool pool = p.state_pool != nullptr;
    load_state(s, pool ? p.state_pool : p.initial_state, pool ? p.state_pool_fp32 : p.initial_state_fp32, slot, h,
               pool ? pool_state_stride(p) : dense_state_stride(p), v_warp, lane);
  } else {
#pragma unroll
    for (int nt = 0; nt < 16; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
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
  const ChunkOps* ops = static_cast<const ChunkOps*>(p.workspace);
  auto issue = [&](int64_t j) {
    if (j < num_chunks) {
      load_stage(sm.stage[j % T::kStages], ops[(first_chunk + j) * p.heads + h], v, bos + j * kChunk,
                 chunk_tokens(len - j * kChunk), p.heads, h, v_base, tid);
    }
    cp_async_commit();  // always commit, so the group count per chunk stays fixed
  };
#pragma unroll
  for (int j = 0; j < T::kStages - 1; ++j) issue(j);

  for (int64_t j = 0; j < num_chunks; ++j) {
    cute::cp_async_wait<T::kStages - 2>();
    __syncthreads();  // chunk j has landed for everyone; everyone is done with chunk j - 1's stage
    issue(j + T::kStages - 1);
    const RecurrenceStage<NW>& st = sm.stage[j % T::kStages];
    const int64_t t0 = j * kChunk;
    const int L = chunk_tokens(len - t0);

    // X^T = S Kg^T and O^T = S Qg^T: [16 rows, C]. Separate accumulators for
    // even/odd k-steps keep the dependent MMA chains 4 deep instead of 16 (the recurrence is latency-bound).
    float xT[2][4], oT[2][4];
    {
      float xa[2][2][4] = {}, oa[2][2][4] = {};  // [k-step parity][n tile][fragment]
#pragma unroll
      for (int kk = 0; kk < kDim / 16; ++kk) {
        uint32_t s_bf[4];
        acc_to_a(s[2 * kk], s[2 * kk + 1], s_bf);
        uint32_t bk[4], bq[4];
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

    // U^T = (V^T - X^T) Ab^T.
    float rT[2][4];
    {
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
    uint32_t u_bf[4];
    acc_to_a(uT[0], uT[1], u_bf);

    // S <- S diag(gate_end) + U^T Kd.
#pragma unroll
    for (int pair = 0; pair < 8; ++pair) {
      uint32_t kd[4];
      ldsm_b16x16<T::kTPad>(&st.kdT[16 * pair][0], lane, kd);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int nt = 2 * pair + half;
        const float2 ge = *reinterpret_cast<const float2*>(&st.gate_end[8 * nt + 2 * q4]);
        s[nt][0] *= ge.x, s[nt][1] *= ge.y, s[nt][2] *= ge.x, s[nt][3] *= ge.y;
        mma_16816(s[nt], u_bf, kd[2 * half], kd[2 * half + 1]);
      }
    }

    // O^T += U^T P^T, staged per warp, then 16-byte stores of the valid rows.
    auto& ost = sm.out[warp];
    uint32_t pb[4];
    ldsm_b16x16<T::kTPad>(&st.p[0][0], lane, pb);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      mma_16816(oT[nt], u_bf, pb[2 * nt], pb[2 * nt + 1]);
      const int t = 8 * nt + 2 * q4;
      ost[t][g8] = __float2bfloat16(oT[nt][0]);
      ost[t + 1][g8] = __float2bfloat16(oT[nt][1]);
      ost[t][g8 + 8] = __float2bfloat16(oT[nt][2]);
      ost[t + 1][g8 + 8] = __float2bfloat16(oT[nt][3]);
    }
    __syncwarp();
    {
      const int t = lane / 2, half = lane % 2;
      if (t < L) {
        *reinterpret_cast<uint4*>(out + ((bos + t0 + t) * p.heads + h) * kDim + v_warp + 8 * half) =
            *reinterpret_cast<const uint4*>(&ost[t][8 * half]);
      }
    }
    __syncwarp();

    while (ck_pos == t0 + L) {
      store_state(s, p.state_pool, p.state_pool_fp32, p.ckpt_slot[ck], h, pool_state_stride(p), v_warp, lane);
      ++ck;
      ck_pos = ck < ck_end ? p.ckpt_pos[ck] : -1;
    }
  }
  cute::cp_async_wait<0>();

  if (p.state_pool != nullptr) {
    store_state(s, p.state_pool, p.state_pool_fp32, slot, h, pool_state_stride(p), v_warp, lane);
  } else if (p.final_state != nullptr) {
    store_state(s, p.final_state, p.final_state_fp32, n, h, dense_state_stride(p), v_warp, lane);
  }
}

}  // namespace kda::prefill
