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

namespace d2v2 {
namespace cpu {

// decoder_input: out[n, t, :] = x_vis[n, r, :] if r = ids[n, t] < K, else noise row r - K of sample n.
// noise == nullptr draws that row inside the kernel: element (n, r - K, c) is
// philox_normal(seed, (n * (T - K) + r - K) * C + c) * noise_std (philox.h). x_vis and noise rows are
// contiguous in C (element strides beside them); ids is [N, T] contiguous, each row a permutation of
// 0..T-1 (checked by the caller); out is [N, T, C] contiguous.
template <typename T>
void decoder_input_forward(const T* x_vis, int64_t x_stride_n, int64_t x_stride_k, const int64_t* ids,
                           const T* noise, int64_t noise_stride_n, int64_t noise_stride_r, T* out,
                           int64_t N, int64_t T_len, int64_t K, int64_t C, uint64_t seed, float noise_std);

// grad_x_vis[n, ids[n, t], :] = grad_out[n, t, :] for ids[n, t] < K. A permutation sends exactly one t
// to each visible row, so every output row is written once and nothing accumulates.
template <typename T>
void decoder_input_backward(const T* grad_out, int64_t g_stride_n, int64_t g_stride_t, const int64_t* ids,
                            T* grad_x_vis, int64_t N, int64_t T_len, int64_t K, int64_t C);

}  // namespace cpu
}  // namespace d2v2

#include "d2v2/ema.h"

namespace d2v2 {
namespace cpu {

// ema_update_: one (teacher, student) pair of equal numel and identical element layout, so the
// update runs over flat memory. Dtypes are tagged at run time: one parallel loop walks mixed lists.
struct EmaTensor {
  void* teacher;
  const void* student;
  EmaDtype teacher_dtype;
  EmaDtype student_dtype;
};

// A slice [start, start + length) of tensor `tensor`: the unit of work one thread takes at a time.
struct EmaChunk {
  int64_t tensor;
  int64_t start;
  int64_t length;
};

// Elements per chunk the bindings cut tensors into: large enough to amortise the scheduling, small
// enough that a ViT-B parameter list balances over the threads.
constexpr int64_t kEmaChunkElements = 65536;

// teacher = decay * teacher + (1 - decay) * student over every chunk, in one OpenMP parallel loop.
// The weights are cast to the teacher's accumulator type (fp32, fp64 for fp64 teachers).
void ema_update(const EmaTensor* tensors, const EmaChunk* chunks, int64_t num_chunks, double decay,
                double one_minus_decay);

}  // namespace cpu
}  // namespace d2v2
