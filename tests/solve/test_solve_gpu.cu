// Device solver == host solver (bit-identical keep counts and thresholds), across ragged batches of many
// problems with thousands of segments; every call through run_three_ways (size query, plain, graph).
#include <doctest/doctest.h>

#include <prefixkv/solve/solve.cuh>

#include "solve/solve_oracle.hpp"
#include "support/gpu_harness.cuh"
#include "support/test_random.hpp"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

using namespace prefixkv_test;
namespace pk = prefixkv;

namespace {

// PREFIXKV_TEST_QUICK set (sanitizer runs): smaller large cases and fewer budgets, every code path still covered.
bool quick() { return std::getenv("PREFIXKV_TEST_QUICK") != nullptr; }

// PREFIXKV_SOLVE_VARIANTS="0,1" (racecheck runs, which are slow on this kernel): only those device variants of
// run_and_compare (indices into its list); unset or empty = all.
bool variant_enabled(int index) {
  const char* e = std::getenv("PREFIXKV_SOLVE_VARIANTS");
  if (e == nullptr || *e == '\0') return true;
  const std::string list = std::string(",") + e + ",";
  return list.find("," + std::to_string(index) + ",") != std::string::npos;
}

// Signature shared by prefixkv::solve and every detail::solve_dispatch<Policy>.
using solve_fn = cudaError_t (*)(void*, size_t&, const pk::curve_set&, int64_t, const int64_t*,
                                 const pk::solve_budget&, const pk::keep_bounds&, int64_t*, float*, int32_t*,
                                 cudaStream_t);

struct batch {
  std::vector<int64_t> rows, poff;
  std::vector<float> scores;
  pk::curve_buffers curves;
};

// P problems; problem q has nseg(q) segments of random lengths in [0, max_n].
batch make_batch(std::mt19937_64& rng, int64_t P, int64_t max_seg, int64_t max_n, pk::protect_policy prot,
                 score_kind kind) {
  batch b;
  b.poff.assign(P + 1, 0);
  for (int64_t q = 0; q < P; ++q) b.poff[q + 1] = b.poff[q] + int64_t(rng() % (max_seg + 1));
  const int64_t S = b.poff[P];
  b.rows.assign(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = rng() % 8 == 0 ? int64_t(rng() % 3) : int64_t(rng() % (max_n + 1));  // some tiny rows
    b.rows[s + 1] = b.rows[s] + n;
  }
  b.scores.resize(b.rows[S]);
  for (int64_t s = 0; s < S; ++s) fill_row(rng, kind, b.scores.data() + b.rows[s], b.rows[s + 1] - b.rows[s]);
  REQUIRE(pk::build_curves_host(b.scores.data(), pk::make_offset_segments(S, b.rows.data()), prot, b.curves) ==
          cudaSuccess);
  return b;
}

struct device_curves {
  device_buffer<int64_t> offsets, tokens;
  device_buffer<int32_t> positions;
  device_buffer<float> cumulative;
  pk::curve_set view;
  // The solver's array arguments must be valid pointers even when a batch has no candidates at all (every
  // token protected): pad empty arrays to one element rather than passing null.
  template <class T>
  static std::vector<T> non_empty(std::vector<T> v) {
    if (v.empty()) v.push_back(T{});
    return v;
  }
  explicit device_curves(const pk::curve_buffers& c)
      : offsets(c.offsets), tokens(c.tokens), positions(non_empty(c.positions)), cumulative(non_empty(c.cumulative)) {
    view = c.view();
    view.offsets = offsets.get();
    view.tokens = tokens.get();
    view.positions = positions.get();
    view.cumulative = cumulative.get();
    view.sorted_scores = nullptr;
  }
};

// Host expectation per problem: keep, threshold and status (a rejected problem keeps everything).
void expected(const batch& b, const pk::solve_budget& hb, const pk::keep_bounds& hbd, std::vector<int64_t>& keep,
              std::vector<float>& thr, std::vector<int32_t>& status) {
  const int64_t P = int64_t(b.poff.size()) - 1, S = b.curves.view().count;
  keep.assign(S, 0);
  thr.assign(P, 0.0f);
  status.assign(P, 0);
  for (int64_t q = 0; q < P; ++q) {
    pk::solve_budget one = hb;
    one.ratios = nullptr;
    one.counts = nullptr;
    if (hb.ratios) one.ratio = hb.ratios[q];
    if (hb.counts) one.count = hb.counts[q];
    const int64_t po[2] = {b.poff[q], b.poff[q + 1]};
    std::vector<int64_t> k(S, -1);
    float t = 0;
    const cudaError_t e = pk::solve_host(b.curves.view(), 1, po, one, hbd, k.data(), &t);
    if (e == cudaSuccess) {
      for (int64_t s = po[0]; s < po[1]; ++s) keep[s] = k[s];
      thr[q] = t;
      // cross-check with the independent oracle when no bounds arrays are in play
      if (hbd.lo == nullptr && hbd.hi == nullptr) {
        const auto o = oracle_solve(b.curves.view(), po[0], po[1], int(one.kind), one.ratio, one.count, hbd.min_keep,
                                    hbd.max_keep);
        REQUIRE(o.ok);
        CHECK(std::vector<int64_t>(keep.begin() + po[0], keep.begin() + po[1]) == o.keep);
      }
    } else {
      status[q] = int32_t(pk::last_error().why);
      for (int64_t s = po[0]; s < po[1]; ++s) keep[s] = b.curves.tokens[s];
    }
  }
}

void run_and_compare(const batch& b, const pk::solve_budget& hb, const pk::solve_budget& db,
                     const pk::keep_bounds& hbd, const pk::keep_bounds& dbd) {
  const int64_t P = int64_t(b.poff.size()) - 1, S = b.curves.view().count;
  std::vector<int64_t> ekeep;
  std::vector<float> ethr;
  std::vector<int32_t> estatus;
  expected(b, hb, hbd, ekeep, ethr, estatus);
  device_curves dc(b.curves);
  device_buffer<int64_t> poff(b.poff), keep(S + 1);
  device_buffer<float> thr(P);
  device_buffer<int32_t> status(P);
  int64_t rejected = 0;
  for (auto s : estatus) rejected += s != 0;
  INFO("P ", P, " S ", S, " rejected ", rejected);
  // every device path on the same inputs (policies of detail::solve_dispatch; the same answers): the public entry
  // (cluster path where a problem fits, cluster size chosen from the device and P), the cluster path forced to 2
  // CTAs with a 4096-key budget per CTA (problems over 8192 candidates then take the block path in the same
  // launch), to 8 and to 16 CTAs; sample-select without clusters, also with a small key budget (more narrowing
  // levels, gather overflow -> general fallback); the general path alone
  struct variant {
    const char* name;
    solve_fn fn;
  };
  const variant variants[] = {
      {"default (prefixkv::solve)", &pk::solve},
      {"cluster 2 x 4096 keys", &pk::detail::solve_dispatch<pk::solve_policy<true, true, 2, 4096>>},
      {"cluster 8", &pk::detail::solve_dispatch<pk::solve_policy<true, true, 8>>},
      {"cluster 16", &pk::detail::solve_dispatch<pk::solve_policy<true, true, 16>>},
      {"sample-select", &pk::detail::solve_dispatch<pk::solve_policy<false, true>>},
      {"sample-select, 4096 keys", &pk::detail::solve_dispatch<pk::solve_policy<false, true, 0, 4096>>},
      {"general", &pk::detail::solve_dispatch<pk::solve_policy<false, false>>}};
  for (int vi = 0; vi < int(sizeof(variants) / sizeof(variants[0])); ++vi) {
  if (!variant_enabled(vi)) continue;
  const variant var = variants[vi];
  INFO("variant ", vi, ": ", var.name);
  run_three_ways(
      [&](void* t, size_t& bytes, cudaStream_t st) {
        return var.fn(t, bytes, dc.view, P, poff.get(), db, dbd, keep.get(), thr.get(), status.get(), st);
      },
      [&] {
        keep.poison();
        thr.poison();
        status.poison();
      },
      [&](const char* mode) {
        INFO("mode ", mode);
        auto k = keep.download();
        CHECK(k[S] == poison_value<int64_t>());  // nothing written past S
        k.resize(S);
        CHECK(k == ekeep);
        CHECK(thr.download() == ethr);
        CHECK(status.download() == estatus);
      });
  }
}

// Per-problem evict ratios, as host and device copies, through run_and_compare (no bounds).
void run_ratios(const batch& b, const std::vector<double>& ratios) {
  device_buffer<double> dratios(ratios);
  pk::solve_budget hb = pk::budget_evict_ratio(0), db = hb;
  hb.ratios = ratios.data();
  db.ratios = dratios.get();
  run_and_compare(b, hb, db, {}, {});
}

// Per-problem kept-token budgets (random, up to each problem's tokens) with per-segment bound arrays lo/hi, as
// host and device copies, through run_and_compare.
void run_token_budgets(std::mt19937_64& rng, const batch& b, const std::vector<int64_t>& lo,
                       const std::vector<int64_t>& hi) {
  const int64_t P = int64_t(b.poff.size()) - 1;
  std::vector<int64_t> counts(P);
  for (int64_t q = 0; q < P; ++q) {
    int64_t N = 0;
    for (int64_t s = b.poff[q]; s < b.poff[q + 1]; ++s) N += b.curves.tokens[s];
    counts[q] = N ? int64_t(rng() % (N + 1)) : 0;
  }
  device_buffer<int64_t> dcounts(counts), dlo(lo), dhi(hi);
  pk::solve_budget hb = pk::budget_keep_tokens(0), db = hb;
  hb.counts = counts.data();
  db.counts = dcounts.get();
  pk::keep_bounds hbd, dbd;
  hbd.lo = lo.data();
  hbd.hi = hi.data();
  dbd.lo = dlo.get();
  dbd.hi = dhi.get();
  run_and_compare(b, hb, db, hbd, dbd);
}

// A ragged batch of one input kind: per-problem evict ratios, then a keep-candidates budget with bounds.
void check_ragged(score_kind kind, uint64_t seed) {
  auto rng = make_rng(seed);
  const int64_t P = 1 + rng() % (quick() ? 9 : 97);
  batch b = make_batch(rng, P, 1 + rng() % (quick() ? 40 : 80), 1 + rng() % (quick() ? 150 : 300),
                       pk::protect_policy{int64_t(rng() % 5), int64_t(rng() % 3)}, kind);
  INFO("kind ", name(kind));
  std::vector<double> ratios(P);
  for (auto& r : ratios) r = std::uniform_real_distribution<double>(0.0, 0.85)(rng);
  ratios[0] = 0.999;  // likely infeasible: exercises the status path
  run_ratios(b, ratios);
  // uniform keep-candidates budget with uniform bounds
  pk::keep_bounds bd;
  bd.min_keep = rng() % 3;
  bd.max_keep = bd.min_keep + rng() % 40;
  const auto kc = pk::budget_keep_candidates(int64_t(rng() % 200));
  run_and_compare(b, kc, kc, bd, bd);
}

}  // namespace

// One test case per input kind, so that the sanitizers (one process per test case) run them side by side.
TEST_CASE("device solver == host solver: ragged batches, thousands of segments (mixed scores)") {
  check_ragged(score_kind::mixed, 411);
}
TEST_CASE("device solver == host solver: ragged batches, thousands of segments (tied scores)") {
  check_ragged(score_kind::tied, 412);
}
TEST_CASE("device solver == host solver: ragged batches, thousands of segments (all zeros)") {
  check_ragged(score_kind::zeros, 413);
}
TEST_CASE("device solver == host solver: ragged batches, thousands of segments (one-hot)") {
  check_ragged(score_kind::onehot, 414);
}
TEST_CASE("device solver == host solver: ragged batches, thousands of segments (heavy-tailed)") {
  check_ragged(score_kind::heavy, 415);
}
TEST_CASE("device solver == host solver: ragged batches, thousands of segments (uniform)") {
  check_ragged(score_kind::uniform, 416);
}

TEST_CASE("device solver: per-problem token budgets and per-segment bound arrays") {
  auto rng = make_rng(402);
  const int64_t P = 33;
  batch b = make_batch(rng, P, 40, 200, pk::protect_policy{}, score_kind::mixed);
  const int64_t S = b.curves.view().count;
  std::vector<int64_t> lo(S), hi(S);
  for (int64_t s = 0; s < S; ++s) {
    lo[s] = rng() % 4;
    hi[s] = rng() % 5 == 0 ? lo[s] + int64_t(rng() % 10) : INT64_MAX;
  }
  run_token_budgets(rng, b, lo, hi);
}

TEST_CASE("device solver: hand-made curves with large and negative entry values (raw-key passes fall back)") {
  // The cluster path's passes start on raw float bits, ordered like the floats only without the sign bit; curves
  // built from scores stay in [0, 1]. Hand-made rows (still non-decreasing from 0) reach other values in some
  // problems: all rows x3, one row x3, all rows x1e30, one row of -0.0; others unchanged, all in one launch.
  auto rng = make_rng(406);
  for (int round = 0; round < (quick() ? 2 : 6); ++round) {
    const int64_t P = 1 + int64_t(rng() % (quick() ? 8 : 24));
    batch b = make_batch(rng, P, 1 + rng() % 40, 1 + rng() % 400, pk::protect_policy{int64_t(rng() % 5), int64_t(rng() % 3)},
                         round % 2 ? score_kind::tied : score_kind::mixed);
    int64_t scaled = 0;
    for (int64_t q = 0; q < P; ++q) {
      // 0 unchanged, 1 all rows x3, 2 the first row x3, 3 all rows x1e30, 4 the first row all -0.0 (entry values
      // 0 with the sign bit: a valid curve whose raw bits are not ordered like its values)
      const int mode = int((q + round) % 5);
      for (int64_t s = b.poff[q]; s < b.poff[q + 1]; ++s) {
        if (mode == 0 || ((mode == 2 || mode == 4) && s != b.poff[q])) continue;
        const float f = mode == 3 ? 1e30f : 3.0f;
        for (int64_t j = b.curves.offsets[s]; j < b.curves.offsets[s + 1]; ++j)
          b.curves.cumulative[j] = mode == 4 ? -0.0f : b.curves.cumulative[j] * f;
        scaled += b.curves.offsets[s + 1] - b.curves.offsets[s];
      }
    }
    INFO("round ", round, " scaled values ", scaled);
    std::vector<double> ratios(P);
    for (auto& r : ratios) r = std::uniform_real_distribution<double>(0.0, 0.9)(rng);
    run_ratios(b, ratios);
  }
}

namespace {

// Large problems: the shapes below whose index % parts == part.
void check_large(int part, int parts) {
  auto rng = make_rng(403 + uint64_t(part));
  struct shape {
    int64_t segs, n;
    score_kind kind;
  };
  // full: the bench's 32 x 4K, a few very long rows, 80 x 20K, 200 x 5K (two sample-select levels), ties and
  // one-hot rows (windows stop shrinking -> general fallback), problems over the 1024-segment metadata cache, and
  // 40 x 9K (360K candidates: more than 8 CTAs hold, so a 16-CTA cluster solves it with all its CTAs).
  // quick: the same kinds of shapes, smaller (the small key-cap variant still forces several levels).
  std::vector<shape> shapes = {shape{32, 4096, score_kind::mixed},  shape{3, 70000, score_kind::mixed},
                               shape{80, 20000, score_kind::heavy}, shape{200, 5000, score_kind::mixed},
                               shape{50, 5000, score_kind::onehot}, shape{40, 3000, score_kind::tied},
                               shape{1500, 40, score_kind::mixed},  shape{20000, 9, score_kind::mixed},
                               shape{40, 9000, score_kind::mixed}};
  std::vector<double> ratios = {0.0, 0.1, 0.5, 0.77};
  if (quick()) {
    shapes = {shape{32, 1500, score_kind::mixed}, shape{3, 6000, score_kind::mixed},
              shape{80, 700, score_kind::heavy},  shape{20, 500, score_kind::onehot},
              shape{16, 600, score_kind::tied},   shape{1100, 6, score_kind::mixed},
              shape{40, 9000, score_kind::mixed}};
    ratios = {0.5};
  }
  for (size_t si = 0; si < shapes.size(); ++si) {
    if (int(si % size_t(parts)) != part) continue;
    const shape sh = shapes[si];
    batch b;
    b.poff = {0, sh.segs};
    b.rows.assign(sh.segs + 1, 0);
    for (int64_t s = 0; s < sh.segs; ++s) b.rows[s + 1] = b.rows[s] + sh.n - int64_t(rng() % 3);
    b.scores.resize(b.rows[sh.segs]);
    for (int64_t s = 0; s < sh.segs; ++s)
      fill_row(rng, sh.kind, b.scores.data() + b.rows[s], b.rows[s + 1] - b.rows[s]);
    REQUIRE(pk::build_curves_host(b.scores.data(), pk::make_offset_segments(sh.segs, b.rows.data()),
                                  pk::protect_policy{}, b.curves) == cudaSuccess);
    INFO("segments ", sh.segs, " tokens ", sh.n, " kind ", name(sh.kind));
    for (double r : ratios) {
      const auto bud = pk::budget_evict_ratio(r);
      run_and_compare(b, bud, bud, {}, {});
    }
  }
}

}  // namespace

// Three test cases of a third of the shapes each, so that the sanitizers (one process per test case) run them side
// by side.
TEST_CASE("device solver: large problems (multi-level windows, uncached metadata, no samples), part 1 of 3") {
  check_large(0, 3);
}
TEST_CASE("device solver: large problems (multi-level windows, uncached metadata, no samples), part 2 of 3") {
  check_large(1, 3);
}
TEST_CASE("device solver: large problems (multi-level windows, uncached metadata, no samples), part 3 of 3") {
  check_large(2, 3);
}

TEST_CASE("device solver: host-checkable bad arguments are rejected before anything is enqueued") {
  pk::curve_set cv;
  cv.count = 3;
  int64_t* keep = nullptr;
  size_t bytes = 0;
  CHECK(pk::solve(nullptr, bytes, cv, 1, nullptr, pk::budget_evict_ratio(0.5), {}, keep) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::null_pointer);
  device_buffer<int64_t> k(4);
  device_buffer<float> f(4);
  cv.offsets = k.get();
  cv.tokens = k.get();
  cv.cumulative = f.get();
  CHECK(pk::solve(nullptr, bytes, cv, 1, nullptr, pk::budget_evict_ratio(1.5), {}, k.get()) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::bad_parameter);
  CHECK(pk::solve(nullptr, bytes, cv, 2, nullptr, pk::budget_evict_ratio(0.5), {}, k.get()) == cudaErrorInvalidValue);
  pk::keep_bounds bd;
  bd.min_keep = 5;
  bd.max_keep = 1;
  CHECK(pk::solve(nullptr, bytes, cv, 1, nullptr, pk::budget_evict_ratio(0.5), bd, k.get()) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::infeasible_bounds);
  bytes = 0;
  REQUIRE(pk::solve(nullptr, bytes, cv, 1, nullptr, pk::budget_evict_ratio(0.5), {}, k.get()) == cudaSuccess);
  CHECK(bytes > 0);
  device_buffer<unsigned char> tmp(bytes);
  size_t small = bytes - 1;
  CHECK(pk::solve(tmp.get(), small, cv, 1, nullptr, pk::budget_evict_ratio(0.5), {}, k.get()) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::workspace_too_small);
}

TEST_CASE("device solver: bad problem offsets are reported per problem") {
  auto rng = make_rng(404);
  batch b = make_batch(rng, 3, 5, 30, pk::protect_policy{}, score_kind::uniform);
  const int64_t S = b.curves.view().count;
  device_curves dc(b.curves);
  std::vector<int64_t> poff = {0, S + 5, S};  // problem 0 out of range; problem 1 reversed
  device_buffer<int64_t> dpoff(poff), keep(S);
  device_buffer<float> thr(2);
  device_buffer<int32_t> status(2);
  run_three_ways(
      [&](void* t, size_t& bytes, cudaStream_t st) {
        return pk::solve(t, bytes, dc.view, 2, dpoff.get(), pk::budget_evict_ratio(0.1), {}, keep.get(), thr.get(),
                         status.get(), st);
      },
      [&] {
        keep.poison();
        status.poison();
        thr.poison();
      },
      [&](const char*) {
        CHECK(status.download() == std::vector<int32_t>{int32_t(pk::reason::out_of_range), int32_t(pk::reason::out_of_range)});
        for (auto k : keep.download()) CHECK(k == poison_value<int64_t>());
      });
}

TEST_CASE("device solver: cluster-path and block-path problems in one launch (ragged, size-1 and empty segments)") {
  auto rng = make_rng(405);
  // Problem kinds: small (fits any cluster), one segment of one token, only protected tokens (no candidates),
  // no segments at all, a few long rows (over 8192 candidates: block path when the cluster is forced to 2 x 4096
  // keys, cluster path otherwise), more segments than the cluster path's 1024-segment limit (block path always).
  const int64_t P = quick() ? 14 : 40;
  const pk::protect_policy prot{int64_t(rng() % 5), int64_t(rng() % 3)};
  batch b;
  b.poff.assign(P + 1, 0);
  std::vector<int64_t> lens;
  for (int64_t q = 0; q < P; ++q) {
    const int kind = q < 6 ? int(q) : int(rng() % 6);
    int64_t nseg = 0;
    if (kind == 0) {
      nseg = 1 + int64_t(rng() % 40);
      for (int64_t s = 0; s < nseg; ++s) lens.push_back(rng() % 4 == 0 ? int64_t(rng() % 3) : int64_t(rng() % 301));
    } else if (kind == 1) {
      nseg = 1;
      lens.push_back(1 + prot.sinks + prot.recent);  // exactly one candidate
    } else if (kind == 2) {
      nseg = 1 + int64_t(rng() % 5);
      for (int64_t s = 0; s < nseg; ++s) lens.push_back(int64_t(rng() % (prot.sinks + prot.recent + 1)));
    } else if (kind == 3) {
      nseg = 0;
    } else if (kind == 4) {
      nseg = 2 + int64_t(rng() % 3);
      for (int64_t s = 0; s < nseg; ++s) lens.push_back(3000 + int64_t(rng() % (quick() ? 3000 : 9000)));
    } else {
      nseg = 1025 + int64_t(rng() % 80);
      for (int64_t s = 0; s < nseg; ++s) lens.push_back(int64_t(rng() % 12));
    }
    b.poff[q + 1] = b.poff[q] + nseg;
  }
  const int64_t S = b.poff[P];
  b.rows.assign(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) b.rows[s + 1] = b.rows[s] + lens[s];
  b.scores.resize(b.rows[S]);
  const score_kind kinds[] = {score_kind::mixed, score_kind::tied, score_kind::zeros, score_kind::heavy,
                              score_kind::onehot, score_kind::uniform};
  for (int64_t s = 0; s < S; ++s) fill_row(rng, kinds[rng() % 6], b.scores.data() + b.rows[s], b.rows[s + 1] - b.rows[s]);
  REQUIRE(pk::build_curves_host(b.scores.data(), pk::make_offset_segments(S, b.rows.data()), prot, b.curves) ==
          cudaSuccess);
  INFO("P ", P, " S ", S);
  // per-problem evict ratios (one likely infeasible)
  std::vector<double> ratios(P);
  for (auto& r : ratios) r = std::uniform_real_distribution<double>(0.0, 0.9)(rng);
  ratios[P - 1] = 0.999;
  run_ratios(b, ratios);
  // per-problem token budgets with per-segment bound arrays
  std::vector<int64_t> lo(S), hi(S);
  for (int64_t s = 0; s < S; ++s) {
    lo[s] = rng() % 3;
    hi[s] = rng() % 4 == 0 ? lo[s] + int64_t(rng() % 50) : INT64_MAX;
  }
  run_token_budgets(rng, b, lo, hi);
  // uniform bounds, keep-candidates budget
  pk::keep_bounds ub;
  ub.min_keep = 1;
  ub.max_keep = 1 + int64_t(rng() % 200);
  const auto kc = pk::budget_keep_candidates(int64_t(rng() % 300));
  run_and_compare(b, kc, kc, ub, ub);
}
