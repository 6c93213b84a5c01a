// layer_average_targets on the CPU: per-layer norm, average over the K layers and final norm in one
// OpenMP region, reading each layer where it lies (no normalised copies, transposes or stacking).
//
// Per-layer instance norm (or none): one task per (sample, channel tile); a tile is the whole C unless
// there are too few samples to share among the threads. For each layer k the task streams its [T, tile]
// block once from memory for the Welford statistics (chunks of 4 steps merged by Chan's rule), then
// reads it again from cache (L2/L3: a [196, 768] fp32 block is 600 KB) to normalise it and add it into
// the output block, which stays cached while the K layers are summed into it. A final instance norm runs
// on that block in place, and so does a final layer norm when the tile is the whole row; with split
// tiles the final layer norm is a row loop over the output after the column loop.
//
// Per-layer layer norm: one task per (sample, step) row: for each k, shifted two-pass row statistics
// and the normalised row added into the output row (in L1), then the final layer norm of that row. A
// final instance norm is then a column pass over the output in place (its statistics need the average).
#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "d2v2/cpu_kernels.h"

namespace d2v2 {
namespace cpu {

namespace {

// The valid steps of sample b, in order; returns how many.
int64_t valid_steps(const bool* padding, int64_t b, int64_t T_len, int64_t* steps) {
  int64_t n = 0;
  const bool* pad = padding ? padding + b * T_len : nullptr;
  for (int64_t t = 0; t < T_len; ++t)
    if (!pad || !pad[t]) steps[n++] = t;
  return n;
}

// Per-channel (shift, mean, rstd) of a [steps, w] column block whose rows are `stride` elements apart,
// over the n listed steps: statistics of x - shift, shift = the first listed row; chunks of four steps
// (two-pass inside the chunk) merged into the running statistics by Chan's rule, single steps after.
// m2 is scratch of w values.
template <typename T, typename Acc = target_acc_t<T>>
void column_stats(const T* x, int64_t stride, const int64_t* steps, int64_t n, int64_t w, Acc eps, Acc* shift,
                  Acc* mean, Acc* m2, Acc* rstd) {
  if (n == 0) {  // a fully padded sample: nothing is normalised, any finite values do
    std::fill(shift, shift + w, Acc(0));
    std::fill(mean, mean + w, Acc(0));
    std::fill(rstd, rstd + w, Acc(1));
    return;
  }
  const T* first = x + steps[0] * stride;
#pragma omp simd
  for (int64_t c = 0; c < w; ++c) {
    shift[c] = target_load(first[c]);
    mean[c] = m2[c] = Acc(0);
  }
  Acc count = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4, count += Acc(4)) {
    const T* x0 = x + steps[i] * stride;
    const T* x1 = x + steps[i + 1] * stride;
    const T* x2 = x + steps[i + 2] * stride;
    const T* x3 = x + steps[i + 3] * stride;
    const Acc weight = Acc(4) / (count + Acc(4));
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) {
      const Acc s = shift[c];
      Acc chunk_mean, chunk_m2;
      chunk4_stats(target_load(x0[c]) - s, target_load(x1[c]) - s, target_load(x2[c]) - s,
                   target_load(x3[c]) - s, chunk_mean, chunk_m2);
      welford_merge(mean[c], m2[c], chunk_mean, chunk_m2, count, weight);
    }
  }
  for (; i < n; ++i) {
    count += Acc(1);
    const Acc inv = Acc(1) / count;
    const T* xr = x + steps[i] * stride;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) welford_push(target_load(xr[c]) - shift[c], inv, mean[c], m2[c]);
  }
#pragma omp simd
  for (int64_t c = 0; c < w; ++c) rstd[c] = target_rstd(m2[c], count, eps);
}

// o[t, :w] = (o[t, :w] if not kFirst) + y[t, :w], divided by K on the last layer (the reference's
// sequential sum, then one division), for the listed steps; y = x normalised when kNorm, else x.
// Two steps per iteration share the loads of the channel statistics.
template <bool kNorm, bool kFirst, bool kLast, typename T, typename Acc>
void accumulate_block(const T* x, int64_t stride, Acc* o, int64_t o_stride, const int64_t* steps, int64_t n,
                      int64_t w, const Acc* shift, const Acc* mean, const Acc* rstd, Acc K) {
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    const T* xa = x + steps[i] * stride;
    const T* xb = x + steps[i + 1] * stride;
    Acc* oa = o + steps[i] * o_stride;
    Acc* ob = o + steps[i + 1] * o_stride;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) {
      Acc ya = target_load(xa[c]), yb = target_load(xb[c]);
      if constexpr (kNorm) {
        const Acc s = shift[c], m = mean[c], r = rstd[c];
        ya = target_normalize(ya, s, m, r);
        yb = target_normalize(yb, s, m, r);
      }
      if constexpr (!kFirst) { ya = oa[c] + ya; yb = ob[c] + yb; }
      if constexpr (kLast) { ya = ya / K; yb = yb / K; }
      oa[c] = ya;
      ob[c] = yb;
    }
  }
  for (; i < n; ++i) {
    const T* xr = x + steps[i] * stride;
    Acc* orow = o + steps[i] * o_stride;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) {
      Acc y = target_load(xr[c]);
      if constexpr (kNorm) y = target_normalize(y, shift[c], mean[c], rstd[c]);
      if constexpr (!kFirst) y = orow[c] + y;
      if constexpr (kLast) y = y / K;
      orow[c] = y;
    }
  }
}

template <bool kNorm, typename T, typename Acc>
void accumulate_dispatch(bool first, bool last, const T* x, int64_t stride, Acc* o, int64_t o_stride,
                         const int64_t* steps, int64_t n, int64_t w, const Acc* shift, const Acc* mean,
                         const Acc* rstd, Acc K) {
  if (first && last)
    accumulate_block<kNorm, true, true>(x, stride, o, o_stride, steps, n, w, shift, mean, rstd, K);
  else if (first)
    accumulate_block<kNorm, true, false>(x, stride, o, o_stride, steps, n, w, shift, mean, rstd, K);
  else if (last)
    accumulate_block<kNorm, false, true>(x, stride, o, o_stride, steps, n, w, shift, mean, rstd, K);
  else
    accumulate_block<kNorm, false, false>(x, stride, o, o_stride, steps, n, w, shift, mean, rstd, K);
}

// Sum of f(c) over c < C as four independent vector accumulators (the row's quarters): one
// accumulator would be bound by the latency of its adds.
template <typename Acc, typename F>
Acc row_sum(int64_t C, F f) {
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

// Shifted two-pass (shift = x[0]) mean and rstd of one row of C channels (in L1).
template <typename T, typename Acc = target_acc_t<T>>
void row_stats(const T* x, int64_t C, Acc eps, Acc& shift, Acc& mean, Acc& rstd) {
  const Acc s0 = target_load(x[0]);
  shift = s0;
  const Acc m = row_sum<Acc>(C, [=](int64_t c) { return target_load(x[c]) - s0; }) / Acc(C);
  mean = m;
  const Acc q = row_sum<Acc>(C, [=](int64_t c) {
    const Acc d = (target_load(x[c]) - s0) - m;
    return d * d;
  });
  rstd = target_rstd(q, Acc(C), eps);
}

template <typename Acc>
void layer_norm_row(Acc* row, int64_t C, Acc eps) {
  Acc shift, mean, rstd;
  row_stats(static_cast<const Acc*>(row), C, eps, shift, mean, rstd);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) row[c] = target_normalize(row[c], shift, mean, rstd);
}

template <bool kFirst, bool kLast, typename T, typename Acc>
void accumulate_row(const T* x, Acc* orow, int64_t C, Acc shift, Acc mean, Acc rstd, Acc K) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    Acc y = target_normalize(target_load(x[c]), shift, mean, rstd);
    if constexpr (!kFirst) y = orow[c] + y;
    if constexpr (kLast) y = y / K;
    orow[c] = y;
  }
}

// Per-thread scratch: the valid steps of a sample and four per-channel vectors of statistics.
template <typename Acc>
struct Scratch {
  std::vector<int64_t> steps;
  std::vector<Acc> stats;
  Scratch(int64_t T_len, int64_t width) : steps(T_len), stats(4 * width) {}
  Acc* vec(int64_t i) { return stats.data() + i * (stats.size() / 4); }
};

template <typename T>
struct Problem {
  using Acc = target_acc_t<T>;
  const T* const* layers;
  const int64_t* strides;
  const bool* padding;
  Acc* out;
  int64_t K, B, T_len, C;
  TargetNorm layer_norm, final_norm;
  Acc eps;
  int64_t width = 0, tiles = 0;  // channel tiles of a sample: `tiles` of `width` channels (last shorter)

  const T* layer(int64_t k, int64_t b) const { return layers[k] + b * strides[2 * k]; }
  int64_t step_stride(int64_t k) const { return strides[2 * k + 1]; }
  bool padded(int64_t b, int64_t t) const { return padding && padding[b * T_len + t]; }

  // Whole rows per task when the samples keep every thread busy; otherwise split the channels, but
  // into tiles of at least 128 (512-byte fp32 runs of a row: still long streams for the prefetcher).
  void plan(int threads) {
    const int64_t min_width = std::min<int64_t>(C, 128);
    const int64_t want = (4 * threads + B - 1) / B;  // >= ~4 tasks per thread for balance
    tiles = std::max<int64_t>(1, std::min<int64_t>(want, C / min_width));
    width = (C + tiles - 1) / tiles;
    if (tiles > 1) width = std::min(C, (width + 15) / 16 * 16);  // whole 512-bit vectors per tile
    tiles = (C + width - 1) / width;
  }

  // Instance norm of the output block of channels [c0, c0 + w) in place, over the listed steps.
  void instance_norm_block(Acc* o, const int64_t* steps, int64_t n, int64_t w, Scratch<Acc>& s) const {
    Acc *shift = s.vec(0), *mean = s.vec(1), *m2 = s.vec(2), *rstd = s.vec(3);
    column_stats(static_cast<const Acc*>(o), C, steps, n, w, eps, shift, mean, m2, rstd);
    for (int64_t i = 0; i < n; ++i) {
      Acc* orow = o + steps[i] * C;
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) orow[c] = target_normalize(orow[c], shift[c], mean[c], rstd[c]);
    }
  }

  // Per-layer instance norm (or none), the average and the final norm of channels [c0, c0 + w).
  void column_task(int64_t b, int64_t c0, int64_t w, Scratch<Acc>& s) const {
    int64_t* steps = s.steps.data();
    const int64_t n = valid_steps(padding, b, T_len, steps);
    Acc* o = out + b * T_len * C + c0;
    Acc *shift = s.vec(0), *mean = s.vec(1), *m2 = s.vec(2), *rstd = s.vec(3);
    for (int64_t k = 0; k < K; ++k) {
      const T* x = layer(k, b) + c0;
      const int64_t st = step_stride(k);
      if (layer_norm == TargetNorm::instance) {
        column_stats(x, st, steps, n, w, eps, shift, mean, m2, rstd);
        accumulate_dispatch<true>(k == 0, k == K - 1, x, st, o, C, steps, n, w, shift, mean, rstd, Acc(K));
      } else {
        accumulate_dispatch<false>(k == 0, k == K - 1, x, st, o, C, steps, n, w, shift, mean, rstd, Acc(K));
      }
    }
    if (n < T_len)
      for (int64_t t = 0; t < T_len; ++t)
        if (padded(b, t)) std::fill(o + t * C, o + t * C + w, Acc(0));
    if (final_norm == TargetNorm::instance) instance_norm_block(o, steps, n, w, s);
    if (final_norm == TargetNorm::layer && w == C)
      for (int64_t i = 0; i < n; ++i) layer_norm_row(o + steps[i] * C, C, eps);
  }

  // Per-layer layer norm, the average and a final layer norm of row (b, t).
  void row_task(int64_t b, int64_t t) const {
    Acc* orow = out + (b * T_len + t) * C;
    if (padded(b, t)) {
      std::fill(orow, orow + C, Acc(0));
      return;
    }
    for (int64_t k = 0; k < K; ++k) {
      const T* x = layer(k, b) + t * step_stride(k);
      Acc shift, mean, rstd;
      row_stats(x, C, eps, shift, mean, rstd);
      const bool first = k == 0, last = k == K - 1;
      if (first && last)
        accumulate_row<true, true>(x, orow, C, shift, mean, rstd, Acc(K));
      else if (first)
        accumulate_row<true, false>(x, orow, C, shift, mean, rstd, Acc(K));
      else if (last)
        accumulate_row<false, true>(x, orow, C, shift, mean, rstd, Acc(K));
      else
        accumulate_row<false, false>(x, orow, C, shift, mean, rstd, Acc(K));
    }
    if (final_norm == TargetNorm::layer) layer_norm_row(orow, C, eps);
  }

  void run() {
    const int64_t rows = B * T_len;
    [[maybe_unused]] const bool parallel = K * rows * C > 32768;  // unused without OpenMP
#ifdef _OPENMP
    plan(parallel ? omp_get_max_threads() : 1);
#else
    plan(1);
#endif
    const bool by_columns = layer_norm != TargetNorm::layer;
#pragma omp parallel if (parallel)
    {
      Scratch<Acc> scratch(T_len, width);
      if (by_columns) {
#pragma omp for schedule(static) collapse(2)
        for (int64_t b = 0; b < B; ++b)
          for (int64_t tile = 0; tile < tiles; ++tile)
            column_task(b, tile * width, std::min(width, C - tile * width), scratch);
        // Split tiles: the final layer norm needs whole rows, after every tile of the sample is done.
        if (final_norm == TargetNorm::layer && tiles > 1) {
#pragma omp for schedule(static)
          for (int64_t r = 0; r < rows; ++r)
            if (!padded(r / T_len, r % T_len)) layer_norm_row(out + r * C, C, eps);
        }
      } else {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) row_task(r / T_len, r % T_len);
        // The final instance norm needs the statistics of the average: a column pass in place.
        if (final_norm == TargetNorm::instance) {
#pragma omp for schedule(static) collapse(2)
          for (int64_t b = 0; b < B; ++b)
            for (int64_t tile = 0; tile < tiles; ++tile) {
              const int64_t n = valid_steps(padding, b, T_len, scratch.steps.data());
              const int64_t c0 = tile * width;
              instance_norm_block(out + b * T_len * C + c0, scratch.steps.data(), n, std::min(width, C - c0),
                                  scratch);
            }
        }
      }
    }
  }
};

}  // namespace

template <typename T>
void layer_average_targets(const T* const* layers, const int64_t* strides, const bool* padding,
                           target_acc_t<T>* out, int64_t K, int64_t B, int64_t T_len, int64_t C,
                           TargetNorm layer_norm, TargetNorm final_norm, double eps) {
  if (K <= 0 || B <= 0 || T_len <= 0 || C <= 0) return;
  Problem<T>{layers, strides, padding, out, K, B, T_len, C, layer_norm, final_norm,
             static_cast<target_acc_t<T>>(eps)}
      .run();
}

#define D2V2_INSTANTIATE(T)                                                                              \
  template void layer_average_targets<T>(const T* const*, const int64_t*, const bool*, target_acc_t<T>*, \
                                         int64_t, int64_t, int64_t, int64_t, TargetNorm, TargetNorm, double);
D2V2_INSTANTIATE(float)
D2V2_INSTANTIATE(double)
D2V2_INSTANTIATE(bf16)
D2V2_INSTANTIATE(f16)
#undef D2V2_INSTANTIATE

}  // namespace cpu
}  // namespace d2v2
