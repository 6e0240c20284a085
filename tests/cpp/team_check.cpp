// The warp-parallel form of the shared row epilogue (row_forward_team / row_backward_team of
// csrc/block_memory.h) against its serial form (which the CPU kernel runs): each row of random
// logits / gradients runs through both, the team being 32 std::threads (a stand-in for the warp:
// each member owns items rank, rank + 32, ..., and sum/max gather all members' values). Built and
// run by tests/test_cuda.py::test_team_epilogue_matches_serial_epilogue.
#include <barrier>
#include <cmath>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>
#include "block_memory.h"
using namespace daad_ext;

constexpr int kLanes = 32;
struct Shared {
  std::barrier<> sync{kLanes};
  float slots[kLanes];
};
struct ThreadTeam {  // the loops of WarpTeam (csrc/cuda/common.cuh), over threads
  Shared* shared;
  int lane;
  template <typename Op>
  float combine(float v, Op op) const {
    shared->slots[lane] = v;
    shared->sync.arrive_and_wait();
    float r = shared->slots[0];
    for (int i = 1; i < kLanes; ++i) r = op(r, shared->slots[i]);
    shared->sync.arrive_and_wait();  // nobody overwrites a slot before everybody has read it
    return r;
  }
  template <typename F>
  void for_each(int n, F&& f) const {
    for (int i = lane; i < n; i += kLanes) f(i);
  }
  template <typename F>
  float sum(int n, F&& f) const {
    float acc = 0.f;
    for (int i = lane; i < n; i += kLanes) acc += f(i);
    return combine(acc, [](float a, float b) { return a + b; });
  }
  template <typename F>
  float max(int n, float init, F&& f) const {
    float acc = init;
    for (int i = lane; i < n; i += kLanes) {
      const float v = f(i);
      acc = v > acc ? v : acc;
    }
    return combine(acc, [](float a, float b) { return b > a ? b : a; });
  }
};

static bool close(float a, float b) { return std::fabs(a - b) <= 1e-5f + 1e-4f * std::fabs(b); }

int main() {
  std::mt19937 gen(0);
  std::normal_distribution<float> normal(0.f, 1.f);
  int failures = 0, rows = 0;
  for (int n : {1, 5, 31, 32, 33, 100, 257}) {
    for (Shrink shrink : {Shrink::Hard, Shrink::MemAE, Shrink::None}) {
      for (int trial = 0; trial < 4; ++trial, ++rows) {
        const float threshold = 1.f / n, temperature = 0.5f;
        std::vector<float> z(n), g(n);
        for (float& v : z) v = 2.f * normal(gen);
        for (float& v : g) v = normal(gen);
        // serial
        std::vector<float> zs = z, ws(n), ps(n), gs = g, prod_s(n);
        const float lse_s = row_forward(zs.data(), n, shrink, threshold, ws.data(), ps.data());
        const float* p_s = shrink == Shrink::MemAE ? ps.data() : nullptr;
        const float dot_s = row_backward(gs.data(), ws.data(), p_s, n, shrink, threshold, temperature,
                                         lse_s, prod_s.data());
        // team of 32 threads
        std::vector<float> zt = z, wt(n), pt(n), gt = g, prod_t(n);
        float lse_t[kLanes], dot_t[kLanes];
        Shared shared;
        std::vector<std::thread> lanes;
        for (int lane = 0; lane < kLanes; ++lane)
          lanes.emplace_back([&, lane] {
            const ThreadTeam team{&shared, lane};
            lse_t[lane] = row_forward_team(team, zt.data(), n, shrink, threshold, wt.data(), pt.data());
            const float* p_t = shrink == Shrink::MemAE ? pt.data() : nullptr;
            dot_t[lane] = row_backward_team(team, gt.data(), static_cast<const float*>(wt.data()),
                                            p_t, n, shrink, threshold, temperature, lse_t[lane],
                                            prod_t.data());
          });
        for (auto& t : lanes) t.join();
        bool ok = true;
        for (int lane = 0; lane < kLanes; ++lane)
          ok &= lse_t[lane] == lse_t[0] && dot_t[lane] == dot_t[0];
        ok &= close(lse_t[0], lse_s) && close(dot_t[0], dot_s);
        for (int i = 0; i < n; ++i)
          ok &= close(zt[i], zs[i]) && close(wt[i], ws[i]) && close(gt[i], gs[i]) &&
                close(prod_t[i], prod_s[i]) && ((wt[i] > 0) == (ws[i] > 0));
        if (!ok) {
          ++failures;
          std::printf("mismatch: n=%d shrink=%d trial=%d\n", n, int(shrink), trial);
        }
      }
    }
  }
  // A NaN logit makes the whole row NaN, in both forms and every shrink mode (as the reference).
  for (Shrink shrink : {Shrink::Hard, Shrink::MemAE, Shrink::None}) {
    const int n = 40;
    std::vector<float> zs(n, 0.5f), ws(n), zt(n, 0.5f), wt(n);
    zs[7] = zt[7] = NAN;
    row_forward(zs.data(), n, shrink, 0.1f, ws.data(), static_cast<float*>(nullptr));
    Shared shared;
    std::vector<std::thread> lanes;
    for (int lane = 0; lane < kLanes; ++lane)
      lanes.emplace_back([&, lane] {
        row_forward_team(ThreadTeam{&shared, lane}, zt.data(), n, shrink, 0.1f, wt.data(),
                         static_cast<float*>(nullptr));
      });
    for (auto& t : lanes) t.join();
    for (int i = 0; i < n; ++i) {
      if (!std::isnan(ws[i]) || !std::isnan(wt[i])) {
        ++failures;
        std::printf("NaN row: shrink=%d item %d gives %g (serial), %g (team)\n", int(shrink), i,
                    ws[i], wt[i]);
        break;
      }
    }
  }
  std::printf("%d of %d rows differ\n", failures, rows);
  return failures != 0;
}
