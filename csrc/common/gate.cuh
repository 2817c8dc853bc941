// The contract's gate activation (docs/kda-contract.md), shared by the prefill and decode kernels: the
// per-channel log-decay a <= 0 from x = g + dt_bias, in its two forms
//   lower_bound form: a = lower_bound * sigmoid(rate * x)
//   softplus form:    a = -rate * softplus(x)          (Kimi-Linear-48B; unbounded: a can be -1e4)
// with rate = exp(A_log). Both are branch-free (MUFU exp / log and selects), so a kernel that evaluates
// them for a tile of channels issues no per-element control flow.
#pragma once

namespace kda {

__device__ __forceinline__ float sigmoid_fast(float x) { return 1.f / (1.f + __expf(-x)); }

// softplus(x) = max(x, 0) + log(1 + exp(-|x|)): the exponential is of a non-positive number, so nothing
// overflows, and above x ~ 17 the log term rounds away (softplus(x) == x in fp32). Absolute error ~1e-7
// (__logf near 1), i.e. a relative error of rate * 1e-7 in the decay factor exp(a).
__device__ __forceinline__ float softplus_fast(float x) {
  return fmaxf(x, 0.f) + __logf(1.f + __expf(-fabsf(x)));
}

__device__ __forceinline__ float log_decay(float x, float rate, float lower_bound, bool use_lower_bound) {
  return use_lower_bound ? lower_bound * sigmoid_fast(rate * x) : -rate * softplus_fast(x);
}

}  // namespace kda
