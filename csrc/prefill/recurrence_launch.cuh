// Host side of pass 2: launching recurrence_kernel<NW, KS, kSegmented> for the call's key split and time
// segments. Each recurrence_w*.cu instantiates it for one row-group count, so the build compiles them in
// parallel.
#pragma once

#include "prefill/launch.cuh"
#include "prefill/recurrence.cuh"

namespace kda::prefill {

template <int NW, int KS, bool kSegmented>
int launch_recurrence_kernel(const KdaPrefillParams& p, cudaStream_t stream) {
  using T = RecurrenceTraits<NW, KS>;
  const int64_t runs = kSegmented ? 2 * p.segments - 1 : 1;  // prefill/segments.cuh
  return launch_kernel(recurrence_kernel<NW, KS, kSegmented>, p.num_seqs * p.heads * runs * T::kSlices,
                       T::kThreads, static_cast<int>(sizeof(RecurrenceSmem<NW, KS>)), p, stream);
}

template <int NW, bool kSegmented>
int launch_recurrence_ks(const KdaPrefillParams& p, cudaStream_t stream) {
  return p.key_split == 2 ? launch_recurrence_kernel<NW, 2, kSegmented>(p, stream)
                          : launch_recurrence_kernel<NW, 1, kSegmented>(p, stream);
}

template <int NW>
int launch_recurrence(const KdaPrefillParams& p, cudaStream_t stream) {
  return p.segments > 1 ? launch_recurrence_ks<NW, true>(p, stream) : launch_recurrence_ks<NW, false>(p, stream);
}

}  // namespace kda::prefill
