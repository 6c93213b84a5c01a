// ema_update_: teacher = decay * teacher + (1 - decay) * student, per element, shared by the CPU (g++)
// and CUDA (nvcc) kernels so the CPU tests execute the arithmetic the GPU runs.
//
// The math runs in the teacher's accumulator type (fp32, or fp64 for an fp64 teacher) whatever the
// student's dtype: a bf16 student is widened on load, a bf16/fp16 teacher is rounded once on store.
// Both weights come in precomputed, as the reference computes them: `decay` and `1 - decay`.
#pragma once

#include <cstdint>

#include "d2v2/common.h"

namespace d2v2 {

// Element types an EMA pair may hold, tagged at run time where one loop walks mixed-dtype lists.
enum class EmaDtype : int8_t { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

// The accumulator of a teacher type: the student is converted to it before the lerp.
template <typename Teacher>
using ema_acc_t = typename acc_type<Teacher>::type;

// Widening loads: to fp32 via common.h, or to fp64 without passing an fp64 student through fp32.
template <typename Acc, typename T>
struct ema_load {
  D2V2_HD static Acc apply(T x) { return static_cast<Acc>(to_float(x)); }
};
template <>
struct ema_load<double, double> {
  D2V2_HD static double apply(double x) { return x; }
};
template <>
struct ema_load<double, float> {
  D2V2_HD static double apply(float x) { return static_cast<double>(x); }
};

// fp16 -> fp32 without branches (selects only), so fp16 students (fp16 AMP) keep the CPU loop
// vectorised; bit-identical to common.h's to_float(f16) for all 65536 inputs (checked in test_ema.cpp).
D2V2_HD float f16_to_float_branchless(f16 x) {
  const uint32_t h = x.bits;
  const uint32_t body = (h & 0x7fffu) << 13;  // exponent and mantissa in fp32 position
  const uint32_t exponent = body & 0x0f800000u;
  const uint32_t normal = body + 0x38000000u;            // rebias 15 -> 127
  const uint32_t inf_nan = normal + 0x38000000u;         // exponent 31 -> 255
  const float subnormal = bits_to_float(normal + 0x00800000u) - bits_to_float(0x38800000u);  // renormalise
  const uint32_t magnitude =
      exponent == 0x0f800000u ? inf_nan : (exponent == 0 ? float_to_bits(subnormal) : normal);
  return bits_to_float(magnitude | ((h & 0x8000u) << 16));
}
template <>
struct ema_load<float, f16> {
  D2V2_HD static float apply(f16 x) { return f16_to_float_branchless(x); }
};
template <>
struct ema_load<double, f16> {
  D2V2_HD static double apply(f16 x) { return static_cast<double>(f16_to_float_branchless(x)); }
};

template <typename Teacher, typename Student>
D2V2_HD Teacher ema_lerp(Teacher teacher, Student student, ema_acc_t<Teacher> decay,
                         ema_acc_t<Teacher> one_minus_decay) {
  using Acc = ema_acc_t<Teacher>;
  const Acc t = ema_load<Acc, Teacher>::apply(teacher);
  const Acc s = ema_load<Acc, Student>::apply(student);
  return from_acc<Teacher>(decay * t + one_minus_decay * s);
}

}  // namespace d2v2
