// ema_update_ on the CPU: one OpenMP loop over the chunks of the whole parameter list, a vectorised
// lerp (ema.h) inside each chunk. Mixed dtype pairs share the loop through a per-chunk dispatch.
#include "d2v2/cpu_kernels.h"

namespace d2v2 {
namespace cpu {

namespace {

template <typename T>
struct type_tag {
  using type = T;
};

// Calls fn(type_tag<T>{}) for the element type a tag names.
template <typename Fn>
void dispatch_dtype(EmaDtype dtype, Fn&& fn) {
  switch (dtype) {
    case EmaDtype::f32:
      fn(type_tag<float>{});
      break;
    case EmaDtype::f64:
      fn(type_tag<double>{});
      break;
    case EmaDtype::bf16:
      fn(type_tag<bf16>{});
      break;
    case EmaDtype::f16:
      fn(type_tag<f16>{});
      break;
  }
}

template <typename Teacher, typename Student>
void ema_range(Teacher* __restrict__ teacher, const Student* __restrict__ student, int64_t n, double decay,
               double one_minus_decay) {
  using Acc = ema_acc_t<Teacher>;
  const Acc d = static_cast<Acc>(decay);
  const Acc omd = static_cast<Acc>(one_minus_decay);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) teacher[i] = ema_lerp(teacher[i], student[i], d, omd);
}

}  // namespace

void ema_update(const EmaTensor* tensors, const EmaChunk* chunks, int64_t num_chunks, double decay,
                double one_minus_decay) {
  // Dynamic scheduling: a list mixes 64K-element chunks with the short tails and biases of a model.
#pragma omp parallel for schedule(dynamic, 1) if (num_chunks > 1)
  for (int64_t c = 0; c < num_chunks; ++c) {
    const EmaChunk chunk = chunks[c];
    const EmaTensor& pair = tensors[chunk.tensor];
    dispatch_dtype(pair.teacher_dtype, [&](auto teacher_tag) {
      using Teacher = typename decltype(teacher_tag)::type;
      dispatch_dtype(pair.student_dtype, [&](auto student_tag) {
        using Student = typename decltype(student_tag)::type;
        ema_range(static_cast<Teacher*>(pair.teacher) + chunk.start,
                  static_cast<const Student*>(pair.student) + chunk.start, chunk.length, decay,
                  one_minus_decay);
      });
    });
  }
}

}  // namespace cpu
}  // namespace d2v2
