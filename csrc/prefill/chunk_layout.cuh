// The layout of pass 1's output (the per-(chunk, head) operands) and where chunks and sequences sit:
// shared by pass 1 (chunk_ops.cuh) and pass 2 (recurrence.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

#include "prefill/device_utils.cuh"
#include "prefill/params.h"

namespace kda::prefill {

// The per-(chunk, head) operands in global memory. Pass 2 bulk-copies a whole ChunkOps into shared memory
// as it is and reads its B operands by ldmatrix (8 rows x 16 bytes per matrix), so the 16-byte chunks of
// each row are permuted by the row index to put those 8 rows in 8 distinct bank groups without padding:
//   kg, qg   [16 tokens][128 channels], chunk j of row t at j ^ (t % 8)             (wide_index)
//   kdT      16 x 16 tiles of 512 bytes, tile p = Kd^T rows (channels) 16 p .. 16 p + 15, columns tokens;
//   p        one such tile (rows t, columns s). A tile row is 32 bytes, two chunks, swapped on rows 4-7
//            and 12-15                                                               (tile_index)
//   ab       -Ab in fp32, in the order of pass 2's tf32 B fragments                  (ab_index)
// Pass 1 still stores whole rows per warp instruction (Kg, Qg: a token's 256 bytes; Kd^T: 16 tile rows), so
// its stores stay full sectors and lines.
constexpr int kTileElems = 16 * 16;

// Element (t, c) of a [16][128] wide operand.
__host__ __device__ constexpr int wide_index(int t, int c) { return t * kDim + (((c >> 3) ^ (t & 7)) << 3) + (c & 7); }

// Element (row, col) of a 16 x 16 tile.
__host__ __device__ constexpr int tile_index(int row, int col) {
  return row * 16 + ((((col >> 3) ^ (row >> 2)) & 1) << 3) + (col & 7);
}

// What the permutations are for, checked at compile time: each row's chunks stay in the row (a permutation),
// and the 8 rows of every ldmatrix matrix (rows r0 .. r0 + 7 at one logical chunk) fall in 8 distinct bank
// groups (16-byte units mod 8).
template <int kRowElems, int (*kIndex)(int, int)>
constexpr bool swizzle_is_conflict_free() {
  for (int r = 0; r < 16; ++r) {
    unsigned chunks = 0;
    for (int j = 0; j < kRowElems / 8; ++j) {
      const int e = kIndex(r, 8 * j);
      if (e / kRowElems != r || e % 8 != 0) return false;
      chunks |= 1u << (e % kRowElems / 8);
    }
    if (chunks != (1u << (kRowElems / 8)) - 1) return false;
  }
  for (int r0 = 0; r0 < 16; r0 += 8) {
    for (int j = 0; j < kRowElems / 8; ++j) {
      unsigned groups = 0;
      for (int r = r0; r < r0 + 8; ++r) groups |= 1u << (kIndex(r, 8 * j) / 8 % 8);
      if (groups != 0xffu) return false;
    }
  }
  return true;
}
static_assert(swizzle_is_conflict_free<kDim, wide_index>(), "Kg / Qg rows: conflict-free ldmatrix");
static_assert(swizzle_is_conflict_free<16, tile_index>(), "16 x 16 tiles: conflict-free ldmatrix");

// Element (t, s) of -Ab. Pass 2's U product (recurrence.cuh) takes lane 4 g + q's B fragments for U tokens
// 8 h + g as one float4: columns 2 q, 2 q + 1, 8 + 2 q, 8 + 2 q + 1 of row 8 h + g.
__host__ __device__ constexpr int ab_index(int t, int s) {
  return ((t / 8) * 32 + 4 * (t % 8) + (s % 8) / 2) * 4 + 2 * (s / 8) + s % 2;
}
constexpr bool ab_index_is_a_permutation() {
  bool seen[kTileElems] = {};
  for (int t = 0; t < kChunk; ++t) {
    for (int s = 0; s < kChunk; ++s) {
      const int e = ab_index(t, s);
      if (e < 0 || e >= kTileElems || seen[e]) return false;
      seen[e] = true;
    }
  }
  return true;
}
static_assert(ab_index_is_a_permutation(), "-Ab: every element stored once");

struct alignas(16) ChunkOps {
  __nv_bfloat16 kg[kChunk * kDim];           // k * F
  __nv_bfloat16 qg[kChunk * kDim];           // scale * q * F
  __nv_bfloat16 kdT[kDim / 16][kTileElems];  // (k * B)^T
  __nv_bfloat16 p[kTileElems];
  alignas(16) float ab[kTileElems];  // -Ab (ab_index)
  float gate_end[kDim];
};
static_assert(sizeof(ChunkOps) % 128 == 0, "ChunkOps is bulk-copied (16-byte multiples) into 128-byte aligned stages");
static_assert(kChunk == 16, "one tile row per token");

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
