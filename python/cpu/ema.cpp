#include <torch/extension.h>
void register_ema(pybind11::module_& m) {}
