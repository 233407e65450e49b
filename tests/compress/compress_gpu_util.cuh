// Shared helpers of the compressor's GPU tests: a random model (cache in any layout, finite values, ragged
// lengths) with a host image and a device mirror, the scorer inputs of every kind, and a runner that checks the
// device compressor against the host backend byte for byte (size query, plain launch and graph capture).
#pragma once

#include <doctest/doctest.h>

#include <prefixkv/compress/compress.cuh>

#include "compact/compact_test_util.cuh"

#include <algorithm>
#include <string>
#include <vector>

namespace compress_test {

using namespace prefixkv_test;
using compact_test::layout;

struct shape {
  int64_t L = 2, B = 2, H = 2, G = 2, T = 40, D = 64;  // G: q heads per kv head; T: token capacity
  int64_t page = 16;
  int64_t window = 8;  // window scorer queries
  int64_t queries = 5; // rows of the attention probabilities
  int tables = 0;      // paged: one block table, per-layer tables (a pool per layer), per-layer tables over one pool
};

template <class X>
X from_double(double v) {
  if constexpr (std::is_same_v<X, float>) return static_cast<float>(v);
  else return X::from_float(static_cast<float>(v));
}

//! A random model's cache and the scorer inputs, on the host and mirrored on the device.
template <class T, class P = T>
struct model {
  shape s;
  layout lay;
  compact_test::cache<T> cache;
  std::vector<unsigned char> image;  // the initial host image
  std::vector<int32_t> lengths;      // (B) or (L, B, Hg)
  // attention probabilities (L, B, Hq, queries, T), window queries (L, B, Hq, window, D), caller scores
  std::vector<P> p;
  std::vector<T> q;
  std::vector<float> lse, scores;
  device_buffer<P> dp;
  device_buffer<T> dq;
  device_buffer<float> dlse, dscores;
  device_buffer<int32_t> dlengths;
  std::vector<prefixkv::kv_view<const P>> hpv, dpv;
  std::vector<prefixkv::kv_view<const T>> hqv, dqv;
  std::vector<prefixkv::lse_view> hlse, dlsev;
  int64_t score_stride = 0;

  static compact_test::geometry geo(const shape& s) {
    compact_test::geometry g;
    g.L = s.L;
    g.B = s.B;
    g.H = s.H;
    g.T = s.T;
    g.D = s.D;
    g.page = s.page;
    g.tables = s.tables;
    return g;
  }

  model(layout l, const shape& sh, std::mt19937_64& rng, int64_t seg_heads, bool per_segment_lengths)
      : s(sh), lay(l), cache(l, geo(sh), rng, false) {
    // finite values in every viewed element (the byte image elsewhere stays random)
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    for (int kind = 0; kind < 2; ++kind)
      for (int64_t layer = 0; layer < s.L; ++layer)
        for (int64_t b = 0; b < s.B; ++b)
          for (int64_t h = 0; h < s.H; ++h)
            for (int64_t t = 0; t < s.T; ++t)
              for (int64_t d = 0; d < s.D; ++d) {
                const T v = from_double<T>(u(rng));
                if (compact_test::is_paged(l)) cache.hp[kind][layer](b, h, t, d) = v;
                else cache.hs[kind][layer](b, h, t, d) = v;
              }
    image = cache.host;
    cache.upload(image);
    // lengths: ragged, >= the window
    const int64_t lo = std::min<int64_t>(std::max<int64_t>(s.window, 8), s.T);
    auto pick = [&] { return static_cast<int32_t>(lo + int64_t(rng() % uint64_t(s.T - lo + 1))); };
    if (per_segment_lengths) {
      lengths.resize(size_t(s.L * s.B * seg_heads));
      for (auto& x : lengths) x = pick();
    } else {
      lengths.resize(size_t(s.B));
      for (auto& x : lengths) x = pick();
    }
    dlengths = device_buffer<int32_t>(lengths);
    const int64_t Hq = s.H * s.G;
    // attention probabilities
    p.resize(size_t(s.L * s.B * Hq * s.queries * s.T));
    std::uniform_real_distribution<double> pu(0.0, 1.0);
    for (auto& x : p) x = from_double<P>(pu(rng) * pu(rng));
    dp = device_buffer<P>(p);
    q.resize(size_t(s.L * s.B * Hq * s.window * s.D));
    for (auto& x : q) x = from_double<T>(2.0 * u(rng));
    dq = device_buffer<T>(q);
    lse.resize(size_t(s.L * s.B * Hq * s.window));
    for (auto& x : lse) x = static_cast<float>(3.0 + 2.0 * pu(rng));
    dlse = device_buffer<float>(lse);
    score_stride = s.T + 3;
    scores.resize(size_t(s.L * s.B * seg_heads * score_stride));
    for (auto& x : scores) x = static_cast<float>(pu(rng));
    dscores = device_buffer<float>(scores);
    for (int64_t layer = 0; layer < s.L; ++layer) {
      const size_t po = size_t(layer * s.B * Hq * s.queries * s.T), qo = size_t(layer * s.B * Hq * s.window * s.D);
      const size_t lo2 = size_t(layer * s.B * Hq * s.window);
      hpv.push_back(prefixkv::make_kv_view_bhsd<const P>(p.data() + po, s.B, Hq, s.queries, s.T));
      dpv.push_back(prefixkv::make_kv_view_bhsd<const P>(dp.get() + po, s.B, Hq, s.queries, s.T));
      hqv.push_back(prefixkv::make_kv_view_bhsd<const T>(q.data() + qo, s.B, Hq, s.window, s.D));
      dqv.push_back(prefixkv::make_kv_view_bhsd<const T>(dq.get() + qo, s.B, Hq, s.window, s.D));
      hlse.push_back(prefixkv::lse_view{lse.data() + lo2, Hq * s.window, s.window, 1});
      dlsev.push_back(prefixkv::lse_view{dlse.get() + lo2, Hq * s.window, s.window, 1});
    }
  }

  //! The plan's config for this model.
  prefixkv::compress_config config(prefixkv::scorer_kind sc, prefixkv::granularity gr, prefixkv::allocation al,
                                   bool in_place, const double* profile) const {
    prefixkv::compress_config c;
    c.layers = s.L;
    c.q_heads = s.H * s.G;
    c.kv_heads = s.H;
    c.head_dim = s.D;
    c.max_batch = s.B;
    c.max_tokens = s.T;
    c.max_window = s.window;
    c.max_pages = cache.num_pages;
    c.page_size = s.page;
    c.scorer = sc;
    c.gran = gr;
    c.alloc = al;
    c.evict_ratio = 0.4;
    c.profile = profile;
    c.protect = prefixkv::protect_policy{2, 1};
    c.in_place = in_place;
    return c;
  }

  //! Fill compress_args for the cache `c` (host image or device mirror) and destination `dst`, then call f(args).
  template <class Cache, class Dst, class F>
  void with_args(bool on_host, const Cache& c, const Dst& dst, bool per_segment, bool use_lse, F&& f) {
    prefixkv::compress_args<Cache, P, Dst> a;
    a.cache = c;
    a.dst = dst;
    a.lengths = on_host ? lengths.data() : dlengths.get();
    a.lengths_per_segment = per_segment;
    a.attention = on_host ? hpv.data() : dpv.data();
    a.queries = on_host ? hqv.data() : dqv.data();
    a.lse = use_lse ? (on_host ? hlse.data() : dlsev.data()) : nullptr;
    a.scores = on_host ? scores.data() : dscores.get();
    a.score_stride = score_stride;
    f(a);
  }
};

//! Outputs of one run, downloaded.
struct run_result {
  cudaError_t code = cudaSuccess;
  prefixkv::reason why = prefixkv::reason::none;
  std::vector<unsigned char> cache;
  std::vector<int32_t> lengths, cu, pages;
  std::vector<float> thr;
  int32_t status = -1;
};

//! One combination to check.
struct combo {
  layout lay = layout::bhsd, dst_lay = layout::bhsd;
  prefixkv::scorer_kind scorer = prefixkv::scorer_kind::attention;
  prefixkv::granularity gran = prefixkv::granularity::layer;
  prefixkv::allocation alloc = prefixkv::allocation::prefix;
  bool in_place = true, per_segment = false, lse = false;
  shape s;
  std::string name() const {
    return std::string("layout ") + compact_test::name(lay) + (in_place ? "" : std::string(" -> ") + compact_test::name(dst_lay)) +
           " scorer " + std::to_string(int(scorer)) + " gran " + std::to_string(int(gran)) + " alloc " +
           std::to_string(int(alloc)) + (per_segment ? " per-segment lengths" : "") + (lse ? " lse" : "") +
           " L" + std::to_string(s.L) + " B" + std::to_string(s.B) + " H" + std::to_string(s.H) + " G" +
           std::to_string(s.G) + " T" + std::to_string(s.T) + " D" + std::to_string(s.D) + " page" +
           std::to_string(s.page) + " " + compact_test::tables_name(s.tables);
  }
};

//! Scores of the window / key-norm scorer as the compressor computes them on the device (the standalone device
//! scorer over the same rows), laid out as caller scores (layers, batch, Hg, stride).
template <class T, class P>
std::vector<float> device_scores(model<T, P>& m, const combo& cb, int64_t hg) {
  const auto& s = m.s;
  const int64_t S = s.L * s.B * hg;
  std::vector<int64_t> begins(S), lens(S);
  for (int64_t l = 0; l < s.L; ++l)
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t h = 0; h < hg; ++h) {
        const int64_t id = (l * s.B + b) * hg + h;
        begins[id] = id * m.score_stride;
        lens[id] = cb.per_segment ? m.lengths[id] : m.lengths[b];
      }
  device_buffer<int64_t> db(begins), dl(lens);
  device_buffer<float> out(size_t(S * m.score_stride));
  out.poison(0);
  device_buffer<unsigned> st(1);
  st.poison(0);
  const auto rows = prefixkv::make_ragged_segments(S, db.get(), dl.get());
  const prefixkv::segment_grid grid{s.L, s.B, hg};
  // all layers in one call, as the compressor calls the scorer
  std::vector<prefixkv::lse_view> lses;
  for (int64_t l = 0; l < s.L; ++l) lses.push_back(cb.lse ? m.dlsev[l] : prefixkv::lse_view{});
  const prefixkv::lse_view* lse = cb.lse ? lses.data() : nullptr;
  auto score_with = [&](const auto* ks) {
    size_t bytes = 0;
    if (cb.scorer == prefixkv::scorer_kind::window) {
      PKV_CUDA_CHECK(prefixkv::window_attention_layers(nullptr, bytes, m.dqv.data(), ks, lse,
                                                       prefixkv::window_options{}, grid, rows, out.get(), st.get()));
      device_buffer<unsigned char> tmp(bytes);
      PKV_CUDA_CHECK(prefixkv::window_attention_layers(tmp.get(), bytes, m.dqv.data(), ks, lse,
                                                       prefixkv::window_options{}, grid, rows, out.get(), st.get()));
    } else {
      PKV_CUDA_CHECK(prefixkv::key_norm_layers(nullptr, bytes, ks, prefixkv::key_norm_options{true}, grid, rows,
                                               out.get(), st.get()));
      device_buffer<unsigned char> tmp(bytes);
      PKV_CUDA_CHECK(prefixkv::key_norm_layers(tmp.get(), bytes, ks, prefixkv::key_norm_options{true}, grid, rows,
                                               out.get(), st.get()));
    }
  };
  if (compact_test::is_paged(cb.lay)) {
    std::vector<prefixkv::paged_kv_view<const T>> ks;
    for (int64_t l = 0; l < s.L; ++l) ks.push_back(m.cache.dp[0][l].with_token_capacity(s.T).as_const());
    score_with(ks.data());
  } else {
    std::vector<prefixkv::kv_view<const T>> ks;
    for (int64_t l = 0; l < s.L; ++l) ks.push_back(m.cache.ds[0][l].as_const());
    score_with(ks.data());
  }
  PKV_CUDA_CHECK(cudaDeviceSynchronize());
  REQUIRE(st.download()[0] == 0u);
  return out.download();
}

//! Check one combination: device compressor (size query, plain launch, graph) == host backend, byte for byte
//! (cache, destination, every output).
template <class T, class P>
void check_combo(const combo& cb, std::mt19937_64& rng) {
  using namespace prefixkv;
  const std::string what = cb.name();
  CAPTURE(what);
  const int64_t hg = cb.gran == granularity::head ? cb.s.H : 1;
  model<T, P> m(cb.lay, cb.s, rng, hg, cb.per_segment);
  compact_test::cache<T> dst(cb.in_place ? layout::bhsd : cb.dst_lay, model<T, P>::geo(cb.s), rng, true);
  const std::vector<unsigned char> dst_image = dst.host;
  dst.upload(dst_image);
  std::vector<double> profile(size_t(cb.s.L));
  for (auto& f : profile) f = 0.8 * double(rng() % 1000) / 1000.0;
  compress_config cfg = m.config(cb.scorer, cb.gran, cb.alloc, cb.in_place, profile.data());
  cfg.max_pages = std::max(m.cache.num_pages, dst.num_pages);
  compress_plan plan;
  REQUIRE(make_plan(cfg, plan) == cudaSuccess);
  // the host reference: window / key-norm scores come from the device scorer (fp32 rounding differs from the twin)
  const bool via_scores = cb.scorer == scorer_kind::window || cb.scorer == scorer_kind::key_norm;
  compress_plan host_plan = plan;
  if (via_scores) {
    const std::vector<float> sc = device_scores(m, cb, hg);
    std::copy(sc.begin(), sc.end(), m.scores.begin());
    host_plan.cfg.scorer = scorer_kind::scores;
  }
  const int64_t per_layer = cb.s.B * hg, S = cb.s.L * per_layer;
  const int64_t P_ = cb.alloc == allocation::prefix ? cb.s.B : cb.s.B * cb.s.L;
  std::vector<int32_t> h_len(S, -7), h_cu(cb.s.L * (per_layer + 1), -7), h_pages(cb.s.B, -7);
  std::vector<float> h_thr(P_, -7.0f);
  int32_t h_status = -7;
  cudaError_t h_code = cudaSuccess;
  m.cache.visit(true, [&](const auto& hc) {
    dst.visit(true, [&](const auto& hd) {
      m.with_args(true, hc, hd, cb.per_segment, cb.lse, [&](auto& a) {
        a.out = compress_outputs{h_len.data(), h_cu.data(), h_pages.data(), h_thr.data(), &h_status};
        h_code = compress_host(host_plan, a);
      });
    });
  });
  // a chain failure (e.g. a sequence too short for its budget) is a valid outcome: the device must report the same
  if (h_code != cudaSuccess) REQUIRE_MESSAGE(h_status > 0, std::string(last_error().message));
  const std::vector<unsigned char> h_cache = m.cache.host, h_dst = dst.host;
  const bool paged_result = compact_test::is_paged(cb.in_place ? cb.lay : cb.dst_lay);
  device_buffer<int32_t> d_len(S), d_cu(h_cu.size()), d_pages(cb.s.B), d_status(1);
  device_buffer<float> d_thr(P_);
  m.cache.visit(false, [&](const auto& dc) {
    dst.visit(false, [&](const auto& dd) {
      m.with_args(false, dc, dd, cb.per_segment, cb.lse, [&](auto& a) {
        a.out = compress_outputs{d_len.get(), d_cu.get(), d_pages.get(), d_thr.get(), d_status.get()};
        run_three_ways(
            [&](void* t, size_t& n, cudaStream_t st) { return compress(t, n, plan, a, st); },
            [&] {
              m.cache.upload(m.image);
              dst.upload(dst_image);
              d_len.poison();
              d_cu.poison();
              d_pages.poison();
              d_thr.poison();
              d_status.poison();
            },
            [&](const char* how) {
              const std::string when = how;
              CAPTURE(when);
              CHECK(d_status.download()[0] == (h_code == cudaSuccess ? 0 : h_status));
              CHECK(d_len.download() == h_len);
              CHECK(d_cu.download() == h_cu);
              if (paged_result) CHECK(d_pages.download() == h_pages);
              const auto thr = d_thr.download();
              if (h_code == cudaSuccess) CHECK(std::memcmp(thr.data(), h_thr.data(), thr.size() * sizeof(float)) == 0);
              CHECK(m.cache.download() == h_cache);
              if (!cb.in_place) CHECK(dst.download() == h_dst);
            });
      });
    });
  });
}

//! A random combination for element types T (cache) and P (probabilities).
inline combo random_combo(std::mt19937_64& rng, bool allow_window) {
  using namespace prefixkv;
  combo c;
  const scorer_kind scorers[] = {scorer_kind::scores, scorer_kind::attention, scorer_kind::recency,
                                 scorer_kind::key_norm, scorer_kind::window};
  c.scorer = scorers[rng() % (allow_window ? 5 : 4)];
  c.gran = rng() % 2 ? granularity::head : granularity::layer;
  c.alloc = allocation(rng() % 4);
  c.lay = compact_test::all_layouts[rng() % 5];
  c.in_place = rng() % 3 != 0;
  c.dst_lay = compact_test::all_layouts[rng() % 5];
  c.per_segment = rng() % 4 == 0;
  c.lse = rng() % 2 == 0;
  c.s.L = 1 + int64_t(rng() % 5);
  c.s.B = 1 + int64_t(rng() % 3);
  const int64_t hs[] = {1, 2, 4};
  c.s.H = hs[rng() % 3];
  c.s.G = hs[rng() % 3];
  const int64_t ds[] = {8, 24, 64, 128};
  c.s.D = ds[rng() % 4];
  c.s.T = 1 + int64_t(rng() % 150);
  c.s.window = std::min<int64_t>(c.s.T, 1 + int64_t(rng() % 12));
  c.s.queries = 1 + int64_t(rng() % 6);
  const int64_t pages[] = {1, 5, 16};
  c.s.page = pages[rng() % 3];
  return c;
}

}  // namespace compress_test
