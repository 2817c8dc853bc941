// The C-ABI entry points of the prefill (declared in prefill/params.h) and the launch heuristic.
#include <cuda_runtime.h>

#include "common/cuda_check.h"
#include "prefill/launch.cuh"
#include "prefill/params.h"
#include "prefill/schedule.cuh"

extern "C" int kda_prefill_default_warps(int64_t num_seqs, int32_t heads) {
  // Value slices trade CTA count against re-reading the chunk operands. Measured on H200 (docs/prefill-kernel.md,
  // --warps-sweep): one 8-row-group CTA per (sequence, head) is best when that alone nearly fills the GPU, 4 when
  // there are many pairs, and narrower slices only when there are too few pairs to give every SM a CTA.
  const int64_t pairs = num_seqs * heads;
  const int queried = kda_sm_count();
  const int64_t sms = queried > 0 ? queried : 132;  // (an H100's count when the runtime cannot tell)
  if (10 * pairs >= 7 * sms && pairs < 2 * sms) return 8;
  int warps = 4;
  while (warps > 1 && 10 * pairs * (8 / warps) < 7 * sms) warps /= 2;
  return warps;
}

extern "C" int kda_prefill_sm90(const KdaPrefillParams* params, void* stream) {
  if (params == nullptr || params->heads <= 0 || params->num_seqs < 0) return static_cast<int>(cudaErrorInvalidValue);
  KdaPrefillParams p = *params;  // a copy: pass 0 fills its derived pointers
  const auto s = static_cast<cudaStream_t>(stream);
  const int warps = p.warps != 0 ? p.warps : kda_prefill_default_warps(p.num_seqs, p.heads);
  if (p.segments < 0 || p.segments > 8) return static_cast<int>(cudaErrorInvalidValue);
  if (p.ckpt_count > 0) p.segments = 1;  // checkpoints inside a later segment would need its transition there
  if (p.segments > 1 && p.segment_scratch == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  using namespace kda::prefill;
  if (p.workspace == nullptr || p.ckpt_count < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (p.ckpt_count > 0 && (p.ckpt_seq_in == nullptr || p.ckpt_pos_in == nullptr || p.ckpt_slot_in == nullptr)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  KDA_CUDA_TRY(static_cast<cudaError_t>(launch_schedule(p, s)));
  KDA_CUDA_TRY(static_cast<cudaError_t>(launch_chunk_ops(p, s)));
  int code = 0;
  switch (warps) {
    case 1: code = launch_recurrence_w1(p, s); break;
    case 2: code = launch_recurrence_w2(p, s); break;
    case 4: code = launch_recurrence_w4(p, s); break;
    case 8: code = launch_recurrence_w8(p, s); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  if (code != 0) return code;
  return launch_segment_fixup(p, s);
}

extern "C" const char* kda_prefill_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
