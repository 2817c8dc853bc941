// mbarrier wait and arrive for shared-memory pipelines, with "memory" clobbers: CUTLASS's wrappers have none,
// so the compiler could move plain shared-memory loads of a buffer above the wait that makes it valid, or
// below the arrive that hands it back.
#pragma once

#include <cstdint>

#include <cute/arch/util.hpp>

namespace kda {

// Spins until the phase of `barrier` with parity `parity` has completed (acquire: what it guards is visible).
__device__ __forceinline__ void mbarrier_wait(const uint64_t& barrier, uint32_t parity) {
  const uint32_t addr = cute::cast_smem_ptr_to_uint(&barrier);
  asm volatile(
      "{\n\t.reg .pred done;\n\t"
      "wait_%=:\n\t"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n\t"
      "@!done bra wait_%=;\n\t}" ::"r"(addr),
      "r"(parity)
      : "memory");
}

// One arrival on `barrier` (release: this thread's earlier accesses are ordered before it).
__device__ __forceinline__ void mbarrier_arrive(uint64_t& barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(cute::cast_smem_ptr_to_uint(&barrier)) : "memory");
}

}  // namespace kda
