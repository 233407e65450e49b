// The compressor's host backend: the plan's validation, the budgets of every allocation, agreement with the stages
// chained by hand, one layer at a time, paged == strided, out of place == in place, and bad input stopping the chain.
#include <doctest/doctest.h>

#include <prefixkv/prefixkv.hpp>

#include "support/test_random.hpp"

#include <cmath>
#include <numeric>
#include <vector>

namespace {

namespace pk = prefixkv;
using prefixkv_test::make_rng;

//! A random float cache (L layers, [B, H, cap, D] each), probabilities (L, B, Hq, Q, cap) and caller scores.
struct host_model {
  int64_t L, B, H, G, cap, D, Q = 4;
  std::vector<float> k, v, p, scores;
  std::vector<pk::kv_view<float>> kv, vv;
  std::vector<pk::kv_view<const float>> pv;
  host_model(int64_t L_, int64_t B_, int64_t H_, int64_t G_, int64_t cap_, int64_t D_, std::mt19937_64& rng)
      : L(L_), B(B_), H(H_), G(G_), cap(cap_), D(D_) {
    const size_t per = size_t(B * H * cap * D);
    k = prefixkv_test::random_vector<float>(rng, per * L);
    v = prefixkv_test::random_vector<float>(rng, per * L);
    p = prefixkv_test::random_vector<float>(rng, size_t(L * B * H * G * Q * cap), 0.0, 1.0);
    scores = prefixkv_test::random_vector<float>(rng, size_t(L * B * H * cap), 0.0, 1.0);
    views();
  }
  host_model(const host_model& o)
      : L(o.L), B(o.B), H(o.H), G(o.G), cap(o.cap), D(o.D), Q(o.Q), k(o.k), v(o.v), p(o.p), scores(o.scores) {
    views();
  }
  host_model& operator=(const host_model&) = delete;
  void views() {
    const size_t per = size_t(B * H * cap * D);
    kv.clear();
    vv.clear();
    pv.clear();
    for (int64_t l = 0; l < L; ++l) {
      kv.push_back(pk::make_kv_view_bhsd(k.data() + l * per, B, H, cap, D));
      vv.push_back(pk::make_kv_view_bhsd(v.data() + l * per, B, H, cap, D));
      pv.push_back(pk::make_kv_view_bhsd<const float>(p.data() + l * B * H * G * Q * cap, B, H * G, Q, cap));
    }
  }
  pk::kv_layers<float> cache() const { return {kv.data(), vv.data(), nullptr, nullptr, L}; }
  pk::compress_config config() const {
    pk::compress_config c;
    c.layers = L;
    c.q_heads = H * G;
    c.kv_heads = H;
    c.head_dim = D;
    c.max_batch = B;
    c.max_tokens = cap;
    c.protect = {2, 1};
    return c;
  }
};

}  // namespace

TEST_CASE("compress plan: can_implement rejects bad configurations with a reason") {
  pk::compress_config c;
  c.layers = 4;
  c.q_heads = 8;
  c.kv_heads = 2;
  c.head_dim = 16;
  c.max_tokens = 100;
  pk::compress_plan plan;
  REQUIRE(pk::make_plan(c, plan) == cudaSuccess);
  CHECK(plan.valid);
  auto rejects = [&](auto edit, pk::reason why) {
    pk::compress_config d = c;
    edit(d);
    pk::compress_plan p2;
    CHECK(pk::make_plan(d, p2) == cudaErrorInvalidValue);
    CHECK(pk::last_error().why == why);
    CHECK(!p2.valid);
  };
  rejects([](auto& d) { d.layers = 0; }, pk::reason::bad_parameter);
  rejects([](auto& d) { d.layers = pk::compact_max_layers + 1; }, pk::reason::unsupported);
  rejects([](auto& d) { d.q_heads = 7; }, pk::reason::shape_mismatch);
  rejects([](auto& d) { d.max_tokens = -1; }, pk::reason::negative_extent);
  rejects([](auto& d) { d.max_tokens = int64_t(1) << 40; }, pk::reason::out_of_range);
  rejects([](auto& d) { d.evict_ratio = 1.0; }, pk::reason::bad_parameter);
  rejects([](auto& d) { d.evict_ratio = std::nan(""); }, pk::reason::bad_parameter);
  rejects([](auto& d) { d.budget = pk::budget_kind::keep_tokens; d.keep_tokens = -1; }, pk::reason::bad_parameter);
  rejects([](auto& d) { d.budget = pk::budget_kind::keep_candidates; }, pk::reason::bad_parameter);
  rejects([](auto& d) { d.alloc = pk::allocation::profile; }, pk::reason::null_pointer);
  rejects([](auto& d) { d.protect.sinks = -1; }, pk::reason::bad_parameter);
  rejects([](auto& d) { d.min_keep = 5; d.max_keep = 4; }, pk::reason::infeasible_bounds);
  rejects([](auto& d) { d.scorer = pk::scorer_kind::window; }, pk::reason::bad_parameter);
  rejects([](auto& d) { d.scorer = pk::scorer_kind(9); }, pk::reason::bad_parameter);
  rejects([](auto& d) { d.max_batch = int64_t(1) << 40; }, pk::reason::out_of_range);
  const double bad_profile[4] = {0.1, 1.5, 0.2, 0.3};
  rejects([&](auto& d) { d.alloc = pk::allocation::profile; d.profile = bad_profile; }, pk::reason::bad_parameter);
  // the profile is copied: the caller's array may go away
  std::vector<double> prof = {0.1, 0.2, 0.3, 0.4};
  c.alloc = pk::allocation::profile;
  c.profile = prof.data();
  REQUIRE(pk::make_plan(c, plan) == cudaSuccess);
  prof.assign(4, 0.9);
  CHECK(plan.profile[2] == 0.3);
  CHECK(plan.cfg.profile == nullptr);
}

TEST_CASE("compress budgets: uniform, pyramid and profile split a sequence's budget as documented") {
  const int64_t L = 5, n = 100;
  pk::compress_config c;
  c.layers = L;
  c.q_heads = c.kv_heads = 1;
  c.head_dim = 4;
  c.max_tokens = n;
  c.protect = {4, 1};
  c.evict_ratio = 0.5;
  std::vector<int64_t> counts(L);
  auto tokens = [&](int64_t, int64_t) { return n; };
  pk::compress_plan plan;
  // uniform: E = 250 of 475 candidates evicted, 225 kept = 45 per layer
  c.alloc = pk::allocation::uniform;
  REQUIRE(pk::make_plan(c, plan) == cudaSuccess);
  CHECK(pk::detail::sequence_budgets(plan, tokens, counts.data()) == pk::reason::none);
  CHECK(counts == std::vector<int64_t>{45, 45, 45, 45, 45});
  c.evict_ratio = 0.502;  // E = rint(251) = 251: 224 kept, the first layers take the remainder
  REQUIRE(pk::make_plan(c, plan) == cudaSuccess);
  CHECK(pk::detail::sequence_budgets(plan, tokens, counts.data()) == pk::reason::none);
  CHECK(counts == std::vector<int64_t>{45, 45, 45, 45, 44});
  // pyramid: non-increasing with depth, the same total, first >= 39/1 x last where the bounds allow
  c.alloc = pk::allocation::pyramid;
  c.evict_ratio = 0.8;  // E = 400, 75 kept
  REQUIRE(pk::make_plan(c, plan) == cudaSuccess);
  CHECK(pk::detail::sequence_budgets(plan, tokens, counts.data()) == pk::reason::none);
  CHECK(std::accumulate(counts.begin(), counts.end(), int64_t(0)) == 75);
  for (int64_t l = 1; l < L; ++l) CHECK(counts[l] <= counts[l - 1]);
  CHECK(counts[0] > 10 * counts[L - 1]);
  // pyramid at a small eviction: the first layers saturate at their candidates, the rest spreads below
  c.evict_ratio = 0.1;  // 425 kept of 475
  REQUIRE(pk::make_plan(c, plan) == cudaSuccess);
  CHECK(pk::detail::sequence_budgets(plan, tokens, counts.data()) == pk::reason::none);
  CHECK(std::accumulate(counts.begin(), counts.end(), int64_t(0)) == 425);
  for (int64_t x : counts) CHECK((x >= 0 && x <= 95));
  // profile: rint(f * n) evicted per layer, as apply_profile
  c.alloc = pk::allocation::profile;
  const std::vector<double> f = {0.0, 0.25, 0.5, 0.905, 1.0};
  c.profile = f.data();
  REQUIRE(pk::make_plan(c, plan) == cudaSuccess);
  CHECK(pk::detail::sequence_budgets(plan, tokens, counts.data()) == pk::reason::none);
  std::vector<int64_t> keep(L);
  REQUIRE(pk::apply_profile(f.data(), L, n, c.protect, keep.data()) == cudaSuccess);
  for (int64_t l = 0; l < L; ++l) CHECK(counts[l] + 5 == keep[l]);
  // infeasible: keep fewer tokens than the protected ones
  c.alloc = pk::allocation::prefix;
  c.budget = pk::budget_kind::keep_tokens;
  c.keep_tokens = 24;
  REQUIRE(pk::make_plan(c, plan) == cudaSuccess);
  CHECK(pk::detail::sequence_budgets(plan, tokens, counts.data()) == pk::reason::infeasible_budget);
  c.keep_tokens = 25;  // exactly the protected tokens
  REQUIRE(pk::make_plan(c, plan) == cudaSuccess);
  CHECK(pk::detail::sequence_budgets(plan, tokens, counts.data()) == pk::reason::none);
  CHECK(counts[0] == 0);
}

TEST_CASE("compress_host == the stages chained by hand (the paper's path: attention, one global threshold)") {
  auto rng = make_rng(0xC1);
  for (int rep = 0; rep < 20; ++rep) {
    const int64_t L = 1 + int64_t(rng() % 6), H = 1 + int64_t(rng() % 3), G = 1 + int64_t(rng() % 3);
    const int64_t cap = 8 + int64_t(rng() % 60), n = 6 + int64_t(rng() % (cap - 5));
    host_model m(L, 1, H, G, cap, 8, rng);
    host_model ref = m;  // the same data, chained by hand
    pk::compress_config cfg = m.config();
    cfg.evict_ratio = 0.05 + 0.9 * double(rng() % 100) / 100.0;
    cfg.protect = {int64_t(rng() % 3), int64_t(rng() % 3)};
    pk::compress_plan plan;
    REQUIRE(pk::make_plan(cfg, plan) == cudaSuccess);
    const int32_t len = int32_t(n);
    std::vector<int32_t> out_len(L), cu(L * 2);
    float thr = -1;
    pk::compress_args<pk::kv_layers<float>, float> a;
    a.cache = m.cache();
    a.lengths = &len;
    a.attention = m.pv.data();
    a.out.lengths = out_len.data();
    a.out.cu_seqlens = cu.data();
    a.out.threshold = &thr;
    const cudaError_t e = pk::compress_host(plan, a);
    // by hand
    const pk::segment_grid grid{L, 1, 1};
    const auto rows = pk::make_uniform_segments(L, n);
    std::vector<float> scores(size_t(L * n));
    for (int64_t l = 0; l < L; ++l)
      REQUIRE(pk::accumulated_attention_host(ref.pv[l], grid, l, rows, scores.data()) == cudaSuccess);
    pk::curve_buffers curves;
    REQUIRE(pk::build_curves_host(scores.data(), rows, cfg.protect, curves) == cudaSuccess);
    std::vector<int64_t> keep;
    float ref_thr = 0;
    const cudaError_t re = pk::solve_host(curves.view(), pk::budget_evict_ratio(cfg.evict_ratio), {}, keep, &ref_thr);
    REQUIRE(e == re);
    if (e != cudaSuccess) continue;  // an infeasible ratio: both refuse
    pk::selection_buffers sel;
    REQUIRE(pk::write_selection_host(curves.view(), keep.data(), sel) == cudaSuccess);
    REQUIRE_MESSAGE(pk::compact_in_place_host(ref.cache(), sel.view(), grid) == cudaSuccess,
                    std::string(pk::last_error().message));
    for (int64_t l = 0; l < L; ++l) {
      CHECK(out_len[l] == keep[l]);
      CHECK(cu[l * 2] == 0);
      CHECK(cu[l * 2 + 1] == keep[l]);
    }
    CHECK(thr == ref_thr);
    CHECK(m.k == ref.k);
    CHECK(m.v == ref.v);
  }
}

TEST_CASE("compress_host: a ragged batch gives every sequence its own budget; one layer at a time == whole") {
  auto rng = make_rng(0xC2);
  for (int rep = 0; rep < 12; ++rep) {
    const int64_t L = 2 + int64_t(rng() % 4), B = 1 + int64_t(rng() % 4), H = 1 + int64_t(rng() % 3);
    host_model m(L, B, H, 2, 64, 4, rng);
    const pk::allocation al = pk::allocation(rng() % 4);
    const pk::granularity gr = rng() % 2 ? pk::granularity::head : pk::granularity::layer;
    const int64_t hg = gr == pk::granularity::head ? H : 1;
    pk::compress_config cfg = m.config();
    cfg.scorer = pk::scorer_kind::scores;
    cfg.alloc = al;
    cfg.gran = gr;
    cfg.evict_ratio = 0.3;
    std::vector<double> prof(size_t(L), 0.3);
    cfg.profile = prof.data();
    pk::compress_plan plan;
    REQUIRE(pk::make_plan(cfg, plan) == cudaSuccess);
    std::vector<int32_t> len(B);
    for (auto& x : len) x = int32_t(10 + rng() % 55);
    const host_model orig = m;
    std::vector<int32_t> out(L * B * hg);
    pk::compress_args<pk::kv_layers<float>> a;
    a.cache = m.cache();
    a.lengths = len.data();
    a.scores = m.scores.data();
    a.score_stride = m.cap;
    a.out.lengths = out.data();
    CAPTURE(int(al));
    CAPTURE(int(gr));
    REQUIRE(pk::compress_host(plan, a) == cudaSuccess);
    for (int64_t b = 0; b < B; ++b) {
      int64_t kept = 0;
      for (int64_t l = 0; l < L; ++l)
        for (int64_t h = 0; h < hg; ++h) kept += out[(l * B + b) * hg + h];
      const int64_t N = L * hg * len[b];
      if (al != pk::allocation::profile) CHECK(kept == N - int64_t(std::nearbyint(0.3 * double(N))));
    }
    if (al == pk::allocation::prefix) continue;
    host_model m2 = orig;
    std::vector<int32_t> out2(out.size(), -1);
    a.cache = m2.cache();
    a.scores = m2.scores.data();
    a.out.lengths = out2.data();
    for (int64_t l = 0; l < L; ++l) REQUIRE(pk::compress_layer_host(plan, a, l) == cudaSuccess);
    CHECK(out2 == out);
    CHECK(m2.k == m.k);
    CHECK(m2.v == m.v);
  }
}

TEST_CASE("compress_host: paged in place == strided in place, out of place == in place") {
  auto rng = make_rng(0xC3);
  const int64_t L = 3, B = 2, H = 2, D = 4, cap = 40, page = 8, blocks = cap / page;
  host_model m(L, B, H, 1, cap, D, rng);
  const host_model orig = m;
  pk::compress_config cfg = m.config();
  cfg.scorer = pk::scorer_kind::attention;
  cfg.max_pages = B * blocks + 2;
  cfg.page_size = page;
  pk::compress_plan plan;
  REQUIRE(pk::make_plan(cfg, plan) == cudaSuccess);
  std::vector<int32_t> len = {37, 21};
  // the same tokens in a paged NHD pool with a shuffled block table
  std::vector<int32_t> table(B * blocks);
  std::iota(table.begin(), table.end(), 1);
  std::shuffle(table.begin(), table.end(), rng);
  const int64_t pool = (B * blocks + 2) * page * H * D;
  std::vector<float> pk_(L * pool), pv_(L * pool);
  std::vector<pk::paged_kv_view<float>> pkv, pvv;
  for (int64_t l = 0; l < L; ++l) {
    pkv.push_back(pk::make_paged_kv_view(pk_.data() + l * pool, pk::page_layout::nhd, B * blocks + 2, page, H, D,
                                         table.data(), B, blocks));
    pvv.push_back(pk::make_paged_kv_view(pv_.data() + l * pool, pk::page_layout::nhd, B * blocks + 2, page, H, D,
                                         table.data(), B, blocks));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t t = 0; t < cap; ++t)
          for (int64_t d = 0; d < D; ++d) {
            pkv[l](b, h, t, d) = m.kv[l](b, h, t, d);
            pvv[l](b, h, t, d) = m.vv[l](b, h, t, d);
          }
  }
  std::vector<int32_t> s_len(L * B), p_len(L * B), pages(B, -1), o_len(L * B);
  {
    pk::compress_args<pk::kv_layers<float>, float> a;
    a.cache = m.cache();
    a.lengths = len.data();
    a.attention = m.pv.data();
    a.out.lengths = s_len.data();
    REQUIRE(pk::compress_host(plan, a) == cudaSuccess);
  }
  {
    pk::compress_args<pk::paged_kv_layers<float>, float> a;
    a.cache = {pkv.data(), pvv.data(), nullptr, nullptr, L};
    a.lengths = len.data();
    a.attention = m.pv.data();
    a.out.lengths = p_len.data();
    a.out.pages_in_use = pages.data();
    REQUIRE(pk::compress_host(plan, a) == cudaSuccess);
  }
  CHECK(p_len == s_len);
  for (int64_t b = 0; b < B; ++b) {
    int64_t mx = 0;
    for (int64_t l = 0; l < L; ++l) mx = std::max<int64_t>(mx, (s_len[l * B + b] + page - 1) / page);
    CHECK(pages[b] == mx);
  }
  for (int64_t l = 0; l < L; ++l)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t t = 0; t < s_len[l * B + b]; ++t)
          for (int64_t d = 0; d < D; ++d) {
            CHECK(pkv[l](b, h, t, d) == m.kv[l](b, h, t, d));
            CHECK(pvv[l](b, h, t, d) == m.vv[l](b, h, t, d));
          }
  // out of place from the original cache into a fresh one: the kept rows equal the in-place result
  host_model src = orig, dst = orig;
  std::fill(dst.k.begin(), dst.k.end(), -9.0f);
  cfg.in_place = false;
  REQUIRE(pk::make_plan(cfg, plan) == cudaSuccess);
  pk::compress_args<pk::kv_layers<float>, float> a;
  a.cache = src.cache();
  a.dst = dst.cache();
  a.lengths = len.data();
  a.attention = src.pv.data();
  a.out.lengths = o_len.data();
  REQUIRE(pk::compress_host(plan, a) == cudaSuccess);
  CHECK(o_len == s_len);
  CHECK(src.k == orig.k);
  for (int64_t l = 0; l < L; ++l)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t t = 0; t < cap; ++t) {
          const float want = t < s_len[l * B + b] ? m.kv[l](b, h, t, 0) : -9.0f;
          CHECK(dst.kv[l](b, h, t, 0) == want);
        }
}

TEST_CASE("compress_host: bad data stops the chain — cache untouched, lengths unchanged, the reason reported") {
  auto rng = make_rng(0xC4);
  const int64_t L = 2, B = 2, H = 2, cap = 30;
  struct bad {
    const char* what;
    pk::reason why;
  };
  for (int which = 0; which < 5; ++which) {
    host_model m(L, B, H, 1, cap, 4, rng);
    const host_model orig = m;
    pk::compress_config cfg = m.config();
    cfg.scorer = pk::scorer_kind::scores;
    std::vector<int32_t> len = {30, 17};
    pk::reason want = pk::reason::none;
    switch (which) {
      case 0: m.scores[3] = std::nanf(""); want = pk::reason::nonfinite_input; break;
      case 1: m.scores[cap + 2] = -1.0f; want = pk::reason::negative_input; break;
      case 2: len[1] = int32_t(cap + 1); want = pk::reason::out_of_range; break;
      case 3: len[0] = -1; want = pk::reason::out_of_range; break;
      case 4: cfg.budget = pk::budget_kind::keep_tokens; cfg.keep_tokens = 1; want = pk::reason::infeasible_budget; break;
    }
    // NaN wins over negative (the device's status order), whatever comes first
    if (which == 1) m.scores[cap + 9] = std::nanf(""), want = pk::reason::nonfinite_input;
    pk::compress_plan plan;
    REQUIRE(pk::make_plan(cfg, plan) == cudaSuccess);
    std::vector<int32_t> out(L * B, -5);
    int32_t status = -5;
    pk::compress_args<pk::kv_layers<float>> a;
    a.cache = m.cache();
    a.lengths = len.data();
    a.scores = m.scores.data();
    a.score_stride = cap;
    a.out.lengths = out.data();
    a.out.status = &status;
    CAPTURE(which);
    CHECK(pk::compress_host(plan, a) == cudaErrorInvalidValue);
    CHECK(pk::last_error().why == want);
    CHECK(status == int32_t(want));
    for (int64_t l = 0; l < L; ++l)
      for (int64_t b = 0; b < B; ++b) CHECK(out[l * B + b] == len[b]);
    CHECK(m.k == orig.k);
    CHECK(m.v == orig.v);
  }
}

TEST_CASE("compress_host: per-layer block tables (a pool per layer, one shared pool) == strided; window / key-norm "
          "refused") {
  auto rng = make_rng(0xC5);
  const int64_t L = 3, B = 2, H = 2, D = 4, cap = 40, page = 8, blocks = cap / page;
  for (int shared_pool = 0; shared_pool < 2; ++shared_pool)
    for (int gran = 0; gran < 2; ++gran) {
      CAPTURE(shared_pool);
      CAPTURE(gran);
      host_model m(L, B, H, 2, cap, D, rng);
      pk::compress_config cfg = m.config();
      cfg.scorer = pk::scorer_kind::attention;
      cfg.gran = gran ? pk::granularity::head : pk::granularity::layer;
      const int64_t pages = (shared_pool ? L : 1) * B * blocks + 2;
      cfg.max_pages = pages;
      cfg.page_size = page;
      pk::compress_plan plan;
      REQUIRE(pk::make_plan(cfg, plan) == cudaSuccess);
      std::vector<int32_t> len = {37, 21};
      // per-layer tables: disjoint pages of one pool, or every layer its own shuffle of its own pool
      std::vector<int32_t> tables, perm(static_cast<size_t>(pages));
      std::iota(perm.begin(), perm.end(), 0);
      if (shared_pool) {
        std::shuffle(perm.begin(), perm.end(), rng);
        tables.assign(perm.begin(), perm.begin() + L * B * blocks);
      } else {
        for (int64_t l = 0; l < L; ++l) {
          std::shuffle(perm.begin(), perm.end(), rng);
          tables.insert(tables.end(), perm.begin(), perm.begin() + B * blocks);
        }
      }
      const int64_t pool = pages * page * H * D;
      std::vector<float> pk_((shared_pool ? 1 : L) * pool), pv_(pk_.size());
      std::vector<pk::paged_kv_view<float>> pkv, pvv;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t o = shared_pool ? 0 : l * pool;
        const int32_t* t = tables.data() + l * B * blocks;
        pkv.push_back(pk::make_paged_kv_view(pk_.data() + o, pk::page_layout::nhd, pages, page, H, D, t, B, blocks));
        pvv.push_back(pk::make_paged_kv_view(pv_.data() + o, pk::page_layout::nhd, pages, page, H, D, t, B, blocks));
        for (int64_t b = 0; b < B; ++b)
          for (int64_t h = 0; h < H; ++h)
            for (int64_t t2 = 0; t2 < cap; ++t2)
              for (int64_t d = 0; d < D; ++d) {
                pkv[l](b, h, t2, d) = m.kv[l](b, h, t2, d);
                pvv[l](b, h, t2, d) = m.vv[l](b, h, t2, d);
              }
      }
      const int64_t S = L * B * (gran ? H : 1);
      std::vector<int32_t> s_len(S), p_len(S);
      {
        pk::compress_args<pk::kv_layers<float>, float> a;
        a.cache = m.cache();
        a.lengths = len.data();
        a.attention = m.pv.data();
        a.out.lengths = s_len.data();
        REQUIRE(pk::compress_host(plan, a) == cudaSuccess);
      }
      pk::compress_args<pk::paged_kv_layers<float>, float> a;
      a.cache = {pkv.data(), pvv.data(), nullptr, nullptr, L};
      a.lengths = len.data();
      a.attention = m.pv.data();
      a.out.lengths = p_len.data();
      REQUIRE(pk::compress_host(plan, a) == cudaSuccess);
      CHECK(p_len == s_len);
      const int64_t Hg = gran ? H : 1;
      for (int64_t l = 0; l < L; ++l)
        for (int64_t b = 0; b < B; ++b)
          for (int64_t h = 0; h < H; ++h)
            for (int64_t t = 0; t < s_len[(l * B + b) * Hg + (gran ? h : 0)]; ++t)
              for (int64_t d = 0; d < D; ++d) {
                CHECK(pkv[l](b, h, t, d) == m.kv[l](b, h, t, d));
                CHECK(pvv[l](b, h, t, d) == m.vv[l](b, h, t, d));
              }
      // a bad page id in one layer's table: the chain stops, nothing moves
      const std::vector<float> before = pk_;
      tables[size_t(2 * B * blocks + 1)] = int32_t(pages);
      std::vector<int32_t> lens2(static_cast<size_t>(S), -1);
      int32_t status = -1;
      a.lengths = p_len.data();
      a.lengths_per_segment = true;
      a.out.lengths = lens2.data();
      a.out.status = &status;
      CHECK(pk::compress_host(plan, a) == cudaErrorInvalidValue);
      CHECK(pk::last_error().why == pk::reason::out_of_range);
      CHECK(status == int32_t(pk::reason::out_of_range));
      CHECK(lens2 == p_len);
      CHECK(pk_ == before);
      // the window and key-norm scorers read K through one table: refused with per-layer tables
      for (auto sc : {pk::scorer_kind::window, pk::scorer_kind::key_norm}) {
        pk::compress_config c2 = cfg;
        c2.scorer = sc;
        c2.max_window = 4;
        pk::compress_plan p2;
        REQUIRE(pk::make_plan(c2, p2) == cudaSuccess);
        CHECK(pk::compress_host(p2, a) == cudaErrorInvalidValue);
        CHECK(pk::last_error().why == pk::reason::unsupported);
      }
    }
}
