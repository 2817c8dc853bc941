// Pass 0 of the prefill (schedule.cu): chunk offsets of varlen sequences and the sorted checkpoints, computed
// on the device into p.schedule; fills the derived pointers of `p` that passes 1 and 2 read.
#pragma once

#include <cuda_runtime.h>

#include "prefill/params.h"

namespace kda::prefill {

// int64 words of p.schedule for N sequences and C checkpoints.
int64_t schedule_words(int64_t num_seqs, int64_t ckpt_count);
// Sets p.chunk_offsets / ckpt_offsets / ckpt_seq / ckpt_pos / ckpt_slot (null when not needed) and launches
// the schedule kernel when there is anything to compute. Returns a cudaError_t value.
int launch_schedule(KdaPrefillParams& p, cudaStream_t stream);

}  // namespace kda::prefill
