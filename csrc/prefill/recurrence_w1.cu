// Pass 2 instantiation: 1 warp(s) per CTA, value slice of 16 rows.
#include "prefill/launch.cuh"
#include "prefill/recurrence.cuh"

namespace kda::prefill {
int launch_recurrence_w1(const KdaPrefillParams& p, cudaStream_t stream) {
  using T = RecurrenceTraits<1>;
  return launch_kernel(recurrence_kernel<1>, p.num_seqs * p.heads * T::kSlices, T::kThreads,
                       static_cast<int>(sizeof(RecurrenceSmem<1>)), p, stream);
}
}  // namespace kda::prefill
