// Error handling shared by every C-ABI entry point (kernels return a cudaError_t as int, never abort), the
// device query the launch heuristics share, and the once-per-kernel opt-in to large dynamic shared memory.
#pragma once

#include <cstddef>

#include <cuda_runtime.h>

// Returns the error of a CUDA runtime call from the enclosing function (which returns int).
#define KDA_CUDA_TRY(expr)                          \
  do {                                              \
    cudaError_t kda_err_ = (expr);                  \
    if (kda_err_ != cudaSuccess) return (int)kda_err_; \
  } while (0)

// Streaming multiprocessors of the current device, or 0 if the runtime cannot tell (launch heuristics then
// pick their own fallback).
inline int kda_sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 0;
  return sms;
}

namespace kda {

// Opts kKernel into `bytes` of dynamic shared memory (above the default 48 KB), once per process and kernel;
// returns that attribute call's result.
template <auto kKernel>
cudaError_t allow_dynamic_smem(size_t bytes) {
  static const cudaError_t err =
      cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  return err;
}

}  // namespace kda
