// Every kernel launch of the CUDA op goes through ``launch``, and the op registers itself for
// ``DAAD_CUDA_DISPATCH_KEY``: the two places where the test build differs from the real one.
//
// The real build (nvcc) launches on the current stream and checks the launch. The test build
// compiles the same sources with the host C++ compiler and force-includes the host execution layer
// (tests/cpp/cuda_host/cuda_host.h, which defines DAAD_CUDA_HOST_EMULATION): ``launch`` then runs
// every block of the grid on the CPU, and the op is registered for CPU tensors (see
// csrc/cuda/README.md).
#pragma once

#include <c10/core/DeviceType.h>
#include <c10/cuda/CUDAException.h>

#include <type_traits>

#if defined(DAAD_CUDA_HOST_EMULATION)
#define DAAD_CUDA_DISPATCH_KEY CPU
#else
#define DAAD_CUDA_DISPATCH_KEY CUDA
#endif

namespace daad_ext {
namespace cuda {

// The device type of the tensors the op accepts.
constexpr c10::DeviceType kDeviceType = c10::DeviceType::DAAD_CUDA_DISPATCH_KEY;

// kernel<<<grid, block, 0, stream>>>(args...), then the launch check. The arguments convert to the
// kernel's parameter types here (``type_identity`` keeps them out of template deduction).
template <typename... Params>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
            std::type_identity_t<Params>... args) {
#if defined(DAAD_CUDA_HOST_EMULATION)
  cuda_host::launch(kernel, grid, block, args...);
#else
  kernel<<<grid, block, 0, stream>>>(args...);
#endif
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace daad_ext
