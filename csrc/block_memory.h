// The row epilogue of the block-wise memory operator: softmax, shrinkage, re-normalisation and
// their backward, for one query's row of N similarities. Shared by the CPU kernel and the CUDA
// kernels (``__host__ __device__``), so the logic is tested on CPU where no GPU runs. The Triton
// kernels mirror these functions line for line.
//
// Notation for one query row (see daad_ext/reference.py for the specification):
//   z_i = s_i / T                       logits (s: cosine or dot similarity, T: temperature)
//   p_i = exp(z_i - lse_all)            softmax
//   w_i                                 shrunk, re-normalised weights (the operator's output)
//
// What a forward saves per row besides w (and p for MemAE) is ``lse`` such that
//   z_i = log(w_i) + lse   for hard / none, wherever w_i > 0,
//   z_i = log(p_i) + lse   for memae,       wherever p_i > 0.
// The backward recovers the similarities from it instead of recomputing q @ M^T, which keeps the
// fused backward at four matrix products, the same count as the bare products' backward.
//
// Backward of one row, given g_i = dL/dw_i (from y and from w):
//   hard, none: dL/dz_i = w_i (g_i - <w, g>)           (the hard mask is a constant)
//   memae:      u_i = relu(p_i - threshold) p_i / (|p_i - threshold| + eps),  S = sum u,  w = u / max(S, eps)
//               dL/du_i = (g_i - <g, w>) / S  if S >= eps,  else g_i / eps
//               dL/dp_i = dL/du_i * du_i/dp_i,  dL/dz_i = p_i (dL/dp_i - <p, dL/dp>)
//   dL/ds_i = dL/dz_i / T.
// The cosine backward then needs rowdot = sum_i dL/ds_i * s_i per row and the same products summed
// over rows per item; ``row_backward`` returns the first and can write the products for the second.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define DAAD_HD __host__ __device__ __forceinline__
#else
#define DAAD_HD inline
#endif

namespace daad_ext {

enum class Similarity : int { Cosine = 0, Dot = 1 };
enum class Shrink : int { Hard = 0, MemAE = 1, None = 2 };

// Floors of the cosine norms and of MemAE's |p - threshold| and row sum (as in the reference).
constexpr double kNormEps = 1e-12;
constexpr double kMemAEEps = 1e-12;

template <typename T>
DAAD_HD T clamp_norm(T norm) {
  return norm >= T(kNormEps) ? norm : T(kNormEps);
}

// The backward's inverse norm: 1/|v| at or above the floor and 0 below it, where the normalised
// vector carries no direction: no gradient flows through the similarity to a query or memory item
// whose norm is below eps (the forward still divides by max(|v|, eps)). Replaces 1/clamp_norm in
// A = dL/ds / (|q| |m_i|), so an all-zero block or item gives a finite gradient in every dtype.
template <typename T>
DAAD_HD T grad_inv_norm(T norm) {
  return norm >= T(kNormEps) ? T(1) / norm : T(0);
}

// d/dq of max(|q|, eps) is zero below the floor, so the norm's correction term vanishes there.
template <typename T>
DAAD_HD T norm_correction(T norm, T dot) {
  return norm >= T(kNormEps) ? dot / (norm * norm) : T(0);
}

// 0 for a number and NaN for NaN: what the reference's multiplication by a 0/1 mask (or relu)
// gives, so that a NaN row stays NaN through the shrinkage (a plain T(0) would hide it).
template <typename T>
DAAD_HD T zero_keeping_nan(T v) {
  return v == v ? T(0) : v;
}

// MemAE's continuous hard shrinkage u(p) and its derivative du/dp (zero at and below threshold).
template <typename T>
DAAD_HD T memae_shrink(T p, T threshold) {
  const T a = p - threshold;
  return a > T(0) ? a * p / (a + T(kMemAEEps)) : zero_keeping_nan(a);
}

template <typename T>
DAAD_HD T memae_shrink_grad(T p, T threshold) {
  const T a = p - threshold;
  const T e = T(kMemAEEps);
  return a > T(0) ? (a * a + a * e + p * e) / ((a + e) * (a + e)) : T(0);
}

// exp and log in the precision of T: the C functions, because the host's plain ``exp(float)``
// promotes to double (slower, and not what the device computes).
DAAD_HD float math_exp(float v) { return expf(v); }
DAAD_HD double math_exp(double v) { return exp(v); }
DAAD_HD float math_log(float v) { return logf(v); }
DAAD_HD double math_log(double v) { return log(v); }

// The similarity s_i recovered from the saved weight (w_i, or p_i for MemAE) and the row's lse.
template <typename T>
DAAD_HD T recover_similarity(T weight, T lse, T temperature) {
  return temperature * (math_log(weight) + lse);
}

// A "team" runs one row's epilogue together. It offers three loops over the row's items:
//   for_each(n, f)       calls f(i) for every item i < n,
//   sum(n, f)            returns sum_i f(i),
//   max(n, init, f)      returns max(init, max_i f(i)), ignoring NaN values of f,
// where f may write item i (and only item i) of the row arrays, so the iterations are independent,
// and every member receives the result. The CPU kernel uses ``SerialTeam``: one thread, whose loops
// are OpenMP SIMD loops (the compiler may vectorise them, reductions included, in a fixed order
// per build). The CUDA kernels use a warp (``WarpTeam``, csrc/cuda/common.cuh): lane l takes the
// items l, l + 32, ..., and shuffles combine the partial results.
#if defined(_OPENMP) && !defined(__CUDACC__)
#define DAAD_PRAGMA(text) _Pragma(#text)
#else
#define DAAD_PRAGMA(text)
#endif

struct SerialTeam {
  template <typename F>
  void for_each(int n, F&& f) const {
    DAAD_PRAGMA(omp simd)
    for (int i = 0; i < n; ++i) f(i);
  }

  template <typename F>
  auto sum(int n, F&& f) const -> decltype(f(0)) {
    decltype(f(0)) total = 0;
    DAAD_PRAGMA(omp simd reduction(+ : total))
    for (int i = 0; i < n; ++i) total += f(i);
    return total;
  }

  template <typename T, typename F>
  T max(int n, T init, F&& f) const {
    T result = init;
    DAAD_PRAGMA(omp simd reduction(max : result))
    for (int i = 0; i < n; ++i) {
      const T v = f(i);
      result = v > result ? v : result;
    }
    return result;
  }
};

// Forward epilogue of one row. ``z`` holds the N logits on entry and is overwritten with the
// softmax p. Writes the weights to ``w`` (which may be ``z`` itself, except for MemAE), p to
// ``p_out`` for MemAE when it is not null, and returns the row's lse (see the header comment).
// NaN logits give NaN weights. Every step is branch-free per item, so that it vectorises.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename T, typename Team>
DAAD_HD T row_forward_team(const Team& team, T* z, int n, Shrink shrink, T threshold, T* w, T* p_out) {
  const T zmax = team.max(n, T(-INFINITY), [&](int i) { return z[i]; });
  const T total_e = team.sum(n, [&](int i) { return z[i] = math_exp(z[i] - zmax); });
  const T lse_all = zmax + math_log(total_e);
  const T pmax = team.max(n, T(0), [&](int i) { return z[i] /= total_e; });
  const T* p = z;
  if (shrink == Shrink::None) {
    team.for_each(n, [&](int i) { w[i] = p[i]; });
    return lse_all;
  }
  if (shrink == Shrink::Hard) {
    // Keep p_i >= threshold and the row maximum, so that no row is empty.
    const auto kept_or_zero = [&](int i) {
      const T v = p[i];
      return (v >= threshold) | (v == pmax) ? v : zero_keeping_nan(v);
    };
    const T kept = team.sum(n, kept_or_zero);
    team.for_each(n, [&](int i) { w[i] = kept_or_zero(i) / kept; });
    return lse_all + math_log(kept);
  }
  const T total = team.sum(n, [&](int i) { return w[i] = memae_shrink(p[i], threshold); });
  const T denom = total >= T(kMemAEEps) ? total : T(kMemAEEps);
  team.for_each(n, [&](int i) { w[i] /= denom; });
  if (p_out != nullptr) team.for_each(n, [&](int i) { p_out[i] = p[i]; });
  return lse_all;
}

template <typename T>
DAAD_HD T row_forward(T* z, int n, Shrink shrink, T threshold, T* w, T* p_out) {
  return row_forward_team(SerialTeam{}, z, n, shrink, threshold, w, p_out);
}

// Backward epilogue of one row. ``g`` holds dL/dw on entry and dL/ds on exit. ``p`` is the saved
// softmax (MemAE only; ignored otherwise). Returns rowdot = sum_i dL/ds_i * s_i and, when
// ``gs_times_s`` is not null, writes each product there (for the per-item sums of the cosine
// backward). Items with zero weight have dL/ds_i = 0 and contribute nothing.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename T, typename Team>
DAAD_HD T row_backward_team(const Team& team, T* g, const T* w, const T* p, int n, Shrink shrink,
                            T threshold, T temperature, T lse, T* gs_times_s) {
  const T gw_dot = team.sum(n, [&](int i) { return g[i] * w[i]; });
  const T* weight = w;  // the weights whose log recovers z
  if (shrink == Shrink::MemAE) {
    const T total = team.sum(n, [&](int i) { return memae_shrink(p[i], threshold); });
    const T gp_dot = team.sum(n, [&](int i) {
      const T gu = total >= T(kMemAEEps) ? (g[i] - gw_dot) / total : g[i] / T(kMemAEEps);
      g[i] = gu * memae_shrink_grad(p[i], threshold);  // dL/dp
      return g[i] * p[i];
    });
    team.for_each(n, [&](int i) { g[i] = p[i] * (g[i] - gp_dot) / temperature; });
    weight = p;
  } else {
    team.for_each(n, [&](int i) { g[i] = w[i] * (g[i] - gw_dot) / temperature; });
  }
  return team.sum(n, [&](int i) {
    const T prod = weight[i] > T(0) ? g[i] * recover_similarity(weight[i], lse, temperature) : T(0);
    if (gs_times_s != nullptr) gs_times_s[i] = prod;
    return prod;
  });
}

template <typename T>
DAAD_HD T row_backward(T* g, const T* w, const T* p, int n, Shrink shrink, T threshold, T temperature,
                       T lse, T* gs_times_s) {
  return row_backward_team(SerialTeam{}, g, w, p, n, shrink, threshold, temperature, lse, gs_times_s);
}

}  // namespace daad_ext
