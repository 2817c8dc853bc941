// Short causal convolution (width 4, depthwise, optional SiLU) for prefill over packed sequences and for
// the one-token decode update, conv states in a slot pool.
//
// Memory-bound: every x element is read once (plus a halo of W-1 rows per token tile) and every output
// written once. A thread owns kChannelsPerThread = 8 channels (one 16-byte bf16 access, a warp covers 512
// contiguous bytes of a row) and slides over up to kTokensPerThread tokens, keeping the last W-1 inputs in
// registers, so the halo costs (W-1) / kTokensPerThread extra reads, served by L2. It loads kTokenBatch rows
// before using them, so several loads are in flight per thread.
//
// Prefill writes the new conv states in a second, tiny kernel: the state of a sequence is read by the thread
// holding its first tokens and replaced with inputs near its end, possibly in another CTA, and a grid has no
// barrier between the two. Stream order provides it.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>

#include "common/packed.cuh"
#include "conv/conv_params.h"

namespace kda_serving::conv {

constexpr int kChannelsPerThread = 8;
constexpr int kConvThreads = 128;
constexpr int kTokensPerThread = 64;  // halo overhead (W-1)/64 < 5%; T=8192, D=12288 still gives 1536 CTAs
// Tokens whose inputs a thread loads before using any: the loop is otherwise one dependent load at a time,
// which left the first version latency-bound at ~47% of the copy rate (H200, T=8192, D=12288).
constexpr int kTokenBatch = 4;
static_assert(kTokensPerThread % kTokenBatch == 0, "token tiles hold whole batches");

__device__ __forceinline__ void store8(__nv_bfloat16* dst, const float (&src)[kChannelsPerThread]) {
  *reinterpret_cast<uint4*>(dst) = pack_bf16x8(src);
}

__device__ __forceinline__ void store8(float* dst, const float (&src)[kChannelsPerThread]) {
  reinterpret_cast<float4*>(dst)[0] = make_float4(src[0], src[1], src[2], src[3]);
  reinterpret_cast<float4*>(dst)[1] = make_float4(src[4], src[5], src[6], src[7]);
}

__device__ __forceinline__ void zero8(float (&dst)[kChannelsPerThread]) {
#pragma unroll
  for (int i = 0; i < kChannelsPerThread; ++i) dst[i] = 0.f;
}

// Where channels d0 .. d0+7 of output row `row` live: out [P, rows, D/P] (P = 1: plain [rows, D]).
struct OutputColumn {
  int64_t part_base;  // offset of the part holding d0
  int part_channels;  // D / P: the row stride
  int column;         // d0 within its part

  __device__ __forceinline__ OutputColumn(const ConvParams& p, int d0) {
    part_channels = p.channels / p.out_parts;
    const int part = d0 / part_channels;
    part_base = part * p.tokens * part_channels;
    column = d0 - part * part_channels;
  }

  __device__ __forceinline__ __nv_bfloat16* at(const ConvParams& p, int64_t row) const {
    return p.out + part_base + row * part_channels + column;
  }
};

// Filter taps and bias of channels d0 .. d0+7. weight [D, W] is channel-major: 8 channels are 32 contiguous
// values.
template <typename WeightT>
struct Filter {
  float w[kChannelsPerThread][kWidth];
  float bias[kChannelsPerThread];

  __device__ __forceinline__ Filter(const ConvParams& p, int d0) {
    const WeightT* wp = static_cast<const WeightT*>(p.weight) + static_cast<int64_t>(d0) * kWidth;
#pragma unroll
    for (int i = 0; i < kChannelsPerThread * kWidth / kChannelsPerThread; ++i) {
      float chunk[kChannelsPerThread];
      load8(wp + i * kChannelsPerThread, chunk);
#pragma unroll
      for (int j = 0; j < kChannelsPerThread; ++j) {
        const int flat = i * kChannelsPerThread + j;
        w[flat / kWidth][flat % kWidth] = chunk[j];
      }
    }
#pragma unroll
    for (int c = 0; c < kChannelsPerThread; ++c) {
      if (p.bias == nullptr) {
        bias[c] = 0.f;
      } else if (p.bias_bf16) {
        bias[c] = __bfloat162float(static_cast<const __nv_bfloat16*>(p.bias)[d0 + c]);
      } else {
        bias[c] = static_cast<const float*>(p.bias)[d0 + c];
      }
    }
  }

  // y for the current input x given the previous W-1 inputs hist[0] (oldest) .. hist[W-2].
  __device__ __forceinline__ void apply(const float (&hist)[kWidth - 1][kChannelsPerThread],
                                        const float (&x)[kChannelsPerThread], bool silu,
                                        float (&y)[kChannelsPerThread]) const {
#pragma unroll
    for (int c = 0; c < kChannelsPerThread; ++c) {
      float acc = fmaf(w[c][kWidth - 1], x[c], bias[c]);
#pragma unroll
      for (int i = 0; i < kWidth - 1; ++i) acc = fmaf(w[c][i], hist[i][c], acc);
      y[c] = silu ? acc / (1.f + __expf(-acc)) : acc;
    }
  }
};

__device__ __forceinline__ void shift_in(float (&hist)[kWidth - 1][kChannelsPerThread],
                                         const float (&x)[kChannelsPerThread]) {
#pragma unroll
  for (int i = 0; i < kWidth - 2; ++i) {
#pragma unroll
    for (int c = 0; c < kChannelsPerThread; ++c) hist[i][c] = hist[i + 1][c];
  }
#pragma unroll
  for (int c = 0; c < kChannelsPerThread; ++c) hist[kWidth - 2][c] = x[c];
}

// The W-1 inputs before token t of the sequence [start, ...): from x where they lie inside it, else from the
// carried state (zero without one).
template <typename PoolT>
__device__ __forceinline__ void load_history(const ConvParams& p, int64_t t, int64_t start, const PoolT* state,
                                             int d0, float (&hist)[kWidth - 1][kChannelsPerThread]) {
#pragma unroll
  for (int i = 0; i < kWidth - 1; ++i) {
    const int64_t pos = t - (kWidth - 1) + i;
    if (pos >= start) {
      load8(p.x + pos * p.channels + d0, hist[i]);
    } else if (state != nullptr) {
      load8(state + (pos - start + kWidth - 1) * p.channels + d0, hist[i]);
    } else {
      zero8(hist[i]);
    }
  }
}

// Grid: (ceil(D / 8 / kConvThreads), ceil(T / kTokensPerThread)).
template <typename PoolT, typename WeightT>
__global__ void __launch_bounds__(kConvThreads) conv_prefill_kernel(const ConvParams p) {
  const int d0 = (blockIdx.x * kConvThreads + threadIdx.x) * kChannelsPerThread;
  if (d0 >= p.channels) return;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * kTokensPerThread;
  const int64_t t_end = min(t_begin + kTokensPerThread, p.tokens);

  // The sequence holding t_begin: the last n with cu_seqlens[n] <= t_begin (zero-length ones are skipped).
  int64_t lo = 0, hi = p.num_seqs;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (load_index(p.cu_seqlens, p.cu_seqlens_int64, mid) <= t_begin) lo = mid; else hi = mid;
  }
  int64_t n = lo;
  int64_t seq_start = load_index(p.cu_seqlens, p.cu_seqlens_int64, n);
  int64_t seq_end = load_index(p.cu_seqlens, p.cu_seqlens_int64, n + 1);

  const PoolT* pool = static_cast<const PoolT*>(p.conv_pool);
  const int64_t slot_stride = p.pool_slot_stride;
  auto carried_state = [&](int64_t seq, int64_t slot) -> const PoolT* {
    const bool has = p.has_initial_state == nullptr || p.has_initial_state[seq];
    return slot >= 0 && has ? pool + slot * slot_stride : nullptr;
  };

  const Filter<WeightT> filter(p, d0);
  const OutputColumn out_col(p, d0);
  int64_t slot = load_index(p.state_indices, p.indices_int64, n);
  float hist[kWidth - 1][kChannelsPerThread];
  load_history(p, t_begin, seq_start, carried_state(n, slot), d0, hist);

  for (int64_t t0 = t_begin; t0 < t_end; t0 += kTokenBatch) {
    float xs[kTokenBatch][kChannelsPerThread];  // loaded together: kTokenBatch loads in flight per thread
#pragma unroll
    for (int i = 0; i < kTokenBatch; ++i) {
      if (t0 + i < t_end) load8(p.x + (t0 + i) * p.channels + d0, xs[i]);
    }
#pragma unroll
    for (int i = 0; i < kTokenBatch; ++i) {
      const int64_t t = t0 + i;
      if (t >= t_end) break;
      if (t >= seq_end) {  // t starts a later sequence: skip any empty ones and restart the history
        do {
          ++n;
          seq_start = seq_end;
          seq_end = load_index(p.cu_seqlens, p.cu_seqlens_int64, n + 1);
        } while (t >= seq_end);
        slot = load_index(p.state_indices, p.indices_int64, n);
        load_history(p, t, seq_start, carried_state(n, slot), d0, hist);
      }
      float y[kChannelsPerThread];
      filter.apply(hist, xs[i], p.silu, y);
      if (slot < 0) zero8(y);
      store8(out_col.at(p, t), y);
      shift_in(hist, xs[i]);
    }
  }
}

// After conv_prefill_kernel: each sequence's new state = its last W-1 inputs (reaching into the old state,
// or zeros, when it is shorter than W-1). Grid: (ceil(D / 8 / kConvThreads), N).
template <typename PoolT>
__global__ void __launch_bounds__(kConvThreads) conv_state_update_kernel(const ConvParams p) {
  const int d0 = (blockIdx.x * kConvThreads + threadIdx.x) * kChannelsPerThread;
  const int64_t n = blockIdx.y;
  if (d0 >= p.channels) return;
  const int64_t slot = load_index(p.state_indices, p.indices_int64, n);
  if (slot < 0) return;
  const int64_t start = load_index(p.cu_seqlens, p.cu_seqlens_int64, n);
  const int64_t end = load_index(p.cu_seqlens, p.cu_seqlens_int64, n + 1);
  PoolT* state = static_cast<PoolT*>(p.conv_pool) + slot * p.pool_slot_stride;
  const bool has = p.has_initial_state == nullptr || p.has_initial_state[n];
  float hist[kWidth - 1][kChannelsPerThread];  // all reads before any write: the old state is read in place
  load_history(p, end, start, has ? state : nullptr, d0, hist);
#pragma unroll
  for (int i = 0; i < kWidth - 1; ++i) store8(state + i * p.channels + d0, hist[i]);
}

// One token per sequence: x [N, D]. Grid: (ceil(D / 8 / kConvThreads), N).
template <typename PoolT, typename WeightT>
__global__ void __launch_bounds__(kConvThreads) conv_decode_kernel(const ConvParams p) {
  const int d0 = (blockIdx.x * kConvThreads + threadIdx.x) * kChannelsPerThread;
  const int64_t n = blockIdx.y;
  if (d0 >= p.channels) return;
  const int64_t slot = load_index(p.state_indices, p.indices_int64, n);
  const OutputColumn out_col(p, d0);
  float x[kChannelsPerThread], y[kChannelsPerThread];
  if (slot < 0) {
    zero8(y);
    store8(out_col.at(p, n), y);
    return;
  }
  PoolT* state = static_cast<PoolT*>(p.conv_pool) + slot * p.pool_slot_stride;
  float hist[kWidth - 1][kChannelsPerThread];
#pragma unroll
  for (int i = 0; i < kWidth - 1; ++i) load8(state + i * p.channels + d0, hist[i]);
  load8(p.x + n * p.channels + d0, x);
  const Filter<WeightT> filter(p, d0);
  filter.apply(hist, x, p.silu, y);
  store8(out_col.at(p, n), y);
  shift_in(hist, x);
#pragma unroll
  for (int i = 0; i < kWidth - 1; ++i) store8(state + i * p.channels + d0, hist[i]);
}

}  // namespace kda_serving::conv
