// Pass 2 for 8 row group(s) of 16 value rows per CTA (prefill/recurrence_launch.cuh).
#include "prefill/recurrence_launch.cuh"

namespace kda::prefill {
int launch_recurrence_w8(const KdaPrefillParams& p, cudaStream_t stream) { return launch_recurrence<8>(p, stream); }
}  // namespace kda::prefill
