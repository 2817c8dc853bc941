// Error handling shared by every C-ABI entry point: kernels return a cudaError_t as int, never abort.
#pragma once

#include <cuda_runtime.h>

// Returns the error of a CUDA runtime call from the enclosing function (which returns int).
#define KDA_CUDA_TRY(expr)                          \
  do {                                              \
    cudaError_t kda_err_ = (expr);                  \
    if (kda_err_ != cudaSuccess) return (int)kda_err_; \
  } while (0)
