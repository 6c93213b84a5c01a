// Standalone test (no torch) of philox.h against the Random123 known-answer vectors and of the CPU
// decoder_input kernels against naive loops. Exit status 0 on success.
//   g++ -std=c++17 -fopenmp -O2 -Icsrc/include csrc/tests/test_decoder_input.cpp csrc/cpu/decoder_input.cpp
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
  EXPECT(std::isfinite(d2v2::box_muller(d2v2::philox_open_unit(0u), 0.0f)), "box_muller at the smallest u");
}

double ulps(float got, double want) {
  int e;
  std::frexp(want, &e);  // want = f * 2^e, f in [0.5, 1): one fp32 ulp is 2^(e - 24)
  return std::fabs(static_cast<double>(got) - want) / std::ldexp(1.0, e - 24);
}

// Exhaustive over the 2^23 values each uniform conversion produces: the branch-free polynomials stay
// within 1 ulp (log) and 2 ulp (cos(pi v)) of the double-precision values; measured 0.82 and 1.95,
// a little margin left for other compilers' contraction into FMAs.
void test_log_and_cospi_accuracy() {
  double worst_log = 0, worst_cos = 0;
  float at_log = 0, at_cos = 0;
  for (uint32_t k = 0; k < (1u << 23); ++k) {
    const float u = d2v2::philox_open_unit(k << 9), v = d2v2::philox_signed_unit(k << 9);
    const double e_log = ulps(d2v2::log_unit(u), std::log(static_cast<double>(u)));
    const double e_cos = ulps(d2v2::cospi_unit(v), std::cos(3.14159265358979323846 * static_cast<double>(v)));
    if (e_log > worst_log) worst_log = e_log, at_log = u;
    if (e_cos > worst_cos) worst_cos = e_cos, at_cos = v;
  }
  std::printf("log_unit: max %.3f ulp (u = %.9g); cospi_unit: max %.3f ulp (v = %.9g)\n", worst_log, at_log,
              worst_cos, at_cos);
  EXPECT(worst_log <= 1.0, "log_unit error %.3f ulp at u = %.9g", worst_log, at_log);
  EXPECT(worst_cos <= 2.25, "cospi_unit error %.3f ulp at v = %.9g", worst_cos, at_cos);
  EXPECT(d2v2::cospi_unit(0.0f) == 1.0f && d2v2::cospi_unit(1.0f) == -1.0f && d2v2::cospi_unit(0.5f) == 0.0f,
         "cospi_unit at 0, 1/2, 1");
}

void test_normal_statistics() {
  const int64_t n = 1 << 20;
  double sum = 0, sum_sq = 0;
  int64_t beyond_3sigma = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double z = d2v2::philox_normal(0x0123456789abcdefULL, static_cast<uint64_t>(i));
    sum += z;
    sum_sq += z * z;
    beyond_3sigma += std::fabs(z) > 3.0;
  }
  const double mean = sum / n, var = sum_sq / n - mean * mean;
  EXPECT(std::fabs(mean) < 5e-3, "mean %g", mean);
  EXPECT(std::fabs(var - 1.0) < 1e-2, "variance %g", var);
  const double tail = static_cast<double>(beyond_3sigma) / n;  // 0.0027 for N(0, 1)
  EXPECT(tail > 0.0022 && tail < 0.0032, "P(|z| > 3) = %g", tail);
  // Different seeds and the high halves of seed and offset all change the stream.
  EXPECT(d2v2::philox_normal(1, 5) != d2v2::philox_normal(2, 5), "seed ignored");
  EXPECT(d2v2::philox_normal(1ULL << 40, 5) != d2v2::philox_normal(0, 5), "seed high word ignored");
  EXPECT(d2v2::philox_normal(7, 1ULL << 40) != d2v2::philox_normal(7, 0), "offset high word ignored");
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
  test_log_and_cospi_accuracy();
  test_normal_statistics();
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
