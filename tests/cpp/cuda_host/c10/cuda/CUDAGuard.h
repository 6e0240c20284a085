// Test build of the CUDA op (tests/cpp/cuda_host/cuda_host.h): there is one "device", the CPU.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
