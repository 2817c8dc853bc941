// Warp-level reduce-scatter shared by the prefill (chunk_ops.cuh) and decode (decode_bf16_step.cuh) kernels:
// many per-lane partial sums reduced over lanes with each lane keeping some of the totals, so a level costs
// half as many shuffles as the values it reduces.
#pragma once

namespace kda {

// One reduce-scatter step over lane bit `mask` on v[0, N): N values -> N / 2 in v[0, N / 2), each lane
// keeping the half its bit selects (upper lanes the second half).
template <int N, int M>
__device__ __forceinline__ void reduce_scatter_step(float (&v)[M], int lane, int mask) {
  static_assert(N <= M && N % 2 == 0, "halves of the live prefix");
  const bool upper = (lane & mask) != 0;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    const float send = upper ? v[i] : v[i + N / 2];
    const float keep = upper ? v[i + N / 2] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, mask);
  }
}

}  // namespace kda
