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

namespace d2v2 {
namespace cuda {

// decoder_input: the CPU kernel's contract (cpu_kernels.h) on device pointers; noise == nullptr draws
// the noise rows in the kernel with philox_normal (philox.h), never materialising them.
template <typename T>
void decoder_input_forward(const T* x_vis, int64_t x_stride_n, int64_t x_stride_k, const int64_t* ids,
                           const T* noise, int64_t noise_stride_n, int64_t noise_stride_r, T* out,
                           int64_t N, int64_t T_len, int64_t K, int64_t C, uint64_t seed, float noise_std,
                           void* stream);

// grad_x_vis[n, ids[n, t]] = grad_out[n, t] for ids[n, t] < K: one row copy per visible row, no atomics.
template <typename T>
void decoder_input_backward(const T* grad_out, const int64_t* ids, T* grad_x_vis, int64_t N, int64_t T_len,
                            int64_t K, int64_t C, void* stream);

}  // namespace cuda
}  // namespace d2v2

#include "d2v2/ema.h"

namespace d2v2 {
namespace cuda {

// ema_update_ over `count` (teacher, student) pairs of one dtype pair, apex multi-tensor-apply style:
// pointer and (tensor, chunk) tables travel by value as the kernel argument, one launch per full table.
// Each pair is flat memory of numel[i] elements with identical layouts (the binding ensures it).
// The weights come from decay_on_device (a device scalar, read by the kernel: CUDA-graph replayable)
// or, when it is null, from `decay` on the host.
template <typename Teacher, typename Student>
void ema_update(Teacher* const* teacher, const Student* const* student, const int64_t* numel, int64_t count,
                const ema_acc_t<Teacher>* decay_on_device, double decay, void* stream);

}  // namespace cuda
}  // namespace d2v2
