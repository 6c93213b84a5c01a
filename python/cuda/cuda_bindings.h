// CUDA-side binding helpers: the current stream and device guard without the cuBLAS/cuSPARSE headers.
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../bindings.h"

namespace d2v2 {
namespace binding {

inline void* current_stream() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

}  // namespace binding
}  // namespace d2v2
