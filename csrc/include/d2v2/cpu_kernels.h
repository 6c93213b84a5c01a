// Declarations of the OpenMP CPU kernels (definitions in csrc/cpu/*.cpp, explicitly instantiated for
// float, double, bf16 and f16). Tensors are raw pointers; every pointer's extent is described by the
// sizes and strides passed beside it, and callers have validated indices before the call.
#pragma once

#include <cstdint>

#include "d2v2/common.h"

namespace d2v2 {
namespace cpu {

// gather_visible: out[n, j, :] = x[n / clones, ids[n, j], :].
// x rows are contiguous in C; (x_stride_b, x_stride_t) are element strides. out is [N, K, C] contiguous.
template <typename T>
void gather_visible_forward(const T* x, int64_t x_stride_b, int64_t x_stride_t, const int64_t* ids,
                            T* out, int64_t N, int64_t K, int64_t C, int64_t clones);

// grad_x[b, t, :] = sum over (n, j) with n / clones == b and ids[n, j] == t of grad_out[n, j, :].
// Deterministic, no atomics: each thread owns whole samples b. grad_out rows are contiguous in C.
template <typename T>
void gather_visible_backward(const T* grad_out, int64_t g_stride_n, int64_t g_stride_k,
                             const int64_t* ids, T* grad_x, int64_t B, int64_t T_len, int64_t K,
                             int64_t C, int64_t clones);

}  // namespace cpu
}  // namespace d2v2
