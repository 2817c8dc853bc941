// Host side of pass 2: launching recurrence_kernel<NW, kSegmented> for the call's time segments. Each
// recurrence_w*.cu instantiates it for one row-group count, so the build compiles them in parallel.
#pragma once

#include "prefill/launch.cuh"
#include "prefill/recurrence.cuh"

namespace kda::prefill {

template <int NW, bool kSegmented>
int launch_recurrence_kernel(const KdaPrefillParams& p, cudaStream_t stream) {
  using T = RecurrenceTraits<NW>;
  const int64_t runs = kSegmented ? 2 * p.segments - 1 : 1;  // prefill/segments.cuh
  return launch_kernel(recurrence_kernel<NW, kSegmented>, p.num_seqs * p.heads * runs * T::kSlices, T::kThreads,
                       static_cast<int>(sizeof(RecurrenceSmem<NW>)), p, stream);
}

template <int NW>
int launch_recurrence(const KdaPrefillParams& p, cudaStream_t stream) {
  return p.segments > 1 ? launch_recurrence_kernel<NW, true>(p, stream)
                        : launch_recurrence_kernel<NW, false>(p, stream);
}

}  // namespace kda::prefill
