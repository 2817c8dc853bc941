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

// Whether the phase of `barrier` with parity `parity` has completed, without waiting (acquire when it has).
// Issued well before the result is needed, it takes the barrier's latency off a dependent chain.
__device__ __forceinline__ bool mbarrier_test(const uint64_t& barrier, uint32_t parity) {
  const uint32_t addr = cute::cast_smem_ptr_to_uint(&barrier);
  uint32_t done;
  asm volatile(
      "{\n\t.reg .pred p;\n\t"
      "mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
      "selp.u32 %0, 1, 0, p;\n\t}"
      : "=r"(done)
      : "r"(addr), "r"(parity)
      : "memory");
  return done != 0;
}

// One arrival on `barrier` (release: this thread's earlier accesses are ordered before it).
__device__ __forceinline__ void mbarrier_arrive(uint64_t& barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(cute::cast_smem_ptr_to_uint(&barrier)) : "memory");
}

// Initialises `barrier` for `count` arrivals per phase (one thread; then fence_mbarrier_init and a CTA barrier
// before any other thread uses it).
__device__ __forceinline__ void mbarrier_init(uint64_t& barrier, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(cute::cast_smem_ptr_to_uint(&barrier)), "r"(count)
               : "memory");
}

// Makes this thread's mbarrier initialisations visible to the async proxy (TMA completes transactions on them).
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// One arrival on `barrier` that also expects `bytes` more of asynchronous (TMA) transactions in this phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t& barrier, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(cute::cast_smem_ptr_to_uint(&barrier)),
               "r"(bytes)
               : "memory");
}

}  // namespace kda
