// Parameters of the paged MLA decode attention (mla_decode_split.cuh, mla_decode_combine.cuh): one query token
// per sequence, attending in the absorbed form over that sequence's cached latent rows, which lie in blocks of a
// paged cache.
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

namespace kda_serving::mla {

constexpr int kLatentDim = 576;  // kv_lora_rank 512 + qk_rope_head_dim 64 (Kimi-Linear-48B, DeepSeek-V3)
constexpr int kValueDim = 512;   // the values are the first kv_lora_rank columns of each latent row

struct MlaDecodeParams {
  const __nv_bfloat16* q;         // [N, H, kLatentDim], contiguous
  const __nv_bfloat16* kv;        // [kv_rows, kLatentDim]: the cache's blocks of block_size rows, contiguous
  int64_t kv_rows;                // rows in the cache; a block id pointing past them reads zeros
  const int32_t* block_tables;    // [block_table_rows, block_table_width] at block_table_stride: cache block of
  int64_t block_table_stride;     // each block_size keys; keys past the width read zeros
  int block_table_width;
  int64_t block_table_rows;
  const int32_t* table_rows;      // [N] or null: query n reads block-table row table_rows[n] (null: row n), so
                                  // the W queries of a verifying sequence share its row without a copy; a row
                                  // outside the table reads zeros
  const int32_t* seq_lens;        // [N]: keys of each query (its own newest token included); 0 = padding
  int block_size;
  int num_seqs;                   // N, the queries
  int num_splits;                 // CTAs per query: each takes an equal share of that query's keys, a whole
                                  // number of kWgTileKeys tiles, read from seq_lens on the device, so one launch
                                  // (and one captured graph) serves every length
  float scale_log2;               // softmax scale * log2(e): scores are kept in base 2
  float* part_o;                  // [N, num_splits, H, kValueDim] fp32 unnormalised partial outputs
  float* part_ml;                 // [N, num_splits, H, 2]: running max (base 2) and sum of each partial
  __nv_bfloat16* out;             // [N, H, kValueDim]
};

}  // namespace kda_serving::mla
