// Host side of pass 2: launching recurrence_kernel<NW, kSegmented, kMinCtasPerSm> for the call (time segments
// or not, and the register budget for its grid). Each recurrence_w*.cu instantiates it for one row-group count.
#pragma once

#include "prefill/launch.cuh"
#include "prefill/recurrence.cuh"

namespace kda::prefill {

template <int NW, bool kSegmented, int kMinCtasPerSm>
int launch_recurrence_kernel(const KdaPrefillParams& p, int64_t ctas, cudaStream_t stream) {
  return launch_kernel(recurrence_kernel<NW, kSegmented, kMinCtasPerSm>, ctas, RecurrenceTraits<NW>::kThreads,
                       static_cast<int>(sizeof(RecurrenceSmem<NW>)), p, stream);
}

template <int NW>
int launch_recurrence(const KdaPrefillParams& p, cudaStream_t stream) {
  using T = RecurrenceTraits<NW>;
  constexpr int kPacked = T::kPackedMinCtasPerSm;
  const int64_t runs = p.segments > 1 ? 2 * p.segments - 1 : 1;  // prefill/segments.cuh
  const int64_t ctas = p.num_seqs * p.heads * runs * T::kSlices;
  if (p.segments > 1) return launch_recurrence_kernel<NW, true, kPacked>(p, ctas, stream);
  if (kPacked > 1 && ctas <= kda_sm_count()) return launch_recurrence_kernel<NW, false, 1>(p, ctas, stream);
  return launch_recurrence_kernel<NW, false, kPacked>(p, ctas, stream);
}

}  // namespace kda::prefill
