// Pass 2 instantiation: 4 warp(s) per CTA, value slice of 64 rows.
#include "prefill/launch.cuh"
#include "prefill/recurrence.cuh"

namespace kda::prefill {
int launch_recurrence_w4(const KdaPrefillParams& p, cudaStream_t stream) {
  using T = RecurrenceTraits<4>;
  return launch_kernel(recurrence_kernel<4>, p.num_seqs * p.heads * T::kSlices, T::kThreads,
                       static_cast<int>(sizeof(RecurrenceSmem<4>)), p, stream);
}
}  // namespace kda::prefill
