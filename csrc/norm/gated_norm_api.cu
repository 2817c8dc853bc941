// C ABI of the gated RMS norm kernel, called through ctypes by kda_serving/ops/cuda_norm.py. Device pointers of
// tensors the caller has validated (layouts and alignment in gated_norm_params.h); the call only enqueues work
// on `stream` (no allocation, no synchronisation: CUDA-graph capturable) and returns a cudaError_t.
#include <cstdint>

#include <cuda_runtime.h>

#include "norm/gated_norm_kernel.cuh"

namespace kda_serving::norm {
namespace {

constexpr int64_t kMaxGridX = 0x7fffffff;

template <int kLanes, int kChunks>
cudaError_t launch(const GatedNormParams& p, bool weight_bf16, cudaStream_t s) {
  constexpr int kRowsPerCta = kNormThreads / kLanes;
  const int64_t blocks = (p.rows + kRowsPerCta - 1) / kRowsPerCta;
  if (blocks > kMaxGridX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks));
  if (weight_bf16) {
    gated_rms_norm_kernel<kLanes, kChunks, __nv_bfloat16><<<grid, kNormThreads, 0, s>>>(p);
  } else {
    gated_rms_norm_kernel<kLanes, kChunks, float><<<grid, kNormThreads, 0, s>>>(p);
  }
  return cudaGetLastError();
}

// The narrowest row layout holding D / 8 chunks: one chunk per lane up to D = 256, then a warp with 2 or 4.
cudaError_t dispatch(const GatedNormParams& p, bool weight_bf16, cudaStream_t s) {
  const int chunks = p.head_dim / kElemsPerChunk;
  if (chunks > 64) return launch<32, 4>(p, weight_bf16, s);
  if (chunks > 32) return launch<32, 2>(p, weight_bf16, s);
  if (chunks > 16) return launch<32, 1>(p, weight_bf16, s);
  if (chunks > 8) return launch<16, 1>(p, weight_bf16, s);
  if (chunks > 4) return launch<8, 1>(p, weight_bf16, s);
  if (chunks > 2) return launch<4, 1>(p, weight_bf16, s);
  if (chunks > 1) return launch<2, 1>(p, weight_bf16, s);
  return launch<1, 1>(p, weight_bf16, s);
}

}  // namespace
}  // namespace kda_serving::norm

using namespace kda_serving::norm;

extern "C" {

int kda_serving_gated_rms_norm(const void* x, int64_t x_row_stride, const void* gate, const void* weight,
                               int weight_bf16, void* out, int64_t rows, int head_dim, float eps, void* stream) {
  const bool valid = rows >= 0 && head_dim >= kElemsPerChunk && head_dim <= kMaxHeadDim &&
                     head_dim % kElemsPerChunk == 0 && x_row_stride % kElemsPerChunk == 0;
  if (!valid) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0) return static_cast<int>(cudaSuccess);
  GatedNormParams p{};
  p.x = static_cast<const __nv_bfloat16*>(x);
  p.gate = static_cast<const __nv_bfloat16*>(gate);
  p.weight = weight;
  p.out = static_cast<__nv_bfloat16*>(out);
  p.x_row_stride = x_row_stride;
  p.rows = rows;
  p.head_dim = head_dim;
  p.inv_head_dim = 1.f / static_cast<float>(head_dim);
  p.eps = eps;
  return static_cast<int>(dispatch(p, weight_bf16 != 0, static_cast<cudaStream_t>(stream)));
}

}  // extern "C"
