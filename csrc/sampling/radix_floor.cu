// Each row's sampling floor by a radix search, for the top-k and top-p cuts of the sampler (called through ctypes
// by kda_serving/ops/cuda_sampling.py; the PyTorch twin is kda_serving/ops/sampling.py radix_floor_torch).
//
// A row of floats x and a target: the floor is the largest value v such that the weight of the row's entries
// >= v reaches the target. Counting each entry once (weight 1, target k) v is the k-th largest value; weighing
// each probability by its mass in fixed point (units of 2^-50, truncated; target ceil(top_p * 2^50)) v is the
// probability of the token with which the sorted mass first reaches top_p. Integer weights make the sums exact
// in any order, so the atomics below give the same floor on every run and the same as PyTorch.
//
// Floats map to 32-bit keys that order as the values do (non-negative floats: their bits; any float: the sign
// bit flipped for positives, every bit for negatives). The key is fixed 11, 11 and 10 bits at a time, one
// kernel launch per level: each CTA builds a histogram of the weight of its slice of a row by the next digit
// (among the entries matching the digits fixed so far) in shared memory and stores it; the row's last CTA to
// finish sums the slices' histograms, and a suffix scan picks the largest digit whose weight, with everything
// above it, still reaches the target. Three passes over the rows (from L2 after the first, for rows that fit
// there) replace a sort of every row.
//
// What bounds it is the shared-memory atomics, a few per entry and level (H100: one CTA took about 0.11 ms for
// a 163,840-entry row), so a row is split among several CTAs when the rows alone would leave SMs idle. (CTA
// clusters sharing their histograms through distributed shared memory were tried first: a cluster of 8 took
// 0.22 ms however little each CTA read.) No allocation, no synchronisation with the host: the launches can be
// captured in a CUDA graph.
#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

namespace kda_serving::sampling {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 8;   // loads in flight per thread
constexpr int kBins = 2048;  // the widest digit, 11 bits
constexpr int kBinsPerThread = kBins / kThreads;
constexpr int kLevels = 3;   // digits of 11, 11 and 10 bits (kda_serving/ops/sampling.py DIGIT_BITS)
constexpr float kMassOne = 0x1p50f;  // kda_serving/ops/sampling.py MASS_ONE
// Histogram words hold 14-bit pieces of the weights (Hist): 4 pieces cover a run's weight (a row's whole mass is
// about 2^50, a count at most kMaxSlice), and kMaxSlice adds of pieces below 2^14 stay below 2^32.
constexpr int kPieceBits = 14;
constexpr int kPieces = 4;
constexpr int64_t kMaxSlice = int64_t{1} << 18;  // entries of a row per CTA
constexpr int kMaxParts = 1024;

struct RadixFloorParams {
  const float* x;
  int64_t row_stride;  // elements
  int64_t vocab;
  const int64_t* target;         // [rows], >= 1
  float* out;                    // [rows]
  unsigned long long* slices;    // [rows, parts, kBins] scratch: each CTA's histogram
  unsigned long long* state;     // [rows, 2] scratch: the digits fixed so far, the weight above them
  unsigned int* arrived;         // [rows], zero before the first level; each level leaves it zero
  int parts;                     // CTAs per row
};

template <bool kByMass>
__device__ __forceinline__ uint32_t key_of(float v) {
  const uint32_t u = __float_as_uint(v);
  if constexpr (kByMass) return u;  // probabilities are >= 0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <bool kByMass>
__device__ __forceinline__ float value_of(uint32_t key) {
  if constexpr (kByMass) return __uint_as_float(key);
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

template <bool kByMass>
__device__ __forceinline__ unsigned long long weight_of(float v) {
  if constexpr (kByMass) return static_cast<unsigned long long>(__float2ll_rz(v * kMassOne));  // torch's .long()
  return 1ull;
}

// A histogram of weights, each bin in 14-bit pieces (kPieces words, 14 bits apart). Adding a weight adds each
// nonzero piece to its word with a 32-bit shared atomic whose result is not read, so no thread waits on a round
// trip (a carry from a low word into a high one would need the old value back). A word sums pieces below 2^14
// of at most kMaxSlice adds, so it cannot wrap; the bin's weight is exact, whatever the order.
struct Hist {
  uint32_t piece[kPieces][kBins];

  __device__ __forceinline__ unsigned long long bin(int d) const {
    unsigned long long total = 0;
#pragma unroll
    for (int k = 0; k < kPieces; ++k) total += static_cast<unsigned long long>(piece[k][d]) << (kPieceBits * k);
    return total;
  }
  __device__ __forceinline__ void add(uint32_t d, unsigned long long w) {
#pragma unroll
    for (int k = 0; k < kPieces; ++k) {
      const uint32_t part = static_cast<uint32_t>(w >> (kPieceBits * k)) & ((1u << kPieceBits) - 1);
      if (part) atomicAdd(&piece[k][d], part);
    }
  }
  __device__ __forceinline__ void clear(int tid) {
    for (int i = tid; i < kPieces * kBins; i += kThreads) (&piece[0][0])[i] = 0;
  }
};

template <typename F>
__device__ __forceinline__ void for_each_value(float v, F& f) {
  f(v);
}
template <typename F>
__device__ __forceinline__ void for_each_value(const float4& v, F& f) {
  f(v.x);
  f(v.y);
  f(v.z);
  f(v.w);
}

// Adds the weights of one thread's entries to the histogram. Entries come in runs of one bin (the long tail of
// a peaked row, or a flat row, lands in few bins), so a thread sums a run before adding it: a warp's lanes
// hitting one shared address at once would be served one at a time.
struct RunAdder {
  Hist& hist;
  uint32_t bin = 0xffffffffu;
  unsigned long long weight = 0;

  __device__ __forceinline__ void add(uint32_t b, unsigned long long w) {
    if (b != bin) {
      if (weight) hist.add(bin, weight);
      bin = b;
      weight = 0;
    }
    weight += w;
  }
  __device__ __forceinline__ void flush() {
    if (weight) hist.add(bin, weight);
  }
};

// One level of the search: grid (parts, rows). kLevel 0 fixes key bits 31..21, 1 bits 20..10, 2 bits 9..0.
template <bool kByMass, bool kVec4, int kLevel>
__global__ void __launch_bounds__(kThreads, 1) radix_floor_level_kernel(const RadixFloorParams p) {
  constexpr int kFixed = 11 * kLevel;  // bits fixed by the levels before
  constexpr int kBits = kLevel < kLevels - 1 ? 11 : 10;
  constexpr int kShift = 32 - kFixed - kBits;
  constexpr uint32_t kDigitMask = (1u << kBits) - 1;
  __shared__ Hist hist;
  __shared__ unsigned long long warp_total[kWarps];
  __shared__ uint32_t chosen_digit;
  __shared__ unsigned long long chosen_above;
  __shared__ bool finishes_row;

  const int part = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t row = blockIdx.y;
  const float* x = p.x + row * p.row_stride;
  const uint32_t prefix = kLevel == 0 ? 0u : static_cast<uint32_t>(p.state[2 * row]);
  // This CTA's slice of the row, in float4s (kVec4) or floats
  const int64_t units = kVec4 ? p.vocab / 4 : p.vocab;
  const int64_t per_part = (units + p.parts - 1) / p.parts;
  const int64_t begin = part * per_part, end = begin + per_part < units ? begin + per_part : units;

  hist.clear(tid);
  __syncthreads();
  RunAdder run{hist};
  auto visit = [&](float v) {
    const uint32_t key = key_of<kByMass>(v);
    if constexpr (kLevel > 0) {
      if ((key >> (kShift + kBits)) != prefix) return;
    }
    run.add((key >> kShift) & kDigitMask, weight_of<kByMass>(v));
  };
  using Unit = std::conditional_t<kVec4, float4, float>;  // what one load reads
  const Unit* units_x = reinterpret_cast<const Unit*>(x);
  for (int64_t i = begin + tid; i < end; i += kThreads * kUnroll) {
    Unit v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u * kThreads < end) v[u] = __ldg(units_x + i + u * kThreads);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u * kThreads < end) for_each_value(v[u], visit);
    }
  }
  run.flush();
  __syncthreads();

  // Publish this slice's histogram; the row's last CTA to arrive goes on (the threadFenceReduction pattern).
  unsigned long long* slices = p.slices + row * p.parts * kBins;
  for (int b = tid; b < kBins; b += kThreads) slices[part * kBins + b] = hist.bin(b);
  __threadfence();
  __syncthreads();
  if (tid == 0) finishes_row = atomicAdd(&p.arrived[row], 1u) == static_cast<unsigned>(p.parts - 1);
  __syncthreads();
  if (!finishes_row) return;
  __threadfence();

  // The row's histogram: thread t sums bins 4t .. 4t + 3 over the slices (from L2: __ldcg skips L1).
  unsigned long long h[kBinsPerThread] = {};
  for (int r = 0; r < p.parts; ++r) {
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) h[j] += __ldcg(slices + r * kBins + kBinsPerThread * tid + j);
  }
  // reach[d] = above + weight of the bins >= d, falling with d: suffix sums over lanes, then over warps.
  unsigned long long mine = 0;
#pragma unroll
  for (int j = 0; j < kBinsPerThread; ++j) mine += h[j];
  unsigned long long from_lane = mine;  // this lane's bins and the later lanes'
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long later = __shfl_down_sync(0xffffffffu, from_lane, o);
    if (lane + o < 32) from_lane += later;
  }
  if (lane == 0) warp_total[warp] = from_lane;
  __syncthreads();
  const unsigned long long above = kLevel == 0 ? 0ull : p.state[2 * row + 1];
  unsigned long long reach_next = above + (from_lane - mine);  // reach[d + 1] for this thread's last bin d
  for (int w = warp + 1; w < kWarps; ++w) reach_next += warp_total[w];
  // The largest d with reach[d] >= target (bins past 1 << kBits are empty: their reach is `above`, below the
  // target). None (a target over the row's whole weight): bin 0, as PyTorch's clamp does.
  const unsigned long long target = static_cast<unsigned long long>(p.target[row]);
#pragma unroll
  for (int j = kBinsPerThread - 1; j >= 0; --j) {
    const int d = kBinsPerThread * tid + j;
    const unsigned long long reach = reach_next + h[j];
    if (d <= static_cast<int>(kDigitMask) && reach >= target &&
        (d == static_cast<int>(kDigitMask) || reach_next < target)) {
      chosen_digit = d;
      chosen_above = reach_next;
    }
    if (d == 0 && reach < target) {
      chosen_digit = 0;
      chosen_above = reach_next;
    }
    reach_next = reach;
  }
  __syncthreads();
  if (tid == 0) {
    const uint32_t fixed = (prefix << kBits) | chosen_digit;
    p.state[2 * row] = fixed;
    p.state[2 * row + 1] = chosen_above;
    p.arrived[row] = 0;  // ready for the next level
    if constexpr (kLevel == kLevels - 1) p.out[row] = value_of<kByMass>(fixed);
  }
}

template <bool kByMass, bool kVec4>
cudaError_t launch_levels(const RadixFloorParams& p, int64_t rows, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>(p.parts), static_cast<unsigned>(rows));
  radix_floor_level_kernel<kByMass, kVec4, 0><<<grid, kThreads, 0, s>>>(p);
  radix_floor_level_kernel<kByMass, kVec4, 1><<<grid, kThreads, 0, s>>>(p);
  radix_floor_level_kernel<kByMass, kVec4, 2><<<grid, kThreads, 0, s>>>(p);
  return cudaGetLastError();
}

template <bool kByMass>
cudaError_t launch(const RadixFloorParams& p, int64_t rows, cudaStream_t s) {
  const bool vec4 = p.vocab % 4 == 0 && p.row_stride % 4 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
  return vec4 ? launch_levels<kByMass, true>(p, rows, s) : launch_levels<kByMass, false>(p, rows, s);
}

}  // namespace
}  // namespace kda_serving::sampling

using namespace kda_serving::sampling;

extern "C" {

// x [rows, vocab] fp32 at row_stride elements; target [rows] int64 (each >= 1); out [rows] fp32; by_mass: x holds
// probabilities (>= 0) weighed by their mass, else every entry counts 1. parts: CTAs per row, with at most 2^18
// entries each. Scratch: slices [rows * parts * 2048] uint64, state [rows * 2] uint64, arrived [rows] uint32
// zeroed. Returns a cudaError_t.
int kda_serving_radix_floor(const void* x, int64_t row_stride, int64_t rows, int64_t vocab, const void* target,
                            int by_mass, void* out, int parts, void* slices, void* state, void* arrived,
                            void* stream) {
  const bool valid = rows >= 0 && rows <= 65535 && vocab >= 1 && row_stride >= vocab && parts >= 1 &&
                     parts <= kMaxParts && (vocab + parts - 1) / parts <= kMaxSlice;
  if (!valid) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0) return static_cast<int>(cudaSuccess);
  RadixFloorParams p{};
  p.x = static_cast<const float*>(x);
  p.row_stride = row_stride;
  p.vocab = vocab;
  p.target = static_cast<const int64_t*>(target);
  p.out = static_cast<float*>(out);
  p.slices = static_cast<unsigned long long*>(slices);
  p.state = static_cast<unsigned long long*>(state);
  p.arrived = static_cast<unsigned int*>(arrived);
  p.parts = parts;
  const auto s = static_cast<cudaStream_t>(stream);
  return static_cast<int>(by_mass ? launch<true>(p, rows, s) : launch<false>(p, rows, s));
}

}  // extern "C"
