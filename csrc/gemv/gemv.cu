// The projections of a decode step as matrix-vector products: a few token rows x [T, K] against a bf16 weight
// [N, K] (a batch of them), out[b, t, n] = sum_k x[b, t, k] * w[b, n, k], fp32 sums rounded once to bf16. Called
// through ctypes by kda_serving/ops/cuda_gemv.py (docs/gemv.md).
//
// At one to a few tokens cuBLAS runs these as 8-column MMA tiles: the 58 MB KDA input projection of
// Kimi-Linear-48B took 17.3 us against a 13.7 us floor (the card's copy rate), its 19 MB output projections
// 9.3 us in two kernels (split K and its reduction) against 4.5 us, and 2-4 MB ones 3.4-6 us, where one round
// trip to memory is under 1 us (H200, logs/session24). Not yet faster inside the model: docs/gemv.md. Here a group of G threads (a power of two, 16..256) takes whole rows: thread g of the
// group loads the row's 16-byte vectors g, g + G, ... (kVecs of them at most), so one row is one round of loads
// however long it is, and every thread keeps its share of the T token rows in registers, loaded once for all the
// rows it visits. Groups of more than a warp sum their warps' parts through shared memory.
//
// Each iteration issues the next rows' weight loads before it sums the current ones. Launched with programmatic
// dependent launch: the first rows' weights (which no kernel writes) are loaded before the wait for the previous
// kernel, the token rows after it. Only enqueues work on `stream`: no
// allocation, no synchronisation, CUDA-graph capturable.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/packed.cuh"
#include "common/pdl.cuh"

namespace kda_serving::gemv {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kVecs = 2;  // the most 16-byte vectors per thread and row: rows of up to 8 * 256 * 2 = 4096

struct Params {
  const __nv_bfloat16* x;  // [batch, tokens, cols] at the strides below
  int64_t x_row_stride, x_batch_stride;
  const __nv_bfloat16* w;  // [batch, rows, cols]
  int64_t w_row_stride, w_batch_stride;
  __nv_bfloat16* out;      // [batch, tokens, rows]
  int64_t out_row_stride, out_batch_stride;
  int tokens, rows, cols;
  int group;               // threads per row
  int iterations;          // per CTA: each covers (kThreads / group) * kRows rows
};

__device__ __forceinline__ float dot8(const float (&a)[8], const float (&b)[8]) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) s += a[i] * b[i];
  return s;
}

// kTokens: the most token rows (tokens <= kTokens; the missing ones are zeros). kRows: rows per group and
// iteration (fewer for more tokens, whose rows in registers take their place).
template <int kTokens, int kRows>
__global__ void __launch_bounds__(kThreads, 2) gemv_kernel(Params p) {
  __shared__ float parts[2][kWarps][kRows * kTokens];  // a group's warps' sums, double-buffered per iteration
  const int group = p.group, slots = kThreads / group;
  const int slot = threadIdx.x / group, g = threadIdx.x % group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int vecs = p.cols / 8;
  const int b = blockIdx.y;
  const __nv_bfloat16* w = p.w + b * p.w_batch_stride;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * p.iterations * slots * kRows;

  auto load_weights = [&](int it, uint4 (&wr)[kRows][kVecs]) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = first_row + (static_cast<int64_t>(it) * slots + slot) * kRows + r;
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int v = g + i * group;
        wr[r][i] = make_uint4(0, 0, 0, 0);
        if (row < p.rows && v < vecs) wr[r][i] = __ldcs(reinterpret_cast<const uint4*>(w + row * p.w_row_stride) + v);
      }
    }
  };

  uint4 wr[kRows][kVecs];
  load_weights(0, wr);
  kda::grid_dependency_wait();  // x may be the previous kernel's output
  kda::allow_dependent_launch();
  uint4 xr[kTokens][kVecs];
#pragma unroll
  for (int t = 0; t < kTokens; ++t) {
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int v = g + i * group;
      xr[t][i] = make_uint4(0, 0, 0, 0);
      if (t < p.tokens && v < vecs) {
        xr[t][i] = reinterpret_cast<const uint4*>(p.x + b * p.x_batch_stride + t * p.x_row_stride)[v];
      }
    }
  }

  for (int it = 0; it < p.iterations; ++it) {
    uint4 cur[kRows][kVecs];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int i = 0; i < kVecs; ++i) cur[r][i] = wr[r][i];
    }
    if (it + 1 < p.iterations) load_weights(it + 1, wr);  // the next rows' loads fly while these are summed
    float acc[kRows][kTokens] = {};
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      float wf[kRows][8];
#pragma unroll
      for (int r = 0; r < kRows; ++r) unpack_bf16x8(cur[r][i], wf[r]);
#pragma unroll
      for (int t = 0; t < kTokens; ++t) {
        float xf[8];
        unpack_bf16x8(xr[t][i], xf);
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r][t] += dot8(wf[r], xf);
      }
    }
    // sum over the group: its lanes in the warp, then (groups wider than a warp) its warps
    const int width = group < 32 ? group : 32;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int t = 0; t < kTokens; ++t) {
        for (int offset = width / 2; offset > 0; offset >>= 1) {
          acc[r][t] += __shfl_xor_sync(0xffffffffu, acc[r][t], offset);
        }
      }
    }
    const int64_t row0 = first_row + (static_cast<int64_t>(it) * slots + slot) * kRows;
    __nv_bfloat16* out = p.out + b * p.out_batch_stride;
    if (group <= 32) {
      if (g == 0) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
#pragma unroll
          for (int t = 0; t < kTokens; ++t) {
            if (row0 + r < p.rows && t < p.tokens) out[t * p.out_row_stride + row0 + r] = __float2bfloat16(acc[r][t]);
          }
        }
      }
      continue;
    }
    float(&mine)[kWarps][kRows * kTokens] = parts[it & 1];
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int t = 0; t < kTokens; ++t) mine[warp][r * kTokens + t] = acc[r][t];
      }
    }
    __syncthreads();  // one per iteration: the next one writes the other buffer
    const int warps_per_group = group / 32;
    for (int j = threadIdx.x; j < slots * kRows * kTokens; j += kThreads) {
      const int s = j / (kRows * kTokens), rt = j % (kRows * kTokens), r = rt / kTokens, t = rt % kTokens;
      const int64_t row = first_row + (static_cast<int64_t>(it) * slots + s) * kRows + r;
      if (row >= p.rows || t >= p.tokens) continue;
      float sum = 0.f;
      for (int k = 0; k < warps_per_group; ++k) sum += mine[s * warps_per_group + k][rt];
      out[t * p.out_row_stride + row] = __float2bfloat16(sum);
    }
  }
}

template <int kTokens, int kRows>
cudaError_t launch(Params p, cudaStream_t s, int batch, int sms) {
  const int64_t rows_per_iteration = (kThreads / p.group) * kRows;
  // enough CTAs for four per SM across the batch, each at least one iteration
  const int64_t steps = (p.rows + rows_per_iteration - 1) / rows_per_iteration;
  const int64_t wanted = (4LL * sms + batch - 1) / batch;
  p.iterations = static_cast<int>((steps + wanted - 1) / wanted);
  const int ctas = static_cast<int>((steps + p.iterations - 1) / p.iterations);
  return kda::launch_with_pdl(gemv_kernel<kTokens, kRows>, dim3(ctas, batch), dim3(kThreads), 0, s, p);
}

}  // namespace
}  // namespace kda_serving::gemv

using namespace kda_serving::gemv;

extern "C" {

// out[b, t, n] = sum_k x[b, t, k] * w[b, n, k] in fp32, rounded to bf16, for b < batch, t < tokens, n < rows,
// k < cols. All bf16; every stride in elements. Sizes: 1 <= tokens <= 8, cols a multiple of 8 in
// [8, 4096], strides multiples of 8 and pointers 16-byte aligned, batch <= 65,535.
// sms: the device's SM count (the grid is sized from it). Returns a cudaError_t.
int kda_serving_gemv(const void* x, int64_t x_row_stride, int64_t x_batch_stride, const void* w,
                     int64_t w_row_stride, int64_t w_batch_stride, void* out, int64_t out_row_stride,
                     int64_t out_batch_stride, int batch, int tokens, int rows, int cols, int sms, void* stream) {
  const bool valid = tokens >= 1 && tokens <= 8 && rows >= 0 && cols >= 8 && cols % 8 == 0 &&
                     cols <= 8 * kThreads * kVecs && batch >= 0 && batch <= 65535 && sms >= 1 &&
                     x_row_stride % 8 == 0 && x_batch_stride % 8 == 0 && w_row_stride % 8 == 0 &&
                     w_batch_stride % 8 == 0 && w_row_stride >= cols && x_row_stride >= 0 && out_row_stride >= 0 &&
                     (reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(w)) % 16 == 0;
  if (!valid) return static_cast<int>(cudaErrorInvalidValue);
  if (batch == 0 || rows == 0) return static_cast<int>(cudaSuccess);
  Params p{};
  p.x = static_cast<const __nv_bfloat16*>(x);
  p.x_row_stride = x_row_stride;
  p.x_batch_stride = x_batch_stride;
  p.w = static_cast<const __nv_bfloat16*>(w);
  p.w_row_stride = w_row_stride;
  p.w_batch_stride = w_batch_stride;
  p.out = static_cast<__nv_bfloat16*>(out);
  p.out_row_stride = out_row_stride;
  p.out_batch_stride = out_batch_stride;
  p.tokens = tokens;
  p.rows = rows;
  p.cols = cols;
  // the narrowest group whose threads cover a row in kVecs loads each (16 at least: a row of 128 is 16
  // vectors), so that a CTA holds as many rows at once as it can
  int group = 16;
  while (group * kVecs < cols / 8) group *= 2;
  p.group = group;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  if (tokens == 1) {
    err = launch<1, 4>(p, s, batch, sms);
  } else if (tokens == 2) {
    err = launch<2, 2>(p, s, batch, sms);
  } else if (tokens <= 4) {
    err = launch<4, 1>(p, s, batch, sms);
  } else {
    err = launch<8, 1>(p, s, batch, sms);
  }
  return static_cast<int>(err);
}

}  // extern "C"
