// The CUDA op, csrc/cuda/block_memory_cuda.cu, compiled as host C++ with the host execution layer
// (cuda_host.h, force-included) and registered for CPU tensors under the daad_ext_emu namespace
// (-Ddaad_ext=daad_ext_emu; csrc/ops.cpp, compiled alongside, defines the same schemas there).
// Built by tests/cuda_host_build.py for the tests only.
#include "../../../csrc/cuda/block_memory_cuda.cu"
