#include <map>
#include <utility>
#include <vector>

#include "cuda_bindings.h"
#include "d2v2/cuda_kernels.h"

namespace {

using namespace d2v2::binding;

void ema_update_(std::vector<at::Tensor> teacher, std::vector<at::Tensor> student, const at::Tensor& decay) {
  TORCH_CHECK(teacher.size() == student.size(), "ema_update_(cuda): ", teacher.size(), " teacher tensors but ",
              student.size(), " student tensors");
  if (teacher.empty()) return;
  const at::Device device = teacher[0].device();
  TORCH_CHECK(device.is_cuda(), "ema_update_(cuda): CUDA tensors only");
  TORCH_CHECK(decay.numel() == 1 && (decay.device().is_cpu() || decay.device() == device),
              "ema_update_(cuda): decay must be a 1-element tensor on the CPU or on ", device);
  const c10::cuda::CUDAGuard guard(device);

  // One launch sequence per (teacher dtype, student dtype): the kernel is typed on both.
  std::map<std::pair<at::ScalarType, at::ScalarType>, std::vector<size_t>> groups;
  std::vector<FlatPair> pairs(teacher.size());
  for (size_t i = 0; i < teacher.size(); ++i) {
    const at::Tensor& t = teacher[i];
    const at::Tensor& s = student[i];
    TORCH_CHECK(t.device() == device && s.device() == device, "ema_update_(cuda): pair ", i, " is not on ", device);
    TORCH_CHECK(t.sizes() == s.sizes(), "ema_update_(cuda): pair ", i, " has teacher shape ", t.sizes(),
                " but student shape ", s.sizes());
    if (t.numel() == 0) continue;
    TORCH_CHECK(t.numel() < (int64_t(1) << 46), "ema_update_(cuda): pair ", i, " is too large");
    pairs[i] = flat_pair(t, s);
    groups[{t.scalar_type(), s.scalar_type()}].push_back(i);
  }

  // A decay on the device is read by the kernel (no sync; a captured graph replays the current value);
  // a CPU scalar is read here and passed by value.
  const bool decay_on_device = decay.is_cuda();
  const double host_decay = decay_on_device ? 0.0 : decay.item<double>();
  for (const auto& group : groups) {
    const at::ScalarType teacher_type = group.first.first;
    const at::ScalarType student_type = group.first.second;
    const std::vector<size_t>& members = group.second;
    const at::ScalarType acc_type = teacher_type == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor device_decay = decay_on_device ? decay.reshape({1}).to(acc_type) : at::Tensor();
    D2V2_DISPATCH_FLOATING(teacher_type, "ema_update_ teacher", [&] {
      using teacher_t = scalar_t;
      D2V2_DISPATCH_FLOATING(student_type, "ema_update_ student", [&] {
        using student_t = scalar_t;
        std::vector<teacher_t*> teacher_ptrs;
        std::vector<const student_t*> student_ptrs;
        std::vector<int64_t> numel;
        for (size_t i : members) {
          teacher_ptrs.push_back(ptr<teacher_t>(pairs[i].teacher));
          student_ptrs.push_back(ptr<const student_t>(pairs[i].student));
          numel.push_back(pairs[i].teacher.numel());
        }
        using acc_t = d2v2::ema_acc_t<teacher_t>;
        const acc_t* decay_ptr = decay_on_device ? ptr<const acc_t>(device_decay) : nullptr;
        d2v2::cuda::ema_update<teacher_t, student_t>(teacher_ptrs.data(), student_ptrs.data(), numel.data(),
                                                     static_cast<int64_t>(members.size()), decay_ptr, host_decay,
                                                     current_stream());
      });
    });
  }

  for (size_t i = 0; i < teacher.size(); ++i)
    if (pairs[i].copy_back) teacher[i].copy_(pairs[i].teacher);
}

}  // namespace

void register_ema_cuda(pybind11::module_& m) {
  m.def("ema_update_", &ema_update_,
        "teacher[i] = decay * teacher[i] + (1 - decay) * student[i] for the whole list, in place, multi-tensor "
        "launches; decay is a 1-element tensor on the device (read by the kernel) or on the CPU");
}
