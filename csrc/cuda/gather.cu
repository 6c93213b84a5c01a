// gather_visible on CUDA: one warp-strided row copy per output row forward, and a segmented sum per
// input row backward (CSR built by the binding), so no atomics and a deterministic result.
#include <cuda_runtime.h>

#include "d2v2/cuda_kernels.h"
#include "launch.cuh"

namespace d2v2 {
namespace cuda {

template <typename T>
__global__ void gather_forward_kernel(const T* __restrict__ x, int64_t x_stride_b, int64_t x_stride_t,
                                      const int64_t* __restrict__ ids, T* __restrict__ out, int64_t rows,
                                      int64_t K, int64_t C, int64_t clones) {
  for (int64_t r = blockIdx.x * (int64_t)blockDim.y + threadIdx.y; r < rows;
       r += (int64_t)gridDim.x * blockDim.y) {
    const T* src = x + ((r / K) / clones) * x_stride_b + ids[r] * x_stride_t;
    copy_row(src, out + r * C, C, threadIdx.x, blockDim.x);
  }
}

template <typename T>
__global__ void gather_backward_kernel(const T* __restrict__ grad_out, const int64_t* __restrict__ rows_by_target,
                                       const int64_t* __restrict__ segment_start, T* __restrict__ grad_x,
                                       int64_t BT, int64_t C) {
  for (int64_t r = blockIdx.x * (int64_t)blockDim.y + threadIdx.y; r < BT; r += (int64_t)gridDim.x * blockDim.y) {
    const int64_t s0 = segment_start[r], s1 = segment_start[r + 1];
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      typename acc_type<T>::type acc = 0;
      for (int64_t s = s0; s < s1; ++s) acc += to_acc(grad_out[rows_by_target[s] * C + c]);
      grad_x[r * C + c] = from_acc<T>(acc);
    }
  }
}

template <typename T>
void gather_visible_forward(const T* x, int64_t x_stride_b, int64_t x_stride_t, const int64_t* ids, T* out,
                            int64_t N, int64_t K, int64_t C, int64_t clones, void* stream) {
  const int64_t rows = N * K;
  if (rows == 0 || C == 0) return;
  const RowLaunch l = row_launch(rows, C);
  gather_forward_kernel<T><<<l.grid, l.block, 0, static_cast<cudaStream_t>(stream)>>>(
      x, x_stride_b, x_stride_t, ids, out, rows, K, C, clones);
  check_launch("gather_visible_forward");
}

template <typename T>
void gather_visible_backward(const T* grad_out, const int64_t* rows_by_target, const int64_t* segment_start,
                             T* grad_x, int64_t BT, int64_t C, void* stream) {
  if (BT == 0 || C == 0) return;
  const RowLaunch l = row_launch(BT, C);
  gather_backward_kernel<T><<<l.grid, l.block, 0, static_cast<cudaStream_t>(stream)>>>(
      grad_out, rows_by_target, segment_start, grad_x, BT, C);
  check_launch("gather_visible_backward");
}

#define D2V2_INSTANTIATE(T)                                                                             \
  template void gather_visible_forward<T>(const T*, int64_t, int64_t, const int64_t*, T*, int64_t, int64_t, \
                                          int64_t, int64_t, void*);                                    \
  template void gather_visible_backward<T>(const T*, const int64_t*, const int64_t*, T*, int64_t, int64_t, \
                                           void*);
D2V2_INSTANTIATE(float)
D2V2_INSTANTIATE(double)
D2V2_INSTANTIATE(bf16)
D2V2_INSTANTIATE(f16)
#undef D2V2_INSTANTIATE

}  // namespace cuda
}  // namespace d2v2
