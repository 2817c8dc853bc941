// Parameters of the varlen flash attention forward (flash_attn_kernel.cuh): packed sequences, sequence n owning
// query rows cu_q[n] .. cu_q[n + 1] - 1 of q, out and lse and key rows cu_k[n] .. cu_k[n + 1] - 1 of k and v.
// q, k and v themselves reach the kernel as TMA tensor maps (flash_attn_api.cu), so their rows may be strided.
#pragma once

#include <cstdint>

namespace kda_serving::attn {

constexpr int kBlockM = 128;   // query rows per CTA: two consumer warpgroups of 64
constexpr int kBlockN = 128;   // keys per tile
constexpr int kStages = 2;     // key/value tiles in flight
constexpr int kValueDim = 128; // the value product is one m64n128 wgmma per 16 keys

struct FlashAttnParams {
  const int32_t* cu_q;     // [num_seqs + 1]
  const int32_t* cu_k;     // [num_seqs + 1]
  float* out;              // [rows_q, heads, kValueDim] fp32, at the strides below (elements, even)
  int64_t out_row_stride;
  int64_t out_head_stride;
  float* lse;              // [rows_q, heads] at lse_row_stride: natural log-sum-exp of each row's scaled scores
  int64_t lse_row_stride;  // (-inf, with a zero output row, where a row sees no key)
  int causal;              // row i of a sequence sees keys j <= i + len_k - len_q (aligned at the bottom right)
  float scale_log2;        // softmax scale * log2(e): the softmax runs in base 2
};

}  // namespace kda_serving::attn

namespace kda_serving::attn {

// Folding partial attention results into running ones (merge_kernel.cuh): for each of R rows and H heads,
// out[row] and lse[row] (row = rows[r], or row0 + r without rows) absorb the n partials o[i, r], l[i, r], each
// normalised with its own log-sum-exp: weights exp(l - m), m the maximum, summed in order i = 0 .. n - 1.
struct MergeParams {
  float* out;              // [.., heads, dim] at out_row_stride / out_head_stride (elements)
  int64_t out_row_stride;
  int64_t out_head_stride;
  float* lse;              // [.., heads] at lse_row_stride
  int64_t lse_row_stride;
  const int64_t* rows;     // [R] or nullptr
  int64_t row0;
  const float* part_o;     // [n, R, heads, dim], contiguous
  const float* part_lse;   // [n, R, heads], contiguous
  int64_t num_rows;        // R
  int num_parts;           // n
  int heads;
  int dim;                 // a multiple of 4
};

}  // namespace kda_serving::attn
