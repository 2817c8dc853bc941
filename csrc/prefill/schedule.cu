// Pass 0 of the prefill: the per-call schedule, in one CTA, so the host launches nothing else around the two
// passes (each tiny torch op it replaces cost ~2-4 us of GPU time; a sort of the checkpoints was ~8 of them).
//   chunk_offsets [N + 1]  first global chunk of each varlen sequence: exclusive prefix sum of ceil(len / 16)
//   ckpt_offsets  [N + 1]  the checkpoints of sequence n are entries ckpt_offsets[n] .. ckpt_offsets[n + 1] - 1
//   ckpt_seq / ckpt_pos / ckpt_slot [C]  the checkpoints sorted by (sequence, position, input order)
//   seq_order     [N]      varlen sequences longest first: the order pass 2 takes them in
// The sort ranks every entry against all others (C^2 / 1024 comparisons per thread): a prompt checkpoints at
// most once per 64 tokens, so C stays in the hundreds and this is a few microseconds.
#include <cuda_runtime.h>

#include "prefill/device_utils.cuh"
#include "prefill/schedule.cuh"

namespace kda::prefill {
namespace {

constexpr int kScheduleThreads = 1024;
constexpr unsigned kFull = 0xffffffffu;
// Longest-first order only up to this many sequences: one rank per thread against lengths in shared memory
// (~2 us). Beyond it the sequences are many and short, and the order matters little.
constexpr int kMaxOrderedSeqs = kScheduleThreads;

// Inclusive block-wide prefix sum of one value per thread (all threads must call it).
__device__ int64_t block_inclusive_sum(int64_t x, int64_t* warp_sums) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t y = __shfl_up_sync(kFull, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int64_t w = warp_sums[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t y = __shfl_up_sync(kFull, w, o);
      if (lane >= o) w += y;
    }
    warp_sums[lane] = w;
  }
  __syncthreads();
  const int64_t result = x + (warp > 0 ? warp_sums[warp - 1] : 0);
  __syncthreads();  // warp_sums is reused by the next call
  return result;
}

__global__ void __launch_bounds__(kScheduleThreads) schedule_kernel(const KdaPrefillParams p) {
  __shared__ int64_t warp_sums[32];
  __shared__ int64_t lengths[kMaxOrderedSeqs];
  const int tid = threadIdx.x;
  const int64_t N = p.num_seqs;
  if (p.seq_order != nullptr) {  // rank = number of sequences that go before this one (longer, or as long and earlier)
    auto* order = const_cast<int64_t*>(p.seq_order);
    const int64_t len = tid < N ? p.cu_seqlens[tid + 1] - p.cu_seqlens[tid] : 0;
    if (tid < N) lengths[tid] = len;
    __syncthreads();
    if (tid < N) {
      int64_t rank = 0;
      for (int64_t m = 0; m < N; ++m) rank += lengths[m] > len || (lengths[m] == len && m < tid);
      order[rank] = tid;
    }
  }
  if (p.cu_seqlens != nullptr) {
    auto* chunk_offsets = const_cast<int64_t*>(p.chunk_offsets);
    int64_t carry = 0;
    for (int64_t base = 0; base < N; base += kScheduleThreads) {
      const int64_t n = base + tid;
      const int64_t chunks = n < N ? (p.cu_seqlens[n + 1] - p.cu_seqlens[n] + kChunk - 1) / kChunk : 0;
      const int64_t incl = block_inclusive_sum(chunks, warp_sums) + carry;
      if (n < N) chunk_offsets[n + 1] = incl;
      if (tid == kScheduleThreads - 1) warp_sums[0] = incl;  // the running total, for every warp
      __syncthreads();
      carry = warp_sums[0];
      __syncthreads();
    }
    if (tid == 0) chunk_offsets[0] = 0;
  }
  const int64_t C = p.ckpt_count;
  if (C > 0) {
    auto* seq_sorted = const_cast<int64_t*>(p.ckpt_seq);
    auto* pos_sorted = const_cast<int64_t*>(p.ckpt_pos);
    auto* slot_sorted = const_cast<int64_t*>(p.ckpt_slot);
    for (int64_t i = tid; i < C; i += kScheduleThreads) {
      const int64_t si = p.ckpt_seq_in[i], pi = p.ckpt_pos_in[i];
      int64_t rank = 0;
      for (int64_t j = 0; j < C; ++j) {
        const int64_t sj = p.ckpt_seq_in[j], pj = p.ckpt_pos_in[j];
        rank += sj < si || (sj == si && (pj < pi || (pj == pi && j < i)));
      }
      seq_sorted[rank] = si;
      pos_sorted[rank] = pi;
      slot_sorted[rank] = p.ckpt_slot_in[i];
    }
    __syncthreads();  // the sorted sequence ids are visible to the whole CTA
    auto* ckpt_offsets = const_cast<int64_t*>(p.ckpt_offsets);
    for (int64_t n = tid; n <= N; n += kScheduleThreads) {  // first entry of sequence >= n
      int64_t lo = 0, hi = C;
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (seq_sorted[mid] < n) lo = mid + 1; else hi = mid;
      }
      ckpt_offsets[n] = lo;
    }
  }
}

}  // namespace

int64_t schedule_words(int64_t num_seqs, int64_t ckpt_count) {
  return 2 * (num_seqs + 1) + 3 * ckpt_count + num_seqs;
}

int launch_schedule(KdaPrefillParams& p, cudaStream_t stream) {
  const bool varlen = p.cu_seqlens != nullptr;
  if (!varlen && p.ckpt_count == 0) {
    p.chunk_offsets = p.ckpt_offsets = p.ckpt_seq = p.ckpt_pos = p.ckpt_slot = p.seq_order = nullptr;
    return 0;
  }
  if (p.schedule == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t N = p.num_seqs, C = p.ckpt_count;
  int64_t* s = p.schedule;
  p.chunk_offsets = varlen ? s : nullptr;
  p.ckpt_offsets = C > 0 ? s + (N + 1) : nullptr;
  p.ckpt_seq = C > 0 ? s + 2 * (N + 1) : nullptr;
  p.ckpt_pos = C > 0 ? p.ckpt_seq + C : nullptr;
  p.ckpt_slot = C > 0 ? p.ckpt_pos + C : nullptr;
  p.seq_order = varlen && N > 1 && N <= kMaxOrderedSeqs ? s + 2 * (N + 1) + 3 * C : nullptr;
  schedule_kernel<<<1, kScheduleThreads, 0, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace kda::prefill

extern "C" int64_t kda_prefill_schedule_words(int64_t num_seqs, int64_t ckpt_count) {
  return kda::prefill::schedule_words(num_seqs, ckpt_count);
}
