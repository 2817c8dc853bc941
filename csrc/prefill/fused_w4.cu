// Fused single-pass instantiation: 4 warps per CTA, value slice of 64 rows.
#include "prefill/fused_kernel.cuh"
#include "prefill/launch.cuh"

namespace kda::prefill {
int launch_fused_w4(const KdaPrefillParams& p, cudaStream_t stream) {
  using T = FusedTraits<4>;
  return launch_kernel(fused_prefill_kernel<4>, p.num_seqs * p.heads * T::kSlices, T::kThreads,
                       static_cast<int>(sizeof(FusedSmem<4>)), p, stream);
}
}  // namespace kda::prefill
