// conv_decoder_block epilogue: the per-element and per-row math of out = GELU(LayerNorm(z + bias)) (+ residual),
// shared by the CPU (g++) and CUDA (nvcc) compilers so the CPU tests execute the arithmetic a device port runs.
//
// GELU is the exact (erf) one: gelu(y) = 0.5 y (1 + erf(y / sqrt 2)),
//                              gelu'(y) = 0.5 (1 + erf(y / sqrt 2)) + y exp(-y^2 / 2) / sqrt(2 pi).
// In fp32 erf and exp are branch-free polynomials (selects only, explicit fmaf), so the CPU channel loops
// vectorise: erf_f32 is within 1 ulp of erf (max abs error 6e-8, checked against double std::erf in
// test_conv_decoder.cpp), exp_f32 within 2 ulp on [-87, 88]. fp64 (gradcheck) uses std::erf / std::exp.
//
// Layer norm (no affine, biased variance) of a row v = z + bias of C channels, in the accumulator type:
//   forward:  statistics of d = v - shift with shift = v[0] (exact by Sterbenz when the row sits on a
//             large offset, 1e4 + O(1) noise), two-pass: mean_d, then m2 = sum (d - mean_d)^2 (never
//             E[v^2] - E[v]^2); y = (d - mean_d) rstd, rstd = 1 / sqrt(m2 / C + eps); mean = shift + mean_d.
//   backward: y = ((v - mean) - corr) rstd with corr = mean_c(v - mean): the saved mean is rounded to the
//             accumulator type, so it serves as the shift and the row's own correction restores y to the
//             accuracy of the forward (rstd is used as saved). With dy = grad_out gelu'(y):
//             grad_v = rstd (dy - mean_c(dy) - y mean_c(dy y)).
#pragma once

#include <cmath>
#include <cstdint>

#include "d2v2/common.h"

// Forced inlining on the host: GCC's cost model otherwise keeps erf_f32 / exp_f32 as scalar calls inside
// the channel loops, which then do not vectorise (5-10x slower).
#if defined(__CUDACC__)
#define D2V2_HD_INLINE D2V2_HD
#elif defined(__GNUC__)
#define D2V2_HD_INLINE inline __attribute__((always_inline))
#else
#define D2V2_HD_INLINE inline
#endif

namespace d2v2 {

template <typename T>
using conv_decoder_acc_t = typename acc_type<T>::type;

// exp(x) for x in [-87, 88] (smaller x are clamped to -87: a result of 1.6e-38 instead of 0 or a
// subnormal, which the callers multiply away). Cephes expf: round-to-nearest n = x log2(e) by the
// 1.5 * 2^23 shifter (whose bits then hold n), Cody-Waite reduction r = x - n ln 2, a degree-6
// polynomial on |r| <= ln(2) / 2, and 2^n built in the exponent field.
D2V2_HD_INLINE float exp_f32(float x) {
  x = x > -87.0f ? x : -87.0f;
  const float shifter = 12582912.0f;  // 1.5 * 2^23
  const float t = fmaf(x, 1.44269504088896341f, shifter);
  const float n = t - shifter;
  float r = fmaf(n, -0.693359375f, x);
  r = fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  p = fmaf(p, r * r, r) + 1.0f;
  const uint32_t n_bits = float_to_bits(t) - 0x4b400000u;  // n as a two's-complement integer
  return p * bits_to_float((n_bits + 127u) << 23);
}

// erf(x) in fp32 (N. Juffa's minimax erff): odd polynomial in x for |x| <= 0.9277, 1 - exp(poly(|x|))
// with the sign of x above. Both branches are evaluated and one is selected. |x| is clamped to 4, where
// erf rounds to 1 in fp32 (this also keeps exp's argument in [-17, -0.8]). NaN gives +-1 here; callers
// multiply by the NaN input, so NaN still propagates to gelu.
D2V2_HD_INLINE float erf_f32(float x) {
  const float a = x < 0.0f ? -x : x;
  const float t = a < 4.0f ? a : 4.0f;
  const float s = x * x;
  // |x| <= 0.927734375: max error 0.99 ulp
  float p = -5.96761703e-4f;
  p = fmaf(p, s, 4.99119423e-3f);
  p = fmaf(p, s, -2.67681349e-2f);
  p = fmaf(p, s, 1.12819925e-1f);
  p = fmaf(p, s, -3.76125336e-1f);
  p = fmaf(p, s, 1.28379166e-1f);
  const float small = fmaf(p, x, x);
  // |x| > 0.927734375: max error 1.00 ulp
  float q = fmaf(-1.72853470e-5f, t, 3.83197126e-4f);
  const float u = fmaf(-3.88396438e-3f, t, 2.42546219e-2f);
  const float tt = t * t;
  q = fmaf(q, tt, u);
  q = fmaf(q, t, -1.06777877e-1f);
  q = fmaf(q, t, -6.34846687e-1f);
  q = fmaf(q, t, -1.28717512e-1f);
  q = fmaf(q, t, -t);
  const float big_abs = 1.0f - exp_f32(q);
  const float big = bits_to_float(float_to_bits(big_abs) | (float_to_bits(x) & 0x80000000u));
  return a > 0.927734375f ? big : small;
}

// The accumulator-type erf and exp: the polynomials in fp32, the library functions in fp64.
template <typename Acc>
D2V2_HD_INLINE Acc cd_erf(Acc x);
template <>
D2V2_HD_INLINE float cd_erf<float>(float x) {
  return erf_f32(x);
}
template <>
D2V2_HD_INLINE double cd_erf<double>(double x) {
  return std::erf(x);
}

template <typename Acc>
D2V2_HD_INLINE Acc cd_exp(Acc x);
template <>
D2V2_HD_INLINE float cd_exp<float>(float x) {
  return exp_f32(x);
}
template <>
D2V2_HD_INLINE double cd_exp<double>(double x) {
  return std::exp(x);
}

// gelu(y) = 0.5 y (1 + erf(y / sqrt 2)), torch's x * 0.5 * (1 + erf(x * M_SQRT1_2)).
template <typename Acc>
D2V2_HD_INLINE Acc gelu_erf(Acc y) {
  return y * Acc(0.5) * (Acc(1) + cd_erf<Acc>(y * Acc(0.70710678118654752440) /* 1 / sqrt 2 */));
}

// gelu'(y) = Phi(y) + y phi(y).
template <typename Acc>
D2V2_HD_INLINE Acc gelu_erf_grad(Acc y) {
  const Acc cdf = Acc(0.5) * (Acc(1) + cd_erf<Acc>(y * Acc(0.70710678118654752440) /* 1 / sqrt 2 */));
  const Acc pdf = Acc(0.39894228040143267794) /* 1 / sqrt(2 pi) */ * cd_exp<Acc>(Acc(-0.5) * y * y);
  return cdf + y * pdf;
}

// --- per-row layer norm pieces (the row loops that produce the sums live in the kernels) ---

// 1 / sqrt(m2 / C + eps): biased variance from the sum of squared deviations.
template <typename Acc>
D2V2_HD_INLINE Acc ln_rstd(Acc m2, Acc C, Acc eps) {
  return Acc(1) / std::sqrt(m2 / C + eps);
}

// The normalised value of a shifted channel d = v - shift, for the row's mean of d.
template <typename Acc>
D2V2_HD_INLINE Acc ln_normalize(Acc d, Acc mean_d, Acc rstd) {
  return (d - mean_d) * rstd;
}

// grad_v = rstd (dy - mean_c(dy) - y mean_c(dy y)), for mean_dy = mean_c(dy), mean_dyy = mean_c(dy y).
template <typename Acc>
D2V2_HD_INLINE Acc ln_backward(Acc dy, Acc y, Acc rstd, Acc mean_dy, Acc mean_dyy) {
  return rstd * (dy - mean_dy - y * mean_dyy);
}

}  // namespace d2v2
