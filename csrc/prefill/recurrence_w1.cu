// Pass 2 instantiations: 1 row group(s) of 16 value rows per CTA, one or two warps per row group.
#include "prefill/launch.cuh"
#include "prefill/recurrence.cuh"

namespace kda::prefill {
namespace {
template <int KS>
int launch(const KdaPrefillParams& p, cudaStream_t stream) {
  using T = RecurrenceTraits<1, KS>;
  return launch_kernel(recurrence_kernel<1, KS>, p.num_seqs * p.heads * T::kSlices, T::kThreads,
                       static_cast<int>(sizeof(RecurrenceSmem<1, KS>)), p, stream);
}
}  // namespace

int launch_recurrence_w1(const KdaPrefillParams& p, cudaStream_t stream) {
  return p.key_split == 2 ? launch<2>(p, stream) : launch<1>(p, stream);
}
}  // namespace kda::prefill
