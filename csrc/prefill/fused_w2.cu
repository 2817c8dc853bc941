// Fused single-pass instantiation: 2 warps per CTA, value slice of 32 rows.
#include "prefill/fused_kernel.cuh"
#include "prefill/launch.cuh"

namespace kda::prefill {
int launch_fused_w2(const KdaPrefillParams& p, cudaStream_t stream) {
  using T = FusedTraits<2>;
  return launch_kernel(fused_prefill_kernel<2>, p.num_seqs * p.heads * T::kSlices, T::kThreads,
                       static_cast<int>(sizeof(FusedSmem<2>)), p, stream);
}
}  // namespace kda::prefill
