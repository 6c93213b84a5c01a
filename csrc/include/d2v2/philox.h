// Counter-based normal noise shared by every backend: Philox4x32-10 (Salmon et al., "Parallel random
// numbers: as easy as 1, 2, 3", SC'11) and Box-Muller, both branches: one Philox call, four normals.
//
// Normal number `i` of the stream `seed` is lane i % 4 of group g = i / 4: Philox of counter
// (g_lo, g_hi, 0, 0) and key (seed_lo, seed_hi) gives words (w0, w1, w2, w3); lanes 0 and 1 are
// sqrt(-2 ln u) * (cos, sin)(pi v) of the pair (u, v) = (w0, w1), lanes 2 and 3 the same of (w2, w3).
// A pure function of (seed, i), so the CPU and CUDA kernels, the Triton kernel (tl.randint4x(seed, g)
// has that counter and key) and the PyTorch reference (philox_normal_reference) produce the same
// values up to the rounding of log/cos/sin/sqrt (the reference calls torch.log/cos/sin; the C++ and
// Triton kernels use the polynomials below, within 2 ulp). Everything before those functions is exact
// in fp32 by construction.
#pragma once

#include <cstdint>

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

#include "d2v2/common.h"

// Everything below is inlined into the vectorised CPU loops: GCC's heuristics may keep a body as large
// as Box-Muller's out of line, and a call stops the vectoriser.
#if defined(__CUDACC__) || !defined(__GNUC__)
#define D2V2_PHILOX_FN D2V2_HD
#else
#define D2V2_PHILOX_FN inline __attribute__((always_inline))
#endif

namespace d2v2 {

struct Philox4x32 {
  uint32_t x0, x1, x2, x3;
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // multiplier of counter word 0
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;  // multiplier of counter word 2
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key bump (golden ratio)
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // key bump (sqrt(3) - 1)

D2V2_PHILOX_FN uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Ten rounds, the key bumped between rounds: the Random123 reference algorithm bit for bit.
D2V2_PHILOX_FN Philox4x32 philox4x32_10(Philox4x32 c, uint32_t k0, uint32_t k1) {
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
D2V2_PHILOX_FN float philox_open_unit(uint32_t bits) {
  return (static_cast<float>(bits >> 9) + 0.5f) * 1.1920928955078125e-07f;  // 2^-23
}

// Top 23 bits -> (2k + 1) * 2^-23 - 1, strictly inside (-1, 1) and exact in fp32: the angle over pi,
// kept in (-pi, pi) so no implementation of cos needs a large-argument reduction.
D2V2_PHILOX_FN float philox_signed_unit(uint32_t bits) {
  return (static_cast<float>(bits >> 9) + 0.5f) * 2.384185791015625e-07f - 1.0f;  // 2^-22
}

// p ? a : b of two values already computed, as a bit blend on the CPU: GCC would sink each operand's
// floating-point operation into its branch (it may trap, so it must not be speculated) and then cannot
// vectorise the loop without AVX-512's masked operations. Same bits as the ternary.
D2V2_PHILOX_FN float select_f32(bool p, float a, float b) {
#if defined(__CUDA_ARCH__)
  return p ? a : b;
#else
  const uint32_t mask = 0u - static_cast<uint32_t>(p);
  return bits_to_float((float_to_bits(a) & mask) | (float_to_bits(b) & ~mask));
#endif
}

// ln(u) for u in (0, 1), normal: Cephes' logf (u = m * 2^e, m in [sqrt(1/2), sqrt(2)), a degree-9
// polynomial in m - 1). Branch-free with exact reductions, so the CPU loop vectorises. Over every u
// that philox_open_unit produces it is within 1 ulp of ln(u) (csrc/tests checks them all).
D2V2_PHILOX_FN float log_unit(float u) {
  const uint32_t bits = float_to_bits(u);
  int32_t e = static_cast<int32_t>(bits >> 23) - 126;  // u = m * 2^e, m in [0.5, 1)
  const float m = bits_to_float((bits & 0x007fffffu) | 0x3f000000u);
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  const float x = select_f32(low, (m + m) - 1.0f, m - 1.0f);  // exact (Sterbenz), in [-0.293, 0.415)
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

// (sin(pi v), cos(pi v)) for v in [-1, 1]: |v| folded onto [0, 1/4] with exact subtractions, then
// Cephes' sinf/cosf polynomials on [0, pi/4], both of which every fold needs anyway: the pair costs
// one reduction and two short polynomials. Branch-free, so it vectorises; no large-argument reduction.
// Each within 2 ulp of sin(pi v) / cos(pi v) over every v that philox_signed_unit produces (csrc/tests
// checks them all).
struct SinCos {
  float s, c;
};

D2V2_PHILOX_FN SinCos sincospi_unit(float v) {
  constexpr float kPi = 3.14159265358979323846f;
  const uint32_t sign = float_to_bits(v) & 0x80000000u;
  float a = bits_to_float(float_to_bits(v) ^ sign);  // |v|: cos is even, sin odd (sign put back at the end)
  const bool flip = a > 0.5f;                         // cos(pi a) = -cos(pi (1 - a)), sin(pi a) = sin(pi (1 - a))
  a = select_f32(flip, 1.0f - a, a);                  // exact
  const bool swap = a > 0.25f;                        // cos(pi a) = sin(pi (1/2 - a)), and the other way round
  a = select_f32(swap, 0.5f - a, a);                  // exact
  const float x = a * kPi;                            // in [0, pi/4]
  const float z = x * x;
  const float pc = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                   0.5f * z + 1.0f;
  const float ps = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * x + x;
  const float c = select_f32(swap, ps, pc);
  const float s = select_f32(swap, pc, ps);
  const uint32_t c_sign = flip ? 0x80000000u : 0u;
  return SinCos{bits_to_float(float_to_bits(s) ^ sign), bits_to_float(float_to_bits(c) ^ c_sign)};
}

D2V2_PHILOX_FN float cospi_unit(float v) { return sincospi_unit(v).c; }
D2V2_PHILOX_FN float sinpi_unit(float v) { return sincospi_unit(v).s; }

D2V2_PHILOX_FN float sqrt_f32(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);  // IEEE round-to-nearest unless built with fast math
#else
  return std::sqrt(x);
#endif
}

// Box-Muller, both branches: sqrt(-2 ln u) * (cos, sin)(pi v), two independent N(0, 1) for
// u ~ U(0, 1), v ~ U(-1, 1). Returned as {c: the cos branch, s: the sin branch}.
D2V2_PHILOX_FN SinCos box_muller2(float u, float v) {
  const float r = sqrt_f32(-2.0f * log_unit(u));
  const SinCos t = sincospi_unit(v);
  return SinCos{r * t.s, r * t.c};
}

struct Normal4 {
  float z0, z1, z2, z3;
};

// The four standard normals of group `group` of the stream `seed` (numbers 4 * group .. 4 * group + 3):
// counter (group_lo, group_hi, 0, 0), key (seed_lo, seed_hi); words (0, 1) -> lanes 0 (cos) and 1 (sin),
// words (2, 3) -> lanes 2 (cos) and 3 (sin).
D2V2_PHILOX_FN Normal4 philox_normal4(uint64_t seed, uint64_t group) {
  const Philox4x32 w = philox4x32_10(
      Philox4x32{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), 0u, 0u},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const SinCos a = box_muller2(philox_open_unit(w.x0), philox_signed_unit(w.x1));
  const SinCos b = box_muller2(philox_open_unit(w.x2), philox_signed_unit(w.x3));
  return Normal4{a.c, a.s, b.c, b.s};
}

// Standard normal number `offset` of the stream `seed`: lane offset % 4 of group offset / 4. One
// Philox call per number: the kernels call philox_normal4 once per group instead.
D2V2_PHILOX_FN float philox_normal(uint64_t seed, uint64_t offset) {
  const Normal4 z = philox_normal4(seed, offset >> 2);
  const uint32_t lane = static_cast<uint32_t>(offset & 3u);
  return lane == 0 ? z.z0 : lane == 1 ? z.z1 : lane == 2 ? z.z2 : z.z3;
}

}  // namespace d2v2
