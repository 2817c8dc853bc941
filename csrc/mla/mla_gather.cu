// Gathers cached latent rows for the MLA layers' expanded prompt attention (kda_serving/ops/paged_rows.py):
// pieces i = (sequence, first key, start) ask for keys first .. of their sequence, packed from output row start
// on, in piece order. One warp copies one key's row, 16 bytes a lane; the key's piece is found by binary search
// over the pieces' starts. Replaces about fifteen torch ops (an index per key built on the device, then a gather).
//
// C ABI, called through ctypes by kda_serving/ops/cuda_paged.py: device pointers of tensors the caller has
// validated; enqueues one kernel on `stream`, returns a cudaError_t. A key whose block-table entry lies past the
// table, or whose block lies outside the cache, reads zeros.
#include <climits>
#include <cstdint>

#include <cuda_runtime.h>

namespace kda_serving::mla {
namespace {

constexpr int kGatherWarps = 8;

struct GatherParams {
  const uint4* cache;        // [cache_rows, row_chunks] in 16-byte chunks
  int64_t cache_rows;
  int row_chunks;            // 16-byte chunks per row
  const int32_t* tables;     // [N, table_width] at table_stride
  int64_t table_stride;
  int table_width;
  int block_size;
  const int32_t* pieces;     // [num_pieces, 3]: sequence, first key, first output row (ascending)
  int num_pieces;
  int64_t num_keys;          // output rows
  uint4* out;                // [num_keys, row_chunks]
};

__global__ void __launch_bounds__(kGatherWarps * 32) gather_rows_kernel(const GatherParams p) {
  const int64_t key = static_cast<int64_t>(blockIdx.x) * kGatherWarps + threadIdx.x / 32;
  if (key >= p.num_keys) return;
  const int lane = threadIdx.x % 32;
  int lo = 0, hi = p.num_pieces - 1;  // the last piece starting at or before this key
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.pieces[3 * mid + 2] <= key) lo = mid; else hi = mid - 1;
  }
  const int64_t seq = p.pieces[3 * lo], pos = p.pieces[3 * lo + 1] + (key - p.pieces[3 * lo + 2]);
  const int64_t col = pos / p.block_size;
  const int64_t block = col < p.table_width ? p.tables[seq * p.table_stride + col] : -1;
  const int64_t row = block * p.block_size + pos % p.block_size;
  const bool valid = block >= 0 && row < p.cache_rows;
  uint4* dst = p.out + key * p.row_chunks;
  const uint4* src = p.cache + (valid ? row : 0) * p.row_chunks;
  for (int c = lane; c < p.row_chunks; c += 32) dst[c] = valid ? src[c] : make_uint4(0, 0, 0, 0);
}

}  // namespace
}  // namespace kda_serving::mla

extern "C" {

// out [num_keys, row_bytes] = the cache rows of the pieces' keys (see above). row_bytes a multiple of 16; cache,
// out 16-byte aligned; pieces int32 [num_pieces, 3] contiguous with ascending starts, the first 0.
int kda_serving_mla_gather_rows(const void* cache, int64_t cache_rows, int64_t row_bytes, const int32_t* tables,
                                int64_t table_stride, int table_width, int block_size, const int32_t* pieces,
                                int num_pieces, int64_t num_keys, void* out, void* stream) {
  using namespace kda_serving::mla;
  const bool valid = cache_rows >= 0 && row_bytes > 0 && row_bytes % 16 == 0 && table_width >= 0 &&
                     block_size > 0 && num_pieces >= 1 && num_keys >= 0 && num_keys / kGatherWarps < INT32_MAX &&
                     reinterpret_cast<uintptr_t>(cache) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (!valid) return static_cast<int>(cudaErrorInvalidValue);
  if (num_keys == 0) return static_cast<int>(cudaSuccess);
  const GatherParams p{static_cast<const uint4*>(cache), cache_rows, static_cast<int>(row_bytes / 16), tables,
                       table_stride, table_width, block_size, pieces, num_pieces, num_keys,
                       static_cast<uint4*>(out)};
  gather_rows_kernel<<<static_cast<unsigned>((num_keys + kGatherWarps - 1) / kGatherWarps), kGatherWarps * 32, 0,
                       static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
