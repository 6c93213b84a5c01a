// Host-side launchers of the CUDA kernels (definitions in csrc/cuda/*.cu, instantiated for float,
// double, bf16 and f16). Framework-free: raw device pointers, sizes, strides and a cudaStream_t passed
// as void* so this header compiles without the CUDA toolkit. Callers validate indices beforehand.
#pragma once

#include <cstdint>

#include "d2v2/common.h"

namespace d2v2 {
namespace cuda {

template <typename T>
void gather_visible_forward(const T* x, int64_t x_stride_b, int64_t x_stride_t, const int64_t* ids,
                            T* out, int64_t N, int64_t K, int64_t C, int64_t clones, void* stream);

// Segmented (CSR) backward: rows_by_target lists the flat rows n*K + j grouped by their target
// row b*T + t; segment_start has B*T + 1 entries. Each output row is written exactly once.
template <typename T>
void gather_visible_backward(const T* grad_out, const int64_t* rows_by_target,
                             const int64_t* segment_start, T* grad_x, int64_t BT, int64_t C,
                             void* stream);

}  // namespace cuda
}  // namespace d2v2
