#include <optional>

#include "../bindings.h"
#include "d2v2/cpu_kernels.h"

namespace {

using namespace d2v2::binding;

// noise given: copied into the masked positions; absent: drawn in the kernel from (seed, flat index).
at::Tensor decoder_input_forward(const at::Tensor& x_in, const at::Tensor& ids_in,
                                 const std::optional<at::Tensor>& noise_in, int64_t seed, double noise_std) {
  TORCH_CHECK(x_in.device().is_cpu() && ids_in.device().is_cpu(), "decoder_input(cpu): CPU tensors only");
  const at::Tensor x = rows_contiguous(x_in);
  const at::Tensor ids = as_index(ids_in);
  const int64_t N = x.size(0), K = x.size(1), C = x.size(2), T = ids.size(1);
  TORCH_CHECK(ids.size(0) == N && K <= T, "decoder_input(cpu): ids_restore must be [N, T] with T >= K");
  at::Tensor noise;
  if (noise_in.has_value()) {
    noise = rows_contiguous(*noise_in);
    TORCH_CHECK(noise.device().is_cpu() && noise.scalar_type() == x.scalar_type() &&
                    noise.sizes() == at::IntArrayRef({N, T - K, C}),
                "decoder_input(cpu): noise must be a CPU [N, T - K, C] tensor of x_vis's dtype");
  }
  at::Tensor out = at::empty({N, T, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  D2V2_DISPATCH_FLOATING(x.scalar_type(), "decoder_input", [&] {
    d2v2::cpu::decoder_input_forward<scalar_t>(
        ptr<scalar_t>(x), x.stride(0), x.stride(1), ptr<int64_t>(ids),
        noise.defined() ? ptr<scalar_t>(noise) : nullptr, noise.defined() ? noise.stride(0) : 0,
        noise.defined() ? noise.stride(1) : 0, ptr<scalar_t>(out), N, T, K, C, static_cast<uint64_t>(seed),
        static_cast<float>(noise_std));
  });
  return out;
}

at::Tensor decoder_input_backward(const at::Tensor& grad_in, const at::Tensor& ids_in, int64_t K) {
  TORCH_CHECK(grad_in.device().is_cpu() && ids_in.device().is_cpu(), "decoder_input(cpu): CPU tensors only");
  const at::Tensor grad = rows_contiguous(grad_in);
  const at::Tensor ids = as_index(ids_in);
  const int64_t N = grad.size(0), T = grad.size(1), C = grad.size(2);
  TORCH_CHECK(ids.size(0) == N && ids.size(1) == T && K <= T, "decoder_input_backward(cpu): shape mismatch");
  at::Tensor grad_x = at::empty({N, K, C}, grad.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad_x.numel() == 0) return grad_x;
  D2V2_DISPATCH_FLOATING(grad.scalar_type(), "decoder_input_backward", [&] {
    d2v2::cpu::decoder_input_backward<scalar_t>(ptr<scalar_t>(grad), grad.stride(0), grad.stride(1),
                                                ptr<int64_t>(ids), ptr<scalar_t>(grad_x), N, T, K, C);
  });
  return grad_x;
}

}  // namespace

void register_decoder_input(pybind11::module_& m) {
  m.def("decoder_input_forward", &decoder_input_forward,
        "out[n, t] = x_vis[n, r] if r = ids[n, t] < K else noise[n, r - K] (given, or drawn from seed)",
        pybind11::arg("x_vis"), pybind11::arg("ids_restore"), pybind11::arg("noise"), pybind11::arg("seed"),
        pybind11::arg("noise_std"));
  m.def("decoder_input_backward", &decoder_input_backward,
        "grad_x_vis[n, ids[n, t]] = grad_out[n, t] for ids[n, t] < K; each row written once");
}
