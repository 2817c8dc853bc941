// Pass 2 instantiations: 1 row group(s) of 16 value rows per CTA, one or two warps per row group, plain or
// as the runs of time segments.
#include "prefill/launch.cuh"
#include "prefill/recurrence.cuh"

namespace kda::prefill {
namespace {
template <int KS, bool kSegmented>
int launch(const KdaPrefillParams& p, cudaStream_t stream) {
  using T = RecurrenceTraits<1, KS>;
  const int64_t runs = kSegmented ? 2 * p.segments - 1 : 1;  // prefill/segments.cuh
  return launch_kernel(recurrence_kernel<1, KS, kSegmented>, p.num_seqs * p.heads * runs * T::kSlices,
                       T::kThreads, static_cast<int>(sizeof(RecurrenceSmem<1, KS>)), p, stream);
}

template <bool kSegmented>
int launch_ks(const KdaPrefillParams& p, cudaStream_t stream) {
  return p.key_split == 2 ? launch<2, kSegmented>(p, stream) : launch<1, kSegmented>(p, stream);
}
}  // namespace

int launch_recurrence_w1(const KdaPrefillParams& p, cudaStream_t stream) {
  return p.segments > 1 ? launch_ks<true>(p, stream) : launch_ks<false>(p, stream);
}
}  // namespace kda::prefill
