// Host-side launches, one kernel instantiation per .cu file so the build compiles them in parallel.
#pragma once

#include <cuda_runtime.h>

#include "common/cuda_check.h"
#include "prefill/params.h"

namespace kda::prefill {

// Pass 1: the operands of every (chunk, head) into p.workspace.
int launch_chunk_ops(const KdaPrefillParams& p, cudaStream_t stream);
// Pass 2: the recurrence, 1, 2, 4 or 8 row groups (warps) per CTA.
int launch_recurrence_w1(const KdaPrefillParams& p, cudaStream_t stream);
int launch_recurrence_w2(const KdaPrefillParams& p, cudaStream_t stream);
int launch_recurrence_w4(const KdaPrefillParams& p, cudaStream_t stream);
int launch_recurrence_w8(const KdaPrefillParams& p, cudaStream_t stream);
// After pass 2 with time segments (p.segments > 1): state scan and output correction (prefill/segments.cuh).
int launch_segment_fixup(const KdaPrefillParams& p, cudaStream_t stream);

// Grid of `ctas` CTAs of `threads` threads and `smem` dynamic shared bytes; returns a cudaError_t value.
template <typename Kernel>
int launch_kernel(Kernel kernel, int64_t ctas, int threads, int smem, const KdaPrefillParams& p, cudaStream_t stream) {
  if (ctas == 0) return 0;
  if (ctas > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  KDA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<static_cast<unsigned>(ctas), threads, smem, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace kda::prefill
