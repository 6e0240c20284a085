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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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

// ---------------------------------------------------------------------------------------------
// Argument checks: csrc/op_checks.h, for float32 and float64 CPU tensors.
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

constexpr at::ScalarType kDtypes[] = {at::kFloat, at::kDouble};
const Backend kBackend{"CPU", c10::DeviceType::CPU, kDtypes, "float32 and float64",
                       &check_cpu_limits};

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

// Sum of squares of n values, in independent lanes so that the loop vectorises.
template <typename T>
inline double sumsq(const T* __restrict src, int64_t n) {
  constexpr int kLanes = 16;
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += src[i + l] * src[i + l];
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
  if (sw == 1) {
    for (int64_t j = 0; j < nlines; ++j, out += n) {
      const T* __restrict in = block + offsets[j];
      for (int64_t i = 0; i < n; ++i) out[i] = in[i];
    }
  } else {
    for (int64_t j = 0; j < nlines; ++j, out += n) {
      const T* in = block + offsets[j];
      for (int64_t i = 0; i < n; ++i) out[i] = in[i * sw];
    }
  }
}

// dst lines = in (- c * minus when ``minus`` is not null); dst is contiguous along W.
template <int BW, typename T>
inline void scatter_lines(T* __restrict block, const int64_t* offsets, int64_t nlines, int64_t bw,
                          const T* __restrict in, T c, const T* __restrict minus) {
  const int64_t n = BW > 0 ? BW : bw;
  if (minus != nullptr) {
    for (int64_t j = 0; j < nlines; ++j, in += n, minus += n) {
      T* __restrict out = block + offsets[j];
      for (int64_t i = 0; i < n; ++i) out[i] = in[i] - c * minus[i];
    }
  } else {
    for (int64_t j = 0; j < nlines; ++j, in += n) {
      T* __restrict out = block + offsets[j];
      for (int64_t i = 0; i < n; ++i) out[i] = in[i];
    }
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

// buf[r, :] = chunk of query (row0 + r) of ``src``, for r < rows; adds the squared values to
// ``sq[r]`` when ``sq`` is not null. Serial: the callers run one gather per thread.
template <typename T>
void gather_chunk(const Geometry& g, const T* src, const Strides& s, const Chunk& chunk,
                  int64_t row0, int64_t rows, T* buf, double* sq) {
  const std::vector<int64_t> offsets = chunk.offsets(g, s);
  dispatch_width(g.bw, [&](auto width) {
    constexpr int BW = decltype(width)::value;
    for (int64_t r = 0; r < rows; ++r) {
      T* out = buf + r * chunk.dc;
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
                   int64_t rows, const T* buf, const T* coef, const T* sub) {
  TORCH_INTERNAL_ASSERT(s.w == 1, "scatter_chunk writes contiguous outputs only");
  const std::vector<int64_t> offsets = chunk.offsets(g, s);
  dispatch_width(g.bw, [&](auto width) {
    constexpr int BW = decltype(width)::value;
    for (int64_t r = 0; r < rows; ++r) {
      scatter_lines<BW>(dst + block_offset(g, s, row0 + r), offsets.data(), chunk.nlines, g.bw,
                        buf + r * chunk.dc, coef != nullptr ? coef[r] : T(0),
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

// out (nr x N) = A M^T, where the rows of A are the queries row0, ..., row0 + nr - 1 of ``src``
// (strides ``s``): the products with K = D (S = Q M^T, G = dY M^T), accumulated over the column
// chunks, each gathered into ``buf`` (nr x the plan's largest chunk); adds the rows' squared values
// to ``sq`` when it is not null. Serial: the callers run one per task.
template <typename T>
void times_memory_t(const Geometry& g, const Plan& plan, const T* src, const Strides& s,
                    int64_t row0, int64_t nr, const Tensor& memory, const Tensor& buf, double* sq,
                    Tensor& out) {
  for (int64_t c = 0; c < plan.nchunks; ++c) {
    const Chunk chunk = plan.chunk(g, c);
    gather_chunk(g, src, s, chunk, row0, nr, buf.mutable_data_ptr<T>(), sq);
    const Tensor ac = buf.narrow(0, 0, nr * chunk.dc).view({nr, chunk.dc});
    const Tensor mc_t = memory.narrow(1, chunk.d0, chunk.dc).t();
    if (c == 0) {
      at::mm_out(out, ac, mc_t);
    } else {
      out.addmm_(ac, mc_t);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <typename T>
void forward_impl(const Geometry& g, const Options& o, const Tensor& x, const Tensor& memory,
                  const Tensor& y, const Tensor& w, const Tensor& probs, const Tensor& row_stats,
                  const Tensor& item_norms) {
  const int64_t N = g.N, D = g.D, rows_total = g.rows();
  const Strides xs(x), ys(y);
  const Plan plan = make_plan(g, sizeof(T));
  const int64_t max_chunk = plan.lines_per_chunk * g.bw;
  const T* x_data = x.const_data_ptr<T>();
  const T* m_data = memory.const_data_ptr<T>();
  T* y_data = y.mutable_data_ptr<T>();
  T* w_data = w.mutable_data_ptr<T>();
  T* stats = row_stats.mutable_data_ptr<T>();
  T* nm = item_norms.mutable_data_ptr<T>();
  const bool cosine = o.similarity == Similarity::Cosine;
  const T temperature = T(o.temperature), lam = T(o.lam);
  // Logits are computed where the softmax will be: in w, or in probs for MemAE (whose w differs).
  const Tensor logits = (o.shrink == Shrink::MemAE ? probs : w).view({rows_total, N});
  T* z_data = logits.mutable_data_ptr<T>();
  const Tensor w2 = w.view({rows_total, N});

  // |m_i| (one pass over M, split over items) and 1 / max(|m_i|, eps).
  std::vector<T> inv_nm(N);
  at::parallel_for(0, N, grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      nm[i] = T(std::sqrt(sumsq(m_data + i * D, D)));
      inv_nm[i] = T(1) / clamp_norm(nm[i]);
    }
  });

  for (int64_t row0 = 0; row0 < rows_total; row0 += plan.row_block) {
    const int64_t rows = std::min(plan.row_block, rows_total - row0);
    // S = Q M^T for a range of rows per task, accumulated over the column chunks, then the row
    // epilogue of those rows: similarities -> logits -> softmax -> shrinkage.
    for_row_tasks(plan, rows, [&](int64_t begin, int64_t end) {
      const int64_t nr = end - begin, first_row = row0 + begin;
      Tensor buf = at::empty({nr * max_chunk}, x.options());
      std::vector<double> sq(nr, 0.0);
      Tensor s_rows = logits.narrow(0, first_row, nr);
      times_memory_t(g, plan, x_data, xs, first_row, nr, memory, buf, sq.data(), s_rows);
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = first_row + r;
        T* z = z_data + row * N;
        const T nq = T(std::sqrt(sq[r]));
        if (cosine) {  // z = <q, m> / (max(|q|, eps) max(|m|, eps) T), by reciprocals
          const T scale = T(1) / (clamp_norm(nq) * temperature);
          for (int64_t i = 0; i < N; ++i) z[i] = z[i] * scale * inv_nm[i];
        } else if (temperature != T(1)) {
          const T scale = T(1) / temperature;
          for (int64_t i = 0; i < N; ++i) z[i] *= scale;
        }
        stats[2 * row] = nq;
        stats[2 * row + 1] =
            row_forward(z, int(N), o.shrink, lam, w_data + row * N, static_cast<T*>(nullptr));
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
  Tensor row_stats = at::empty({g.B, g.Q, 2}, x.options());
  Tensor item_norms = at::empty({g.N}, x.options());
  if (g.B > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "block_memory_forward_cpu", [&] {
      forward_impl<scalar_t>(g, o, x, memory, y, w, probs, row_stats, item_norms);
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "block_memory_item_norms", [&] {
      item_norms.copy_(at::linalg_vector_norm(memory, 2, {1}, false, std::nullopt));
    });
  }
  return {y, w, probs, row_stats, item_norms};
}

// ---------------------------------------------------------------------------------------------
// Backward: per row block, a row pass (dL/dw -> dL/d<q, m>) then a chunk pass (the products into
// grad_memory and grad_x). Only the wanted gradients are computed: without grad_memory the
// products w^T dY and dS^T Q (and the gathers of dY for them) are skipped, without grad_x the
// product dS M and its scatter. Either gradient is bitwise that of a call computing both.

template <typename T>
class Backward {
 public:
  Backward(const BackwardArgs& a, const Tensor& x, const Tensor& grad_x, const Tensor& grad_memory)
      : a_(a), g_(a.g), plan_(make_plan(a.g, sizeof(T))), x_(x), grad_memory_(grad_memory),
        cosine_(a.o.similarity == Similarity::Cosine), xs_(x), gxs_(a.needs_grad_x ? grad_x : x),
        gys_(a.grad_y.defined() ? a.grad_y : x), max_chunk_(plan_.lines_per_chunk * g_.bw) {
    x_data_ = x.const_data_ptr<T>();
    gy_data_ = a.grad_y.defined() ? a.grad_y.const_data_ptr<T>() : nullptr;
    gx_data_ = a.needs_grad_x ? grad_x.mutable_data_ptr<T>() : nullptr;
    gs_ = at::empty({plan_.row_block, g_.N}, x.options());
    prod_ = cosine_ ? at::empty({plan_.row_block, g_.N}, x.options()) : Tensor();
    row_corr_.assign(plan_.row_block, T(0));
    colsum_.assign(cosine_ ? g_.N : 0, 0.0);
    item_corr_.assign(cosine_ ? g_.N : 0, T(0));
    const T* nm = a.item_norms.const_data_ptr<T>();
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
    const T temperature = T(a_.o.temperature), lam = T(a_.o.lam);
    const T* w_data = a_.w.const_data_ptr<T>();
    const T* p_data = memae ? a_.probs.const_data_ptr<T>() : nullptr;
    const T* gw_data = has_gw ? a_.grad_w.const_data_ptr<T>() : nullptr;
    const T* stats = a_.row_stats.const_data_ptr<T>();
    Tensor g_block = gs_.narrow(0, 0, rows);
    T* g_data = g_block.mutable_data_ptr<T>();
    T* prod_data = cosine_ ? prod_.mutable_data_ptr<T>() : nullptr;
    for_row_tasks(plan_, rows, [&](int64_t begin, int64_t end) {
      const int64_t nr = end - begin;
      if (gy_data_ != nullptr) {
        Tensor buf = at::empty({nr * max_chunk_}, x_.options());
        Tensor g_rows = g_block.narrow(0, begin, nr);
        times_memory_t(g_, plan_, gy_data_, gys_, row0 + begin, nr, a_.memory, buf, nullptr,
                       g_rows);
      }
      for (int64_t r = begin; r < end; ++r) {
        const int64_t row = row0 + r;
        T* gr = g_data + r * N;
        if (has_gw) {
          const T* gwr = gw_data + row * N;
          if (gy_data_ != nullptr) {
            for (int64_t i = 0; i < N; ++i) gr[i] += gwr[i];
          } else {
            std::copy(gwr, gwr + N, gr);
          }
        }
        const T nq = stats[2 * row], lse = stats[2 * row + 1];
        const T rowdot = row_backward(gr, w_data + row * N, memae ? p_data + row * N : nullptr,
                                      int(N), a_.o.shrink, lam, temperature, lse,
                                      cosine_ ? prod_data + r * N : nullptr);
        if (cosine_) {  // dL/d<q, m_i> = dL/ds_i / (|q| |m_i|), 0 where a norm is below eps
          row_corr_[r] = norm_correction(nq, rowdot);
          const T scale = grad_inv_norm(nq);
          for (int64_t i = 0; i < N; ++i) gr[i] = gr[i] * scale * inv_nm_[i];
        }
      }
    });
    if (cosine_ && a_.needs_grad_memory) {
      const T* nm = a_.item_norms.const_data_ptr<T>();
      const bool last_block = row0 + rows == g_.rows();
      at::parallel_for(0, N, grain(rows), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          double total = 0;
          for (int64_t r = 0; r < rows; ++r) total += double(prod_data[r * N + i]);
          colsum_[i] += total;
          if (last_block) item_corr_[i] = norm_correction(nm[i], T(colsum_[i]));
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
          gather_chunk<T>(g_, x_data_, xs_, chunk, row0, rows, qc.mutable_data_ptr<T>(), nullptr);
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

  // dM[:, chunk] (+)= w^T dY + dS^T Q for the rows of one row block (dY gathered into ``dyc``);
  // after the last one, dM_i -= (sum_rows dL/ds * s) / |m_i|^2 * m_i (cosine), while the chunk of
  // dM is in cache.
  void add_memory_grad(const Chunk& chunk, int64_t row0, int64_t rows, bool last_block,
                       const Tensor& w_block, const Tensor& g_block, Tensor& dyc,
                       const Tensor& qc) {
    Tensor gm_chunk = grad_memory_.narrow(1, chunk.d0, chunk.dc);
    bool written = row0 > 0;
    if (gy_data_ != nullptr) {
      gather_chunk<T>(g_, gy_data_, gys_, chunk, row0, rows, dyc.mutable_data_ptr<T>(), nullptr);
      if (written) {
        gm_chunk.addmm_(w_block.t(), dyc);
      } else {
        at::mm_out(gm_chunk, w_block.t(), dyc);
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
        const T coef = item_corr_[i];
        if (coef == T(0)) continue;
        T* out = gm_data + i * D + chunk.d0;
        const T* m = m_data + i * D + chunk.d0;
        for (int64_t j = 0; j < chunk.dc; ++j) out[j] -= coef * m[j];
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
  Tensor prod_;  // row block x N (cosine): dL/ds_i * s_i
  std::vector<T> row_corr_;
  std::vector<double> colsum_;
  std::vector<T> item_corr_, inv_nm_;
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
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "block_memory_backward_cpu", [&] {
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
