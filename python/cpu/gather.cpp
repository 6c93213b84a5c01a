#include "../bindings.h"
#include "d2v2/cpu_kernels.h"

namespace {

using namespace d2v2::binding;

at::Tensor gather_visible_forward(const at::Tensor& x_in, const at::Tensor& ids_in, int64_t clones) {
  TORCH_CHECK(x_in.device().is_cpu() && ids_in.device().is_cpu(), "gather_visible(cpu): CPU tensors only");
  const at::Tensor x = rows_contiguous(x_in);
  const at::Tensor ids = as_index(ids_in);
  const int64_t N = ids.size(0), K = ids.size(1), C = x.size(2);
  at::Tensor out = at::empty({N, K, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  D2V2_DISPATCH_FLOATING(x.scalar_type(), "gather_visible", [&] {
    d2v2::cpu::gather_visible_forward<scalar_t>(ptr<scalar_t>(x), x.stride(0), x.stride(1),
                                                ptr<int64_t>(ids), ptr<scalar_t>(out), N, K, C, clones);
  });
  return out;
}

at::Tensor gather_visible_backward(const at::Tensor& grad_in, const at::Tensor& ids_in, int64_t clones,
                                   int64_t T) {
  TORCH_CHECK(grad_in.device().is_cpu() && ids_in.device().is_cpu(), "gather_visible(cpu): CPU tensors only");
  const at::Tensor grad = rows_contiguous(grad_in);
  const at::Tensor ids = as_index(ids_in);
  const int64_t N = ids.size(0), K = ids.size(1), C = grad.size(2);
  const int64_t B = N / clones;
  at::Tensor grad_x = at::empty({B, T, C}, grad.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad_x.numel() == 0) return grad_x;
  D2V2_DISPATCH_FLOATING(grad.scalar_type(), "gather_visible_backward", [&] {
    d2v2::cpu::gather_visible_backward<scalar_t>(ptr<scalar_t>(grad), grad.stride(0), grad.stride(1),
                                                 ptr<int64_t>(ids), ptr<scalar_t>(grad_x), B, T, K, C,
                                                 clones);
  });
  return grad_x;
}

}  // namespace

void register_gather(pybind11::module_& m) {
  m.def("gather_visible_forward", &gather_visible_forward, "out[n, j] = x[n // clones, ids[n, j]]");
  m.def("gather_visible_backward", &gather_visible_backward,
        "grad_x[b, t] = sum of grad_out rows gathered from (b, t); deterministic, no atomics");
}
