#include <string>
#include <vector>

#include "../bindings.h"
#include "d2v2/cpu_kernels.h"

namespace {

using namespace d2v2::binding;

d2v2::TargetNorm target_norm(const std::string& name, const char* arg) {
  if (name == "instance") return d2v2::TargetNorm::instance;
  if (name == "layer") return d2v2::TargetNorm::layer;
  if (name == "none") return d2v2::TargetNorm::none;
  TORCH_CHECK_VALUE(false, "layer_average_targets(cpu): ", arg, " must be 'instance', 'layer' or 'none', got '",
                    name, "'");
}

// layers: [stacked [K, B, T, C]] or K tensors [B, T, C]; each layer is read in place (rows contiguous in
// C, any (b, t) strides) through a table of K pointers, so a list is never stacked.
at::Tensor layer_average_targets(const std::vector<at::Tensor>& layers_in, const std::string& layer_norm,
                                 const std::string& final_norm, const c10::optional<at::Tensor>& padding_mask,
                                 double eps) {
  TORCH_CHECK(!layers_in.empty(), "layer_average_targets(cpu): no layers");
  const bool stacked = layers_in.size() == 1 && layers_in[0].dim() == 4;
  std::vector<at::Tensor> layers;  // keeps any contiguous copies alive
  if (stacked) {
    layers.push_back(rows_contiguous(layers_in[0]));
  } else {
    for (const auto& t : layers_in) layers.push_back(rows_contiguous(t));
  }
  const at::Tensor& first = layers[0];
  const int64_t K = stacked ? first.size(0) : static_cast<int64_t>(layers.size());
  const int64_t B = first.size(-3), T = first.size(-2), C = first.size(-1);
  for (const auto& t : layers) {
    TORCH_CHECK(t.device().is_cpu(), "layer_average_targets(cpu): CPU tensors only");
    TORCH_CHECK(t.dim() == (stacked ? 4 : 3) && t.size(-3) == B && t.size(-2) == T && t.size(-1) == C,
                "layer_average_targets(cpu): layer shapes differ");
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), "layer_average_targets(cpu): layer dtypes differ");
  }
  at::Tensor mask;
  if (padding_mask.has_value()) {
    mask = padding_mask->to(at::kBool).contiguous();
    TORCH_CHECK(mask.device().is_cpu() && mask.dim() == 2 && mask.size(0) == B && mask.size(1) == T,
                "layer_average_targets(cpu): padding_mask must be a [B, T] CPU tensor");
  }
  const auto acc = first.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({B, T, C}, first.options().dtype(acc).memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const auto ln = target_norm(layer_norm, "layer_norm");
  const auto fn = target_norm(final_norm, "final_norm");

  D2V2_DISPATCH_FLOATING(first.scalar_type(), "layer_average_targets", [&] {
    std::vector<const scalar_t*> ptrs(K);
    std::vector<int64_t> strides(2 * K);
    for (int64_t k = 0; k < K; ++k) {
      const at::Tensor& t = stacked ? first : layers[k];
      ptrs[k] = ptr<scalar_t>(t) + (stacked ? k * t.stride(0) : 0);
      strides[2 * k] = t.stride(-3);
      strides[2 * k + 1] = t.stride(-2);
    }
    d2v2::cpu::layer_average_targets<scalar_t>(ptrs.data(), strides.data(),
                                               mask.defined() ? mask.data_ptr<bool>() : nullptr,
                                               ptr<d2v2::target_acc_t<scalar_t>>(out), K, B, T, C, ln, fn, eps);
  });
  return out;
}

}  // namespace

void register_targets(pybind11::module_& m) {
  m.def("layer_average_targets", &layer_average_targets,
        "final_norm(mean_k layer_norm(layers[k])) in fp32 (fp64 for fp64 layers); layers = [stacked [K, B, T, C]] "
        "or K tensors [B, T, C] read in place; norms 'instance' | 'layer' | 'none'; padded steps are 0",
        pybind11::arg("layers"), pybind11::arg("layer_norm"), pybind11::arg("final_norm"),
        pybind11::arg("padding_mask"), pybind11::arg("eps"));
}
