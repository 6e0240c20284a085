// C++ test of the daad_ext CPU kernel through the dispatcher (run by ctest; see CMakeLists.txt):
// on a tiny input, w's rows are non-negative and sum to 1, y matches a naive loop over blocks and
// items, the backward runs and gives finite gradients of the right shapes, and bad input throws.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <string_view>
#include <tuple>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what);
  if (!ok) ++failures;
}

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, std::string_view,
    std::string_view, double, double);
using Backward = std::tuple<at::Tensor, at::Tensor>(
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    int64_t, int64_t, int64_t, std::string_view, std::string_view, double, double, bool, bool);

}  // namespace

int main() {
  auto forward = c10::Dispatcher::singleton()
                     .findSchemaOrThrow("daad_ext::block_memory_forward", "")
                     .typed<Forward>();
  auto backward = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("daad_ext::block_memory_backward", "")
                      .typed<Backward>();
  at::manual_seed(0);
  const int64_t B = 2, C = 4, H = 6, W = 8, rh = 3, rw = 2, rc = 2, N = 5;
  const int64_t bc = C / rc, bh = H / rh, bw = W / rw, Q = rh * rw * rc, D = bc * bh * bw;
  const at::Tensor x = at::randn({B, C, H, W}, at::kDouble);
  const at::Tensor memory = at::randn({N, D}, at::kDouble);
  const double threshold = 1.0 / N;
  auto [y, w, probs, row_stats, item_norms] =
      forward.call(x, memory, rh, rw, rc, "cosine", "none", threshold, 1.0);

  expect(y.sizes() == x.sizes() && w.sizes() == at::IntArrayRef({B, Q, N}), "output shapes");
  expect(w.min().item<double>() >= 0, "weights are non-negative");
  expect(at::allclose(w.sum(-1), at::ones({B, Q}, at::kDouble)), "weight rows sum to 1");

  // Naive loop: block k = (ic*rh + ih)*rw + iw of image b, flattened in (c, y, x) order.
  auto xa = x.accessor<double, 4>();
  auto ma = memory.accessor<double, 2>();
  auto ya = y.accessor<double, 4>();
  double max_error = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t ic = 0; ic < rc; ++ic)
      for (int64_t ih = 0; ih < rh; ++ih)
        for (int64_t iw = 0; iw < rw; ++iw) {
          const auto value = [&](int64_t d) {
            const int64_t c = d / (bh * bw), yy = d / bw % bh, xx = d % bw;
            return xa[b][ic * bc + c][ih * bh + yy][iw * bw + xx];
          };
          std::vector<double> s(N);
          double qn = 0, smax = -INFINITY, total = 0;
          for (int64_t d = 0; d < D; ++d) qn += value(d) * value(d);
          for (int64_t i = 0; i < N; ++i) {
            double dot = 0, mn = 0;
            for (int64_t d = 0; d < D; ++d) {
              dot += value(d) * ma[i][d];
              mn += ma[i][d] * ma[i][d];
            }
            s[i] = dot / (std::sqrt(qn) * std::sqrt(mn));
            smax = std::max(smax, s[i]);
          }
          for (int64_t i = 0; i < N; ++i) total += std::exp(s[i] - smax);
          for (int64_t d = 0; d < D; ++d) {
            double out = 0;
            for (int64_t i = 0; i < N; ++i) out += std::exp(s[i] - smax) / total * ma[i][d];
            const int64_t c = d / (bh * bw), yy = d / bw % bh, xx = d % bw;
            max_error = std::max(
                max_error, std::abs(out - ya[b][ic * bc + c][ih * bh + yy][iw * bw + xx]));
          }
        }
  std::printf("      max |y - naive| = %.3g\n", max_error);
  expect(max_error < 1e-12, "y matches the naive loop");

  auto [grad_x, grad_memory] =
      backward.call(at::ones_like(y), std::nullopt, x, memory, w, probs, row_stats, item_norms, rh,
                    rw, rc, "cosine", "none", threshold, 1.0, true, true);
  expect(grad_x.sizes() == x.sizes() && grad_memory.sizes() == memory.sizes(), "gradient shapes");
  expect(grad_x.isfinite().all().item<bool>() && grad_memory.isfinite().all().item<bool>(),
         "gradients are finite");

  bool threw = false;
  try {
    forward.call(x, memory, 4, rw, rc, "cosine", "none", threshold, 1.0);  // H = 6 not divisible by 4
  } catch (const c10::Error&) {
    threw = true;
  }
  expect(threw, "bad division throws c10::Error");

  std::printf("%s\n", failures == 0 ? "all passed" : "FAILED");
  return failures == 0 ? 0 : 1;
}
