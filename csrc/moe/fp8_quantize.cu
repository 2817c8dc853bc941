// Rows of bf16 activations quantized to e4m3 with one fp32 scale per row: the fp8 experts' GEMM operands
// (kda_serving/model/fp8.py; called through ctypes by kda_serving/ops/cuda_fp8.py, docs/quantization.md).
//
//   quantize_rows       x [M, K] bf16              -> q [M, K] e4m3, scale [M]
//   silu_mul_quantize   gate_up [M, 2I] bf16       -> q [M, I] e4m3, scale [M]   of h = silu(gate) * up (fp32)
//
// scale = max(amax(row), 1e-12) * (1/448) and q = rn_satfinite(row * (1/scale)), each step rounded to nearest
// in fp32 (the rest of the library compiles to fast-math approximations; these are IEEE), so quantize_rows equals
// the torch formula (ops/fp8_quantize.py) bit for bit. A row holding a NaN gets a NaN scale, as torch's amax
// gives it: the GEMM's output shows it.
//
// Memory-bound: one CTA per row, each thread holding its share of the row (up to kMaxVecsPerThread loads of 8
// elements) in registers between the amax and the conversion, so the row is read once; a CTA of 128 threads
// reads all of a 2,304-element row in one round of loads, so few rows (a decode step) cost one DRAM round trip
// and not a warp's walk along the row. Compiled torch (Inductor, dynamic shapes) took 0.66 ms for the tokens'
// 65,536 x 2,304 and 0.29 ms for the activations' 65,536 x 1,024 (H100). Only enqueues work on `stream`: no
// allocation, no synchronisation, CUDA-graph capturable.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "common/packed.cuh"

namespace kda_serving::fp8 {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kVec = 8;               // elements per load: 16 bytes of bf16 in, 8 bytes of e4m3 out
constexpr int kMaxVecsPerThread = 8;  // rows up to 8 * 8 * 128 = 8,192 elements
constexpr float kScalePerAmax = 1.0f / 448.0f;  // 448: e4m3's largest finite value
constexpr float kAmaxFloor = 1e-12f;

struct Params {
  const __nv_bfloat16* in;  // [rows, width] (quantize) or [rows, 2 * width] (silu_mul), at in_row_stride
  int64_t in_row_stride;
  uint8_t* q;               // [rows, width] e4m3, dense
  float* scale;             // [rows]
  int width;                // elements quantized per row: K, or I
};

// The 8 values of vector v of a row as floats: the row's own (kSiluMul false), or silu(gate) * up of its two
// halves (kSiluMul true; the fast-math division, whose 0 for a denominator of inf is silu's limit).
template <bool kSiluMul>
__device__ __forceinline__ void row_values(const uint4 (&raw)[2], float (&f)[kVec]) {
  unpack_bf16x8(raw[0], f);
  if constexpr (kSiluMul) {
    float up[kVec];
    unpack_bf16x8(raw[1], up);
#pragma unroll
    for (int i = 0; i < kVec; ++i) f[i] = f[i] / (1.0f + __expf(-f[i])) * up[i];
  }
}

template <bool kSiluMul, int kPer>
__global__ void __launch_bounds__(kThreads) quantize_kernel(Params p) {
  __shared__ float warp_amax[kWarps];
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const __nv_bfloat16* src = p.in + row * p.in_row_stride;
  const int vecs = p.width / kVec;

  uint4 raw[kPer][2];
#pragma unroll
  for (int u = 0; u < kPer; ++u) {  // every load issued before any arithmetic
    const int v = tid + u * kThreads;
    if (v < vecs) {
      raw[u][0] = reinterpret_cast<const uint4*>(src)[v];
      if constexpr (kSiluMul) raw[u][1] = reinterpret_cast<const uint4*>(src + p.width)[v];
    }
  }
  float f[kPer][kVec];
  float amax = 0.0f;
  bool nan = false;
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    if (tid + u * kThreads < vecs) {
      row_values<kSiluMul>(raw[u], f[u]);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        amax = fmaxf(amax, fabsf(f[u][i]));
        nan |= f[u][i] != f[u][i];
      }
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  if (tid % 32 == 0) warp_amax[tid / 32] = amax;
  nan = __syncthreads_or(nan);  // also the barrier for warp_amax
#pragma unroll
  for (int w = 0; w < kWarps; ++w) amax = fmaxf(amax, warp_amax[w]);
  const float s = nan ? __int_as_float(0x7fffffff) : __fmul_rn(fmaxf(amax, kAmaxFloor), kScalePerAmax);
  if (tid == 0) p.scale[row] = s;
  const float inv = __frcp_rn(s);

  uint2* dst = reinterpret_cast<uint2*>(p.q + row * static_cast<int64_t>(p.width));
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int v = tid + u * kThreads;
    if (v < vecs) {
      uint2 out;
      __nv_fp8x2_storage_t* pairs = reinterpret_cast<__nv_fp8x2_storage_t*>(&out);
#pragma unroll
      for (int i = 0; i < kVec / 2; ++i)
        pairs[i] = __nv_cvt_float2_to_fp8x2(make_float2(__fmul_rn(f[u][2 * i], inv), __fmul_rn(f[u][2 * i + 1], inv)),
                                            __NV_SATFINITE, __NV_E4M3);
      __stcs(dst + v, out);  // streamed: the GEMM reads it once
    }
  }
}

template <bool kSiluMul>
void launch_kernel(const Params& p, int64_t rows, cudaStream_t stream) {
  const int per = (p.width / kVec + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(rows));
  if (per <= 1)
    quantize_kernel<kSiluMul, 1><<<grid, kThreads, 0, stream>>>(p);
  else if (per <= 2)
    quantize_kernel<kSiluMul, 2><<<grid, kThreads, 0, stream>>>(p);
  else if (per <= 4)
    quantize_kernel<kSiluMul, 4><<<grid, kThreads, 0, stream>>>(p);
  else
    quantize_kernel<kSiluMul, kMaxVecsPerThread><<<grid, kThreads, 0, stream>>>(p);
}

int launch(bool silu_mul, const void* in, int64_t in_row_stride, int64_t rows, int width, void* q, float* scale,
           void* stream) {
  const int64_t in_width = silu_mul ? 2 * static_cast<int64_t>(width) : width;
  const bool valid = rows >= 0 && rows <= 0x7fffffff && width >= kVec && width % kVec == 0 &&
                     width <= kMaxVecsPerThread * kVec * kThreads && in_row_stride >= in_width &&
                     in_row_stride % kVec == 0;
  if (!valid) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0) return static_cast<int>(cudaSuccess);
  const Params p{static_cast<const __nv_bfloat16*>(in), in_row_stride, static_cast<uint8_t*>(q), scale, width};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (silu_mul)
    launch_kernel<true>(p, rows, s);
  else
    launch_kernel<false>(p, rows, s);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace kda_serving::fp8

extern "C" {

// x [rows, width] bf16 at x_row_stride elements (16-byte aligned rows) -> q [rows, width] e4m3 (dense, 8-byte
// aligned) and scale [rows] fp32. width a multiple of 8, at most 8,192. Returns a cudaError_t.
int kda_serving_fp8_quantize_rows(const void* x, int64_t x_row_stride, int64_t rows, int width, void* q,
                                  float* scale, void* stream) {
  return kda_serving::fp8::launch(false, x, x_row_stride, rows, width, q, scale, stream);
}

// gate_up [rows, 2 * inter] bf16 (gate, then up) at row stride -> the rows of silu(gate) * up, computed in
// fp32, quantized: q [rows, inter] e4m3 and scale [rows]. inter a multiple of 8, at most 8,192. Returns a
// cudaError_t.
int kda_serving_fp8_silu_mul_quantize(const void* gate_up, int64_t row_stride, int64_t rows, int inter, void* q,
                                      float* scale, void* stream) {
  return kda_serving::fp8::launch(true, gate_up, row_stride, rows, inter, q, scale, stream);
}

}  // extern "C"
