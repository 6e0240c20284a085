// The CUDA kernels of the block-wise memory operator (launched from block_memory_cuda.cu).
//
// Notation: R = B*Q query rows, N items, D = block length; "partial" buffers are float32.
//
// Forward (3 launches after the per-call item norms):
//   sim_kernel          S_part[z] = Q[:, Dz] @ M[:, Dz]^T for the z-th slice Dz of D, and the
//                       partial |q|^2 of every row over Dz. Q is gathered from NCHW x.
//   row_forward_kernel  one warp per row: S = sum_z S_part[z] (fixed order), cosine scaling,
//                       temperature, then row_forward_team (csrc/block_memory.h): softmax,
//                       shrinkage, re-normalisation. Stores w, p (MemAE), (|q|, lse).
//   times_memory_kernel y = w @ M, written straight into NCHW y.
// Backward (up to 5 launches):
//   sim_kernel          GW_part[z] = G[:, Dz] @ M[:, Dz]^T, G gathered from NCHW grad_y.
//   row_backward_kernel one warp per row: dL/dw = sum_z GW_part[z] + grad_w, then
//                       row_backward_team: dL/ds, rowdot = sum_i dL/ds_i s_i. Stores
//                       A = dL/ds / (|q||m_i|) (cosine) or dL/ds (dot) in float32, the products
//                       dL/ds_i s_i (cosine) and coef_q = rowdot / |q|^2. A is unbounded where
//                       the norms are small (fp16 would overflow its 65504 where grad_x itself
//                       is representable), so the products that read A run on float tiles: TF32
//                       tensor cores, which hold fp16 and bf16 operands exactly.
//   coldot_kernel       coef_m[i] = sum_r (dL/ds s)[r, i] / |m_i|^2 (cosine only).
//   times_memory_kernel grad_x = A @ M - coef_q * q, written straight into NCHW grad_x.
//   gm_kernel           grad_M = w^T @ G + A^T @ Q - coef_m * M (float tiles, as it reads A):
//                       each CTA owns a tile of items x
//                       D and reduces over all R rows itself, so grad_M needs no atomics and is
//                       bitwise reproducible.
#pragma once

#include "common.cuh"

namespace daad_ext {
namespace cuda {

// S_part[blockIdx.z] tile (rows m0.., items n0..) over the D slice [k_begin, k_end); with ``qsq``,
// the CTAs of the first item tile also store the slice's |q|^2 of their rows.
template <typename E, bool kTC, class LQ>
__global__ void __launch_bounds__(kThreads)
    sim_kernel(LQ queries, RowMajor<E> memory, int rows, int items, int dim, int k_chunk,
               float* __restrict__ partial, float* __restrict__ qsq) {
  DAAD_SHARED_ARRAY(unsigned char, smem, tile_smem_bytes<E>());
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int k_begin = blockIdx.z * k_chunk;
  const int k_end = min(dim, k_begin + k_chunk);
  TileGemm<E, kTC> gemm;
  gemm.zero();
  gemm.accumulate(smem, queries, memory, m0, n0, k_begin, k_end);
  gemm.store(smem);
  float* out = partial + int64_t(blockIdx.z) * rows * items;
  for_tile_elements(smem, m0, n0, rows, items,
                    [&](int r, int n, float v) { out[int64_t(r) * items + n] = v; });
  if (qsq != nullptr && blockIdx.y == 0) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int rr = warp; rr < BM; rr += kWarps) {
      const int r = m0 + rr;
      if (r >= rows) break;  // uniform over the warp
      float s = 0.f;
      for (int k = k_begin + lane; k < k_end; k += 32) {
        const float v = queries(r, k);
        s = fmaf(v, v, s);
      }
      s = warp_sum(s);
      if (lane == 0) qsq[int64_t(blockIdx.z) * rows + r] = s;
    }
  }
}

// |m_i| for every item: one warp per item.
template <typename E>
__global__ void __launch_bounds__(kThreads)
    item_norms_kernel(const E* __restrict__ memory, int items, int dim, float* __restrict__ norms) {
  const int i = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (i >= items) return;
  const E* m = memory + int64_t(i) * dim;
  float s = 0.f;
  for (int d = lane; d < dim; d += 32) {
    const float v = to_float(m[d]);
    s = fmaf(v, v, s);
  }
  s = warp_sum(s);
  if (lane == 0) norms[i] = sqrtf(s);
}

// One warp per query row: reduce the similarity slices, scale, run the shared row epilogue.
// ``partial`` slice 0 is overwritten with the logits, then the softmax; ``wbuf`` (R x N) takes the
// float weights. Every lane touches only its own items (i = lane mod 32) outside the team's
// shuffle reductions, so no other synchronisation is needed.
template <typename E>
__global__ void __launch_bounds__(kThreads)
    row_forward_kernel(float* __restrict__ partial, int splits, const float* __restrict__ qsq,
                       const float* __restrict__ item_norms, int rows, int items, bool cosine,
                       Shrink shrink, float threshold, float temperature, float* __restrict__ wbuf,
                       E* __restrict__ w_out, E* __restrict__ p_out, float* __restrict__ stats) {
  const int r = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (r >= rows) return;  // uniform over the warp
  const int64_t row_offset = int64_t(r) * items;
  const int64_t slice = int64_t(rows) * items;
  float qn2 = 0.f;
  for (int z = 0; z < splits; ++z) qn2 += qsq[int64_t(z) * rows + r];
  const float qn = sqrtf(qn2);
  const float cq = clamp_norm(qn);
  float* zrow = partial + row_offset;
  for (int i = lane; i < items; i += 32) {
    float s = zrow[i];
    for (int z = 1; z < splits; ++z) s += partial[z * slice + row_offset + i];
    if (cosine) s = s / (cq * clamp_norm(item_norms[i]));
    zrow[i] = s / temperature;
  }
  float* wrow = wbuf + row_offset;
  const float lse = row_forward_team(WarpTeam{lane}, zrow, items, shrink, threshold, wrow,
                                     static_cast<float*>(nullptr));
  for (int i = lane; i < items; i += 32) {
    w_out[row_offset + i] = from_float<E>(wrow[i]);
    if (p_out != nullptr) p_out[row_offset + i] = from_float<E>(zrow[i]);  // zrow holds p now
  }
  if (lane == 0) {
    stats[2 * int64_t(r)] = qn;
    stats[2 * int64_t(r) + 1] = lse;
  }
}

// One warp per query row: dL/dw, the shared row backward, and the per-row terms of the products.
// ``gpart``: the G @ M^T slices when ``splits`` > 0 (slice 0 is overwritten), else an R x N
// scratch. ``wbuf``/``pbuf``: R x N float scratch for the saved w / p. ``prod`` (cosine): R x N
// products dL/ds_i * s_i. ``a_out``: R x N float32, the left operand of grad_x = A @ M and of
// A^T @ Q.
template <typename E>
__global__ void __launch_bounds__(kThreads)
    row_backward_kernel(float* __restrict__ gpart, int splits, const E* __restrict__ grad_w,
                        const E* __restrict__ w, const E* __restrict__ probs,
                        const float* __restrict__ stats, const float* __restrict__ item_norms,
                        int rows, int items, bool cosine, Shrink shrink, float threshold,
                        float temperature, float* __restrict__ wbuf, float* __restrict__ pbuf,
                        float* __restrict__ prod, float* __restrict__ a_out,
                        float* __restrict__ coef_q) {
  const int r = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (r >= rows) return;  // uniform over the warp
  const int64_t row_offset = int64_t(r) * items;
  const int64_t slice = int64_t(rows) * items;
  float* g = gpart + row_offset;
  float* wf = wbuf + row_offset;
  float* pf = pbuf != nullptr ? pbuf + row_offset : nullptr;
  for (int i = lane; i < items; i += 32) {
    float gi = 0.f;
    for (int z = 0; z < splits; ++z) gi += gpart[z * slice + row_offset + i];
    if (grad_w != nullptr) gi += to_float(grad_w[row_offset + i]);
    g[i] = gi;
    wf[i] = to_float(w[row_offset + i]);
    if (pf != nullptr) pf[i] = to_float(probs[row_offset + i]);
  }
  const float qn = stats[2 * int64_t(r)], lse = stats[2 * int64_t(r) + 1];
  const float rowdot = row_backward_team(WarpTeam{lane}, g, static_cast<const float*>(wf),
                                         static_cast<const float*>(pf), items, shrink, threshold,
                                         temperature, lse, cosine ? prod + row_offset : nullptr);
  const float iq = grad_inv_norm(qn);
  for (int i = lane; i < items; i += 32) {
    a_out[row_offset + i] = cosine ? g[i] * iq * grad_inv_norm(item_norms[i]) : g[i];
  }
  if (cosine && lane == 0) coef_q[r] = norm_correction(qn, rowdot);
}

// coef_m[i] = (sum_r prod[r, i]) / |m_i|^2 (zero where |m_i| is below the floor), summed over r in
// order by one thread per item.
__global__ void __launch_bounds__(kThreads)
    coldot_kernel(const float* __restrict__ prod, int rows, int items,
                  const float* __restrict__ item_norms, float* __restrict__ coef_m) {
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i >= items) return;
  float s = 0.f;
  for (int r = 0; r < rows; ++r) s += prod[int64_t(r) * items + i];
  coef_m[i] = norm_correction(item_norms[i], s);
}

// Output tile (rows m0.., columns d0.. of the block matrix) = L @ M, minus coef_q[r] * q where
// ``coef_q`` is given, stored straight into NCHW ``out``: y = w @ M in the forward, and
// grad_x = A @ M - coef_q * q in the backward. The tiles hold the type T of L (E for w, float
// for A).
template <typename T, bool kTC, typename E>
__global__ void __launch_bounds__(kThreads)
    times_memory_kernel(RowMajor<T> a, Transposed<RowMajor<E>> memory_t, BlockLoad<E> queries,
                        const float* __restrict__ coef_q, BlockTable out_blocks,
                        E* __restrict__ out, int items) {
  DAAD_SHARED_ARRAY(unsigned char, smem, tile_smem_bytes<T>());
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  TileGemm<T, kTC> gemm;
  gemm.zero();
  gemm.accumulate(smem, a, memory_t, m0, n0, 0, items);
  gemm.store(smem);
  for_tile_elements(smem, m0, n0, out_blocks.rows, out_blocks.dim, [&](int r, int d, float v) {
    if (coef_q != nullptr) v -= coef_q[r] * queries(r, d);
    out[out_blocks.offset(r, d)] = from_float<E>(v);
  });
}

// grad_M tile (items m0.., columns d0..) = w^T @ G + A^T @ Q - coef_m * M, reduced over all rows
// by this CTA alone (deterministic), on float tiles (A is float32).
template <typename E, bool kTC>
__global__ void __launch_bounds__(kThreads)
    gm_kernel(Transposed<RowMajor<E>> w_t, Transposed<BlockLoad<E>> grad_y_t, bool has_grad_y,
              Transposed<RowMajor<float>> a_t, Transposed<BlockLoad<E>> queries_t,
              const float* __restrict__ coef_m, RowMajor<E> memory, E* __restrict__ grad_m) {
  DAAD_SHARED_ARRAY(unsigned char, smem, tile_smem_bytes<float>());
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int rows = a_t.inner.rows;
  TileGemm<float, kTC> gemm;
  gemm.zero();
  if (has_grad_y) gemm.accumulate(smem, w_t, grad_y_t, m0, n0, 0, rows);
  gemm.accumulate(smem, a_t, queries_t, m0, n0, 0, rows);
  gemm.store(smem);
  for_tile_elements(smem, m0, n0, memory.rows, memory.cols, [&](int i, int d, float v) {
    if (coef_m != nullptr) v -= coef_m[i] * memory(i, d);
    grad_m[int64_t(i) * memory.cols + d] = from_float<E>(v);
  });
}

}  // namespace cuda
}  // namespace daad_ext
