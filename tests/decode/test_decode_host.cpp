// Decode-time budget upkeep, host backend: the plan and state, the budget rules, and long generations (10 000
// steps) of every policy against the independent reference (lengths every step, rows / order / scores at checks).
#include <doctest/doctest.h>

#include "decode_host_gen.hpp"

#include <numeric>

namespace {

using namespace decode_test;
using prefixkv_test::make_rng;

pk::decode_config base_config(int64_t L, int64_t B, int64_t H, int64_t G, int64_t cap) {
  pk::decode_config c;
  c.layers = L;
  c.max_batch = B;
  c.kv_heads = H;
  c.q_heads = H * G;
  c.head_dim = 3;
  c.max_tokens = cap;
  return c;
}

}  // namespace

TEST_CASE("decode plan: can_implement rejects bad configurations with a reason") {
  pk::decode_config c = base_config(4, 2, 2, 2, 100);
  pk::decode_plan plan;
  REQUIRE(pk::make_plan(c, plan) == cudaSuccess);
  CHECK(plan.valid);
  auto rejects = [&](auto edit, pk::reason why) {
    pk::decode_config d = c;
    edit(d);
    pk::decode_plan p2;
    CHECK(pk::make_plan(d, p2) == cudaErrorInvalidValue);
    CHECK(pk::last_error().why == why);
    CHECK(!p2.valid);
  };
  rejects([](auto& d) { d.layers = 0; }, pk::reason::bad_parameter);
  rejects([](auto& d) { d.layers = pk::compact_max_layers + 1; }, pk::reason::unsupported);
  rejects([](auto& d) { d.q_heads = 3; }, pk::reason::shape_mismatch);
  rejects([](auto& d) { d.max_tokens = -1; }, pk::reason::negative_extent);
  rejects([](auto& d) { d.max_tokens = int64_t(1) << 40; }, pk::reason::out_of_range);
  rejects([](auto& d) { d.policy = pk::decode_policy(7); }, pk::reason::bad_parameter);
  rejects([](auto& d) { d.order = pk::decode_order(7); }, pk::reason::bad_parameter);
  rejects([](auto& d) { d.gran = pk::granularity(7); }, pk::reason::bad_parameter);
  rejects([](auto& d) { d.horizon = -1; }, pk::reason::bad_parameter);
  rejects([](auto& d) { d.slack = -1; }, pk::reason::bad_parameter);
  rejects([](auto& d) { d.protect.recent = -1; }, pk::reason::bad_parameter);
  rejects([](auto& d) { d.rebalance = true; }, pk::reason::bad_parameter);  // score policy
  const double bad[4] = {0.1, 1.5, 0.2, 0.3};
  rejects([&](auto& d) { d.profile = bad; }, pk::reason::bad_parameter);
  const double good[4] = {0.1, 0.5, 0.2, 0.3};
  rejects([&](auto& d) { d.profile = good; d.policy = pk::decode_policy::amortised; d.rebalance = true; },
          pk::reason::bad_parameter);
  // the profile is copied as keep fractions
  std::vector<double> prof(good, good + 4);
  c.profile = prof.data();
  REQUIRE(pk::make_plan(c, plan) == cudaSuccess);
  prof.assign(4, 0.9);
  CHECK(plan.keep[1] == 0.5);
  CHECK(plan.cfg.profile == nullptr);
  CHECK(plan.keep_of(2) == 1.0 - 0.2);
  // state binding: 256-byte aligned memory of the queried size
  size_t bytes = 0;
  REQUIRE(pk::decode_state_bytes(plan, bytes) == cudaSuccess);
  std::vector<unsigned char> mem(bytes + 256);
  void* aligned = mem.data() + (256 - reinterpret_cast<uintptr_t>(mem.data()) % 256) % 256;
  pk::decode_state st;
  CHECK(pk::decode_state_bind(plan, aligned, bytes - 1, st) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::workspace_too_small);
  CHECK(st.lengths == nullptr);
  REQUIRE(pk::decode_state_bind(plan, aligned, bytes, st) == cudaSuccess);
  CHECK(st.scores != nullptr);
  CHECK(st.stamps != nullptr);
  CHECK(st.position == nullptr);
  pk::decode_plan unmade;
  CHECK(pk::decode_state_bytes(unmade, bytes) == cudaErrorInvalidValue);
}

TEST_CASE("decode budgets: the paper's rule equals the official float64 line, fractions are exact ceilings") {
  // largest n with int(n - N * keep) <= 0, for awkward keep fractions and many N
  const double fs[] = {0.0, 0.1, 0.2, 0.3, 0.333, 0.5, 0.7, 0.9, 0.97, 0.999, 1.0};
  for (double f : fs)
    for (int64_t N = 0; N < 3000; N += 7) {
      const double keep = 1.0 - f;
      const int64_t t = pk::detail::decode_paper_target(N, keep);
      CHECK(!official_over(t, N, keep));
      CHECK(official_over(t + 1, N, keep));
      CHECK(t >= 0);
    }
  // exact fractions: ceil(N n0 / N0), also for products near 2^62
  CHECK(pk::detail::decode_ceil_fraction(10, 3, 7) == 5);
  CHECK(pk::detail::decode_ceil_fraction(14, 3, 7) == 6);
  CHECK(pk::detail::decode_ceil_fraction(int64_t(1) << 40, int64_t(1) << 30, (int64_t(1) << 31) - 1) ==
        ((int64_t(1) << 39) + 257));  // 2^39 + 256 + 256 / (2^31 - 1), rounded up
  CHECK(pk::detail::decode_budget(1000, -1.0, 40, 100, 0) == 400);
  CHECK(pk::detail::decode_budget(1001, -1.0, 40, 100, 0) == 401);  // ceil(400.4)
  CHECK(pk::detail::decode_budget(5000, -1.0, 40, 100, 2000) == 800);  // frozen at the horizon
  CHECK(pk::detail::decode_budget(77, -1.0, 0, 0, 0) == 77);          // nothing seen: keep everything
  // the fixed row of the official code
  CHECK(pk::detail::decode_fixed_row(100, -25) == 75);
  CHECK(pk::detail::decode_fixed_row(20, -25) == 10);
  CHECK(pk::detail::decode_fixed_row(100, 7) == 7);
  // the schedule of the amortised policy: every slack + 1 tokens
  pk::decode_config c = base_config(1, 1, 1, 1, 10);
  c.policy = pk::decode_policy::amortised;
  c.slack = 3;
  pk::decode_plan plan;
  REQUIRE(pk::make_plan(c, plan) == cudaSuccess);
  pk::decode_state st;
  std::vector<int> fired;
  for (int i = 1; i <= 12; ++i)
    if (pk::decode_schedule(plan, st, 1)) fired.push_back(i);
  CHECK(fired == std::vector<int>{4, 8, 12});
}

TEST_CASE("decode fixed_position: 10 000 steps with a profile are the official code's evictions") {
  auto rng = make_rng(101);
  const std::vector<double> f = {0.9, 0.95, 0.8};
  pk::decode_config c = base_config(3, 2, 2, 2, 2400);
  c.policy = pk::decode_policy::fixed_position;
  c.profile = f.data();
  host_gen g(c, 2, 3, rng());
  const std::vector<int64_t> N0 = {180, 211};
  // prefill as the official code: rint(f N0) evicted per layer
  g.init(N0, [&](int64_t l, int64_t b, int64_t) { return N0[b] - int64_t(std::nearbyint(f[l] * double(N0[b]))); }, rng);
  for (int i = 0; i < 10000; ++i) {
    g.step_once(pk::decode_observe::none);
    if (i % 1000 == 999) g.check_content();
  }
  g.check_content();
  CHECK(g.max_evicted == 1);  // one row per step, as the official code removes
  // the budget is met exactly: every segment sits at the paper's target
  for (int64_t l = 0; l < 3; ++l)
    for (int64_t b = 0; b < 2; ++b) {
      const int64_t s = g.plan.state_index(l, b, 0);
      CHECK(g.st.lengths[s] == pk::detail::decode_paper_target(g.st.seen[s], 1.0 - f[l]));
      CHECK(g.st.seen[s] == N0[b] + 10000);
    }
}

TEST_CASE("decode fixed_position: fractions from init, distance > 0, the n0 / 2 fallback and a horizon") {
  auto rng = make_rng(102);
  for (int64_t distance : {int64_t(-25), int64_t(-40), int64_t(9)}) {
    CAPTURE(distance);
    pk::decode_config c = base_config(2, 3, 2, 1, 1500);
    c.policy = pk::decode_policy::fixed_position;
    c.distance = distance;
    c.horizon = distance == -40 ? 1500 : 0;
    host_gen g(c, 1, 2, rng());
    const std::vector<int64_t> N0 = {90, 150, 60};
    g.init(N0, [&](int64_t l, int64_t b, int64_t) { return int64_t(12 + (l * 7 + b * 5) % 30); }, rng);
    for (int i = 0; i < 2000; ++i) {
      g.step_once(pk::decode_observe::none);
      if (i % 250 == 0) g.check_content();
    }
    g.check_content();
  }
}

TEST_CASE("decode score (reuse order): 10 000 steps keep the tokens with the highest accumulated attention") {
  auto rng = make_rng(103);
  pk::decode_config c = base_config(2, 2, 2, 2, 1400);
  c.policy = pk::decode_policy::score;
  c.order = pk::decode_order::reuse;
  c.protect = {4, 8};
  host_gen g(c, 2, 3, rng());
  const std::vector<int64_t> N0 = {300, 257};
  g.init(N0, [&](int64_t l, int64_t b, int64_t) { return int64_t(20 + 9 * l + 3 * b); }, rng);
  std::vector<int32_t> active(2, 1);
  for (int i = 0; i < 10000; ++i) {
    active[1] = i % 7 != 3;  // sequence 1 pauses now and then
    g.step_once(pk::decode_observe::attention, &active);
    if (i % 1000 == 999) g.check_content();
  }
  g.check_content();
  for (int64_t l = 0; l < 2; ++l)
    for (int64_t b = 0; b < 2; ++b) {
      const int64_t s = g.plan.state_index(l, b, 0);
      const auto& r = g.ref[s];
      CHECK(g.st.lengths[s] == (g.st.seen[s] * r.n0 + r.N0 - 1) / r.N0);  // exactly the budget
    }
}

TEST_CASE("decode score (preserve order, kv-head segments, horizon): rows stay in token order") {
  auto rng = make_rng(104);
  pk::decode_config c = base_config(2, 2, 3, 2, 600);
  c.policy = pk::decode_policy::score;
  c.order = pk::decode_order::preserve;
  c.gran = pk::granularity::head;
  c.protect = {2, 5};
  c.horizon = 1500;
  host_gen g(c, 2, 2, rng());
  const std::vector<int64_t> N0 = {200, 120};
  g.init(N0, [&](int64_t l, int64_t b, int64_t h) { return int64_t(10 + 11 * h + 5 * l + b); }, rng);
  for (int i = 0; i < 3000; ++i) {
    g.step_once(pk::decode_observe::attention);
    if (i % 500 == 0) g.check_content();
  }
  g.check_content();
}

TEST_CASE("decode score: a large first eviction goes in rounds of decode_round, both orders") {
  auto rng = make_rng(105);
  for (auto order : {pk::decode_order::reuse, pk::decode_order::preserve}) {
    pk::decode_config c = base_config(1, 2, 1, 2, 3200);
    c.policy = pk::decode_policy::score;
    c.order = order;
    c.protect = {3, 6};
    c.horizon = 50;  // budget 0.5 * 50 = 25: ~2970 evictions at the first step
    host_gen g(c, 2, 2, rng());
    g.init({3100, 3050}, [&](int64_t, int64_t b, int64_t) { return int64_t(1550 + 20 * b); }, rng);
    // set running scores first (distinct values), then step with attention
    g.step_once(pk::decode_observe::attention);
    g.check_content();
    for (int i = 0; i < 30; ++i) g.step_once(pk::decode_observe::attention);
    g.check_content();
    CHECK(g.st.lengths[0] == 25);
  }
}

TEST_CASE("decode score: equal scores evict the newest candidate") {
  auto rng = make_rng(106);
  pk::decode_config c = base_config(1, 1, 1, 1, 64);
  c.policy = pk::decode_policy::score;
  c.protect = {2, 3};
  host_gen g(c, 1, 2, rng());
  g.init({20}, [](int64_t, int64_t, int64_t) { return int64_t(10); }, rng);
  const std::vector<int64_t> before = g.ref[0].ids;
  g.step_once(pk::decode_observe::none);  // all scores 0: budget ceil(21 / 2) = 11, nothing to evict
  g.step_once(pk::decode_observe::none);  // 12 rows, budget 11: the newest candidate (it just left the window) goes
  g.check_content();
  std::vector<int64_t> expect = before;
  expect.push_back(20);
  expect.push_back(21);
  expect.erase(expect.begin() + 8);  // candidates are rows [2, 9): row 8 holds the newest of them
  std::vector<int64_t> got = g.ref[0].ids;
  CHECK(got == expect);
}

TEST_CASE("decode amortised: 10 000 steps, compressions every slack + 1 tokens keep the top-scored tokens") {
  auto rng = make_rng(107);
  for (int64_t slack : {int64_t(16), int64_t(0)}) {
    CAPTURE(slack);
    pk::decode_config c = base_config(2, 2, 2, 2, 2000);
    c.policy = pk::decode_policy::amortised;
    c.slack = slack;
    c.protect = {4, 1};
    c.gran = slack == 0 ? pk::granularity::head : pk::granularity::layer;
    host_gen g(c, 2, 2, rng());
    const std::vector<int64_t> N0 = {250, 180};
    g.init(N0, [&](int64_t l, int64_t b, int64_t h) { return int64_t(15 + 7 * l + 4 * b + 3 * h); }, rng);
    const int steps = slack == 0 ? 2000 : 10000;
    for (int i = 0; i < steps; ++i) {
      g.step_once(pk::decode_observe::attention);
      // between compressions a segment exceeds its budget by at most `pending` <= slack
      for (int64_t l = 0; l < 2; ++l)
        for (int64_t b = 0; b < 2; ++b)
          for (int64_t h = 0; h < g.Hs; ++h) {
            const int64_t s = g.plan.state_index(l, b, h);
            const auto& r = g.ref[s];
            const int64_t T = (g.st.seen[s] * r.n0 + r.N0 - 1) / r.N0;
            REQUIRE(g.st.lengths[s] <= T + g.pending);
            REQUIRE(g.pending <= slack);
          }
      if (i % 1000 == 999) g.check_content();
    }
    g.check_content();
  }
}

TEST_CASE("decode amortised rebalance: each sequence keeps its total, the layer split is re-solved") {
  auto rng = make_rng(108);
  pk::decode_config c = base_config(3, 2, 1, 2, 900);
  c.policy = pk::decode_policy::amortised;
  c.slack = 7;
  c.rebalance = true;
  host_gen g(c, 2, 2, rng());
  g.init({300, 260}, [&](int64_t l, int64_t b, int64_t) { return int64_t(30 + 25 * l + 10 * b); }, rng);
  for (int i = 0; i < 400; ++i) {
    std::vector<int64_t> before(6);
    for (int64_t s = 0; s < 6; ++s) before[s] = g.st.lengths[s];
    // the state alone (the reference has no global solver): totals per sequence after each compression
    const bool due = g.st.pending + 1 > c.slack;
    std::vector<int64_t> targets(2, 0);
    if (due)
      for (int64_t l = 0; l < 3; ++l)
        for (int64_t b = 0; b < 2; ++b) {
          const int64_t s = g.plan.state_index(l, b, 0);
          const int64_t n = g.st.lengths[s] + 1, N = g.st.seen[s] + 1;
          targets[b] += pk::decode_target_length(g.plan, l, n, N, g.st.frac_num[s], g.st.frac_den[s], 0);
        }
    pk::decode_step_args<pk::kv_layers<float>, float> a;
    for (int64_t l = 0; l < 3; ++l)
      for (int64_t b = 0; b < 2; ++b) g.write_row(l, b, 0, g.st.lengths[g.plan.state_index(l, b, 0)], g.seen[b]);
    a.cache = g.cache();
    a.observe = pk::decode_observe::attention;
    for (auto& x : g.p) x = float(rng() % 1000) / 1000.0f;
    a.attention = g.pv.data();
    REQUIRE(pk::decode_step_host(g.plan, g.st, a) == cudaSuccess);
    for (auto& x : g.seen) ++x;
    if (due) {
      CHECK(g.st.pending == 0);
      for (int64_t b = 0; b < 2; ++b) {
        int64_t total = 0;
        for (int64_t l = 0; l < 3; ++l) {
          const int64_t s = g.plan.state_index(l, b, 0);
          total += g.st.lengths[s];
          CHECK(g.st.frac_num[s] == g.st.lengths[s]);  // the new fractions
          CHECK(g.st.frac_den[s] == g.st.seen[s]);
        }
        CHECK(total == targets[b]);
      }
    }
  }
  CHECK(*g.st.status == 0);
}

TEST_CASE("decode amortised rebalance with a horizon: each sequence's total stays at its cap") {
  auto rng = make_rng(110);
  pk::decode_config c = base_config(3, 2, 1, 2, 600);
  c.policy = pk::decode_policy::amortised;
  c.slack = 5;
  c.rebalance = true;
  c.horizon = 320;  // sequence 0 starts past it, sequence 1 reaches it after 60 steps
  host_gen g(c, 2, 2, rng());
  g.init({400, 260}, [&](int64_t l, int64_t b, int64_t) { return int64_t(30 + 25 * l + 10 * b); }, rng);
  // the cap of each sequence: the sum of its segments' budgets at the horizon, T = ceil(min(N, 320) * n0 / N0)
  std::vector<int64_t> cap(2, 0);
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t l = 0; l < 3; ++l) {
      const int64_t n0 = 30 + 25 * l + 10 * b, N0 = b == 0 ? 400 : 260;
      cap[b] += (320 * n0 + N0 - 1) / N0;
    }
  int compressions = 0;
  std::vector<int64_t> first(2, -1);
  for (int i = 0; i < 300; ++i) {
    const bool due = g.st.pending + 1 > c.slack;
    pk::decode_step_args<pk::kv_layers<float>, float> a;
    for (int64_t l = 0; l < 3; ++l)
      for (int64_t b = 0; b < 2; ++b) g.write_row(l, b, 0, g.st.lengths[g.plan.state_index(l, b, 0)], g.seen[b]);
    a.cache = g.cache();
    a.observe = pk::decode_observe::attention;
    for (auto& x : g.p) x = float(rng() % 1000) / 1000.0f;
    a.attention = g.pv.data();
    REQUIRE(pk::decode_step_host(g.plan, g.st, a) == cudaSuccess);
    for (auto& x : g.seen) ++x;
    if (!due) continue;
    ++compressions;
    for (int64_t b = 0; b < 2; ++b) {
      int64_t total = 0;
      for (int64_t l = 0; l < 3; ++l) {
        const int64_t s = g.plan.state_index(l, b, 0);
        total += g.st.lengths[s];
        CHECK(g.st.frac_den[s] == std::min<int64_t>(g.seen[b], 320));
      }
      CAPTURE(i);
      CAPTURE(b);
      if (g.seen[b] < 320) continue;
      if (b == 0 && first[b] < 0) CHECK(total == cap[b]);  // the first compression: the init fractions' cap
      if (first[b] < 0) first[b] = total;
      CHECK(total == first[b]);  // past the horizon the total stays (no shrinking compression after compression)
    }
  }
  CHECK(compressions == 50);
  CHECK(first[1] > 0);
  CHECK(*g.st.status == 0);
}

TEST_CASE("decode: bad observations and lengths are reported, the cache stays consistent") {
  auto rng = make_rng(109);
  pk::decode_config c = base_config(1, 2, 1, 1, 40);
  c.policy = pk::decode_policy::score;
  c.protect = {1, 1};
  host_gen g(c, 1, 2, rng());
  g.init({30, 30}, [](int64_t, int64_t, int64_t) { return int64_t(20); }, rng);
  std::vector<float> obs(2 * 50, 0.5f);
  obs[3] = std::nanf("");
  obs[50 + 4] = -1.0f;
  pk::decode_step_args<pk::kv_layers<float>, float> a;
  a.cache = g.cache();
  a.observe = pk::decode_observe::set_scores;
  a.scores = obs.data();
  a.score_stride = 50;
  REQUIRE(pk::decode_step_host(g.plan, g.st, a) == cudaSuccess);
  CHECK(*g.st.status == int32_t(pk::reason::nonfinite_input));  // the smaller of the two reasons
  CHECK(g.st.scores[3] == 0.0f);
  CHECK(g.st.scores[40 + 4] == 0.0f);
  CHECK(g.st.scores[5] == 0.5f);
  // a stride shorter than the new lengths: observation skipped, reported
  *g.st.status = 0;
  a.score_stride = 10;
  REQUIRE(pk::decode_step_host(g.plan, g.st, a) == cudaSuccess);
  CHECK(*g.st.status == int32_t(pk::reason::out_of_range));
  // tokens that do not fit: the segment is left unchanged
  *g.st.status = 0;
  a.observe = pk::decode_observe::none;
  a.appended = 30;
  const int32_t n_before = g.st.lengths[0];
  const std::vector<float> k_before = g.k;
  REQUIRE(pk::decode_step_host(g.plan, g.st, a) == cudaSuccess);
  CHECK(*g.st.status == int32_t(pk::reason::capacity_exceeded));
  CHECK(g.st.lengths[0] == n_before);
  CHECK(g.k == k_before);
}

TEST_CASE("decode: host-visible bad arguments are rejected before anything is written") {
  auto rng = make_rng(110);
  pk::decode_config c = base_config(2, 2, 2, 2, 60);
  c.policy = pk::decode_policy::score;
  host_gen g(c, 2, 2, rng());
  g.init({40, 40}, [](int64_t, int64_t, int64_t) { return int64_t(30); }, rng);
  const std::vector<int32_t> len_before(g.buf.lengths.begin(), g.buf.lengths.end());
  auto rejects = [&](auto edit, pk::reason why) {
    pk::decode_step_args<pk::kv_layers<float>, float> a;
    a.cache = g.cache();
    a.observe = pk::decode_observe::attention;
    a.attention = g.pv.data();
    std::vector<pk::kv_view<float>> k2 = g.kv;
    std::vector<pk::kv_view<const float>> p2 = g.pv;
    pk::decode_plan pl = g.plan;
    edit(a, k2, p2, pl);
    const std::vector<float> kb = g.k;
    CHECK(pk::decode_step_host(pl, g.st, a) == cudaErrorInvalidValue);
    CHECK(pk::last_error().why == why);
    CHECK(g.k == kb);
    for (size_t i = 0; i < len_before.size(); ++i) CHECK(g.st.lengths[i] == len_before[i]);
  };
  using A = pk::decode_step_args<pk::kv_layers<float>, float>;
  using K = std::vector<pk::kv_view<float>>;
  using P = std::vector<pk::kv_view<const float>>;
  rejects([](A& a, K&, P&, pk::decode_plan& pl) { pl.valid = false; (void)a; }, pk::reason::bad_parameter);
  rejects([](A& a, K&, P&, pk::decode_plan&) { a.cache.layers = 1; }, pk::reason::shape_mismatch);
  rejects([](A& a, K&, P&, pk::decode_plan&) { a.appended = -1; }, pk::reason::bad_parameter);
  rejects([](A& a, K&, P&, pk::decode_plan&) { a.observe = pk::decode_observe(9); }, pk::reason::bad_parameter);
  rejects([](A& a, K&, P&, pk::decode_plan&) { a.when = pk::decode_when(9); }, pk::reason::bad_parameter);
  rejects([](A& a, K&, P&, pk::decode_plan&) { a.attention = nullptr; }, pk::reason::null_pointer);
  rejects([](A& a, K&, P& p, pk::decode_plan&) { p[1].stride_batch += 1; a.attention = p.data(); }, pk::reason::shape_mismatch);
  rejects([](A& a, K&, P& p, pk::decode_plan&) { for (auto& x : p) x.heads = 2; a.attention = p.data(); }, pk::reason::shape_mismatch);
  rejects([](A& a, K&, P&, pk::decode_plan&) { a.observe = pk::decode_observe::add_scores; }, pk::reason::null_pointer);
  rejects([](A& a, K& k, P&, pk::decode_plan&) { k[1].stride_batch += 2; a.cache.k = k.data(); }, pk::reason::shape_mismatch);
  rejects([](A& a, K& k, P&, pk::decode_plan&) { for (auto& x : k) x.dim = 4; a.cache.k = k.data(); }, pk::reason::shape_mismatch);
  {  // a paged cache with per-layer block tables: refused (the row moves address every layer through one table)
    const int64_t P = 4, blocks = 15, pages = 2 * blocks, row = g.H * g.D;
    std::vector<float> pool(size_t(2 * pages * P * row), 1.0f);
    std::vector<int32_t> tables(size_t(2 * 2 * blocks));
    std::iota(tables.begin(), tables.end(), 0);  // layer 0: pages 0..29, layer 1: pages 30..59 of its own table
    for (auto& t : tables) t %= int32_t(pages);
    std::vector<pk::paged_kv_view<float>> pk_;
    for (int64_t l = 0; l < 2; ++l)
      pk_.push_back(pk::make_paged_kv_view(pool.data() + l * pages * P * row, pk::page_layout::nhd, pages, P, g.H, g.D,
                                           tables.data() + l * 2 * blocks, 2, blocks));
    pk::decode_step_args<pk::paged_kv_layers<float>, float> pa;
    pa.cache = {pk_.data(), nullptr, nullptr, nullptr, 2};
    const std::vector<float> pool_before = pool;
    CHECK(pk::decode_step_host(g.plan, g.st, pa) == cudaErrorInvalidValue);
    CHECK(pk::last_error().why == pk::reason::unsupported);
    CHECK(pool == pool_before);
    for (size_t i = 0; i < len_before.size(); ++i) CHECK(g.st.lengths[i] == len_before[i]);
    pk_[1].block_table = pk_[0].block_table;  // one table for both layers: accepted
    CHECK(pk::decode_step_host(g.plan, g.st, pa) == cudaSuccess);
  }
  pk::decode_state unbound;
  pk::decode_step_args<pk::kv_layers<float>, float> a;
  a.cache = g.cache();
  CHECK(pk::decode_step_host(g.plan, unbound, a) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::null_pointer);
  pk::decode_init_args ia;
  ia.batch = 3;
  CHECK(pk::decode_init_host(g.plan, g.st, ia) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::capacity_exceeded);
  ia.batch = 1;
  CHECK(pk::decode_init_host(g.plan, g.st, ia) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::null_pointer);
}

TEST_CASE("decode init: per-sequence lengths, fewer sequences than max_batch, clamped inputs reported") {
  pk::decode_config c = base_config(2, 3, 2, 2, 50);
  c.head_dim = 2;
  c.policy = pk::decode_policy::fixed_position;
  c.distance = -10;
  pk::decode_plan plan;
  REQUIRE(pk::make_plan(c, plan) == cudaSuccess);
  pk::decode_state_buffers buf(plan);
  pk::decode_state st = buf.state();
  const std::vector<int32_t> len = {30, 70}, seen = {100, 20};
  pk::decode_init_args ia;
  ia.batch = 2;
  ia.lengths = len.data();
  ia.seen = seen.data();
  REQUIRE(pk::decode_init_host(plan, st, ia) == cudaSuccess);
  CHECK(*st.status == int32_t(pk::reason::out_of_range));
  for (int64_t l = 0; l < 2; ++l) {
    const int64_t s0 = plan.state_index(l, 0, 0), s1 = plan.state_index(l, 1, 0), s2 = plan.state_index(l, 2, 0);
    CHECK(st.lengths[s0] == 30);
    CHECK(st.seen[s0] == 100);
    CHECK(st.position[s0] == 20);
    CHECK(st.lengths[s1] == 50);  // clamped to max_tokens
    CHECK(st.seen[s1] == 50);     // raised to the length
    CHECK(st.frac_num[s1] == 50);
    CHECK(st.frac_den[s1] == 50);
    CHECK(st.lengths[s2] == 0);   // not given: empty
    CHECK(st.seen[s2] == 0);
  }
}

TEST_CASE("decode init: initial scores are sanitised, rows past the score stride start at 0") {
  pk::decode_config c = base_config(1, 1, 1, 1, 16);
  c.policy = pk::decode_policy::score;
  pk::decode_plan plan;
  REQUIRE(pk::make_plan(c, plan) == cudaSuccess);
  pk::decode_state_buffers buf(plan);
  pk::decode_state st = buf.state();
  const std::vector<int32_t> len = {8}, seen = {20};
  const std::vector<float> sc = {1, 2, std::nanf(""), 4, 5};
  pk::decode_init_args ia;
  ia.batch = 1;
  ia.lengths = len.data();
  ia.seen = seen.data();
  ia.scores = sc.data();
  ia.score_stride = 5;
  REQUIRE(pk::decode_init_host(plan, st, ia) == cudaSuccess);
  CHECK(*st.status == int32_t(pk::reason::out_of_range));
  CHECK(buf.scores == std::vector<float>{1, 2, 0, 4, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0});
  CHECK(buf.stamps[7] == 7);
}
