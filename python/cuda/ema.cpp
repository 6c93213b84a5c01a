#include <torch/extension.h>
void register_ema_cuda(pybind11::module_& m) {}
