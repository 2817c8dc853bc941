// The body of launch_decode<StateT>, included by the per-dtype instantiation files.
#pragma once

#include <climits>
#include <type_traits>

#include "decode/decode_bf16_step.cuh"
#include "decode/decode_kernel.cuh"
#include "decode/decode_launch.h"

namespace kda_serving::decode {

template <typename StateT>
cudaError_t launch_decode(const DecodeParams& params, cudaStream_t stream) {
  if (params.num_seqs == 0 || params.tokens == 0) return cudaSuccess;
  if constexpr (std::is_same_v<StateT, __nv_bfloat16>) {
    if (params.tokens == 1 && params.intermediate_slots == nullptr) {
      const int64_t ctas = params.num_seqs * params.heads * kStepSlicesPerHead;
      if (ctas > INT_MAX) return cudaErrorInvalidValue;  // the grid is one-dimensional
      kda_decode_bf16_step_kernel<StateT><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(params);
      return cudaGetLastError();
    }
  }
  const int64_t ctas = params.num_seqs * params.heads * kSlicesPerHead;
  if (ctas > INT_MAX) return cudaErrorInvalidValue;
  kda_decode_kernel<StateT><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace kda_serving::decode
