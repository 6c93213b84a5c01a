#include <torch/extension.h>
void register_targets(pybind11::module_& m) {}
