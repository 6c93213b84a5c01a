// Launch geometry and small device helpers shared by the CUDA kernels.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "d2v2/common.h"

namespace d2v2 {
namespace cuda {

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// Row kernels: a block of (threads_x, rows_per_block) threads; threads_x covers one row's channels.
struct RowLaunch {
  dim3 grid;
  dim3 block;
};

inline RowLaunch row_launch(int64_t rows, int64_t C) {
  int tx = 32;
  while (tx < 256 && tx < C) tx *= 2;
  const int ty = 256 / tx;
  int64_t blocks = (rows + ty - 1) / ty;
  if (blocks > 65535LL * 32) blocks = 65535LL * 32;  // grid-stride loops cover the rest
  return {dim3(static_cast<unsigned>(blocks)), dim3(tx, ty)};
}

template <typename T>
__device__ __forceinline__ void copy_row(const T* __restrict__ src, T* __restrict__ dst, int64_t C, int lane,
                                         int width) {
  for (int64_t c = lane; c < C; c += width) dst[c] = src[c];
}

}  // namespace cuda
}  // namespace d2v2
