// The fix-up after time-segmented pass-2 runs (prefill/segments.cuh): the state scan across segments with the
// final state, then the correction S_g w_t of every later segment's outputs.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/cuda_check.h"
#include "common/mma_sm80.cuh"
#include "prefill/chunk_layout.cuh"
#include "prefill/launch.cuh"
#include "prefill/segments.cuh"

namespace kda::prefill {
namespace {

constexpr int kScanThreads = 256;  // two threads per state row, 64 columns each
constexpr int kScanSmem = 2 * kDim * kDim * 4;
constexpr int kCorrectWarps = 8;   // one 16-token chunk per warp at a time
constexpr int kCorrectParts = 8;   // CTAs per (sequence, head, segment), each a range of its chunks
constexpr int kSPad = kDim + 8;    // bf16 row stride of S in shared memory: conflict-free ldmatrix
constexpr int kCorrectSmem = 2 * kDim * kSPad * 2;

// One CTA per (sequence, head): S_{g+1} = S_g P_g + L_g in fp32, S_g kept for the correction, the last one
// written as the final state (pool slot or dense final_state, like pass 2 does without segments).
__global__ void __launch_bounds__(kScanThreads) segment_scan_kernel(const KdaPrefillParams p) {
  extern __shared__ __align__(16) float scan_smem[];
  float* S = scan_smem;                // [128][128]
  float* P = scan_smem + kDim * kDim;  // [128][128]
  const int tid = threadIdx.x;
  const int h = static_cast<int>(blockIdx.x % p.heads);
  const int64_t n = blockIdx.x / p.heads;
  int64_t slot = n;
  if (p.state_pool != nullptr) {
    slot = p.state_indices[n];
    if (slot < 0) return;  // padded entry: nothing to write
  }
  const int G = segment_count(p.segments);
  float* states = segment_states(p);
  auto state = [&](int kind, int g) { return states + segment_entry(p, n, h, kind, g) * kDim * kDim; };
  for (int i = tid; i < kDim * kDim / 4; i += kScanThreads) {
    reinterpret_cast<float4*>(S)[i] = reinterpret_cast<const float4*>(state(kBoundState, 1))[i];
  }
  const int v = tid / 2, k0 = (tid % 2) * (kDim / 2);
  for (int g = 1; g < G; ++g) {
    for (int i = tid; i < kDim * kDim / 4; i += kScanThreads) {
      reinterpret_cast<float4*>(P)[i] = reinterpret_cast<const float4*>(state(kTransition, g))[i];
    }
    __syncthreads();
    float acc[kDim / 2];
    const float* L = state(kLocalState, g) + v * kDim + k0;
#pragma unroll
    for (int c = 0; c < kDim / 2; ++c) acc[c] = L[c];
    for (int i = 0; i < kDim; ++i) {
      const float sv = S[v * kDim + i];
      const float4* row = reinterpret_cast<const float4*>(P + i * kDim + k0);
#pragma unroll
      for (int c = 0; c < kDim / 8; ++c) {
        const float4 x = row[c];
        acc[4 * c] = fmaf(sv, x.x, acc[4 * c]);
        acc[4 * c + 1] = fmaf(sv, x.y, acc[4 * c + 1]);
        acc[4 * c + 2] = fmaf(sv, x.z, acc[4 * c + 2]);
        acc[4 * c + 3] = fmaf(sv, x.w, acc[4 * c + 3]);
      }
    }
    __syncthreads();  // all reads of S and P done
#pragma unroll
    for (int c = 0; c < kDim / 2; ++c) S[v * kDim + k0 + c] = acc[c];
    if (g + 1 < G) {
      float* next = state(kBoundState, g + 1) + v * kDim + k0;
#pragma unroll
      for (int c = 0; c < kDim / 2; ++c) next[c] = acc[c];
    } else if (p.state_pool != nullptr || p.final_state != nullptr) {
      const bool pool = p.state_pool != nullptr;
      void* base = pool ? p.state_pool : p.final_state;
      const bool fp32 = pool ? p.state_pool_fp32 : p.final_state_fp32;
      const int64_t off = state_offset(pool ? slot : n, pool ? pool_state_stride(p) : dense_state_stride(p), h, v, k0);
#pragma unroll
      for (int c = 0; c < kDim / 2; c += 2) {
        if (fp32) {
          *reinterpret_cast<float2*>(static_cast<float*>(base) + off + c) = make_float2(acc[c], acc[c + 1]);
        } else {
          *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(base) + off + c) =
              __floats2bfloat162_rn(acc[c], acc[c + 1]);
        }
      }
    }
    __syncthreads();  // S complete before the next step reads it
  }
}

// CTAs per (sequence, head, segment g >= 1, part): out[t] += S_g w_t over the part's chunks, on tensor cores
// with S_g split into bf16 hi + lo (w is bf16 already).
__global__ void __launch_bounds__(32 * kCorrectWarps) segment_correct_kernel(const KdaPrefillParams p) {
  extern __shared__ __align__(16) __nv_bfloat16 correct_smem[];
  __nv_bfloat16* s_hi = correct_smem;               // [v][i], row stride kSPad
  __nv_bfloat16* s_lo = correct_smem + kDim * kSPad;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g8 = lane / 4, q4 = lane % 4;
  const int G = segment_count(p.segments);
  const int part = static_cast<int>(blockIdx.x % kCorrectParts);
  const int64_t rest = blockIdx.x / kCorrectParts;
  const int g = 1 + static_cast<int>(rest % (G - 1));
  const int h = static_cast<int>((rest / (G - 1)) % p.heads);
  const int64_t n = rest / (G - 1) / p.heads;
  if (p.state_pool != nullptr && p.state_indices[n] < 0) return;
  int64_t bos, len;
  seq_bounds(p, n, bos, len);
  int64_t begin, end;
  segment_chunks(p, (len + kChunk - 1) / kChunk, g, begin, end);
  const int64_t per = (end - begin + kCorrectParts - 1) / kCorrectParts;
  const int64_t part_begin = begin + part * per;
  const int64_t part_end = part_begin + per < end ? part_begin + per : end;
  if (part_begin >= part_end) return;

  const float* S = segment_states(p) + segment_entry(p, n, h, kBoundState, g) * kDim * kDim;
  for (int i = tid; i < kDim * kDim / 2; i += 32 * kCorrectWarps) {
    const int v = (2 * i) / kDim, c = (2 * i) % kDim;
    const float2 x = *reinterpret_cast<const float2*>(S + 2 * i);
    uint32_t hi, lo;
    split_bf16x2(x.x, x.y, hi, lo);
    *reinterpret_cast<uint32_t*>(s_hi + v * kSPad + c) = hi;
    *reinterpret_cast<uint32_t*>(s_lo + v * kSPad + c) = lo;
  }
  __syncthreads();

  const __nv_bfloat16* w = segment_w(p);
  auto* out = static_cast<__nv_bfloat16*>(p.out);
  for (int64_t j = part_begin + warp; j < part_end; j += kCorrectWarps) {
    const int64_t t0 = j * kChunk;
    const int L = chunk_tokens(len - t0);
    auto w_pair = [&](int t, int i) -> uint32_t {  // w of token t0 + t, key columns i, i + 1 (0 past the end)
      return t < L ? lds_u32(w + ((bos + t0 + t) * p.heads + h) * kDim + i) : 0u;
    };
    float acc[kDim / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < kDim / 16; ++kk) {
      const uint32_t a[4] = {w_pair(g8, 16 * kk + 2 * q4), w_pair(g8 + 8, 16 * kk + 2 * q4),
                             w_pair(g8, 16 * kk + 8 + 2 * q4), w_pair(g8 + 8, 16 * kk + 8 + 2 * q4)};
#pragma unroll
      for (int pair = 0; pair < kDim / 16; ++pair) {
        uint32_t bh[4], bl[4];
        ldsm_b16x16<kSPad>(s_hi + 16 * pair * kSPad + 16 * kk, lane, bh);
        ldsm_b16x16<kSPad>(s_lo + 16 * pair * kSPad + 16 * kk, lane, bl);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          mma_16816(acc[2 * pair + half], a, bh[2 * half], bh[2 * half + 1]);
          mma_16816(acc[2 * pair + half], a, bl[2 * half], bl[2 * half + 1]);
        }
      }
    }
#pragma unroll
    for (int nt = 0; nt < kDim / 8; ++nt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int t = g8 + 8 * half;
        if (t < L) {
          auto* o = reinterpret_cast<__nv_bfloat162*>(out + ((bos + t0 + t) * p.heads + h) * kDim + 8 * nt + 2 * q4);
          const float2 x = __bfloat1622float2(*o);
          *o = __floats2bfloat162_rn(x.x + acc[nt][2 * half], x.y + acc[nt][2 * half + 1]);
        }
      }
    }
  }
}

}  // namespace

int launch_segment_fixup(const KdaPrefillParams& p, cudaStream_t stream) {
  const int G = segment_count(p.segments);
  if (G == 1 || p.num_seqs == 0) return 0;
  KDA_CUDA_TRY(cudaFuncSetAttribute(segment_scan_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kScanSmem));
  segment_scan_kernel<<<static_cast<unsigned>(p.num_seqs * p.heads), kScanThreads, kScanSmem, stream>>>(p);
  KDA_CUDA_TRY(cudaGetLastError());
  KDA_CUDA_TRY(
      cudaFuncSetAttribute(segment_correct_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kCorrectSmem));
  const int64_t ctas = p.num_seqs * p.heads * (G - 1) * kCorrectParts;
  if (ctas > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  segment_correct_kernel<<<static_cast<unsigned>(ctas), 32 * kCorrectWarps, kCorrectSmem, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace kda::prefill

extern "C" int64_t kda_prefill_segment_scratch_bytes(int64_t tokens, int64_t num_seqs, int32_t heads,
                                                     int32_t segments) {
  using namespace kda::prefill;
  const int G = segment_count(segments);
  if (G == 1) return 0;
  return segment_w_bytes(tokens, heads) + num_seqs * heads * 3 * (G - 1) * kDim * kDim * 4;
}
