// decoder_input on the CPU: one pass over the output rows, each a copy of its visible row, a copy of
// its noise row, or a row of Philox noise drawn in place (never a separate noise tensor).
#include <algorithm>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's avx512fintrin.h builds its "undefined" operands as `__m512i __Y = __Y;`, which -Wall reports
// as maybe-uninitialized wherever the intrinsics are inlined (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "d2v2/cpu_kernels.h"
#include "d2v2/philox.h"

namespace d2v2 {
namespace cpu {

constexpr int64_t kChunk = 256;  // Philox groups drawn per chunk: 4 KiB of words, 4 KiB of fp32, in L1

// The Philox words of groups g0 .. g0 + count - 1 (count <= kChunk; with SIMD, up to the next multiple
// of the vector width may be written). Exact integer arithmetic: every path gives the same bits.
#if defined(__AVX512F__)
// GCC widens the 32x32 -> 64 multiplies of a vectorised philox4x32_10 to 64-bit lanes (vpmullq and
// repacking); by hand, even and odd lanes go through vpmuludq directly: half the time of the loop.
inline __m512i mulhilo_epu32(__m512i a, __m512i m, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(a, m);                         // 64-bit products, lanes 0, 2, ...
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // lanes 1, 3, ...
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  return _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

inline void philox_words(uint32_t seed_lo, uint32_t seed_hi, uint64_t g0, int64_t count, uint32_t* w0,
                         uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m512i lo0 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g0)));
  const __m512i hi0 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g0 >> 32)));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t j = 0; j < count; j += 16) {
    __m512i c0 = _mm512_add_epi32(lo0, _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(j))));
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, lo0);  // the low word wrapped: carry into the high
    __m512i c1 = _mm512_mask_add_epi32(hi0, carry, hi0, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
    uint32_t k0 = seed_lo, k1 = seed_hi;
    for (int round = 0; round < 10; ++round) {
      __m512i p0, p1;
      const __m512i h0 = mulhilo_epu32(c0, m0, &p0), h1 = mulhilo_epu32(c2, m1, &p1);
      c0 = _mm512_ternarylogic_epi32(h1, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);  // 3-way xor
      c2 = _mm512_ternarylogic_epi32(h0, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
      c1 = p1;
      c3 = p0;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    _mm512_store_si512(w0 + j, c0);
    _mm512_store_si512(w1 + j, c1);
    _mm512_store_si512(w2 + j, c2);
    _mm512_store_si512(w3 + j, c3);
  }
}
#elif defined(__AVX2__)
inline __m256i mulhilo_epu32(__m256i a, __m256i m, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  return _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

inline void philox_words(uint32_t seed_lo, uint32_t seed_hi, uint64_t g0, int64_t count, uint32_t* w0,
                         uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i lo0 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g0)));
  const __m256i hi0 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g0 >> 32)));
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));  // unsigned compare via signed
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t j = 0; j < count; j += 8) {
    __m256i c0 = _mm256_add_epi32(lo0, _mm256_add_epi32(iota, _mm256_set1_epi32(static_cast<int>(j))));
    const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(lo0, sign), _mm256_xor_si256(c0, sign));
    __m256i c1 = _mm256_sub_epi32(hi0, wrapped);  // wrapped is -1 where the low word wrapped
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t k0 = seed_lo, k1 = seed_hi;
    for (int round = 0; round < 10; ++round) {
      __m256i p0, p1;
      const __m256i h0 = mulhilo_epu32(c0, m0, &p0), h1 = mulhilo_epu32(c2, m1, &p1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(h1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(h0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = p1;
      c3 = p0;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(w0 + j), c0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w1 + j), c1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w2 + j), c2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w3 + j), c3);
  }
}
#else
inline void philox_words(uint32_t seed_lo, uint32_t seed_hi, uint64_t g0, int64_t count, uint32_t* w0,
                         uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  const uint32_t lo0 = static_cast<uint32_t>(g0), hi0 = static_cast<uint32_t>(g0 >> 32);
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    const uint32_t lo = lo0 + static_cast<uint32_t>(j);
    const Philox4x32 w = philox4x32_10(Philox4x32{lo, hi0 + (lo < lo0 ? 1u : 0u), 0u, 0u}, seed_lo, seed_hi);
    w0[j] = w.x0;
    w1[j] = w.x1;
    w2[j] = w.x2;
    w3[j] = w.x3;
  }
}
#endif

// Noise numbers [begin, begin + count) of the stream `seed`, times noise_std, into dst. Number i is lane
// i % 4 of Philox group i / 4 (philox.h): each group is drawn once per chunk (its four words, then
// Box-Muller on both pairs, four normals into fp32 on the stack), then the chunk's part inside
// [begin, begin + count) is stored. The groups at the two ends may straddle the neighbouring rows;
// their lanes outside the range are drawn and dropped.
template <typename T>
void draw_noise_row(T* dst, uint64_t begin, int64_t count, uint64_t seed, float noise_std) {
  if (count <= 0) return;
  alignas(64) uint32_t w0[kChunk], w1[kChunk], w2[kChunk], w3[kChunk];
  alignas(64) float buf[4 * kChunk];
  const uint32_t seed_lo = static_cast<uint32_t>(seed), seed_hi = static_cast<uint32_t>(seed >> 32);
  const uint64_t end = begin + static_cast<uint64_t>(count);
  const uint64_t first = begin >> 2, last = (end - 1) >> 2;  // the groups covering [begin, end)
  for (uint64_t g0 = first; g0 <= last; g0 += kChunk) {
    const int64_t groups = static_cast<int64_t>(std::min<uint64_t>(kChunk, last - g0 + 1));
    philox_words(seed_lo, seed_hi, g0, groups, w0, w1, w2, w3);
    // philox.h's polynomials are branch-free: this loop vectorises with -O3 -march=native.
#pragma omp simd
    for (int64_t j = 0; j < groups; ++j) {
      const SinCos a = box_muller2(philox_open_unit(w0[j]), philox_signed_unit(w1[j]));
      const SinCos b = box_muller2(philox_open_unit(w2[j]), philox_signed_unit(w3[j]));
      buf[4 * j + 0] = a.c;
      buf[4 * j + 1] = a.s;
      buf[4 * j + 2] = b.c;
      buf[4 * j + 3] = b.s;
    }
    const uint64_t lo = std::max(4 * g0, begin), hi = std::min(4 * (g0 + static_cast<uint64_t>(groups)), end);
    const float* src = buf + (lo - 4 * g0);
    T* out = dst + (lo - begin);
    const int64_t n = static_cast<int64_t>(hi - lo);
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) out[k] = from_float<T>(src[k] * noise_std);
  }
}

template <typename T>
void decoder_input_forward(const T* x_vis, int64_t x_stride_n, int64_t x_stride_k, const int64_t* ids,
                           const T* noise, int64_t noise_stride_n, int64_t noise_stride_r, T* out,
                           int64_t N, int64_t T_len, int64_t K, int64_t C, uint64_t seed, float noise_std) {
  const int64_t rows = N * T_len;
  const int64_t masked = T_len - K;
  // A drawn element costs a few ns against a copied one's fraction of one: a lower bar for threads.
  const int64_t work = rows * C * (noise == nullptr ? 16 : 1);
#pragma omp parallel for schedule(static) if (work > 32768)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t n = row / T_len;
    const int64_t r = ids[row];
    T* dst = out + row * C;
    if (r < K) {
      std::memcpy(dst, x_vis + n * x_stride_n + r * x_stride_k, sizeof(T) * C);
    } else if (noise != nullptr) {
      std::memcpy(dst, noise + n * noise_stride_n + (r - K) * noise_stride_r, sizeof(T) * C);
    } else {
      draw_noise_row(dst, static_cast<uint64_t>((n * masked + (r - K)) * C), C, seed, noise_std);
    }
  }
}

template <typename T>
void decoder_input_backward(const T* grad_out, int64_t g_stride_n, int64_t g_stride_t, const int64_t* ids,
                            T* grad_x_vis, int64_t N, int64_t T_len, int64_t K, int64_t C) {
  const int64_t rows = N * T_len;
#pragma omp parallel for schedule(static) if (rows * C > 32768)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t r = ids[row];
    if (r >= K) continue;  // a noise position: no gradient flows back
    const int64_t n = row / T_len, t = row - n * T_len;
    std::memcpy(grad_x_vis + (n * K + r) * C, grad_out + n * g_stride_n + t * g_stride_t, sizeof(T) * C);
  }
}

// For csrc/tests (which declares it): counters beyond 2^32 groups, out of reach of any test tensor.
template void draw_noise_row<float>(float*, uint64_t, int64_t, uint64_t, float);

#define D2V2_INSTANTIATE(T)                                                                              \
  template void decoder_input_forward<T>(const T*, int64_t, int64_t, const int64_t*, const T*, int64_t,  \
                                         int64_t, T*, int64_t, int64_t, int64_t, int64_t, uint64_t, float); \
  template void decoder_input_backward<T>(const T*, int64_t, int64_t, const int64_t*, T*, int64_t, int64_t, \
                                          int64_t, int64_t);
D2V2_INSTANTIATE(float)
D2V2_INSTANTIATE(double)
D2V2_INSTANTIATE(bf16)
D2V2_INSTANTIATE(f16)
#undef D2V2_INSTANTIATE

}  // namespace cpu
}  // namespace d2v2
