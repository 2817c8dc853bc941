// Pass 2 instantiation: 8 warp(s) per CTA, value slice of 128 rows.
#include "prefill/launch.cuh"
#include "prefill/recurrence.cuh"

namespace kda::prefill {
int launch_recurrence_w8(const KdaPrefillParams& p, cudaStream_t stream) {
  using T = RecurrenceTraits<8>;
  return launch_kernel(recurrence_kernel<8>, p.num_seqs * p.heads * T::kSlices, T::kThreads,
                       static_cast<int>(sizeof(RecurrenceSmem<8>)), p, stream);
}
}  // namespace kda::prefill
