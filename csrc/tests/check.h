// Minimal test harness for the standalone CTest suite: no framework, a count of failed checks.
#pragma once

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace d2v2_test {

inline int& failures() {
  static int n = 0;
  return n;
}

#define D2V2_EXPECT(cond, ...)                                  \
  do {                                                          \
    if (!(cond)) {                                              \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);          \
      std::printf(__VA_ARGS__);                                 \
      std::printf("\n");                                        \
      ++::d2v2_test::failures();                                \
    }                                                           \
  } while (0)

inline bool close(float a, float b, float atol, float rtol) { return std::fabs(a - b) <= atol + rtol * std::fabs(b); }

inline std::vector<float> randn(size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

inline int report(const char* name) {
  if (failures()) {
    std::printf("%s: %d check(s) failed\n", name, failures());
    return 1;
  }
  std::printf("%s: all checks passed\n", name);
  return 0;
}

}  // namespace d2v2_test
