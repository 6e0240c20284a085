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
//   memae:      u_i = relu(p_i - lam) p_i / (|p_i - lam| + eps),  S = sum u,  w = u / max(S, eps)
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

// Floors of the cosine norms and of MemAE's |p - lam| and row sum (as in the reference).
constexpr double kNormEps = 1e-12;
constexpr double kMemAEEps = 1e-12;

template <typename T>
DAAD_HD T clamp_norm(T norm) {
  return norm >= T(kNormEps) ? norm : T(kNormEps);
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

// MemAE's continuous hard shrinkage u(p) and its derivative du/dp (zero at and below lam).
template <typename T>
DAAD_HD T memae_shrink(T p, T lam) {
  const T a = p - lam;
  return a > T(0) ? a * p / (a + T(kMemAEEps)) : zero_keeping_nan(a);
}

template <typename T>
DAAD_HD T memae_shrink_grad(T p, T lam) {
  const T a = p - lam;
  const T e = T(kMemAEEps);
  return a > T(0) ? (a * a + a * e + p * e) / ((a + e) * (a + e)) : T(0);
}

// The similarity s_i recovered from the saved weight (w_i, or p_i for MemAE) and the row's lse.
template <typename T>
DAAD_HD T recover_similarity(T weight, T lse, T temperature) {
  return temperature * (log(weight) + lse);
}

// A "team" runs one row's epilogue together: member ``rank()`` of ``size()`` handles the items
// i = rank, rank + size, ... and ``sum``/``max`` combine one value from every member and return the
// result to all of them. The CPU kernel uses ``SerialTeam`` (one member, identity reductions: the
// plain loops); the CUDA kernels use a warp (csrc/cuda/common.cuh) with shuffle reductions. Each
// member only ever reads and writes its own items, so the row arrays need no synchronisation.
struct SerialTeam {
  DAAD_HD int rank() const { return 0; }
  DAAD_HD int size() const { return 1; }
  template <typename T>
  DAAD_HD T sum(T v) const { return v; }
  template <typename T>
  DAAD_HD T max(T v) const { return v; }
};

// Forward epilogue of one row. ``z`` holds the N logits on entry and is overwritten with the
// softmax p. Writes the weights to ``w`` (and p to ``p_out`` for MemAE, when not null) and
// returns the row's lse (see the header comment). NaN logits give NaN weights.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename T, typename Team>
DAAD_HD T row_forward_team(const Team& team, T* z, int n, Shrink shrink, T lam, T* w, T* p_out) {
  const int first = team.rank(), step = team.size();
  T zmax = T(-INFINITY);
  for (int i = first; i < n; i += step) zmax = z[i] > zmax ? z[i] : zmax;
  zmax = team.max(zmax);
  T sum = T(0);
  for (int i = first; i < n; i += step) {
    z[i] = exp(z[i] - zmax);
    sum += z[i];
  }
  sum = team.sum(sum);
  const T lse_all = zmax + log(sum);
  T pmax = T(0);
  for (int i = first; i < n; i += step) {
    z[i] /= sum;
    pmax = z[i] > pmax ? z[i] : pmax;
  }
  pmax = team.max(pmax);
  const T* p = z;
  if (shrink == Shrink::None) {
    for (int i = first; i < n; i += step) w[i] = p[i];
    return lse_all;
  }
  if (shrink == Shrink::Hard) {
    // Keep p_i >= lam and the row maximum, so that no row is empty.
    T kept = T(0);
    for (int i = first; i < n; i += step)
      kept += (p[i] >= lam || p[i] == pmax) ? p[i] : zero_keeping_nan(p[i]);
    kept = team.sum(kept);
    for (int i = first; i < n; i += step)
      w[i] = (p[i] >= lam || p[i] == pmax) ? p[i] / kept : zero_keeping_nan(p[i]);
    return lse_all + log(kept);
  }
  T total = T(0);
  for (int i = first; i < n; i += step) {
    w[i] = memae_shrink(p[i], lam);
    total += w[i];
  }
  total = team.sum(total);
  const T denom = total >= T(kMemAEEps) ? total : T(kMemAEEps);
  for (int i = first; i < n; i += step) w[i] /= denom;
  if (p_out != nullptr)
    for (int i = first; i < n; i += step) p_out[i] = p[i];
  return lse_all;
}

template <typename T>
DAAD_HD T row_forward(T* z, int n, Shrink shrink, T lam, T* w, T* p_out) {
  return row_forward_team(SerialTeam{}, z, n, shrink, lam, w, p_out);
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
                            T lam, T temperature, T lse, T* gs_times_s) {
  const int first = team.rank(), step = team.size();
  T gw_dot = T(0);
  for (int i = first; i < n; i += step) gw_dot += g[i] * w[i];
  gw_dot = team.sum(gw_dot);
  const T* weight = w;  // the weights whose log recovers z
  if (shrink == Shrink::MemAE) {
    T total = T(0);
    for (int i = first; i < n; i += step) total += memae_shrink(p[i], lam);
    total = team.sum(total);
    T gp_dot = T(0);
    for (int i = first; i < n; i += step) {
      const T gu = total >= T(kMemAEEps) ? (g[i] - gw_dot) / total : g[i] / T(kMemAEEps);
      g[i] = gu * memae_shrink_grad(p[i], lam);  // dL/dp
      gp_dot += g[i] * p[i];
    }
    gp_dot = team.sum(gp_dot);
    for (int i = first; i < n; i += step) g[i] = p[i] * (g[i] - gp_dot) / temperature;
    weight = p;
  } else {
    for (int i = first; i < n; i += step) g[i] = w[i] * (g[i] - gw_dot) / temperature;
  }
  T rowdot = T(0);
  for (int i = first; i < n; i += step) {
    const T prod = weight[i] > T(0) ? g[i] * recover_similarity(weight[i], lse, temperature) : T(0);
    rowdot += prod;
    if (gs_times_s != nullptr) gs_times_s[i] = prod;
  }
  return team.sum(rowdot);
}

template <typename T>
DAAD_HD T row_backward(T* g, const T* w, const T* p, int n, Shrink shrink, T lam, T temperature,
                       T lse, T* gs_times_s) {
  return row_backward_team(SerialTeam{}, g, w, p, n, shrink, lam, temperature, lse, gs_times_s);
}

}  // namespace daad_ext
