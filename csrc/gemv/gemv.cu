// The projections of a decode step as matrix-vector products: a few token rows x [T, K] against a bf16 weight
// [N, K] (a batch of them), out[b, t, n] = sum_k x[b, t, k] * w[b, n, k], fp32 sums rounded once to bf16. Called
// through ctypes by kda_serving/ops/cuda_gemv.py (docs/gemv.md).
//
// At one to a few tokens cuBLAS runs these as 8-column MMA tiles: the 58 MB KDA input projection of
// Kimi-Linear-48B took 17.3 us against a 13.7 us floor (the card's copy rate), its 19 MB output projections
// 9.3 us in two kernels (split K and its reduction) against 4.5 us, and 2-4 MB ones 3.4-6 us, where one round
// trip to memory is under 1 us (H200, logs/session24).
//
// Design (the second one; the first, a thread group per row summing in fp32 FMAs, grew with the token count and
// synchronised its groups every few rows: docs/gemv.md). A warp takes a tile of 8 weight rows and a range of K,
// and multiplies on tensor cores: mma.sync m16n8k16 with the token rows as A (rows 8-15 zero) and the weight
// tile as B. The sum over k does not care in which order k comes, so each lane loads 16 contiguous bytes of its
// B row (row lane / 4, columns 8 * (lane % 4) onward of each 32) and the same 16 bytes of its A row (token
// lane / 4), and the two fragments agree on which k each register holds: no shared memory, no shuffles, and
// the products cost two tensor-core instructions per 16-byte load, whatever the token count up to 8.
//
// Bytes in flight come from occupancy: a warp issues kSteps 16-byte weight loads before it waits, and enough
// warps are launched to fill the SMs several times over, splitting K across the warps of a CTA where the rows
// are too few; the split parts are summed through shared memory once, at the end. Launched with programmatic
// dependent launch: the first weights (which no kernel writes) are loaded before the wait for the previous
// kernel, the token rows after it. Only enqueues work on `stream`: no allocation, no synchronisation,
// CUDA-graph capturable.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/mma_sm80.cuh"
#include "common/pdl.cuh"

namespace kda_serving::gemv {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = 8;   // weight rows per warp: the n of one m16n8k16 product
constexpr int kStepCols = 32;  // columns per step: 4 lanes x 16 bytes per row
constexpr int kSteps = 8;      // steps whose loads a warp issues before it waits for them
constexpr int kWarpsPerSM = 16;  // warps launched per SM at the least, where splitting K gets there
constexpr int kMaxTokens = 8;  // token rows: A's rows 0-7

struct Params {
  const __nv_bfloat16* x;  // [batch, tokens, cols] at the strides below
  int64_t x_row_stride, x_batch_stride;
  const __nv_bfloat16* w;  // [batch, rows, cols]
  int64_t w_row_stride, w_batch_stride;
  __nv_bfloat16* out;      // [batch, tokens, rows]
  int64_t out_row_stride, out_batch_stride;
  int tokens, rows, cols;
  int splits;  // warps (consecutive in a CTA) that share a tile, each a range of its steps: 1, 2, 4 or 8
};

__global__ void __launch_bounds__(kThreads, 3) gemv_kernel(Params p) {
  __shared__ float parts[kWarps][kMaxTokens][kTileRows];  // a warp's sums when its tile is split
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;  // this lane's B row (weight row of the tile) and A row (token); column
  const int b = blockIdx.y;
  const int tiles_per_cta = kWarps / p.splits, split = warp % p.splits;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * tiles_per_cta + warp / p.splits) * kTileRows;
  const int vecs = p.cols / 8, steps = (p.cols + kStepCols - 1) / kStepCols;
  const int per_split = (steps + p.splits - 1) / p.splits;
  const int first = split * per_split, last = min(steps, first + per_split);  // this warp's steps

  const bool row_ok = row0 + g < p.rows, token_ok = g < p.tokens;
  // 16-byte vector v of this lane's rows is at [v]; step s reads vector 4 s + c
  const uint4* w = reinterpret_cast<const uint4*>(p.w + b * p.w_batch_stride + (row_ok ? row0 + g : 0) * p.w_row_stride);
  const uint4* x = reinterpret_cast<const uint4*>(p.x + b * p.x_batch_stride + (token_ok ? g : 0) * p.x_row_stride);

  uint4 wv[kSteps];
  auto load_weights = [&](int s0) {
#pragma unroll
    for (int j = 0; j < kSteps; ++j) {
      const int v = 4 * (s0 + j) + c;
      wv[j] = make_uint4(0, 0, 0, 0);
      if (row_ok && s0 + j < last && v < vecs) wv[j] = __ldcs(w + v);
    }
  };
  load_weights(first);
  kda::grid_dependency_wait();  // x may be the previous kernel's output
  kda::allow_dependent_launch();

  float acc[4] = {0.f, 0.f, 0.f, 0.f};  // [0..1]: token g, tile rows 2c and 2c + 1; [2..3]: A's zero rows
  for (int s0 = first; s0 < last; s0 += kSteps) {
    if (s0 != first) load_weights(s0);
    uint4 xv[kSteps];
#pragma unroll
    for (int j = 0; j < kSteps; ++j) {
      const int v = 4 * (s0 + j) + c;
      xv[j] = make_uint4(0, 0, 0, 0);
      if (token_ok && s0 + j < last && v < vecs) xv[j] = __ldg(x + v);
    }
#pragma unroll
    for (int j = 0; j < kSteps; ++j) {  // k order 8c + 0..3, then 8c + 4..7, in both fragments
      const uint32_t a_lo[4] = {xv[j].x, 0u, xv[j].y, 0u}, a_hi[4] = {xv[j].z, 0u, xv[j].w, 0u};
      kda::mma_16816(acc, a_lo, wv[j].x, wv[j].y);
      kda::mma_16816(acc, a_hi, wv[j].z, wv[j].w);
    }
  }

  __nv_bfloat16* out = p.out + b * p.out_batch_stride;
  if (p.splits == 1) {
    if (token_ok) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int64_t row = row0 + 2 * c + i;
        if (row < p.rows) out[g * p.out_row_stride + row] = __float2bfloat16(acc[i]);
      }
    }
    return;
  }
  parts[warp][g][2 * c] = acc[0];
  parts[warp][g][2 * c + 1] = acc[1];
  __syncthreads();
  for (int i = threadIdx.x; i < tiles_per_cta * kMaxTokens * kTileRows; i += kThreads) {
    const int tile = i / (kMaxTokens * kTileRows), t = i / kTileRows % kMaxTokens, r = i % kTileRows;
    const int64_t row = (static_cast<int64_t>(blockIdx.x) * tiles_per_cta + tile) * kTileRows + r;
    if (t >= p.tokens || row >= p.rows) continue;
    float sum = 0.f;
    for (int s = 0; s < p.splits; ++s) sum += parts[tile * p.splits + s][t][r];
    out[t * p.out_row_stride + row] = __float2bfloat16(sum);
  }
}

}  // namespace
}  // namespace kda_serving::gemv

using namespace kda_serving::gemv;

extern "C" {

// out[b, t, n] = sum_k x[b, t, k] * w[b, n, k] in fp32, rounded to bf16, for b < batch, t < tokens, n < rows,
// k < cols. All bf16; every stride in elements. Sizes: 1 <= tokens <= 8, cols a multiple of 8 in
// [8, 65536], strides multiples of 8 and pointers 16-byte aligned, batch <= 65,535.
// sms: the device's SM count (the grid is sized from it). Returns a cudaError_t.
int kda_serving_gemv(const void* x, int64_t x_row_stride, int64_t x_batch_stride, const void* w,
                     int64_t w_row_stride, int64_t w_batch_stride, void* out, int64_t out_row_stride,
                     int64_t out_batch_stride, int batch, int tokens, int rows, int cols, int sms, void* stream) {
  const bool valid = tokens >= 1 && tokens <= kMaxTokens && rows >= 0 && cols >= 8 && cols % 8 == 0 &&
                     cols <= 65536 && batch >= 0 && batch <= 65535 && sms >= 1 &&
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
  // Split each tile's steps over more warps until there are 16 warps per SM to share the loads, as long as
  // every warp keeps at least half a round of kSteps (a 19 MB output projection: 288 tiles x 8 splits).
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  const int steps = (cols + kStepCols - 1) / kStepCols;
  int splits = 1;
  while (splits < kWarps && tiles * batch * splits < static_cast<int64_t>(kWarpsPerSM) * sms && steps >= kSteps * splits) splits *= 2;
  p.splits = splits;
  const int64_t ctas = (tiles + kWarps / splits - 1) / (kWarps / splits);
  if (ctas > 0x7fffffff) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(kda::launch_with_pdl(gemv_kernel, dim3(static_cast<unsigned>(ctas), batch),
                                               dim3(kThreads), 0, static_cast<cudaStream_t>(stream), p));
}

}  // extern "C"
