// ema_update CPU kernel against a naive per-element loop: fp32 and bf16 teachers, fp32/bf16/fp16/fp64
// students, one mixed list cut into chunks that straddle tensor ends, odd sizes, decay 0 and 1.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "check.h"
#include "d2v2/cpu_kernels.h"

using d2v2::bf16;
using d2v2::EmaDtype;
using d2v2::f16;

template <typename T>
EmaDtype dtype_of();
template <>
EmaDtype dtype_of<float>() { return EmaDtype::f32; }
template <>
EmaDtype dtype_of<double>() { return EmaDtype::f64; }
template <>
EmaDtype dtype_of<bf16>() { return EmaDtype::bf16; }
template <>
EmaDtype dtype_of<f16>() { return EmaDtype::f16; }

template <typename T>
std::vector<T> random_values(size_t n, unsigned seed) {
  const std::vector<float> v = d2v2_test::randn(n, seed);
  std::vector<T> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = d2v2::from_float<T>(v[i]);
  return out;
}

// The chunk list the bindings build: kEmaChunkElements-sized slices of every tensor, in order.
std::vector<d2v2::cpu::EmaChunk> chunk_list(const std::vector<int64_t>& sizes, int64_t chunk_elements) {
  std::vector<d2v2::cpu::EmaChunk> chunks;
  for (size_t i = 0; i < sizes.size(); ++i)
    for (int64_t start = 0; start < sizes[i]; start += chunk_elements)
      chunks.push_back({static_cast<int64_t>(i), start, std::min(chunk_elements, sizes[i] - start)});
  return chunks;
}

// One pair on its own: naive fp32 loop (what the reference computes) vs the kernel.
template <typename Teacher, typename Student>
void run_pair(int64_t n, double decay, unsigned seed, float tol, int64_t chunk_elements) {
  std::vector<Teacher> teacher = random_values<Teacher>(n, seed);
  const std::vector<Student> student = random_values<Student>(n, seed + 7);
  std::vector<float> expect(n);
  const float d = static_cast<float>(decay), omd = static_cast<float>(1.0 - decay);
  for (int64_t i = 0; i < n; ++i) {
    const float want = d * d2v2::to_float(teacher[i]) + omd * d2v2::to_float(student[i]);
    expect[i] = d2v2::to_float(d2v2::from_float<Teacher>(want));  // rounded once, as the teacher stores it
  }
  const d2v2::cpu::EmaTensor pair{teacher.data(), student.data(), dtype_of<Teacher>(), dtype_of<Student>()};
  const auto chunks = chunk_list({n}, chunk_elements);
  d2v2::cpu::ema_update(&pair, chunks.data(), static_cast<int64_t>(chunks.size()), decay, 1.0 - decay);
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i)
    if (!d2v2_test::close(d2v2::to_float(teacher[i]), expect[i], tol, tol)) ++bad;
  D2V2_EXPECT(bad == 0, "n=%lld decay=%g: %lld of %lld elements differ", (long long)n, decay, (long long)bad,
              (long long)n);
}

// The exact ends: decay 1 keeps the teacher bit for bit, decay 0 copies the (rounded) student.
void run_exact_ends() {
  const int64_t n = 1000;
  for (double decay : {0.0, 1.0}) {
    std::vector<float> teacher = random_values<float>(n, 3);
    const std::vector<float> before = teacher;
    const std::vector<bf16> student = random_values<bf16>(n, 4);
    const d2v2::cpu::EmaTensor pair{teacher.data(), student.data(), EmaDtype::f32, EmaDtype::bf16};
    const auto chunks = chunk_list({n}, 256);
    d2v2::cpu::ema_update(&pair, chunks.data(), static_cast<int64_t>(chunks.size()), decay, 1.0 - decay);
    for (int64_t i = 0; i < n; ++i) {
      const float want = decay == 1.0 ? before[i] : d2v2::to_float(student[i]);
      D2V2_EXPECT(teacher[i] == want, "decay=%g i=%lld: %f != %f", decay, (long long)i, teacher[i], want);
    }
  }
}

// A mixed-dtype list in one call, as a model's parameter list arrives: every tensor updated, none
// touched twice, chunk boundaries inside and at the ends of tensors.
void run_mixed_list() {
  const std::vector<int64_t> sizes = {1, 7, 1000, 4096, 5003, 0, 33};
  const double decay = 0.9998;
  std::vector<std::vector<float>> t32, s32;
  std::vector<std::vector<float>> t_mixed;
  std::vector<std::vector<bf16>> s_bf16;
  std::vector<d2v2::cpu::EmaTensor> pairs;
  t32.reserve(sizes.size());
  s32.reserve(sizes.size());
  s_bf16.reserve(sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    t32.push_back(random_values<float>(sizes[i], 100 + i));
    if (i % 2 == 0) {
      s32.push_back(random_values<float>(sizes[i], 200 + i));
      s_bf16.emplace_back();
      pairs.push_back({t32[i].data(), s32[i].data(), EmaDtype::f32, EmaDtype::f32});
    } else {
      s32.emplace_back();
      s_bf16.push_back(random_values<bf16>(sizes[i], 200 + i));
      pairs.push_back({t32[i].data(), s_bf16[i].data(), EmaDtype::f32, EmaDtype::bf16});
    }
  }
  std::vector<std::vector<float>> expect = t32;
  const float d = static_cast<float>(decay), omd = static_cast<float>(1.0 - decay);
  for (size_t i = 0; i < sizes.size(); ++i)
    for (int64_t j = 0; j < sizes[i]; ++j) {
      const float s = i % 2 == 0 ? s32[i][j] : d2v2::to_float(s_bf16[i][j]);
      expect[i][j] = d * expect[i][j] + omd * s;
    }
  const auto chunks = chunk_list(sizes, 1024);
  d2v2::cpu::ema_update(pairs.data(), chunks.data(), static_cast<int64_t>(chunks.size()), decay, 1.0 - decay);
  for (size_t i = 0; i < sizes.size(); ++i) {
    int64_t bad = 0;
    for (int64_t j = 0; j < sizes[i]; ++j)
      if (!d2v2_test::close(t32[i][j], expect[i][j], 1e-6f, 1e-6f)) ++bad;
    D2V2_EXPECT(bad == 0, "mixed list tensor %zu (%lld elements): %lld differ", i, (long long)sizes[i],
                (long long)bad);
  }
}

// The branchless fp16 load of ema.h against common.h's reference conversion, every bit pattern.
void run_f16_load() {
  int64_t bad = 0;
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const f16 h{static_cast<uint16_t>(bits)};
    const uint32_t got = d2v2::float_to_bits(d2v2::f16_to_float_branchless(h));
    const uint32_t want = d2v2::float_to_bits(d2v2::to_float(h));
    if (got != want) ++bad;
  }
  D2V2_EXPECT(bad == 0, "f16_to_float_branchless: %lld of 65536 inputs differ from to_float", (long long)bad);
}

int main() {
  run_f16_load();
  const int64_t chunk = d2v2::cpu::kEmaChunkElements;
  for (int64_t n : {int64_t(1), int64_t(7), int64_t(1000), chunk + 3, 3 * chunk}) {
    for (double decay : {0.9998, 0.5, 0.0, 1.0}) {
      run_pair<float, float>(n, decay, 1, 1e-6f, chunk);
      run_pair<float, bf16>(n, decay, 2, 1e-6f, chunk);
      run_pair<float, f16>(n, decay, 3, 1e-6f, chunk);
      run_pair<float, double>(n, decay, 4, 1e-6f, chunk);
      run_pair<bf16, bf16>(n, decay, 5, 1e-2f, chunk);  // one bf16 rounding apart at most
      run_pair<bf16, float>(n, decay, 6, 1e-2f, chunk);
    }
  }
  run_pair<float, bf16>(10007, 0.99, 7, 1e-6f, 100);  // many small chunks
  run_exact_ends();
  run_mixed_list();
  return d2v2_test::report("test_ema");
}
