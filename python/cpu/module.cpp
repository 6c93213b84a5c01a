// d2v2_kernels._C: the CPU extension. Each op's binding file adds its functions here.
#include <torch/extension.h>

void register_gather(pybind11::module_& m);
void register_decoder_input(pybind11::module_& m);
void register_ema(pybind11::module_& m);
void register_targets(pybind11::module_& m);
void register_loss(pybind11::module_& m);
void register_conv_decoder(pybind11::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "d2v2-kernels fused CPU kernels (C++17, OpenMP)";
  register_gather(m);
  register_decoder_input(m);
  register_ema(m);
  register_targets(m);
  register_loss(m);
  register_conv_decoder(m);
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
