// The fused single-pass prefill kernel (kept as a reference variant, algo 1): chunk 16, one CTA per (sequence,
// head, value slice) that builds the chunk operands itself and then advances its state slice. Simpler than
// the two-pass path (chunk_ops.cuh + recurrence.cuh) but latency-bound: every chunk is a chain of phases.
//
// Per chunk of C = 16 tokens (docs/prefill-kernel.md derives every line), with S [V, K] the state at the
// chunk start, e_t = exp(a_t) the per-channel decay of token t and the chunk-local cumulative products
//   F_t = prod_{r<=t} e_r            (decay from the chunk start to token t)
//   D_ts = prod_{s<r<=t} e_r         (decay from token s to token t, s <= t)
//   B_s = prod_{s<r<C} e_r           (decay from token s to the chunk end)
// the kernel forms
//   Kg = k * F, Qg = scale * q * F, Kd = k * B                      [C, K]
//   M[t,s] = b_t sum_c k_t k_s D_ts  (s < t),  P[t,s] = scale sum_c q_t k_s D_ts  (s <= t)   [C, C]
//   Ab = (I + M)^-1 diag(b)                                         [C, C], forward substitution
//   U^T = (V^T - S Kg^T) Ab^T,   O^T = S Qg^T + U^T P^T,   S <- S diag(F_{C-1}) + U^T Kd
// Decays are products of factors in [0, 1] (never exp of a positive number, never a difference of
// cumulative sums), so the unbounded softplus gate stays finite and a zero decay is exact.
//
// The state recurrence is independent per value row, so a CTA owns a slice of 16 * NW rows of S, one warp
// per 16 rows, held in registers as MMA accumulators; the per-chunk [C, K] and [C, C] operands are built
// once per CTA in shared memory by all its threads. Tokens past the end of a sequence are zero-filled and
// made inert (a = 0, b = 0, k = 0), so a partial last chunk needs no special path.
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

#include "common/mma_sm80.cuh"
#include "prefill/device_utils.cuh"
#include "prefill/params.h"

namespace kda::prefill {

template <int NW>
struct FusedTraits {
  static_assert(NW == 2 || NW == 4 || NW == 8, "warps per CTA");
  static constexpr int kWarps = NW;
  static constexpr int kThreads = 32 * NW;
  static constexpr int kSlice = 16 * NW;                 // value rows per CTA
  static constexpr int kSlices = kDim / kSlice;          // CTAs per (sequence, head)
  static constexpr int kPairGroups = kThreads / 8;       // pair phase: 8 source pairs x this many channel groups
  static constexpr int kPairCh = kDim / kPairGroups;     // channels per thread in the pair phase
  static constexpr int kPairSlots = 8 * 17 * 2;          // (source pair, 17 targets, {kk, qk}) partial sums
  static constexpr int kRowPad = kDim + 8;               // bf16 row stride of Kg/Qg: conflict-free B loads
  static constexpr int kTPad = kChunk + 8;               // bf16 row stride of KdT/Ab/P: conflict-free B loads
  static_assert(kPairCh % 4 == 0, "pair phase reads float4");
};

template <int NW>
struct alignas(16) FusedSmem {
  using T = FusedTraits<NW>;
  // Raw inputs of the chunk (cp.async targets; q/k/g are refilled for the next chunk while this one runs,
  // v is double-buffered because it is read late).
  alignas(16) __nv_bfloat16 q_raw[kChunk][kDim];
  alignas(16) __nv_bfloat16 k_raw[kChunk][kDim];
  alignas(16) __nv_bfloat16 g_raw[kChunk][kDim];
  alignas(16) __nv_bfloat16 v_raw[2][kChunk][T::kSlice];
  // Normalised q, k and the per-token decay (first the log-decay a, then e = exp(a)).
  alignas(16) float qn[kChunk][kDim];
  alignas(16) float kn[kChunk][kDim];
  alignas(16) float decay[kChunk][kDim];
  // MMA operands.
  alignas(16) __nv_bfloat16 kg[kChunk][T::kRowPad];   // k * F
  alignas(16) __nv_bfloat16 qg[kChunk][T::kRowPad];   // scale * q * F
  alignas(16) __nv_bfloat16 kdT[kDim][T::kTPad];      // (k * B)^T
  alignas(16) __nv_bfloat16 ab_hi[kChunk][T::kTPad];  // (I + M)^-1 diag(b), hi + lo
  alignas(16) __nv_bfloat16 ab_lo[kChunk][T::kTPad];
  alignas(16) __nv_bfloat16 pqk[kChunk][T::kTPad];    // P
  alignas(16) float pair_partial[T::kPairSlots][T::kPairGroups];
  alignas(16) float mkk[kChunk][kChunk];              // M
  alignas(16) float gate_end[kDim];                   // F_{C-1}
  float b[kChunk];                                    // sigmoid(beta), 0 past the end
  alignas(16) __nv_bfloat16 out_stage[kChunk][T::kSlice + 8];
};

// Issues the cp.async copies of chunk tokens [t0, t0 + L) of one (sequence, head); rows >= L are zero-filled.
template <int NW>
__device__ __forceinline__ void load_chunk_async(FusedSmem<NW>& sm, int vbuf, const KdaPrefillParams& p, int64_t tok0,
                                                 int L, int h, int v_base, int tid) {
  using T = FusedTraits<NW>;
  const auto* q = static_cast<const __nv_bfloat16*>(p.q);
  const auto* k = static_cast<const __nv_bfloat16*>(p.k);
  const auto* g = static_cast<const __nv_bfloat16*>(p.g);
  const auto* v = static_cast<const __nv_bfloat16*>(p.v);
  constexpr int kVecRow = kDim / 8;  // 16-byte vectors per q/k/g row
  for (int i = tid; i < kChunk * kVecRow; i += T::kThreads) {
    const int t = i / kVecRow, c = (i % kVecRow) * 8;
    const bool valid = t < L;
    const int64_t off = ((tok0 + (valid ? t : 0)) * p.heads + h) * kDim + c;
    cp_async_16(&sm.q_raw[t][c], q + off, valid);
    cp_async_16(&sm.k_raw[t][c], k + off, valid);
    cp_async_16(&sm.g_raw[t][c], g + off, valid);
  }
  constexpr int kVecV = T::kSlice / 8;
  for (int i = tid; i < kChunk * kVecV; i += T::kThreads) {
    const int t = i / kVecV, c = (i % kVecV) * 8;
    const bool valid = t < L;
    const int64_t off = ((tok0 + (valid ? t : 0)) * p.heads + h) * kDim + v_base + c;
    cp_async_16(&sm.v_raw[vbuf][t][c], v + off, valid);
  }
  cp_async_commit();
}

template <int NW>
__global__ void __launch_bounds__(32 * NW) fused_prefill_kernel(const KdaPrefillParams p) {
  using T = FusedTraits<NW>;
  extern __shared__ __align__(128) unsigned char smem_bytes[];
  FusedSmem<NW>& sm = *reinterpret_cast<FusedSmem<NW>*>(smem_bytes);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g8 = lane / 4, q4 = lane % 4;  // fragment coordinates (see common/mma_sm80.cuh)
  const int64_t unit = blockIdx.x;
  const int slice = static_cast<int>(unit % T::kSlices);
  const int h = static_cast<int>((unit / T::kSlices) % p.heads);
  const int64_t n = unit / T::kSlices / p.heads;
  const int v_base = slice * T::kSlice;   // first value row of the CTA
  const int v_warp = v_base + 16 * warp;  // first value row of the warp

  int64_t bos, len;
  if (p.cu_seqlens != nullptr) {
    bos = p.cu_seqlens[n];
    len = p.cu_seqlens[n + 1] - bos;
  } else {
    bos = n * p.seq_len;
    len = p.seq_len;
  }
  auto* out = static_cast<__nv_bfloat16*>(p.out);

  // Where the state comes from and goes to.
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

  int64_t ck = 0, ck_end = 0;
  if (p.ckpt_offsets != nullptr) {
    ck = p.ckpt_offsets[n];
    ck_end = p.ckpt_offsets[n + 1];
  }

  const float rate = __expf(p.A_log[h]);
  const bool use_lb = p.use_lower_bound != 0;
  float dtb[4];  // dt_bias of the 4 channels this lane activates
#pragma unroll
  for (int j = 0; j < 4; ++j) dtb[j] = p.dt_bias[h * kDim + 4 * lane + j];
  const auto* beta = static_cast<const __nv_bfloat16*>(p.beta);

  const int64_t num_chunks = (len + kChunk - 1) / kChunk;
  if (num_chunks > 0) load_chunk_async(sm, 0, p, bos, chunk_tokens(len), h, v_base, tid);

  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    const int64_t t0 = chunk * kChunk;  // first token of the chunk within the sequence
    const int L = chunk_tokens(len - t0);
    const int vbuf = static_cast<int>(chunk & 1);
    cp_async_wait_all();
    __syncthreads();

    // 1. Per token: L2 norms of q and k, the gate, sigmoid(beta). A warp per token, 4 channels per lane.
    for (int t = warp; t < kChunk; t += NW) {
      const bool valid = t < L;
      float qv[4], kv[4], gv[4];
      {
        const uint2 qr = *reinterpret_cast<const uint2*>(&sm.q_raw[t][4 * lane]);
        const uint2 kr = *reinterpret_cast<const uint2*>(&sm.k_raw[t][4 * lane]);
        const uint2 gr = *reinterpret_cast<const uint2*>(&sm.g_raw[t][4 * lane]);
        const float2 q01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&qr.x));
        const float2 q23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&qr.y));
        const float2 k01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&kr.x));
        const float2 k23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&kr.y));
        const float2 g01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&gr.x));
        const float2 g23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&gr.y));
        qv[0] = q01.x, qv[1] = q01.y, qv[2] = q23.x, qv[3] = q23.y;
        kv[0] = k01.x, kv[1] = k01.y, kv[2] = k23.x, kv[3] = k23.y;
        gv[0] = g01.x, gv[1] = g01.y, gv[2] = g23.x, gv[3] = g23.y;
      }
      float sq = 0.f, sk = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) sq += qv[j] * qv[j], sk += kv[j] * kv[j];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        sq += __shfl_xor_sync(0xffffffffu, sq, o);
        sk += __shfl_xor_sync(0xffffffffu, sk, o);
      }
      const float rq = rsqrtf(sq + 1e-6f), rk = rsqrtf(sk + 1e-6f);
      float a[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) a[j] = valid ? gate(gv[j], dtb[j], rate, p.lower_bound, use_lb) : 0.f;
      *reinterpret_cast<float4*>(&sm.qn[t][4 * lane]) = make_float4(qv[0] * rq, qv[1] * rq, qv[2] * rq, qv[3] * rq);
      *reinterpret_cast<float4*>(&sm.kn[t][4 * lane]) = make_float4(kv[0] * rk, kv[1] * rk, kv[2] * rk, kv[3] * rk);
      *reinterpret_cast<float4*>(&sm.decay[t][4 * lane]) = make_float4(a[0], a[1], a[2], a[3]);
      if (lane == 0) {
        const float bl = valid ? __bfloat162float(beta[(bos + t0 + t) * p.heads + h]) : 0.f;
        sm.b[t] = valid ? 1.f / (1.f + __expf(-bl)) : 0.f;
      }
    }
    __syncthreads();

    // 2. Per channel: decays as running products (F forward, B backward), Kg, Qg, KdT, e.
    for (int c = tid; c < kDim; c += T::kThreads) {
      float e[kChunk];
      float F = 1.f;
#pragma unroll
      for (int t = 0; t < kChunk; ++t) {
        e[t] = __expf(sm.decay[t][c]);
        F *= e[t];
        sm.kg[t][c] = __float2bfloat16(sm.kn[t][c] * F);
        sm.qg[t][c] = __float2bfloat16(p.scale * sm.qn[t][c] * F);
        sm.decay[t][c] = e[t];
      }
      sm.gate_end[c] = F;
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
      *reinterpret_cast<uint4*>(&sm.kdT[c][0]) = make_uint4(kd[0], kd[1], kd[2], kd[3]);
      *reinterpret_cast<uint4*>(&sm.kdT[c][8]) = make_uint4(kd[4], kd[5], kd[6], kd[7]);
    }
    __syncthreads();

    // The raw q/k/g buffers are free: prefetch the next chunk while this one computes.
    if (chunk + 1 < num_chunks) {
      const int64_t t1 = t0 + kChunk;
      load_chunk_async(sm, vbuf ^ 1, p, bos + t1, chunk_tokens(len - t1), h, v_base, tid);
    }

    // 3a. Per warp: X^T = S Kg^T and O^T = S Qg^T ([16 rows, C]), S split hi + lo for ~fp32 accuracy.
    float xT[2][4] = {}, oT[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < kDim / 16; ++kk) {
      uint32_t s_hi[4], s_lo[4];
      acc_to_a_split(s[2 * kk], s[2 * kk + 1], s_hi, s_lo);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const uint32_t bk0 = lds_u32(&sm.kg[8 * nt + g8][16 * kk + 2 * q4]);
        const uint32_t bk1 = lds_u32(&sm.kg[8 * nt + g8][16 * kk + 8 + 2 * q4]);
        mma_16816(xT[nt], s_hi, bk0, bk1);
        mma_16816(xT[nt], s_lo, bk0, bk1);
        const uint32_t bq0 = lds_u32(&sm.qg[8 * nt + g8][16 * kk + 2 * q4]);
        const uint32_t bq1 = lds_u32(&sm.qg[8 * nt + g8][16 * kk + 8 + 2 * q4]);
        mma_16816(oT[nt], s_hi, bq0, bq1);
        mma_16816(oT[nt], s_lo, bq0, bq1);
      }
    }

    // 3b. Pair sums over channels: thread (pp, grp) runs sources pp and 15 - pp (17 targets together, so all
    // threads do equal work) over its channel group, carrying the decay D_ts as a running product.
    {
      const int pp = tid / T::kPairGroups, grp = tid % T::kPairGroups, c0 = grp * T::kPairCh;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int src = half ? kChunk - 1 - pp : pp;
        const int slot0 = half ? kChunk - pp : 0;
        float ks[T::kPairCh], dec[T::kPairCh];
#pragma unroll
        for (int j = 0; j < T::kPairCh; j += 4) {
          const float4 x = *reinterpret_cast<const float4*>(&sm.kn[src][c0 + j]);
          ks[j] = x.x, ks[j + 1] = x.y, ks[j + 2] = x.z, ks[j + 3] = x.w;
          dec[j] = dec[j + 1] = dec[j + 2] = dec[j + 3] = 1.f;
        }
        for (int t = src; t < kChunk; ++t) {
          float pk = 0.f, pq = 0.f;
#pragma unroll
          for (int j = 0; j < T::kPairCh; j += 4) {
            const float4 e = *reinterpret_cast<const float4*>(&sm.decay[t][c0 + j]);
            const float4 kt = *reinterpret_cast<const float4*>(&sm.kn[t][c0 + j]);
            const float4 qt = *reinterpret_cast<const float4*>(&sm.qn[t][c0 + j]);
            if (t > src) dec[j] *= e.x, dec[j + 1] *= e.y, dec[j + 2] *= e.z, dec[j + 3] *= e.w;
            const float w0 = ks[j] * dec[j], w1 = ks[j + 1] * dec[j + 1];
            const float w2 = ks[j + 2] * dec[j + 2], w3 = ks[j + 3] * dec[j + 3];
            pk += kt.x * w0 + kt.y * w1 + kt.z * w2 + kt.w * w3;
            pq += qt.x * w0 + qt.y * w1 + qt.z * w2 + qt.w * w3;
          }
          const int idx = (pp * 17 + slot0 + (t - src)) * 2;
          sm.pair_partial[idx][grp] = pk;
          sm.pair_partial[idx + 1][grp] = pq;
        }
      }
    }
    __syncthreads();

    // 3c. Reduce the channel groups: M (with b_t) and P (with scale).
    for (int o = tid; o < 2 * kChunk * kChunk; o += T::kThreads) {
      const int kind = o / (kChunk * kChunk), t = (o / kChunk) % kChunk, src = o % kChunk;
      float val = 0.f;
      if (src <= t) {
        const int pp = src < 8 ? src : kChunk - 1 - src;
        const int slot = (src < 8 ? 0 : kChunk - pp) + (t - src);
        const float* row = sm.pair_partial[(pp * 17 + slot) * 2 + kind];
#pragma unroll
        for (int j = 0; j < T::kPairGroups; j += 4) {
          const float4 x = *reinterpret_cast<const float4*>(row + j);
          val += (x.x + x.y) + (x.z + x.w);
        }
      }
      if (kind == 0) {
        sm.mkk[t][src] = src < t ? sm.b[t] * val : 0.f;
      } else {
        sm.pqk[t][src] = __float2bfloat16(src <= t ? p.scale * val : 0.f);
      }
    }
    __syncthreads();

    // 4. Ab = (I + M)^-1 diag(b): forward substitution, lane j solves column j.
    if (warp == 0 && lane < kChunk) {
      const int j = lane;
      float x[kChunk];
#pragma unroll
      for (int t = 0; t < kChunk; ++t) {
        float acc = t == j ? 1.f : 0.f;
#pragma unroll
        for (int r = 0; r < t; ++r) acc -= sm.mkk[t][r] * x[r];
        x[t] = acc;
      }
      const float bj = sm.b[j];
#pragma unroll
      for (int t = 0; t < kChunk; ++t) {
        const float val = x[t] * bj;
        const __nv_bfloat16 hi = __float2bfloat16(val);
        sm.ab_hi[t][j] = hi;
        sm.ab_lo[t][j] = __float2bfloat16(val - __bfloat162float(hi));
      }
    }
    __syncthreads();

    // 5. Per warp: U^T = (V^T - X^T) Ab^T, O^T += U^T P^T, S <- S diag(F_end) + U^T Kd.
    {
      float rT[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int t = 8 * nt + 2 * q4, v = 16 * warp + g8;
        rT[nt][0] = __bfloat162float(sm.v_raw[vbuf][t][v]) - xT[nt][0];
        rT[nt][1] = __bfloat162float(sm.v_raw[vbuf][t + 1][v]) - xT[nt][1];
        rT[nt][2] = __bfloat162float(sm.v_raw[vbuf][t][v + 8]) - xT[nt][2];
        rT[nt][3] = __bfloat162float(sm.v_raw[vbuf][t + 1][v + 8]) - xT[nt][3];
      }
      uint32_t r_hi[4], r_lo[4];
      acc_to_a_split(rT[0], rT[1], r_hi, r_lo);
      float uT[2][4] = {};
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const uint32_t bh0 = lds_u32(&sm.ab_hi[8 * nt + g8][2 * q4]);
        const uint32_t bh1 = lds_u32(&sm.ab_hi[8 * nt + g8][8 + 2 * q4]);
        const uint32_t bl0 = lds_u32(&sm.ab_lo[8 * nt + g8][2 * q4]);
        const uint32_t bl1 = lds_u32(&sm.ab_lo[8 * nt + g8][8 + 2 * q4]);
        mma_16816(uT[nt], r_hi, bh0, bh1);
        mma_16816(uT[nt], r_lo, bh0, bh1);
        mma_16816(uT[nt], r_hi, bl0, bl1);
      }
      uint32_t u_hi[4], u_lo[4];
      acc_to_a_split(uT[0], uT[1], u_hi, u_lo);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const uint32_t b0 = lds_u32(&sm.pqk[8 * nt + g8][2 * q4]);
        const uint32_t b1 = lds_u32(&sm.pqk[8 * nt + g8][8 + 2 * q4]);
        mma_16816(oT[nt], u_hi, b0, b1);
        mma_16816(oT[nt], u_lo, b0, b1);
        const int t = 8 * nt + 2 * q4, v = 16 * warp + g8;
        sm.out_stage[t][v] = __float2bfloat16(oT[nt][0]);
        sm.out_stage[t + 1][v] = __float2bfloat16(oT[nt][1]);
        sm.out_stage[t][v + 8] = __float2bfloat16(oT[nt][2]);
        sm.out_stage[t + 1][v + 8] = __float2bfloat16(oT[nt][3]);
      }
#pragma unroll
      for (int nt = 0; nt < 16; ++nt) {
        const float2 ge = *reinterpret_cast<const float2*>(&sm.gate_end[8 * nt + 2 * q4]);
        s[nt][0] *= ge.x, s[nt][1] *= ge.y, s[nt][2] *= ge.x, s[nt][3] *= ge.y;
        const uint32_t b0 = lds_u32(&sm.kdT[8 * nt + g8][2 * q4]);
        const uint32_t b1 = lds_u32(&sm.kdT[8 * nt + g8][8 + 2 * q4]);
        mma_16816(s[nt], u_hi, b0, b1);
        mma_16816(s[nt], u_lo, b0, b1);
      }
    }
    __syncthreads();

    // 6. Output rows of the chunk, 16-byte stores; checkpoints due after this chunk.
    constexpr int kVecV = T::kSlice / 8;
    for (int i = tid; i < L * kVecV; i += T::kThreads) {
      const int t = i / kVecV, c = (i % kVecV) * 8;
      *reinterpret_cast<uint4*>(out + ((bos + t0 + t) * p.heads + h) * kDim + v_base + c) =
          *reinterpret_cast<const uint4*>(&sm.out_stage[t][c]);
    }
    while (ck < ck_end && p.ckpt_pos[ck] == t0 + L) {
      store_state(s, p.state_pool, p.state_pool_fp32, p.ckpt_slot[ck], h, pool_state_stride(p), v_warp, lane);
      ++ck;
    }
  }

  if (p.state_pool != nullptr) {
    store_state(s, p.state_pool, p.state_pool_fp32, slot, h, pool_state_stride(p), v_warp, lane);
  } else if (p.final_state != nullptr) {
    store_state(s, p.final_state, p.final_state_fp32, n, h, dense_state_stride(p), v_warp, lane);
  }
}

}  // namespace kda::prefill
