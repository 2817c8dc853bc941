// The routed experts of a decode step as matrix-vector products: T tokens (a few), each with its top-k experts,
// the (token, expert) pairs each streaming their expert's weights once at full bandwidth. Called through ctypes
// by kda_serving/ops/cuda_moe.py (docs/moe-gemv.md).
//
// A grouped GEMM tiles each expert's rows of tokens into 64- or 128-row MMA tiles; at one to a few tokens per
// expert nearly all of a tile is padding and the kernel's latency, not the weights' bytes, sets the time (0.18
// ms per Kimi-Linear-48B MoE layer at one token against 0.03 ms of weights, H200). Here every warp reduces one
// weight row against the token's activations kept in shared memory as fp32, with 16-byte streaming loads:
//
//   gate_up_kernel  grid (inter / 16, T * (k + P)): h[pair, o] = silu(W_gate[e] x_t)[o] * (W_up[e] x_t)[o]  (fp32)
//   down_kernel     grid (hidden / 8, T):   out[t, o] = sum_j w[t, j] * (W_down[e_j] h[t * k + j])[o]
//                                                      + sum_s (W_shared_down[:, part s] h[T * k + t * P + s])[o]
//
// The shared experts (a bf16 SwiGLU MLP of width P * inter beside the routed experts, as Kimi-Linear has one of)
// may ride along as P more pairs per token of width inter, weight 1: their two GEMVs, SwiGLU and the add to the
// routed sum cost no launch of their own (five kernels at 4.5 + 1.5 + 1.2 + 4.5 + 1.2 us at one token through
// cuBLAS and torch, H200) and the layer's output is rounded once. The SwiGLU activation is the first kernel's
// epilogue and the weighted sum the second's, in a fixed order (j = 0 .. k-1, then the shared parts, then the
// decoder layer's residual where given, so that its add is no kernel of its own either): no atomics, results
// repeat. Weights are bf16, or e4m3 with an fp32 scale per output row
// (W8A16: the activations stay fp32, the scale applied after the row's dot product). Only enqueues work on
// `stream`: no allocation (h is the caller's workspace), no synchronisation, CUDA-graph capturable. A pair
// whose expert id is outside [0, E) contributes nothing (the router never makes one).
#include <cstdint>
#include <utility>

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "common/packed.cuh"

namespace kda_serving::moe {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kElemsPerVec = 8;   // one load: 16 bytes of bf16 or 8 of e4m3
constexpr int kUnroll = 4;        // loads in flight per lane and row before their products
constexpr int kGateUpRowsPerCta = 16;
constexpr int kDownRowsPerCta = 8;
constexpr int kMaxSharedBytes = 96 * 1024;

struct Params {
  const __nv_bfloat16* x;  // [T, hidden] at x_row_stride
  int64_t x_row_stride;
  const int64_t* ids;       // [T, k] expert per pair
  const float* route_w;     // [T, k]
  const void* gate_up;      // [E, 2 * inter, hidden]: gate rows, then up rows
  const float* gate_up_scale;  // [E, 2 * inter] (e4m3 only)
  const void* down;         // [E, hidden, inter]
  const float* down_scale;  // [E, hidden] (e4m3 only)
  const __nv_bfloat16* shared_gate_up;  // [2 * P * inter, hidden]: gate rows, then up rows (P = 0: none)
  const __nv_bfloat16* shared_down;     // [hidden, P * inter]
  float* h;                 // [T * (k + P), inter] workspace: the routed pairs, then each token's shared parts
  const __nv_bfloat16* residual;  // [T, hidden] added to the sum, or null
  __nv_bfloat16* out;       // [T, hidden]
  int tokens, top_k, experts, hidden, inter, shared_parts;
};

template <bool kFp8>
struct Weights {
  using Vec = uint4;  // 8 bf16
  static __device__ __forceinline__ void expand(const Vec& v, float (&f)[kElemsPerVec]) { unpack_bf16x8(v, f); }
};

template <>
struct Weights<true> {
  using Vec = uint2;  // 8 e4m3
  static __device__ __forceinline__ void expand(const Vec& v, float (&f)[kElemsPerVec]) {
    const __nv_fp8x2_storage_t* p = reinterpret_cast<const __nv_fp8x2_storage_t*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __half2 pair(__nv_cvt_fp8x2_to_halfraw2(p[i], __NV_E4M3));
      const float2 a = __half22float2(pair);
      f[2 * i] = a.x;
      f[2 * i + 1] = a.y;
    }
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// This lane's share of the dot products of kRows weight rows (vecs loads of 8 elements each) with fp32 vectors
// in shared memory (xs[r] for row r): lane l takes loads l, l + 32, ...; the caller sums over the warp.
template <bool kFp8, int kRows>
__device__ __forceinline__ void dot_rows(const typename Weights<kFp8>::Vec* const (&rows)[kRows],
                                         const float* const (&xs)[kRows], int vecs, int lane,
                                         float (&acc)[kRows]) {
  using Vec = typename Weights<kFp8>::Vec;
  for (int base = 0; base < vecs; base += 32 * kUnroll) {
    Vec buf[kRows][kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = base + lane + 32 * u;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (v < vecs) buf[r][u] = __ldcs(rows[r] + v);  // read once: evict first
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = base + lane + 32 * u;
      if (v >= vecs) break;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float w[kElemsPerVec];
        Weights<kFp8>::expand(buf[r][u], w);
        const float4 a = reinterpret_cast<const float4*>(xs[r] + kElemsPerVec * v)[0];
        const float4 b = reinterpret_cast<const float4*>(xs[r] + kElemsPerVec * v)[1];
        acc[r] += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x + w[5] * b.y + w[6] * b.z +
                  w[7] * b.w;
      }
    }
  }
}

// Shared-memory staging with kBatch loads per thread in flight at once, where a plain strided loop waits on one L2
// round trip per iteration (8-9 of them at 48B's sizes): 1-2% per kernel (H200, logs/session23). stage loads n
// 16-byte vectors of src and hands each to store(i, vector); stage_floats copies float4s, stage_bf16_as_floats
// widens chunks of 8 bf16 (16-byte aligned) into two float4s each.
template <int kBatch, typename Vec, typename Store>
__device__ __forceinline__ void stage(const Vec* src, int n, Store store) {
  for (int base = threadIdx.x; base < n; base += kThreads * kBatch) {
    Vec v[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (base + b * kThreads < n) v[b] = src[base + b * kThreads];
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (base + b * kThreads < n) store(base + b * kThreads, v[b]);
    }
  }
}

template <int kBatch>
__device__ __forceinline__ void stage_floats(float4* dst, const float4* src, int n) {
  stage<kBatch>(src, n, [dst](int i, const float4& v) { dst[i] = v; });
}

template <int kBatch>
__device__ __forceinline__ void stage_bf16_as_floats(float4* dst, const uint4* src, int n) {
  stage<kBatch>(src, n, [dst](int i, const uint4& v) {
    float f[8];
    unpack_bf16x8(v, f);
    dst[2 * i] = make_float4(f[0], f[1], f[2], f[3]);
    dst[2 * i + 1] = make_float4(f[4], f[5], f[6], f[7]);
  });
}

template <bool kFp8>
__device__ __forceinline__ const typename Weights<kFp8>::Vec* weight_row(const void* base, int64_t row,
                                                                        int row_len) {
  constexpr int64_t kBytes = kFp8 ? 1 : 2;
  return reinterpret_cast<const typename Weights<kFp8>::Vec*>(static_cast<const char*>(base) +
                                                              row * row_len * kBytes);
}

// Rows o, o + 8 of a CTA's 16 per warp: the gate and up rows' dot products with x, SwiGLU, into h. gate_row is the
// index of the gate row of o in `weights`; its up row is up_offset rows further.
template <bool kFp8>
__device__ __forceinline__ void gate_up_rows(const Params& p, const void* weights, const float* scales,
                                             int64_t gate_row0, int64_t up_offset, const float* xs, float* h) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int end = min((blockIdx.x + 1) * kGateUpRowsPerCta, p.inter);
  const float* const xs2[2] = {xs, xs};
  for (int o = blockIdx.x * kGateUpRowsPerCta + warp; o < end; o += kWarps) {
    const int64_t gate = gate_row0 + o, up = gate + up_offset;
    const typename Weights<kFp8>::Vec* const rows[2] = {weight_row<kFp8>(weights, gate, p.hidden),
                                                        weight_row<kFp8>(weights, up, p.hidden)};
    float acc[2] = {0.f, 0.f};
    dot_rows<kFp8, 2>(rows, xs2, p.hidden / kElemsPerVec, lane, acc);
    acc[0] = warp_sum(acc[0]);
    acc[1] = warp_sum(acc[1]);
    if (kFp8) {
      acc[0] *= scales[gate];
      acc[1] *= scales[up];
    }
    if (lane == 0) h[o] = acc[0] / (1.f + __expf(-acc[0])) * acc[1];
  }
}

// Pairs 0 .. T*k-1 are the routed ones (t = pair / k), then T * P shared parts (t, s) in that order.
template <bool kFp8>
__global__ void __launch_bounds__(kThreads) gate_up_kernel(Params p) {
  extern __shared__ float4 smem4[];
  const float* xs = reinterpret_cast<const float*>(smem4);
  const int pair = blockIdx.y;
  const int routed_pairs = p.tokens * p.top_k;
  const bool routed = pair < routed_pairs;
  const int t = routed ? pair / p.top_k : (pair - routed_pairs) / p.shared_parts;
  stage_bf16_as_floats<2>(smem4, reinterpret_cast<const uint4*>(p.x + t * p.x_row_stride), p.hidden / 8);
  __syncthreads();
  float* h = p.h + static_cast<int64_t>(pair) * p.inter;
  if (routed) {
    const int64_t e = p.ids[pair];
    if (e >= 0 && e < p.experts) {
      gate_up_rows<kFp8>(p, p.gate_up, p.gate_up_scale, e * 2 * p.inter, p.inter, xs, h);
    } else {  // an invalid expert contributes nothing; its h row is still written
      for (int o = blockIdx.x * kGateUpRowsPerCta + threadIdx.x; o < min((blockIdx.x + 1) * kGateUpRowsPerCta,
                                                                         p.inter); o += kThreads)
        h[o] = 0.f;
    }
  } else {
    const int part = (pair - routed_pairs) % p.shared_parts;
    const int64_t width = static_cast<int64_t>(p.shared_parts) * p.inter;
    gate_up_rows<false>(p, p.shared_gate_up, nullptr, part * p.inter, width, xs, h);
  }
}

template <bool kFp8>
__global__ void __launch_bounds__(kThreads) down_kernel(Params p) {
  extern __shared__ float4 smem4[];
  float* hs = reinterpret_cast<float*>(smem4);  // the token's k routed, then P shared activations, [k + P, inter]
  const int t = blockIdx.y;
  const int64_t first = static_cast<int64_t>(t) * p.top_k;
  const int64_t first_shared = static_cast<int64_t>(p.tokens) * p.top_k + static_cast<int64_t>(t) * p.shared_parts;
  stage_floats<4>(smem4, reinterpret_cast<const float4*>(p.h + first * p.inter), p.top_k * p.inter / 4);
  stage_floats<1>(smem4 + p.top_k * p.inter / 4, reinterpret_cast<const float4*>(p.h + first_shared * p.inter),
                  p.shared_parts * p.inter / 4);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int end = min((blockIdx.x + 1) * kDownRowsPerCta, p.hidden);
  for (int o = blockIdx.x * kDownRowsPerCta + warp; o < end; o += kWarps) {
    float sum = 0.f;
    for (int j = 0; j < p.top_k; ++j) {
      const int64_t e = p.ids[first + j];
      if (e < 0 || e >= p.experts) continue;
      const typename Weights<kFp8>::Vec* const rows[1] = {weight_row<kFp8>(p.down, e * p.hidden + o, p.inter)};
      const float* const xs[1] = {hs + j * p.inter};
      float acc[1] = {0.f};
      dot_rows<kFp8, 1>(rows, xs, p.inter / kElemsPerVec, lane, acc);
      float scale = p.route_w[first + j];
      if (kFp8) scale *= p.down_scale[e * p.hidden + o];
      sum += scale * acc[0];  // each lane its share; one reduction for all k below
    }
    const int64_t shared_width = static_cast<int64_t>(p.shared_parts) * p.inter;
    for (int part = 0; part < p.shared_parts; ++part) {
      const uint4* const rows[1] = {reinterpret_cast<const uint4*>(p.shared_down + o * shared_width + part * p.inter)};
      const float* const xs[1] = {hs + (p.top_k + part) * p.inter};
      float acc[1] = {0.f};
      dot_rows<false, 1>(rows, xs, p.inter / kElemsPerVec, lane, acc);
      sum += acc[0];
    }
    sum = warp_sum(sum);
    const int64_t at = static_cast<int64_t>(t) * p.hidden + o;
    if (lane == 0) p.out[at] = __float2bfloat16(p.residual ? sum + __bfloat162float(p.residual[at]) : sum);
  }
}

template <bool kFp8>
cudaError_t launch(const Params& p, cudaStream_t s) {
  const int gate_up_smem = p.hidden * static_cast<int>(sizeof(float));
  const int down_smem = (p.top_k + p.shared_parts) * p.inter * static_cast<int>(sizeof(float));
  for (auto [kernel, bytes] : {std::pair{reinterpret_cast<const void*>(gate_up_kernel<kFp8>), gate_up_smem},
                               std::pair{reinterpret_cast<const void*>(down_kernel<kFp8>), down_smem}}) {
    if (bytes > 48 * 1024) {
      const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
      if (err != cudaSuccess) return err;
    }
  }
  const dim3 grid1((p.inter + kGateUpRowsPerCta - 1) / kGateUpRowsPerCta, p.tokens * (p.top_k + p.shared_parts));
  gate_up_kernel<kFp8><<<grid1, kThreads, gate_up_smem, s>>>(p);
  const dim3 grid2((p.hidden + kDownRowsPerCta - 1) / kDownRowsPerCta, p.tokens);
  down_kernel<kFp8><<<grid2, kThreads, down_smem, s>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace kda_serving::moe

using namespace kda_serving::moe;

extern "C" {

// Sizes: hidden and inter multiples of 256 (whole 8-element loads for every lane's share of a row, 16-byte
// aligned rows), hidden * 4 and (top_k + shared_parts) * inter * 4 bytes of shared memory at most 96 KB,
// tokens * (top_k + shared_parts) at most 65,535 (the grid's y). shared_gate_up / shared_down: the bf16 shared
// experts, [2 * shared_parts * inter, hidden] and [hidden, shared_parts * inter], or null with shared_parts 0.
// h: [tokens * (top_k + shared_parts), inter]. residual: [tokens, hidden] bf16 added to out, or null.
// Returns a cudaError_t.
int kda_serving_moe_gemv(const void* x, int64_t x_row_stride, const int64_t* ids, const float* route_weights,
                         int tokens, int top_k, int experts, const void* gate_up, const float* gate_up_scale,
                         const void* down, const float* down_scale, int fp8, int hidden, int inter,
                         const void* shared_gate_up, const void* shared_down, int shared_parts, float* h,
                         const void* residual, void* out, void* stream) {
  const bool valid = tokens >= 0 && top_k >= 1 && experts >= 1 && hidden >= 256 && hidden % 256 == 0 &&
                     inter >= 256 && inter % 256 == 0 && x_row_stride >= hidden && x_row_stride % 8 == 0 &&
                     static_cast<int64_t>(hidden) * 4 <= kMaxSharedBytes &&
                     shared_parts >= 0 && (shared_parts == 0 || (shared_gate_up && shared_down)) &&
                     static_cast<int64_t>(top_k + shared_parts) * inter * 4 <= kMaxSharedBytes &&
                     static_cast<int64_t>(tokens) * (top_k + shared_parts) <= 65535 &&
                     (!fp8 || (gate_up_scale && down_scale));
  if (!valid) return static_cast<int>(cudaErrorInvalidValue);
  if (tokens == 0) return static_cast<int>(cudaSuccess);
  Params p{};
  p.x = static_cast<const __nv_bfloat16*>(x);
  p.x_row_stride = x_row_stride;
  p.ids = ids;
  p.route_w = route_weights;
  p.gate_up = gate_up;
  p.gate_up_scale = gate_up_scale;
  p.down = down;
  p.down_scale = down_scale;
  p.shared_gate_up = static_cast<const __nv_bfloat16*>(shared_gate_up);
  p.shared_down = static_cast<const __nv_bfloat16*>(shared_down);
  p.shared_parts = shared_parts;
  p.h = h;
  p.residual = static_cast<const __nv_bfloat16*>(residual);
  p.out = static_cast<__nv_bfloat16*>(out);
  p.tokens = tokens;
  p.top_k = top_k;
  p.experts = experts;
  p.hidden = hidden;
  p.inter = inter;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return static_cast<int>(fp8 ? launch<true>(p, s) : launch<false>(p, s));
}

}  // extern "C"
