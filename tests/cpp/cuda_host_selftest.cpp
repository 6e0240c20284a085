// Checks of the host execution layer itself (tests/cpp/cuda_host/cuda_host.h): correct kernels
// give the right results, and each rule the layer enforces is reported. Compiled with
// -include cuda_host.h and run by tests/test_cuda.py::test_host_layer_selftest.
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

static int failures = 0;

static void expect(bool ok, const char* what) {
  if (!ok) {
    ++failures;
    std::printf("FAILED: %s\n", what);
  }
}

// Runs ``launch`` and expects a cuda_host::Error whose message contains ``needle``.
static void expect_error(const char* needle, const std::function<void()>& launch) {
  try {
    launch();
    expect(false, (std::string("no error, expected: ") + needle).c_str());
  } catch (const cuda_host::Error& e) {
    const bool ok = std::string(e.what()).find(needle) != std::string::npos;
    if (!ok) std::printf("message: %s\n", e.what());
    expect(ok, needle);
  }
}

// A block sum through shared memory, barriers and warp shuffles.
__global__ void block_sum(const float* in, float* out) {
  DAAD_SHARED_ARRAY(float, partial, 8);
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  float v = in[blockIdx.x * 256 + t];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (t == 0) {
    float s = 0;
    for (int w = 0; w < 8; ++w) s += partial[w];
    out[blockIdx.x] = s;
  }
}

// Every block keeps its own shared memory although several are resident at once: each block
// stores its index, and reads it back after a barrier at which other blocks run.
__global__ void block_owns_shared(int* out) {
  DAAD_SHARED_ARRAY(int, id, 1);
  if (threadIdx.x == 0) id[0] = int(blockIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = id[0];
}

__global__ void shared_overflow(float* out) {
  DAAD_SHARED_ARRAY(float, tile, 32);
  tile[threadIdx.x] = 1.f;  // 33 threads
  out[threadIdx.x] = 0.f;
}

__global__ void too_much_shared(float* out) {
  DAAD_SHARED_ARRAY(float, big, 13 * 1024);  // 52 KB
  big[threadIdx.x] = 1.f;
  out[threadIdx.x] = big[threadIdx.x];
}

__global__ void atomic_count(float* total) { atomicAdd(total, 1.f); }

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void exit_before_barrier(int* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void exit_before_shuffle(float* out) {
  if (threadIdx.x % 32 == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

__global__ void read_outside_mask(float* out) {
  if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.f, 16);
}

// A 16x16x16 half product on one warp (A row-major, B col-major), with a configurable ldm and
// per-lane pointer offset to break the rules.
__global__ void wmma_product(const __half* a, const __half* b, float* c, unsigned ldm,
                             int lane_offset) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.f);
  wmma::load_matrix_sync(fa, a + (threadIdx.x == 7 ? lane_offset : 0), ldm);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}

int main() {
  {  // barriers, shared memory and shuffles
    std::vector<float> in(3 * 256), out(3);
    for (size_t i = 0; i < in.size(); ++i) in[i] = float(i % 7);
    cuda_host::launch(block_sum, dim3(3), dim3(256), in.data(), out.data());
    for (int b = 0; b < 3; ++b) {
      float want = 0;
      for (int t = 0; t < 256; ++t) want += in[b * 256 + t];
      expect(out[b] == want, "block sum");
    }
  }
  {  // shared memory per block, atomics across blocks
    std::vector<int> ids(16 * 64);
    cuda_host::launch(block_owns_shared, dim3(16), dim3(64), ids.data());
    bool ok = true;
    for (size_t i = 0; i < ids.size(); ++i) ok &= ids[i] == int(i / 64);
    expect(ok, "each block reads its own shared memory");
    float total = 0.f;
    cuda_host::launch(atomic_count, dim3(9), dim3(96), &total);
    expect(total == 9 * 96, "atomicAdd across blocks");
  }
  std::vector<int> ints(256);
  std::vector<float> floats(256);
  expect_error("'tile' (128 bytes) was written past its end", [&] {
    cuda_host::launch(shared_overflow, dim3(1), dim3(33), floats.data());
  });
  expect_error("more than the 48 KB", [&] {
    cuda_host::launch(too_much_shared, dim3(1), dim3(32), floats.data());
  });
  expect_error("barrier divergence", [&] {
    cuda_host::launch(divergent_barrier, dim3(1), dim3(256), ints.data());
  });
  expect_error("deadlock", [&] {
    cuda_host::launch(exit_before_barrier, dim3(1), dim3(256), ints.data());
  });
  expect_error("not every lane of its mask", [&] {
    cuda_host::launch(exit_before_shuffle, dim3(1), dim3(64), floats.data());
  });
  expect_error("not in mask", [&] {
    cuda_host::launch(read_outside_mask, dim3(1), dim3(32), floats.data());
  });
  {  // wmma: the product, then each rule
    alignas(32) __half a[16 * 24], b[16 * 16];
    alignas(32) float c[16 * 16];
    for (int i = 0; i < 16 * 24; ++i) a[i] = __float2half_rn(float(i % 5) - 2);
    for (int i = 0; i < 16 * 16; ++i) b[i] = __float2half_rn(float(i % 3) - 1);
    cuda_host::launch(wmma_product, dim3(1), dim3(32), +a, +b, +c, 24u, 0);
    bool ok = true;
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 16; ++n) {
        float want = 0;
        for (int k = 0; k < 16; ++k)
          want += __half2float(a[m * 24 + k]) * __half2float(b[n * 16 + k]);
        ok &= c[m * 16 + n] == want;
      }
    expect(ok, "wmma product");
    expect_error("not a multiple of 16 bytes", [&] {
      cuda_host::launch(wmma_product, dim3(1), dim3(32), +a, +b, +c, 20u, 0);
    });
    expect_error("256-bit aligned", [&] {
      cuda_host::launch(wmma_product, dim3(1), dim3(32), a + 8, +b, +c, 24u, 0);
    });
    expect_error("same pointer, ldm and layout", [&] {
      cuda_host::launch(wmma_product, dim3(1), dim3(32), +a, +b, +c, 24u, 16);
    });
  }
  {  // cvt.rna.tf32.f32: 10 mantissa bits, ties away from zero
    const float tie = 1.f + std::ldexp(1.f, -11), below = std::nextafter(tie, 0.f);
    expect(nvcuda::wmma::__float_to_tf32(tie) == 1.f + std::ldexp(1.f, -10), "tf32 tie up");
    expect(nvcuda::wmma::__float_to_tf32(-tie) == -(1.f + std::ldexp(1.f, -10)), "tf32 tie down");
    expect(nvcuda::wmma::__float_to_tf32(below) == 1.f, "tf32 below the tie");
    expect(std::isnan(nvcuda::wmma::__float_to_tf32(NAN)), "tf32 NaN");
  }
  std::printf("%d failures\n", failures);
  return failures != 0;
}
