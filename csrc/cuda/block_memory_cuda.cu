// CUDA implementation of daad_ext::block_memory_forward / block_memory_backward (schemas in
// csrc/ops.cpp; the operator is specified in daad_ext/reference.py).
//
// Design (see csrc/cuda/kernels.cuh for the kernels):
// * The query blocks are never copied: every product reads x (and grad_y) by address arithmetic
//   from the NCHW tensor, whatever its strides (channels_last and other views work as they are),
//   and y and grad_x are written straight into NCHW. The only intermediates are of size R x N
//   (R = B*Q rows), like w itself, plus up to ``splits`` R x N float slices of the similarities.
// * The products run as 64 x 128 x 32 tiles on tensor cores (WMMA, fp32 accumulation): bf16 and
//   fp16 natively; float in TF32 when PyTorch allows TF32 for matmuls
//   (``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision("high")``,
//   read through at::globalContext().allowTF32CuBLAS()), otherwise in plain fp32 on CUDA cores, so
//   float results follow the same precision setting as cuBLAS. Device code compiled for an
//   architecture below sm_80 runs every product on CUDA cores (fp32 FMAs).
// * The similarity product has only R/64 x N/128 output tiles (32 at the DAAD scales), so its D
//   loop is split over ``splits`` CTAs to fill the GPU; the slices are summed in a fixed order by
//   the row kernel, which then runs the row epilogue shared with the CPU kernel
//   (csrc/block_memory.h, one warp per row).
// * grad_M: each CTA owns a tile of items x D and loops over all R rows; no atomics anywhere, so
//   every output is bitwise reproducible for a given device, shape and precision setting.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../op_checks.h"
#include "kernels.cuh"
#include "launch.cuh"

namespace daad_ext {
namespace cuda {
namespace {

using at::Tensor;

// Argument checks: csrc/op_checks.h, for float32, float16 and bfloat16 CUDA tensors, plus the
// size limits of this kernel's index arithmetic. Element offsets are 64-bit (the strides of x,
// grad_y and grad_x, the row and item offsets of the R x N buffers, of M and of grad_M), so
// C*H*W, B*C*H*W and B*Q*N may pass 2^31; row, item and column indices are 32-bit (common.cuh's
// Blocks, the tiles), and N and D index the grid's y dimension in tiles of BN, so:
//   B*Q < 2^30,  N <= 65535 * BN,  D <= 65535 * BN  (BN = 128: 8,388,480).
void check_cuda_limits(const Geometry& g) {
  constexpr int64_t kMaxRows = int64_t(1) << 30;
  constexpr int64_t kMaxTiled = int64_t(65535) * BN;
  TORCH_CHECK(g.rows() < kMaxRows && g.N <= kMaxTiled && g.D <= kMaxTiled,
              "the daad_ext CUDA kernel supports B*Q < 2^30 query blocks and N, D <= ", kMaxTiled,
              ", got B*Q=", g.rows(), ", N=", g.N, ", D=", g.D);
}

constexpr at::ScalarType kDtypes[] = {at::kFloat, at::kHalf, at::kBFloat16};
const Backend kBackend{"CUDA", kDeviceType, kDtypes, "float32, float16 and bfloat16",
                       &check_cuda_limits};

Blocks make_blocks(const Tensor& t, const Geometry& g) {
  Blocks b{};
  b.sb = t.stride(0);
  b.sc = t.stride(1);
  b.sh = t.stride(2);
  b.sw = t.stride(3);
  b.rows = static_cast<int>(g.rows());
  b.dim = static_cast<int>(g.D);
  b.q = static_cast<int>(g.Q);
  b.rh = static_cast<int>(g.rh);
  b.rw = static_cast<int>(g.rw);
  b.bc = static_cast<int>(g.bc);
  b.bh = static_cast<int>(g.bh);
  b.bw = static_cast<int>(g.bw);
  return b;
}

// Tabulates the block offsets of ``t`` (see BlockTable) into ``storage`` (R + D int64, allocated
// here; keep it alive while kernels that use the table are queued).
BlockTable block_table(const Tensor& t, const Geometry& g, Tensor& storage, cudaStream_t stream) {
  const Blocks blocks = make_blocks(t, g);
  storage = at::empty({g.rows() + g.D}, t.options().dtype(at::kLong));
  int64_t* table = static_cast<int64_t*>(storage.data_ptr());
  const int64_t n = g.rows() + g.D;
  launch(block_table_kernel, dim3(static_cast<unsigned>((n + kThreads - 1) / kThreads)), kThreads,
         stream, blocks, table);
  return BlockTable{table, table + g.rows(), static_cast<int>(g.rows()), static_cast<int>(g.D)};
}

template <typename E>
RowMajor<E> row_major(const Tensor& t, int64_t rows, int64_t cols) {
  return RowMajor<E>{static_cast<const E*>(t.const_data_ptr()), static_cast<int>(rows),
                     static_cast<int>(cols), cols};
}

template <typename E>
E* mutable_ptr(const Tensor& t) {
  return static_cast<E*>(t.data_ptr());
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int multiprocessors(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return std::max(count, 1);
}

// How the D loop of the similarity products is split: enough CTAs for about two waves, each
// slice at least 4 K-steps long and a multiple of BK. Depends only on the shape and the device.
struct Split {
  int splits;
  int chunk;
};

Split choose_split(const Geometry& g, int device) {
  const int64_t tiles = ceil_div(g.rows(), BM) * ceil_div(g.N, BN);
  const int64_t target = 2 * int64_t(multiprocessors(device));
  int64_t splits = tiles >= target ? 1 : ceil_div(target, tiles);
  splits = std::min<int64_t>({splits, std::max<int64_t>(1, g.D / (4 * BK)), 64});
  const int64_t chunk = ceil_div(ceil_div(g.D, splits), BK) * BK;
  return Split{static_cast<int>(ceil_div(g.D, chunk)), static_cast<int>(chunk)};
}

// Calls ``f(E{}, std::bool_constant<tensor_cores>{})`` with the device storage type E of
// ``dtype``. float uses TF32 tensor cores only where PyTorch allows TF32 for matmuls; fp16 and
// bf16 always use tensor cores (device code built below sm_80 runs them on CUDA cores instead).
template <class F>
void dispatch(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      if (at::globalContext().allowTF32CuBLAS())
        f(float{}, std::true_type{});
      else
        f(float{}, std::false_type{});
      return;
    case at::kHalf:
      f(__half{}, std::true_type{});
      return;
    case at::kBFloat16:
      f(__nv_bfloat16{}, std::true_type{});
      return;
    default:
      TORCH_CHECK_TYPE(false, "the CUDA kernel supports float32, float16 and bfloat16, got ",
                       dtype);
  }
}

dim3 grid2(int64_t x, int64_t y, int64_t z = 1) {
  TORCH_CHECK(x >= 1 && x <= INT_MAX && y >= 1 && y <= 65535 && z >= 1 && z <= 65535,
              "block_memory CUDA kernel: grid (", x, ", ", y, ", ", z, ") out of range");
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(z));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward_cuda(
    const Tensor& x, const Tensor& memory_in, int64_t rh, int64_t rw, int64_t rc,
    c10::string_view similarity, c10::string_view shrink, double threshold, double temperature) {
  const Geometry g = check_inputs(x, memory_in, rh, rw, rc, kBackend);
  const Options o = check_options(similarity, shrink, threshold, temperature, x.scalar_type());
  const bool cosine = o.similarity == Similarity::Cosine;
  const bool memae = o.shrink == Shrink::MemAE;
  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();

  const Tensor memory = memory_in.contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor w = at::empty({g.B, g.Q, g.N}, x.options());
  Tensor probs = memae ? at::empty({g.B, g.Q, g.N}, x.options()) : at::empty({0}, x.options());
  Tensor row_stats = at::empty({g.B, g.Q, 2}, f32);
  Tensor item_norms = at::empty({g.N}, f32);

  const int rows = static_cast<int>(g.rows()), items = static_cast<int>(g.N);
  const int dim = static_cast<int>(g.D);
  dispatch(x.scalar_type(), [&](auto e_tag, auto tc_tag) {
    using E = decltype(e_tag);
    constexpr bool kTC = decltype(tc_tag)::value;
    launch(item_norms_kernel<E>, grid2(ceil_div(items, kWarps), 1), kThreads, stream,
           static_cast<const E*>(memory.const_data_ptr()), items, dim,
           mutable_ptr<float>(item_norms));
    if (rows == 0) return;

    const Split split = choose_split(g, device);
    Tensor partial = at::empty({split.splits, g.rows(), g.N}, f32);
    Tensor qsq = at::empty({split.splits, g.rows()}, f32);
    Tensor wbuf = at::empty({g.rows(), g.N}, f32);
    Tensor x_table_storage, y_table_storage;
    const BlockLoad<E> queries{static_cast<const E*>(x.const_data_ptr()),
                               block_table(x, g, x_table_storage, stream)};
    const BlockTable y_table = y.strides() == x.strides()
                                   ? queries.g
                                   : block_table(y, g, y_table_storage, stream);
    const RowMajor<E> mem = row_major<E>(memory, g.N, g.D);

    launch(sim_kernel<E, kTC, BlockLoad<E>>,
           grid2(ceil_div(rows, BM), ceil_div(items, BN), split.splits), kThreads, stream,
           queries, mem, rows, items, dim, split.chunk, mutable_ptr<float>(partial),
           mutable_ptr<float>(qsq));

    launch(row_forward_kernel<E>, grid2(ceil_div(rows, kWarps), 1), kThreads, stream,
        mutable_ptr<float>(partial), split.splits, mutable_ptr<float>(qsq),
        mutable_ptr<float>(item_norms), rows, items, cosine, o.shrink,
        static_cast<float>(threshold), static_cast<float>(temperature), mutable_ptr<float>(wbuf),
        mutable_ptr<E>(w), memae ? mutable_ptr<E>(probs) : nullptr,
        mutable_ptr<float>(row_stats));

    launch(times_memory_kernel<E, kTC, E>, grid2(ceil_div(rows, BM), ceil_div(dim, BN)),
           kThreads, stream, row_major<E>(w, g.rows(), g.N), Transposed<RowMajor<E>>{mem}, queries,
           nullptr, y_table, mutable_ptr<E>(y), items);
  });
  return {y, w, probs, row_stats, item_norms};
}

std::tuple<Tensor, Tensor> backward_cuda(
    const std::optional<Tensor>& grad_y_opt, const std::optional<Tensor>& grad_w_opt,
    const Tensor& x, const Tensor& memory_in, const Tensor& w_in, const Tensor& probs_in,
    const Tensor& row_stats_in, const Tensor& item_norms_in, int64_t rh, int64_t rw, int64_t rc,
    c10::string_view similarity, c10::string_view shrink, double threshold, double temperature,
    bool needs_grad_x, bool needs_grad_memory) {
  const BackwardArgs args = prepare_backward(
      grad_y_opt, grad_w_opt, x, memory_in, w_in, probs_in, row_stats_in, item_norms_in, rh, rw,
      rc, similarity, shrink, threshold, temperature, needs_grad_x, needs_grad_memory, kBackend);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor grad_x, grad_m;
  std::tie(grad_x, grad_m) = backward_outputs(args, x);
  if (args.trivial()) return {grad_x, grad_m};
  const Geometry& g = args.g;
  const Options& o = args.o;
  const Tensor& grad_y = args.grad_y;
  const Tensor& grad_w = args.grad_w;
  const Tensor& memory = args.memory;
  const Tensor& w = args.w;
  const Tensor& probs = args.probs;
  const Tensor& row_stats = args.row_stats;
  const Tensor& item_norms = args.item_norms;
  const bool cosine = o.similarity == Similarity::Cosine;
  const bool memae = o.shrink == Shrink::MemAE;
  const bool has_grad_y = grad_y.defined(), has_grad_w = grad_w.defined();
  const int device = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const auto f32 = x.options().dtype(at::kFloat);

  const int rows = static_cast<int>(g.rows()), items = static_cast<int>(g.N);
  const int dim = static_cast<int>(g.D);
  dispatch(x.scalar_type(), [&](auto e_tag, auto tc_tag) {
    using E = decltype(e_tag);
    constexpr bool kTC = decltype(tc_tag)::value;
    const RowMajor<E> mem = row_major<E>(memory, g.N, g.D);
    // Offset tables of x, grad_y and grad_x (shared where the strides agree).
    Tensor x_table_storage, gy_table_storage, gx_table_storage;
    const BlockLoad<E> queries{static_cast<const E*>(x.const_data_ptr()),
                               block_table(x, g, x_table_storage, stream)};
    BlockLoad<E> grads{nullptr, queries.g};
    if (has_grad_y) {
      grads.ptr = static_cast<const E*>(grad_y.const_data_ptr());
      if (grad_y.strides() != x.strides()) grads.g = block_table(grad_y, g, gy_table_storage, stream);
    }
    BlockTable gx_table = queries.g;
    if (needs_grad_x && grad_x.strides() != x.strides()) {
      gx_table = has_grad_y && grad_y.strides() == grad_x.strides()
                     ? grads.g
                     : block_table(grad_x, g, gx_table_storage, stream);
    }

    // dL/dw from y: G @ M^T, its D loop split like the forward's similarity product.
    Split split{0, 0};
    Tensor gpart;
    if (has_grad_y) {
      split = choose_split(g, device);
      gpart = at::empty({split.splits, g.rows(), g.N}, f32);
      launch(sim_kernel<E, kTC, BlockLoad<E>>,
             grid2(ceil_div(rows, BM), ceil_div(items, BN), split.splits), kThreads, stream,
             grads, mem, rows, items, dim, split.chunk, mutable_ptr<float>(gpart), nullptr);
    } else {
      gpart = at::empty({g.rows(), g.N}, f32);
    }

    Tensor wbuf = at::empty({g.rows(), g.N}, f32);
    Tensor pbuf = memae ? at::empty({g.rows(), g.N}, f32) : Tensor();
    Tensor prod = cosine ? at::empty({g.rows(), g.N}, f32) : Tensor();
    Tensor coef_q = cosine ? at::empty({g.rows()}, f32) : Tensor();
    Tensor coef_m = cosine ? at::empty({g.N}, f32) : Tensor();
    Tensor a = at::empty({g.rows(), g.N}, f32);  // float32 whatever the dtype (kernels.cuh)
    launch(row_backward_kernel<E>, grid2(ceil_div(rows, kWarps), 1), kThreads, stream,
        mutable_ptr<float>(gpart), split.splits,
        has_grad_w ? static_cast<const E*>(grad_w.const_data_ptr()) : nullptr,
        static_cast<const E*>(w.const_data_ptr()),
        memae ? static_cast<const E*>(probs.const_data_ptr()) : nullptr,
        static_cast<const float*>(row_stats.const_data_ptr()),
        static_cast<const float*>(item_norms.const_data_ptr()), rows, items, cosine, o.shrink,
        static_cast<float>(threshold), static_cast<float>(temperature), mutable_ptr<float>(wbuf),
        memae ? mutable_ptr<float>(pbuf) : nullptr, cosine ? mutable_ptr<float>(prod) : nullptr,
        mutable_ptr<float>(a), cosine ? mutable_ptr<float>(coef_q) : nullptr);

    if (cosine && needs_grad_memory) {
      launch(coldot_kernel, grid2(ceil_div(items, kThreads), 1), kThreads, stream,
             mutable_ptr<float>(prod), rows, items,
             static_cast<const float*>(item_norms.const_data_ptr()), mutable_ptr<float>(coef_m));
    }

    const RowMajor<float> a_rm = row_major<float>(a, g.rows(), g.N);
    if (needs_grad_x) {
      launch(times_memory_kernel<float, kTC, E>, grid2(ceil_div(rows, BM), ceil_div(dim, BN)),
             kThreads, stream, a_rm, Transposed<RowMajor<E>>{mem}, queries,
             cosine ? mutable_ptr<float>(coef_q) : nullptr, gx_table, mutable_ptr<E>(grad_x), items);
    }
    if (!needs_grad_memory) return;

    launch(gm_kernel<E, kTC>, grid2(ceil_div(items, BM), ceil_div(dim, BN)), kThreads, stream,
        Transposed<RowMajor<E>>{row_major<E>(w, g.rows(), g.N)},
        Transposed<BlockLoad<E>>{grads}, has_grad_y, Transposed<RowMajor<float>>{a_rm},
        Transposed<BlockLoad<E>>{queries}, cosine ? mutable_ptr<float>(coef_m) : nullptr, mem,
        mutable_ptr<E>(grad_m));
  });
  return {grad_x, grad_m};
}

}  // namespace

TORCH_LIBRARY_IMPL(daad_ext, DAAD_CUDA_DISPATCH_KEY, m) {
  m.impl("block_memory_forward", &forward_cuda);
  m.impl("block_memory_backward", &backward_cuda);
}

}  // namespace cuda
}  // namespace daad_ext
