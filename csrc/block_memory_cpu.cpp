// CPU kernel of the block-wise memory operator: daad_ext::block_memory_forward / _backward.
//
// The operator (daad_ext/reference.py) is two matrix products around a row epilogue:
//   S = Q M^T (B*Q x N),  w = epilogue(S),  Y = w M (B*Q x D),
// where the rows of Q and Y are blocks of the NCHW tensors x and y. No full-size permuted copy of
// x, y or their gradients is ever made: the products are split over the block dimension D into
// "column chunks" of a few hundred values; a chunk is gathered from NCHW into a small buffer that
// stays in cache (the gather fuses the row norms), multiplied with the matching columns of M by
// at::mm (MKL), and, for Y and dL/dQ, scattered straight back into NCHW. The GEMMs keep a large
// row dimension, so MKL runs at full speed, and the extra memory is a few MB. Rows are processed
// in blocks of at most a few thousand, so that the per-row buffers (rows x N) stay bounded.
//
// Forward (per row block):  S  = sum_chunks Qc Mc^T                  (tasks: ranges of rows)
//                           w  = row_forward(S / norms / T)         (block_memory.h; same tasks)
//                           Yc = w Mc, scattered into y             (tasks: ranges of chunks)
// Backward (per row block): G  = sum_chunks dYc Mc^T (+ grad_w)      (tasks: ranges of rows)
//                           dS = row_backward(G), scaled to dL/d<q, m> for cosine (same tasks)
//                           dM[:, c] (+)= w^T dYc + dS^T Qc, dQc = dS Mc scattered into grad_x
//                                                                   (tasks: ranges of chunks)
// which is four products, the count of the bare products' backward. Saved from the forward: x and
// M themselves, w, probs (MemAE only), per-row (|q|, lse) and per-item |m|. grad_memory is
// written by GEMMs into disjoint column slices (no atomics, no per-thread copies to sum), so
// repeated runs give identical results.
//
// bfloat16: x, M, y, w, probs and the gradients are bfloat16, and the products run on bfloat16
// operands through at::mm as in float32 (oneDNN, with the CPU's bf16 dot-product instructions
// where it has them, accumulating in float32). Everything else runs in float32 (``acc_t``): the
// norms, the statistics (row_stats and item_norms are float32, as on CUDA), the row epilogue and
// its backward, the norm corrections. at::mm writes a bfloat16 product rounded to bfloat16, so
//   * S = Q M^T and G = dY M^T are multiplied over whole rows, not summed over column chunks
//     (one rounding of each similarity, instead of one per chunk), and the epilogue reads them
//     in float32: softmax, the 1/N threshold (p_i >= threshold compared in float32) and the
//     re-normalisation run in float32 on these similarities, and w is rounded to bfloat16 once;
//   * y = w M uses that rounded w (as the CUDA kernel does), and the backward recovers the
//     similarities from the bfloat16 w (or p) and the float32 lse;
//   * dL/d<q, m> is rounded to bfloat16 for the products dS M and dS^T Q;
//   * the backward keeps the whole rows of dY that it gathers for G for the product w^T dY
//     (a row block x D buffer) instead of gathering dY a second time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "block_memory.h"
#include "op_checks.h"

namespace daad_ext {
namespace {

using at::Tensor;

// Target size of one column-chunk buffer (rows x chunk; one or two per thread), and of the
// per-row-block N-wide buffers (rows x N). The environment variables DAAD_EXT_CPU_CHUNK_BYTES and
// DAAD_EXT_CPU_ROW_BLOCK_BYTES override them (tests use them to force several chunks and blocks).
constexpr int64_t kChunkBytes = int64_t(512) << 10;
constexpr int64_t kRowBlockBytes = int64_t(4) << 20;
// Below these sizes MKL loses efficiency; chunks are made at least this big where possible.
constexpr int64_t kMinChunk = 256;
constexpr int64_t kMinRows = 256;

int64_t env_int(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  const long long parsed = std::atoll(value);
  return parsed > 0 ? parsed : fallback;
}

// The type the kernel computes in for storage type T: float for bfloat16, T itself otherwise.
template <typename T>
using acc_t = at::opmath_type<T>;

// Whether T is narrower than the type it is computed in (bfloat16): at::mm then rounds its
// products to T, and the row epilogue runs on acc_t<T> copies of the rows.
template <typename T>
constexpr bool kNarrow = !std::is_same_v<T, acc_t<T>>;

// ---------------------------------------------------------------------------------------------
// Argument checks: csrc/op_checks.h, for float32, float64 and bfloat16 CPU tensors.
//
// Index arithmetic is 64-bit throughout (block and line offsets, row and item offsets, buffer
// sizes), so any B, C*H*W, D and B*Q*N that memory holds are addressed exactly, whatever the
// strides of x and grad_y; the one 32-bit count is the row epilogue's item count (block_memory.h
// takes ``int n``), hence N <= 2^31 - 1. (ATen's at::mm runs products whose sizes or leading
// dimensions pass 2^31 - 1 without BLAS, correctly but slower.)

void check_cpu_limits(const Geometry& g) {
  TORCH_CHECK(g.N <= std::numeric_limits<int>::max(), "the daad_ext CPU kernel supports up to ",
              std::numeric_limits<int>::max(), " memory items (N < 2^31), got N=", g.N);
}

constexpr at::ScalarType kDtypes[] = {at::kFloat, at::kDouble, at::kBFloat16};
const Backend kBackend{"CPU", c10::DeviceType::CPU, kDtypes, "float32, float64 and bfloat16",
                       &check_cpu_limits};

// AT_DISPATCH over the dtypes of kDtypes.
#define DAAD_DISPATCH_CPU(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, name, __VA_ARGS__)

// ---------------------------------------------------------------------------------------------
// Addressing blocks inside a strided (B, C, H, W) tensor.

struct Strides {
  int64_t b, c, h, w;
  explicit Strides(const Tensor& t) : b(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
};

// Offset of the first value of query ``row`` (= b*Q + k) in a tensor with strides ``s``.
inline int64_t block_offset(const Geometry& g, const Strides& s, int64_t row) {
  const int64_t b = row / g.Q, k = row % g.Q;
  const int64_t iw = k % g.rw, ih = (k / g.rw) % g.rh, ic = k / (g.rw * g.rh);
  return b * s.b + ic * g.bc * s.c + ih * g.bh * s.h + iw * g.bw * s.w;
}

// One column chunk: lines [line0, line0 + nlines) of every block, i.e. the values
// [line0 * bw, (line0 + nlines) * bw) of each query.
struct Chunk {
  int64_t line0, nlines, d0, dc;
  Chunk(const Geometry& g, int64_t line0_, int64_t nlines_)
      : line0(line0_), nlines(nlines_), d0(line0_ * g.bw), dc(nlines_ * g.bw) {}
  // Offset of each line from its block's first value in a tensor with strides ``s``.
  std::vector<int64_t> offsets(const Geometry& g, const Strides& s) const {
    std::vector<int64_t> result(nlines);
    for (int64_t j = 0; j < nlines; ++j) {
      const int64_t line = line0 + j;
      result[j] = (line / g.bh) * s.c + (line % g.bh) * s.h;
    }
    return result;
  }
};

// v in acc_t<T>. A bfloat16 is the upper half of a float's bits: widened by a shift.
template <typename T>
inline acc_t<T> widen(T v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return std::bit_cast<float>(uint32_t(v.x) << 16);
  } else {
    return v;
  }
}

// v rounded to T (to nearest even; NaN stays NaN), by the same bit operations as c10's
// conversion, with a select for NaN instead of a branch (no branch per value in the loops).
template <typename T>
inline T narrow(acc_t<T> v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t bits = std::bit_cast<uint32_t>(v);
    const uint16_t rounded = uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    return c10::BFloat16(v == v ? rounded : uint16_t(0x7FC0), c10::BFloat16::from_bits());
  } else {
    return v;
  }
}

// Sum of squares of n values, in independent lanes so that the loop vectorises.
template <typename T>
inline double sumsq(const T* __restrict src, int64_t n) {
  constexpr int kLanes = 16;
  acc_t<T> acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += widen(src[i + l]) * widen(src[i + l]);
  double total = 0;
  for (; i < n; ++i) total += double(src[i]) * double(src[i]);
  for (int l = 0; l < kLanes; ++l) total += double(acc[l]);
  return total;
}

int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item));
}

// Line copies of one block, with the line length known at compile time for the common block
// widths (BW > 0) or not (BW == 0); ``sw`` is the stride between a line's values in NCHW.
template <int BW, typename T>
inline void gather_lines(const T* __restrict block, const int64_t* offsets, int64_t nlines,
                         int64_t bw, int64_t sw, T* __restrict out) {
  const int64_t n = BW > 0 ? BW : bw;
  if (sw == 1) {  // memcpy: one or two vector moves for the fixed widths, whatever T is
    for (int64_t j = 0; j < nlines; ++j, out += n) std::memcpy(out, block + offsets[j], n * sizeof(T));
  } else {
    for (int64_t j = 0; j < nlines; ++j, out += n) {
      const T* in = block + offsets[j];
      for (int64_t i = 0; i < n; ++i) out[i] = in[i * sw];
    }
  }
}

// dst lines = in (- c * minus when ``minus`` is not null, computed in acc_t<T> and rounded once);
// dst is contiguous along W.
template <int BW, typename T>
inline void scatter_lines(T* __restrict block, const int64_t* offsets, int64_t nlines, int64_t bw,
                          const T* __restrict in, acc_t<T> c, const T* __restrict minus) {
  const int64_t n = BW > 0 ? BW : bw;
  if (minus != nullptr) {
    for (int64_t j = 0; j < nlines; ++j, in += n, minus += n) {
      T* __restrict out = block + offsets[j];
      for (int64_t i = 0; i < n; ++i) out[i] = narrow<T>(widen(in[i]) - c * widen(minus[i]));
    }
  } else {
    for (int64_t j = 0; j < nlines; ++j, in += n) std::memcpy(block + offsets[j], in, n * sizeof(T));
  }
}

// Calls f(std::integral_constant<int, BW>) with BW = bw for the common widths, else BW = 0.
template <typename F>
inline void dispatch_width(int64_t bw, F&& f) {
  switch (bw) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

// buf[r * ld, ...] = chunk of query (row0 + r) of ``src``, for r < rows; adds the squared values
// to ``sq[r]`` when ``sq`` is not null. Serial: the callers run one gather per thread.
template <typename T>
void gather_chunk(const Geometry& g, const T* src, const Strides& s, const Chunk& chunk,
                  int64_t row0, int64_t rows, T* buf, int64_t ld, double* sq) {
  const std::vector<int64_t> offsets = chunk.offsets(g, s);
  dispatch_width(g.bw, [&](auto width) {
    constexpr int BW = decltype(width)::value;
    for (int64_t r = 0; r < rows; ++r) {
      T* out = buf + r * ld;
      gather_lines<BW>(src + block_offset(g, s, row0 + r), offsets.data(), chunk.nlines, g.bw,
                       s.w, out);
      if (sq != nullptr) sq[r] += sumsq(out, chunk.dc);
    }
  });
}

// The inverse: chunk of query (row0 + r) of ``dst`` (a contiguous NCHW tensor) = buf[r, :], minus
// coef[r] * sub[r, :] when ``coef`` is not null. Serial.
template <typename T>
void scatter_chunk(const Geometry& g, T* dst, const Strides& s, const Chunk& chunk, int64_t row0,
                   int64_t rows, const T* buf, const acc_t<T>* coef, const T* sub) {
  TORCH_INTERNAL_ASSERT(s.w == 1, "scatter_chunk writes contiguous outputs only");
  const std::vector<int64_t> offsets = chunk.offsets(g, s);
  dispatch_width(g.bw, [&](auto width) {
    constexpr int BW = decltype(width)::value;
    for (int64_t r = 0; r < rows; ++r) {
      scatter_lines<BW>(dst + block_offset(g, s, row0 + r), offsets.data(), chunk.nlines, g.bw,
                        buf + r * chunk.dc, coef != nullptr ? coef[r] : acc_t<T>(0),
                        coef != nullptr ? sub + r * chunk.dc : nullptr);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Work partition. Each pass is one parallel region whose tasks are whole pieces of the work,
// each with its own single-threaded GEMMs (ATen runs BLAS on one thread inside a parallel
// region): the products with K = D (S = Q M^T, G = dY M^T) are split by rows, those with output
// columns in D (Y, dM, dQ) by column chunks. Few synchronisation points, so that a thread
// descheduled on a busy machine stalls the others rarely. No task sums partial results of
// another (each output value is computed by one task, in a fixed order), so runs are
// reproducible.

struct Plan {
  int64_t row_block;        // rows per row block
  int64_t lines_per_chunk;  // lines (of bw values) per column chunk
  int64_t nchunks;
  int64_t tasks;            // parallel tasks per pass (the thread count)
  Chunk chunk(const Geometry& g, int64_t c) const {
    const int64_t line0 = c * lines_per_chunk;
    return Chunk(g, line0, std::min(lines_per_chunk, g.lines() - line0));
  }
};

Plan make_plan(const Geometry& g, int64_t element_size) {
  const int64_t rows = g.rows();
  Plan plan{};
  plan.tasks = std::max<int64_t>(1, at::get_num_threads());
  const int64_t row_bytes = env_int("DAAD_EXT_CPU_ROW_BLOCK_BYTES", kRowBlockBytes);
  plan.row_block = std::max<int64_t>(kMinRows, row_bytes / (g.N * element_size));
  plan.row_block = std::max<int64_t>(1, std::min(plan.row_block, rows));
  const int64_t nblocks = (rows + plan.row_block - 1) / plan.row_block;  // balanced row blocks
  plan.row_block = (rows + nblocks - 1) / nblocks;
  const int64_t chunk_bytes = env_int("DAAD_EXT_CPU_CHUNK_BYTES", kChunkBytes);
  const int64_t chunk = std::clamp<int64_t>(chunk_bytes / (plan.row_block * element_size),
                                            std::min(kMinChunk, g.D), g.D);
  int64_t lines_per_chunk = std::clamp<int64_t>(chunk / g.bw, 1, g.lines());
  // A multiple of the thread count of balanced chunks, where the lines allow it.
  int64_t nchunks = (g.lines() + lines_per_chunk - 1) / lines_per_chunk;
  nchunks = std::min(g.lines(), (nchunks + plan.tasks - 1) / plan.tasks * plan.tasks);
  plan.lines_per_chunk = (g.lines() + nchunks - 1) / nchunks;
  plan.nchunks = (g.lines() + plan.lines_per_chunk - 1) / plan.lines_per_chunk;
  return plan;
}

// Runs f(begin, end) for the row ranges of ``rows`` split over the plan's tasks.
template <typename F>
void for_row_tasks(const Plan& plan, int64_t rows, F&& f) {
  const int64_t tasks = std::min(plan.tasks, rows);
  at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
    // Worker threads do not inherit the caller's dispatch state: keep the ATen calls below
    // autograd there too (the kernel runs below it, on tensors that may require grad).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t t = first; t < last; ++t) f(rows * t / tasks, rows * (t + 1) / tasks);
  });
}

// Runs f(first_chunk, last_chunk) for the chunk ranges split over the plan's tasks.
template <typename F>
void for_chunk_tasks(const Plan& plan, F&& f) {
  at::parallel_for(0, plan.nchunks, 1, [&](int64_t first, int64_t last) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in for_row_tasks
    f(first, last);
  });
}

// Values per row of the buffer ``times_memory_t`` gathers into: the plan's largest chunk, or
// whole rows for a narrow T (so that a sum over chunks does not round each partial sum).
template <typename T>
int64_t gather_width(const Geometry& g, const Plan& plan) {
  return kNarrow<T> ? g.D : plan.lines_per_chunk * g.bw;
}

// out (nr x N) = A M^T, where the rows of A are the queries row0, ..., row0 + nr - 1 of ``src``
// (strides ``s``): the products with K = D (S = Q M^T, G = dY M^T), gathered chunk by chunk into
// ``buf`` (nr x gather_width) and accumulated over the chunks, or for a narrow T gathered whole
// and multiplied at once; adds the rows' squared values to ``sq`` when it is not null. Serial:
// the callers run one per task.
template <typename T>
void times_memory_t(const Geometry& g, const Plan& plan, const T* src, const Strides& s,
                    int64_t row0, int64_t nr, const Tensor& memory, const Tensor& buf, double* sq,
                    Tensor& out) {
  if constexpr (kNarrow<T>) {
    for (int64_t c = 0; c < plan.nchunks; ++c) {
      const Chunk chunk = plan.chunk(g, c);
      gather_chunk(g, src, s, chunk, row0, nr, buf.mutable_data_ptr<T>() + chunk.d0, g.D, sq);
    }
    at::mm_out(out, buf.narrow(0, 0, nr * g.D).view({nr, g.D}), memory.t());
    return;
  }
  for (int64_t c = 0; c < plan.nchunks; ++c) {
    const Chunk chunk = plan.chunk(g, c);
    gather_chunk(g, src, s, chunk, row0, nr, buf.mutable_data_ptr<T>(), chunk.dc, sq);
    const Tensor ac = buf.narrow(0, 0, nr * chunk.dc).view({nr, chunk.dc});
    const Tensor mc_t = memory.narrow(1, chunk.d0, chunk.dc).t();
    if (c == 0) {
      at::mm_out(out, ac, mc_t);
    } else {
      out.addmm_(ac, mc_t);
    }
  }
}

// The row epilogue's rows in acc_t<T>: for T = acc_t<T> the op's own buffers (worked on in
// place), for a narrow T copies in ``scratch`` (N values per row, empty otherwise).
template <typename T>
std::vector<acc_t<T>> row_scratch(int64_t n) {
  return std::vector<acc_t<T>>(kNarrow<T> ? n : 0);
}

// The row to work on in place of ``row`` (not yet filled for a narrow T).
template <typename T>
acc_t<T>* acc_row(T* row, std::vector<acc_t<T>>& scratch) {
  if constexpr (kNarrow<T>) {
    return scratch.data();
  } else {
    return row;
  }
}

// ``row`` (n values) in acc_t<T>: itself, or converted into ``scratch``.
template <typename T>
const acc_t<T>* load_row(const T* row, int64_t n, std::vector<acc_t<T>>& scratch) {
  if constexpr (kNarrow<T>) {
    for (int64_t i = 0; i < n; ++i) scratch[i] = widen(row[i]);
    return scratch.data();
  } else {
    return row;
  }
}

// Writes a row worked on by acc_row back to ``dst``, rounded to T (nothing to do otherwise).
template <typename T>
void store_row(const acc_t<T>* src, int64_t n, T* dst) {
  if constexpr (kNarrow<T>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = narrow<T>(src[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.

// out[i] = |m_i| in acc_t<T>, items split over threads. Read straight from T: ATen's norm of a
// bfloat16 M with a float32 result first made a float32 copy of M (2-3% of a bf16 forward).
template <typename T>
void item_norms_into(const Tensor& memory, const Tensor& out) {
  const int64_t n = memory.size(0), d = memory.size(1);
  const T* m = memory.const_data_ptr<T>();
  acc_t<T>* norms = out.mutable_data_ptr<acc_t<T>>();
  at::parallel_for(0, n, grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) norms[i] = acc_t<T>(std::sqrt(sumsq(m + i * d, d)));
  });
}

// Given item_norms (|m_i|), computes y, w, probs and row_stats.
template <typename T>
void forward_impl(const Geometry& g, const Options& o, const Tensor& x, const Tensor& memory,
                  const Tensor& y, const Tensor& w, const Tensor& probs, const Tensor& row_stats,
                  const Tensor& item_norms) {
  using A = acc_t<T>;
  const int64_t N = g.N, rows_total = g.rows();
  const Strides xs(x), ys(y);
  const Plan plan = make_plan(g, sizeof(T));
  const int64_t max_chunk = plan.lines_per_chunk * g.bw;
  const T* x_data = x.const_data_ptr<T>();
  T* y_data = y.mutable_data_ptr<T>();
  T* w_data = w.mutable_data_ptr<T>();
  A* stats = row_stats.mutable_data_ptr<A>();
  const A* nm = item_norms.const_data_ptr<A>();
  const bool cosine = o.similarity == Similarity::Cosine;
  const bool memae = o.shrink == Shrink::MemAE;
  const A temperature = A(o.temperature), threshold = A(o.threshold);
  // Similarities are computed where the softmax will be: in w, or in probs for MemAE (whose w
  // differs); for a narrow T they are read from there into a float row.
  const Tensor logits = (memae ? probs : w).view({rows_total, N});
  T* z_data = logits.mutable_data_ptr<T>();
  const Tensor w2 = w.view({rows_total, N});

  std::vector<A> inv_nm(N);  // 1 / max(|m_i|, eps)
  for (int64_t i = 0; i < N; ++i) inv_nm[i] = A(1) / clamp_norm(nm[i]);

  for (int64_t row0 = 0; row0 < rows_total; row0 += plan.row_block) {
    const int64_t rows = std::min(plan.row_block, rows_total - row0);
    // S = Q M^T for a range of rows per task, accumulated over the column chunks, then the row
    // epilogue of those rows: similarities -> logits -> softmax -> shrinkage.
    for_row_tasks(plan, rows, [&](int64_t begin, int64_t end) {
      const int64_t nr = end - begin, first_row = row0 + begin;
      Tensor buf = at::empty({nr * gather_width<T>(g, plan)}, x.options());
      std::vector<double> sq(nr, 0.0);
      Tensor s_rows = logits.narrow(0, first_row, nr);
      times_memory_t(g, plan, x_data, xs, first_row, nr, memory, buf, sq.data(), s_rows);
      std::vector<A> z_scratch = row_scratch<T>(N), w_scratch = row_scratch<T>(N);
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = first_row + r;
        T* s = z_data + row * N;
        A* z = acc_row(s, z_scratch);
        const A nq = A(std::sqrt(sq[r]));
        if (cosine) {  // z = <q, m> / (max(|q|, eps) max(|m|, eps) T), by reciprocals
          const A scale = A(1) / (clamp_norm(nq) * temperature);
          for (int64_t i = 0; i < N; ++i) z[i] = widen(s[i]) * scale * inv_nm[i];
        } else if (kNarrow<T> || temperature != A(1)) {
          const A scale = A(1) / temperature;
          for (int64_t i = 0; i < N; ++i) z[i] = widen(s[i]) * scale;
        }
        // For a narrow T, z (then p) and w are float rows, rounded to T once at the end.
        A* w_row = kNarrow<T> && memae ? w_scratch.data() : acc_row(w_data + row * N, z_scratch);
        stats[2 * row] = nq;
        stats[2 * row + 1] =
            row_forward(z, int(N), o.shrink, threshold, w_row, static_cast<A*>(nullptr));
        store_row(w_row, N, w_data + row * N);
        if (memae) store_row(z, N, s);  // p, into probs
      }
    });
    // Y = w M, a range of column chunks per task, scattered into y.
    const Tensor w_block = w2.narrow(0, row0, rows);
    for_chunk_tasks(plan, [&](int64_t first, int64_t last) {
      Tensor buf = at::empty({rows * max_chunk}, x.options());
      for (int64_t c = first; c < last; ++c) {
        const Chunk chunk = plan.chunk(g, c);
        Tensor yc = buf.narrow(0, 0, rows * chunk.dc).view({rows, chunk.dc});
        at::mm_out(yc, w_block, memory.narrow(1, chunk.d0, chunk.dc));
        scatter_chunk<T>(g, y_data, ys, chunk, row0, rows, yc.const_data_ptr<T>(), nullptr,
                         nullptr);
      }
    });
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> block_memory_forward_cpu(
    const Tensor& x_in, const Tensor& memory_in, int64_t rh, int64_t rw, int64_t rc,
    c10::string_view similarity, c10::string_view shrink, double threshold, double temperature) {
  const Geometry g = check_inputs(x_in, memory_in, rh, rw, rc, kBackend);
  const Options o = check_options(similarity, shrink, threshold, temperature, x_in.scalar_type());
  // x is read through its strides; M must be row-major for the column chunks (a no-op normally).
  const Tensor& x = x_in;
  const Tensor memory = memory_in.contiguous();
  Tensor y = at::empty({g.B, g.C, g.H, g.W}, x.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor w = at::empty({g.B, g.Q, g.N}, x.options());
  Tensor probs = o.shrink == Shrink::MemAE ? at::empty({g.B, g.Q, g.N}, x.options())
                                           : at::empty({0}, x.options());
  const auto stats_options = x.options().dtype(stats_dtype(x.scalar_type()));
  Tensor row_stats = at::empty({g.B, g.Q, 2}, stats_options);
  Tensor item_norms = at::empty({g.N}, stats_options);
  DAAD_DISPATCH_CPU(x.scalar_type(), "block_memory_forward_cpu", [&] {
    item_norms_into<scalar_t>(memory, item_norms);
    if (g.B > 0) forward_impl<scalar_t>(g, o, x, memory, y, w, probs, row_stats, item_norms);
  });
  return {y, w, probs, row_stats, item_norms};
}

// ---------------------------------------------------------------------------------------------
// Backward: per row block, a row pass (dL/dw -> dL/d<q, m>) then a chunk pass (the products into
// grad_memory and grad_x). Only the wanted gradients are computed: without grad_memory the
// products w^T dY and dS^T Q (and the gathers of dY for them) are skipped, without grad_x the
// product dS M and its scatter. Either gradient is bitwise that of a call computing both.

template <typename T>
class Backward {
  using A = acc_t<T>;

 public:
  Backward(const BackwardArgs& a, const Tensor& x, const Tensor& grad_x, const Tensor& grad_memory)
      : a_(a), g_(a.g), plan_(make_plan(a.g, sizeof(T))), x_(x), grad_memory_(grad_memory),
        cosine_(a.o.similarity == Similarity::Cosine), xs_(x), gxs_(a.needs_grad_x ? grad_x : x),
        gys_(a.grad_y.defined() ? a.grad_y : x), max_chunk_(plan_.lines_per_chunk * g_.bw) {
    x_data_ = x.const_data_ptr<T>();
    gy_data_ = a.grad_y.defined() ? a.grad_y.const_data_ptr<T>() : nullptr;
    gx_data_ = a.needs_grad_x ? grad_x.mutable_data_ptr<T>() : nullptr;
    gs_ = at::empty({plan_.row_block, g_.N}, x.options());
    if (kNarrow<T> && gy_data_ != nullptr && a.needs_grad_memory) {
      dy_rows_ = at::empty({plan_.row_block, g_.D}, x.options());
    }
    prod_ = cosine_ ? at::empty({plan_.row_block, g_.N},
                                x.options().dtype(c10::CppTypeToScalarType<A>::value))
                    : Tensor();
    row_corr_.assign(plan_.row_block, A(0));
    colsum_.assign(cosine_ ? g_.N : 0, 0.0);
    item_corr_.assign(cosine_ ? g_.N : 0, A(0));
    const A* nm = a.item_norms.const_data_ptr<A>();
    for (size_t i = 0; i < item_corr_.size(); ++i) inv_nm_.push_back(grad_inv_norm(nm[i]));
  }

  void run() {
    for (int64_t row0 = 0; row0 < g_.rows(); row0 += plan_.row_block) {
      const int64_t rows = std::min(plan_.row_block, g_.rows() - row0);
      row_pass(row0, rows);
      chunk_pass(row0, rows);
    }
  }

 private:
  // G = dY M^T (+ grad_w) for a range of rows per task, accumulated over the column chunks, then
  // the row epilogue's backward of those rows: dL/dw -> dL/ds -> dL/d<q, m>, into gs_; for
  // cosine, the per-row norm corrections (row_corr_) and, summed over all rows in a fixed order
  // (deterministic), the per-item ones (item_corr_, complete after the last row block).
  void row_pass(int64_t row0, int64_t rows) {
    const int64_t N = g_.N;
    const bool memae = a_.o.shrink == Shrink::MemAE, has_gw = a_.grad_w.defined();
    const A temperature = A(a_.o.temperature), threshold = A(a_.o.threshold);
    const T* w_data = a_.w.const_data_ptr<T>();
    const T* p_data = memae ? a_.probs.const_data_ptr<T>() : nullptr;
    const T* gw_data = has_gw ? a_.grad_w.const_data_ptr<T>() : nullptr;
    const A* stats = a_.row_stats.const_data_ptr<A>();
    Tensor g_block = gs_.narrow(0, 0, rows);
    T* g_data = g_block.mutable_data_ptr<T>();
    A* prod_data = cosine_ ? prod_.mutable_data_ptr<A>() : nullptr;
    for_row_tasks(plan_, rows, [&](int64_t begin, int64_t end) {
      const int64_t nr = end - begin;
      if (gy_data_ != nullptr) {
        Tensor buf = dy_rows_.defined()
                         ? dy_rows_.view(-1).narrow(0, begin * g_.D, nr * g_.D)
                         : at::empty({nr * gather_width<T>(g_, plan_)}, x_.options());
        Tensor g_rows = g_block.narrow(0, begin, nr);
        times_memory_t(g_, plan_, gy_data_, gys_, row0 + begin, nr, a_.memory, buf, nullptr,
                       g_rows);
      }
      std::vector<A> g_scratch = row_scratch<T>(N), w_scratch = row_scratch<T>(N),
                     p_scratch = row_scratch<T>(memae ? N : 0);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t row = row0 + r;
        T* gr = g_data + r * N;
        A* g = acc_row(gr, g_scratch);  // dL/dw, then dL/ds
        if (has_gw) {
          const T* gwr = gw_data + row * N;
          if (gy_data_ != nullptr) {
            for (int64_t i = 0; i < N; ++i) g[i] = widen(gr[i]) + widen(gwr[i]);
          } else {
            for (int64_t i = 0; i < N; ++i) g[i] = widen(gwr[i]);
          }
        } else if constexpr (kNarrow<T>) {
          for (int64_t i = 0; i < N; ++i) g[i] = widen(gr[i]);
        }
        const A* w = load_row(w_data + row * N, N, w_scratch);
        const A* p = memae ? load_row(p_data + row * N, N, p_scratch) : nullptr;
        const A nq = stats[2 * row], lse = stats[2 * row + 1];
        const A rowdot = row_backward(g, w, p, int(N), a_.o.shrink, threshold, temperature, lse,
                                      cosine_ ? prod_data + r * N : nullptr);
        if (cosine_) {  // dL/d<q, m_i> = dL/ds_i / (|q| |m_i|), 0 where a norm is below eps
          row_corr_[r] = norm_correction(nq, rowdot);
          const A scale = grad_inv_norm(nq);
          for (int64_t i = 0; i < N; ++i) gr[i] = narrow<T>(g[i] * scale * inv_nm_[i]);
        } else {
          store_row(g, N, gr);
        }
      }
    });
    if (cosine_ && a_.needs_grad_memory) {
      const A* nm = a_.item_norms.const_data_ptr<A>();
      const bool last_block = row0 + rows == g_.rows();
      at::parallel_for(0, N, grain(rows), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          double total = 0;
          for (int64_t r = 0; r < rows; ++r) total += double(prod_data[r * N + i]);
          colsum_[i] += total;
          if (last_block) item_corr_[i] = norm_correction(nm[i], A(colsum_[i]));
        }
      });
    }
  }

  // For a range of column chunks per task: dM[:, chunk] (+)= w^T dY + dS^T Q (with the cosine
  // correction after the last row block), and dQ = dS M[:, chunk] scattered into grad_x.
  void chunk_pass(int64_t row0, int64_t rows) {
    const bool last_block = row0 + rows == g_.rows();
    const bool needs_q = a_.needs_grad_memory || (a_.needs_grad_x && cosine_);
    const Tensor g_block = gs_.narrow(0, 0, rows);
    const Tensor w_block = a_.w.view({g_.rows(), g_.N}).narrow(0, row0, rows);
    for_chunk_tasks(plan_, [&](int64_t first, int64_t last) {
      Tensor buf = at::empty({2 * rows * max_chunk_}, x_.options());  // dY (then dQ), Q
      for (int64_t c = first; c < last; ++c) {
        const Chunk chunk = plan_.chunk(g_, c);
        const int64_t size = rows * chunk.dc;
        Tensor dyc = buf.narrow(0, 0, size).view({rows, chunk.dc});
        Tensor qc = buf.narrow(0, size, size).view({rows, chunk.dc});
        if (needs_q) {
          gather_chunk<T>(g_, x_data_, xs_, chunk, row0, rows, qc.mutable_data_ptr<T>(), chunk.dc,
                          nullptr);
        }
        if (a_.needs_grad_memory) {
          add_memory_grad(chunk, row0, rows, last_block, w_block, g_block, dyc, qc);
        }
        if (a_.needs_grad_x) {
          at::mm_out(dyc, g_block, a_.memory.narrow(1, chunk.d0, chunk.dc));
          scatter_chunk<T>(g_, gx_data_, gxs_, chunk, row0, rows, dyc.const_data_ptr<T>(),
                           cosine_ ? row_corr_.data() : nullptr,
                           cosine_ ? qc.const_data_ptr<T>() : nullptr);
        }
      }
    });
  }

  // dM[:, chunk] (+)= w^T dY + dS^T Q for the rows of one row block (dY gathered into ``dyc``, or
  // read from dy_rows_); after the last one, dM_i -= (sum_rows dL/ds * s) / |m_i|^2 * m_i
  // (cosine), while the chunk of dM is in cache.
  void add_memory_grad(const Chunk& chunk, int64_t row0, int64_t rows, bool last_block,
                       const Tensor& w_block, const Tensor& g_block, Tensor& dyc,
                       const Tensor& qc) {
    Tensor gm_chunk = grad_memory_.narrow(1, chunk.d0, chunk.dc);
    bool written = row0 > 0;
    if (gy_data_ != nullptr) {
      Tensor dy = dyc;
      if (dy_rows_.defined()) {
        dy = dy_rows_.narrow(0, 0, rows).narrow(1, chunk.d0, chunk.dc);
      } else {
        gather_chunk<T>(g_, gy_data_, gys_, chunk, row0, rows, dyc.mutable_data_ptr<T>(),
                        chunk.dc, nullptr);
      }
      if (written) {
        gm_chunk.addmm_(w_block.t(), dy);
      } else {
        at::mm_out(gm_chunk, w_block.t(), dy);
      }
      written = true;
    }
    if (written) {
      gm_chunk.addmm_(g_block.t(), qc);
    } else {
      at::mm_out(gm_chunk, g_block.t(), qc);
    }
    if (cosine_ && last_block) {
      const int64_t D = g_.D;
      const T* m_data = a_.memory.const_data_ptr<T>();
      T* gm_data = grad_memory_.mutable_data_ptr<T>();
      for (int64_t i = 0; i < g_.N; ++i) {
        const A coef = item_corr_[i];
        if (coef == A(0)) continue;
        T* out = gm_data + i * D + chunk.d0;
        const T* m = m_data + i * D + chunk.d0;
        for (int64_t j = 0; j < chunk.dc; ++j) out[j] = narrow<T>(widen(out[j]) - coef * widen(m[j]));
      }
    }
  }

  const BackwardArgs& a_;
  const Geometry& g_;
  const Plan plan_;
  const Tensor& x_;
  const Tensor& grad_memory_;
  const bool cosine_;
  const Strides xs_, gxs_, gys_;
  const int64_t max_chunk_;
  const T* x_data_;
  const T* gy_data_;
  T* gx_data_;
  Tensor gs_;    // row block x N: dL/dw, then dL/d<q, m>
  Tensor dy_rows_;  // row block x D (narrow T, for grad M): dY as row_pass gathers it whole
  Tensor prod_;  // row block x N (cosine, in acc_t<T>): dL/ds_i * s_i
  std::vector<A> row_corr_;
  std::vector<double> colsum_;
  std::vector<A> item_corr_, inv_nm_;
};

std::tuple<Tensor, Tensor> block_memory_backward_cpu(
    const std::optional<Tensor>& grad_y, const std::optional<Tensor>& grad_w, const Tensor& x,
    const Tensor& memory, const Tensor& w, const Tensor& probs, const Tensor& row_stats,
    const Tensor& item_norms, int64_t rh, int64_t rw, int64_t rc, c10::string_view similarity,
    c10::string_view shrink, double threshold, double temperature, bool needs_grad_x,
    bool needs_grad_memory) {
  const BackwardArgs args = prepare_backward(
      grad_y, grad_w, x, memory, w, probs, row_stats, item_norms, rh, rw, rc, similarity, shrink,
      threshold, temperature, needs_grad_x, needs_grad_memory, kBackend);
  Tensor grad_x, grad_memory;
  std::tie(grad_x, grad_memory) = backward_outputs(args, x);
  if (!args.trivial()) {
    DAAD_DISPATCH_CPU(x.scalar_type(), "block_memory_backward_cpu", [&] {
      Backward<scalar_t>(args, x, grad_x, grad_memory).run();
    });
  }
  return {grad_x, grad_memory};
}

}  // namespace

TORCH_LIBRARY_IMPL(daad_ext, CPU, m) {
  m.impl("block_memory_forward", &block_memory_forward_cpu);
  m.impl("block_memory_backward", &block_memory_backward_cpu);
}

}  // namespace daad_ext
