// masked_regression_loss on the CPU: one pass over pred forward (per-token sums, per-row partials),
// one pass backward writing every grad row (the derivative at counted tokens, zeros elsewhere); or
// both in the forward pass when the caller asks for the gradient there.
//
// Rows are split over OpenMP threads; the target row of clone row n is target[n / clones], read in
// place: a thread's consecutive rows share it, so it stays in cache across the clones. Per-token sums
// are fp32 (fp64 for fp64 pred), row partials fp64, summed in row order by reduce_row_partials: the
// result does not depend on the thread count.
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define D2V2_LOSS_AVX512 1
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's avx512fintrin.h builds its "undefined" operands as `__m512i __Y = __Y;`, which -Wall reports
// as (maybe-)uninitialized wherever the intrinsics are inlined (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#endif

#include "d2v2/cpu_kernels.h"
#include "d2v2/loss.h"

namespace d2v2 {
namespace cpu {

namespace {

// Work below which the threads cost more than they save.
constexpr int64_t kParallelElements = 32768;

// Gradients larger than the last-level cache are written with non-temporal stores: the lines would be
// evicted before their consumer reads them anyway, and streaming skips the read-for-ownership of
// every line (a third of the backward's memory traffic). Smaller ones stay in cache for the consumer.
constexpr int64_t kStreamBytes = int64_t(32) << 20;

// Tokens ahead whose pred row is prefetched: rows are a few KiB and uncounted ones are skipped, so the
// hardware stream prefetchers (which also stop at 4 KiB pages) keep losing the stream. Two tokens
// ahead measured best at the image shape (bf16 forward+backward ~25% faster than without).
constexpr int64_t kPrefetchTokens = 2;

template <typename P>
inline void prefetch_token(const P* prow, int64_t ps_t, const uint8_t* mrow, int64_t ms_t, int64_t t, int64_t T_len,
                           int64_t C) {
  const int64_t ahead = t + kPrefetchTokens;
  if (ahead >= T_len || !mrow[ahead * ms_t]) return;
  const char* b = reinterpret_cast<const char*>(prow + ahead * ps_t);
  for (int64_t off = 0; off < C * static_cast<int64_t>(sizeof(P)); off += 64) __builtin_prefetch(b + off);
}

template <typename Acc, typename T>
inline Acc load(T x) {
  return static_cast<Acc>(to_acc(x));
}

// One token's channel loops. The portable versions: any element types, compiler-vectorised.
template <bool kSmooth, typename P, typename Tg>
struct TokenOps {
  using Acc = typename acc_type<P>::type;

  static Acc sum(const P* __restrict__ p, const Tg* __restrict__ y, int64_t C, const RegressionParams<Acc>& prm) {
    Acc s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c) s += regression_term<kSmooth>(load<Acc>(p[c]) - load<Acc>(y[c]), prm);
    return s;
  }

  static void grad(const P* __restrict__ p, const Tg* __restrict__ y, int64_t C, Acc w,
                   const RegressionParams<Acc>& prm, P* __restrict__ g, bool /*stream*/) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c)
      g[c] = from_acc<P>(w * regression_grad<kSmooth>(load<Acc>(p[c]) - load<Acc>(y[c]), prm));
  }

  // The token's loss sum and its gradient: the row is still in L1 for the second loop.
  static Acc sum_grad(const P* p, const Tg* y, int64_t C, Acc w, const RegressionParams<Acc>& prm, P* g,
                      bool stream) {
    const Acc s = sum(p, y, C, prm);
    grad(p, y, C, w, prm, g, stream);
    return s;
  }

  static void zero(P* g, int64_t C, bool /*stream*/) {
    std::memset(static_cast<void*>(g), 0, sizeof(P) * C);  // +0 is all-zero bits in every float type
  }

  static bool can_stream(const P*, int64_t, int64_t) { return false; }
  static void fence() {}
};

#if defined(D2V2_LOSS_AVX512)
// AVX-512 versions for 16/32-bit pred and target (the training dtypes): four independent accumulators
// (a single one makes the sum latency-bound), masked tails, and non-temporal stores for large grads.
// The arithmetic is loss.h's, operation for operation; conversions are bit-exact with common.h's.

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// Full loads in the main loops (masked loads cost more on some cores), masked ones for the tail.
inline __m512 widen(__m256i bf16_bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits), 16));
}
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const bf16* x) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))); }
inline __m512 load16(const f16* x) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))); }
inline __m512 load16(const float* x, __mmask16 m) { return _mm512_maskz_loadu_ps(m, x); }
inline __m512 load16(const bf16* x, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, x)); }
inline __m512 load16(const f16* x, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, x)); }

// fp32 -> 16 bits the way common.h's from_float does it: round to nearest even, NaN kept quiet.
inline __m256i to_bits16(__m512 v, bf16*) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}
inline __m256i to_bits16(__m512 v, f16*) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

inline void store16(float* g, __m512 v, __mmask16 m, bool stream) {
  if (stream)
    _mm512_stream_ps(g, v);  // only on full, 64-byte aligned vectors (can_stream)
  else if (m == 0xffff)
    _mm512_storeu_ps(g, v);
  else
    _mm512_mask_storeu_ps(g, m, v);
}
template <typename H>
inline void store16(H* g, __m512 v, __mmask16 m, bool stream) {
  const __m256i bits = to_bits16(v, static_cast<H*>(nullptr));
  if (stream)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(g), bits);
  else if (m == 0xffff)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(g), bits);
  else
    _mm256_mask_storeu_epi16(g, m, bits);
}

template <bool kSmooth>
inline __m512 term16(__m512 d, __m512 beta, __m512 half_beta, __m512 half_inv_beta) {
  if constexpr (kSmooth) {
    const __m512 a = _mm512_abs_ps(d);
    const __mmask16 small = _mm512_cmp_ps_mask(a, beta, _CMP_LT_OQ);
    return _mm512_mask_blend_ps(small, _mm512_sub_ps(a, half_beta), _mm512_mul_ps(_mm512_mul_ps(d, d), half_inv_beta));
  } else {
    return _mm512_mul_ps(d, d);
  }
}

template <bool kSmooth>
inline __m512 grad16(__m512 d, __m512 beta, __m512 inv_beta) {
  if constexpr (kSmooth) {
    const __mmask16 small = _mm512_cmp_ps_mask(_mm512_abs_ps(d), beta, _CMP_LT_OQ);
    const __m512 sign = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_LT_OQ),
                                             _mm512_set1_ps(1.f), _mm512_set1_ps(-1.f));
    return _mm512_mask_blend_ps(small, sign, _mm512_mul_ps(d, inv_beta));
  } else {
    return _mm512_add_ps(d, d);
  }
}

template <bool kSmooth, typename P, typename Tg>
struct TokenOpsAvx512 {
  static float sum(const P* p, const Tg* y, int64_t C, const RegressionParams<float>& prm) {
    const __m512 beta = _mm512_set1_ps(prm.beta), hb = _mm512_set1_ps(prm.half_beta);
    const __m512 hib = _mm512_set1_ps(prm.half_inv_beta);
    auto term = [&](int64_t c) { return term16<kSmooth>(_mm512_sub_ps(load16(p + c), load16(y + c)), beta, hb, hib); };
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t c = 0;
    for (; c + 64 <= C; c += 64) {
      a0 = _mm512_add_ps(a0, term(c));
      a1 = _mm512_add_ps(a1, term(c + 16));
      a2 = _mm512_add_ps(a2, term(c + 32));
      a3 = _mm512_add_ps(a3, term(c + 48));
    }
    for (; c + 16 <= C; c += 16) a0 = _mm512_add_ps(a0, term(c));
    if (c < C) {  // masked lanes load 0: d = 0, term 0
      const __mmask16 m = tail_mask(C - c);
      a1 = _mm512_add_ps(a1, term16<kSmooth>(_mm512_sub_ps(load16(p + c, m), load16(y + c, m)), beta, hb, hib));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }

  static void grad(const P* p, const Tg* y, int64_t C, float w, const RegressionParams<float>& prm, P* g,
                   bool stream) {
    const __m512 beta = _mm512_set1_ps(prm.beta), ib = _mm512_set1_ps(prm.inv_beta), wv = _mm512_set1_ps(w);
    auto grad_of = [&](__m512 p16, __m512 y16) { return _mm512_mul_ps(wv, grad16<kSmooth>(_mm512_sub_ps(p16, y16), beta, ib)); };
    int64_t c = 0;
    for (; c + 16 <= C; c += 16) store16(g + c, grad_of(load16(p + c), load16(y + c)), 0xffff, stream);
    if (c < C) {  // never streamed: can_stream excludes rows with a tail
      const __mmask16 m = tail_mask(C - c);
      store16(g + c, grad_of(load16(p + c, m), load16(y + c, m)), m, false);
    }
  }

  // sum() and grad() in one loop over the channels, with sum()'s accumulation order (the same loss bits).
  static float sum_grad(const P* p, const Tg* y, int64_t C, float w, const RegressionParams<float>& prm, P* g,
                        bool stream) {
    const __m512 beta = _mm512_set1_ps(prm.beta), hb = _mm512_set1_ps(prm.half_beta);
    const __m512 hib = _mm512_set1_ps(prm.half_inv_beta), ib = _mm512_set1_ps(prm.inv_beta);
    const __m512 wv = _mm512_set1_ps(w);
    auto step = [&](int64_t c, __m512 p16, __m512 y16, __mmask16 m, bool st) {
      const __m512 d = _mm512_sub_ps(p16, y16);
      store16(g + c, _mm512_mul_ps(wv, grad16<kSmooth>(d, beta, ib)), m, st);
      return term16<kSmooth>(d, beta, hb, hib);
    };
    auto full = [&](int64_t c) { return step(c, load16(p + c), load16(y + c), 0xffff, stream); };
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t c = 0;
    for (; c + 64 <= C; c += 64) {
      a0 = _mm512_add_ps(a0, full(c));
      a1 = _mm512_add_ps(a1, full(c + 16));
      a2 = _mm512_add_ps(a2, full(c + 32));
      a3 = _mm512_add_ps(a3, full(c + 48));
    }
    for (; c + 16 <= C; c += 16) a0 = _mm512_add_ps(a0, full(c));
    if (c < C) {
      const __mmask16 m = tail_mask(C - c);
      a1 = _mm512_add_ps(a1, step(c, load16(p + c, m), load16(y + c, m), m, false));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }

  static void zero(P* g, int64_t C, bool stream) {
    if (!stream) {
      std::memset(static_cast<void*>(g), 0, sizeof(P) * C);
      return;
    }
    for (int64_t c = 0; c < C; c += 16) store16(g + c, _mm512_setzero_ps(), 0xffff, true);
  }

  // Streaming needs every store a full, aligned vector: an aligned base and rows of whole cache lines.
  static bool can_stream(const P* g, int64_t rows, int64_t C) {
    const int64_t row_bytes = C * static_cast<int64_t>(sizeof(P));
    return rows * row_bytes >= kStreamBytes && row_bytes % 64 == 0 && reinterpret_cast<uintptr_t>(g) % 64 == 0;
  }
  static void fence() { _mm_sfence(); }  // each thread orders its streamed lines before the join
};

#define D2V2_LOSS_AVX512_OPS(P, Tg) \
  template <bool kSmooth>           \
  struct TokenOps<kSmooth, P, Tg> : TokenOpsAvx512<kSmooth, P, Tg> {};
D2V2_LOSS_AVX512_OPS(float, float)
D2V2_LOSS_AVX512_OPS(float, bf16)
D2V2_LOSS_AVX512_OPS(float, f16)
D2V2_LOSS_AVX512_OPS(bf16, float)
D2V2_LOSS_AVX512_OPS(bf16, bf16)
D2V2_LOSS_AVX512_OPS(bf16, f16)
D2V2_LOSS_AVX512_OPS(f16, float)
D2V2_LOSS_AVX512_OPS(f16, bf16)
D2V2_LOSS_AVX512_OPS(f16, f16)
#undef D2V2_LOSS_AVX512_OPS
#endif  // D2V2_LOSS_AVX512

template <bool kSmooth, typename P, typename Tg>
void forward_impl(const P* pred, int64_t ps_n, int64_t ps_t, const Tg* target, int64_t ts_b, int64_t ts_t,
                  const uint8_t* mask, int64_t ms_n, int64_t ms_t, int64_t N, int64_t T_len, int64_t C,
                  int64_t clones, double scale, double beta, typename acc_type<P>::type* token_loss,
                  double* row_sum, int64_t* row_count, P* grad, double grad_coef) {
  using Ops = TokenOps<kSmooth, P, Tg>;
  using Acc = typename acc_type<P>::type;
  const RegressionParams<Acc> prm = make_regression_params<Acc>(beta);
  const Acc sc = static_cast<Acc>(scale);
  const Acc w = static_cast<Acc>(grad_coef);
  const bool stream = grad != nullptr && Ops::can_stream(grad, N * T_len, C);
#pragma omp parallel if (N * T_len * C > kParallelElements)
  {
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < N; ++n) {
      const P* prow = pred + n * ps_n;
      const Tg* trow = target + (n / clones) * ts_b;
      double rs = 0;
      int64_t count = 0;
      for (int64_t t = 0; t < T_len; ++t) {
        Acc tok = 0;
        P* g = grad ? grad + (n * T_len + t) * C : nullptr;
        prefetch_token(prow, ps_t, mask + n * ms_n, ms_t, t, T_len, C);
        if (mask[n * ms_n + t * ms_t]) {
          const P* p = prow + t * ps_t;
          const Tg* y = trow + t * ts_t;
          tok = sc * (g ? Ops::sum_grad(p, y, C, w, prm, g, stream) : Ops::sum(p, y, C, prm));
          rs += static_cast<double>(tok);
          ++count;
        } else if (g) {
          Ops::zero(g, C, stream);
        }
        if (token_loss) token_loss[n * T_len + t] = tok;
      }
      row_sum[n] = rs;
      row_count[n] = count;
    }
    if (stream) Ops::fence();
  }
}

template <bool kSmooth, typename P, typename Tg>
void backward_impl(const P* pred, int64_t ps_n, int64_t ps_t, const Tg* target, int64_t ts_b, int64_t ts_t,
                   const uint8_t* mask, int64_t ms_n, int64_t ms_t, const typename acc_type<P>::type* g_out,
                   int64_t gs_n, int64_t gs_t, double coef, int64_t N, int64_t T_len, int64_t C, int64_t clones,
                   double beta, P* grad) {
  using Ops = TokenOps<kSmooth, P, Tg>;
  using Acc = typename acc_type<P>::type;
  const RegressionParams<Acc> prm = make_regression_params<Acc>(beta);
  const Acc k = static_cast<Acc>(coef);
  const bool stream = Ops::can_stream(grad, N * T_len, C);
#pragma omp parallel if (N * T_len * C > kParallelElements)
  {
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < N; ++n) {
      const P* prow = pred + n * ps_n;
      const Tg* trow = target + (n / clones) * ts_b;
      for (int64_t t = 0; t < T_len; ++t) {
        P* g = grad + (n * T_len + t) * C;
        prefetch_token(prow, ps_t, mask + n * ms_n, ms_t, t, T_len, C);
        if (mask[n * ms_n + t * ms_t])
          Ops::grad(prow + t * ps_t, trow + t * ts_t, C, g_out[n * gs_n + t * gs_t] * k, prm, g, stream);
        else
          Ops::zero(g, C, stream);
      }
    }
    if (stream) Ops::fence();
  }
}

}  // namespace

template <typename P, typename Tg>
void masked_regression_loss_forward(const P* pred, int64_t ps_n, int64_t ps_t, const Tg* target, int64_t ts_b,
                                    int64_t ts_t, const uint8_t* mask, int64_t ms_n, int64_t ms_t, int64_t N,
                                    int64_t T_len, int64_t C, int64_t clones, double scale, double beta,
                                    typename acc_type<P>::type* token_loss, double* row_sum, int64_t* row_count,
                                    P* grad, double grad_coef) {
  if (beta > 0)
    forward_impl<true>(pred, ps_n, ps_t, target, ts_b, ts_t, mask, ms_n, ms_t, N, T_len, C, clones, scale, beta,
                       token_loss, row_sum, row_count, grad, grad_coef);
  else
    forward_impl<false>(pred, ps_n, ps_t, target, ts_b, ts_t, mask, ms_n, ms_t, N, T_len, C, clones, scale, beta,
                        token_loss, row_sum, row_count, grad, grad_coef);
}

template <typename P, typename Tg>
void masked_regression_loss_backward(const P* pred, int64_t ps_n, int64_t ps_t, const Tg* target, int64_t ts_b,
                                     int64_t ts_t, const uint8_t* mask, int64_t ms_n, int64_t ms_t,
                                     const typename acc_type<P>::type* g_out, int64_t gs_n, int64_t gs_t,
                                     double coef, int64_t N, int64_t T_len, int64_t C, int64_t clones, double beta,
                                     P* grad) {
  if (beta > 0)
    backward_impl<true>(pred, ps_n, ps_t, target, ts_b, ts_t, mask, ms_n, ms_t, g_out, gs_n, gs_t, coef, N, T_len,
                        C, clones, beta, grad);
  else
    backward_impl<false>(pred, ps_n, ps_t, target, ts_b, ts_t, mask, ms_n, ms_t, g_out, gs_n, gs_t, coef, N, T_len,
                         C, clones, beta, grad);
}

double reduce_row_partials(const double* row_sum, const int64_t* row_count, int64_t N, int64_t* count) {
  double total = 0;
  int64_t c = 0;
  for (int64_t n = 0; n < N; ++n) {  // fixed order: the result does not depend on the thread count
    total += row_sum[n];
    c += row_count[n];
  }
  *count = c;
  return total;
}

#define D2V2_INSTANTIATE(P, Tg)                                                                                 \
  template void masked_regression_loss_forward<P, Tg>(                                                          \
      const P*, int64_t, int64_t, const Tg*, int64_t, int64_t, const uint8_t*, int64_t, int64_t, int64_t, int64_t, \
      int64_t, int64_t, double, double, acc_type<P>::type*, double*, int64_t*, P*, double);                     \
  template void masked_regression_loss_backward<P, Tg>(                                                         \
      const P*, int64_t, int64_t, const Tg*, int64_t, int64_t, const uint8_t*, int64_t, int64_t,                \
      const acc_type<P>::type*, int64_t, int64_t, double, int64_t, int64_t, int64_t, int64_t, double, P*);
#define D2V2_INSTANTIATE_PRED(P) \
  D2V2_INSTANTIATE(P, float)     \
  D2V2_INSTANTIATE(P, bf16)      \
  D2V2_INSTANTIATE(P, f16)
D2V2_INSTANTIATE_PRED(float)
D2V2_INSTANTIATE_PRED(bf16)
D2V2_INSTANTIATE_PRED(f16)
D2V2_INSTANTIATE(double, double)
#undef D2V2_INSTANTIATE_PRED
#undef D2V2_INSTANTIATE

}  // namespace cpu
}  // namespace d2v2
