// Test-only: an independent brute-force oracle for the global prefix solver, and score generators.
// The oracle materialises every entry value, sorts the eligible ones globally by (e, s, r) and takes the first
// R; it shares nothing with the solver but `curve_set` and `entry_value`.
#pragma once

#include <prefixkv/curve/curve.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <tuple>
#include <vector>

namespace prefixkv_test {

struct oracle_result {
  bool ok = false;                // false: infeasible / invalid
  std::vector<int64_t> keep;      // tokens kept per segment (protected included)
  float threshold = 0.0f;         // entry value of the R-th pick, 0 when R == 0
};

// budget: kind 0 = evict ratio r, 1 = keep tokens T, 2 = keep candidates.
inline oracle_result oracle_solve(const prefixkv::curve_set& cv, int64_t s0, int64_t s1, int kind, double ratio,
                                  int64_t count, int64_t min_keep = 0, int64_t max_keep = INT64_MAX,
                                  const int64_t* lo_arr = nullptr, const int64_t* hi_arr = nullptr) {
  oracle_result out;
  int64_t N = 0, C = 0, sum_lo = 0, sum_hi = 0;
  std::vector<int64_t> lo(s1 - s0), hi(s1 - s0);
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t c = cv.offsets[s + 1] - cv.offsets[s];
    int64_t l = lo_arr ? lo_arr[s] : min_keep, h = hi_arr ? hi_arr[s] : max_keep;
    if (l < 0 || h < l) return out;
    l = std::min(l, c);
    h = std::min(h, c);
    lo[s - s0] = l;
    hi[s - s0] = h;
    N += cv.tokens[s];
    C += c;
    sum_lo += l;
    sum_hi += h;
  }
  int64_t B;
  if (kind == 0) {
    if (!(ratio >= 0 && ratio < 1)) return out;
    const double E = std::nearbyint(ratio * double(N));
    if (E > double(C)) return out;
    B = C - int64_t(E);
  } else if (kind == 1) {
    B = count - (N - C);
    if (B < 0 || B > C) return out;
  } else {
    B = count;
    if (B < 0 || B > C) return out;
  }
  if (B < sum_lo || B > sum_hi) return out;
  std::vector<std::tuple<float, int64_t, int64_t>> pool;
  std::vector<int64_t> k(lo);
  for (int64_t s = s0; s < s1; ++s) {
    const float* row = cv.cumulative + cv.offsets[s];
    for (int64_t r = lo[s - s0]; r < hi[s - s0]; ++r) {
      float e = r == 0 ? 0.0f : row[r - 1];
      if (e == 0.0f) e = 0.0f;  // -0 == +0
      pool.emplace_back(e, s, r);
    }
  }
  std::sort(pool.begin(), pool.end());
  const int64_t R = B - sum_lo;
  for (int64_t i = 0; i < R; ++i) k[std::get<1>(pool[i]) - s0]++;
  out.threshold = R > 0 ? std::get<0>(pool[R - 1]) : 0.0f;
  out.keep.resize(s1 - s0);
  for (int64_t s = s0; s < s1; ++s) out.keep[s - s0] = (cv.tokens[s] - (cv.offsets[s + 1] - cv.offsets[s])) + k[s - s0];
  out.ok = true;
  return out;
}

enum class score_kind { uniform, tied, zeros, heavy, onehot, mixed };
inline const char* name(score_kind k) {
  switch (k) {
    case score_kind::uniform: return "uniform";
    case score_kind::tied: return "tied";
    case score_kind::zeros: return "zeros";
    case score_kind::heavy: return "heavy";
    case score_kind::onehot: return "onehot";
    default: return "mixed";
  }
}

// One row of n scores of the given kind.
inline void fill_row(std::mt19937_64& rng, score_kind kind, float* x, int64_t n) {
  std::uniform_real_distribution<double> u(0.0, 1.0);
  if (kind == score_kind::mixed) kind = static_cast<score_kind>(rng() % 5);
  for (int64_t t = 0; t < n; ++t) {
    switch (kind) {
      case score_kind::uniform: x[t] = float(u(rng)); break;
      case score_kind::tied: x[t] = float(rng() % 4); break;
      case score_kind::zeros: x[t] = 0.0f; break;
      case score_kind::heavy: x[t] = float(std::pow(1.0 - u(rng), -1.5) - 1.0); break;
      default: x[t] = 0.0f; break;
    }
  }
  if (kind == score_kind::onehot && n > 0) x[rng() % n] = 1.0f;
}

}  // namespace prefixkv_test
