// d2v2_kernels._C_cuda: the CUDA extension. Imports on machines without a GPU; its functions need
// CUDA tensors. Each op's binding file adds its functions here.
#include <torch/extension.h>

#define D2V2_STRINGIFY_(x) #x
#define D2V2_STRINGIFY(x) D2V2_STRINGIFY_(x)

void register_gather_cuda(pybind11::module_& m);
void register_decoder_input_cuda(pybind11::module_& m);
void register_ema_cuda(pybind11::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "d2v2-kernels fused CUDA kernels";
  register_gather_cuda(m);
  register_decoder_input_cuda(m);
  register_ema_cuda(m);
  m.attr("cuda_archs") = D2V2_STRINGIFY(D2V2_CUDA_ARCHS);  // e.g. "80_90a"
}
