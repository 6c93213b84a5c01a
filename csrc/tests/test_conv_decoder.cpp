// conv_decoder_block epilogue CPU kernels against naive double-precision loops: the fp32 erf / exp / gelu
// polynomials against the C library in double, then forward (out, mean, rstd) and backward (grad_z,
// grad_bias) for fp32/fp64/bf16/fp16, with and without bias and residual, odd shapes (one row, one
// channel, C not a multiple of the vector width), strided rows, constant rows, a 1e4 offset, empty M,
// and grad_bias bits that do not depend on the thread count.
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "check.h"
#include "d2v2/cpu_kernels.h"

namespace {

double ulp_of(double v) {
  const float f = static_cast<float>(std::fabs(v));
  return static_cast<double>(std::nextafter(f, INFINITY) - f);
}

// erf_f32 over every 97th float of magnitude <= 6 (and its negative), plus exp_f32 and the gelu pair.
void check_math() {
  double erf_abs = 0, erf_ulp = 0;
  for (uint32_t u = 0; u <= 0x40c00000u; u += 97) {  // 0x40c00000 = 6.0f
    float x;
    std::memcpy(&x, &u, 4);
    for (float s : {x, -x}) {
      const double want = std::erf(static_cast<double>(s));
      const double err = std::fabs(static_cast<double>(d2v2::erf_f32(s)) - want);
      erf_abs = std::max(erf_abs, err);
      if (want != 0) erf_ulp = std::max(erf_ulp, err / ulp_of(want));
    }
  }
  D2V2_EXPECT(erf_abs < 1e-7, "erf_f32 max abs error %g", erf_abs);
  D2V2_EXPECT(erf_ulp < 1.1, "erf_f32 max error %g ulp", erf_ulp);
  for (float x : {6.0f, 10.0f, 1e30f, INFINITY}) {
    D2V2_EXPECT(d2v2::erf_f32(x) == 1.0f && d2v2::erf_f32(-x) == -1.0f, "erf_f32(+-%g) != +-1", x);
  }
  D2V2_EXPECT(d2v2::erf_f32(0.0f) == 0.0f, "erf_f32(0) != 0");

  double exp_ulp = 0;
  for (float x = -87.0f; x < 88.0f; x += 0.000731f) {
    const double want = std::exp(static_cast<double>(x));
    exp_ulp = std::max(exp_ulp, std::fabs(static_cast<double>(d2v2::exp_f32(x)) - want) / ulp_of(want));
  }
  D2V2_EXPECT(exp_ulp < 2.0, "exp_f32 max error %g ulp", exp_ulp);
  D2V2_EXPECT(d2v2::exp_f32(-1000.0f) >= 0.0f && d2v2::exp_f32(-1000.0f) < 1e-37f, "exp_f32 clamp");

  // gelu and gelu' in fp32 against the double formulas, over the range a layer norm can produce.
  double g_err = 0, gp_err = 0;
  for (float y = -40.0f; y < 40.0f; y += 0.000317f) {
    const double yd = y;
    const double cdf = 0.5 * (1.0 + std::erf(yd / std::sqrt(2.0)));
    const double g = yd * cdf;
    const double gp = cdf + yd * std::exp(-0.5 * yd * yd) / std::sqrt(2.0 * M_PI);
    g_err = std::max(g_err, std::fabs(d2v2::gelu_erf(y) - g) / std::max(1.0, std::fabs(g)));
    gp_err = std::max(gp_err, std::fabs(d2v2::gelu_erf_grad(y) - gp));
  }
  D2V2_EXPECT(g_err < 3e-7, "gelu_erf<float> max error %g", g_err);
  D2V2_EXPECT(gp_err < 3e-7, "gelu_erf_grad<float> max error %g", gp_err);
  D2V2_EXPECT(std::isnan(d2v2::gelu_erf(NAN)) && std::isnan(d2v2::gelu_erf_grad(NAN)), "gelu NaN propagation");
  // fp64: the library functions
  D2V2_EXPECT(std::fabs(d2v2::gelu_erf(1.0) - 0.8413447460685429) < 1e-15, "gelu_erf<double>(1)");
  D2V2_EXPECT(std::fabs(d2v2::gelu_erf_grad(1.0) - 1.0833154705876864) < 1e-15, "gelu_erf_grad<double>(1)");
}

struct Case {
  int64_t M, C;
  bool bias, residual;
  float offset = 0.f;     // added to z (z ~ offset + noise)
  float noise = 1.f;      // scale of z's noise
  int64_t row_pad = 0;    // extra elements at the end of each z / residual / grad_out row
  bool constant = false;  // row 0 of z constant
};

template <typename T>
std::vector<T> make(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = d2v2::from_float<T>(v[i]);
  return out;
}
template <>
std::vector<double> make<double>(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}

template <typename T>
double as_double(T x) {
  return static_cast<double>(d2v2::to_acc(x));
}

template <typename T>
void run_case(const Case& cs, unsigned seed, double atol, double rtol) {
  using Acc = d2v2::conv_decoder_acc_t<T>;
  const int64_t M = cs.M, C = cs.C, ld = C + cs.row_pad;
  std::vector<float> zf = d2v2_test::randn(M * ld, seed), rf = d2v2_test::randn(M * ld, seed + 1),
                     gf = d2v2_test::randn(M * ld, seed + 2), bf = d2v2_test::randn(C, seed + 3);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < C; ++c) {
      float& z = zf[m * ld + c];
      z = cs.offset + cs.noise * z;
      if (cs.constant && m == 0) z = cs.offset + 2.5f;
    }
  for (float& b : bf) b *= 0.5f;
  const std::vector<T> z = make<T>(zf), r = make<T>(rf), g = make<T>(gf), b = make<T>(bf);
  const T* bias = cs.bias ? b.data() : nullptr;
  const T* res = cs.residual ? r.data() : nullptr;

  std::vector<T> out(M * C);
  std::vector<Acc> mean(M), rstd(M);
  d2v2::cpu::conv_decoder_epilogue_forward<T>(z.data(), ld, bias, res, ld, out.data(), mean.data(), rstd.data(), M, C,
                                              1e-5);
  std::vector<T> gz(M * C);
  std::vector<Acc> gb(C, Acc(-777));
  d2v2::cpu::conv_decoder_epilogue_backward<T>(g.data(), ld, z.data(), ld, bias, mean.data(), rstd.data(), gz.data(),
                                               cs.bias ? gb.data() : nullptr, M, C);

  // Naive double loops on the values the kernel sees; v = z + bias is the op's accumulator-type sum.
  std::vector<double> want_gb(C, 0.0), abs_gb(C, 0.0);
  int bad = 0;
  for (int64_t m = 0; m < M && bad < 8; ++m) {
    std::vector<double> v(C), y(C), dy(C);
    for (int64_t c = 0; c < C; ++c) {
      const Acc vz = d2v2::to_acc(z[m * ld + c]);
      v[c] = static_cast<double>(cs.bias ? static_cast<Acc>(vz + d2v2::to_acc(b[c])) : vz);
    }
    double s = 0, q = 0;
    for (double x : v) s += x;
    const double mu = s / C;
    for (double x : v) q += (x - mu) * (x - mu);
    const double rs = 1.0 / std::sqrt(q / C + 1e-5);
    D2V2_EXPECT(std::fabs(as_double(mean[m]) - mu) <= 1e-6 * (1 + std::fabs(mu)),
                "M=%lld C=%lld mean[%lld] %.9g vs %.9g", (long long)M, (long long)C, (long long)m, as_double(mean[m]), mu);
    D2V2_EXPECT(std::fabs(as_double(rstd[m]) - rs) <= 1e-5 * rs, "M=%lld C=%lld rstd[%lld] %.9g vs %.9g", (long long)M,
                (long long)C, (long long)m, as_double(rstd[m]), rs);
    double sdy = 0, sdyy = 0;
    for (int64_t c = 0; c < C; ++c) {
      y[c] = (v[c] - mu) * rs;
      const double cdf = 0.5 * (1.0 + std::erf(y[c] / std::sqrt(2.0)));
      double o = y[c] * cdf;
      if (cs.residual) o += as_double(r[m * ld + c]);
      const double got = as_double(out[m * C + c]);
      const bool ok = std::isfinite(got) && std::fabs(got - o) <= atol + rtol * std::fabs(o);
      bad += !ok;
      D2V2_EXPECT(ok, "forward M=%lld C=%lld bias=%d res=%d offset=%g: (%lld, %lld) got %.9g want %.9g", (long long)M,
                  (long long)C, cs.bias, cs.residual, cs.offset, (long long)m, (long long)c, got, o);
      const double gp = cdf + y[c] * std::exp(-0.5 * y[c] * y[c]) / std::sqrt(2.0 * M_PI);
      dy[c] = as_double(g[m * ld + c]) * gp;
      sdy += dy[c];
      sdyy += dy[c] * y[c];
    }
    for (int64_t c = 0; c < C; ++c) {
      const double gv = rs * (dy[c] - sdy / C - y[c] * sdyy / C);
      want_gb[c] += gv;
      abs_gb[c] += std::fabs(gv);
      const double got = as_double(gz[m * C + c]);
      // the layer norm gradient scales with rstd: tolerances relative to it
      const double tol = (atol + rtol * std::fabs(gv)) * std::max(1.0, rs);
      const bool ok = std::isfinite(got) && std::fabs(got - gv) <= tol;
      bad += !ok;
      D2V2_EXPECT(ok, "backward M=%lld C=%lld bias=%d offset=%g: (%lld, %lld) got %.9g want %.9g", (long long)M,
                  (long long)C, cs.bias, cs.offset, (long long)m, (long long)c, got, gv);
    }
  }
  if (cs.bias && bad == 0)
    for (int64_t c = 0; c < C; ++c) {
      // a sum of M terms: the error scales with the sum of their magnitudes
      const double tol = atol + 4 * rtol * abs_gb[c] / std::sqrt(static_cast<double>(M));
      D2V2_EXPECT(std::fabs(as_double(gb[c]) - want_gb[c]) <= tol, "grad_bias M=%lld C=%lld [%lld] got %.9g want %.9g",
                  (long long)M, (long long)C, (long long)c, as_double(gb[c]), want_gb[c]);
    }
}

// grad_z and grad_bias bits with 1, 2 and 3 threads.
void check_thread_independence() {
#ifdef _OPENMP
  const int64_t M = 5003, C = 96;
  const std::vector<float> z = d2v2_test::randn(M * C, 11), g = d2v2_test::randn(M * C, 12),
                           b = d2v2_test::randn(C, 13);
  std::vector<float> out(M * C), mean(M), rstd(M);
  d2v2::cpu::conv_decoder_epilogue_forward<float>(z.data(), C, b.data(), nullptr, 0, out.data(), mean.data(),
                                                  rstd.data(), M, C, 1e-5);
  std::vector<float> gz_ref, gb_ref;
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    std::vector<float> gz(M * C), gb(C);
    d2v2::cpu::conv_decoder_epilogue_backward<float>(g.data(), C, z.data(), C, b.data(), mean.data(), rstd.data(),
                                                     gz.data(), gb.data(), M, C);
    if (gz_ref.empty()) {
      gz_ref = gz;
      gb_ref = gb;
    } else {
      D2V2_EXPECT(std::memcmp(gz.data(), gz_ref.data(), 4 * gz.size()) == 0, "grad_z differs with %d threads", threads);
      D2V2_EXPECT(std::memcmp(gb.data(), gb_ref.data(), 4 * gb.size()) == 0, "grad_bias differs with %d threads",
                  threads);
    }
  }
  omp_set_num_threads(saved);
#endif
}

void check_empty() {
  std::vector<float> gb(7, 1.f);
  d2v2::cpu::conv_decoder_epilogue_backward<float>(nullptr, 7, nullptr, 7, nullptr, nullptr, nullptr, nullptr,
                                                   gb.data(), 0, 7);
  for (float v : gb) D2V2_EXPECT(v == 0.f, "empty M: grad_bias not zeroed");
  d2v2::cpu::conv_decoder_epilogue_forward<float>(nullptr, 7, nullptr, nullptr, 7, nullptr, nullptr, nullptr, 0, 7,
                                                  1e-5);
}

template <typename T>
void run_all(double atol, double rtol) {
  const Case shapes[] = {
      {1, 1, true, true},   {7, 1, true, false},  {3, 3, false, true},  {37, 17, true, true}, {64, 100, true, false},
      {200, 768, true, true}, {130, 384, false, false}, {2, 1000, true, true}, {50, 33, true, true, 0.f, 1.f, 5},
      {40, 64, false, true, 0.f, 1.f, 0, true}, {3000, 48, true, false},
  };
  unsigned seed = 100;
  for (const Case& cs : shapes) run_case<T>(cs, seed++, atol, rtol);
}

}  // namespace

int main() {
  check_math();
  run_all<float>(1e-5, 1e-5);
  run_all<double>(1e-12, 1e-12);
  run_all<d2v2::bf16>(1e-2, 1e-2);
  run_all<d2v2::f16>(2e-3, 2e-3);
  // a large offset: statistics of rows sitting on 1e4 (fp32 and fp64)
  for (int64_t C : {768, 384, 33}) {
    run_case<float>({256, C, true, true, 1e4f, 1.f}, 7, 1e-5, 1e-5);
    run_case<float>({256, C, false, true, 1e4f, 0.1f}, 8, 1e-4, 1e-4);
    run_case<double>({64, C, true, true, 1e4f, 1.f}, 9, 1e-11, 1e-11);
  }
  check_thread_independence();
  check_empty();
  return d2v2_test::report("test_conv_decoder");
}
