// The body of launch_decode<StateT>, included by the per-dtype instantiation files.
#pragma once

#include <climits>
#include <type_traits>

#include "common/cuda_check.h"
#include "common/pdl.cuh"
#include "decode/decode_bf16_step.cuh"
#include "decode/decode_kernel.cuh"
#include "decode/decode_launch.h"

namespace kda_serving::decode {

// Every grid launches with PDL (common/pdl.cuh), so its first wave is scheduled while the previous kernel
// drains; those CTAs prefetch their state slice into L2 before they wait (prefetch_state), and the step's
// first DRAM round trip overlaps the previous kernel instead of following it. Later CTAs start when a
// first-wave CTA retires, with nothing to overlap: a prefetch there only delays the warp that issues it
// (bf16 H32 N64 on an H100: 88.3% of the floor with every CTA prefetching, 90.8-91.1% with the first wave
// only, 90.0% without). On an H100 against the previous launch (PDL for one-wave grids, no prefetch) in the
// same run (CUDA-graph steps, logs/session7/decode-prefetch.log): bf16 H32 N1 2.64 -> 2.05 us, fp32 H32 N1
// 3.56 -> 2.60 us, bf16 H96 N1 4.20 -> 3.49 us; N >= 64 -0.5 .. +1.8 points of the floor; one loss, bf16 H32
// N8 7.29 -> 7.47 us, whose single wave fills the SMs so that little of it can overlap.
template <void (*kKernel)(DecodeParams)>
cudaError_t launch_grid(int64_t ctas, DecodeParams params, cudaStream_t stream) {
  if (ctas > INT_MAX) return cudaErrorInvalidValue;  // the grid is one-dimensional
  // Resident CTAs per SM: fixed by the kernel's registers and the SM90 limits, so asked once per kernel rather
  // than on every step (on failure: 0, and no CTA prefetches).
  static const int ctas_per_sm = [] {
    int n = 0;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, kThreads, 0) == cudaSuccess ? n : 0;
  }();
  params.prefetch_ctas = static_cast<int64_t>(ctas_per_sm) * kda_sm_count();
  return kda::launch_with_pdl(kKernel, static_cast<unsigned>(ctas), kThreads, stream, params);
}

template <typename StateT>
cudaError_t launch_decode(const DecodeParams& params, cudaStream_t stream) {
  if (params.num_seqs == 0 || params.tokens == 0) return cudaSuccess;
  if constexpr (std::is_same_v<StateT, __nv_bfloat16>) {
    if (params.tokens == 1 && params.intermediate_slots == nullptr) {
      return launch_grid<kda_decode_bf16_step_kernel<StateT>>(params.num_seqs * params.heads * kStepSlicesPerHead,
                                                              params, stream);
    }
  }
  return launch_grid<kda_decode_kernel<StateT>>(params.num_seqs * params.heads * kSlicesPerHead, params, stream);
}

}  // namespace kda_serving::decode
