// C ABI of the paged MLA decode attention, called through ctypes by kda_serving/ops/cuda_mla.py. Device pointers
// of tensors the caller has validated (mla_decode_params.h); the call only enqueues work on `stream` (the caller
// passes the split workspace: no allocation, no synchronisation, CUDA-graph capturable) and returns a
// cudaError_t.
#include <cstdint>

#include <cuda_runtime.h>

#include "common/cuda_check.h"
#include "common/pdl.cuh"
#include "mla/mla_decode_kernel.cuh"

namespace kda_serving::mla {
namespace {

// Opts the kernel into its (> 48 KB) dynamic shared memory, once per process.
template <int kMTiles>
cudaError_t allow_smem() {
  static const cudaError_t err = cudaFuncSetAttribute(
      mla_decode_split_kernel<kMTiles>, cudaFuncAttributeMaxDynamicSharedMemorySize,
      static_cast<int>(MlaSmem<kMTiles>::kBytes));
  return err;
}

template <int kMTiles>
cudaError_t launch(const MlaDecodeParams& p, cudaStream_t s) {
  const cudaError_t err = allow_smem<kMTiles>();
  if (err != cudaSuccess) return err;
  // Both kernels launch with PDL (common/pdl.cuh): each is scheduled while the kernel before it drains.
  const dim3 grid(static_cast<unsigned>(p.num_splits), static_cast<unsigned>(p.num_seqs));
  cudaError_t e = kda::launch_with_pdl(mla_decode_split_kernel<kMTiles>, grid, dim3(128 * kMTiles),
                                       MlaSmem<kMTiles>::kBytes, s, p);
  if (e != cudaSuccess || p.num_splits == 1) return e;
  return kda::launch_with_pdl(mla_decode_combine_kernel, dim3(static_cast<unsigned>(p.num_seqs) * 16 * kMTiles),
                              dim3(kCombineColThreads * combine_groups(p.num_splits)), 0, s, p,
                              16 * kMTiles);
}

}  // namespace
}  // namespace kda_serving::mla

using namespace kda_serving::mla;

extern "C" {

int kda_serving_mla_decode(const void* q, const void* kv, int64_t kv_rows, const int32_t* block_tables,
                           int64_t block_table_stride, int block_table_width, const int32_t* seq_lens,
                           int block_size, int64_t num_seqs, int heads, int num_splits, int keys_per_split,
                           float scale, float* part_o, float* part_ml, void* out, void* stream) {
  const bool valid = (heads == 16 || heads == 32) && num_seqs >= 0 && num_seqs <= 65535 && block_size > 0 &&
                     block_table_width >= 0 && num_splits >= 1 && num_splits <= kMaxSplits && keys_per_split > 0 &&
                     keys_per_split % kTileKeys == 0 && kv_rows >= 0;
  if (!valid) return static_cast<int>(cudaErrorInvalidValue);
  if (num_seqs == 0) return static_cast<int>(cudaSuccess);
  MlaDecodeParams p{};
  p.q = static_cast<const __nv_bfloat16*>(q);
  p.kv = static_cast<const __nv_bfloat16*>(kv);
  p.kv_rows = kv_rows;
  p.block_tables = block_tables;
  p.block_table_stride = block_table_stride;
  p.block_table_width = block_table_width;
  p.seq_lens = seq_lens;
  p.block_size = block_size;
  p.num_seqs = static_cast<int>(num_seqs);
  p.num_splits = num_splits;
  p.keys_per_split = keys_per_split;
  p.scale_log2 = scale * 1.4426950408889634f;
  p.part_o = part_o;
  p.part_ml = part_ml;
  p.out = static_cast<__nv_bfloat16*>(out);
  auto s = static_cast<cudaStream_t>(stream);
  const cudaError_t err = heads == 16 ? launch<1>(p, s) : launch<2>(p, s);
  return static_cast<int>(err);
}

}  // extern "C"
