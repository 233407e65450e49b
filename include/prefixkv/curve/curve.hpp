//! \file prefixkv/curve/curve.hpp
//! Protected tokens and per-segment cumulative-importance curves: the contract between the scorers (which
//! produce score rows), the curve builders (host twin here, CUDA in curve.cuh) and the solver.
//!
//! For a segment of n tokens with scores x_0..x_{n-1}:
//! * protected tokens are positions [0, sinks) and [n - recent, n) (overlaps merged, clipped to n); they are
//!   always kept and never ranked;
//! * the candidates (all other positions) are ranked by score descending, ties by position ascending:
//!   y_0 >= y_1 >= ... (rank r is 0-based here);
//! * cumulative[r] = (y_0 + ... + y_r) / M with M = sum of candidate scores; when M == 0, cumulative[r] =
//!   (r + 1) / |C|.
//! The entry value of rank r (the fraction of the mass held before it) is `entry_value(cumulative, r)` =
//! 0 for r == 0, cumulative[r - 1] otherwise.
//!
//! \code
//! std::vector<float> scores = {9, 1, 5, 3, 7, 2, 8};        // one segment of 7 tokens
//! prefixkv::curve_buffers c;
//! auto e = prefixkv::build_curves_host(scores.data(), prefixkv::make_uniform_segments(1, 7),
//!                                      prefixkv::protect_policy{1, 1}, c);
//! // candidates are positions 1..5, ranked 4 (7), 2 (5), 3 (3), 5 (2), 1 (1)
//! \endcode
#pragma once

#include "../core/checked.hpp"
#include "../core/error.hpp"
#include "../core/validate.hpp"
#include "../core/views.hpp"

#include <algorithm>
#include <climits>
#include <cmath>
#include <numeric>
#include <vector>

PREFIXKV_NAMESPACE_BEGIN

//! Which tokens of every segment are always kept: the first `sinks` (attention sinks) and the last `recent`.
//! Defaults are the paper's: 4 sinks, 1 recent token.
struct protect_policy {
  int64_t sinks = 4;
  int64_t recent = 1;
};

//! Number of protected tokens of a segment of n tokens.
//! (Overflow-free for every n >= 0 and every policy, INT64_MAX included; 0 for n <= 0.)
PREFIXKV_HOST_DEVICE int64_t protected_count(int64_t n, protect_policy p) {
  if (n <= 0) return 0;
  const int64_t a = p.sinks <= 0 ? 0 : (p.sinks < n ? p.sinks : n);
  const int64_t b = p.recent <= 0 ? 0 : (p.recent < n ? p.recent : n);
  return a < n - b ? a + b : n;
}
//! Number of candidates (ranked, evictable tokens) of a segment of n tokens.
PREFIXKV_HOST_DEVICE int64_t candidate_count(int64_t n, protect_policy p) { return n - protected_count(n, p); }
//! Whether position t of a segment of n tokens is protected.
PREFIXKV_HOST_DEVICE bool is_protected(int64_t t, int64_t n, protect_policy p) {
  return t < p.sinks || (p.recent > 0 && t >= n - p.recent);  // (n >= 0: n - recent cannot overflow)
}
//! Entry value of 0-based rank r of a curve row.
PREFIXKV_HOST_DEVICE float entry_value(const float* cumulative_row, int64_t r) {
  return r == 0 ? 0.0f : cumulative_row[r - 1];
}

//! Sorted candidates of S ragged segments and their curves, in flat arrays.
//! Rank r of segment s sits at flat index `offsets[s] + r`, for r < offsets[s+1] - offsets[s] = |C_s|.
struct curve_set {
  int64_t count = 0;                 //!< segments S
  const int64_t* offsets = nullptr;  //!< (S + 1) candidate offsets, offsets[0] == 0
  const int64_t* tokens = nullptr;   //!< (S) tokens n_s of each segment, protected included
  const int32_t* positions = nullptr;  //!< (total candidates) token position of each rank
  const float* cumulative = nullptr;   //!< (total candidates) normalised inclusive prefix sum
  const float* sorted_scores = nullptr;  //!< (total candidates) the ranked scores (optional; may be null)
  protect_policy protect{};
};

//! Owning host storage for a curve_set (host twin outputs, tests, the CLI).
struct curve_buffers {
  std::vector<int64_t> offsets, tokens;
  std::vector<int32_t> positions;
  std::vector<float> cumulative, sorted_scores;
  protect_policy protect{};
  curve_set view() const {
    curve_set c;
    c.count = static_cast<int64_t>(tokens.size());
    c.offsets = offsets.data();
    c.tokens = tokens.data();
    c.positions = positions.data();
    c.cumulative = cumulative.data();
    c.sorted_scores = sorted_scores.data();
    c.protect = protect;
    return c;
  }
};

namespace detail {
//! The order of the prefix sums (host and device sum in exactly this order, so their curves are bit-identical):
//! ranks form chunks of `curve_chunk` consecutive ranks, and chunks form groups of `curve_group` chunks, from rank 0.
inline constexpr int64_t curve_chunk = 8;
inline constexpr int64_t curve_group = 32;  // chunks per group (256 ranks)

//! The normalised inclusive prefix sums of one ranked row `y` (c values), in the order that defines them:
//! with p = the running sum inside a chunk, C = the running sum of the earlier chunks' sums inside the group, and
//! G = the running sum of the earlier groups' totals (each started at 0.0 and summed left to right in double),
//! the prefix of rank r is G + (C + p), the mass M is G over all groups, and cumulative[r] = float(prefix / M)
//! (or (r + 1) / c when M == 0). The last value of every non-empty row is exactly 1.
inline void curve_prefix_host(const float* y, int64_t c, float* cumulative) noexcept {
  const int64_t gsize = curve_chunk * curve_group;
  double mass = 0.0;
  for (int64_t g0 = 0; g0 < c; g0 += gsize) {
    double total = 0.0;
    for (int64_t c0 = g0; c0 < c && c0 < g0 + gsize; c0 += curve_chunk) {
      double part = 0.0;
      for (int64_t r = c0; r < c && r < c0 + curve_chunk; ++r) part += static_cast<double>(y[r]);
      total += part;
    }
    mass += total;
  }
  double G = 0.0;
  for (int64_t g0 = 0; g0 < c; g0 += gsize) {
    double C = 0.0;
    for (int64_t c0 = g0; c0 < c && c0 < g0 + gsize; c0 += curve_chunk) {
      double p = 0.0;
      for (int64_t r = c0; r < c && r < c0 + curve_chunk; ++r) {
        p += static_cast<double>(y[r]);
        const double run = G + (C + p);
        cumulative[r] = static_cast<float>(mass > 0.0 ? run / mass : static_cast<double>(r + 1) / static_cast<double>(c));
      }
      C += p;
    }
    G += C;
  }
}
}  // namespace detail

//! Reject a protect policy with negative counts.
[[nodiscard]] inline cudaError_t validate(protect_policy p) noexcept {
  if (p.sinks < 0 || p.recent < 0)
    return detail::fail(reason::bad_parameter, "protect_policy: sinks and recent must be >= 0");
  return cudaSuccess;
}

namespace detail {
inline cudaError_t build_curves_host_impl(const float* scores, const segments& rows, protect_policy protect,
                                          curve_buffers& out) {
  PREFIXKV_TRY(validate_host_contents(rows));
  PREFIXKV_TRY(validate(protect));
  const int64_t S = rows.count;
  // 1. validate everything (lengths, scores, total candidates) before allocating anything
  checked_i64 total = 0;
  const bool uniform = rows.offsets == nullptr;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = rows.length(s);
    if (n > INT32_MAX) return fail(reason::out_of_range, "build_curves: a row is longer than int32 positions allow");
    if (n > 0 && scores == nullptr) return fail(reason::null_pointer, "build_curves: scores is null");
    if (uniform && n == 0) break;  // S empty rows: nothing to read (S alone may be absurd; see the allocation)
    if (n == 0) continue;
    const float* row = scores + rows.begin(s);
    for (int64_t t = 0; t < n; ++t) {
      const float x = row[t];
      if (!std::isfinite(x)) return fail(reason::nonfinite_input, "build_curves: a score is NaN or infinite");
      if (x < 0.0f) return fail(reason::negative_input, "build_curves: a score is negative (scores must be >= 0)");
    }
    if (!uniform) total += candidate_count(n, protect);
  }
  if (uniform) total = checked_i64(S) * candidate_count(rows.uniform_length, protect);
  if (!total.ok() || !(checked_i64(S) + 1).ok())
    return fail(reason::capacity_exceeded, "build_curves: the total candidate count overflows int64");
  // 2. allocate and fill (out is replaced only on success)
  curve_buffers b;
  if (static_cast<uint64_t>(S) >= b.offsets.max_size() || static_cast<uint64_t>(total.value()) >= b.positions.max_size())
    return fail(reason::capacity_exceeded, "build_curves: the curves would not fit host memory", cudaErrorMemoryAllocation);
  b.protect = protect;
  b.offsets.assign(static_cast<size_t>(S) + 1, 0);
  b.tokens.assign(static_cast<size_t>(S), 0);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = rows.length(s);
    b.tokens[s] = n;
    b.offsets[s + 1] = b.offsets[s] + candidate_count(n, protect);
  }
  const size_t count = static_cast<size_t>(total.value());
  b.positions.resize(count);
  b.cumulative.resize(count);
  b.sorted_scores.resize(count);
  std::vector<int32_t> order;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = b.tokens[s];
    const float* row = n > 0 ? scores + rows.begin(s) : nullptr;
    order.clear();
    for (int64_t t = 0; t < n; ++t)
      if (!is_protected(t, n, protect)) order.push_back(static_cast<int32_t>(t));
    std::stable_sort(order.begin(), order.end(), [row](int32_t a, int32_t c) { return row[a] > row[c]; });
    const int64_t base = b.offsets[s], c = static_cast<int64_t>(order.size());
    for (int64_t r = 0; r < c; ++r) {
      b.positions[base + r] = order[r];
      b.sorted_scores[base + r] = row[order[r]] == 0.0f ? 0.0f : row[order[r]];  // -0 -> +0, as on the device
    }
    curve_prefix_host(b.sorted_scores.data() + base, c, b.cumulative.data() + base);
  }
  out = std::move(b);
  return cudaSuccess;
}
}  // namespace detail

//! Host twin of the curve builder. `scores` is a flat host array addressed through `rows` (host offsets).
//! Scores must be finite and >= 0: NaN or infinity is `reason::nonfinite_input`, a negative score (-0.0 counts
//! as 0) is `reason::negative_input`. Rows longer than INT32_MAX tokens are `reason::out_of_range`, a total
//! candidate count beyond int64 `reason::capacity_exceeded`. Everything is validated before anything is
//! allocated; `out` is replaced only on success; running out of host memory returns `cudaErrorMemoryAllocation`
//! (`reason::capacity_exceeded`). Prefix sums accumulate in double and are stored as float.
[[nodiscard]] inline cudaError_t build_curves_host(const float* scores, const segments& rows, protect_policy protect,
                                                   curve_buffers& out) noexcept {
  try {
    return detail::build_curves_host_impl(scores, rows, protect, out);
  } catch (...) {
    return detail::fail(reason::capacity_exceeded, "build_curves: out of host memory", cudaErrorMemoryAllocation);
  }
}

PREFIXKV_NAMESPACE_END
