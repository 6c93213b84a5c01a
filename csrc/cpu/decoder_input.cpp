// decoder_input on the CPU: one pass over the output rows, each a copy of its visible row, a copy of
// its noise row, or a row of Philox noise drawn in place (never a separate noise tensor).
#include <cstring>

#include "d2v2/cpu_kernels.h"
#include "d2v2/philox.h"

namespace d2v2 {
namespace cpu {

template <typename T>
void decoder_input_forward(const T* x_vis, int64_t x_stride_n, int64_t x_stride_k, const int64_t* ids,
                           const T* noise, int64_t noise_stride_n, int64_t noise_stride_r, T* out,
                           int64_t N, int64_t T_len, int64_t K, int64_t C, uint64_t seed, float noise_std) {
  const int64_t rows = N * T_len;
  const int64_t masked = T_len - K;
  // A drawn element costs a few ns against a copied one's fraction of one: a lower bar for threads.
  const int64_t work = rows * C * (noise == nullptr ? 16 : 1);
#pragma omp parallel for schedule(static) if (work > 32768)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t n = row / T_len;
    const int64_t r = ids[row];
    T* dst = out + row * C;
    if (r < K) {
      std::memcpy(dst, x_vis + n * x_stride_n + r * x_stride_k, sizeof(T) * C);
    } else if (noise != nullptr) {
      std::memcpy(dst, noise + n * noise_stride_n + (r - K) * noise_stride_r, sizeof(T) * C);
    } else {
      const uint64_t base = static_cast<uint64_t>((n * masked + (r - K)) * C);
      // philox.h is branch-free integer and polynomial arithmetic: this loop vectorises.
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        dst[c] = from_float<T>(philox_normal(seed, base + static_cast<uint64_t>(c)) * noise_std);
      }
    }
  }
}

template <typename T>
void decoder_input_backward(const T* grad_out, int64_t g_stride_n, int64_t g_stride_t, const int64_t* ids,
                            T* grad_x_vis, int64_t N, int64_t T_len, int64_t K, int64_t C) {
  const int64_t rows = N * T_len;
#pragma omp parallel for schedule(static) if (rows * C > 32768)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t r = ids[row];
    if (r >= K) continue;  // a noise position: no gradient flows back
    const int64_t n = row / T_len, t = row - n * T_len;
    std::memcpy(grad_x_vis + (n * K + r) * C, grad_out + n * g_stride_n + t * g_stride_t, sizeof(T) * C);
  }
}

#define D2V2_INSTANTIATE(T)                                                                              \
  template void decoder_input_forward<T>(const T*, int64_t, int64_t, const int64_t*, const T*, int64_t,  \
                                         int64_t, T*, int64_t, int64_t, int64_t, int64_t, uint64_t, float); \
  template void decoder_input_backward<T>(const T*, int64_t, int64_t, const int64_t*, T*, int64_t, int64_t, \
                                          int64_t, int64_t);
D2V2_INSTANTIATE(float)
D2V2_INSTANTIATE(double)
D2V2_INSTANTIATE(bf16)
D2V2_INSTANTIATE(f16)
#undef D2V2_INSTANTIATE

}  // namespace cpu
}  // namespace d2v2
