//! \file prefixkv/solve/solve.hpp
//! The exact global prefix solver (host twin) and the definitions it shares with the device solver
//! (`prefixkv/solve/solve.cuh`): budgets, per-segment bounds, problems, the ordered key of an entry value.
//!
//! Given the curves of S segments (`curve_set`), grouped into P independent problems (e.g. one per sequence of
//! a ragged batch, each problem = that sequence's layers), the solver decides how many candidates k_s every
//! segment keeps. Within a problem:
//! * B = candidates kept in total, from the budget (evict ratio r: E = round(r * sum n_s), B = sum |C_s| - E;
//!   kept-token budget T: B = T - sum |protected_s|; or B directly);
//! * every segment keeps its lo_s first ranks, then the R = B - sum lo_s smallest keys (e_{s,r}, s, r) among the
//!   ranks r in [lo_s, hi_s) (0-based), where e_{s,r} = entry_value(curve row of s, r).
//! Because e is non-decreasing in r, every segment keeps a prefix of its ranking. This equals "one global
//! threshold p, each segment keeps its shortest prefix holding >= p of its mass", ties broken by (s, r) so that
//! the budget is met exactly (see docs/solver.md).
//!
//! Host and device read the same float entry values and decide with integer arithmetic on their ordered 32-bit
//! keys, so they return identical keep counts for the same `curve_set`.
//!
//! \code
//! prefixkv::curve_buffers c;                 // from build_curves_host (or the GPU curve builder)
//! std::vector<int64_t> keep(c.tokens.size());
//! float p = 0;
//! auto e = prefixkv::solve_host(c.view(), 1, nullptr, prefixkv::budget_evict_ratio(0.5), prefixkv::keep_bounds{},
//!                               keep.data(), &p);
//! // keep[s] = tokens kept in segment s (protected included); p = the global threshold
//! \endcode
#pragma once

#include "../core/checked.hpp"
#include "../core/error.hpp"
#include "../curve/curve.hpp"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

PREFIXKV_NAMESPACE_BEGIN

//! How a problem's budget is given.
enum class budget_kind : int {
  evict_ratio = 0,      //!< evict E = round(r * sum n_s) candidates (r in [0, 1))
  keep_tokens = 1,      //!< keep T tokens in total, protected included
  keep_candidates = 2,  //!< keep B candidates in total (protected not counted)
};

//! The budget of every problem: one value for all problems, or a per-problem array (same memory space as the
//! solver's other inputs: host for `solve_host`, device for `solve`). "round" is round-half-to-even (Python's
//! `round`, the paper's reference code) computed in double: E = rint(r * sum n_s).
struct solve_budget {
  budget_kind kind = budget_kind::evict_ratio;
  double ratio = 0.0;               //!< evict_ratio, when `ratios` is null
  int64_t count = 0;                //!< keep_tokens / keep_candidates, when `counts` is null
  const double* ratios = nullptr;   //!< (P) per-problem evict ratios, or null
  const int64_t* counts = nullptr;  //!< (P) per-problem counts, or null
};

//! Budget: evict round(r * tokens) candidates of every problem.
inline solve_budget budget_evict_ratio(double r) {
  solve_budget b;
  b.kind = budget_kind::evict_ratio;
  b.ratio = r;
  return b;
}
//! Budget: keep T tokens (protected included) in every problem.
inline solve_budget budget_keep_tokens(int64_t t) {
  solve_budget b;
  b.kind = budget_kind::keep_tokens;
  b.count = t;
  return b;
}
//! Budget: keep B candidates in every problem.
inline solve_budget budget_keep_candidates(int64_t c) {
  solve_budget b;
  b.kind = budget_kind::keep_candidates;
  b.count = c;
  return b;
}

//! Per-segment bounds lo_s <= k_s <= hi_s on kept candidates (protected tokens not counted). Per-segment arrays
//! (S entries, null = use the uniform value) override `min_keep` / `max_keep`. Bounds larger than a segment's
//! candidate count are clipped to it (so `min_keep = 8` on a 5-candidate segment keeps all 5); lo_s < 0 or
//! lo_s > hi_s is `reason::infeasible_bounds`, and so is a budget outside [sum lo_s, sum hi_s].
struct keep_bounds {
  int64_t min_keep = 0;
  int64_t max_keep = std::numeric_limits<int64_t>::max();
  const int64_t* lo = nullptr;  //!< (S) or null
  const int64_t* hi = nullptr;  //!< (S) or null
};

namespace detail {

//! Ordered 32-bit key of a float: a < b (as floats) implies key(a) < key(b); -0 and +0 share a key; NaNs order
//! above +inf. Entry values are compared through this key on both host and device.
PREFIXKV_HOST_DEVICE uint32_t order_key(float x) {
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(x);
#else
  std::memcpy(&u, &x, sizeof(u));
#endif
  if (u == 0x80000000u) u = 0;  // -0 -> +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
//! Inverse of `order_key` (for reporting the threshold).
PREFIXKV_HOST_DEVICE float key_value(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k;
  float x;
#if defined(__CUDA_ARCH__)
  x = __uint_as_float(u);
#else
  std::memcpy(&x, &u, sizeof(x));
#endif
  return x;
}
//! Key of the entry value of rank r of a curve row.
PREFIXKV_HOST_DEVICE uint32_t entry_key(const float* cumulative_row, int64_t r) {
  return order_key(entry_value(cumulative_row, r));
}
//! Ranks r in [lo, hi) of a curve row whose entry key is <= key (0 for key < 0; keys ascend with r).
PREFIXKV_HOST_DEVICE int64_t entries_le(const float* cumulative_row, int64_t lo, int64_t hi, int64_t key) {
  if (key < 0) return 0;
  int64_t a = lo, n = hi - lo;  // first rank in [lo, hi) with key > t
  while (n > 0) {
    const int64_t h = n / 2;
    if (static_cast<int64_t>(entry_key(cumulative_row, a + h)) <= key) {
      a += h + 1;
      n -= h + 1;
    } else {
      n = h;
    }
  }
  return a - lo;
}

//! Effective (clipped) bounds of one segment with c candidates. Returns false when infeasible.
PREFIXKV_HOST_DEVICE bool segment_bounds(const keep_bounds& b, int64_t s, int64_t c, int64_t& lo, int64_t& hi) {
  lo = b.lo ? b.lo[s] : b.min_keep;
  hi = b.hi ? b.hi[s] : b.max_keep;
  if (lo < 0 || hi < lo) return false;
  lo = lo < c ? lo : c;
  hi = hi < c ? hi : c;
  return true;
}

//! Sums over the segments of one problem.
struct problem_totals {
  int64_t tokens = 0, candidates = 0, lo = 0, hi = 0;
};

//! Candidates to keep in problem p (B) from its budget and totals; reason::none when feasible.
PREFIXKV_HOST_DEVICE reason problem_budget(const solve_budget& b, int64_t p, const problem_totals& t, int64_t& B) {
  const int64_t prot = t.tokens - t.candidates;
  B = 0;
  if (b.kind == budget_kind::evict_ratio) {
    const double r = b.ratios ? b.ratios[p] : b.ratio;
    if (!(r >= 0.0 && r < 1.0)) return reason::bad_parameter;  // also rejects NaN
    const double e = rint(r * static_cast<double>(t.tokens));
    if (e > static_cast<double>(t.candidates)) return reason::infeasible_budget;
    B = t.candidates - static_cast<int64_t>(e);
  } else if (b.kind == budget_kind::keep_tokens) {
    const int64_t T = b.counts ? b.counts[p] : b.count;
    if (T < prot || T - prot > t.candidates) return reason::infeasible_budget;
    B = T - prot;
  } else if (b.kind == budget_kind::keep_candidates) {
    const int64_t c = b.counts ? b.counts[p] : b.count;
    if (c < 0 || c > t.candidates) return reason::infeasible_budget;
    B = c;
  } else {
    return reason::bad_parameter;
  }
  if (B < t.lo || B > t.hi) return reason::infeasible_bounds;
  return reason::none;
}

//! A static message for a solver reason.
inline const char* solve_message(reason r) noexcept {
  switch (r) {
    case reason::bad_parameter: return "solve: evict ratio must be in [0, 1) (or unknown budget kind)";
    case reason::infeasible_budget: return "solve: the budget cannot be met by the candidates";
    case reason::infeasible_bounds: return "solve: per-segment bounds are infeasible (lo < 0, lo > hi, or budget outside [sum lo, sum hi])";
    case reason::shape_mismatch: return "solve: a segment's candidate count disagrees with its tokens and protect policy";
    case reason::out_of_range: return "solve: problem_offsets are not non-decreasing within [0, S]";
    default: return "solve: invalid input";
  }
}

}  // namespace detail

namespace detail {

//! Totals and candidates to keep (B) of problem p, with checked sums; `why` = reason::none when feasible.
inline reason solve_host_problem(const curve_set& curves, const keep_bounds& bounds, const solve_budget& budget,
                                 int64_t p, int64_t s0, int64_t s1, problem_totals& t, int64_t& B) noexcept {
  checked_i64 tokens = 0, cand = 0, lo_sum = 0, hi_sum = 0;
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t c = curves.offsets[s + 1] - curves.offsets[s];
    int64_t lo, hi;
    if (!segment_bounds(bounds, s, c, lo, hi)) return reason::infeasible_bounds;
    tokens += curves.tokens[s];
    cand += c;
    lo_sum += lo;
    hi_sum += hi;
  }
  if (!tokens.ok() || !cand.ok() || !lo_sum.ok() || !hi_sum.ok()) return reason::capacity_exceeded;
  t.tokens = tokens.value();
  t.candidates = cand.value();
  t.lo = lo_sum.value();
  t.hi = hi_sum.value();
  return problem_budget(budget, p, t, B);
}

inline cudaError_t solve_host_fail(reason why) noexcept {
  if (why == reason::capacity_exceeded)
    return fail(why, "solve: a problem's total token or candidate count overflows int64");
  return fail(why, solve_message(why));
}

//! Every check of `solve_host`, without writing or allocating anything.
inline cudaError_t solve_host_validate(const curve_set& curves, int64_t num_problems, const int64_t* problem_offsets,
                                       const solve_budget& budget, const keep_bounds& bounds, const int64_t* keep) noexcept {
  const int64_t S = curves.count;
  PREFIXKV_TRY(validate(curves.protect));
  if (S < 0 || num_problems < 0) return fail(reason::negative_extent, "solve: negative segment or problem count");
  if (problem_offsets == nullptr && num_problems != 1)
    return fail(reason::bad_parameter, "solve: problem_offsets may be null only with num_problems == 1");
  if (S > 0 && (curves.offsets == nullptr || curves.tokens == nullptr || keep == nullptr))
    return fail(reason::null_pointer, "solve: curves.offsets, curves.tokens or keep is null");
  if (S > 0 && curves.offsets[0] != 0) return fail(reason::out_of_range, "solve: curves.offsets[0] must be 0");
  for (int64_t s = 0; s < S; ++s) {
    // compare before subtracting: offsets[s + 1] - offsets[s] cannot overflow once both are known ordered and >= 0
    if (curves.offsets[s + 1] < curves.offsets[s])
      return fail(reason::shape_mismatch, "solve: curves.offsets decrease");
    const int64_t c = curves.offsets[s + 1] - curves.offsets[s];
    if (curves.tokens[s] < 0) return fail(reason::negative_extent, "solve: a segment has negative tokens");
    if (c != candidate_count(curves.tokens[s], curves.protect))
      return fail(reason::shape_mismatch, solve_message(reason::shape_mismatch));
  }
  const int64_t total = S > 0 ? curves.offsets[S] : 0;
  if (total > 0 && curves.cumulative == nullptr) return fail(reason::null_pointer, "solve: curves.cumulative is null");
  for (int64_t s = 0; s < S; ++s) {
    const float* row = curves.cumulative + curves.offsets[s];
    const int64_t c = curves.offsets[s + 1] - curves.offsets[s];
    for (int64_t r = 0; r < c; ++r) {
      if (!std::isfinite(row[r])) return fail(reason::nonfinite_input, "solve: a cumulative value is NaN or infinite");
      if (r > 0 && row[r] < row[r - 1]) return fail(reason::not_ascending, "solve: a cumulative row decreases");
    }
  }
  if (problem_offsets) {
    if (num_problems > 0 && problem_offsets[0] < 0) return fail(reason::out_of_range, solve_message(reason::out_of_range));
    for (int64_t p = 0; p < num_problems; ++p)
      if (problem_offsets[p + 1] < problem_offsets[p] || problem_offsets[p + 1] > S)
        return fail(reason::out_of_range, solve_message(reason::out_of_range));
  }
  for (int64_t p = 0; p < num_problems; ++p) {
    const int64_t s0 = problem_offsets ? problem_offsets[p] : 0, s1 = problem_offsets ? problem_offsets[p + 1] : S;
    problem_totals t;
    int64_t B = 0;
    const reason why = solve_host_problem(curves, bounds, budget, p, s0, s1, t, B);
    if (why != reason::none) return solve_host_fail(why);
  }
  return cudaSuccess;
}

//! The solve proper; inputs already validated by `solve_host_validate`.
inline cudaError_t solve_host_run(const curve_set& curves, int64_t num_problems, const int64_t* problem_offsets,
                                  const solve_budget& budget, const keep_bounds& bounds, int64_t* keep,
                                  float* threshold) {
  const int64_t S = curves.count;
  // scratch for the largest problem, allocated once before anything is written
  int64_t widest = 0;
  for (int64_t p = 0; p < num_problems; ++p) {
    const int64_t s0 = problem_offsets ? problem_offsets[p] : 0, s1 = problem_offsets ? problem_offsets[p + 1] : S;
    widest = s1 - s0 > widest ? s1 - s0 : widest;
  }
  std::vector<int64_t> less(static_cast<size_t>(widest)), eq(static_cast<size_t>(widest));
  for (int64_t p = 0; p < num_problems; ++p) {
    const int64_t s0 = problem_offsets ? problem_offsets[p] : 0, s1 = problem_offsets ? problem_offsets[p + 1] : S;
    problem_totals t;
    int64_t B = 0;
    (void)solve_host_problem(curves, bounds, budget, p, s0, s1, t, B);
    const int64_t R = B - t.lo;
    // eligible count of segment s with key <= t
    auto eligible_le = [&](int64_t s, int64_t key) -> int64_t {
      const int64_t c = curves.offsets[s + 1] - curves.offsets[s];
      int64_t lo, hi;
      segment_bounds(bounds, s, c, lo, hi);
      return entries_le(curves.cumulative + curves.offsets[s], lo, hi, key);
    };
    int64_t v = -1;  // the key of the R-th pick
    if (R > 0) {
      int64_t L = -1, H = 0xFFFFFFFFll;  // count(L) < R <= count(H)
      while (H - L > 1) {
        const int64_t mid = L + (H - L) / 2;
        int64_t cnt = 0;
        for (int64_t s = s0; s < s1 && cnt < R; ++s) cnt += eligible_le(s, mid);
        if (cnt >= R)
          H = mid;
        else
          L = mid;
      }
      v = H;
    }
    int64_t rem = R;
    for (int64_t s = s0; s < s1; ++s) {
      less[s - s0] = R > 0 ? eligible_le(s, v - 1) : 0;
      eq[s - s0] = R > 0 ? eligible_le(s, v) - less[s - s0] : 0;
      rem -= less[s - s0];
    }
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t c = curves.offsets[s + 1] - curves.offsets[s];
      int64_t lo, hi;
      segment_bounds(bounds, s, c, lo, hi);
      const int64_t take = rem < eq[s - s0] ? rem : eq[s - s0];
      rem -= take;
      keep[s] = (curves.tokens[s] - c) + lo + less[s - s0] + take;
    }
    if (threshold) threshold[p] = R > 0 ? key_value(static_cast<uint32_t>(v)) : 0.0f;
  }
  return cudaSuccess;
}
}  // namespace detail

//! Host twin of `prefixkv::solve`: solve P independent problems.
//!
//! * `curves`: host curve_set (S segments); validated here: offsets[0] == 0 and non-decreasing, candidate counts
//!   consistent with tokens and the protect policy, cumulative values finite and non-decreasing in every row.
//! * `problem_offsets`: (P + 1) segment offsets of the problems, or null for one problem holding all segments
//!   (then `num_problems` must be 1).
//! * `keep`: (S) output, tokens kept per segment (protected included).
//! * `threshold`: (P) optional output, entry value of the last candidate picked by the global order (0 when the
//!   budget is met by the lower bounds alone).
//! Every problem is validated before anything is written; on error nothing is written.
[[nodiscard]] inline cudaError_t solve_host(const curve_set& curves, int64_t num_problems,
                                            const int64_t* problem_offsets, const solve_budget& budget,
                                            const keep_bounds& bounds, int64_t* keep,
                                            float* threshold = nullptr) noexcept {
  PREFIXKV_TRY(detail::solve_host_validate(curves, num_problems, problem_offsets, budget, bounds, keep));
  try {
    return detail::solve_host_run(curves, num_problems, problem_offsets, budget, bounds, keep, threshold);
  } catch (...) {
    return detail::fail(reason::capacity_exceeded, "solve: out of host memory", cudaErrorMemoryAllocation);
  }
}

//! Convenience: one problem over all segments, keep counts into a vector (resized to S; replaced only on
//! success, and allocated only after the inputs passed validation).
[[nodiscard]] inline cudaError_t solve_host(const curve_set& curves, const solve_budget& budget,
                                            const keep_bounds& bounds, std::vector<int64_t>& keep,
                                            float* threshold = nullptr) noexcept {
  const int64_t one = 0;  // a non-null stand-in for `keep` during validation (never written)
  PREFIXKV_TRY(detail::solve_host_validate(curves, 1, nullptr, budget, bounds, &one));
  try {
    std::vector<int64_t> k(static_cast<size_t>(curves.count));
    float thr = 0.0f;
    PREFIXKV_TRY(detail::solve_host_run(curves, 1, nullptr, budget, bounds, k.data(), &thr));
    keep.swap(k);
    if (threshold) *threshold = thr;
    return cudaSuccess;
  } catch (...) {
    return detail::fail(reason::capacity_exceeded, "solve: out of host memory", cudaErrorMemoryAllocation);
  }
}

PREFIXKV_NAMESPACE_END
