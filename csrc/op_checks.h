// Argument checks of daad_ext::block_memory_forward / _backward, shared by the CPU kernel
// (csrc/block_memory_cpu.cpp) and the CUDA kernel (csrc/cuda/block_memory_cuda.cu): the checks of
// daad_ext/spec.py (check_inputs / check_options), with its messages, for callers that bypass
// Python, plus those of the backward's saved tensors and gradients, and the backward's argument
// preparation. Host-only C++ (nvcc compiles it too); what differs between the kernels (device,
// dtypes, the size limits of their index arithmetic) is a ``Backend`` parameter, whose limits
// live in the kernel's file. TORCH_CHECK raises RuntimeError in Python.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iomanip>
#include <limits>
#include <string>
#include <optional>
#include <sstream>
#include <string_view>
#include <tuple>

#include "block_memory.h"

namespace daad_ext {

// The names of the similarity and shrink codes (block_memory.h): the one C++ table, which the
// parsers below read and the Python module exports (daad_ext._C.SIMILARITY_CODES / SHRINK_CODES;
// a test compares them with daad_ext/spec.py's).
template <typename Code>
struct NamedCode {
  std::string_view name;
  Code code;
};
inline constexpr NamedCode<Similarity> kSimilarityNames[] = {{"cosine", Similarity::Cosine},
                                                             {"dot", Similarity::Dot}};
inline constexpr NamedCode<Shrink> kShrinkNames[] = {
    {"hard", Shrink::Hard}, {"memae", Shrink::MemAE}, {"none", Shrink::None}};

// The code named ``name`` in ``table``; else an error "unknown <what> '<name>'; choose one of
// ('a', 'b')", as daad_ext/spec.py words it.
template <typename Code, size_t K>
Code parse_code(const NamedCode<Code> (&table)[K], std::string_view name, const char* what) {
  std::string choices;
  for (const auto& entry : table) {
    if (entry.name == name) return entry.code;
    choices += (choices.empty() ? "'" : ", '") + std::string(entry.name) + "'";
  }
  TORCH_CHECK(false, "unknown ", what, " '", name, "'; choose one of (", choices, ")");
}

inline Similarity parse_similarity(std::string_view similarity) {
  return parse_code(kSimilarityNames, similarity, "similarity");
}

inline Shrink parse_shrink(std::string_view shrink) {
  return parse_code(kShrinkNames, shrink, "shrink");
}

// dtype names as Python prints them without the "torch." prefix, for messages.
inline std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    default: return c10::toString(dtype);
  }
}

// The block geometry of one call: x is (B, C, H, W), divided by (rh, rw, rc) into Q = rh*rw*rc
// blocks of (bc, bh, bw) = (C/rc, H/rh, W/rw) values, D = bc*bh*bw each; memory is (N, D).
struct Geometry {
  int64_t B, C, H, W, rh, rw, rc, bc, bh, bw, Q, D, N;
  int64_t rows() const { return B * Q; }      // R, the query rows of the block matrix
  int64_t lines() const { return bc * bh; }   // a block is bc*bh lines of bw contiguous values
};

// The row epilogue's options (block_memory.h); ``threshold`` is the shrinkage threshold.
struct Options {
  Similarity similarity;
  Shrink shrink;
  double threshold;
  double temperature;
};

// What a kernel accepts: tensors on ``device``, of one of ``dtypes`` (named ``dtype_names`` in
// messages), of a geometry within ``check_limits`` (the limits of the kernel's index arithmetic,
// which live in the kernel's file); ``name`` ("CPU", "CUDA") names the kernel.
struct Backend {
  const char* name;
  c10::DeviceType device;
  c10::ArrayRef<at::ScalarType> dtypes;
  const char* dtype_names;
  void (*check_limits)(const Geometry&);
};

// dtype of the saved per-row and per-item statistics (row_stats, item_norms): float32 for the
// half types, else that of x (as daad_ext/ops.py's stats_dtype).
inline at::ScalarType stats_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// daad_ext/spec.py's check_temperature: a temperature below the smallest normal number of the
// precision the kernels divide by it in (float32 for the half types) makes every logit inf/NaN.
inline void check_temperature(double temperature, at::ScalarType dtype) {
  const bool f64 = stats_dtype(dtype) == at::kDouble;
  const double tiny = f64 ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
  if (temperature >= tiny) return;
  std::ostringstream tiny_text;
  tiny_text << std::setprecision(3) << tiny;
  TORCH_CHECK(false, "temperature ", temperature, " underflows ", f64 ? "float64" : "float32",
              " (smallest normal ", tiny_text.str(), "), the precision ", dtype_name(dtype),
              " inputs are computed in; use a larger temperature");
}

// daad_ext/spec.py's check_options (and check_temperature for x's ``dtype``).
inline Options check_options(std::string_view similarity, std::string_view shrink,
                             double threshold, double temperature, at::ScalarType dtype) {
  Options options{parse_similarity(similarity), parse_shrink(shrink), threshold, temperature};
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature),
              "temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK(threshold > 0 && threshold <= 1, "threshold must be in (0, 1], got ", threshold);
  check_temperature(temperature, dtype);
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
  backend.check_limits(g);
  return g;
}

// A tensor argument of the backward on x's device (daad_ext/spec.py's message).
inline void check_device(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), " (x's device), got ",
              t.device());
}

// A saved tensor or gradient of the backward: x's device, ``shape`` and ``dtype``.
inline void check_saved(const char* name, const at::Tensor& t, at::IntArrayRef shape,
                        at::ScalarType dtype, const at::Tensor& x) {
  check_device(name, t, x);
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
}

// An optional gradient of the backward: the tensor, or an undefined one where it is absent.
inline at::Tensor optional_grad(const std::optional<at::Tensor>& grad) {
  return grad.has_value() && grad->defined() ? *grad : at::Tensor();
}

// The checked arguments of daad_ext::block_memory_backward, as both kernels use them: grad_y (read
// through its strides; undefined when absent), the other tensors contiguous (no-ops normally),
// and which gradients to compute.
struct BackwardArgs {
  Geometry g;
  Options o;
  at::Tensor grad_y, grad_w, memory, w, probs, row_stats, item_norms;
  bool needs_grad_x, needs_grad_memory;

  // Whether the kernels have nothing to compute: the wanted gradients are zero (no rows, or no
  // incoming gradient) or none is wanted.
  bool trivial() const {
    return g.rows() == 0 || (!grad_y.defined() && !grad_w.defined()) ||
           (!needs_grad_x && !needs_grad_memory);
  }
};

// Checks the backward's arguments (those of the forward, then its saved tensors and gradients:
// probs for MemAE only, else only its device; every tensor on x's device) and prepares them for
// ``backend``'s kernel.
inline BackwardArgs prepare_backward(
    const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_w,
    const at::Tensor& x, const at::Tensor& memory, const at::Tensor& w, const at::Tensor& probs,
    const at::Tensor& row_stats, const at::Tensor& item_norms, int64_t rh, int64_t rw, int64_t rc,
    std::string_view similarity, std::string_view shrink, double threshold, double temperature,
    bool needs_grad_x, bool needs_grad_memory, const Backend& backend) {
  BackwardArgs a{};
  a.g = check_inputs(x, memory, rh, rw, rc, backend);
  a.o = check_options(similarity, shrink, threshold, temperature, x.scalar_type());
  a.grad_y = optional_grad(grad_y);
  a.grad_w = optional_grad(grad_w);
  const Geometry& g = a.g;
  const at::ScalarType dtype = x.scalar_type(), stats = stats_dtype(dtype);
  const bool memae = a.o.shrink == Shrink::MemAE;
  check_saved("w", w, {g.B, g.Q, g.N}, dtype, x);
  if (memae) {
    check_saved("probs", probs, {g.B, g.Q, g.N}, dtype, x);
  } else {
    check_device("probs", probs, x);
  }
  check_saved("row_stats", row_stats, {g.B, g.Q, 2}, stats, x);
  check_saved("item_norms", item_norms, {g.N}, stats, x);
  if (a.grad_y.defined()) check_saved("grad_y", a.grad_y, x.sizes(), dtype, x);
  if (a.grad_w.defined()) {
    check_saved("grad_w", a.grad_w, {g.B, g.Q, g.N}, dtype, x);
    a.grad_w = a.grad_w.contiguous();
  }
  a.memory = memory.contiguous();
  a.w = w.contiguous();
  a.probs = memae ? probs.contiguous() : probs;
  a.row_stats = row_stats.contiguous();
  a.item_norms = item_norms.contiguous();
  a.needs_grad_x = needs_grad_x;
  a.needs_grad_memory = needs_grad_memory;
  return a;
}

// The backward's outputs: grad_x (a contiguous (B, C, H, W) tensor) and grad_memory ((N, D))
// where they are needed, an empty (0,) tensor of x's dtype and device where not (the contract
// of daad_ext/ops.py's autograd glue). Zero-filled when the kernels have nothing to compute
// (BackwardArgs::trivial), uninitialised otherwise.
inline std::tuple<at::Tensor, at::Tensor> backward_outputs(const BackwardArgs& a,
                                                           const at::Tensor& x) {
  const Geometry& g = a.g;
  const auto options = x.options();
  at::Tensor grad_x = a.needs_grad_x
                          ? at::empty({g.B, g.C, g.H, g.W},
                                      options.memory_format(at::MemoryFormat::Contiguous))
                          : at::empty({0}, options);
  at::Tensor grad_memory = a.needs_grad_memory ? at::empty({g.N, g.D}, options)
                                               : at::empty({0}, options);
  if (a.trivial()) {
    grad_x.zero_();
    grad_memory.zero_();
  }
  return {grad_x, grad_memory};
}

}  // namespace daad_ext
