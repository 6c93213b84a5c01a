// Shared helpers of the binding layer: the only code that knows both torch and csrc.
// Tensors come in already validated by the Python op (shapes, dtypes, index ranges); the checks here
// guard the raw-pointer contract of the kernels (device, layout, dtype) and fail loudly if broken.
#pragma once

#include <torch/extension.h>

#include "d2v2/common.h"

namespace d2v2 {
namespace binding {

// Runs BODY with scalar_t bound to the csrc element type matching a torch floating dtype.
#define D2V2_DISPATCH_FLOATING(DTYPE, NAME, ...)                                                 \
  [&] {                                                                                            \
    switch (DTYPE) {                                                                               \
      case at::kFloat: {                                                                           \
        using scalar_t = float;                                                                    \
        return __VA_ARGS__();                                                                      \
      }                                                                                            \
      case at::kDouble: {                                                                          \
        using scalar_t = double;                                                                   \
        return __VA_ARGS__();                                                                      \
      }                                                                                            \
      case at::kBFloat16: {                                                                        \
        using scalar_t = ::d2v2::bf16;                                                             \
        return __VA_ARGS__();                                                                      \
      }                                                                                            \
      case at::kHalf: {                                                                            \
        using scalar_t = ::d2v2::f16;                                                              \
        return __VA_ARGS__();                                                                      \
      }                                                                                            \
      default:                                                                                     \
        TORCH_CHECK_TYPE(false, NAME, ": unsupported dtype ", DTYPE,                              \
                         " (expected float32, float64, bfloat16 or float16)");                    \
    }                                                                                              \
  }()

template <typename T>
inline T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// Index tensors reach the kernels as contiguous int64.
inline at::Tensor as_index(const at::Tensor& ids) { return ids.to(at::kLong).contiguous(); }

// Rows must be contiguous in the last dimension; anything else is copied once.
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.numel() == 0 || t.stride(-1) == 1) ? t : t.contiguous();
}

// --- multi-tensor pairs (ema_update_) ---

// Whether a and b send every index to the same element offset (strides of size-1 dims never matter).
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

// A pair the kernel can update as flat memory: a dense teacher and a student laid out exactly like it.
// A dense teacher of any layout (channels_last, transposed) is updated where it lies and only a
// differently laid-out student is copied; a teacher with gaps (a strided view) is updated through a
// contiguous copy that is copied back afterwards.
struct FlatPair {
  at::Tensor teacher;
  at::Tensor student;
  bool copy_back;
};

inline FlatPair flat_pair(const at::Tensor& teacher, const at::Tensor& student) {
  if (teacher.is_non_overlapping_and_dense()) {
    if (same_layout(teacher, student)) return {teacher, student, false};
    at::Tensor s = at::empty_strided(teacher.sizes(), teacher.strides(), student.options());
    s.copy_(student);
    return {teacher, s, false};
  }
  return {teacher.contiguous(), student.contiguous(), true};
}

}  // namespace binding
}  // namespace d2v2
