// Device building blocks of the CUDA kernels of the block-wise memory operator:
//   * element conversions between the storage types (float, __half, __nv_bfloat16) and float;
//   * ``Blocks``: the address arithmetic that views an NCHW tensor (any strides) as the (B*Q, D)
//     query matrix of the specification, so no permuted copy of x, y or their gradients is made;
//     ``BlockTable``: the same offsets tabulated once per call (R + D entries) for the hot loops;
//   * operand loaders (``BlockLoad``, ``RowMajor``, ``Transposed``) that read one element (m, k) of
//     an operand as float, 0 outside the operand;
//   * ``TileGemm``: one CTA's BM x BN tile of an (M x K) @ (K x N) product over a K range, on
//     tensor cores (WMMA: TF32 for float, fp16, bf16; fp32 accumulation) or on CUDA cores in plain
//     fp32 (the fallback for float when TF32 is not allowed, and for GPUs below sm_80);
//   * ``WarpTeam``: a warp as the "team" of the row epilogue of csrc/block_memory.h.
//
// Every kernel is written for clarity first: single-buffered shared-memory tiles, scalar loads,
// bounds checks on every element. All reductions are in a fixed order (no atomics), so every
// result, the gradient of the memory included, is bitwise reproducible run to run.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

#include "../block_memory.h"

namespace daad_ext {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Tile shape of every product: a CTA of 8 warps computes a BM x BN tile, stepping K by BK.
// The 8 warps form a 2 x 4 grid, each owning a 32 x 32 sub-tile (2 x 2 WMMA fragments of 16 x 16).
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int BM = 64;
constexpr int BN = 128;
constexpr int BK = 32;
// Shared tiles are padded by 8 elements per row: it keeps every WMMA pointer 32-byte aligned and
// every leading dimension a multiple of 8 elements (16 bytes) as WMMA requires, and it staggers
// banks.
constexpr int kLdAB = BK + 8;  // leading dimension of the A (BM x BK) and B (BN x BK) tiles
constexpr int kLdC = BN + 4;   // leading dimension of the float accumulator tile (BM x BN)

// A block's shared array, 128-byte aligned. The host execution layer defines it as an array in
// the block's own shared memory between guard regions (tests/cpp/cuda_host/cuda_host.h), which a
// function-static array cannot have.
#if !defined(DAAD_SHARED_ARRAY)
#define DAAD_SHARED_ARRAY(T, name, count) __shared__ __align__(128) T name[count]
#endif

// ---------------------------------------------------------------------------------------------
// Conversions (torch builds CUDA code with the implicit half conversions disabled).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename E>
__device__ __forceinline__ E from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------------------------------------
// A (B, C, H, W) tensor with element strides (sb, sc, sh, sw), seen as the (B*Q) x D matrix of
// queries: row r = b*Q + k with k = (ic*rh + ih)*rw + iw, column d = (c*bh + y)*bw + x, element
// x[b, ic*bc + c, ih*bh + y, iw*bw + x] (the specification's division). Index math is 32-bit
// (the host checks B*Q, D < 2^31); offsets are 64-bit.
struct Blocks {
  int64_t sb, sc, sh, sw;
  int rows, dim;      // B*Q, D
  int q, rh, rw;      // queries per image and two of the rates (rc = q / (rh*rw))
  int bc, bh, bw;     // block size

  __host__ __device__ __forceinline__ int64_t row_base(int r) const {
    const int b = r / q, k = r - b * q;
    const int iw = k % rw, t = k / rw;
    const int ih = t % rh, ic = t / rh;
    return b * sb + int64_t(ic) * bc * sc + int64_t(ih) * bh * sh + int64_t(iw) * bw * sw;
  }
  __host__ __device__ __forceinline__ int64_t col_offset(int d) const {
    const int xx = d % bw, t = d / bw;
    const int yy = t % bh, c = t / bh;
    return c * sc + yy * sh + xx * sw;
  }
  __host__ __device__ __forceinline__ int64_t offset(int r, int d) const {
    return row_base(r) + col_offset(d);
  }
};

// ---------------------------------------------------------------------------------------------
// Operand loaders: ``operator()(m, k)`` is element (m, k) of the operand as float, 0 outside it.
// ``kKContig`` says whether consecutive k are (nearly) contiguous in memory; the tile loader then
// lets consecutive threads walk k, otherwise m, so global loads coalesce either way.

// The offsets of ``Blocks`` tabulated once per call (block_table_kernel): element (r, d) of the
// block matrix is at row[r] + col[d], two cached loads instead of ten integer divisions per
// element in the products' inner loops.
struct BlockTable {
  const int64_t* row;  // R entries: Blocks::row_base
  const int64_t* col;  // D entries: Blocks::col_offset
  int rows, dim;
  __device__ __forceinline__ int64_t offset(int r, int d) const { return row[r] + col[d]; }
};

__global__ void __launch_bounds__(kThreads)
    block_table_kernel(Blocks blocks, int64_t* __restrict__ table) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i < blocks.rows)
    table[i] = blocks.row_base(static_cast<int>(i));
  else if (i < int64_t(blocks.rows) + blocks.dim)
    table[i] = blocks.col_offset(static_cast<int>(i - blocks.rows));
}

// Queries (or their gradients) read straight from an NCHW tensor.
template <typename E>
struct BlockLoad {
  static constexpr bool kKContig = true;
  const E* ptr;
  BlockTable g;
  __device__ __forceinline__ float operator()(int m, int k) const {
    return (m < g.rows && k < g.dim) ? to_float(ptr[g.offset(m, k)]) : 0.f;
  }
};

// A row-major (rows x cols) matrix with leading dimension ld.
template <typename E>
struct RowMajor {
  static constexpr bool kKContig = true;
  const E* ptr;
  int rows, cols;
  int64_t ld;
  __device__ __forceinline__ float operator()(int m, int k) const {
    return (m < rows && k < cols) ? to_float(ptr[int64_t(m) * ld + k]) : 0.f;
  }
};

// The transpose of another operand.
template <class L>
struct Transposed {
  static constexpr bool kKContig = !L::kKContig;
  L inner;
  __device__ __forceinline__ float operator()(int m, int k) const { return inner(k, m); }
};

// ---------------------------------------------------------------------------------------------
// Shared memory of one TileGemm: the A tile (BM x BK, row-major), the B tile (BN x BK, i.e. B
// column-major) in the compute type E, and, reusing the same bytes after the K loop, the float
// accumulator tile C (BM x BN, row-major) that the kernels' epilogues read.
template <typename E>
constexpr int tile_smem_bytes() {
  constexpr int ab = int(sizeof(E)) * (BM + BN) * kLdAB;
  constexpr int c = int(sizeof(float)) * BM * kLdC;
  return ab > c ? ab : c;
}

// One CTA's accumulator of a BM x BN tile. ``E`` is the storage type of the operands in shared
// memory (the input dtype). ``kTensorCores``: WMMA (TF32 when E is float) or plain fp32 FMAs.
// Usage: ``acc.zero(); acc.accumulate(smem, A, B, m0, n0, k0, k1); [more accumulate calls];
// acc.store(smem);`` then read ``c_tile(smem)``; ``__syncthreads()`` before reusing smem.
template <typename E, bool kTensorCores>
struct TileGemm;

template <typename E>
__device__ __forceinline__ E* a_tile(unsigned char* smem) { return reinterpret_cast<E*>(smem); }
template <typename E>
__device__ __forceinline__ E* b_tile(unsigned char* smem) {
  return reinterpret_cast<E*>(smem) + BM * kLdAB;
}
__device__ __forceinline__ float* c_tile(unsigned char* smem) {
  return reinterpret_cast<float*>(smem);
}

// Calls f(r, c, value) for every element (r, c) of the CTA's stored tile at (m0, n0) (after
// ``acc.store(smem)``) with r < rows and c < cols: the epilogue of every product kernel.
template <class F>
__device__ __forceinline__ void for_tile_elements(unsigned char* smem, int m0, int n0, int rows,
                                                  int cols, F&& f) {
  const float* cs = c_tile(smem);
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int r = m0 + e / BN, c = n0 + e % BN;
    if (r < rows && c < cols) f(r, c, cs[(e / BN) * kLdC + e % BN]);
  }
}

// One thread's share of an operand tile (ROWS x BK) held in registers between the global loads
// and the shared-memory stores. Element j is (row(j), k(j)) of the tile, walked along k where the
// operand is contiguous in k (``L::kKContig``, coalesced loads), else along the rows.
template <typename E, int ROWS, class L>
struct OperandTile {
  static constexpr int kPerThread = ROWS * BK / kThreads;
  static_assert(kPerThread * kThreads == ROWS * BK, "the tile must split evenly over the threads");
  float values[kPerThread];

  __device__ __forceinline__ static int row(int j) {
    const int e = threadIdx.x + j * kThreads;
    return L::kKContig ? e / BK : e % ROWS;
  }
  __device__ __forceinline__ static int k(int j) {
    const int e = threadIdx.x + j * kThreads;
    return L::kKContig ? e % BK : e / ROWS;
  }
  // Rows r0.., columns k0.. of the operand, 0 from k_end on.
  __device__ __forceinline__ void load(const L& operand, int r0, int k0, int k_end) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j)
      values[j] = (k0 + k(j) < k_end) ? operand(r0 + row(j), k0 + k(j)) : 0.f;
  }
  __device__ __forceinline__ void store(E* tile) const {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) tile[row(j) * kLdAB + k(j)] = from_float<E>(values[j]);
  }
};

// Loads the A (BM x BK) and B (BN x BK) tiles at (m0, k0) and (n0, k0), k limited to k_end.
// Values are first gathered into registers (all loads in flight together), then stored.
template <typename E, class LA, class LB>
__device__ __forceinline__ void load_tiles(unsigned char* smem, const LA& la, const LB& lb, int m0,
                                           int n0, int k0, int k_end) {
  OperandTile<E, BM, LA> a;
  OperandTile<E, BN, LB> b;
  a.load(la, m0, k0, k_end);
  b.load(lb, n0, k0, k_end);
  a.store(a_tile<E>(smem));
  b.store(b_tile<E>(smem));
}

// CUDA-core fp32 path: thread t owns rows 4*(t/16) + {0..3} and columns t%16 + 16*{0..7}.
template <typename E>
struct TileGemm<E, false> {
  float acc[4][8];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
  }

  template <class LA, class LB>
  __device__ void accumulate(unsigned char* smem, const LA& la, const LB& lb, int m0, int n0,
                             int k_begin, int k_end) {
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
    const E* as = a_tile<E>(smem);
    const E* bs = b_tile<E>(smem);
    for (int k0 = k_begin; k0 < k_end; k0 += BK) {
      __syncthreads();  // every thread is done with the previous tiles
      load_tiles<E>(smem, la, lb, m0, n0, k0, k_end);
      __syncthreads();
#pragma unroll 4
      for (int k = 0; k < BK; ++k) {
        float a[4], b[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = to_float(as[(tr * 4 + i) * kLdAB + k]);
#pragma unroll
        for (int j = 0; j < 8; ++j) b[j] = to_float(bs[(tc + 16 * j) * kLdAB + k]);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
  }

  __device__ __forceinline__ void store(unsigned char* smem) {
    __syncthreads();  // the A/B tiles share these bytes
    float* cs = c_tile(smem);
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) cs[(tr * 4 + i) * kLdC + tc + 16 * j] = acc[i][j];
    __syncthreads();
  }
};

// Tensor-core path (sm_80+): WMMA 16x16x8 TF32 for float, 16x16x16 for fp16 / bf16, accumulating
// in fp32. Warp w owns rows 32*(w/4) + {0, 16} and columns 32*(w%4) + {0, 16} of the tile.
// When device code is compiled for an architecture below sm_80 (where mma.h has no TF32/bf16
// fragments), TileGemm<E, true> is the CUDA-core path instead, so any TORCH_CUDA_ARCH_LIST builds
// and runs. (Only device code uses TileGemm, so the two passes may see different layouts.)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
template <typename E>
struct TileGemm<E, true> : TileGemm<E, false> {};
#else
template <typename E>
struct WmmaShape {
  static constexpr int kK = 16;
  using Precision = E;
};
template <>
struct WmmaShape<float> {
  static constexpr int kK = 8;
  using Precision = nvcuda::wmma::precision::tf32;
};

template <typename E>
struct TileGemm<E, true> {
  using Shape = WmmaShape<E>;
  static constexpr int kK = Shape::kK;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kK, float> acc[2][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
  }

  // Loads an A or B fragment from its tile in shared memory, rounded to TF32 for float.
  template <class Fragment>
  static __device__ __forceinline__ void load_fragment(Fragment& f, const E* tile) {
    nvcuda::wmma::load_matrix_sync(f, tile, kLdAB);
    if constexpr (sizeof(E) == 4) {
#pragma unroll
      for (int t = 0; t < f.num_elements; ++t) f.x[t] = nvcuda::wmma::__float_to_tf32(f.x[t]);
    }
  }

  template <class LA, class LB>
  __device__ void accumulate(unsigned char* smem, const LA& la, const LB& lb, int m0, int n0,
                             int k_begin, int k_end) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int wm = warp / 4, wn = warp % 4;
    const E* as = a_tile<E>(smem);
    const E* bs = b_tile<E>(smem);
    for (int k0 = k_begin; k0 < k_end; k0 += BK) {
      __syncthreads();
      load_tiles<E>(smem, la, lb, m0, n0, k0, k_end);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; kk += kK) {
        wmma::fragment<wmma::matrix_a, 16, 16, kK, typename Shape::Precision, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, kK, typename Shape::Precision, wmma::col_major> b[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) load_fragment(a[i], as + (wm * 32 + i * 16) * kLdAB + kk);
#pragma unroll
        for (int j = 0; j < 2; ++j) load_fragment(b[j], bs + (wn * 32 + j * 16) * kLdAB + kk);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
  }

  __device__ __forceinline__ void store(unsigned char* smem) {
    __syncthreads();
    const int warp = threadIdx.x / 32;
    const int wm = warp / 4, wn = warp % 4;
    float* cs = c_tile(smem);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(cs + (wm * 32 + i * 16) * kLdC + wn * 32 + j * 16,
                                        acc[i][j], kLdC, nvcuda::wmma::mem_row_major);
    __syncthreads();
  }
};
#endif  // __CUDA_ARCH__ < 800

// ---------------------------------------------------------------------------------------------
// A warp as the team of the row epilogue (csrc/block_memory.h): lane l handles items l, l+32, ...
// The xor butterfly leaves the bitwise same result in every lane (addition is commutative).
// Device code only: row_forward_team / row_backward_team are __host__ __device__ templates that
// the device pass instantiates with it (nv_exec_check_disable).
struct WarpTeam {
  int lane;

  // The sum and the maximum of one value per lane, returned to every lane.
  template <typename T>
  __device__ __forceinline__ static T reduce_sum(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
  }
  template <typename T>
  __device__ __forceinline__ static T reduce_max(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const T u = __shfl_xor_sync(0xffffffffu, v, o);
      v = u > v ? u : v;
    }
    return v;
  }

  // The team loops of csrc/block_memory.h: lane l takes the items l, l + 32, ...
  template <typename F>
  __device__ __forceinline__ void for_each(int n, F&& f) const {
    for (int i = lane; i < n; i += 32) f(i);
  }
  template <typename F>
  __device__ __forceinline__ auto sum(int n, F&& f) const -> decltype(f(0)) {
    decltype(f(0)) acc = 0;
    for (int i = lane; i < n; i += 32) acc += f(i);
    return reduce_sum(acc);
  }
  template <typename T, typename F>
  __device__ __forceinline__ T max(int n, T init, F&& f) const {
    T acc = init;
    for (int i = lane; i < n; i += 32) {
      const T v = f(i);
      acc = v > acc ? v : acc;
    }
    return reduce_max(acc);
  }
};

__device__ __forceinline__ float warp_sum(float v) { return WarpTeam::reduce_sum(v); }

}  // namespace cuda
}  // namespace daad_ext
