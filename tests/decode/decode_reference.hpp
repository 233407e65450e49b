// Decode tests: a synthetic generation (token ids written into the K/V rows, observations as functions of the
// token ids) and an independent, straightforward reference of every policy that works on lists of token ids.
#pragma once

#include <prefixkv/decode/decode.hpp>

#include <algorithm>
#include <cstdint>
#include <random>
#include <set>
#include <vector>

namespace decode_test {

namespace pk = prefixkv;

//! The observed attention of token `id` at step `step` for (layer, sequence, q head): a value in (0, 1) from a
//! hash (distinct values, so equal accumulated scores are rare; the tie rule is tested separately).
inline float observed(uint64_t seed, int64_t step, int64_t l, int64_t b, int64_t hq, int64_t id) {
  uint64_t x = seed ^ (uint64_t(step) * 0x9E3779B97F4A7C15ull) ^ (uint64_t(l) << 56) ^ (uint64_t(b) << 48) ^
               (uint64_t(hq) << 40) ^ (uint64_t(id) * 0xBF58476D1CE4E5B9ull);
  x ^= x >> 31;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 29;
  return float((x >> 40) & 0xFFFF) / 65536.0f + 1.0f / 131072.0f;
}

//! The paper's budget written as the official Python line: keep while int(n - N * (1 - f)) <= 0.
inline bool official_over(int64_t n, int64_t N, double keep) {
  volatile double prod = double(N) * keep;  // numpy: product, then difference, each rounded
  volatile double x = double(n) - prod;
  return int64_t(x) > 0;  // astype(int32) truncates toward zero
}

//! One segment of the reference: token ids in row order (ascending ids: tokens arrive in id order and erasures
//! keep the order; the implementation's rows follow it where the policy keeps token order) and the running score
//! of every token by id.
struct ref_segment {
  std::vector<int64_t> ids;
  std::vector<float> by_id;  // running score of token id (only cached tokens are read)
  int64_t n0 = 0, N0 = 0, p = 0, N = 0;
  float& score(int64_t id) {
    if (id >= int64_t(by_id.size())) by_id.resize(size_t(id + 1) * 2, 0.0f);
    return by_id[size_t(id)];
  }
  float score(int64_t id) const { return by_id.at(size_t(id)); }
};

//! Reference budget T(N) before the floor.
inline int64_t ref_budget(const pk::decode_config& c, const double* keep, int64_t l, const ref_segment& s) {
  const int64_t N = c.horizon > 0 && s.N > c.horizon ? c.horizon : s.N;
  if (keep) {  // largest n not over the official rule
    int64_t n = 0;
    while (!official_over(n + 1, N, keep[l])) ++n;
    return n;
  }
  if (s.N0 == 0) return N;
  return (N * s.n0 + s.N0 - 1) / s.N0;  // ceil(N n0 / N0), small numbers in the tests
}

//! Candidate range of a reference segment (score policy / amortised): all but the first `sinks` and the last
//! `recent` tokens (by id; the sinks stay the first rows and the recent tokens the last rows in every order).
inline void ref_candidate_range(const ref_segment& s, pk::protect_policy pr, int64_t& lo, int64_t& hi) {
  const int64_t n = int64_t(s.ids.size());
  lo = std::min<int64_t>(pr.sinks, n);
  hi = std::max<int64_t>(lo, n - pr.recent);
}

//! Erase the tokens whose ids are flagged.
inline void ref_erase(ref_segment& s, const std::set<int64_t>& gone) {
  std::vector<int64_t> kept;
  for (int64_t id : s.ids)
    if (!gone.count(id)) kept.push_back(id);
  s.ids = kept;
}

//! Evict the `k` lowest-scored candidates, ties to the larger id (the newer token).
inline void ref_evict_lowest(ref_segment& s, pk::protect_policy pr, int64_t k) {
  int64_t lo = 0, hi = 0;
  ref_candidate_range(s, pr, lo, hi);
  auto lower = [&](int64_t a, int64_t b) {  // a goes before b
    const float x = s.score(a), y = s.score(b);
    return x != y ? x < y : a > b;
  };
  if (k == 1) {  // the common case, by a plain scan
    int64_t best = s.ids[lo];
    for (int64_t i = lo + 1; i < hi; ++i)
      if (lower(s.ids[i], best)) best = s.ids[i];
    s.ids.erase(std::find(s.ids.begin(), s.ids.end(), best));
    return;
  }
  std::vector<int64_t> c(s.ids.begin() + lo, s.ids.begin() + hi);
  std::sort(c.begin(), c.end(), lower);
  ref_erase(s, std::set<int64_t>(c.begin(), c.begin() + k));
}

//! Keep the protected tokens and the `keep` highest-scored candidates (ties to the smaller id), in id order.
inline void ref_keep_highest(ref_segment& s, pk::protect_policy pr, int64_t keep) {
  int64_t lo = 0, hi = 0;
  ref_candidate_range(s, pr, lo, hi);
  std::vector<int64_t> c(s.ids.begin() + lo, s.ids.begin() + hi);
  std::sort(c.begin(), c.end(), [&](int64_t a, int64_t b) {
    const float x = s.score(a), y = s.score(b);
    return x != y ? x > y : a < b;
  });
  ref_erase(s, std::set<int64_t>(c.begin() + keep, c.end()));
}

}  // namespace decode_test
