// A MoE layer's routing on the GPU, the part of a decode step around the experts' products
// (kda_serving/ops/moe_routing.py through ops/cuda_moe_routing.py; docs/moe-routing.md):
//
//   router_logits  x [T, hidden] bf16, router [E, hidden] bf16 -> logits [T, E] fp32
//   router_topk    logits [T, E] fp32, bias [E] fp32          -> ids [T, k] int64, weights [T, k] fp32
//   sort_pairs     ids [T * k] int64                           -> row_token, pair_row [T * k], ends [E] int32
//
// Why: in torch the router was an fp32 GEMV, a radix top-k and four fused elementwise kernels, 16 us per
// Kimi-Linear-48B layer at one token of which the weights' reading is under 1; and the grouped GEMMs' sort of
// the (token, expert) pairs by expert seven more kernels, 40 us per layer at 64 tokens (a 512-key radix sort
// alone took 27). Here the router is two small kernels and the sort one. None allocates or synchronises:
// CUDA-graph capturable.
//
// router_logits: fp32 dot products of bf16 rows (each product exact in fp32, as torch's F.linear on the rows
// cast to fp32 forms them), a warp per expert over a tile of 1, 2, 4 or 8 tokens held in shared memory.
// router_topk (module doc of ops/moe_routing.py for the formula): a warp per token; s = sigmoid(logit), choice =
// s + bias; with groups, keep the topk_group groups of the best top-2 choice sums; then the k best choices,
// in decreasing order, ties to the lower expert id, a NaN choice ranked as -inf (ids are always k distinct
// experts in [0, E)); weights s[id], renormalised by their sum + 1e-20 if asked, times `scaling`.
// sort_pairs: a stable counting sort of pair p = t * k + j by ids[p] in one CTA: row_token[r] = the token of
// the pair at sorted row r, pair_row[p] = the row of pair p, ends[e] = the end of expert e's rows. Equal to
// torch's stable argsort, bit for bit. An id outside [0, E) sorts after every expert's rows (past ends[E-1]).
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/cuda_check.h"
#include "common/packed.cuh"

namespace kda_serving::moe_route {
namespace {

constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFull, v, offset);
  return v;
}

// ---------------------------------------------------------------------------------------------- router logits

constexpr int kLogitsThreads = 256;
constexpr int kLogitsWarps = kLogitsThreads / 32;  // one expert each
constexpr int kMaxTileTokens = 8;                   // tokens per CTA: each router row read once per tile
constexpr int kMaxHidden = 8192;                    // the tile's rows in shared memory: 128 KB
constexpr int kRowBatch = 12;   // 16-byte loads of its router row a lane has in flight: a 2,304-wide row at once
constexpr int kTileBatch = 9;   // and of the tile: 8 rows of 2,304 in one round

struct LogitsParams {
  const __nv_bfloat16* x;  // [tokens, hidden] at x_row_stride
  int64_t x_row_stride;
  const __nv_bfloat16* router;  // [experts, hidden]
  float* logits;                // [tokens, experts]
  int tokens, experts, hidden;
};

// A decode step's router is DRAM latency, not bandwidth (1.2 MB for 48B's): every load a lane makes is issued
// before its first use, the row's first batch even before the tile's barrier. kTokens (1, 2, 4 or 8) sizes the
// tile, so a one-token step runs no code for the seven tokens it lacks: each instruction of a kernel this short
// runs once, and an unrolled body for 8 tokens was mostly instruction-cache misses.
template <int kTokens>
__global__ void __launch_bounds__(kLogitsThreads) router_logits_kernel(LogitsParams p) {
  extern __shared__ uint4 tile[];  // [kTokens][hidden / 8] groups of 8 bf16
  const int vecs = p.hidden / 8;
  const int lane = threadIdx.x % 32;
  const int e = blockIdx.x * kLogitsWarps + threadIdx.x / 32;
  const bool has_expert = e < p.experts;
  const uint4* row = reinterpret_cast<const uint4*>(p.router + static_cast<int64_t>(has_expert ? e : 0) * p.hidden);
  uint4 w[kRowBatch];
#pragma unroll
  for (int u = 0; u < kRowBatch; ++u) {
    const int v = lane + 32 * u;
    if (has_expert && v < vecs) w[u] = row[v];
  }
  const int t0 = blockIdx.y * kTokens;
  const int nt = min(kTokens, p.tokens - t0);
  for (int i0 = threadIdx.x; i0 < nt * vecs; i0 += kLogitsThreads * kTileBatch) {
    uint4 x[kTileBatch];
#pragma unroll
    for (int u = 0; u < kTileBatch; ++u) {
      const int i = i0 + u * kLogitsThreads;
      if (i < nt * vecs) {
        const int t = i / vecs;
        x[u] = reinterpret_cast<const uint4*>(p.x + (t0 + t) * p.x_row_stride)[i - t * vecs];
      }
    }
#pragma unroll
    for (int u = 0; u < kTileBatch; ++u)
      if (i0 + u * kLogitsThreads < nt * vecs) tile[i0 + u * kLogitsThreads] = x[u];
  }
  __syncthreads();
  if (!has_expert) return;
  float acc[kTokens] = {};
  for (int v0 = 0; v0 < vecs; v0 += 32 * kRowBatch) {
    if (v0 > 0) {  // rows wider than one batch
#pragma unroll
      for (int u = 0; u < kRowBatch; ++u)
        if (v0 + lane + 32 * u < vecs) w[u] = row[v0 + lane + 32 * u];
    }
#pragma unroll
    for (int u = 0; u < kRowBatch; ++u) {
      const int v = v0 + lane + 32 * u;
      if (v >= vecs) break;
      float wf[8];
      unpack_bf16x8(w[u], wf);
#pragma unroll
      for (int t = 0; t < kTokens; ++t) {
        if (t < nt) {
          float xf[8];
          unpack_bf16x8(tile[t * vecs + v], xf);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[t] = fmaf(wf[i], xf[i], acc[t]);
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kTokens; ++t) {
    const float sum = warp_sum(acc[t]);
    if (lane == t && t < nt) p.logits[static_cast<int64_t>(t0 + t) * p.experts + e] = sum;
  }
}

template <int kTokens>
cudaError_t launch_logits(const LogitsParams& p, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(kTokens) * p.hidden * sizeof(__nv_bfloat16);
  if (smem > 48 * 1024) {
    const cudaError_t err = kda::allow_dynamic_smem<router_logits_kernel<kTokens>>(kTokens * kMaxHidden * 2);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid((p.experts + kLogitsWarps - 1) / kLogitsWarps, (p.tokens + kTokens - 1) / kTokens);
  if (grid.y > 65535) return cudaErrorInvalidValue;
  router_logits_kernel<kTokens><<<grid, kLogitsThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------------ router top-k

constexpr int kTopkThreads = 128;
constexpr int kTopkWarps = kTopkThreads / 32;  // one token each
constexpr int kMaxExperts = 1024;              // 32 per lane: a bit each in a lane's `taken` mask
constexpr int kPerLane = kMaxExperts / 32;
constexpr int kMaxGroups = 32;                 // a lane each
constexpr int kMaxTopK = 32;                   // a lane each

struct TopkParams {
  const float* logits;  // [tokens, experts]
  const float* bias;    // [experts]
  int64_t* ids;         // [tokens, top_k]
  float* weights;       // [tokens, top_k]
  int tokens, experts, top_k, groups, topk_group, renormalize;
  float scaling;
};

// IEEE steps but the exponential (the library compiles with fast math: expf is within a few ulps), so a score
// is torch's fp32 sigmoid to a few ulps.
__device__ __forceinline__ float sigmoid(float x) { return __frcp_rn(__fadd_rn(1.0f, expf(-x))); }

// A float's bits as an unsigned key in the same order (NaN excluded), -inf's above 0, which stands for no
// candidate.
__device__ __forceinline__ unsigned order_key(float v) {
  const unsigned b = __float_as_uint(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The warp's best candidate (key, id): the largest key, on a tie the smallest id. Two warp reductions
// (redux.sync), not a five-step butterfly of shuffles and compares: in a top-k of 8 they are the critical path.
// Some lane must hold a candidate (key > 0).
__device__ __forceinline__ int warp_argmax(unsigned key, int id) {
  const unsigned top = __reduce_max_sync(kFull, key);
  return static_cast<int>(__reduce_min_sync(kFull, key == top ? static_cast<unsigned>(id) : 0xffffffffu));
}

__device__ __forceinline__ float not_nan(float v) { return v != v ? -INFINITY : v; }

// A warp per token, its choices in registers (expert lane + 32 i in slot i of kPer): a decode step's top-k is a
// chain of latencies (k warp-wide argmaxes), so no step of it waits on memory.
template <int kPer>
__global__ void __launch_bounds__(kTopkThreads) router_topk_kernel(TopkParams p) {
  __shared__ float group_choices[kTopkWarps][kMaxExperts];  // only with groups: lane g scans group g
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int t = blockIdx.x * kTopkWarps + warp;
  if (t >= p.tokens) return;  // whole warps: no CTA-wide barrier below
  const int E = p.experts;
  const float* logits = p.logits + static_cast<int64_t>(t) * E;
  float score[kPer], choice[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {  // every load in flight at once
    const int e = lane + 32 * i;
    score[i] = e < E ? logits[e] : 0.0f;
    choice[i] = e < E ? p.bias[e] : 0.0f;
  }
  uint32_t taken = 0;  // bit i: slot i chosen, or no candidate (past E, or in a dropped group)
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    score[i] = sigmoid(score[i]);
    choice[i] = not_nan(__fadd_rn(score[i], choice[i]));
    if (lane + 32 * i >= E) taken |= 1u << i;
  }

  if (p.groups > 1) {  // lane g scores group g by its two best choices; the topk_group best groups are kept
    float* shared_choice = group_choices[warp];
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (lane + 32 * i < E) shared_choice[lane + 32 * i] = choice[i];
    __syncwarp();
    const int per_group = E / p.groups;
    unsigned group_key = 0;
    if (lane < p.groups) {
      float first = -INFINITY, second = -INFINITY;
      for (int e = lane * per_group; e < (lane + 1) * per_group; ++e) {
        const float c = shared_choice[e];
        if (c > first) second = first, first = c;
        else if (c > second) second = c;
      }
      group_key = order_key(not_nan(__fadd_rn(first, second)));
    }
    uint32_t kept = 0;
    for (int r = 0; r < p.topk_group; ++r) {
      const int g = warp_argmax((kept >> lane) & 1u ? 0u : group_key, lane);
      kept |= 1u << g;
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (!((kept >> ((lane + 32 * i) / per_group)) & 1u)) taken |= 1u << i;
  }

  // The k best choices, one warp-wide argmax each; lane j keeps the j-th and its score.
  int mine = 0;
  float w = 0.0f;
  for (int j = 0; j < p.top_k; ++j) {
    unsigned best = 0;
    int at = -1;
    float at_score = 0.0f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {  // in increasing id: a strictly larger key keeps the smaller id on ties
      const unsigned key = (taken >> i) & 1u ? 0u : order_key(choice[i]);
      if (key > best) best = key, at = lane + 32 * i, at_score = score[i];
    }
    const int winner = warp_argmax(best, at);
    if (at == winner) taken |= 1u << (winner >> 5);
    const float winner_score = __shfl_sync(kFull, at_score, winner & 31);
    if (lane == j) mine = winner, w = winner_score;
  }
  if (p.renormalize) w = __fdiv_rn(w, __fadd_rn(warp_sum(w), 1e-20f));
  w = __fmul_rn(w, p.scaling);
  if (lane < p.top_k) {
    p.ids[static_cast<int64_t>(t) * p.top_k + lane] = mine;
    p.weights[static_cast<int64_t>(t) * p.top_k + lane] = w;
  }
}

// -------------------------------------------------------------------------------------------------- pair sort

constexpr int kSortThreads = 1024;
constexpr int kSortWarps = kSortThreads / 32;

struct SortParams {
  const int64_t* ids;  // [pairs]
  int32_t* row_token;  // [pairs]
  int32_t* pair_row;   // [pairs]
  int32_t* ends;       // [experts]
  int pairs, top_k, experts;
};

// Shared memory: next[buckets] (counts, then each bucket's next free row) and per-warp counts of the chunk
// [kSortWarps][buckets]; bucket E holds the ids outside [0, E).
inline size_t sort_smem_bytes(int experts) {
  return static_cast<size_t>(kSortWarps + 1) * (experts + 1) * sizeof(int);
}

__global__ void __launch_bounds__(kSortThreads) sort_pairs_kernel(SortParams p) {
  extern __shared__ int smem[];
  const int buckets = p.experts + 1;
  int* next = smem;
  int* warp_count = smem + buckets;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  auto bucket = [&](int q) {
    const int64_t e = p.ids[q];
    return e >= 0 && e < p.experts ? static_cast<int>(e) : p.experts;
  };
  for (int i = tid; i < (kSortWarps + 1) * buckets; i += kSortThreads) smem[i] = 0;
  __syncthreads();
  for (int q = tid; q < p.pairs; q += kSortThreads) atomicAdd(&next[bucket(q)], 1);
  __syncthreads();
  if (warp == 0) {  // exclusive scan of the counts: each bucket's first row; ends[e] its last + 1
    const int per = (buckets + 31) / 32;
    const int lo = min(lane * per, buckets), hi = min(lo + per, buckets);
    int local = 0;
    for (int b = lo; b < hi; ++b) local += next[b];
    int inclusive = local;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int other = __shfl_up_sync(kFull, inclusive, offset);
      if (lane >= offset) inclusive += other;
    }
    int run = inclusive - local;
    for (int b = lo; b < hi; ++b) {
      const int count = next[b];
      next[b] = run;
      run += count;
      if (b < p.experts) p.ends[b] = run;
    }
  }
  __syncthreads();
  // Chunks of kSortThreads pairs in order; within one, a pair's row is its bucket's next row + the pairs of the
  // same bucket in earlier warps + those in earlier lanes of its own warp: stable.
  for (int base = 0; base < p.pairs; base += kSortThreads) {
    const int q = base + tid;
    const bool valid = q < p.pairs;
    const int b = valid ? bucket(q) : -1;
    const unsigned peers = __match_any_sync(kFull, b);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    if (valid && rank == 0) warp_count[warp * buckets + b] = __popc(peers);
    __syncthreads();
    for (int bb = tid; bb < buckets; bb += kSortThreads) {  // counts -> each warp's first row, in warp order
      int run = next[bb];
      for (int w = 0; w < kSortWarps; ++w) {
        const int count = warp_count[w * buckets + bb];
        if (count) warp_count[w * buckets + bb] = run, run += count;  // untouched entries stay 0
      }
      next[bb] = run;
    }
    __syncthreads();
    if (valid) {
      const int row = warp_count[warp * buckets + b] + rank;
      p.pair_row[q] = row;
      p.row_token[row] = q / p.top_k;
    }
    __syncthreads();
    if (valid && rank == 0) warp_count[warp * buckets + b] = 0;
    __syncthreads();
  }
}

}  // namespace
}  // namespace kda_serving::moe_route

using namespace kda_serving::moe_route;

extern "C" {

// logits [tokens, experts] fp32 = x [tokens, hidden] bf16 (rows at x_row_stride, 16-byte aligned) . router
// [experts, hidden] bf16 (dense, 16-byte aligned), fp32 products and sums. hidden a multiple of 8, at most
// 8,192. Returns a cudaError_t.
int kda_serving_moe_router_logits(const void* x, int64_t x_row_stride, const void* router, int tokens,
                                  int experts, int hidden, float* logits, void* stream) {
  const bool valid = tokens >= 0 && experts >= 1 && hidden >= 8 && hidden % 8 == 0 && hidden <= kMaxHidden &&
                     x_row_stride >= hidden && x_row_stride % 8 == 0;
  if (!valid) return static_cast<int>(cudaErrorInvalidValue);
  if (tokens == 0) return static_cast<int>(cudaSuccess);
  const LogitsParams p{static_cast<const __nv_bfloat16*>(x), x_row_stride,
                       static_cast<const __nv_bfloat16*>(router), logits, tokens, experts, hidden};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const cudaError_t err = tokens == 1   ? launch_logits<1>(p, s)
                          : tokens == 2 ? launch_logits<2>(p, s)
                          : tokens <= 4 ? launch_logits<4>(p, s)
                                        : launch_logits<kMaxTileTokens>(p, s);
  return static_cast<int>(err);
}

// ids [tokens, top_k] int64 and weights [tokens, top_k] fp32 from logits [tokens, experts] fp32 and bias
// [experts] fp32 (the formula above). experts <= 1,024, top_k <= 32, groups <= 32 dividing experts,
// topk_group <= groups, top_k <= topk_group * experts / groups. Returns a cudaError_t.
int kda_serving_moe_router_topk(const float* logits, const float* bias, int tokens, int experts, int top_k,
                                int groups, int topk_group, int renormalize, float scaling, int64_t* ids,
                                float* weights, void* stream) {
  const bool valid = tokens >= 0 && experts >= 1 && experts <= kMaxExperts && top_k >= 1 && top_k <= kMaxTopK &&
                     groups >= 1 && groups <= kMaxGroups && experts % groups == 0 && topk_group >= 1 &&
                     topk_group <= groups && top_k <= topk_group * (experts / groups);
  if (!valid) return static_cast<int>(cudaErrorInvalidValue);
  if (tokens == 0) return static_cast<int>(cudaSuccess);
  const TopkParams p{logits, bias, ids, weights, tokens, experts, top_k, groups, topk_group, renormalize, scaling};
  const unsigned grid = (tokens + kTopkWarps - 1) / kTopkWarps;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (experts <= 256)
    router_topk_kernel<8><<<grid, kTopkThreads, 0, s>>>(p);
  else if (experts <= 512)
    router_topk_kernel<16><<<grid, kTopkThreads, 0, s>>>(p);
  else
    router_topk_kernel<kPerLane><<<grid, kTopkThreads, 0, s>>>(p);
  return static_cast<int>(cudaGetLastError());
}

// The stable sort by expert of pairs ids [pairs] int64 (pair p = token * top_k + j): row_token [pairs],
// pair_row [pairs] and ends [experts], int32 (the formula above). experts <= 1,024. Returns a cudaError_t.
int kda_serving_moe_sort_pairs(const int64_t* ids, int pairs, int top_k, int experts, int32_t* row_token,
                               int32_t* pair_row, int32_t* ends, void* stream) {
  const bool valid = pairs >= 0 && top_k >= 1 && experts >= 1 && experts <= kMaxExperts;
  if (!valid) return static_cast<int>(cudaErrorInvalidValue);
  const size_t smem = sort_smem_bytes(experts);
  if (smem > 48 * 1024) KDA_CUDA_TRY(kda::allow_dynamic_smem<sort_pairs_kernel>(sort_smem_bytes(kMaxExperts)));
  const SortParams p{ids, row_token, pair_row, ends, pairs, top_k, experts};
  // one CTA even for no pairs: ends is still written (all zero)
  sort_pairs_kernel<<<1, kSortThreads, smem, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
