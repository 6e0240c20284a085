// Test build of the CUDA op (tests/cpp/cuda_host/cuda_host.h): launches run synchronously on the
// calling thread, so there is one (null) stream.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace c10::cuda
