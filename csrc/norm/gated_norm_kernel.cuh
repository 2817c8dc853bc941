// The KDA output gate and norm in one pass: out = weight * rms_norm(x) * sigmoid(gate) for each row of D values
// (gated_norm_params.h).
//
// Memory-bound: every element of x and gate is read once and every output written once (6 bytes per element
// against ~20 instructions), so the design only has to keep DRAM busy. A lane owns 16-byte chunks of a row
// (8 bf16); the kLanes lanes of a row are an aligned group inside one warp, so the row's sum of squares is
// reduced by xor shuffles inside the group: no shared memory, no CTA barrier. At D = 128 a row is a half-warp
// (one chunk per lane, two rows per warp); one chunk per lane serves D <= 256, and larger D puts a row on a
// whole warp with 2 or 4 chunks per lane. A thread issues all its loads (x, gate, weight) before any
// arithmetic, so they are in flight together.
//
// One row per lane group and no loop: the grid has one CTA per kRowsPerCta rows and the block scheduler hands
// them to SMs as others finish, which balances the tail without a persistent-grid heuristic.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>

#include "common/gate.cuh"
#include "common/packed.cuh"
#include "norm/gated_norm_params.h"

namespace kda_serving::norm {

// 8 warps: at D = 128 a CTA holds 16 rows, so T = 8192 tokens x 32 heads are 16,384 CTAs, 15.5 waves of 8
// resident CTAs per SM on an H100 (32 registers: full occupancy); the partial last wave is a small part.
constexpr int kNormThreads = 256;

// kLanes lanes per row (a power of two <= 32), kChunks chunks per lane: chunk c of a row (elements 8c .. 8c+7)
// lives on lane c % kLanes of the row's group, in slot c / kLanes. Lanes whose chunk is past D / 8 idle.
// Grid: ceil(rows / (kNormThreads / kLanes)).
template <int kLanes, int kChunks, typename WeightT>
__global__ void __launch_bounds__(kNormThreads) gated_rms_norm_kernel(const GatedNormParams p) {
  static_assert(kLanes <= 32 && (kLanes & (kLanes - 1)) == 0, "a row is an aligned group of lanes of one warp");
  constexpr int kRowsPerCta = kNormThreads / kLanes;
  const int lane = threadIdx.x % kLanes;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + threadIdx.x / kLanes;
  const WeightT* weight = static_cast<const WeightT*>(p.weight);

  // Lanes past the last row or chunk load zeros instead of returning: every lane of the warp must reach the
  // shuffles below.
  bool live[kChunks];
  float x[kChunks][kElemsPerChunk], g[kChunks][kElemsPerChunk], w[kChunks][kElemsPerChunk];
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const int d0 = (lane + i * kLanes) * kElemsPerChunk;
    live[i] = row < p.rows && d0 < p.head_dim;
    uint4 xv = make_uint4(0, 0, 0, 0), gv = xv;
    if (live[i]) {
      // x and gate are dead after this kernel: streaming (evict-first) loads leave L2 to out, which the
      // output projection reads next.
      xv = __ldcs(reinterpret_cast<const uint4*>(p.x + row * p.x_row_stride + d0));
      gv = __ldcs(reinterpret_cast<const uint4*>(p.gate + row * p.head_dim + d0));
      load8(weight + d0, w[i]);
    }
    unpack_bf16x8(xv, x[i]);
    unpack_bf16x8(gv, g[i]);
  }

  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
#pragma unroll
    for (int j = 0; j < kElemsPerChunk; ++j) sum_sq = fmaf(x[i][j], x[i][j], sum_sq);
  }
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
  const float rstd = rsqrtf(sum_sq * p.inv_head_dim + p.eps);

#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    if (!live[i]) continue;
    const int d0 = (lane + i * kLanes) * kElemsPerChunk;
    float y[kElemsPerChunk];
    // The order of the PyTorch code (gated_norm.py): normalise, scale by the weight, then gate.
#pragma unroll
    for (int j = 0; j < kElemsPerChunk; ++j) y[j] = w[i][j] * (x[i][j] * rstd) * kda::sigmoid_fast(g[i][j]);
    *reinterpret_cast<uint4*>(p.out + row * p.head_dim + d0) = pack_bf16x8(y);
  }
}

}  // namespace kda_serving::norm
