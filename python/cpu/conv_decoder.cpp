#include <tuple>

#include "../bindings.h"
#include "d2v2/cpu_kernels.h"

namespace {

using namespace d2v2::binding;

// The statistics' dtype: fp32, fp64 for fp64 activations.
at::ScalarType stats_dtype(const at::Tensor& z) { return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// [M, C] on the CPU with rows contiguous in C (any row stride); anything else is copied once.
at::Tensor rows_2d(const at::Tensor& t, const char* fn, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 2, fn, ": ", name, " must be 2-D [M, C], got shape ", t.sizes());
  return (t.numel() == 0 || t.stride(1) == 1 || t.size(1) == 1) ? t : t.contiguous();
}

void check_like(const at::Tensor& t, const at::Tensor& z, const char* fn, const char* name) {
  TORCH_CHECK(t.sizes() == z.sizes(), fn, ": ", name, " must have z's shape ", z.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == z.scalar_type(), fn, ": ", name, " must have z's dtype ", z.scalar_type(),
                   ", got ", t.scalar_type());
}

at::Tensor bias_for(const c10::optional<at::Tensor>& bias, const at::Tensor& z, const char* fn) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.device().is_cpu(), fn, ": bias must be a CPU tensor, got device ", b.device());
  TORCH_CHECK(b.dim() == 1 && b.size(0) == z.size(1), fn, ": bias must have shape [C] = [", z.size(1), "], got ",
              b.sizes());
  TORCH_CHECK_TYPE(b.scalar_type() == z.scalar_type(), fn, ": bias must have z's dtype ", z.scalar_type(), ", got ",
                   b.scalar_type());
  return b.contiguous();
}

// Row stride of an [M, C] tensor with rows contiguous in C (any value serves a single row).
int64_t row_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

// (out [M, C] z's dtype, mean [M], rstd [M]) of out = gelu(layer_norm(z + bias)) (+ residual).
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_decoder_epilogue_forward(
    const at::Tensor& z_in, const c10::optional<at::Tensor>& bias_in, const c10::optional<at::Tensor>& residual_in,
    double eps) {
  constexpr const char* fn = "conv_decoder_epilogue_forward(cpu)";
  const at::Tensor z = rows_2d(z_in, fn, "z");
  TORCH_CHECK_VALUE(eps >= 0.0, fn, ": eps must be >= 0, got ", eps);
  const at::Tensor bias = bias_for(bias_in, z, fn);
  at::Tensor residual;
  if (residual_in.has_value() && residual_in->defined()) {
    residual = rows_2d(*residual_in, fn, "residual");
    check_like(residual, z, fn, "residual");
  }
  const int64_t M = z.size(0), C = z.size(1);
  at::Tensor out = at::empty({M, C}, z.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor mean = at::empty({M}, z.options().dtype(stats_dtype(z)));
  at::Tensor rstd = at::empty({M}, z.options().dtype(stats_dtype(z)));
  if (M == 0 || C == 0) return {out, mean, rstd};
  D2V2_DISPATCH_FLOATING(z.scalar_type(), "conv_decoder_epilogue_forward", [&] {
    using Acc = d2v2::conv_decoder_acc_t<scalar_t>;
    d2v2::cpu::conv_decoder_epilogue_forward<scalar_t>(
        ptr<scalar_t>(z), row_stride(z), bias.defined() ? ptr<scalar_t>(bias) : nullptr,
        residual.defined() ? ptr<scalar_t>(residual) : nullptr, residual.defined() ? row_stride(residual) : 0,
        ptr<scalar_t>(out), ptr<Acc>(mean), ptr<Acc>(rstd), M, C, eps);
  });
  return {out, mean, rstd};
}

// (grad_z [M, C] z's dtype, grad_bias [C] in the statistics' dtype or None).
std::tuple<at::Tensor, c10::optional<at::Tensor>> conv_decoder_epilogue_backward(
    const at::Tensor& grad_out_in, const at::Tensor& z_in, const c10::optional<at::Tensor>& bias_in,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, bool need_bias_grad) {
  constexpr const char* fn = "conv_decoder_epilogue_backward(cpu)";
  const at::Tensor z = rows_2d(z_in, fn, "z");
  const at::Tensor grad_out = rows_2d(grad_out_in, fn, "grad_out");
  check_like(grad_out, z, fn, "grad_out");
  const at::Tensor bias = bias_for(bias_in, z, fn);
  const int64_t M = z.size(0), C = z.size(1);
  const auto acc = stats_dtype(z);
  for (const auto* s : {&mean_in, &rstd_in}) {
    const char* name = s == &mean_in ? "mean" : "rstd";
    TORCH_CHECK(s->device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ", s->device());
    TORCH_CHECK(s->dim() == 1 && s->size(0) == M, fn, ": ", name, " must have shape [M] = [", M, "], got ",
                s->sizes());
    TORCH_CHECK_TYPE(s->scalar_type() == acc, fn, ": ", name, " must be ", acc, " for ", z.scalar_type(),
                     " z, got ", s->scalar_type());
  }
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor grad_z = at::empty({M, C}, z.options().memory_format(at::MemoryFormat::Contiguous));
  c10::optional<at::Tensor> grad_bias;
  if (need_bias_grad) grad_bias = at::empty({C}, z.options().dtype(acc));
  if (C == 0) return {grad_z, grad_bias};
  D2V2_DISPATCH_FLOATING(z.scalar_type(), "conv_decoder_epilogue_backward", [&] {
    using Acc = d2v2::conv_decoder_acc_t<scalar_t>;
    d2v2::cpu::conv_decoder_epilogue_backward<scalar_t>(
        ptr<scalar_t>(grad_out), row_stride(grad_out), ptr<scalar_t>(z), row_stride(z),
        bias.defined() ? ptr<scalar_t>(bias) : nullptr, ptr<Acc>(mean), ptr<Acc>(rstd), ptr<scalar_t>(grad_z),
        need_bias_grad ? ptr<Acc>(*grad_bias) : nullptr, M, C);
  });
  return {grad_z, grad_bias};
}

}  // namespace

void register_conv_decoder(pybind11::module_& m) {
  m.def("conv_decoder_epilogue_forward", &conv_decoder_epilogue_forward,
        "(out, mean, rstd): out = gelu_erf(layer_norm_no_affine(z + bias)) (+ residual) per row of z [M, C] "
        "(rows contiguous in C); mean / rstd [M] in fp32 (fp64 for fp64 z)",
        pybind11::arg("z"), pybind11::arg("bias"), pybind11::arg("residual"), pybind11::arg("eps"));
  m.def("conv_decoder_epilogue_backward", &conv_decoder_epilogue_backward,
        "(grad_z, grad_bias): gradient of the epilogue w.r.t. z + bias (not the residual's); grad_bias [C] in "
        "fp32 (fp64 for fp64 z), summed deterministically over rows, or None unless need_bias_grad",
        pybind11::arg("grad_out"), pybind11::arg("z"), pybind11::arg("bias"), pybind11::arg("mean"),
        pybind11::arg("rstd"), pybind11::arg("need_bias_grad"));
}
