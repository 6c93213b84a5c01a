// Counter-based normal noise shared by every backend: Philox4x32-10 (Salmon et al., "Parallel random
// numbers: as easy as 1, 2, 3", SC'11) and one Box-Muller draw per counter.
//
// The noise of element `offset` under `seed` is a pure function of the two, so the CPU and CUDA
// kernels, the Triton kernel (tl.randint4x: counter (offset_lo, offset_hi, 0, 0), key (seed_lo,
// seed_hi)) and the PyTorch reference (philox_normal_reference) produce the same values up to the
// rounding of log/cos/sqrt (the reference calls torch.log/cos; the C++ and Triton kernels use the
// polynomials below, within 2 ulp). Everything before those three functions is exact in fp32 by construction.
#pragma once

#include <cstdint>

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

#include "d2v2/common.h"

namespace d2v2 {

struct Philox4x32 {
  uint32_t x0, x1, x2, x3;
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // multiplier of counter word 0
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;  // multiplier of counter word 2
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key bump (golden ratio)
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // key bump (sqrt(3) - 1)

D2V2_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Ten rounds, the key bumped between rounds: the Random123 reference algorithm bit for bit.
D2V2_HD Philox4x32 philox4x32_10(Philox4x32 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, c.x0), lo0 = kPhiloxM0 * c.x0;
    const uint32_t hi1 = mulhi32(kPhiloxM1, c.x2), lo1 = kPhiloxM1 * c.x2;
    c = Philox4x32{hi1 ^ c.x1 ^ k0, lo1, hi0 ^ c.x3 ^ k1, lo0};
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return c;
}

// Top 23 bits -> (2k + 1) * 2^-24, strictly inside (0, 1) and exact in fp32, so log() never sees 0.
D2V2_HD float philox_open_unit(uint32_t bits) {
  return (static_cast<float>(bits >> 9) + 0.5f) * 1.1920928955078125e-07f;  // 2^-23
}

// Top 23 bits -> (2k + 1) * 2^-23 - 1, strictly inside (-1, 1) and exact in fp32: the angle over pi,
// kept in (-pi, pi) so no implementation of cos needs a large-argument reduction.
D2V2_HD float philox_signed_unit(uint32_t bits) {
  return (static_cast<float>(bits >> 9) + 0.5f) * 2.384185791015625e-07f - 1.0f;  // 2^-22
}

// ln(u) for u in (0, 1), normal: Cephes' logf (u = m * 2^e, m in [sqrt(1/2), sqrt(2)), a degree-9
// polynomial in m - 1). Branch-free with exact reductions, so the CPU loop vectorises. Over every u
// that philox_open_unit produces it is within 1 ulp of ln(u) (csrc/tests checks them all).
D2V2_HD float log_unit(float u) {
  const uint32_t bits = float_to_bits(u);
  int32_t e = static_cast<int32_t>(bits >> 23) - 126;  // u = m * 2^e, m in [0.5, 1)
  const float m = bits_to_float((bits & 0x007fffffu) | 0x3f000000u);
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  const float x = low ? (m + m) - 1.0f : m - 1.0f;  // exact (Sterbenz), in [-0.293, 0.415)
  const float z = x * x;
  float p = 7.0376836292e-2f;
  p = p * x - 1.1514610310e-1f;
  p = p * x + 1.1676998740e-1f;
  p = p * x - 1.2420140846e-1f;
  p = p * x + 1.4249322787e-1f;
  p = p * x - 1.6668057665e-1f;
  p = p * x + 2.0000714765e-1f;
  p = p * x - 2.4999993993e-1f;
  p = p * x + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  float y = x * z * p;
  y += -2.12194440e-4f * fe;  // ln 2 = 0.693359375 - 2.12194440e-4, the first part exact in fp32
  y += -0.5f * z;
  return (x + y) + 0.693359375f * fe;
}

// cos(pi * v) for v in [-1, 1]: folded onto [0, 1/4] with exact subtractions, then Cephes' sinf/cosf
// polynomials on [0, pi/4]. Branch-free, so it vectorises; no large-argument reduction needed. Within
// 2 ulp of cos(pi v) over every v that philox_signed_unit produces (csrc/tests checks them all).
D2V2_HD float cospi_unit(float v) {
  constexpr float kPi = 3.14159265358979323846f;
  float a = v < 0.0f ? -v : v;     // cos is even
  const bool flip = a > 0.5f;      // cos(pi a) = -cos(pi (1 - a))
  a = flip ? 1.0f - a : a;         // exact
  const bool as_sin = a > 0.25f;   // cos(pi a) = sin(pi (1/2 - a))
  a = as_sin ? 0.5f - a : a;       // exact
  const float x = a * kPi;         // in [0, pi/4]
  const float z = x * x;
  const float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                  0.5f * z + 1.0f;
  const float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * x + x;
  const float r = as_sin ? s : c;
  return flip ? -r : r;
}

D2V2_HD float sqrt_f32(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);  // IEEE round-to-nearest unless built with fast math
#else
  return std::sqrt(x);
#endif
}

// Box-Muller, cosine branch: sqrt(-2 ln u) * cos(pi * v) ~ N(0, 1) for u ~ U(0, 1), v ~ U(-1, 1).
D2V2_HD float box_muller(float u, float v) { return sqrt_f32(-2.0f * log_unit(u)) * cospi_unit(v); }

// Standard normal number `offset` of the stream `seed`: counter (offset_lo, offset_hi, 0, 0),
// key (seed_lo, seed_hi); words 0 and 1 of the Philox output feed Box-Muller.
D2V2_HD float philox_normal(uint64_t seed, uint64_t offset) {
  const Philox4x32 r = philox4x32_10(
      Philox4x32{static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), 0u, 0u},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return box_muller(philox_open_unit(r.x0), philox_signed_unit(r.x1));
}

}  // namespace d2v2
