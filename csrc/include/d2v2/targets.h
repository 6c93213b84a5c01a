// layer_average_targets: the statistics math shared by the CPU kernels (and any GPU port), so the
// standalone tests exercise the exact arithmetic of the fused paths.
//
// Every statistic is taken on shifted data d = x - shift, with shift one sample of the same set (the
// first valid step of a column, the first channel of a row). x - shift is exact when the two are within
// a factor of two (Sterbenz), so teacher outputs sitting on a large offset (1e4 + O(1) noise) keep full
// fp32 accuracy: the mean of d is O(noise) and normalising ((x - shift) - mean_d) * rstd never forms an
// fp32 value of the size of the offset. Means and variances come from Welford updates and Chan's
// merge (never E[x^2] - E[x]^2), so constant channels give a variance of exactly 0 and an output of 0.
#pragma once

#include <cmath>
#include <cstdint>

#include "d2v2/common.h"
#include "d2v2/ema.h"  // f16_to_float_branchless, ema_load: vectorisable widening loads

namespace d2v2 {

// Which normalisation a stage applies: per-layer (before the average) or final (after it).
enum class TargetNorm : int32_t { none = 0, instance = 1, layer = 2 };

template <typename T>
using target_acc_t = typename acc_type<T>::type;

// Widening load into the accumulator type (fp32, fp64 for fp64 data), branch-free for fp16.
template <typename T>
D2V2_HD target_acc_t<T> target_load(T x) {
  return ema_load<target_acc_t<T>, T>::apply(x);
}

// One Welford step for d, the count already incremented to n (inv_n = 1 / n).
template <typename Acc>
D2V2_HD void welford_push(Acc d, Acc inv_n, Acc& mean, Acc& m2) {
  const Acc delta = d - mean;
  mean += delta * inv_n;
  m2 += delta * (d - mean);
}

// Mean and M2 (sum of squared deviations) of a chunk of four values, by the two-pass formula.
template <typename Acc>
D2V2_HD void chunk4_stats(Acc d0, Acc d1, Acc d2, Acc d3, Acc& mean, Acc& m2) {
  mean = ((d0 + d1) + (d2 + d3)) * Acc(0.25);
  const Acc e0 = d0 - mean, e1 = d1 - mean, e2 = d2 - mean, e3 = d3 - mean;
  m2 = (e0 * e0 + e1 * e1) + (e2 * e2 + e3 * e3);
}

// Chan et al.'s merge of a chunk (mean_b, m2_b) of n_b values into the running (mean_a, m2_a) of n_a
// values, with w = n_b / (n_a + n_b): the counts and w are shared by a whole vector of channels, so
// callers compute them once per chunk. n_a = 0 (w = 1) takes the chunk's statistics exactly.
template <typename Acc>
D2V2_HD void welford_merge(Acc& mean_a, Acc& m2_a, Acc mean_b, Acc m2_b, Acc n_a, Acc w) {
  const Acc delta = mean_b - mean_a;
  mean_a += delta * w;
  m2_a += m2_b + delta * delta * (n_a * w);
}

// 1 / sqrt(biased variance + eps), as torch's instance_norm / layer_norm compute it.
template <typename Acc>
D2V2_HD Acc target_rstd(Acc m2, Acc n, Acc eps) {
  const Acc var = n > Acc(0) ? m2 / n : Acc(0);
  return Acc(1) / std::sqrt(var + eps);
}

// The normalised value of x for statistics taken on x - shift.
template <typename Acc>
D2V2_HD Acc target_normalize(Acc x, Acc shift, Acc mean, Acc rstd) {
  return ((x - shift) - mean) * rstd;
}

}  // namespace d2v2
