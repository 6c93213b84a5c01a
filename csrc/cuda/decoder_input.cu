// decoder_input on CUDA: one row per (warp-sized) thread group, each output row a copy of its visible
// row, a copy of its noise row, or Philox noise drawn in registers (philox.h, shared with the CPU: one
// Philox call per thread and four consecutive normals from it).
// Backward: each visible row receives the one grad row that came from it; no atomics.
#include <cuda_runtime.h>

#include "d2v2/cuda_kernels.h"
#include "d2v2/philox.h"
#include "launch.cuh"

namespace d2v2 {
namespace cuda {

template <typename T>
__global__ void decoder_input_forward_kernel(const T* __restrict__ x_vis, int64_t x_stride_n, int64_t x_stride_k,
                                             const int64_t* __restrict__ ids, const T* __restrict__ noise,
                                             int64_t noise_stride_n, int64_t noise_stride_r, T* __restrict__ out,
                                             int64_t rows, int64_t T_len, int64_t K, int64_t C, uint64_t seed,
                                             float noise_std) {
  for (int64_t row = blockIdx.x * (int64_t)blockDim.y + threadIdx.y; row < rows;
       row += (int64_t)gridDim.x * blockDim.y) {
    const int64_t n = row / T_len;
    const int64_t r = ids[row];
    T* dst = out + row * C;
    if (r < K) {
      copy_row(x_vis + n * x_stride_n + r * x_stride_k, dst, C, threadIdx.x, blockDim.x);
    } else if (noise != nullptr) {
      copy_row(noise + n * noise_stride_n + (r - K) * noise_stride_r, dst, C, threadIdx.x, blockDim.x);
    } else {
      // Noise numbers [begin, end) of the stream: one Philox group (four numbers) per thread. The groups
      // at the two ends may straddle the neighbouring rows; their lanes outside the row are dropped.
      const uint64_t begin = static_cast<uint64_t>((n * (T_len - K) + (r - K)) * C);
      const uint64_t end = begin + static_cast<uint64_t>(C);
      const uint64_t last = (end - 1) >> 2;
      for (uint64_t g = (begin >> 2) + threadIdx.x; g <= last; g += blockDim.x) {
        const Normal4 z = philox_normal4(seed, g);
        const float lanes[4] = {z.z0, z.z1, z.z2, z.z3};
#pragma unroll
        for (int l = 0; l < 4; ++l) {
          const uint64_t i = 4 * g + static_cast<uint64_t>(l);
          if (i >= begin && i < end) dst[i - begin] = from_float<T>(lanes[l] * noise_std);
        }
      }
    }
  }
}

template <typename T>
__global__ void decoder_input_backward_kernel(const T* __restrict__ grad_out, const int64_t* __restrict__ ids,
                                              T* __restrict__ grad_x_vis, int64_t rows, int64_t T_len, int64_t K,
                                              int64_t C) {
  for (int64_t row = blockIdx.x * (int64_t)blockDim.y + threadIdx.y; row < rows;
       row += (int64_t)gridDim.x * blockDim.y) {
    const int64_t r = ids[row];
    if (r >= K) continue;  // a noise position: no gradient flows back
    const int64_t n = row / T_len;
    copy_row(grad_out + row * C, grad_x_vis + (n * K + r) * C, C, threadIdx.x, blockDim.x);
  }
}

template <typename T>
void decoder_input_forward(const T* x_vis, int64_t x_stride_n, int64_t x_stride_k, const int64_t* ids,
                           const T* noise, int64_t noise_stride_n, int64_t noise_stride_r, T* out, int64_t N,
                           int64_t T_len, int64_t K, int64_t C, uint64_t seed, float noise_std, void* stream) {
  const int64_t rows = N * T_len;
  if (rows == 0 || C == 0) return;
  const RowLaunch l = row_launch(rows, C);
  decoder_input_forward_kernel<T><<<l.grid, l.block, 0, static_cast<cudaStream_t>(stream)>>>(
      x_vis, x_stride_n, x_stride_k, ids, noise, noise_stride_n, noise_stride_r, out, rows, T_len, K, C, seed,
      noise_std);
  check_launch("decoder_input_forward");
}

template <typename T>
void decoder_input_backward(const T* grad_out, const int64_t* ids, T* grad_x_vis, int64_t N, int64_t T_len,
                            int64_t K, int64_t C, void* stream) {
  const int64_t rows = N * T_len;
  if (rows == 0 || K == 0 || C == 0) return;
  const RowLaunch l = row_launch(rows, C);
  decoder_input_backward_kernel<T><<<l.grid, l.block, 0, static_cast<cudaStream_t>(stream)>>>(
      grad_out, ids, grad_x_vis, rows, T_len, K, C);
  check_launch("decoder_input_backward");
}

#define D2V2_INSTANTIATE(T)                                                                                 \
  template void decoder_input_forward<T>(const T*, int64_t, int64_t, const int64_t*, const T*, int64_t,     \
                                         int64_t, T*, int64_t, int64_t, int64_t, int64_t, uint64_t, float,  \
                                         void*);                                                            \
  template void decoder_input_backward<T>(const T*, const int64_t*, T*, int64_t, int64_t, int64_t, int64_t, \
                                          void*);
D2V2_INSTANTIATE(float)
D2V2_INSTANTIATE(double)
D2V2_INSTANTIATE(bf16)
D2V2_INSTANTIATE(f16)
#undef D2V2_INSTANTIATE

}  // namespace cuda
}  // namespace d2v2
