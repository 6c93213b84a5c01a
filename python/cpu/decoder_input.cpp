#include <torch/extension.h>
void register_decoder_input(pybind11::module_& m) {}
