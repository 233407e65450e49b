// Shared by the distributed compressor's tests: a random whole model (strided or paged cache, every scorer's input,
// ragged lengths) in host memory, the shard of one rank (its layers and kv heads, copied out), and a runner that
// starts one thread per rank with in-process host communicators.
#pragma once

#include <prefixkv/dist/compress_dist.hpp>

#include "support/test_random.hpp"

#include <algorithm>
#include <chrono>
#include <functional>
#include <numeric>
#include <thread>
#include <vector>

namespace dist_test {

namespace pk = prefixkv;

template <class X>
X from_double(double v) {
  if constexpr (std::is_same_v<X, float>) return static_cast<float>(v);
  else return X::from_float(static_cast<float>(v));
}

//! Model shape and layout.
struct shape {
  int64_t L = 4, B = 2, H = 4, G = 2, T = 40, D = 8;  // H: kv heads; G: q heads per kv head; T: token capacity
  int64_t Q = 3;       // attention probability rows
  int64_t W = 4;       // window queries
  int64_t page = 0;    // 0: strided [B, H, T, D] per layer; else paged (page, slot, head, dim) pools
  int64_t extra_pages = 3;
  int64_t Hs = 1;      // score rows per (layer, sequence): 1 or H
  bool per_segment_lengths = false;
  int64_t max_blocks() const { return page ? (T + page - 1) / page : 0; }
  int64_t num_pages() const { return page ? B * max_blocks() + extra_pages : 0; }
};

//! A model (the whole one, or a rank's shard: then L = its layers, H = its kv heads) and its views.
template <class T>
struct model {
  shape s;
  std::vector<T> k, v, dk, dv;  // cache (and an out-of-place destination, same geometry)
  std::vector<T> p, q;          // attention (L, B, Hq, Q, T), window queries (L, B, Hq, W, D)
  std::vector<float> lse, scores;
  std::vector<int32_t> table, lengths;
  int64_t score_stride = 0;
  std::vector<pk::kv_view<T>> ks, vs, dks, dvs;
  std::vector<pk::paged_kv_view<T>> kp, vp, dkp, dvp;
  std::vector<pk::kv_view<const T>> pv, qv;
  std::vector<pk::lse_view> lv;

  int64_t Hq() const { return s.H * s.G; }
  size_t layer_elems() const { return size_t(s.page ? s.num_pages() * s.page * s.H * s.D : s.B * s.H * s.T * s.D); }
  //! Index of element (layer, b, h, t, d) of the cache storage, in the model's own layout.
  size_t at(int64_t l, int64_t b, int64_t h, int64_t t, int64_t d) const {
    if (!s.page) return size_t((((l * s.B + b) * s.H + h) * s.T + t) * s.D + d);
    const int64_t pg = table[size_t(b * s.max_blocks() + t / s.page)], slot = t % s.page;
    return size_t(((l * s.num_pages() + pg) * s.page + slot) * s.H * s.D + h * s.D + d);
  }
  void views() {
    ks.clear(); vs.clear(); dks.clear(); dvs.clear(); kp.clear(); vp.clear(); dkp.clear(); dvp.clear();
    pv.clear(); qv.clear(); lv.clear();
    const size_t per = layer_elems();
    for (int64_t l = 0; l < s.L; ++l) {
      if (!s.page) {
        ks.push_back(pk::make_kv_view_bhsd(k.data() + l * per, s.B, s.H, s.T, s.D));
        vs.push_back(pk::make_kv_view_bhsd(v.data() + l * per, s.B, s.H, s.T, s.D));
        dks.push_back(pk::make_kv_view_bhsd(dk.data() + l * per, s.B, s.H, s.T, s.D));
        dvs.push_back(pk::make_kv_view_bhsd(dv.data() + l * per, s.B, s.H, s.T, s.D));
      } else {
        auto mk = [&](std::vector<T>& x) {
          return pk::make_paged_kv_view(x.data() + l * per, pk::page_layout::nhd, s.num_pages(), s.page, s.H, s.D,
                                        table.data(), s.B, s.max_blocks());
        };
        kp.push_back(mk(k));
        vp.push_back(mk(v));
        dkp.push_back(mk(dk));
        dvp.push_back(mk(dv));
      }
      const size_t po = size_t(l * s.B * Hq() * s.Q * s.T), qo = size_t(l * s.B * Hq() * s.W * s.D);
      pv.push_back(pk::make_kv_view_bhsd<const T>(p.data() + po, s.B, Hq(), s.Q, s.T));
      qv.push_back(pk::make_kv_view_bhsd<const T>(q.data() + qo, s.B, Hq(), s.W, s.D));
      lv.push_back(pk::lse_view{lse.data() + l * s.B * Hq() * s.W, Hq() * s.W, s.W, 1});
    }
  }
  pk::kv_layers<T> strided() const { return {ks.data(), vs.data(), nullptr, nullptr, s.L}; }
  pk::kv_layers<T> strided_dst() const { return {dks.data(), dvs.data(), nullptr, nullptr, s.L}; }
  pk::paged_kv_layers<T> paged() const { return {kp.data(), vp.data(), nullptr, nullptr, s.L}; }
  pk::paged_kv_layers<T> paged_dst() const { return {dkp.data(), dvp.data(), nullptr, nullptr, s.L}; }
};

//! A random whole model. Lengths are ragged in [max(W, 8), T] (per sequence, or per segment).
template <class T>
model<T> random_model(const shape& s, std::mt19937_64& rng) {
  model<T> m;
  m.s = s;
  std::uniform_real_distribution<double> u(-1.0, 1.0), pu(0.0, 1.0);
  if (s.page) {
    std::vector<int32_t> ids(size_t(s.num_pages()));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    m.table.assign(ids.begin(), ids.begin() + s.B * s.max_blocks());
  }
  const size_t n = m.layer_elems() * size_t(s.L);
  for (auto* x : {&m.k, &m.v, &m.dk, &m.dv}) {
    x->resize(n);
    for (auto& e : *x) e = from_double<T>(u(rng));
  }
  m.p.resize(size_t(s.L * s.B * m.Hq() * s.Q * s.T));
  for (auto& e : m.p) e = from_double<T>(pu(rng) * pu(rng));
  m.q.resize(size_t(s.L * s.B * m.Hq() * s.W * s.D));
  for (auto& e : m.q) e = from_double<T>(2.0 * u(rng));
  m.lse.resize(size_t(s.L * s.B * m.Hq() * s.W));
  for (auto& e : m.lse) e = static_cast<float>(3.0 + 2.0 * pu(rng));
  m.score_stride = s.T + 3;
  m.scores.resize(size_t(s.L * s.B * s.Hs * m.score_stride));
  for (auto& e : m.scores) e = static_cast<float>(pu(rng));
  const int64_t lo = std::min<int64_t>(std::max<int64_t>(s.W, 8), s.T);
  auto pick = [&] { return static_cast<int32_t>(lo + int64_t(rng() % uint64_t(s.T - lo + 1))); };
  m.lengths.resize(size_t(s.per_segment_lengths ? s.L * s.B * s.Hs : s.B));
  for (auto& x : m.lengths) x = pick();
  m.views();
  return m;
}

//! The shard of the rank holding layers [l0, l0 + lc) and kv heads [h0, h0 + hc): copies of its cache (raw pools
//! for paged caches), scorer inputs and score rows; the same lengths and block table.
template <class T>
model<T> make_shard(const model<T>& f, int64_t l0, int64_t lc, int64_t h0, int64_t hc) {
  const shape& s = f.s;
  model<T> m;
  m.s = s;
  m.s.L = lc;
  m.s.H = hc;
  m.s.Hs = s.Hs == 1 ? 1 : hc;
  m.table = f.table;
  m.lengths = f.lengths;
  m.score_stride = f.score_stride;
  const int64_t G = s.G, D = s.D;
  auto copy_cache = [&](const std::vector<T>& src, std::vector<T>& dst) {
    dst.resize(m.layer_elems() * size_t(lc));
    if (!s.page) {
      for (int64_t li = 0; li < lc; ++li)
        for (int64_t b = 0; b < s.B; ++b)
          for (int64_t hl = 0; hl < hc; ++hl)
            for (int64_t x = 0; x < s.T * D; ++x)
              dst[size_t((((li * s.B + b) * hc + hl) * s.T) * D + x)] =
                  src[size_t(((((l0 + li) * s.B + b) * s.H + h0 + hl) * s.T) * D + x)];
    } else {
      const int64_t slots = s.num_pages() * s.page;
      for (int64_t li = 0; li < lc; ++li)
        for (int64_t sl = 0; sl < slots; ++sl)
          for (int64_t hl = 0; hl < hc; ++hl)
            for (int64_t d = 0; d < D; ++d)
              dst[size_t(((li * slots + sl) * hc + hl) * D + d)] = src[size_t((((l0 + li) * slots + sl) * s.H + h0 + hl) * D + d)];
    }
  };
  copy_cache(f.k, m.k);
  copy_cache(f.v, m.v);
  copy_cache(f.dk, m.dk);
  copy_cache(f.dv, m.dv);
  const int64_t Hq = s.H * G, hq0 = h0 * G, hqc = hc * G;
  auto copy_heads = [&](const auto& src, auto& dst, int64_t inner) {  // (L, B, Hq, inner) -> (lc, B, hqc, inner)
    dst.resize(size_t(lc * s.B * hqc * inner));
    for (int64_t li = 0; li < lc; ++li)
      for (int64_t b = 0; b < s.B; ++b)
        for (int64_t h = 0; h < hqc; ++h)
          for (int64_t x = 0; x < inner; ++x)
            dst[size_t(((li * s.B + b) * hqc + h) * inner + x)] = src[size_t((((l0 + li) * s.B + b) * Hq + hq0 + h) * inner + x)];
  };
  copy_heads(f.p, m.p, s.Q * s.T);
  copy_heads(f.q, m.q, s.W * D);
  copy_heads(f.lse, m.lse, s.W);
  const int64_t hs0 = s.Hs == 1 ? 0 : h0, hsc = m.s.Hs;
  m.scores.resize(size_t(lc * s.B * hsc * f.score_stride));
  for (int64_t li = 0; li < lc; ++li)
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t h = 0; h < hsc; ++h)
        for (int64_t x = 0; x < f.score_stride; ++x)
          m.scores[size_t(((li * s.B + b) * hsc + h) * f.score_stride + x)] =
              f.scores[size_t((((l0 + li) * s.B + b) * s.Hs + hs0 + h) * f.score_stride + x)];
  m.views();
  return m;
}

//! A layer partition of L layers into `stages` contiguous non-empty runs (random sizes): stage i holds
//! [begin[i], begin[i + 1]).
inline std::vector<int64_t> split_layers(int64_t L, int stages, std::mt19937_64& rng) {
  std::vector<int64_t> cuts;
  for (int64_t l = 1; l < L; ++l) cuts.push_back(l);
  std::shuffle(cuts.begin(), cuts.end(), rng);
  cuts.resize(size_t(stages - 1));
  std::sort(cuts.begin(), cuts.end());
  std::vector<int64_t> begin = {0};
  begin.insert(begin.end(), cuts.begin(), cuts.end());
  begin.push_back(L);
  return begin;
}

//! Runs fn(tp_rank, pp_rank, shard) on tp x pp threads with host communicators (a group per pipeline stage for
//! tensor parallelism, a group per tensor-parallel rank for the pipeline). `present1`: give groups of one rank a
//! real communicator (else an empty handle).
inline void run_ranks(int tp, int pp, bool present1, const std::vector<int64_t>& stage_begin,
                      const std::function<void(int, int, const pk::compress_shard&)>& fn) {
  using namespace std::chrono_literals;
  std::vector<std::unique_ptr<pk::host_comm_group>> tpg, ppg;
  for (int i = 0; i < pp; ++i) tpg.emplace_back(new pk::host_comm_group(tp, 30000ms));
  for (int i = 0; i < tp; ++i) ppg.emplace_back(new pk::host_comm_group(pp, 30000ms));
  std::vector<pk::host_comm> tpc(size_t(tp * pp)), ppc(size_t(tp * pp));
  std::vector<std::thread> threads;
  for (int ip = 0; ip < pp; ++ip)
    for (int it = 0; it < tp; ++it) {
      const size_t r = size_t(ip * tp + it);
      tpc[r] = tpg[size_t(ip)]->rank(it);
      ppc[r] = ppg[size_t(it)]->rank(ip);
      pk::compress_shard sh;
      if (tp > 1 || present1) sh.tp = pk::make_communicator(tpc[r]);
      if (pp > 1 || present1) sh.pp = pk::make_communicator(ppc[r]);
      sh.layer_begin = stage_begin[size_t(ip)];
      sh.layer_count = stage_begin[size_t(ip) + 1] - stage_begin[size_t(ip)];
      threads.emplace_back([&fn, it, ip, sh] { fn(it, ip, sh); });
    }
  for (auto& t : threads) t.join();
}

}  // namespace dist_test
