#include <torch/extension.h>
void register_loss(pybind11::module_& m) {}
