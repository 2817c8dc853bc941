// Pass 2 instantiation: 2 warp(s) per CTA, value slice of 32 rows.
#include "prefill/launch.cuh"
#include "prefill/recurrence.cuh"

namespace kda::prefill {
int launch_recurrence_w2(const KdaPrefillParams& p, cudaStream_t stream) {
  using T = RecurrenceTraits<2>;
  return launch_kernel(recurrence_kernel<2>, p.num_seqs * p.heads * T::kSlices, T::kThreads,
                       static_cast<int>(sizeof(RecurrenceSmem<2>)), p, stream);
}
}  // namespace kda::prefill
