// Arguments of the KDA decode kernel: a plain struct filled by the C entry point (decode_launch.cu).
//
// Layouts (all contiguous, row-major):
//   q, k, g   [N, T, H, K] bf16       v, out [N, T, H, V] bf16      beta [N, T, H] bf16 (logits)
//   A_log     [H] fp32                dt_bias [H, K] fp32
//   state_pool [S, H, V, K] fp32 or bf16, read and written in place
//   state_indices [N] int32/int64 (-1: padded entry, nothing read or written, zero output)
//   intermediate_slots [N, T] int32/int64 or null (state after token t -> that slot; -1: not stored)
//   visit [N, 2] int32 or null: (sequence n, state_indices[n]) pairs, a permutation of the sequences in the
//         order the grid takes them (null: 0 .. N-1). Where a step's slots lie in the pool is fixed by the
//         caller, but the order the slices stream in is not: visited by increasing slot, a bf16 H32 N64 step
//         on an H200 runs at ~89% of the floor, in the order of a random batch ~85% (docs/decode-kernel.md).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>

namespace kda_serving::decode {

constexpr int kHeadDim = 128;  // K == V: the only size the CUDA path is built for (contract.CUDA_HEAD_DIM)

struct DecodeParams {
  const __nv_bfloat16* q;
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
  const __nv_bfloat16* g;
  const __nv_bfloat16* beta;
  const float* A_log;
  const float* dt_bias;
  void* state_pool;
  int64_t pool_slot_stride;  // elements between slots (>= H*V*K; larger when slots live inside bigger pages)
  int64_t pool_slots;        // S: bounds the slot a CTA may prefetch before the PDL wait
  int64_t prefetch_ctas;     // CTAs of one wave, set by launch_grid: only they prefetch before the PDL wait
  const void* state_indices;
  const void* intermediate_slots;  // null: the final state goes back to state_indices[n]
  const int32_t* visit;            // null: sequence order
  __nv_bfloat16* out;
  int64_t num_seqs;  // N
  int tokens;        // T
  int heads;         // H
  float scale;
  float lower_bound;     // used when use_lower_bound
  bool use_lower_bound;  // false: the softplus gate of Kimi-Linear-48B
  bool indices_int64;
  bool slots_int64;
};

}  // namespace kda_serving::decode
