// Framework-free scalar types and conversions shared by the CPU (g++) and CUDA (nvcc) kernels.
// Nothing here knows about torch: tensors arrive as raw pointers plus sizes and strides.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define D2V2_HD __host__ __device__ __forceinline__
#else
#define D2V2_HD inline
#endif

namespace d2v2 {

// Storage-only 16-bit floats: the kernels load them, compute in fp32 and store back, so all they
// need is the bit layout and round-to-nearest-even conversions, identical on host and device.
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

D2V2_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

D2V2_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

D2V2_HD float to_float(float x) { return x; }
D2V2_HD float to_float(double x) { return static_cast<float>(x); }
D2V2_HD float to_float(bf16 x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }

D2V2_HD float to_float(f16 x) {
  // IEEE half -> float, handling zeros, subnormals, inf and NaN.
  const uint32_t sign = (x.bits & 0x8000u) << 16;
  uint32_t exp = (x.bits >> 10) & 0x1f;
  uint32_t man = x.bits & 0x3ffu;
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // subnormal: value = man * 2^-24
    float v = static_cast<float>(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

template <typename T>
D2V2_HD T from_float(float v);

template <>
D2V2_HD float from_float<float>(float v) { return v; }
template <>
D2V2_HD double from_float<double>(float v) { return static_cast<double>(v); }

template <>
D2V2_HD bf16 from_float<bf16>(float v) {
  uint32_t u = float_to_bits(v);
  bf16 out;
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu)) {
    out.bits = static_cast<uint16_t>((u >> 16) | 0x40);  // keep NaN a quiet NaN
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    out.bits = static_cast<uint16_t>(u >> 16);
  }
  return out;
}

template <>
D2V2_HD f16 from_float<f16>(float v) {
  // float -> IEEE half, round to nearest even, with overflow to inf and gradual underflow.
  const uint32_t u = float_to_bits(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t absu = u & 0x7fffffffu;
  f16 out;
  if (absu >= 0x7f800000u) {  // inf or NaN
    out.bits = static_cast<uint16_t>(sign | 0x7c00u | (absu > 0x7f800000u ? 0x200u : 0u));
    return out;
  }
  if (absu >= 0x477ff000u) {  // rounds to >= 65520: overflow
    out.bits = static_cast<uint16_t>(sign | 0x7c00u);
    return out;
  }
  if (absu < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    // Adding 0.5 (exponent -1) shifts the mantissa so the FPU does the rounding for us.
    float a = bits_to_float(absu) + 0.5f;
    out.bits = static_cast<uint16_t>(sign | (float_to_bits(a) - 0x3f000000u));
    return out;
  }
  uint32_t mant_odd = (absu >> 13) & 1u;
  uint32_t r = absu + 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
  out.bits = static_cast<uint16_t>(sign | (r >> 13));
  return out;
}

// Element types a kernel may be instantiated for, matched to torch dtypes by the binding layer.
template <typename T>
struct is_float16 {
  static constexpr bool value = false;
};
template <>
struct is_float16<bf16> {
  static constexpr bool value = true;
};
template <>
struct is_float16<f16> {
  static constexpr bool value = true;
};

// Wider accumulator: fp32 for 16- and 32-bit types, fp64 when the data is fp64 (gradcheck).
template <typename T>
struct acc_type {
  using type = float;
};
template <>
struct acc_type<double> {
  using type = double;
};

template <typename T>
D2V2_HD typename acc_type<T>::type to_acc(T x) {
  return to_float(x);
}
template <>
D2V2_HD double to_acc<double>(double x) {
  return x;
}

template <typename T>
D2V2_HD T from_acc(typename acc_type<T>::type v) {
  return from_float<T>(v);
}
template <>
D2V2_HD double from_acc<double>(double v) {
  return v;
}

}  // namespace d2v2
