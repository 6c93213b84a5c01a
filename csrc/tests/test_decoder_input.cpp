// Standalone test (no torch) of philox.h against the Random123 known-answer vectors, of its normals
// (four per Philox call) against double precision, and of the CPU decoder_input kernels against naive
// loops. Exit status 0 on success.
//   g++ -std=c++17 -fopenmp -O3 -march=native -Icsrc/include csrc/tests/test_decoder_input.cpp
//       csrc/cpu/decoder_input.cpp
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "d2v2/cpu_kernels.h"
#include "d2v2/philox.h"

namespace d2v2 {
namespace cpu {
// decoder_input.cpp's row generator, instantiated there for float for this test (not in cpu_kernels.h).
template <typename T>
void draw_noise_row(T* dst, uint64_t begin, int64_t count, uint64_t seed, float noise_std);
}  // namespace cpu
}  // namespace d2v2

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                   \
  do {                                                      \
    if (!(cond)) {                                          \
      ++failures;                                           \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);      \
      std::printf(__VA_ARGS__);                             \
      std::printf("\n");                                    \
    }                                                       \
  } while (0)

// Philox4x32-10 known-answer tests (Random123 kat_vectors).
void test_philox_kat() {
  struct Kat {
    d2v2::Philox4x32 ctr;
    uint32_t k0, k1;
    d2v2::Philox4x32 expected;
  };
  const Kat kats[] = {
      {{0u, 0u, 0u, 0u}, 0u, 0u, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       0xffffffffu,
       0xffffffffu,
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       0xa4093822u,
       0x299f31d0u,
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& k : kats) {
    const d2v2::Philox4x32 r = d2v2::philox4x32_10(k.ctr, k.k0, k.k1);
    EXPECT(r.x0 == k.expected.x0 && r.x1 == k.expected.x1 && r.x2 == k.expected.x2 && r.x3 == k.expected.x3,
           "philox4x32_10(%08x %08x %08x %08x; %08x %08x) = %08x %08x %08x %08x, expected %08x %08x %08x %08x",
           k.ctr.x0, k.ctr.x1, k.ctr.x2, k.ctr.x3, k.k0, k.k1, r.x0, r.x1, r.x2, r.x3, k.expected.x0,
           k.expected.x1, k.expected.x2, k.expected.x3);
  }
}

void test_uniform_conversions() {
  // The extremes stay strictly inside their open intervals and are exact.
  EXPECT(d2v2::philox_open_unit(0u) == std::ldexp(1.0f, -24), "open_unit(0) = %g", d2v2::philox_open_unit(0u));
  EXPECT(d2v2::philox_open_unit(0xffffffffu) == 1.0f - std::ldexp(1.0f, -24), "open_unit(max) = %.9g",
         d2v2::philox_open_unit(0xffffffffu));
  EXPECT(d2v2::philox_signed_unit(0u) == -1.0f + std::ldexp(1.0f, -23), "signed_unit(0) = %.9g",
         d2v2::philox_signed_unit(0u));
  EXPECT(d2v2::philox_signed_unit(0xffffffffu) == 1.0f - std::ldexp(1.0f, -23), "signed_unit(max) = %.9g",
         d2v2::philox_signed_unit(0xffffffffu));
  const d2v2::SinCos tiny_u = d2v2::box_muller2(d2v2::philox_open_unit(0u), 0.25f);
  EXPECT(std::isfinite(tiny_u.c) && std::isfinite(tiny_u.s), "box_muller2 at the smallest u");
}

double ulps(float got, double want) {
  int e;
  std::frexp(want, &e);  // want = f * 2^e, f in [0.5, 1): one fp32 ulp is 2^(e - 24)
  return std::fabs(static_cast<double>(got) - want) / std::ldexp(1.0, e - 24);
}

// Exhaustive over the 2^23 values each uniform conversion produces: the branch-free polynomials stay
// within 1 ulp (log) and 2 ulp (cos(pi v), sin(pi v)) of the double-precision values; measured 0.82 and
// 1.95, a little margin left for other compilers' contraction into FMAs.
void test_log_and_sincospi_accuracy() {
  double worst_log = 0, worst_cos = 0, worst_sin = 0;
  float at_log = 0, at_cos = 0, at_sin = 0;
  for (uint32_t k = 0; k < (1u << 23); ++k) {
    const float u = d2v2::philox_open_unit(k << 9), v = d2v2::philox_signed_unit(k << 9);
    const d2v2::SinCos sc = d2v2::sincospi_unit(v);
    const double e_log = ulps(d2v2::log_unit(u), std::log(static_cast<double>(u)));
    const double e_cos = ulps(sc.c, std::cos(3.14159265358979323846 * static_cast<double>(v)));
    const double e_sin = ulps(sc.s, std::sin(3.14159265358979323846 * static_cast<double>(v)));
    if (e_log > worst_log) worst_log = e_log, at_log = u;
    if (e_cos > worst_cos) worst_cos = e_cos, at_cos = v;
    if (e_sin > worst_sin) worst_sin = e_sin, at_sin = v;
  }
  std::printf("log_unit: max %.3f ulp (u = %.9g); cospi: max %.3f ulp (v = %.9g); sinpi: max %.3f ulp (v = %.9g)\n",
              worst_log, at_log, worst_cos, at_cos, worst_sin, at_sin);
  EXPECT(worst_log <= 1.0, "log_unit error %.3f ulp at u = %.9g", worst_log, at_log);
  EXPECT(worst_cos <= 2.25, "cospi_unit error %.3f ulp at v = %.9g", worst_cos, at_cos);
  EXPECT(worst_sin <= 2.25, "sinpi_unit error %.3f ulp at v = %.9g", worst_sin, at_sin);
  EXPECT(d2v2::cospi_unit(0.0f) == 1.0f && d2v2::cospi_unit(1.0f) == -1.0f && d2v2::cospi_unit(0.5f) == 0.0f,
         "cospi_unit at 0, 1/2, 1");
  EXPECT(d2v2::sinpi_unit(0.0f) == 0.0f && d2v2::sinpi_unit(0.5f) == 1.0f && d2v2::sinpi_unit(-0.5f) == -1.0f &&
             d2v2::sinpi_unit(1.0f) == 0.0f,
         "sinpi_unit at 0, +-1/2, 1");
}

// The four normals of a group from first principles: Philox words (known-answer tested above), then
// Box-Muller in double precision, both branches of each word pair.
void test_normal4_definition() {
  const uint64_t seeds[] = {0, 0x0123456789abcdefULL, ~0ULL};
  const uint64_t groups[] = {0, 1, 12345, (1ULL << 32) - 1, 1ULL << 32, 0xfedcba9876543ULL};
  double worst = 0;
  for (uint64_t seed : seeds) {
    for (uint64_t g : groups) {
      const d2v2::Philox4x32 w = d2v2::philox4x32_10(
          d2v2::Philox4x32{static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), 0u, 0u},
          static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
      const uint32_t words[4] = {w.x0, w.x1, w.x2, w.x3};
      double want[4];
      for (int pair = 0; pair < 2; ++pair) {
        const double u = ((words[2 * pair] >> 9) + 0.5) * std::ldexp(1.0, -23);
        const double v = ((words[2 * pair + 1] >> 9) + 0.5) * std::ldexp(1.0, -22) - 1.0;
        const double r = std::sqrt(-2.0 * std::log(u));
        want[2 * pair] = r * std::cos(3.14159265358979323846 * v);
        want[2 * pair + 1] = r * std::sin(3.14159265358979323846 * v);
      }
      const d2v2::Normal4 z = d2v2::philox_normal4(seed, g);
      const float got[4] = {z.z0, z.z1, z.z2, z.z3};
      for (int lane = 0; lane < 4; ++lane) {
        worst = std::max(worst, std::fabs(got[lane] - want[lane]));
        // philox_normal(seed, i) is lane i % 4 of group i / 4, bit for bit.
        const float single = d2v2::philox_normal(seed, 4 * g + static_cast<uint64_t>(lane));
        EXPECT(std::memcmp(&single, &got[lane], 4) == 0, "philox_normal(%llx, 4 * %llu + %d) != lane %d",
               (unsigned long long)seed, (unsigned long long)g, lane, lane);
      }
    }
  }
  EXPECT(worst < 4e-6, "philox_normal4 vs double-precision Box-Muller: %g", worst);
}

void test_normal_statistics() {
  const int64_t groups = 1 << 18;  // 2^20 normals
  double sum[4] = {0, 0, 0, 0}, sum_sq[4] = {0, 0, 0, 0}, cross[4][4] = {};
  double all = 0, all_sq = 0, next = 0;
  int64_t beyond_3sigma = 0;
  float prev = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const d2v2::Normal4 n4 = d2v2::philox_normal4(0x0123456789abcdefULL, static_cast<uint64_t>(g));
    const double z[4] = {n4.z0, n4.z1, n4.z2, n4.z3};
    for (int a = 0; a < 4; ++a) {
      sum[a] += z[a];
      sum_sq[a] += z[a] * z[a];
      for (int b = 0; b < 4; ++b) cross[a][b] += z[a] * z[b];
      all += z[a];
      all_sq += z[a] * z[a];
      beyond_3sigma += std::fabs(z[a]) > 3.0;
      next += prev * z[a];  // neighbours in the stream, across group boundaries too
      prev = static_cast<float>(z[a]);
    }
  }
  const double n = 4.0 * groups;
  const double mean = all / n, var = all_sq / n - mean * mean;
  EXPECT(std::fabs(mean) < 5e-3, "mean %g", mean);
  EXPECT(std::fabs(var - 1.0) < 1e-2, "variance %g", var);
  const double tail = static_cast<double>(beyond_3sigma) / n;  // 0.0027 for N(0, 1)
  EXPECT(tail > 0.0022 && tail < 0.0032, "P(|z| > 3) = %g", tail);
  // Each lane alone is N(0, 1), and the lanes of one group are uncorrelated (the two Box-Muller branches
  // of a pair are independent normals; the two pairs come from different Philox words).
  for (int a = 0; a < 4; ++a) {
    const double m = sum[a] / groups, v = sum_sq[a] / groups - m * m;
    EXPECT(std::fabs(m) < 1e-2 && std::fabs(v - 1.0) < 2e-2, "lane %d: mean %g, variance %g", a, m, v);
    for (int b = a + 1; b < 4; ++b) {
      const double corr = cross[a][b] / groups - (sum[a] / groups) * (sum[b] / groups);
      EXPECT(std::fabs(corr) < 5.0 / std::sqrt(static_cast<double>(groups)), "lanes %d and %d: correlation %g", a,
             b, corr);
    }
  }
  EXPECT(std::fabs(next / n) < 5.0 / std::sqrt(n), "neighbouring numbers: correlation %g", next / n);
  // Different seeds and the high halves of seed and offset all change the stream.
  EXPECT(d2v2::philox_normal(1, 5) != d2v2::philox_normal(2, 5), "seed ignored");
  EXPECT(d2v2::philox_normal(1ULL << 40, 5) != d2v2::philox_normal(0, 5), "seed high word ignored");
  EXPECT(d2v2::philox_normal(7, 1ULL << 40) != d2v2::philox_normal(7, 0), "offset high word ignored");
}

// The kernel's row generator on ranges that start and end inside a group, that span several chunks,
// and whose group counters carry into the high word (beyond 2^32 groups: no test tensor is that big).
void test_draw_noise_row() {
  const uint64_t seed = 0x9e3779b97f4a7c15ULL;
  const uint64_t wrap = 4 * ((1ULL << 32) - 300);  // 4 * the first group of a chunk that wraps mid-way
  const struct {
    uint64_t begin;
    int64_t count;
  } cases[] = {{0, 1}, {1, 2}, {3, 1}, {3, 2}, {5, 4099}, {1023, 1026}, {7, 37}, {wrap + 2, 1500},
               {(1ULL << 34) - 3, 7}, {(1ULL << 40) + 1, 771}};
  for (const auto& c : cases) {
    std::vector<float> got(static_cast<size_t>(c.count) + 2, 1234.f);
    d2v2::cpu::draw_noise_row<float>(got.data() + 1, c.begin, c.count, seed, 0.5f);
    int64_t bad = 0;
    for (int64_t k = 0; k < c.count; ++k) {
      const float want = d2v2::philox_normal(seed, c.begin + static_cast<uint64_t>(k)) * 0.5f;
      bad += !(std::fabs(got[k + 1] - want) <= 1e-6f * std::max(1.0f, std::fabs(want)));
    }
    EXPECT(bad == 0, "draw_noise_row(begin %llu, count %lld): %lld wrong", (unsigned long long)c.begin,
           (long long)c.count, (long long)bad);
    EXPECT(got.front() == 1234.f && got.back() == 1234.f, "draw_noise_row(begin %llu, count %lld) wrote outside",
           (unsigned long long)c.begin, (long long)c.count);
  }
}

template <typename T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

template <typename T>
void test_kernels(int64_t N, int64_t T_len, int64_t K, int64_t C, const char* name) {
  std::mt19937 rng(static_cast<unsigned>(N * 1000003 + T_len * 1009 + K * 31 + C));
  std::normal_distribution<float> normal;
  const int64_t masked = T_len - K;
  const int64_t x_pad = 3;  // x_vis rows padded: strides other than C
  std::vector<T> x(static_cast<size_t>(N * K * (C + x_pad) + 1)), noise(static_cast<size_t>(N * masked * C + 1));
  for (T& v : x) v = d2v2::from_float<T>(normal(rng));
  for (T& v : noise) v = d2v2::from_float<T>(normal(rng));
  std::vector<int64_t> ids(static_cast<size_t>(N * T_len));
  for (int64_t n = 0; n < N; ++n) {
    std::iota(ids.begin() + n * T_len, ids.begin() + (n + 1) * T_len, 0);
    std::shuffle(ids.begin() + n * T_len, ids.begin() + (n + 1) * T_len, rng);
  }
  const int64_t xs_k = C + x_pad, xs_n = K * xs_k;
  const uint64_t seed = 0xfeedbeefcafe1234ULL;
  const float noise_std = 0.5f;

  std::vector<T> out(static_cast<size_t>(N * T_len * C + 1)), drawn(out.size());
  d2v2::cpu::decoder_input_forward<T>(x.data(), xs_n, xs_k, ids.data(), noise.data(), masked * C, C, out.data(), N,
                                      T_len, K, C, 0, 0.f);
  d2v2::cpu::decoder_input_forward<T>(x.data(), xs_n, xs_k, ids.data(), nullptr, 0, 0, drawn.data(), N, T_len, K,
                                      C, seed, noise_std);
  const float drawn_tol = d2v2::is_float16<T>::value ? 1e-2f : 1e-6f;  // a bf16 ulp is 2^-8 relative
  int64_t bad = 0, bad_drawn = 0;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t t = 0; t < T_len; ++t) {
      const int64_t r = ids[n * T_len + t];
      for (int64_t c = 0; c < C; ++c) {
        const T got = out[(n * T_len + t) * C + c], got_drawn = drawn[(n * T_len + t) * C + c];
        if (r < K) {
          const T want = x[n * xs_n + r * xs_k + c];
          bad += !same_bits(got, want);
          bad_drawn += !same_bits(got_drawn, want);
        } else {
          const uint64_t flat = static_cast<uint64_t>((n * masked + r - K) * C + c);
          bad += !same_bits(got, noise[flat]);
          // Equal up to rounding, not bit for bit: the kernel's vectorised loop may contract a*b+c into
          // FMAs differently from this scalar call (-march=native); a 16-bit store can then round apart.
          const float want = d2v2::philox_normal(seed, flat) * noise_std;
          bad_drawn += !(std::fabs(d2v2::to_float(got_drawn) - want) <= drawn_tol * std::max(1.0f, std::fabs(want)));
        }
      }
    }
  }
  EXPECT(bad == 0, "%s forward (noise given) N=%lld T=%lld K=%lld C=%lld: %lld wrong", name, (long long)N,
         (long long)T_len, (long long)K, (long long)C, (long long)bad);
  EXPECT(bad_drawn == 0, "%s forward (noise drawn) N=%lld T=%lld K=%lld C=%lld: %lld wrong", name, (long long)N,
         (long long)T_len, (long long)K, (long long)C, (long long)bad_drawn);

  // Backward from a grad_out with padded rows; a sentinel after grad_x catches writes out of bounds.
  const int64_t gs_t = C + 1, gs_n = T_len * gs_t;
  std::vector<T> grad(static_cast<size_t>(N * gs_n + 1));
  for (T& v : grad) v = d2v2::from_float<T>(normal(rng));
  std::vector<T> grad_x(static_cast<size_t>(N * K * C + 1), d2v2::from_float<T>(1024.f));
  d2v2::cpu::decoder_input_backward<T>(grad.data(), gs_n, gs_t, ids.data(), grad_x.data(), N, T_len, K, C);
  int64_t bad_grad = 0;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t t = 0; t < T_len; ++t) {
      const int64_t r = ids[n * T_len + t];
      if (r >= K) continue;
      for (int64_t c = 0; c < C; ++c) {
        bad_grad += !same_bits(grad_x[(n * K + r) * C + c], grad[n * gs_n + t * gs_t + c]);
      }
    }
  }
  EXPECT(bad_grad == 0, "%s backward N=%lld T=%lld K=%lld C=%lld: %lld wrong", name, (long long)N, (long long)T_len,
         (long long)K, (long long)C, (long long)bad_grad);
  EXPECT(d2v2::to_float(grad_x.back()) == 1024.f, "%s backward wrote past the end", name);
}

template <typename T>
void test_kernels_all(const char* name) {
  test_kernels<T>(8, 196, 39, 768, name);  // data2vec 2.0 image: 39 visible of 196
  test_kernels<T>(3, 50, 25, 37, name);    // half masked, odd C
  test_kernels<T>(2, 9, 0, 16, name);      // K = 0: all noise
  test_kernels<T>(2, 9, 9, 16, name);      // K = T: no noise
  test_kernels<T>(4, 1, 1, 5, name);       // T = 1
  test_kernels<T>(4, 1, 0, 5, name);
}

}  // namespace

int main() {
  test_philox_kat();
  test_uniform_conversions();
  test_log_and_sincospi_accuracy();
  test_normal4_definition();
  test_normal_statistics();
  test_draw_noise_row();
  test_kernels_all<float>("float");
  test_kernels_all<double>("double");
  test_kernels_all<d2v2::bf16>("bf16");
  test_kernels_all<d2v2::f16>("f16");
  if (failures) {
    std::printf("test_decoder_input: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_decoder_input: all passed\n");
  return 0;
}
