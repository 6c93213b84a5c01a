// gather_visible CPU kernels against naive loops, in fp32 and bf16, including repeated ids and K = 0.
#include <cstdint>
#include <vector>

#include "check.h"
#include "d2v2/cpu_kernels.h"

using d2v2::bf16;

template <typename T>
static void run_case(int64_t B, int64_t T_len, int64_t C, int64_t clones, int64_t K, unsigned seed, float tol) {
  const int64_t N = B * clones;
  std::vector<float> xf = d2v2_test::randn(B * T_len * C, seed);
  std::vector<T> x(xf.size());
  for (size_t i = 0; i < x.size(); ++i) x[i] = d2v2::from_float<T>(xf[i]);
  std::mt19937 gen(seed + 1);
  std::vector<int64_t> ids(N * K);
  for (auto& v : ids) v = static_cast<int64_t>(gen() % T_len);  // repeats allowed

  std::vector<T> out(N * K * C);
  d2v2::cpu::gather_visible_forward<T>(x.data(), T_len * C, C, ids.data(), out.data(), N, K, C, clones);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < K; ++j)
      for (int64_t c = 0; c < C; ++c) {
        const float want = d2v2::to_float(x[((n / clones) * T_len + ids[n * K + j]) * C + c]);
        const float got = d2v2::to_float(out[(n * K + j) * C + c]);
        D2V2_EXPECT(got == want, "forward n=%lld j=%lld c=%lld: %f != %f", (long long)n, (long long)j, (long long)c,
                    got, want);
      }

  // Backward: grad_out = out itself; compare with a naive fp32 scatter-add.
  std::vector<float> expect(B * T_len * C, 0.f);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < K; ++j)
      for (int64_t c = 0; c < C; ++c)
        expect[((n / clones) * T_len + ids[n * K + j]) * C + c] += d2v2::to_float(out[(n * K + j) * C + c]);
  std::vector<T> grad_x(B * T_len * C);
  d2v2::cpu::gather_visible_backward<T>(out.data(), K * C, C, ids.data(), grad_x.data(), B, T_len, K, C, clones);
  for (size_t i = 0; i < grad_x.size(); ++i)
    D2V2_EXPECT(d2v2_test::close(d2v2::to_float(grad_x[i]), expect[i], tol, tol), "backward i=%zu: %f != %f", i,
                d2v2::to_float(grad_x[i]), expect[i]);
}

int main() {
  run_case<float>(2, 196, 96, 4, 39, 1, 1e-5f);
  run_case<float>(3, 7, 300, 1, 4, 2, 1e-5f);  // C spans two channel tiles
  run_case<float>(2, 9, 16, 2, 0, 3, 0.f);     // K = 0: zero gradient
  run_case<float>(4, 1, 8, 3, 1, 4, 1e-5f);    // T = 1
  run_case<bf16>(2, 50, 64, 3, 25, 5, 2e-2f);
  // bf16 round trip of representative values
  for (float v : {0.f, 1.f, -2.5f, 3.1415926f, 1e-30f, 65504.f})
    D2V2_EXPECT(d2v2_test::close(d2v2::to_float(d2v2::from_float<bf16>(v)), v, 0.f, 4e-3f), "bf16 %f", v);
  for (float v : {0.f, 1.f, -2.5f, 3.1415926f, 6e-8f, 65504.f})
    D2V2_EXPECT(d2v2_test::close(d2v2::to_float(d2v2::from_float<d2v2::f16>(v)), v, 6e-8f, 1e-3f), "f16 %f", v);
  return d2v2_test::report("test_gather");
}
