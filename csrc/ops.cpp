// Schemas of the daad_ext custom ops. The CPU and CUDA implementations register themselves with
// TORCH_LIBRARY_IMPL in their own files; fake tensors and autograd live in daad_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(daad_ext, m) {
  // Returns (y, w, probs, row_stats, item_norms): probs is the softmax for shrink == "memae" (its
  // backward needs it) and an empty tensor otherwise; row_stats (B, Q, 2) holds each query's norm
  // |q| and lse (see block_memory.h); item_norms (N) holds |m_i|. Statistics are float32 for
  // half-precision inputs and of the input dtype otherwise.
  m.def(
      "block_memory_forward(Tensor x, Tensor memory, int rh, int rw, int rc, str similarity, "
      "str shrink, float threshold, float temperature) -> "
      "(Tensor y, Tensor w, Tensor probs, Tensor row_stats, Tensor item_norms)");
  // Computes grad_x only when needs_grad_x and grad_memory only when needs_grad_memory; a gradient
  // not computed is returned as an empty tensor of shape (0,), x's dtype and device.
  m.def(
      "block_memory_backward(Tensor? grad_y, Tensor? grad_w, Tensor x, Tensor memory, Tensor w, "
      "Tensor probs, Tensor row_stats, Tensor item_norms, int rh, int rw, int rc, str similarity, "
      "str shrink, float threshold, float temperature, bool needs_grad_x, bool needs_grad_memory) -> "
      "(Tensor grad_x, Tensor grad_memory)");
}
