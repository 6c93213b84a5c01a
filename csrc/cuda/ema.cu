// ema_update_ on CUDA, apex multi-tensor-apply style: the host packs up to kMaxTensors pointer pairs and
// kMaxBlocks (tensor, chunk) entries into a table passed by value as the kernel argument (no device
// allocation, no copy, CUDA-graph capturable) and launches once per full table. Each block updates one
// chunk of kChunk elements; the per-element math is ema.h's, the one the CPU tests run.
#include <cuda_runtime.h>

#include <cstdint>

#include "d2v2/cuda_kernels.h"
#include "launch.cuh"

namespace d2v2 {
namespace cuda {

namespace {

// apex's depth-2 table holds 110 tensors with 32-bit sizes; 64-bit sizes leave room for 96 in 4 KiB.
constexpr int kMaxTensors = 96;
constexpr int kMaxBlocks = 320;
constexpr int kThreads = 512;
constexpr int64_t kChunk = 65536;  // elements per block: 32 vector steps per thread
constexpr int kVec = 4;            // elements per vector load: 16 bytes of an fp32 teacher

template <typename Teacher, typename Student>
struct EmaTable {
  Teacher* teacher[kMaxTensors];
  const Student* student[kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t block_chunk[kMaxBlocks];
  uint8_t block_tensor[kMaxBlocks];
};
// Kernel parameters are limited to 4 KiB in all: the table plus a pointer and two doubles.
static_assert(sizeof(EmaTable<double, double>) + 3 * 8 <= 4096, "EmaTable exceeds the kernel parameter space");
static_assert(kMaxTensors <= 256, "block_tensor is a uint8_t");

template <typename T>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ bool vec_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Vec<T>) == 0;
}

template <typename Teacher, typename Student>
__global__ void __launch_bounds__(kThreads)
    ema_update_kernel(EmaTable<Teacher, Student> table, const ema_acc_t<Teacher>* decay_on_device,
                      ema_acc_t<Teacher> decay, ema_acc_t<Teacher> one_minus_decay) {
  using Acc = ema_acc_t<Teacher>;
  const int i = table.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t n = min(kChunk, table.numel[i] - start);
  Teacher* __restrict__ t = table.teacher[i] + start;
  const Student* __restrict__ s = table.student[i] + start;
  Acc d = decay;
  Acc omd = one_minus_decay;
  if (decay_on_device != nullptr) {
    d = *decay_on_device;
    omd = Acc(1) - d;
  }
  int64_t scalar_from = 0;
  // Chunks start at multiples of kChunk, so an aligned tensor has aligned chunks; views with odd
  // storage offsets take the scalar loop.
  if (vec_aligned(t) && vec_aligned(s)) {
    auto* tv = reinterpret_cast<Vec<Teacher>*>(t);
    const auto* sv = reinterpret_cast<const Vec<Student>*>(s);
    const int64_t nv = n / kVec;
    for (int64_t j = threadIdx.x; j < nv; j += kThreads) {
      Vec<Teacher> a = tv[j];
      const Vec<Student> b = sv[j];
#pragma unroll
      for (int k = 0; k < kVec; ++k) a.v[k] = ema_lerp(a.v[k], b.v[k], d, omd);
      tv[j] = a;
    }
    scalar_from = nv * kVec;
  }
  for (int64_t j = scalar_from + threadIdx.x; j < n; j += kThreads) t[j] = ema_lerp(t[j], s[j], d, omd);
}

}  // namespace

template <typename Teacher, typename Student>
void ema_update(Teacher* const* teacher, const Student* const* student, const int64_t* numel, int64_t count,
                const ema_acc_t<Teacher>* decay_on_device, double decay, void* stream) {
  using Acc = ema_acc_t<Teacher>;
  const Acc d = static_cast<Acc>(decay);
  const Acc omd = static_cast<Acc>(1.0 - decay);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  EmaTable<Teacher, Student> table{};
  int tensors = 0;
  int blocks = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (numel[i] == 0) continue;
    table.teacher[tensors] = teacher[i];
    table.student[tensors] = student[i];
    table.numel[tensors] = numel[i];
    ++tensors;
    const int64_t num_chunks = (numel[i] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < num_chunks; ++c) {
      table.block_tensor[blocks] = static_cast<uint8_t>(tensors - 1);
      table.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c == num_chunks - 1;
      if (blocks == kMaxBlocks || (last_chunk && tensors == kMaxTensors)) {
        ema_update_kernel<Teacher, Student><<<blocks, kThreads, 0, cuda_stream>>>(table, decay_on_device, d, omd);
        check_launch("ema_update_");
        blocks = 0;
        if (last_chunk) {
          tensors = 0;
        } else {  // the tensor in progress carries over as the first entry of the next table
          table.teacher[0] = table.teacher[tensors - 1];
          table.student[0] = table.student[tensors - 1];
          table.numel[0] = table.numel[tensors - 1];
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) {
    ema_update_kernel<Teacher, Student><<<blocks, kThreads, 0, cuda_stream>>>(table, decay_on_device, d, omd);
    check_launch("ema_update_");
  }
}

#define D2V2_INSTANTIATE(TT, TS)                                                                          \
  template void ema_update<TT, TS>(TT* const*, const TS* const*, const int64_t*, int64_t, const ema_acc_t<TT>*, \
                                   double, void*);
#define D2V2_INSTANTIATE_STUDENTS(TT) \
  D2V2_INSTANTIATE(TT, float)         \
  D2V2_INSTANTIATE(TT, double)        \
  D2V2_INSTANTIATE(TT, bf16)          \
  D2V2_INSTANTIATE(TT, f16)
D2V2_INSTANTIATE_STUDENTS(float)
D2V2_INSTANTIATE_STUDENTS(double)
D2V2_INSTANTIATE_STUDENTS(bf16)
D2V2_INSTANTIATE_STUDENTS(f16)
#undef D2V2_INSTANTIATE_STUDENTS
#undef D2V2_INSTANTIATE

}  // namespace cuda
}  // namespace d2v2
