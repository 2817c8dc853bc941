// C ABI of the short-conv kernels, called through ctypes by kda_serving/ops/cuda_decode.py. Device pointers
// of contiguous, validated tensors (the pool's slot stride is a parameter, in elements); D a multiple of 8 with 16-byte aligned rows; only enqueues work on
// `stream` (CUDA-graph capturable) and returns a cudaError_t.
#include <cstdint>

#include <cuda_runtime.h>

#include "conv/conv_kernel.cuh"

namespace kda_serving::conv {
namespace {

ConvParams make_params(const void* x, const void* weight, const void* bias, int bias_bf16, void* conv_pool,
                       int64_t pool_slot_stride, const void* state_indices, int indices_int64, void* out,
                       int64_t rows, int64_t num_seqs,
                       int channels, int out_parts, int silu) {
  ConvParams p{};
  p.x = static_cast<const __nv_bfloat16*>(x);
  p.weight = weight;
  p.bias = bias;
  p.bias_bf16 = bias_bf16 != 0;
  p.conv_pool = conv_pool;
  p.pool_slot_stride = pool_slot_stride;
  p.state_indices = state_indices;
  p.indices_int64 = indices_int64 != 0;
  p.out = static_cast<__nv_bfloat16*>(out);
  p.tokens = rows;
  p.num_seqs = num_seqs;
  p.channels = channels;
  p.out_parts = out_parts;
  p.silu = silu != 0;
  return p;
}

dim3 channel_blocks(int channels) {
  const int groups = channels / kChannelsPerThread;
  return dim3((groups + kConvThreads - 1) / kConvThreads);
}

template <typename T>
struct Type {
  using type = T;
};

// Calls f(Type<PoolT>{}, Type<WeightT>{}) for the runtime dtypes.
template <typename F>
cudaError_t dispatch(int pool_bf16, int weight_bf16, F&& f) {
  if (pool_bf16) {
    return weight_bf16 ? f(Type<__nv_bfloat16>{}, Type<__nv_bfloat16>{}) : f(Type<__nv_bfloat16>{}, Type<float>{});
  }
  return weight_bf16 ? f(Type<float>{}, Type<__nv_bfloat16>{}) : f(Type<float>{}, Type<float>{});
}

constexpr int64_t kMaxGridY = 65535;

// Width 4 only; a thread's 8 channels must not straddle two output parts.
bool valid_shape(int width, int channels, int out_parts) {
  return width == kWidth && out_parts >= 1 && channels % (kChannelsPerThread * out_parts) == 0;
}

}  // namespace
}  // namespace kda_serving::conv

using namespace kda_serving::conv;

extern "C" {

int kda_serving_conv_prefill(const void* x, const void* weight, int weight_bf16, const void* bias, int bias_bf16,
                             void* conv_pool, int pool_bf16, int64_t pool_slot_stride,
                             const void* state_indices, int indices_int64,
                             const void* cu_seqlens, int cu_seqlens_int64, const void* has_initial_state,
                             void* out, int out_parts, int64_t tokens, int64_t num_seqs, int channels,
                             int width, int silu, void* stream) {
  if (!valid_shape(width, channels, out_parts)) return static_cast<int>(cudaErrorInvalidValue);
  ConvParams p = make_params(x, weight, bias, bias_bf16, conv_pool, pool_slot_stride, state_indices,
                             indices_int64, out, tokens,
                             num_seqs, channels, out_parts, silu);
  p.cu_seqlens = cu_seqlens;
  p.cu_seqlens_int64 = cu_seqlens_int64 != 0;
  p.has_initial_state = static_cast<const bool*>(has_initial_state);
  const int64_t tiles = (tokens + kTokensPerThread - 1) / kTokensPerThread;
  if (tiles > kMaxGridY || num_seqs > kMaxGridY) return static_cast<int>(cudaErrorInvalidValue);
  if (channels == 0 || num_seqs == 0) return static_cast<int>(cudaSuccess);
  auto s = static_cast<cudaStream_t>(stream);
  const dim3 blocks = channel_blocks(channels);
  return static_cast<int>(dispatch(pool_bf16, weight_bf16, [&](auto pool_t, auto weight_t) {
    using PoolT = typename decltype(pool_t)::type;
    using WeightT = typename decltype(weight_t)::type;
    if (tiles > 0) {
      conv_prefill_kernel<PoolT, WeightT><<<dim3(blocks.x, tiles), kConvThreads, 0, s>>>(p);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    conv_state_update_kernel<PoolT><<<dim3(blocks.x, num_seqs), kConvThreads, 0, s>>>(p);
    return cudaGetLastError();
  }));
}

int kda_serving_conv_decode(const void* x, const void* weight, int weight_bf16, const void* bias, int bias_bf16,
                            void* conv_pool, int pool_bf16, int64_t pool_slot_stride,
                             const void* state_indices, int indices_int64, void* out,
                            int out_parts, int64_t num_seqs, int channels, int width, int silu, void* stream) {
  if (!valid_shape(width, channels, out_parts)) return static_cast<int>(cudaErrorInvalidValue);
  if (num_seqs > kMaxGridY) return static_cast<int>(cudaErrorInvalidValue);
  if (channels == 0 || num_seqs == 0) return static_cast<int>(cudaSuccess);
  const ConvParams p = make_params(x, weight, bias, bias_bf16, conv_pool, pool_slot_stride, state_indices,
                                   indices_int64, out,
                                   num_seqs, num_seqs, channels, out_parts, silu);
  auto s = static_cast<cudaStream_t>(stream);
  const dim3 blocks = channel_blocks(channels);
  return static_cast<int>(dispatch(pool_bf16, weight_bf16, [&](auto pool_t, auto weight_t) {
    using PoolT = typename decltype(pool_t)::type;
    using WeightT = typename decltype(weight_t)::type;
    conv_decode_kernel<PoolT, WeightT><<<dim3(blocks.x, num_seqs), kConvThreads, 0, s>>>(p);
    return cudaGetLastError();
  }));
}

}  // extern "C"
