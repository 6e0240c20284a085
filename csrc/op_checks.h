// Argument checks of daad_ext::block_memory_forward / _backward, shared by the CPU kernel
// (csrc/block_memory_cpu.cpp) and the CUDA kernel (csrc/cuda/block_memory_cuda.cu): the checks of
// daad_ext/spec.py (check_inputs / check_options), with its messages, for callers that bypass
// Python, plus those of the backward's saved tensors and gradients. Host-only C++ (nvcc compiles
// it too); what differs between the kernels (device, dtypes) is a ``Backend`` parameter, and
// kernel-specific limits stay in the kernel's file. TORCH_CHECK raises RuntimeError in Python.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <optional>
#include <string_view>

#include "block_memory.h"

namespace daad_ext {

inline Similarity parse_similarity(std::string_view similarity) {
  if (similarity == "cosine") return Similarity::Cosine;
  if (similarity == "dot") return Similarity::Dot;
  TORCH_CHECK(false, "unknown similarity '", similarity, "'; choose one of ('cosine', 'dot')");
}

inline Shrink parse_shrink(std::string_view shrink) {
  if (shrink == "hard") return Shrink::Hard;
  if (shrink == "memae") return Shrink::MemAE;
  if (shrink == "none") return Shrink::None;
  TORCH_CHECK(false, "unknown shrink '", shrink, "'; choose one of ('hard', 'memae', 'none')");
}

// The block geometry of one call: x is (B, C, H, W), divided by (rh, rw, rc) into Q = rh*rw*rc
// blocks of (bc, bh, bw) = (C/rc, H/rh, W/rw) values, D = bc*bh*bw each; memory is (N, D).
struct Geometry {
  int64_t B, C, H, W, rh, rw, rc, bc, bh, bw, Q, D, N;
  int64_t rows() const { return B * Q; }      // R, the query rows of the block matrix
  int64_t lines() const { return bc * bh; }   // a block is bc*bh lines of bw contiguous values
};

// The row epilogue's options (block_memory.h); ``lam`` is the shrinkage threshold.
struct Options {
  Similarity similarity;
  Shrink shrink;
  double lam;
  double temperature;
};

// What a kernel accepts: tensors on ``device``, of one of ``dtypes`` (named ``dtype_names`` in
// messages); ``name`` ("CPU", "CUDA") names the kernel.
struct Backend {
  const char* name;
  c10::DeviceType device;
  c10::ArrayRef<at::ScalarType> dtypes;
  const char* dtype_names;
};

// dtype of the saved per-row and per-item statistics (row_stats, item_norms): float32 for the
// half types, else that of x (as daad_ext/ops.py's stats_dtype).
inline at::ScalarType stats_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline Options check_options(std::string_view similarity, std::string_view shrink,
                             double threshold, double temperature) {
  Options options{parse_similarity(similarity), parse_shrink(shrink), threshold, temperature};
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature),
              "temperature must be > 0 (and finite), got ", temperature);
  TORCH_CHECK(threshold > 0 && threshold <= 1, "threshold must be in (0, 1], got ", threshold);
  return options;
}

inline Geometry check_inputs(const at::Tensor& x, const at::Tensor& memory, int64_t rh,
                             int64_t rw, int64_t rc, const Backend& backend) {
  TORCH_CHECK(x.dim() == 4, "x must be a 4-D tensor (B, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(memory.dim() == 2, "memory must be a 2-D tensor (N, D), got shape ", memory.sizes());
  TORCH_CHECK(x.is_floating_point(), "x must be a floating-point tensor, got dtype ",
              x.scalar_type());
  TORCH_CHECK(memory.is_floating_point(), "memory must be a floating-point tensor, got dtype ",
              memory.scalar_type());
  TORCH_CHECK(x.scalar_type() == memory.scalar_type(),
              "x and memory must have the same dtype, got ", x.scalar_type(), " and ",
              memory.scalar_type());
  TORCH_CHECK(x.device() == memory.device(), "x and memory must be on the same device, got ",
              x.device(), " and ", memory.device());
  TORCH_CHECK(x.device().type() == backend.device, "the daad_ext ", backend.name,
              " kernel needs ", backend.name, " tensors, got ", x.device());
  const auto& dtypes = backend.dtypes;
  TORCH_CHECK(std::find(dtypes.begin(), dtypes.end(), x.scalar_type()) != dtypes.end(),
              "the daad_ext ", backend.name, " kernel supports ", backend.dtype_names,
              ", got dtype ", x.scalar_type());
  TORCH_CHECK(rh >= 1 && rw >= 1 && rc >= 1, "division rates must be >= 1, got (rh, rw, rc) = (",
              rh, ", ", rw, ", ", rc, ")");
  Geometry g{};
  g.B = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.rh = rh;
  g.rw = rw;
  g.rc = rc;
  std::string bad;
  const auto add = [&bad](const char* name, int64_t size, const char* rname, int64_t rate) {
    if (size % rate == 0) return;
    if (!bad.empty()) bad += "; ";
    bad += std::string(name) + "=" + std::to_string(size) + " is not divisible by " + rname + "=" +
           std::to_string(rate);
  };
  add("H", g.H, "rh", rh);
  add("W", g.W, "rw", rw);
  add("C", g.C, "rc", rc);
  TORCH_CHECK(bad.empty(), "feature map cannot be divided evenly into blocks: ", bad);
  g.bc = g.C / rc;
  g.bh = g.H / rh;
  g.bw = g.W / rw;
  g.Q = rh * rw * rc;
  g.D = g.bc * g.bh * g.bw;
  g.N = memory.size(0);
  TORCH_CHECK(g.N >= 1, "memory must hold at least one item (N >= 1)");
  TORCH_CHECK(memory.size(1) == g.D, "memory has item length D=", memory.size(1),
              ", but division (", rh, ", ", rw, ", ", rc, ") of a (C, H, W) = (", g.C, ", ", g.H,
              ", ", g.W, ") map gives blocks of D = ", g.bc, "*", g.bh, "*", g.bw, " = ", g.D);
  TORCH_CHECK(g.D >= 1, "blocks must hold at least one value (D >= 1), got (C, H, W) = (", g.C,
              ", ", g.H, ", ", g.W, ")");
  // The row epilogue (block_memory.h) counts items in int.
  TORCH_CHECK(g.N <= std::numeric_limits<int>::max(), "too many memory items: N=", g.N);
  return g;
}

// A saved tensor or gradient of the backward: ``shape``, ``dtype``, and x's device.
inline void check_saved(const char* name, const at::Tensor& t, at::IntArrayRef shape,
                        at::ScalarType dtype, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
}

// An optional gradient of the backward: the tensor, or an undefined one where it is absent.
inline at::Tensor optional_grad(const std::optional<at::Tensor>& grad) {
  return grad.has_value() && grad->defined() ? *grad : at::Tensor();
}

// The backward's saved tensors (as the forward returned them; probs for MemAE only) and its
// gradients (undefined where absent), after check_inputs / check_options on x and memory.
inline void check_backward_args(const Geometry& g, const Options& o, const at::Tensor& x,
                                const at::Tensor& w, const at::Tensor& probs,
                                const at::Tensor& row_stats, const at::Tensor& item_norms,
                                const at::Tensor& grad_y, const at::Tensor& grad_w) {
  const at::ScalarType dtype = x.scalar_type(), stats = stats_dtype(dtype);
  check_saved("w", w, {g.B, g.Q, g.N}, dtype, x);
  if (o.shrink == Shrink::MemAE) check_saved("probs", probs, {g.B, g.Q, g.N}, dtype, x);
  check_saved("row_stats", row_stats, {g.B, g.Q, 2}, stats, x);
  check_saved("item_norms", item_norms, {g.N}, stats, x);
  if (grad_y.defined()) check_saved("grad_y", grad_y, x.sizes(), dtype, x);
  if (grad_w.defined()) check_saved("grad_w", grad_w, {g.B, g.Q, g.N}, dtype, x);
}

}  // namespace daad_ext
