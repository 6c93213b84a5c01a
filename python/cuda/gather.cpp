#include "cuda_bindings.h"
#include "d2v2/cuda_kernels.h"

namespace {

using namespace d2v2::binding;

at::Tensor gather_visible_forward(const at::Tensor& x_in, const at::Tensor& ids_in, int64_t clones) {
  TORCH_CHECK(x_in.is_cuda() && ids_in.device() == x_in.device(), "gather_visible(cuda): tensors on one GPU");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_contiguous(x_in);
  const at::Tensor ids = as_index(ids_in);
  const int64_t N = ids.size(0), K = ids.size(1), C = x.size(2);
  at::Tensor out = at::empty({N, K, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  D2V2_DISPATCH_FLOATING(x.scalar_type(), "gather_visible", [&] {
    d2v2::cuda::gather_visible_forward<scalar_t>(ptr<scalar_t>(x), x.stride(0), x.stride(1), ptr<int64_t>(ids),
                                                 ptr<scalar_t>(out), N, K, C, clones, current_stream());
  });
  return out;
}

at::Tensor gather_visible_backward(const at::Tensor& grad_in, const at::Tensor& ids_in, int64_t clones, int64_t T) {
  TORCH_CHECK(grad_in.is_cuda() && ids_in.device() == grad_in.device(), "gather_visible(cuda): tensors on one GPU");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor ids = as_index(ids_in);
  const int64_t N = ids.size(0), C = grad.size(2);
  const int64_t B = N / clones;
  at::Tensor grad_x = at::empty({B, T, C}, grad.options());
  if (grad_x.numel() == 0) return grad_x;
  // CSR of source rows per target row: a stable sort of the flat target keys b*T + t.
  const at::Tensor sample = at::arange(N, ids.options()).div(clones, "floor").unsqueeze(1);
  const at::Tensor keys = (sample * T + ids).flatten();
  const at::Tensor rows_by_target = std::get<1>(keys.sort(/*stable=*/true));
  const at::Tensor counts = at::bincount(keys, {}, B * T);
  const at::Tensor segment_start = at::cat({at::zeros({1}, ids.options()), counts.cumsum(0)});
  D2V2_DISPATCH_FLOATING(grad.scalar_type(), "gather_visible_backward", [&] {
    d2v2::cuda::gather_visible_backward<scalar_t>(ptr<scalar_t>(grad), ptr<int64_t>(rows_by_target),
                                                  ptr<int64_t>(segment_start), ptr<scalar_t>(grad_x), B * T, C,
                                                  current_stream());
  });
  return grad_x;
}

}  // namespace

void register_gather_cuda(pybind11::module_& m) {
  m.def("gather_visible_forward", &gather_visible_forward);
  m.def("gather_visible_backward", &gather_visible_backward);
}
