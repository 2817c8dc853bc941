// Error handling shared by every C-ABI entry point (kernels return a cudaError_t as int, never abort), and the
// device query the launch heuristics share.
#pragma once

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
