// Fused single-pass instantiation: 8 warps per CTA, value slice of 128 rows.
#include "prefill/fused_kernel.cuh"
#include "prefill/launch.cuh"

namespace kda::prefill {
int launch_fused_w8(const KdaPrefillParams& p, cudaStream_t stream) {
  using T = FusedTraits<8>;
  return launch_kernel(fused_prefill_kernel<8>, p.num_seqs * p.heads * T::kSlices, T::kThreads,
                       static_cast<int>(sizeof(FusedSmem<8>)), p, stream);
}
}  // namespace kda::prefill
