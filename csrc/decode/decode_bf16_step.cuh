// KDA decode fast path for the commonest call: bf16 state pool, one token per sequence, no intermediate slots.
//
// Why a second kernel. The step is a latency-bound stream, so its bandwidth is set by the state bytes each SM
// has in flight: resident threads x bytes per thread. kda_decode_kernel keeps its state slice as fp32 (it
// must, across T > 1 tokens), which for a bf16 pool means 32 bytes loaded per thread at ~72 registers: 28 KB
// in flight per SM, measured at ~55% of the copy rate on an H200 (fp32 state: 48 KB in flight, ~88%).
// Here each thread loads 64 bytes (32 bf16 values, four 16-byte chunks) and keeps them as raw bf16 pairs
// (16 registers); the decayed value is recomputed in the update pass instead of being held as fp32.
// The arithmetic per element is that of kda_decode_kernel (decay, both dots, rank-1 update, one rounding).
//
// Layout. A half-warp owns a whole value row per access: lane c = lane % 16 holds the 16-byte chunk c
// (key columns 8c .. 8c + 7) of 4 rows, so every warp access covers two full rows, 512 contiguous bytes, and
// a lane touches the same 8 key columns in every row: their decay, k and q come from shared memory once into
// registers (the first version of this kernel, 4 lanes per row, re-read them for every element: 80 shared
// loads per thread). The price is a reduction of 4 rows x 2 dots over 16 lanes, done as a reduce-scatter.
// kStepRowsPerCta = 32 rows per CTA (8 KB of state), kStepSlicesPerHead = 4 CTAs per (sequence, head).
#pragma once

#include <type_traits>

#include "common/pdl.cuh"
#include "common/warp_reduce.cuh"
#include "decode/decode_kernel.cuh"

namespace kda_serving::decode {

constexpr int kStepLanesPerRow = 16;                                     // one 16-byte chunk per lane
constexpr int kStepRowsPerLane = 4;                                      // 64 bytes loaded per thread
constexpr int kStepRowsPerWarp = 32 / kStepLanesPerRow * kStepRowsPerLane;  // 8
constexpr int kStepRowsPerCta = kThreads / 32 * kStepRowsPerWarp;        // 32
constexpr int kStepSlicesPerHead = kHeadDim / kStepRowsPerCta;           // 4
static_assert(kStepLanesPerRow * 8 == kHeadDim, "a half-warp covers one bf16 row");
// Registers bound the CTAs per SM and so the state bytes in flight: 8 CTAs per SM need <= 64 registers.
constexpr int kStepMinCtasPerSm = 8;
constexpr int kStepValues = 2 * kStepRowsPerLane;                   // S'k and S'q of each row
constexpr int kStepLanesPerValue = kStepLanesPerRow / kStepValues;  // 2 lanes end up holding each sum

// v[0..3] = S'k partial sums of this lane's rows, v[4..7] = S'q partial sums, reduced over the 16 lanes of
// the half-warp: three reduce-scatter steps (7 shuffles instead of 32 for 8 all-reduces), then an
// all-reduce of the pair. Lane c ends up with the full sum of value c / kStepLanesPerValue.
__device__ __forceinline__ float reduce_scatter_rows(float (&v)[kStepValues], int c) {
  static_assert(kStepValues == 8 && kStepLanesPerRow == 16, "three halving steps over lane bits 8, 4, 2");
  kda::reduce_scatter_step<8>(v, c, 8);
  kda::reduce_scatter_step<4>(v, c, 4);
  kda::reduce_scatter_step<2>(v, c, 2);
  return v[0] + __shfl_xor_sync(0xffffffffu, v[0], 1);
}

// Grid: N * H * kStepSlicesPerHead CTAs of kThreads. A template only so that it is instantiated in the one
// translation unit that launches it (decode_state_bf16.cu).
template <typename StateT>
__global__ void __launch_bounds__(kThreads, kStepMinCtasPerSm) kda_decode_bf16_step_kernel(const DecodeParams p) {
  static_assert(std::is_same_v<StateT, __nv_bfloat16>, "the raw-pair layout is bf16's");
  __shared__ __align__(16) TokenSmem sm;

  const int tid = threadIdx.x;
  const int c = tid % kStepLanesPerRow;  // chunk of the row: key columns 8c .. 8c + 7
  const int slice = blockIdx.x % kStepSlicesPerHead;
  const int64_t seq_head = blockIdx.x / kStepSlicesPerHead;
  const int h = static_cast<int>(seq_head % p.heads);
  const int64_t pos = seq_head / p.heads;  // position in the visit order
  // Row j of this lane: the two half-warps interleave, so each access of the warp is 2 adjacent rows.
  const int row0 = slice * kStepRowsPerCta + tid / 32 * kStepRowsPerWarp + (tid % 32) / kStepLanesPerRow;
  auto row_of = [&](int j) { return row0 + 2 * j; };
  const int64_t slice_offset = (static_cast<int64_t>(h) * kHeadDim + slice * kStepRowsPerCta) * kHeadDim;

  if (tid == 0) prefetch_state<StateT>(p, pos, slice_offset, kStepRowsPerCta * kHeadDim * sizeof(StateT));
  kda::grid_dependency_wait();      // launched with PDL: earlier kernels' writes are visible from here on
  kda::allow_dependent_launch();  // the next kernel's CTAs may take SM slots as this grid's last wave drains
  const VisitEntry entry = visit_entry(p, pos);
  const int64_t n = entry.seq, slot = entry.slot;  // n: also the token (T == 1)
  const int64_t head_offset = (n * p.heads + h) * kHeadDim;
  if (slot < 0) {  // padded entry: zero outputs, the pool is not touched
    if (c < kStepRowsPerLane) p.out[head_offset + row_of(c)] = __float2bfloat16(0.f);
    return;
  }

  const int64_t head_state = slot * p.pool_slot_stride + static_cast<int64_t>(h) * kHeadDim * kHeadDim;
  uint4* state = reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.state_pool) + head_state);
  constexpr int kChunksPerRow = kHeadDim * 2 / 16;
  uint4 raw[kStepRowsPerLane];  // raw[j]: columns 8c .. 8c + 7 of row_of(j)
#pragma unroll
  for (int j = 0; j < kStepRowsPerLane; ++j) raw[j] = __ldcs(state + row_of(j) * kChunksPerRow + c);

  const float rate = __expf(p.A_log[h]);
  const float bias_col = p.dt_bias[h * kHeadDim + tid];
  // The lanes that end up holding S'k of row j form u for it, so they load that row's v.
  const int my_value = c / kStepLanesPerValue;  // S'k of row my_value (< R) or S'q of row my_value - R
  const int my_row = my_value % kStepRowsPerLane;
  const float v_mine = __bfloat162float(p.v[head_offset + row_of(my_row)]);
  const float b = kda::sigmoid_fast(__bfloat162float(p.beta[n * p.heads + h]));
  const TokenScalars ts = prepare_token(p, sm, 0, head_offset, rate, bias_col);

  float d[8], kk[8], qq[8];  // decay, k, q of this lane's 8 columns
#pragma unroll
  for (int i = 0; i < 8; i += 4) {
    *reinterpret_cast<float4*>(d + i) = *reinterpret_cast<const float4*>(&sm.decay[0][8 * c + i]);
    *reinterpret_cast<float4*>(kk + i) = *reinterpret_cast<const float4*>(&sm.k[0][8 * c + i]);
    *reinterpret_cast<float4*>(qq + i) = *reinterpret_cast<const float4*>(&sm.q[0][8 * c + i]);
  }

  // Pass 1: partial S'k and S'q of the 4 decayed rows over this lane's columns.
  float partial[kStepValues];
#pragma unroll
  for (int j = 0; j < kStepRowsPerLane; ++j) {
    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw[j]);
    float sk = 0.f, sq = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __bfloat1622float2(pairs[i]);
      const float x0 = x.x * d[2 * i], x1 = x.y * d[2 * i + 1];
      sk = fmaf(x1, kk[2 * i + 1], fmaf(x0, kk[2 * i], sk));
      sq = fmaf(x1, qq[2 * i + 1], fmaf(x0, qq[2 * i], sq));
    }
    partial[j] = sk;
    partial[kStepRowsPerLane + j] = sq;
  }
  // S'k lanes are c < 8, their S'q partners c + 8.
  const float dot = reduce_scatter_rows(partial, c);
  const float u = b * (v_mine - dot * ts.inv_k);            // meaningful where c < 8
  const float u_partner = __shfl_xor_sync(0xffffffffu, u, 8);  // u of my_row, where c >= 8
  if (c >= 8 && c % kStepLanesPerValue == 0)
    p.out[head_offset + row_of(my_row)] = __float2bfloat16(p.scale * (dot * ts.inv_q + u_partner * ts.qk_hat));

  // Pass 2: S = S' + u k_hat^T, rounded once to bf16.
#pragma unroll
  for (int j = 0; j < kStepRowsPerLane; ++j) {
    const float uk = __shfl_sync(0xffffffffu, u, j * kStepLanesPerValue, kStepLanesPerRow) * ts.inv_k;
    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw[j]);
    uint4 updated;
    __nv_bfloat162* out_pairs = reinterpret_cast<__nv_bfloat162*>(&updated);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __bfloat1622float2(pairs[i]);
      out_pairs[i] = __floats2bfloat162_rn(fmaf(uk, kk[2 * i], x.x * d[2 * i]),
                                           fmaf(uk, kk[2 * i + 1], x.y * d[2 * i + 1]));
    }
    __stcs(state + row_of(j) * kChunksPerRow + c, updated);
  }
}

}  // namespace kda_serving::decode
