// gather_visible on the CPU: a row copy forward, a deterministic owner-computes accumulation backward.
#include <algorithm>
#include <cstring>
#include <vector>

#include "d2v2/cpu_kernels.h"

namespace d2v2 {
namespace cpu {

template <typename T>
void gather_visible_forward(const T* x, int64_t x_stride_b, int64_t x_stride_t, const int64_t* ids,
                            T* out, int64_t N, int64_t K, int64_t C, int64_t clones) {
  const int64_t rows = N * K;
#pragma omp parallel for schedule(static) if (rows * C > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = r / K;
    const T* src = x + (n / clones) * x_stride_b + ids[r] * x_stride_t;
    std::memcpy(out + r * C, src, sizeof(T) * C);
  }
}

// Channel tile owned by one task in the backward: small enough that the fp32 accumulator of a
// whole sample ([T, tile]) stays in L2, large enough for long vector loops.
constexpr int64_t kGatherTile = 64;

template <typename T>
void gather_visible_backward(const T* grad_out, int64_t g_stride_n, int64_t g_stride_k,
                             const int64_t* ids, T* grad_x, int64_t B, int64_t T_len, int64_t K,
                             int64_t C, int64_t clones) {
  using acc_t = typename acc_type<T>::type;
  const int64_t tiles = (C + kGatherTile - 1) / kGatherTile;
#pragma omp parallel
  {
    std::vector<acc_t> acc(static_cast<size_t>(T_len * std::min(C, kGatherTile)));
#pragma omp for schedule(static) collapse(2)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t c0 = tile * kGatherTile;
        const int64_t w = std::min(kGatherTile, C - c0);
        std::fill(acc.begin(), acc.begin() + T_len * w, acc_t(0));
        // Every clone row of this sample scatters into the task-private accumulator.
        for (int64_t n = b * clones; n < (b + 1) * clones; ++n) {
          for (int64_t j = 0; j < K; ++j) {
            const T* g = grad_out + n * g_stride_n + j * g_stride_k + c0;
            acc_t* a = acc.data() + ids[n * K + j] * w;
#pragma omp simd
            for (int64_t c = 0; c < w; ++c) a[c] += to_acc(g[c]);
          }
        }
        for (int64_t t = 0; t < T_len; ++t) {
          T* dst = grad_x + (b * T_len + t) * C + c0;
          const acc_t* a = acc.data() + t * w;
#pragma omp simd
          for (int64_t c = 0; c < w; ++c) dst[c] = from_acc<T>(a[c]);
        }
      }
    }
  }
}

#define D2V2_INSTANTIATE(T)                                                                       \
  template void gather_visible_forward<T>(const T*, int64_t, int64_t, const int64_t*, T*, int64_t, \
                                          int64_t, int64_t, int64_t);                            \
  template void gather_visible_backward<T>(const T*, int64_t, int64_t, const int64_t*, T*,        \
                                           int64_t, int64_t, int64_t, int64_t, int64_t);
D2V2_INSTANTIATE(float)
D2V2_INSTANTIATE(double)
D2V2_INSTANTIATE(bf16)
D2V2_INSTANTIATE(f16)
#undef D2V2_INSTANTIATE

}  // namespace cpu
}  // namespace d2v2
