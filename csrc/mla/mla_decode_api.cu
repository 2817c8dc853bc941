// C ABI of the paged MLA decode attention, called through ctypes by kda_serving/ops/cuda_mla.py. Device pointers
// of tensors the caller has validated (mla_decode_params.h); the call only enqueues work on `stream` (the caller
// passes the split workspace: no allocation, no synchronisation, CUDA-graph capturable) and returns a
// cudaError_t.
#include <climits>
#include <cstdint>

#include <cuda.h>
#include <cuda_runtime.h>

#include "common/cuda_check.h"
#include "common/pdl.cuh"
#include "common/tensor_map.h"
#include "mla/mla_decode_combine.cuh"
#include "mla/mla_decode_split.cuh"

namespace kda_serving::mla {
namespace {

constexpr int kCtasPerSm = 1;  // the split kernel's shared memory (191 KB at 32 heads) fits once per SM

// The tensor map the split kernel's TMA loads read the cache through: [kv_rows, 576] bf16, boxes of 16 rows x 64
// columns, 128-byte swizzle (the kernel's shared-memory layout), rows outside the cache read as zeros. Returns
// whether it could be made: the block size must be a multiple of 16 (a box never straddles two blocks) and the
// rows must fit TMA's int32 coordinates; otherwise the kernel loads by cp.async.
bool make_kv_map(const MlaDecodeParams& p, CUtensorMap* map) {
  if (p.block_size % kTmaRows != 0 || p.kv_rows <= 0 || p.kv_rows > INT32_MAX - kTmaRows ||
      reinterpret_cast<uintptr_t>(p.kv) % 16 != 0)
    return false;
  const kda::EncodeTiled encode = kda::encode_tiled();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(kLatentDim), static_cast<cuuint64_t>(p.kv_rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(kLatentDim) * 2};
  const cuuint32_t box[2] = {64, kTmaRows};
  const cuuint32_t element_strides[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<__nv_bfloat16*>(p.kv), dims, strides, box,
                element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <int kHeads>
cudaError_t launch_split(const MlaDecodeParams& p, cudaStream_t s) {
  constexpr auto kernel = mla_decode_split_kernel<kHeads>;
  const cudaError_t err = kda::allow_dynamic_smem<kernel>(WgSmem<kHeads>::kBytes);
  if (err != cudaSuccess) return err;
  CUtensorMap map{};
  const int use_tma = make_kv_map(p, &map) ? 1 : 0;
  const dim3 grid(static_cast<unsigned>(p.num_splits), static_cast<unsigned>(p.num_seqs));
  return kda::launch_with_pdl(kernel, grid, dim3(kWgThreads), WgSmem<kHeads>::kBytes, s, p, map, use_tma);
}

template <int kHeads>
cudaError_t launch(const MlaDecodeParams& p, cudaStream_t s) {
  // Both kernels launch with PDL (common/pdl.cuh): each is scheduled while the kernel before it drains.
  const cudaError_t e = launch_split<kHeads>(p, s);
  if (e != cudaSuccess || p.num_splits == 1) return e;
  return kda::launch_with_pdl(mla_decode_combine_kernel, dim3(static_cast<unsigned>(p.num_seqs) * kHeads),
                              dim3(kCombineColThreads * combine_groups(p.num_splits)), 0, s, p, kHeads);
}

}  // namespace
}  // namespace kda_serving::mla

using namespace kda_serving::mla;

extern "C" {

int kda_serving_mla_decode(const void* q, const void* kv, int64_t kv_rows, const int32_t* block_tables,
                           int64_t block_table_stride, int block_table_width, int64_t block_table_rows,
                           const int32_t* table_rows, const int32_t* seq_lens, int block_size, int64_t num_seqs,
                           int heads, int num_splits, float scale, float* part_o, float* part_ml, void* out,
                           void* stream) {
  const bool valid = (heads == 16 || heads == 32) && num_seqs >= 0 && num_seqs <= 65535 && block_size > 0 &&
                     block_table_width >= 0 && block_table_rows >= 0 && num_splits >= 1 &&
                     num_splits <= kMaxSplits && kv_rows >= 0;
  if (!valid) return static_cast<int>(cudaErrorInvalidValue);
  if (num_seqs == 0) return static_cast<int>(cudaSuccess);
  MlaDecodeParams p{};
  p.q = static_cast<const __nv_bfloat16*>(q);
  p.kv = static_cast<const __nv_bfloat16*>(kv);
  p.kv_rows = kv_rows;
  p.block_tables = block_tables;
  p.block_table_stride = block_table_stride;
  p.block_table_width = block_table_width;
  p.block_table_rows = block_table_rows;
  p.table_rows = table_rows;
  p.seq_lens = seq_lens;
  p.block_size = block_size;
  p.num_seqs = static_cast<int>(num_seqs);
  p.num_splits = num_splits;
  p.scale_log2 = scale * 1.4426950408889634f;
  p.part_o = part_o;
  p.part_ml = part_ml;
  p.out = static_cast<__nv_bfloat16*>(out);
  auto s = static_cast<cudaStream_t>(stream);
  const cudaError_t err = heads == 16 ? launch<16>(p, s) : launch<32>(p, s);
  return static_cast<int>(err);
}

// The split plan's constants for this build's kernel: CTAs resident per SM and the key tile (a split holds whole
// tiles of it). Returns a cudaError_t.
int kda_serving_mla_decode_plan(int heads, int* ctas_per_sm, int* tile_keys) {
  if (heads != 16 && heads != 32) return static_cast<int>(cudaErrorInvalidValue);
  *ctas_per_sm = kCtasPerSm;
  *tile_keys = kWgTileKeys;
  return static_cast<int>(cudaSuccess);
}

}  // extern "C"
