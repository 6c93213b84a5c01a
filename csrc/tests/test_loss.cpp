// masked_regression_loss CPU kernels against naive loops over loss.h's per-element math, in fp32 and bf16
// pred (fp32 and bf16 targets), MSE and smooth-L1: per-token losses, row partials, the backward (zeros
// at uncounted tokens), the gradient computed in the forward, strided pred, and a grad large enough for
// the non-temporal store path.
#include <cstdint>
#include <cstdlib>
#include <random>
#include <vector>

#include "check.h"
#include "d2v2/cpu_kernels.h"
#include "d2v2/loss.h"

using d2v2::bf16;

template <typename T>
static std::vector<T> convert(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = d2v2::from_float<T>(v[i]);
  return out;
}

// 64-byte aligned storage (as torch allocates), so the streaming path can be taken.
template <typename T>
struct Aligned {
  T* p;
  size_t n;
  explicit Aligned(size_t count) : n(count) {
    p = static_cast<T*>(std::aligned_alloc(64, ((count * sizeof(T) + 63) / 64) * 64));
  }
  ~Aligned() { std::free(p); }
  Aligned(const Aligned&) = delete;
  Aligned& operator=(const Aligned&) = delete;
};

template <typename P, typename Tg>
static void run_case(int64_t B, int64_t T_len, int64_t C, int64_t clones, double beta, double frac, unsigned seed,
                     float tol, int64_t pad = 0) {
  const int64_t N = B * clones;
  const int64_t row = C + pad;  // pred row stride: pad > 0 makes pred a strided view
  const std::vector<P> pred = convert<P>(d2v2_test::randn(N * T_len * row, seed));
  const std::vector<Tg> target = convert<Tg>(d2v2_test::randn(B * T_len * C, seed + 1));
  std::mt19937 gen(seed + 2);
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<uint8_t> mask(N * T_len);
  for (auto& m : mask) m = u(gen) < frac;
  const double scale = 0.125;
  const d2v2::RegressionParams<float> prm = d2v2::make_regression_params<float>(beta);
  auto diff = [&](int64_t n, int64_t t, int64_t c) {
    return d2v2::to_float(pred[(n * T_len + t) * row + c]) - d2v2::to_float(target[((n / clones) * T_len + t) * C + c]);
  };

  // Naive forward: per-token losses in fp64 from loss.h's fp32 terms.
  std::vector<double> want_tok(N * T_len, 0.0);
  double want_total = 0;
  int64_t want_count = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t t = 0; t < T_len; ++t) {
      if (!mask[n * T_len + t]) continue;
      double s = 0;
      for (int64_t c = 0; c < C; ++c)
        s += beta > 0 ? d2v2::regression_term<true>(diff(n, t, c), prm) : d2v2::regression_term<false>(diff(n, t, c), prm);
      want_tok[n * T_len + t] = scale * s;
      want_total += scale * s;
      ++want_count;
    }

  std::vector<float> tok(N * T_len, -1.f);
  std::vector<double> row_sum(N);
  std::vector<int64_t> row_count(N);
  d2v2::cpu::masked_regression_loss_forward<P, Tg>(pred.data(), T_len * row, row, target.data(), T_len * C, C,
                                                   mask.data(), T_len, 1, N, T_len, C, clones, scale, beta, tok.data(),
                                                   row_sum.data(), row_count.data(), nullptr, 0.0);
  for (int64_t i = 0; i < N * T_len; ++i)
    D2V2_EXPECT(d2v2_test::close(tok[i], static_cast<float>(want_tok[i]), 1e-5f, 1e-5f), "token %lld: %f != %f",
                (long long)i, tok[i], want_tok[i]);
  int64_t count = -1;
  const double total = d2v2::cpu::reduce_row_partials(row_sum.data(), row_count.data(), N, &count);
  D2V2_EXPECT(count == want_count, "count %lld != %lld", (long long)count, (long long)want_count);
  D2V2_EXPECT(d2v2_test::close(static_cast<float>(total), static_cast<float>(want_total), 1e-4f, 1e-5f),
              "total %f != %f", total, want_total);

  // Naive backward for a per-token incoming gradient g[n, t] and coefficient k: g * k * l'(d), 0 elsewhere.
  const std::vector<float> g = d2v2_test::randn(N * T_len, seed + 3);
  const double k = 0.25;
  auto want_grad = [&](int64_t n, int64_t t, int64_t c, float w) -> float {
    if (!mask[n * T_len + t]) return 0.f;
    const float d = diff(n, t, c);
    return w * (beta > 0 ? d2v2::regression_grad<true>(d, prm) : d2v2::regression_grad<false>(d, prm));
  };
  Aligned<P> grad(N * T_len * C);
  for (size_t i = 0; i < grad.n; ++i) grad.p[i] = d2v2::from_float<P>(12345.f);  // every element must be written
  d2v2::cpu::masked_regression_loss_backward<P, Tg>(pred.data(), T_len * row, row, target.data(), T_len * C, C,
                                                    mask.data(), T_len, 1, g.data(), T_len, 1, k, N, T_len, C, clones,
                                                    beta, grad.p);
  int64_t bad = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t t = 0; t < T_len; ++t)
      for (int64_t c = 0; c < C; ++c) {
        const float got = d2v2::to_float(grad.p[(n * T_len + t) * C + c]);
        const float want = want_grad(n, t, c, g[n * T_len + t] * static_cast<float>(k));
        if (!(mask[n * T_len + t] ? d2v2_test::close(got, want, tol, tol) : got == 0.f) && bad++ < 5)
          D2V2_EXPECT(false, "grad n=%lld t=%lld c=%lld: %f != %f", (long long)n, (long long)t, (long long)c, got, want);
      }
  D2V2_EXPECT(bad == 0, "%lld grad elements wrong", (long long)bad);

  // The gradient in the forward pass: grad_coef * l'(d) (a scalar incoming gradient).
  const double coef = 0.5;
  for (size_t i = 0; i < grad.n; ++i) grad.p[i] = d2v2::from_float<P>(12345.f);
  d2v2::cpu::masked_regression_loss_forward<P, Tg>(pred.data(), T_len * row, row, target.data(), T_len * C, C,
                                                   mask.data(), T_len, 1, N, T_len, C, clones, scale, beta, nullptr,
                                                   row_sum.data(), row_count.data(), grad.p, coef);
  bad = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t t = 0; t < T_len; ++t)
      for (int64_t c = 0; c < C; ++c) {
        const float got = d2v2::to_float(grad.p[(n * T_len + t) * C + c]);
        const float want = want_grad(n, t, c, static_cast<float>(coef));
        if (!(mask[n * T_len + t] ? d2v2_test::close(got, want, tol, tol) : got == 0.f) && bad++ < 5)
          D2V2_EXPECT(false, "fwd grad n=%lld t=%lld c=%lld: %f != %f", (long long)n, (long long)t, (long long)c, got,
                      want);
      }
  D2V2_EXPECT(bad == 0, "%lld forward-grad elements wrong", (long long)bad);
  const double total2 = d2v2::cpu::reduce_row_partials(row_sum.data(), row_count.data(), N, &count);
  D2V2_EXPECT(total2 == total, "total with grad %f != %f", total2, total);
}

int main() {
  for (double beta : {0.0, 0.5}) {
    run_case<float, float>(2, 196, 96, 4, beta, 0.8, 1, 1e-5f);  // image-like grid, C a multiple of 16
    run_case<float, float>(3, 7, 37, 1, beta, 0.5, 2, 1e-5f);    // clones = 1, C with a vector tail
    run_case<float, float>(2, 5, 20, 2, beta, 0.6, 3, 1e-5f, 3);  // strided pred rows
    run_case<float, float>(2, 1, 8, 3, beta, 1.0, 4, 1e-5f);     // T = 1, all counted
    run_case<float, float>(2, 9, 16, 2, beta, 0.0, 5, 0.f);      // nothing counted: zero gradient
    run_case<bf16, float>(2, 50, 64, 3, beta, 0.5, 6, 2e-2f);
    run_case<bf16, float>(2, 13, 37, 2, beta, 0.7, 7, 2e-2f);
    run_case<bf16, bf16>(2, 13, 70, 2, beta, 0.7, 8, 2e-2f);
    run_case<float, bf16>(2, 13, 70, 2, beta, 0.7, 9, 1e-5f);
    // 38 MB of grad each (fp32 B=2, bf16 B=8): above the streaming threshold (non-temporal stores).
    run_case<float, float>(2, 196, 768, 16, beta, 0.8, 10, 1e-5f);
    run_case<bf16, float>(8, 196, 768, 16, beta, 0.8, 11, 2e-2f);
  }
  // loss.h at a few points, against the textbook definitions.
  const d2v2::RegressionParams<float> p = d2v2::make_regression_params<float>(0.5);
  D2V2_EXPECT(d2v2::smooth_l1_term(0.25f, p) == 0.0625f, "smooth-L1 inside");
  D2V2_EXPECT(d2v2::smooth_l1_term(-2.f, p) == 1.75f, "smooth-L1 outside");
  D2V2_EXPECT(d2v2::smooth_l1_grad(0.25f, p) == 0.5f && d2v2::smooth_l1_grad(-2.f, p) == -1.f, "smooth-L1 grad");
  D2V2_EXPECT(d2v2::mse_term(-3.f) == 9.f && d2v2::mse_grad(-3.f) == -6.f, "mse");
  return d2v2_test::report("test_loss");
}
