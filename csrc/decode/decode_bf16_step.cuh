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
// Layout: kStepLanesPerRow = 4 lanes share a value row (64 contiguous bytes per access), kStepRowsPerCta = 32
// rows per CTA (8 KB of state), kStepSlicesPerHead = 4 CTAs per (sequence, head).
#pragma once

#include <type_traits>

#include "decode/decode_kernel.cuh"

namespace kda_serving::decode {

constexpr int kStepChunks = 4;                                  // 16-byte chunks per lane
constexpr int kStepLanesPerRow = kHeadDim / (kStepChunks * 8);  // 4
constexpr int kStepRowsPerCta = kThreads / kStepLanesPerRow;    // 32
constexpr int kStepSlicesPerHead = kHeadDim / kStepRowsPerCta;  // 4
// Registers bound the CTAs per SM and so the state bytes in flight: left free, the compiler takes 78-90
// registers (6 CTAs per SM); capped at 64 (8 CTAs, 16 bytes of spill) the step measured 2-7 points closer
// to the copy-rate floor on an H200 (docs/decode-kernel.md). 10 CTAs (51 registers) spill heavily: slower.
constexpr int kStepMinCtasPerSm = 8;

__device__ __forceinline__ float reduce_step_row(float x) {
#pragma unroll
  for (int m = kStepLanesPerRow / 2; m > 0; m /= 2) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

// Grid: N * H * kStepSlicesPerHead CTAs of kThreads. A template only so that it is instantiated in the one
// translation unit that launches it (decode_state_bf16.cu).
template <typename StateT>
__global__ void __launch_bounds__(kThreads, kStepMinCtasPerSm) kda_decode_bf16_step_kernel(const DecodeParams p) {
  static_assert(std::is_same_v<StateT, __nv_bfloat16>, "the raw-pair layout is bf16's");
  __shared__ __align__(16) TokenSmem sm;

  const int tid = threadIdx.x;
  const int lane = tid % kStepLanesPerRow;
  const int slice = blockIdx.x % kStepSlicesPerHead;
  const int64_t seq_head = blockIdx.x / kStepSlicesPerHead;
  const int h = static_cast<int>(seq_head % p.heads);
  const int64_t n = seq_head / p.heads;  // also the token: T == 1
  const int row = slice * kStepRowsPerCta + tid / kStepLanesPerRow;
  const int64_t head_offset = (n * p.heads + h) * kHeadDim;

  const int64_t slot = load_index(p.state_indices, p.indices_int64, n);
  if (slot < 0) {
    if (lane == 0) p.out[head_offset + row] = __float2bfloat16(0.f);
    return;
  }

  const int64_t state_offset = slot * p.pool_slot_stride + static_cast<int64_t>(h) * kHeadDim * kHeadDim +
                               static_cast<int64_t>(row) * kHeadDim;
  uint4* state = reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.state_pool) + state_offset);
  uint4 raw[kStepChunks];  // chunk j holds columns (lane + 4 j) * 8 .. + 7
#pragma unroll
  for (int j = 0; j < kStepChunks; ++j) raw[j] = __ldcs(state + lane + kStepLanesPerRow * j);

  const float rate = __expf(p.A_log[h]);
  const float bias_col = p.dt_bias[h * kHeadDim + tid];
  const float v_row = __bfloat162float(p.v[head_offset + row]);
  const float b = sigmoidf_fast(__bfloat162float(p.beta[n * p.heads + h]));
  const TokenScalars ts = prepare_token(p, sm, 0, head_offset, rate, bias_col);

  // Pass 1: S' k and S' q of the decayed row.
  float sk = 0.f, sq = 0.f;
#pragma unroll
  for (int j = 0; j < kStepChunks; ++j) {
    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw[j]);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int col = (lane + kStepLanesPerRow * j) * 8 + 2 * i;
      const float2 x = __bfloat1622float2(pairs[i]);
      const float2 d = *reinterpret_cast<const float2*>(&sm.decay[0][col]);
      const float2 kk = *reinterpret_cast<const float2*>(&sm.k[0][col]);
      const float2 qq = *reinterpret_cast<const float2*>(&sm.q[0][col]);
      const float x0 = x.x * d.x, x1 = x.y * d.y;
      sk = fmaf(x1, kk.y, fmaf(x0, kk.x, sk));
      sq = fmaf(x1, qq.y, fmaf(x0, qq.x, sq));
    }
  }
  sk = reduce_step_row(sk) * ts.inv_k;
  sq = reduce_step_row(sq) * ts.inv_q;
  const float u = b * (v_row - sk);
  const float uk = u * ts.inv_k;
  if (lane == 0) p.out[head_offset + row] = __float2bfloat16(p.scale * (sq + u * ts.qk_hat));

  // Pass 2: S = S' + u k_hat^T, rounded once to bf16.
#pragma unroll
  for (int j = 0; j < kStepChunks; ++j) {
    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw[j]);
    uint4 updated;
    __nv_bfloat162* out_pairs = reinterpret_cast<__nv_bfloat162*>(&updated);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int col = (lane + kStepLanesPerRow * j) * 8 + 2 * i;
      const float2 x = __bfloat1622float2(pairs[i]);
      const float2 d = *reinterpret_cast<const float2*>(&sm.decay[0][col]);
      const float2 kk = *reinterpret_cast<const float2*>(&sm.k[0][col]);
      out_pairs[i] = __floats2bfloat162_rn(fmaf(uk, kk.x, x.x * d.x), fmaf(uk, kk.y, x.y * d.y));
    }
    __stcs(state + lane + kStepLanesPerRow * j, updated);
  }
}

}  // namespace kda_serving::decode
