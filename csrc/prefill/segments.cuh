// Time segments for few long sequences: where pass 2 leaves most schedulers idle (one (sequence, head) pair
// per SM or less), each sequence's chunks are cut into G segments that run at the same time
// (docs/prefill-kernel.md, "Time segments").
//
// The recurrence is affine in its initial state: from S at a segment's start, the state after token t is
// S P_{..t} + L_t and the output o_t = S w_t + o_t^0, where L, o^0 come from a run from the zero state and
// P_{..t}, w_t from a run on the identity rows with v = 0 (row i of that "state" is e_i P_{..t}, its output
// (e_i P_{..t}) q_t). So pass 2 launches, per (sequence, head), 2 G - 1 runs over the same chunk operands:
//   run 0       segment 0 from the real initial state: outputs, and S_1 (the state at segment 1's start)
//   run 2g - 1  segment g from zero: partial outputs o^0 into `out`, final state L_g
//   run 2g      segment g from the identity with v = 0: w_t into W, final state P_g (the transition)
// and the fix-up (segments.cu) scans S_{g+1} = S_g P_g + L_g, writes the final state, and adds S_g w_t to
// segment g's outputs. Checkpoints are not supported with segments (the host then uses G = 1).
//
// Scratch (KdaPrefillParams::segment_scratch): W [tokens, H, 128] bf16, then per (sequence, head) three groups
// of G - 1 fp32 [128, 128] states: S_1 .. S_{G-1}, L_1 .. L_{G-1}, P_1 .. P_{G-1}.
#pragma once

#include <cstdint>

#include "prefill/device_utils.cuh"
#include "prefill/params.h"

namespace kda::prefill {

struct SegmentRun {
  int segment;      // g
  bool transition;  // identity rows, v = 0
};

__host__ __device__ inline int segment_count(int32_t segments) { return segments > 1 ? segments : 1; }
__device__ __forceinline__ int segment_runs(const KdaPrefillParams& p) { return 2 * segment_count(p.segments) - 1; }
__device__ __forceinline__ SegmentRun segment_run(int run) { return {(run + 1) / 2, run > 0 && run % 2 == 0}; }

// Chunks [begin, end) of segment g of a sequence of num_chunks chunks (equal parts, the last one shorter).
__device__ __forceinline__ void segment_chunks(const KdaPrefillParams& p, int64_t num_chunks, int g, int64_t& begin,
                                               int64_t& end) {
  const int G = segment_count(p.segments);
  const int64_t per = (num_chunks + G - 1) / G;
  begin = g * per < num_chunks ? g * per : num_chunks;
  end = begin + per < num_chunks ? begin + per : num_chunks;
}

__host__ __device__ inline int64_t segment_w_bytes(int64_t tokens, int heads) {
  return (tokens * heads * kDim * 2 + 255) / 256 * 256;
}

__device__ __forceinline__ __nv_bfloat16* segment_w(const KdaPrefillParams& p) {
  return static_cast<__nv_bfloat16*>(p.segment_scratch);
}

__device__ __forceinline__ float* segment_states(const KdaPrefillParams& p) {
  return reinterpret_cast<float*>(static_cast<char*>(p.segment_scratch) +
                                  segment_w_bytes(p.batch * p.seq_len, p.heads));
}

enum SegmentState { kBoundState = 0, kLocalState = 1, kTransition = 2 };

// Entry (in units of one [128, 128] state) of state `kind` of segment g >= 1 of (n, h).
__device__ __forceinline__ int64_t segment_entry(const KdaPrefillParams& p, int64_t n, int h, int kind, int g) {
  const int G = segment_count(p.segments);
  return ((n * p.heads + h) * 3 + kind) * (G - 1) + (g - 1);
}

// Where run `sr` leaves its final state: S_1 for segment 0, else L_g or P_g.
__device__ __forceinline__ int64_t segment_state_entry(const KdaPrefillParams& p, int64_t n, int h, SegmentRun sr) {
  if (sr.segment == 0) return segment_entry(p, n, h, kBoundState, 1);
  return segment_entry(p, n, h, sr.transition ? kTransition : kLocalState, sr.segment);
}

}  // namespace kda::prefill
