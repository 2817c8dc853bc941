// Programmatic dependent launch (PDL, SM90): a kernel launched with programmatic stream serialization may be
// scheduled while the previous kernel in the stream is still draining, so its launch latency and CTA
// set-up overlap that kernel's last wave instead of following it. Such a kernel must call
// grid_dependency_wait() before it reads any global memory a previous kernel may have written; it calls
// allow_dependent_launch() once it no longer needs the SM slots to itself (the next kernel's CTAs are only
// scheduled after every CTA of this grid has called it or exited, and they in turn wait for this grid to
// finish and its writes to be visible before reading). Both are no-ops in a kernel launched without PDL.
#pragma once

#include <cuda_runtime.h>

namespace kda {

__device__ __forceinline__ void grid_dependency_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void allow_dependent_launch() { asm volatile("griddepcontrol.launch_dependents;"); }

// Prefetch [ptr, ptr + bytes) into L2 with one bulk copy (SM90; ptr 16-byte aligned, bytes a multiple of 16).
// Safe before grid_dependency_wait(): L2 is the GPU's point of coherence, so a line that the previous kernel
// writes after the prefetch is updated in L2 and later loads see the new data. Only copies in registers or
// L1 could be stale, and a prefetch makes none.
__device__ __forceinline__ void prefetch_l2(const void* ptr, unsigned bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(ptr), "r"(bytes) : "memory");
}

// kernel<<<grid, threads, smem_bytes, stream>>>(args...) with programmatic stream serialization allowed.
template <typename... Params, typename... Args>
cudaError_t launch_with_pdl(void (*kernel)(Params...), dim3 grid, dim3 threads, size_t smem_bytes,
                            cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = threads;
  cfg.dynamicSmemBytes = smem_bytes;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Args&&>(args)...);
}

// kernel<<<ctas, threads, 0, stream>>>(args...) with programmatic stream serialization allowed.
template <typename... Params, typename... Args>
cudaError_t launch_with_pdl(void (*kernel)(Params...), unsigned ctas, unsigned threads, cudaStream_t stream,
                            Args&&... args) {
  return launch_with_pdl(kernel, dim3(ctas), dim3(threads), 0, stream, static_cast<Args&&>(args)...);
}

}  // namespace kda
