// What the host execution layer's sanitizer builds report (tests/test_cuda.py runs each case):
//   race      the blocks of a grid add into the same counters with a plain +=: ThreadSanitizer
//             reports a data race between two blocks, which are resident at the same time;
//   atomic    the same with atomicAdd: no report, and the right sums;
//   overflow  a thread writes one element past its block's shared array: AddressSanitizer reports
//             that write, at its line.
// Compiled with -include cuda_host.h and -fsanitize=thread or =address; argv[1] names the case.
#include <cstdio>
#include <cstring>

__global__ void count_plain(float* total) { total[threadIdx.x] += 1.f; }

__global__ void count_atomic(float* total) { atomicAdd(&total[threadIdx.x], 1.f); }

__global__ void overflow_shared(float* out) {
  DAAD_SHARED_ARRAY(float, tile, 32);
  tile[threadIdx.x] = float(threadIdx.x);  // 33 threads: thread 32 writes past the end
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x % 32];
}

int main(int argc, char** argv) {
  const char* which = argc > 1 ? argv[1] : "";
  if (std::strcmp(which, "race") == 0 || std::strcmp(which, "atomic") == 0) {
    float total[32] = {};
    cuda_host::launch(std::strcmp(which, "race") == 0 ? count_plain : count_atomic, dim3(8),
                      dim3(32), +total);
    for (float t : total)
      if (t != 8.f) {
        std::printf("wrong sum %g\n", t);
        return 1;
      }
  } else if (std::strcmp(which, "overflow") == 0) {
    float out[33];
    cuda_host::launch(overflow_shared, dim3(1), dim3(33), +out);
  } else {
    std::fprintf(stderr, "usage: %s race|atomic|overflow\n", argv[0]);
    return 2;
  }
  std::printf("done\n");
  return 0;
}
