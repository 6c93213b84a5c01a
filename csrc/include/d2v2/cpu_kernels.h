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

namespace d2v2 {
namespace cpu {

// masked_regression_loss (loss.h has the per-element math). pred: [N, T, C] with rows contiguous in C
// (element strides ps_n, ps_t); target: [N / clones, T, C], rows contiguous in C, clone row n reads
// target[n / clones]; mask: [N, T] bytes (0 / 1, element strides ms_n, ms_t), nonzero = counted.
// P is the pred (and grad) type, Tg the target type (float/bf16/f16, or double with double pred).

// Forward: token (n, t) counted -> scale * sum_c l(pred - target), else 0, in acc_type<P>.
// token_loss: [N, T] contiguous, written when non-null ("none"). row_sum[n] (fp64) and row_count[n]
// receive the sum of the row's token losses and its counted tokens, for a fixed-order reduction.
// grad: when non-null, [N, T, C] contiguous, written as grad_coef * l'(pred - target) at counted
// tokens and 0 elsewhere (the gradient computed in the same pass).
template <typename P, typename Tg>
void masked_regression_loss_forward(const P* pred, int64_t ps_n, int64_t ps_t, const Tg* target, int64_t ts_b,
                                    int64_t ts_t, const uint8_t* mask, int64_t ms_n, int64_t ms_t, int64_t N,
                                    int64_t T_len, int64_t C, int64_t clones, double scale, double beta,
                                    typename acc_type<P>::type* token_loss, double* row_sum, int64_t* row_count,
                                    P* grad, double grad_coef);

// Backward: grad[n, t, :] = g_out[n * gs_n + t * gs_t] * coef * l'(pred - target) at counted tokens, 0
// elsewhere: every element of the [N, T, C] contiguous grad is written (no separate zero fill).
// A scalar incoming gradient is g_out with gs_n = gs_t = 0; coef folds in scale (and 1 / count for "mean").
template <typename P, typename Tg>
void masked_regression_loss_backward(const P* pred, int64_t ps_n, int64_t ps_t, const Tg* target, int64_t ts_b,
                                     int64_t ts_t, const uint8_t* mask, int64_t ms_n, int64_t ms_t,
                                     const typename acc_type<P>::type* g_out, int64_t gs_n, int64_t gs_t,
                                     double coef, int64_t N, int64_t T_len, int64_t C, int64_t clones, double beta,
                                     P* grad);

// Sum of the N row partials in row order (independent of the thread count); *count gets the counted tokens.
double reduce_row_partials(const double* row_sum, const int64_t* row_count, int64_t N, int64_t* count);

}  // namespace cpu
}  // namespace d2v2

#include "d2v2/targets.h"

namespace d2v2 {
namespace cpu {

// layer_average_targets: out[b, t, :] = final_norm(mean over k of layer_norm(layers[k])[b, t, :]).
// layers[k] points at layer k's element (0, 0, 0); (strides[2k], strides[2k + 1]) are its element
// strides over (b, t); channels are contiguous. The layers need not share a buffer or strides (a list
// of K tensors is read where it lies, never stacked). padding: [B, T] contiguous, true = padded, or
// nullptr: padded steps take no part in any statistic and are 0 in out. out: [B, T, C] contiguous, in
// the accumulator type (fp32; fp64 for fp64 layers). Instance statistics per (k, b, channel) over the
// valid steps, layer statistics per (k, b, t) over channels; biased variance, no affine, eps.
template <typename T>
void layer_average_targets(const T* const* layers, const int64_t* strides, const bool* padding,
                           target_acc_t<T>* out, int64_t K, int64_t B, int64_t T_len, int64_t C,
                           TargetNorm layer_norm, TargetNorm final_norm, double eps);

}  // namespace cpu
}  // namespace d2v2

#include "d2v2/conv_decoder.h"

namespace d2v2 {
namespace cpu {

// conv_decoder_block epilogue (conv_decoder.h has the math), per row of C channels of the channels-last
// conv output z: M rows, contiguous in C, z_stride elements apart. bias: [C] contiguous or nullptr.
// Accumulator Acc = conv_decoder_acc_t<T> (fp32; fp64 for fp64 data).

// Forward: out = gelu(layer_norm(z + bias)) (+ residual), out [M, C] contiguous, written once; residual
// rows contiguous in C (r_stride apart) or nullptr. mean / rstd: [M] contiguous, the row statistics
// for the backward. One pass over z (and residual) from memory; the row is reread from L1.
template <typename T>
void conv_decoder_epilogue_forward(const T* z, int64_t z_stride, const T* bias, const T* residual, int64_t r_stride,
                                   T* out, conv_decoder_acc_t<T>* mean, conv_decoder_acc_t<T>* rstd, int64_t M,
                                   int64_t C, double eps);

// Backward: grad_z [M, C] contiguous = d out / d (z + bias) applied to grad_out (rows contiguous in C,
// g_stride apart); the residual's gradient is the caller's. grad_bias: [C] contiguous or nullptr (not
// computed): the sum over rows of grad_z (before its rounding to T), from fixed blocks of rows (a function
// of M only) summed in row order, then over the blocks in block order in fp64, rounded to Acc once: the
// same bits whatever the thread count, no atomics.
template <typename T>
void conv_decoder_epilogue_backward(const T* grad_out, int64_t g_stride, const T* z, int64_t z_stride, const T* bias,
                                    const conv_decoder_acc_t<T>* mean, const conv_decoder_acc_t<T>* rstd, T* grad_z,
                                    conv_decoder_acc_t<T>* grad_bias, int64_t M, int64_t C);

}  // namespace cpu
}  // namespace d2v2
