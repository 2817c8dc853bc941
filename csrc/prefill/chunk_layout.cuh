// The layout of pass 1's output (the per-(chunk, head) operands) and where chunks and sequences sit:
// shared by pass 1 (chunk_ops.cuh) and pass 2 (recurrence.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

#include "prefill/device_utils.cuh"
#include "prefill/params.h"

namespace kda::prefill {

// The per-(chunk, head) operands in global memory (unpadded; pass 2 pads them on the way into shared memory).
struct alignas(16) ChunkOps {
  __nv_bfloat16 kg[kChunk][kDim];   // k * F
  __nv_bfloat16 qg[kChunk][kDim];   // scale * q * F
  __nv_bfloat16 kdT[kDim][kChunk];  // (k * B)^T
  __nv_bfloat16 ab_hi[kChunk][kChunk];
  __nv_bfloat16 ab_lo[kChunk][kChunk];
  __nv_bfloat16 p[kChunk][kChunk];
  float gate_end[kDim];
};
static_assert(sizeof(ChunkOps) % 16 == 0, "ChunkOps is copied in 16-byte vectors");

// Sequence n and chunk j within it of global chunk `chunk`; false if the id is past the last chunk.
__device__ __forceinline__ bool locate_chunk(const KdaPrefillParams& p, int64_t chunk, int64_t& n, int64_t& j) {
  if (p.cu_seqlens == nullptr) {
    const int64_t per_seq = (p.seq_len + kChunk - 1) / kChunk;
    if (per_seq == 0) return false;
    n = chunk / per_seq;
    j = chunk % per_seq;
    return n < p.num_seqs;
  }
  if (chunk >= p.chunk_offsets[p.num_seqs]) return false;
  int64_t lo = 0, hi = p.num_seqs - 1;  // last n with chunk_offsets[n] <= chunk (zero-length sequences skipped)
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (p.chunk_offsets[mid] <= chunk) lo = mid; else hi = mid - 1;
  }
  n = lo;
  j = chunk - p.chunk_offsets[n];
  return true;
}

__device__ __forceinline__ void seq_bounds(const KdaPrefillParams& p, int64_t n, int64_t& bos, int64_t& len) {
  if (p.cu_seqlens != nullptr) {
    bos = p.cu_seqlens[n];
    len = p.cu_seqlens[n + 1] - bos;
  } else {
    bos = n * p.seq_len;
    len = p.seq_len;
  }
}

}  // namespace kda::prefill
