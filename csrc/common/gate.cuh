// The contract's gate activation (docs/kda-contract.md), shared by the prefill and decode kernels: the
// per-channel log-decay a <= 0 from x = g + dt_bias, in its two forms
//   lower_bound form: a = lower_bound * sigmoid(rate * x)
//   softplus form:    a = -rate * softplus(x)          (Kimi-Linear-48B; unbounded: a can be -1e4)
// with rate = exp(A_log). Both are branch-free (MUFU exp / log and selects), so a kernel that evaluates
// them for a tile of channels issues no per-element control flow.
#pragma once

namespace kda {

// Also the decode's beta and the output gate of the gated norm (csrc/norm). x = -100: exp overflows to inf
// and the result is exactly 0, never NaN.
__device__ __forceinline__ float sigmoid_fast(float x) { return 1.f / (1.f + __expf(-x)); }

// softplus(x) = max(x, 0) + log(1 + exp(-|x|)): the exponential is of a non-positive number, so nothing
// overflows, and above x ~ 17 the log term rounds away (softplus(x) == x in fp32). Absolute error ~1e-7
// (__logf near 1), i.e. a relative error of rate * 1e-7 in the decay factor exp(a).
__device__ __forceinline__ float softplus_fast(float x) {
  return fmaxf(x, 0.f) + __logf(1.f + __expf(-fabsf(x)));
}

// For one evaluation per channel (the decode's token prep). DecayFactor below is the same gate with its
// constants folded for many tokens per channel (prefill pass 1); the decode's prep on DecayFactor measured
// 2.66 vs 2.62 us per N = 1 step (H100), since there the folding is not amortised.
__device__ __forceinline__ float log_decay(float x, float rate, float lower_bound, bool use_lower_bound) {
  return use_lower_bound ? lower_bound * sigmoid_fast(rate * x) : -rate * softplus_fast(x);
}

// exp(a) for one channel over many tokens, the per-(head, channel) constants folded once, so each element is
// a fused multiply-add and three MUFU ops (lower_bound form: 6 instructions instead of 9 for
// __expf(log_decay(...))). Same values up to fp32 rounding: exp(lower_bound * s) = 2^(lower_bound log2(e) s),
// and log2(e) * softplus(x) = log2(e) max(x, 0) + log2(1 + 2^(-log2(e) |x|)).
template <bool kLowerBound>
struct DecayFactor {
  static constexpr float kLog2e = 1.4426950408889634f;
  float mul, add, out;   // lower_bound form: s = 1 / (1 + 2^(mul g + add)), exp(a) = 2^(out s)
  // softplus form (with mul): x = g + bias, exp(a) = 2^(mul max(x, 0) + neg_rate log2(1 + 2^(-log2(e) |x|)))
  float bias, neg_rate;
  __device__ __forceinline__ DecayFactor(float rate, float dt_bias, float lower_bound) {
    mul = -rate * kLog2e;
    add = mul * dt_bias;
    out = lower_bound * kLog2e;
    bias = dt_bias;
    neg_rate = -rate;
  }
  __device__ __forceinline__ float operator()(float g) const {
    if constexpr (kLowerBound) {
      return exp2f(out / (1.f + exp2f(fmaf(mul, g, add))));
    } else {
      const float x = g + bias;
      return exp2f(fmaf(mul, fmaxf(x, 0.f), neg_rate * __log2f(1.f + exp2f(-kLog2e * fabsf(x)))));
    }
  }
};

}  // namespace kda
