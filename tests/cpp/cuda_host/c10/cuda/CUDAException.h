// Test build of the CUDA op (tests/cpp/cuda_host/cuda_host.h): c10's CUDA error checks without a
// CUDA runtime. The host layer reports kernel errors by exception, so a launch needs no check.
#pragma once

#include <c10/util/Exception.h>

#define C10_CUDA_CHECK(EXPR)                                                          \
  do {                                                                                \
    const cudaError_t daad_cuda_host_error = (EXPR);                                  \
    TORCH_CHECK(daad_cuda_host_error == cudaSuccess, "CUDA error ",                   \
                static_cast<int>(daad_cuda_host_error), " from ", #EXPR);             \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
