// C ABI of the varlen flash attention forward, called through ctypes by kda_serving/ops/cuda_attention.py.
// Device pointers of tensors the caller has validated; the call builds the three TMA tensor maps on the host
// (kernel arguments, so a captured graph keeps them), enqueues one kernel on `stream` and returns a
// cudaError_t. No allocation, no synchronisation.
#include <climits>
#include <cstdint>

#include <cuda.h>
#include <cuda_runtime.h>

#include "attention/flash_attn_kernel.cuh"
#include "attention/merge_kernel.cuh"
#include "common/cuda_check.h"
#include "common/tensor_map.h"

namespace kda_serving::attn {
namespace {

// A tensor map over rows x heads x dim bf16 (strides in elements), boxes of one head's 64 columns x `box_rows`
// rows with the 128-byte swizzle the kernel's shared-memory layout expects; rows past the tensor read as zeros.
bool make_map(CUtensorMap* map, const void* base, int64_t rows, int heads, int dim, int64_t row_stride,
              int64_t head_stride, int box_rows) {
  const kda::EncodeTiled encode = kda::encode_tiled();
  if (encode == nullptr) return false;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(dim), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(head_stride) * 2, static_cast<cuuint64_t>(row_stride) * 2};
  const cuuint32_t box[3] = {64, 1, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void*>(base), dims, strides, box,
                element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <int kQkBlocks>
cudaError_t launch(const FlashAttnParams& p, const CUtensorMap& q_map, const CUtensorMap& k_map,
                   const CUtensorMap& v_map, dim3 grid, cudaStream_t s) {
  constexpr auto kernel = flash_attn_kernel<kQkBlocks>;
  const cudaError_t attr = kda::allow_dynamic_smem<kernel>(FlashSmem<kQkBlocks>::kBytes);
  if (attr != cudaSuccess) return attr;
  kernel<<<grid, kThreads, FlashSmem<kQkBlocks>::kBytes, s>>>(p, q_map, k_map, v_map);
  return cudaGetLastError();
}

bool aligned16(const void* ptr, int64_t row_stride, int64_t head_stride) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && row_stride % 8 == 0 && head_stride % 8 == 0 &&
         row_stride > 0 && head_stride > 0;
}

}  // namespace
}  // namespace kda_serving::attn

using namespace kda_serving::attn;

extern "C" {

// out [rows_q, heads, 128] fp32 and lse [rows_q, heads] fp32 of softmax(scale q k^T) v per packed sequence.
// q [rows_q, heads, qk_dim], k [rows_k, heads, qk_dim], v [rows_k, heads, 128]: bf16, last dimension contiguous,
// strides in elements (multiples of 8); cu_q, cu_k [num_seqs + 1] int32 on the device; max_q bounds every
// sequence's query rows (it sizes the grid: a longer sequence's later rows would go unwritten).
int kda_serving_flash_attention(const void* q, int64_t rows_q, int64_t q_row_stride, int64_t q_head_stride,
                                const void* k, int64_t rows_k, int64_t k_row_stride, int64_t k_head_stride,
                                const void* v, int64_t v_row_stride, int64_t v_head_stride, const int32_t* cu_q,
                                const int32_t* cu_k, int64_t num_seqs, int heads, int qk_dim, int v_dim,
                                int64_t max_q, int causal, float scale, float* out, int64_t out_row_stride,
                                int64_t out_head_stride, float* lse, int64_t lse_row_stride, void* stream) {
  const bool valid = (qk_dim == 128 || qk_dim == 192) && v_dim == kValueDim && heads >= 1 && heads <= 65535 &&
                     num_seqs >= 0 && rows_q >= 0 && rows_q <= INT32_MAX - kBlockM &&
                     rows_k >= 0 && rows_k <= INT32_MAX - kBlockN && max_q >= 0 && max_q <= rows_q &&
                     scale > 0.f && aligned16(q, q_row_stride, q_head_stride) &&
                     aligned16(k, k_row_stride, k_head_stride) && aligned16(v, v_row_stride, v_head_stride) &&
                     reinterpret_cast<uintptr_t>(out) % 8 == 0 && out_row_stride % 2 == 0 &&
                     out_head_stride % 2 == 0 && lse_row_stride >= heads;
  if (!valid) return static_cast<int>(cudaErrorInvalidValue);
  if (num_seqs == 0 || max_q == 0) return static_cast<int>(cudaSuccess);
  // Without keys (every row gets zeros and -inf) the key and value maps are never read, and none can be made
  // over zero rows: they stay empty.
  CUtensorMap q_map{}, k_map{}, v_map{};
  if (!make_map(&q_map, q, rows_q, heads, qk_dim, q_row_stride, q_head_stride, kBlockM) ||
      (rows_k > 0 && (!make_map(&k_map, k, rows_k, heads, qk_dim, k_row_stride, k_head_stride, kBlockN) ||
                      !make_map(&v_map, v, rows_k, heads, v_dim, v_row_stride, v_head_stride, kBlockN))))
    return static_cast<int>(cudaErrorInvalidValue);
  FlashAttnParams p{};
  p.out = out;
  p.out_row_stride = out_row_stride;
  p.out_head_stride = out_head_stride;
  p.lse = lse;
  p.lse_row_stride = lse_row_stride;
  p.causal = causal != 0;
  p.scale_log2 = scale * 1.4426950408889634f;
  auto s = static_cast<cudaStream_t>(stream);
  // Sequences are the grid's z dimension (at most 65535 per launch): more go in several launches, each given its
  // stretch of the cumulative lengths (which stay absolute row offsets).
  constexpr int64_t kMaxGridZ = 65535;
  for (int64_t first = 0; first < num_seqs; first += kMaxGridZ) {
    p.cu_q = cu_q + first;
    p.cu_k = cu_k + first;
    const dim3 grid(static_cast<unsigned>((max_q + kBlockM - 1) / kBlockM), static_cast<unsigned>(heads),
                    static_cast<unsigned>(num_seqs - first < kMaxGridZ ? num_seqs - first : kMaxGridZ));
    const cudaError_t err = qk_dim == 192 ? launch<3>(p, q_map, k_map, v_map, grid, s)
                                          : launch<2>(p, q_map, k_map, v_map, grid, s);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return static_cast<int>(cudaSuccess);
}

// Folds n partial results into out and lse (MergeParams): part_o [n, num_rows, heads, dim] and part_lse [n,
// num_rows, heads] fp32 contiguous; row r of them goes to rows[r] (int64 on the device) or, with rows null, to
// row0 + r. out's strides in elements, multiples of 4, and dim a multiple of 4 (16-byte vectors).
int kda_serving_attention_merge(float* out, int64_t out_row_stride, int64_t out_head_stride, float* lse,
                                int64_t lse_row_stride, const int64_t* rows, int64_t row0, const float* part_o,
                                const float* part_lse, int64_t num_rows, int num_parts, int heads, int dim,
                                void* stream) {
  const bool valid = num_rows >= 0 && num_parts >= 0 && heads >= 1 && dim >= 4 && dim % 4 == 0 &&
                     out_row_stride % 4 == 0 && out_head_stride % 4 == 0 &&
                     reinterpret_cast<uintptr_t>(out) % 16 == 0 && reinterpret_cast<uintptr_t>(part_o) % 16 == 0 &&
                     num_rows * heads / kMergeWarps < INT32_MAX;
  if (!valid) return static_cast<int>(cudaErrorInvalidValue);
  if (num_rows == 0) return static_cast<int>(cudaSuccess);
  const MergeParams p{out, out_row_stride, out_head_stride, lse, lse_row_stride, rows, row0, part_o, part_lse,
                      num_rows, num_parts, heads, dim};
  const int64_t items = num_rows * heads;
  attention_merge_kernel<<<static_cast<unsigned>((items + kMergeWarps - 1) / kMergeWarps), kMergeWarps * 32, 0,
                           static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
