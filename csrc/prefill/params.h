// The plain parameter struct of the KDA prefill kernel, filled by kda_serving/ops/cuda_lib.py (ctypes mirror:
// _PrefillParams there; keep the two in the same field order). All tensors contiguous, on one device.
#pragma once

#include <cstdint>

extern "C" {

struct KdaPrefillParams {
  // Activations, bf16. q, k, g [B, T, H, 128]; v, out [B, T, H, 128]; beta [B, T, H].
  const void* q;
  const void* k;
  const void* v;
  const void* g;
  const void* beta;
  void* out;
  // Gate parameters, fp32: A_log [H], dt_bias [H, 128].
  const float* A_log;
  const float* dt_bias;
  // Varlen: cu_seqlens [N + 1] int64, or null for B fixed-length rows of T tokens.
  const int64_t* cu_seqlens;
  // Dense states [N, H, V, K] (each optional), or a pool [S, H, V, K] with state_indices [N] int64
  // (-1 = padded entry) and has_initial_state [N] (bool bytes, null = all true).
  const void* initial_state;
  void* final_state;
  void* state_pool;
  const int64_t* state_indices;
  const uint8_t* has_initial_state;
  // Checkpoints, in any order: after ckpt_pos_in[m] tokens of sequence ckpt_seq_in[m] the state also goes to
  // state_pool[ckpt_slot_in[m]] (pool mode). ckpt_count = 0: none.
  const int64_t* ckpt_seq_in;
  const int64_t* ckpt_pos_in;
  const int64_t* ckpt_slot_in;
  int64_t ckpt_count;
  // Device scratch of kda_prefill_schedule_words(N, ckpt_count) int64, needed for varlen or checkpoints.
  int64_t* schedule;
  // Two-pass path: per-chunk operands, ChunkOps (prefill/chunk_layout.cuh) per (chunk, head), chunk_bound * H
  // of them (kda_prefill_chunk_ops_bytes each).
  void* workspace;
  int64_t chunk_bound;  // number of global chunk ids to launch (>= the real count; extras exit)
  int64_t batch;     // B
  int64_t seq_len;   // T
  int64_t num_seqs;  // N
  int32_t heads;     // H
  int32_t initial_state_fp32;  // 1 = fp32, 0 = bf16
  int32_t final_state_fp32;
  int32_t state_pool_fp32;
  float scale;
  float lower_bound;        // used when use_lower_bound != 0
  int32_t use_lower_bound;  // 0 = softplus gate (Kimi-Linear-48B)
  int32_t warps;            // row groups per recurrence CTA (value slice = 16 * warps rows); 0 = heuristic
  int32_t segments;         // time segments per sequence (prefill/segments.cuh), 1..8; 0 or 1 = none
  // Scratch of kda_prefill_segment_scratch_bytes(...) bytes when segments > 1, else null.
  void* segment_scratch;
  // Elements between consecutive pool slots: H * V * K for a packed pool, more when each slot is a view into a
  // larger page (vLLM keeps a layer's conv and recurrent states of one sequence in one page). 0 = packed.
  int64_t pool_slot_stride;
  // Derived by kda_prefill_sm90 (pass 0, prefill/schedule.cuh) into `schedule`; callers leave them null.
  // chunk_offsets [N + 1]: first global chunk of each varlen sequence (fixed-length rows: sequence n owns
  // chunks n * ceil(T / 16) ...). Checkpoints sorted by (sequence, position): those of sequence n are
  // ckpt_offsets[n] .. ckpt_offsets[n + 1] - 1.
  const int64_t* chunk_offsets;
  const int64_t* ckpt_offsets;
  const int64_t* ckpt_seq;
  const int64_t* ckpt_pos;
  const int64_t* ckpt_slot;
  // seq_order [N]: varlen sequences longest first (or null: in order). Pass 2 starts the longest recurrences
  // first, so a long sequence is not left to run alone after the short ones.
  const int64_t* seq_order;
};

// Launches the prefill on `stream`. Returns 0 or a cudaError_t value (kda_prefill_error_string names it).
int kda_prefill_sm90(const KdaPrefillParams* params, void* stream);
const char* kda_prefill_error_string(int code);
// Workspace bytes per (chunk, head) of the two-pass path.
int64_t kda_prefill_chunk_ops_bytes(void);
// Bytes of the time-segment scratch for `tokens` tokens (B * T), N sequences, H heads and G segments (0 if G <= 1).
int64_t kda_prefill_segment_scratch_bytes(int64_t tokens, int64_t num_seqs, int32_t heads, int32_t segments);
// int64 words of the schedule scratch for N sequences and C checkpoints.
int64_t kda_prefill_schedule_words(int64_t num_seqs, int64_t ckpt_count);
// Warps per CTA the heuristic picks for N sequences and H heads on this device (for benchmarks and docs).
int kda_prefill_default_warps(int64_t num_seqs, int32_t heads);
}
