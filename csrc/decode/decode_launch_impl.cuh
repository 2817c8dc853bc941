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

// A grid of at most one wave (small N) launches with PDL (common/pdl.cuh): there the step is mostly launch
// latency and ramp-up, which then overlap the previous kernel's tail (H200, CUDA-graph steps: bf16 H32 N1
// 2.84 -> 2.39 us, fp32 H96 N1 5.77 -> 5.10 us). Multi-wave grids launch plainly: with PDL they did not
// improve (bf16 H32 N64 84.6% vs 85.5% of the floor in the same call, within the run-to-run spread).
inline bool launch_with_overlap(int64_t ctas) {
  return ctas <= static_cast<int64_t>(kStepMinCtasPerSm) * kda_sm_count();  // (no SM count: no PDL)
}

template <typename Kernel>
cudaError_t launch_grid(Kernel kernel, int64_t ctas, const DecodeParams& params, cudaStream_t stream) {
  if (ctas > INT_MAX) return cudaErrorInvalidValue;  // the grid is one-dimensional
  const auto grid = static_cast<unsigned>(ctas);
  if (launch_with_overlap(ctas)) return kda::launch_with_pdl(kernel, grid, kThreads, stream, params);
  kernel<<<grid, kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

template <typename StateT>
cudaError_t launch_decode(const DecodeParams& params, cudaStream_t stream) {
  if (params.num_seqs == 0 || params.tokens == 0) return cudaSuccess;
  if constexpr (std::is_same_v<StateT, __nv_bfloat16>) {
    if (params.tokens == 1 && params.intermediate_slots == nullptr) {
      return launch_grid(kda_decode_bf16_step_kernel<StateT>, params.num_seqs * params.heads * kStepSlicesPerHead,
                         params, stream);
    }
  }
  return launch_grid(kda_decode_kernel<StateT>, params.num_seqs * params.heads * kSlicesPerHead, params, stream);
}

}  // namespace kda_serving::decode
