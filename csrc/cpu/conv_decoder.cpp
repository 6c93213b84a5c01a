// conv_decoder_block epilogue on the CPU: out = gelu(layer_norm(z + bias)) (+ residual) forward and its
// gradient w.r.t. z + bias backward, one pass each over the activations in memory.
//
// Rows of C channels are split over OpenMP threads; every input row is read from memory once and reread
// from L1 (3 KiB at C = 768 in fp32). Forward: the row v = z + bias is widened to the accumulator type
// (fp32; fp64 for fp64 data) into a per-thread buffer, and the statistics and the output come from passes
// over that buffer. Row sums use four independent vector accumulators (the row's quarters): one would be
// bound by the latency of its adds. The channel loops are branch-free (conv_decoder.h's erf / exp
// polynomials, forced inline) so they vectorise; the erf / exp arithmetic, not memory, bounds the time.
//
// Backward: the row sum of v - mean (its mean corrects the rounded saved mean), then y, dy = grad_out
// gelu'(y) and the sums of dy and dy y in one pass (y and dy kept in per-thread L1 buffers), then grad_z.
// grad_bias: the rows are cut into blocks that depend on M only; a block's partial sum (fp64, from
// groups of rows summed in Acc in row order) is written by whichever thread runs it, and the partials
// are summed in block order in fp64: the result is identical for any thread count, without atomics.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "d2v2/conv_decoder.h"
#include "d2v2/cpu_kernels.h"
#include "d2v2/ema.h"  // ema_load: vectorisable widening loads (branch-free for fp16)

namespace d2v2 {
namespace cpu {

namespace {

// Work below which the threads cost more than they save.
constexpr int64_t kParallelElements = 32768;

// grad_bias row blocks: at least kMinBlockRows rows each, at most kMaxBlocks of them (fp64 partials of
// kMaxBlocks * C: 1.5 MiB at C = 768). Inside a block, groups of kGroupRows rows are summed in Acc and
// each group's sum is added to the block's fp64 partial, so the fp32 error does not grow with M.
constexpr int64_t kMinBlockRows = 16;
constexpr int64_t kMaxBlocks = 256;
constexpr int64_t kGroupRows = 32;

template <typename T, typename Acc = conv_decoder_acc_t<T>>
inline Acc load(T x) {
  return ema_load<Acc, T>::apply(x);
}

// Sum of f(c) over c < C as four independent accumulators over the row's quarters, then the tail.
template <typename Acc, typename F>
inline Acc row_sum(int64_t C, F f) {
  const int64_t q = C / 4;
  Acc s0 = 0, s1 = 0, s2 = 0, s3 = 0, tail = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t c = 0; c < q; ++c) {
    s0 += f(c);
    s1 += f(q + c);
    s2 += f(2 * q + c);
    s3 += f(3 * q + c);
  }
  for (int64_t c = 4 * q; c < C; ++c) tail += f(c);
  return ((s0 + s1) + (s2 + s3)) + tail;
}

template <typename T, bool kBias, bool kResidual>
struct Forward {
  using Acc = conv_decoder_acc_t<T>;

  const T* z;
  int64_t z_stride;
  const T* bias;
  const T* residual;
  int64_t r_stride;
  T* out;
  Acc* mean;
  Acc* rstd;
  int64_t M, C;
  Acc eps;

  // v: a per-thread buffer of C.
  void row(int64_t m, Acc* __restrict__ v) const {
    const T* __restrict__ zr = z + m * z_stride;
    const T* __restrict__ b = bias;
    T* __restrict__ o = out + m * C;
    const int64_t n = C;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      if constexpr (kBias) {
        v[c] = load(zr[c]) + load(b[c]);
      } else {
        v[c] = load(zr[c]);
      }
    }
    const Acc shift = v[0];
    const Acc mean_d = row_sum<Acc>(n, [=](int64_t c) { return v[c] - shift; }) / Acc(n);
    const Acc m2 = row_sum<Acc>(n, [=](int64_t c) {
      const Acc e = (v[c] - shift) - mean_d;
      return e * e;
    });
    const Acc r = ln_rstd(m2, Acc(n), eps);
    if constexpr (kResidual) {
      const T* __restrict__ res = residual + m * r_stride;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c)
        o[c] = from_acc<T>(gelu_erf(ln_normalize(v[c] - shift, mean_d, r)) + load(res[c]));
    } else {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) o[c] = from_acc<T>(gelu_erf(ln_normalize(v[c] - shift, mean_d, r)));
    }
    mean[m] = shift + mean_d;
    rstd[m] = r;
  }

  void run() const {
    [[maybe_unused]] const bool parallel = M * C > kParallelElements;
#pragma omp parallel if (parallel)
    {
      std::vector<Acc> buf(C);
#pragma omp for schedule(static)
      for (int64_t m = 0; m < M; ++m) row(m, buf.data());
    }
  }
};

template <typename T, bool kBias, bool kBiasGrad>
struct Backward {
  using Acc = conv_decoder_acc_t<T>;

  const T* g;
  int64_t g_stride;
  const T* z;
  int64_t z_stride;
  const T* bias;
  const Acc* mean;
  const Acc* rstd;
  T* grad_z;
  Acc* grad_bias;
  int64_t M, C;

  // ys and dys: per-thread buffers of C; partial: the row group's grad_bias accumulators (kBiasGrad).
  void row(int64_t m, Acc* __restrict__ ys, Acc* __restrict__ dys, Acc* __restrict__ partial) const {
    const T* __restrict__ zr = z + m * z_stride;
    const T* __restrict__ gr = g + m * g_stride;
    const T* __restrict__ b = bias;
    T* __restrict__ o = grad_z + m * C;
    const int64_t n = C;
    const Acc mu = mean[m], r = rstd[m];
    // v - mean and its row mean: the correction of the rounded saved mean.
    auto centred = [=](int64_t c) {
      if constexpr (kBias) {
        return (load(zr[c]) + load(b[c])) - mu;
      } else {
        return load(zr[c]) - mu;
      }
    };
    const Acc corr = row_sum<Acc>(n, centred) / Acc(n);
    // y and dy = grad_out gelu'(y) into the buffers and their two row sums. One accumulator each: the
    // loop body (erf and exp) is long enough to hide the latency of the adds.
    Acc sum_dy = 0, sum_dyy = 0;
#pragma omp simd reduction(+ : sum_dy, sum_dyy)
    for (int64_t c = 0; c < n; ++c) {
      const Acc y = ln_normalize(centred(c), corr, r);
      const Acc dy = load(gr[c]) * gelu_erf_grad(y);
      ys[c] = y;
      dys[c] = dy;
      sum_dy += dy;
      sum_dyy += dy * y;
    }
    const Acc mean_dy = sum_dy / Acc(n), mean_dyy = sum_dyy / Acc(n);
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const Acc gv = ln_backward(dys[c], ys[c], r, mean_dy, mean_dyy);
      o[c] = from_acc<T>(gv);
      if constexpr (kBiasGrad) partial[c] += gv;
    }
  }

  void run() const {
    const int64_t blocks = std::min(kMaxBlocks, std::max<int64_t>(1, M / kMinBlockRows));
    std::vector<double> partials(kBiasGrad ? blocks * C : 0, 0.0);
    [[maybe_unused]] const bool parallel = M * C > kParallelElements;
#pragma omp parallel if (parallel)
    {
      std::vector<Acc> buf((kBiasGrad ? 3 : 2) * C);
      Acc* group = buf.data() + 2 * C;  // kBiasGrad: the current group's sum of grad_z rows
#pragma omp for schedule(static)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t m0 = M * blk / blocks, m1 = M * (blk + 1) / blocks;
        for (int64_t g0 = m0; g0 < m1; g0 += kGroupRows) {
          const int64_t g1 = std::min(m1, g0 + kGroupRows);
          if constexpr (kBiasGrad) std::fill(group, group + C, Acc(0));
          for (int64_t m = g0; m < g1; ++m) row(m, buf.data(), buf.data() + C, group);
          if constexpr (kBiasGrad) {
            double* p = partials.data() + blk * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) p[c] += static_cast<double>(group[c]);
          }
        }
      }
      if constexpr (kBiasGrad) {
        // Sum the block partials in block order, a tile of channels per task.
        constexpr int64_t kTile = 64;
#pragma omp for schedule(static)
        for (int64_t c0 = 0; c0 < C; c0 += kTile) {
          const int64_t w = std::min(kTile, C - c0);
          double s[kTile] = {};
          for (int64_t blk = 0; blk < blocks; ++blk) {
            const double* p = partials.data() + blk * C + c0;
#pragma omp simd
            for (int64_t c = 0; c < w; ++c) s[c] += p[c];
          }
          for (int64_t c = 0; c < w; ++c) grad_bias[c0 + c] = static_cast<Acc>(s[c]);
        }
      }
    }
  }
};

}  // namespace

template <typename T>
void conv_decoder_epilogue_forward(const T* z, int64_t z_stride, const T* bias, const T* residual, int64_t r_stride,
                                   T* out, conv_decoder_acc_t<T>* mean, conv_decoder_acc_t<T>* rstd, int64_t M,
                                   int64_t C, double eps) {
  if (M <= 0 || C <= 0) return;
  using Acc = conv_decoder_acc_t<T>;
  const Acc e = static_cast<Acc>(eps);
  if (bias && residual)
    Forward<T, true, true>{z, z_stride, bias, residual, r_stride, out, mean, rstd, M, C, e}.run();
  else if (bias)
    Forward<T, true, false>{z, z_stride, bias, residual, r_stride, out, mean, rstd, M, C, e}.run();
  else if (residual)
    Forward<T, false, true>{z, z_stride, bias, residual, r_stride, out, mean, rstd, M, C, e}.run();
  else
    Forward<T, false, false>{z, z_stride, bias, residual, r_stride, out, mean, rstd, M, C, e}.run();
}

template <typename T>
void conv_decoder_epilogue_backward(const T* grad_out, int64_t g_stride, const T* z, int64_t z_stride, const T* bias,
                                    const conv_decoder_acc_t<T>* mean, const conv_decoder_acc_t<T>* rstd, T* grad_z,
                                    conv_decoder_acc_t<T>* grad_bias, int64_t M, int64_t C) {
  if (C <= 0) return;
  if (M <= 0) {
    if (grad_bias) std::fill(grad_bias, grad_bias + C, conv_decoder_acc_t<T>(0));
    return;
  }
  if (bias && grad_bias)
    Backward<T, true, true>{grad_out, g_stride, z, z_stride, bias, mean, rstd, grad_z, grad_bias, M, C}.run();
  else if (bias)
    Backward<T, true, false>{grad_out, g_stride, z, z_stride, bias, mean, rstd, grad_z, grad_bias, M, C}.run();
  else if (grad_bias)
    Backward<T, false, true>{grad_out, g_stride, z, z_stride, bias, mean, rstd, grad_z, grad_bias, M, C}.run();
  else
    Backward<T, false, false>{grad_out, g_stride, z, z_stride, bias, mean, rstd, grad_z, grad_bias, M, C}.run();
}

#define D2V2_INSTANTIATE(T)                                                                                    \
  template void conv_decoder_epilogue_forward<T>(const T*, int64_t, const T*, const T*, int64_t, T*,           \
                                                 conv_decoder_acc_t<T>*, conv_decoder_acc_t<T>*, int64_t,      \
                                                 int64_t, double);                                             \
  template void conv_decoder_epilogue_backward<T>(const T*, int64_t, const T*, int64_t, const T*,              \
                                                  const conv_decoder_acc_t<T>*, const conv_decoder_acc_t<T>*, \
                                                  T*, conv_decoder_acc_t<T>*, int64_t, int64_t);
D2V2_INSTANTIATE(float)
D2V2_INSTANTIATE(double)
D2V2_INSTANTIATE(bf16)
D2V2_INSTANTIATE(f16)
#undef D2V2_INSTANTIATE

}  // namespace cpu
}  // namespace d2v2
