// layer_average_targets CPU kernel against a naive double-precision loop: every (layer_norm, final_norm)
// pair, with and without padding (a fully padded sample, a single valid step), layers with their own
// strides (the list input), fp32/bf16/fp16/fp64, odd shapes, constant channels and a 1e4 offset.
#include <cstdint>
#include <vector>

#include "check.h"
#include "d2v2/cpu_kernels.h"

using d2v2::TargetNorm;

namespace {

using Tensor = std::vector<double>;  // [B, T, C]

// Normalise in place over t per (b, c) (instance) or over c per (b, t) (layer), valid steps only.
void naive_norm(Tensor& y, const std::vector<bool>& pad, int64_t B, int64_t T, int64_t C, TargetNorm norm,
                double eps) {
  auto at = [&](int64_t b, int64_t t, int64_t c) -> double& { return y[(b * T + t) * C + c]; };
  if (norm == TargetNorm::instance) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) {
        double s = 0, n = 0;
        for (int64_t t = 0; t < T; ++t)
          if (!pad[b * T + t]) s += at(b, t, c), n += 1;
        if (n == 0) continue;
        const double mean = s / n;
        double q = 0;
        for (int64_t t = 0; t < T; ++t)
          if (!pad[b * T + t]) q += (at(b, t, c) - mean) * (at(b, t, c) - mean);
        const double rstd = 1.0 / std::sqrt(q / n + eps);
        for (int64_t t = 0; t < T; ++t)
          if (!pad[b * T + t]) at(b, t, c) = (at(b, t, c) - mean) * rstd;
      }
  } else if (norm == TargetNorm::layer) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        if (pad[b * T + t]) continue;
        double s = 0, q = 0;
        for (int64_t c = 0; c < C; ++c) s += at(b, t, c);
        const double mean = s / C;
        for (int64_t c = 0; c < C; ++c) q += (at(b, t, c) - mean) * (at(b, t, c) - mean);
        const double rstd = 1.0 / std::sqrt(q / C + eps);
        for (int64_t c = 0; c < C; ++c) at(b, t, c) = (at(b, t, c) - mean) * rstd;
      }
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      if (pad[b * T + t])
        for (int64_t c = 0; c < C; ++c) at(b, t, c) = 0;
}

Tensor naive_targets(const std::vector<Tensor>& layers, const std::vector<bool>& pad, int64_t B, int64_t T,
                     int64_t C, TargetNorm ln, TargetNorm fn, double eps) {
  Tensor avg(B * T * C, 0.0);
  for (Tensor y : layers) {
    naive_norm(y, pad, B, T, C, ln, eps);
    for (size_t i = 0; i < avg.size(); ++i) avg[i] += y[i];
  }
  for (double& v : avg) v /= static_cast<double>(layers.size());
  naive_norm(avg, pad, B, T, C, fn, eps);
  return avg;
}

struct Case {
  int64_t K, B, T, C;
  TargetNorm ln, fn;
  bool padded;
  float offset = 0.f;        // added to every input value
  bool constant = false;     // channel 0 of every layer constant over t
  int64_t row_pad = 0;       // extra elements at the end of each input row (strided layers)
};

template <typename T>
void run_case(const Case& cs, unsigned seed, float atol, float rtol) {
  const int64_t K = cs.K, B = cs.B, T_len = cs.T, C = cs.C;
  const int64_t row = C + cs.row_pad;
  // Layer k lives in its own buffer with step stride `row` and sample stride T * row + k: a list.
  std::vector<std::vector<T>> store(K);
  std::vector<Tensor> exact(K);  // the values the kernel sees, in double
  std::vector<const T*> ptrs(K);
  std::vector<int64_t> strides(2 * K);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t sb = T_len * row + k;
    std::vector<float> r = d2v2_test::randn(B * sb, seed + 17 * k);
    store[k].resize(B * sb);
    exact[k].assign(B * T_len * C, 0.0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T_len; ++t)
        for (int64_t c = 0; c < C; ++c) {
          float v = cs.offset + r[b * sb + t * row + c] * (1.0f + 0.1f * k);
          if (cs.constant && c == 0) v = cs.offset + 3.0f;
          const T q = d2v2::from_float<T>(v);
          store[k][b * sb + t * row + c] = q;
          exact[k][(b * T_len + t) * C + c] = static_cast<double>(d2v2::target_load(q));
        }
    ptrs[k] = store[k].data();
    strides[2 * k] = sb;
    strides[2 * k + 1] = row;
  }
  std::vector<bool> pad(B * T_len, false);
  std::vector<char> pad_bytes(B * T_len, 0);
  if (cs.padded) {
    for (int64_t b = 0; b < B; ++b) {
      // sample 0 fully valid, 1 a single valid step, 2 fully padded, others about half
      const int64_t valid = b == 0 ? T_len : b == 1 ? 1 : b == 2 ? 0 : (T_len + 1) / 2 + b % 3;
      for (int64_t t = 0; t < T_len; ++t) pad[b * T_len + t] = t >= valid;
    }
    for (size_t i = 0; i < pad.size(); ++i) pad_bytes[i] = pad[i];
  }
  using Acc = d2v2::target_acc_t<T>;
  std::vector<Acc> out(B * T_len * C, Acc(-777));
  d2v2::cpu::layer_average_targets<T>(ptrs.data(), strides.data(),
                                      cs.padded ? reinterpret_cast<const bool*>(pad_bytes.data()) : nullptr,
                                      out.data(), K, B, T_len, C, cs.ln, cs.fn, 1e-5);
  const Tensor want = naive_targets(exact, pad, B, T_len, C, cs.ln, cs.fn, 1e-5);
  int bad = 0;
  for (size_t i = 0; i < out.size() && bad < 5; ++i) {
    const double got = static_cast<double>(out[i]);
    const bool ok = std::isfinite(got) && std::fabs(got - want[i]) <= atol + rtol * std::fabs(want[i]);
    if (!ok) ++bad;
    D2V2_EXPECT(ok, "K=%lld B=%lld T=%lld C=%lld ln=%d fn=%d pad=%d offset=%g: i=%zu got %.9g want %.9g",
                (long long)K, (long long)B, (long long)T_len, (long long)C, (int)cs.ln, (int)cs.fn, (int)cs.padded,
                cs.offset, i, got, want[i]);
  }
  if (cs.padded)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T_len; ++t)
        if (pad[b * T_len + t])
          for (int64_t c = 0; c < C; ++c)
            D2V2_EXPECT(out[(b * T_len + t) * C + c] == Acc(0), "padded (%lld, %lld) not 0", (long long)b,
                        (long long)t);
}

// The shared statistics math: chunks of 4 merged by Chan's rule, then single Welford steps, against a
// double two-pass, on values with a 1e4 offset (shifted) and on constant values.
void check_welford() {
  std::vector<float> v = d2v2_test::randn(103, 7);
  for (float& x : v) x = 1e4f + x;
  const float shift = v[0];
  float mean = 0, m2 = 0, n = 0;
  size_t i = 0;
  for (; i + 4 <= v.size(); i += 4, n += 4) {
    float cm, cq;
    d2v2::chunk4_stats(v[i] - shift, v[i + 1] - shift, v[i + 2] - shift, v[i + 3] - shift, cm, cq);
    d2v2::welford_merge(mean, m2, cm, cq, n, 4.f / (n + 4.f));
  }
  for (; i < v.size(); ++i) {
    n += 1;
    d2v2::welford_push(v[i] - shift, 1.f / n, mean, m2);
  }
  double s = 0, q = 0;
  for (float x : v) s += x;
  const double dm = s / v.size();
  for (float x : v) q += (x - dm) * (x - dm);
  D2V2_EXPECT(std::fabs((shift + static_cast<double>(mean)) - dm) < 1e-5, "welford mean %.9g vs %.9g",
              shift + static_cast<double>(mean), dm);
  D2V2_EXPECT(std::fabs(m2 / q - 1) < 1e-5, "welford m2 %.9g vs %.9g", (double)m2, q);
  float cm, cq;
  d2v2::chunk4_stats(0.f, 0.f, 0.f, 0.f, cm, cq);
  D2V2_EXPECT(cm == 0.f && cq == 0.f, "constant chunk");
  D2V2_EXPECT(d2v2::target_rstd(0.f, 5.f, 1e-5f) == 1.0f / std::sqrt(1e-5f), "rstd of a constant");
}

}  // namespace

int main() {
  check_welford();
  const TargetNorm norms[] = {TargetNorm::none, TargetNorm::instance, TargetNorm::layer};
  unsigned seed = 1;
  for (TargetNorm ln : norms)
    for (TargetNorm fn : norms)
      for (bool padded : {false, true}) {
        run_case<float>({3, 5, 13, 37, ln, fn, padded, 0.f, false, 3}, seed++, 1e-5f, 1e-5f);
        run_case<float>({2, 1, 9, 300, ln, fn, false}, seed++, 1e-5f, 1e-5f);  // B = 1: split channel tiles
        run_case<d2v2::bf16>({4, 4, 11, 64, ln, fn, padded}, seed++, 2e-5f, 2e-5f);
        run_case<d2v2::f16>({2, 4, 10, 20, ln, fn, padded}, seed++, 2e-5f, 2e-5f);
        run_case<double>({3, 4, 7, 33, ln, fn, padded}, seed++, 1e-10f, 1e-10f);
      }
  // Odd shapes: T = 1, K = 1, C = 1.
  for (TargetNorm ln : norms)
    for (TargetNorm fn : norms) {
      run_case<float>({2, 3, 1, 37, ln, fn, false}, seed++, 1e-5f, 1e-5f);
      run_case<float>({1, 2, 8, 1, ln, fn, false}, seed++, 1e-5f, 1e-5f);
    }
  // The image config at a reduced size: IN -> average -> LN, K = 10.
  run_case<float>({10, 4, 196, 96, TargetNorm::instance, TargetNorm::layer, false}, seed++, 1e-5f, 1e-5f);
  // A 1e4 offset: shifted statistics keep fp32 accuracy; constant channels give 0, not NaN.
  for (TargetNorm ln : {TargetNorm::instance, TargetNorm::layer})
    for (TargetNorm fn : norms) {
      run_case<float>({3, 4, 50, 40, ln, fn, true, 1e4f}, seed++, 2e-5f, 2e-5f);
      run_case<float>({2, 3, 16, 24, ln, fn, true, 1e4f, true}, seed++, 2e-5f, 2e-5f);
    }
  return d2v2_test::report("test_targets");
}
