// C ABI of the decode kernel, called through ctypes by kda_serving/ops/cuda_decode.py. Pointers are device
// pointers of contiguous tensors the caller has validated (docs/kda-contract.md); the call only enqueues work
// on `stream` (no allocation, no synchronisation: CUDA-graph capturable) and returns a cudaError_t.
#include <cstdint>

#include <cuda_runtime.h>

#include "decode/decode_launch.h"

using kda_serving::decode::DecodeParams;
using kda_serving::decode::launch_decode;

extern "C" {

int kda_serving_decode(const void* q, const void* k, const void* v, const void* g, const void* beta,
                       const float* A_log, const float* dt_bias, void* state_pool, int state_is_bf16,
                       int64_t pool_slot_stride, int64_t pool_slots,
                       const void* state_indices, int indices_int64, const void* intermediate_slots,
                       int slots_int64, const int32_t* visit, void* out, int64_t num_seqs, int tokens,
                       int heads, float scale, int use_lower_bound, float lower_bound, void* stream) {
  DecodeParams p{};
  p.q = static_cast<const __nv_bfloat16*>(q);
  p.k = static_cast<const __nv_bfloat16*>(k);
  p.v = static_cast<const __nv_bfloat16*>(v);
  p.g = static_cast<const __nv_bfloat16*>(g);
  p.beta = static_cast<const __nv_bfloat16*>(beta);
  p.A_log = A_log;
  p.dt_bias = dt_bias;
  p.state_pool = state_pool;
  p.pool_slot_stride = pool_slot_stride;
  p.pool_slots = pool_slots;
  p.state_indices = state_indices;
  p.intermediate_slots = intermediate_slots;
  p.visit = visit;
  p.out = static_cast<__nv_bfloat16*>(out);
  p.num_seqs = num_seqs;
  p.tokens = tokens;
  p.heads = heads;
  p.scale = scale;
  p.lower_bound = lower_bound;
  p.use_lower_bound = use_lower_bound != 0;
  p.indices_int64 = indices_int64 != 0;
  p.slots_int64 = slots_int64 != 0;
  auto s = static_cast<cudaStream_t>(stream);
  const cudaError_t err = state_is_bf16 ? launch_decode<__nv_bfloat16>(p, s) : launch_decode<float>(p, s);
  return static_cast<int>(err);
}

// Text of an error code returned by the kda_serving_decode / kda_serving_conv_* entry points.
const char* kda_serving_decode_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // extern "C"
