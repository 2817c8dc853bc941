// Pass 1 instantiation: chunk operands.
#include "prefill/chunk_ops.cuh"
#include "prefill/launch.cuh"

namespace kda::prefill {
int launch_chunk_ops(const KdaPrefillParams& p, cudaStream_t stream) {
  const int64_t ctas = p.chunk_bound * p.heads;
  constexpr int kSmem = static_cast<int>(sizeof(ChunkOpsSmem));
  return p.use_lower_bound ? launch_kernel(chunk_ops_kernel<true>, ctas, kOpsThreads, kSmem, p, stream)
                           : launch_kernel(chunk_ops_kernel<false>, ctas, kOpsThreads, kSmem, p, stream);
}
}  // namespace kda::prefill

extern "C" int64_t kda_prefill_chunk_ops_bytes(void) { return static_cast<int64_t>(sizeof(kda::prefill::ChunkOps)); }
