#include <algorithm>
#include <vector>

#include "../bindings.h"
#include "d2v2/cpu_kernels.h"

namespace {

using namespace d2v2::binding;

d2v2::EmaDtype ema_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return d2v2::EmaDtype::f32;
    case at::kDouble:
      return d2v2::EmaDtype::f64;
    case at::kBFloat16:
      return d2v2::EmaDtype::bf16;
    case at::kHalf:
      return d2v2::EmaDtype::f16;
    default:
      TORCH_CHECK_TYPE(false, "ema_update_(cpu): ", name, " has unsupported dtype ", t.scalar_type());
  }
}

void ema_update_(std::vector<at::Tensor> teacher, std::vector<at::Tensor> student, const at::Tensor& decay) {
  TORCH_CHECK(teacher.size() == student.size(), "ema_update_(cpu): ", teacher.size(), " teacher tensors but ",
              student.size(), " student tensors");
  TORCH_CHECK(decay.device().is_cpu() && decay.numel() == 1, "ema_update_(cpu): decay must be a 1-element CPU tensor");
  const double d = decay.item<double>();  // a CPU scalar: no device sync

  std::vector<FlatPair> pairs;
  std::vector<d2v2::cpu::EmaTensor> tensors;
  std::vector<d2v2::cpu::EmaChunk> chunks;
  pairs.reserve(teacher.size());
  tensors.reserve(teacher.size());
  for (size_t i = 0; i < teacher.size(); ++i) {
    const at::Tensor& t = teacher[i];
    const at::Tensor& s = student[i];
    TORCH_CHECK(t.device().is_cpu() && s.device().is_cpu(), "ema_update_(cpu): pair ", i, " is not on the CPU");
    TORCH_CHECK(t.sizes() == s.sizes(), "ema_update_(cpu): pair ", i, " has teacher shape ", t.sizes(),
                " but student shape ", s.sizes());
    const int64_t n = t.numel();
    if (n == 0) continue;
    pairs.push_back(flat_pair(t, s));
    const FlatPair& p = pairs.back();
    const auto index = static_cast<int64_t>(tensors.size());
    tensors.push_back({p.teacher.data_ptr(), p.student.data_ptr(), ema_dtype(t, "teacher"), ema_dtype(s, "student")});
    for (int64_t start = 0; start < n; start += d2v2::cpu::kEmaChunkElements)
      chunks.push_back({index, start, std::min(d2v2::cpu::kEmaChunkElements, n - start)});
  }
  if (chunks.empty()) return;
  d2v2::cpu::ema_update(tensors.data(), chunks.data(), static_cast<int64_t>(chunks.size()), d, 1.0 - d);

  size_t k = 0;
  for (size_t i = 0; i < teacher.size(); ++i) {
    if (teacher[i].numel() == 0) continue;
    if (pairs[k].copy_back) teacher[i].copy_(pairs[k].teacher);
    ++k;
  }
}

}  // namespace

void register_ema(pybind11::module_& m) {
  m.def("ema_update_", &ema_update_,
        "teacher[i] = decay * teacher[i] + (1 - decay) * student[i] for the whole list, in place (fp32 math; fp64 "
        "for fp64 teachers); decay is a 1-element CPU tensor");
}
