// Decode tests: a synthetic generation on a host float cache, driven through prefixkv's host backend and through
// the independent reference (decode_reference.hpp) side by side.
#pragma once

#include <doctest/doctest.h>

#include "decode_reference.hpp"
#include "support/test_random.hpp"

#include <cmath>
#include <string>

namespace decode_test {

//! A float cache [L][B][H][cap][D] whose rows carry their token id (K[.., 0] = id, V[.., 0] = -id - 1) and a tag
//! of their lane in the other elements, the decode state, and the reference.
struct host_gen {
  pk::decode_config cfg;
  pk::decode_plan plan;
  int64_t L, B, H, G, D, cap, Hq, Hs;
  std::vector<float> k, v, p;
  std::vector<pk::kv_view<float>> kv, vv;
  std::vector<pk::kv_view<const float>> pv;
  pk::decode_state_buffers buf;
  pk::decode_state st;
  std::vector<ref_segment> ref;   // state order
  std::vector<int64_t> seen;      // (B) tokens seen per sequence
  std::vector<double> keep;       // profile keep fractions (empty: fractions from init)
  uint64_t seed;
  int64_t step = 0, pending = 0, max_evicted = 0;

  host_gen(const pk::decode_config& c, int64_t G_, int64_t D_, uint64_t seed_)
      : cfg(c), L(c.layers), B(c.max_batch), H(c.kv_heads), G(G_), D(D_), cap(c.max_tokens), Hq(c.q_heads),
        Hs(c.gran == pk::granularity::head ? c.kv_heads : 1), seed(seed_) {
    cfg.head_dim = D;
    REQUIRE(pk::make_plan(cfg, plan) == cudaSuccess);
    if (c.profile)
      for (int64_t l = 0; l < L; ++l) keep.push_back(1.0 - c.profile[l]);
    buf = pk::decode_state_buffers(plan);
    st = buf.state();
    const size_t per = size_t(B * H * cap * D);
    k.assign(per * L, 0.0f);
    v.assign(per * L, 0.0f);
    p.assign(size_t(L * B * Hq * cap), 0.0f);
    for (int64_t l = 0; l < L; ++l) {
      kv.push_back(pk::make_kv_view_bhsd(k.data() + l * per, B, H, cap, D));
      vv.push_back(pk::make_kv_view_bhsd(v.data() + l * per, B, H, cap, D));
      pv.push_back(pk::make_kv_view_bhsd<const float>(p.data() + l * B * Hq * cap, B, Hq, 1, cap));
    }
    ref.resize(size_t(plan.state_segments()));
  }
  pk::kv_layers<float> cache() const { return {kv.data(), vv.data(), nullptr, nullptr, L}; }
  float tag(int64_t l, int64_t h, int64_t d) const { return float(l * 1000 + h * 10 + d); }
  void write_row(int64_t l, int64_t b, int64_t h, int64_t r, int64_t id) {
    kv[l](b, h, r, 0) = float(id);
    vv[l](b, h, r, 0) = -float(id) - 1.0f;
    for (int64_t d = 1; d < D; ++d) {
      kv[l](b, h, r, d) = tag(l, h, d);
      vv[l](b, h, r, d) = -tag(l, h, d);
    }
  }
  //! Heads a segment's rows span.
  int64_t h_lo(int64_t h) const { return Hs == 1 ? 0 : h; }
  int64_t h_hi(int64_t h) const { return Hs == 1 ? H : h + 1; }
  //! The ids in rows [0, n) of a segment; every lane of the row must agree (K, V, tags).
  std::vector<int64_t> ids_of(int64_t l, int64_t b, int64_t h, int64_t n) const {
    std::vector<int64_t> ids;
    for (int64_t r = 0; r < n; ++r) {
      const float id = kv[l](b, h_lo(h), r, 0);
      for (int64_t hh = h_lo(h); hh < h_hi(h); ++hh) {
        REQUIRE(kv[l](b, hh, r, 0) == id);
        REQUIRE(vv[l](b, hh, r, 0) == -id - 1.0f);
        for (int64_t d = 1; d < D; ++d) {
          REQUIRE(kv[l](b, hh, r, d) == tag(l, hh, d));
          REQUIRE(vv[l](b, hh, r, d) == -tag(l, hh, d));
        }
      }
      ids.push_back(int64_t(id));
    }
    return ids;
  }

  //! Prefill: sequence b has seen N0[b] tokens; segment s keeps n0 of them (the first `sinks`, the last one, and
  //! a random sorted subset), `n0_of(l, b, h)` chooses n0.
  template <class N0Of>
  void init(const std::vector<int64_t>& N0, N0Of n0_of, std::mt19937_64& rng) {
    seen = N0;
    std::vector<int32_t> lens(static_cast<size_t>(L * B * Hs)), sn(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) sn[b] = int32_t(N0[b]);
    for (int64_t l = 0; l < L; ++l)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < Hs; ++h) {
          const int64_t n0 = n0_of(l, b, h), N = N0[b];
          REQUIRE(n0 <= N);
          std::vector<int64_t> all(static_cast<size_t>(N));
          for (int64_t i = 0; i < N; ++i) all[i] = i;
          const int64_t fixed_lo = std::min<int64_t>(cfg.protect.sinks, n0);
          std::shuffle(all.begin() + fixed_lo, all.end() - (n0 > fixed_lo ? 1 : 0), rng);
          std::vector<int64_t> ids(all.begin(), all.begin() + fixed_lo);
          if (n0 > fixed_lo) {
            ids.insert(ids.end(), all.begin() + fixed_lo, all.begin() + (n0 - 1));
            ids.push_back(N - 1);
          }
          std::sort(ids.begin(), ids.end());
          REQUIRE(int64_t(ids.size()) == n0);
          for (int64_t r = 0; r < n0; ++r)
            for (int64_t hh = h_lo(h); hh < h_hi(h); ++hh) write_row(l, b, hh, r, ids[r]);
          ref_segment& rs = ref[plan.state_index(l, b, h)];
          rs.ids = ids;
          for (int64_t id : ids) rs.score(id) = 0.0f;
          rs.n0 = n0;
          rs.N0 = N;
          rs.N = N;
          rs.p = cfg.distance > 0 ? cfg.distance : (n0 + cfg.distance >= 1 ? n0 + cfg.distance : n0 / 2);
          lens[(l * B + b) * Hs + h] = int32_t(n0);
        }
    pk::decode_init_args ia;
    ia.batch = B;
    ia.lengths = lens.data();
    ia.lengths_per_segment = true;
    ia.seen = sn.data();
    REQUIRE(pk::decode_init_host(plan, st, ia) == cudaSuccess);
    CHECK(*st.status == 0);
    for (int64_t l = 0; l < L; ++l)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < Hs; ++h) {
          const int64_t s = plan.state_index(l, b, h);
          CHECK(st.lengths[s] == int32_t(ref[s].ids.size()));
          if (st.position) CHECK(st.position[s] == ref[s].p);
        }
  }

  //! One generated token for the active sequences: rows written, P built from the ids, both sides stepped.
  void step_once(pk::decode_observe observe, const std::vector<int32_t>* active = nullptr) {
    const bool with_scores = cfg.policy != pk::decode_policy::fixed_position;
    // new rows and the observation (P for every row of every segment, from the ids its rows hold)
    for (int64_t l = 0; l < L; ++l)
      for (int64_t b = 0; b < B; ++b) {
        const bool on = active == nullptr || (*active)[b] != 0;
        for (int64_t h = 0; h < Hs; ++h) {
          const int64_t s = plan.state_index(l, b, h), n = st.lengths[s];
          if (on)
            for (int64_t hh = h_lo(h); hh < h_hi(h); ++hh) write_row(l, b, hh, n, seen[b]);
          const int64_t n1 = n + (on ? 1 : 0);
          if (observe != pk::decode_observe::attention) continue;
          for (int64_t hq = h_lo(h) * G; hq < h_hi(h) * G; ++hq)
            for (int64_t r = 0; r < n1; ++r)
              p[((l * B + b) * Hq + hq) * cap + r] = observed(seed, step, l, b, hq, int64_t(kv[l](b, hq / G, r, 0)));
        }
      }
    pk::decode_step_args<pk::kv_layers<float>, float> a;
    a.cache = cache();
    a.appended = 1;
    a.active = active ? active->data() : nullptr;
    a.observe = observe;
    a.attention = pv.data();
    st.pending = pending;
    REQUIRE(pk::decode_step_host(plan, st, a) == cudaSuccess);
    pending = st.pending;
    // reference
    bool compress = false;
    if (cfg.policy == pk::decode_policy::amortised) {
      ++ref_pending;
      if (ref_pending > cfg.slack) {
        ref_pending = 0;
        compress = true;
      }
    }
    for (int64_t b = 0; b < B; ++b) {
      const bool on = active == nullptr || (*active)[b] != 0;
      for (int64_t l = 0; l < L; ++l)
        for (int64_t h = 0; h < Hs; ++h) {
          ref_segment& rs = ref[plan.state_index(l, b, h)];
          if (on) {
            rs.ids.push_back(seen[b]);
            rs.score(seen[b]) = 0.0f;
            rs.N += 1;
          }
          if (with_scores && observe == pk::decode_observe::attention) {
            const int64_t g0 = Hs == 1 ? 0 : h * G, gn = Hs == 1 ? Hq : G;
            for (int64_t id : rs.ids) {
              float hs = 0.0f;
              for (int64_t g = 0; g < gn; ++g) hs += observed(seed, step, l, b, g0 + g, id);
              rs.score(id) = rs.score(id) + hs / float(gn);
            }
          }
          const int64_t n = int64_t(rs.ids.size());
          const int64_t T = ref_budget(cfg, keep.empty() ? nullptr : keep.data(), l, rs);
          if (cfg.policy == pk::decode_policy::fixed_position) {
            // the official code: one row at p per step while over budget (and while row p exists)
            const int64_t Ne = cfg.horizon > 0 ? std::min(rs.N, cfg.horizon) : rs.N;
            auto over = [&] {
              const int64_t m = int64_t(rs.ids.size());
              return keep.empty() ? m > T : official_over(m, Ne, keep[l]);
            };
            int64_t evicted = 0;
            while (rs.p < int64_t(rs.ids.size()) && over()) {
              rs.ids.erase(rs.ids.begin() + rs.p);
              ++evicted;
            }
            max_evicted = std::max(max_evicted, evicted);
          } else {
            const int64_t prot = std::min(n, cfg.protect.sinks + cfg.protect.recent);
            const int64_t target = std::min(n, std::max(T, prot));
            if (cfg.policy == pk::decode_policy::score && n > target) ref_evict_lowest(rs, cfg.protect, n - target);
            if (cfg.policy == pk::decode_policy::amortised && compress) ref_keep_highest(rs, cfg.protect, target - prot);
          }
        }
      if (on) ++seen[b];
    }
    ++step;
    // lengths follow the reference every step
    for (int64_t s = 0; s < plan.state_segments(); ++s) REQUIRE(st.lengths[s] == int32_t(ref[s].ids.size()));
  }
  int64_t ref_pending = 0;

  //! Rows, order, scores and budgets against the reference.
  void check_content() {
    for (int64_t l = 0; l < L; ++l)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < Hs; ++h) {
          const int64_t s = plan.state_index(l, b, h), n = st.lengths[s];
          const ref_segment& rs = ref[s];
          const std::vector<int64_t> got = ids_of(l, b, h, n);
          if (cfg.policy == pk::decode_policy::score && cfg.order == pk::decode_order::reuse) {
            std::vector<int64_t> a = got, e = rs.ids;
            std::sort(a.begin(), a.end());
            std::sort(e.begin(), e.end());
            REQUIRE(a == e);
            // sinks first and the recent window last, both in token order
            const int64_t sk = std::min<int64_t>(cfg.protect.sinks, n), rc = std::min<int64_t>(cfg.protect.recent, n - sk);
            for (int64_t i = 0; i < sk; ++i) REQUIRE(got[i] == e[i]);
            for (int64_t i = 0; i < rc; ++i) REQUIRE(got[n - rc + i] == e[n - rc + i]);
          } else {
            REQUIRE(got == rs.ids);
          }
          if (st.scores)
            for (int64_t r = 0; r < n; ++r) REQUIRE(st.scores[s * cap + r] == rs.score(got[r]));
          if (st.stamps)  // stamps order the tokens as their ids do
            for (int64_t r = 1; r < n; ++r)
              REQUIRE((st.stamps[s * cap + r] < st.stamps[s * cap + r - 1]) == (got[r] < got[r - 1]));
        }
    CHECK(*st.status == 0);
  }
};

}  // namespace decode_test
