// libFuzzer harness: solve_host (both overloads) on curves from the builder or written raw (hostile offsets,
// token counts, cumulative values), with hostile budgets (kinds, ratios, counts, per-problem arrays), bounds and
// problem offsets. Properties: no crash, no sanitizer report, no exception; on rejection `keep` and `threshold`
// are byte-identical; on success every segment keeps protected + lo..hi candidates and every problem meets its
// budget exactly; for builder curves the answer equals the brute-force oracle of the tests.
#include <prefixkv/solve/solve.hpp>

#include "fuzz_common.hpp"
#include "solve/solve_oracle.hpp"

#include <cmath>

namespace pk = prefixkv;
using fuzz::wide;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const bool raw = in.ConsumeIntegralInRange<int>(0, 3) == 0;
  pk::curve_buffers built;
  std::vector<int64_t> offsets, tokens;
  std::vector<float> cumulative;
  pk::curve_set cv;
  if (!raw) {
    const int64_t S = in.ConsumeIntegralInRange<int64_t>(0, 8), n = in.ConsumeIntegralInRange<int64_t>(0, 24);
    std::vector<float> x(static_cast<size_t>(S * n));
    for (auto& v : x) v = static_cast<float>(in.ConsumeIntegralInRange<int>(0, 8)) * 0.5f;
    const pk::protect_policy prot{in.ConsumeIntegralInRange<int64_t>(0, 5), in.ConsumeIntegralInRange<int64_t>(0, 2)};
    if (pk::build_curves_host(x.data(), pk::make_uniform_segments(S, n), prot, built) != cudaSuccess) return 0;
    cv = built.view();
  } else {
    const int64_t S = in.ConsumeIntegralInRange<int64_t>(0, 6);
    offsets.resize(static_cast<size_t>(S) + 1);
    tokens.resize(static_cast<size_t>(S));
    for (auto& t : tokens) t = fuzz::size_or_hostile(in, 0, 12);
    cv.protect = pk::protect_policy{fuzz::size_or_hostile(in, 0, 4), fuzz::size_or_hostile(in, 0, 2)};
    const bool consistent = in.ConsumeBool();
    for (int64_t s = 0; s < S; ++s) {
      const int64_t c = cv.protect.sinks >= 0 && cv.protect.recent >= 0 && tokens[s] >= 0
                            ? pk::candidate_count(tokens[s], cv.protect) : 0;
      offsets[s + 1] = consistent && fuzz::fits_i64(wide(offsets[s]) + c) ? offsets[s] + c : fuzz::size_or_hostile(in, 0, 30);
    }
    if (!consistent && S > 0 && in.ConsumeBool()) offsets[0] = fuzz::size_or_hostile(in, 0, 3);
    // the cumulative array must cover what consistent offsets claim (a caller precondition); skip absurd claims
    const int64_t total = S > 0 ? offsets[S] : 0;
    if (consistent && (total < 0 || total > 4096)) return 0;
    cumulative.resize(static_cast<size_t>(consistent ? total : 4096));
    float run = 0.0f;
    for (auto& c : cumulative) {
      const uint8_t m = in.ConsumeIntegral<uint8_t>();
      run = m < 230 ? std::fmin(1.0f, run + static_cast<float>(m % 5) * 0.125f) : (m < 245 ? run - 0.25f : NAN);
      c = run;
    }
    cv.count = S;
    cv.offsets = offsets.data();
    cv.tokens = tokens.data();
    cv.cumulative = cumulative.data();
    // offsets the solver accepts (offsets[0] == 0, non-decreasing, matching the candidate counts) must lie inside
    // the cumulative array: describing more than the caller holds is a precondition, not something to fuzz
    bool shape_ok = S == 0 || offsets[0] == 0;
    for (int64_t s = 0; s < S && shape_ok; ++s)
      shape_ok = offsets[s + 1] >= offsets[s] && tokens[s] >= 0 && cv.protect.sinks >= 0 && cv.protect.recent >= 0 &&
                 offsets[s + 1] - offsets[s] == pk::candidate_count(tokens[s], cv.protect);
    if (shape_ok && S > 0 && offsets[S] > static_cast<int64_t>(cumulative.size())) return 0;
  }
  const int64_t S = cv.count;
  // budget
  pk::solve_budget bud;
  const int kind = in.ConsumeIntegralInRange<int>(-1, 3);
  bud.kind = static_cast<pk::budget_kind>(kind);
  bud.ratio = fuzz::ratio(in);
  bud.count = fuzz::size_or_hostile(in, 0, 100);
  // problems
  const int64_t P = in.ConsumeIntegralInRange<int64_t>(0, 3);
  const bool one = in.ConsumeBool();
  std::vector<int64_t> poff(static_cast<size_t>(P) + 1);
  poff[0] = 0;
  for (int64_t p = 1; p <= P; ++p)
    poff[p] = in.ConsumeIntegralInRange<int>(0, 7) == 0
                  ? fuzz::size_or_hostile(in, 0, S + 1)
                  : std::min<int64_t>(S, std::max<int64_t>(0, std::min<int64_t>(poff[p - 1], S)) +
                                             in.ConsumeIntegralInRange<int64_t>(0, 3));
  if (!one && P > 0) poff[P] = in.ConsumeBool() ? S : poff[P];
  std::vector<double> ratios(static_cast<size_t>(P) + 1);
  std::vector<int64_t> counts(static_cast<size_t>(P) + 1);
  for (auto& r : ratios) r = fuzz::ratio(in);
  for (auto& c : counts) c = fuzz::size_or_hostile(in, 0, 100);
  if (in.ConsumeIntegralInRange<int>(0, 3) == 0) bud.ratios = ratios.data();
  if (in.ConsumeIntegralInRange<int>(0, 3) == 0) bud.counts = counts.data();
  // bounds
  pk::keep_bounds bnd;
  bnd.min_keep = fuzz::size_or_hostile(in, 0, 4);
  bnd.max_keep = in.ConsumeBool() ? INT64_MAX : fuzz::size_or_hostile(in, 0, 12);
  std::vector<int64_t> lo(static_cast<size_t>(S) + 1), hi(static_cast<size_t>(S) + 1);
  for (auto& v : lo) v = fuzz::size_or_hostile(in, 0, 4);
  for (auto& v : hi) v = fuzz::size_or_hostile(in, 0, 12);
  if (in.ConsumeIntegralInRange<int>(0, 3) == 0) bnd.lo = lo.data();
  if (in.ConsumeIntegralInRange<int>(0, 3) == 0) bnd.hi = hi.data();

  // the pointer overload
  const int64_t np = one ? 1 : P;
  const int64_t* po = one ? nullptr : poff.data();
  std::vector<int64_t> keep(static_cast<size_t>(S) + 1, -77);
  std::vector<float> thr(static_cast<size_t>(np) + 1, -5.0f);
  const auto kb = fuzz::bytes_of(keep.data(), keep.size());
  const auto tb = fuzz::bytes_of(thr.data(), thr.size());
  const cudaError_t e = pk::solve_host(cv, np, po, bud, bnd, keep.data(), thr.data());
  if (e != cudaSuccess) {
    FUZZ_ASSERT(e == cudaErrorInvalidValue);
    FUZZ_ASSERT(pk::last_error().why != pk::reason::none);
    FUZZ_ASSERT(fuzz::same_bytes(keep.data(), keep.size(), kb) && fuzz::same_bytes(thr.data(), thr.size(), tb));
  } else {
    FUZZ_ASSERT(keep[static_cast<size_t>(S)] == -77);  // nothing past S
    for (int64_t p = 0; p < np; ++p) {
      const int64_t s0 = po ? po[p] : 0, s1 = po ? po[p + 1] : S;
      __int128 kept_c = 0, tokens_sum = 0, cand = 0;
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t n = cv.tokens[s], c = cv.offsets[s + 1] - cv.offsets[s], prot = n - c;
        int64_t l = bnd.lo ? bnd.lo[s] : bnd.min_keep, h = bnd.hi ? bnd.hi[s] : bnd.max_keep;
        l = std::min(l, c);
        h = std::min(h, c);
        FUZZ_ASSERT(keep[s] >= prot + l && keep[s] <= prot + h);
        kept_c += keep[s] - prot;
        tokens_sum += n;
        cand += c;
      }
      const int k = static_cast<int>(bud.kind);
      if (k == 0) {
        const double r = bud.ratios ? bud.ratios[p] : bud.ratio;
        FUZZ_ASSERT(kept_c == cand - static_cast<__int128>(std::nearbyint(r * static_cast<double>(tokens_sum))));
      } else if (k == 1) {
        FUZZ_ASSERT(kept_c + (tokens_sum - cand) == (bud.counts ? bud.counts[p] : bud.count));
      } else {
        FUZZ_ASSERT(k == 2 && kept_c == (bud.counts ? bud.counts[p] : bud.count));
      }
      if (!raw && bud.ratios == nullptr && bud.counts == nullptr && bnd.lo == nullptr && bnd.hi == nullptr) {
        const auto o = prefixkv_test::oracle_solve(cv, s0, s1, k, bud.ratio, bud.count, bnd.min_keep, bnd.max_keep);
        FUZZ_ASSERT(o.ok);
        for (int64_t s = s0; s < s1; ++s) FUZZ_ASSERT(keep[s] == o.keep[static_cast<size_t>(s - s0)]);
        FUZZ_ASSERT(thr[static_cast<size_t>(p)] == o.threshold);
      }
    }
  }
  // the vector overload (one problem): same acceptance as the pointer overload with one problem
  std::vector<int64_t> kv = {123};
  float t1 = -9.0f;
  const cudaError_t e2 = pk::solve_host(cv, bud, bnd, kv, &t1);
  std::vector<int64_t> k1(static_cast<size_t>(S) + 1, -77);
  float t2 = -9.0f;
  const cudaError_t e3 = pk::solve_host(cv, 1, nullptr, bud, bnd, k1.data(), &t2);
  FUZZ_ASSERT(e2 == e3);
  if (e2 != cudaSuccess) {
    FUZZ_ASSERT(kv.size() == 1 && kv[0] == 123 && t1 == -9.0f);
  } else {
    FUZZ_ASSERT(static_cast<int64_t>(kv.size()) == S && t1 == t2);
    for (int64_t s = 0; s < S; ++s) FUZZ_ASSERT(kv[s] == k1[s]);
  }
  return 0;
}
