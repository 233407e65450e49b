// Device mirrors of the distributed tests' models (tests/dist/dist_test_model.hpp) and one device compressor call
// (unsharded, or one rank's shard) whose outputs and cache bytes come back to the host.
#pragma once

#include <doctest/doctest.h>

#include <prefixkv/dist/compress_dist.cuh>

#include "dist/dist_test_model.hpp"
#include "support/gpu_harness.cuh"

#include <cstring>
#include <string>

namespace dist_test {

using prefixkv_test::device_buffer;

//! A policy of a test case.
struct policy {
  pk::scorer_kind scorer = pk::scorer_kind::recency;
  pk::granularity gran = pk::granularity::layer;
  pk::allocation alloc = pk::allocation::prefix;
  bool keep_tokens = false, in_place = true, lse = false;
  std::string name() const {
    return "scorer " + std::to_string(int(scorer)) + " gran " + std::to_string(int(gran)) + " alloc " +
           std::to_string(int(alloc)) + (keep_tokens ? " keep_tokens" : " evict") + (in_place ? " in place" : " gather") +
           (lse ? " lse" : "");
  }
  //! Scorers whose device rows do not depend on how many layers / heads a call scores (the window scorer's key
  //! splits, and so its in-kernel softmax's rounding, follow the size of the call).
  bool shard_invariant_on_device() const { return scorer != pk::scorer_kind::window; }
};

inline pk::compress_config make_config(const shape& s, const policy& pol, std::mt19937_64& rng,
                                       std::vector<double>& profile) {
  pk::compress_config c;
  c.layers = s.L;
  c.q_heads = s.H * s.G;
  c.kv_heads = s.H;
  c.head_dim = s.D;
  c.max_batch = s.B + int64_t(rng() % 2);
  c.max_tokens = s.T;
  c.max_window = s.W;
  c.max_pages = s.num_pages();
  c.page_size = s.page;
  c.scorer = pol.scorer;
  c.gran = pol.gran;
  c.alloc = pol.alloc;
  c.in_place = pol.in_place;
  c.protect = {int64_t(rng() % 4), int64_t(rng() % 3)};
  if (rng() % 3 == 0) c.min_keep = int64_t(rng() % 3);
  if (rng() % 3 == 0) c.max_keep = c.min_keep + 2 + int64_t(rng() % 10);
  c.window.group = rng() % 2 ? pk::head_reduce::mean : pk::head_reduce::max;
  c.window.heads = rng() % 2 ? pk::head_reduce::mean : pk::head_reduce::max;
  if (pol.alloc == pk::allocation::profile) {
    profile.resize(size_t(s.L));
    for (auto& f : profile) f = 0.1 + 0.8 * double(rng() % 100) / 100.0;
    c.profile = profile.data();
  }
  if (pol.keep_tokens) {
    c.budget = pk::budget_kind::keep_tokens;
    c.keep_tokens = s.L * (8 + int64_t(rng() % 10));
  } else {
    c.evict_ratio = 0.05 + 0.9 * double(rng() % 100) / 100.0;
  }
  return c;
}

//! What a call wrote: outputs and the raw bytes of the cache and the destination.
struct result {
  cudaError_t e = cudaSuccess;
  pk::reason why = pk::reason::none;
  std::vector<int32_t> len, cu, pages, status;
  std::vector<float> thr;
  std::vector<unsigned char> k, v, dk, dv;
  bool same_outputs(const result& o) const {
    return e == o.e && status == o.status && len == o.len && cu == o.cu && pages == o.pages &&
           thr.size() == o.thr.size() && std::memcmp(thr.data(), o.thr.data(), thr.size() * sizeof(float)) == 0;
  }
};

template <class T>
std::vector<unsigned char> raw_bytes(const std::vector<T>& x) {
  std::vector<unsigned char> b(x.size() * sizeof(T));
  if (!x.empty()) std::memcpy(b.data(), x.data(), b.size());
  return b;
}

//! A model (whole or shard) on the device, its views, its output buffers (sized for the whole model).
template <class T>
struct device_model {
  shape s;
  device_buffer<T> k, v, dk, dv, p, q;
  device_buffer<float> lse, scores;
  device_buffer<int32_t> table, lengths, len, cu, pages, status;
  device_buffer<float> thr;
  int64_t score_stride = 0;
  std::vector<pk::kv_view<T>> ks, vs, dks, dvs;
  std::vector<pk::paged_kv_view<T>> kp, vp, dkp, dvp;
  std::vector<pk::kv_view<const T>> pv, qv;
  std::vector<pk::lse_view> lv;
  int64_t n_len = 0, n_cu = 0, n_thr = 0;

  device_model(const model<T>& m, int64_t L_total, int64_t Hs_total, int64_t problems)
      : s(m.s), k(m.k), v(m.v), dk(m.dk), dv(m.dv), p(m.p), q(m.q), lse(m.lse), scores(m.scores),
        table(m.table.empty() ? std::vector<int32_t>{0} : m.table), lengths(m.lengths), score_stride(m.score_stride) {
    n_len = L_total * s.B * Hs_total;
    n_cu = L_total * (s.B * Hs_total + 1);
    n_thr = problems;
    len = device_buffer<int32_t>(size_t(std::max<int64_t>(n_len, 1)));
    cu = device_buffer<int32_t>(size_t(n_cu));
    pages = device_buffer<int32_t>(size_t(std::max<int64_t>(s.B, 1)));
    status = device_buffer<int32_t>(1);
    thr = device_buffer<float>(size_t(std::max<int64_t>(n_thr, 1)));
    const size_t per = m.layer_elems();
    const int64_t Hq = s.H * s.G;
    for (int64_t l = 0; l < s.L; ++l) {
      if (!s.page) {
        ks.push_back(pk::make_kv_view_bhsd(k.get() + l * per, s.B, s.H, s.T, s.D));
        vs.push_back(pk::make_kv_view_bhsd(v.get() + l * per, s.B, s.H, s.T, s.D));
        dks.push_back(pk::make_kv_view_bhsd(dk.get() + l * per, s.B, s.H, s.T, s.D));
        dvs.push_back(pk::make_kv_view_bhsd(dv.get() + l * per, s.B, s.H, s.T, s.D));
      } else {
        auto mk = [&](device_buffer<T>& x) {
          return pk::make_paged_kv_view(x.get() + l * per, pk::page_layout::nhd, s.num_pages(), s.page, s.H, s.D,
                                        table.get(), s.B, s.max_blocks());
        };
        kp.push_back(mk(k));
        vp.push_back(mk(v));
        dkp.push_back(mk(dk));
        dvp.push_back(mk(dv));
      }
      pv.push_back(pk::make_kv_view_bhsd<const T>(p.get() + l * s.B * Hq * s.Q * s.T, s.B, Hq, s.Q, s.T));
      qv.push_back(pk::make_kv_view_bhsd<const T>(q.get() + l * s.B * Hq * s.W * s.D, s.B, Hq, s.W, s.D));
      lv.push_back(pk::lse_view{lse.get() + l * s.B * Hq * s.W, Hq * s.W, s.W, 1});
    }
  }
  //! Poison the outputs (the cache is left as it is).
  void poison() {
    for (auto* b : {&len, &cu, &pages, &status}) b->poison(0xA5);
    thr.poison(0xA5);
  }
  template <class F>
  auto with_args(const policy& pol, F&& f) {
    pk::compress_outputs out{len.get(), cu.get(), s.page ? pages.get() : nullptr, thr.get(), status.get()};
    auto go = [&](auto cache, auto dst) {
      pk::compress_args<decltype(cache), T, decltype(dst)> a;
      a.cache = cache;
      a.dst = dst;
      a.lengths = lengths.get();
      a.lengths_per_segment = s.per_segment_lengths;
      a.attention = pv.data();
      a.queries = qv.data();
      a.lse = pol.lse ? lv.data() : nullptr;
      a.scores = scores.get();
      a.score_stride = score_stride;
      a.out = out;
      return f(a);
    };
    if (s.page)
      return go(pk::paged_kv_layers<T>{kp.data(), vp.data(), nullptr, nullptr, s.L},
                pk::paged_kv_layers<T>{dkp.data(), dvp.data(), nullptr, nullptr, s.L});
    return go(pk::kv_layers<T>{ks.data(), vs.data(), nullptr, nullptr, s.L},
              pk::kv_layers<T>{dks.data(), dvs.data(), nullptr, nullptr, s.L});
  }
  result download(cudaError_t e) const {
    result r;
    r.e = e;
    r.why = e == cudaSuccess ? pk::reason::none : pk::last_error().why;
    r.len = len.download();
    r.len.resize(size_t(n_len));
    r.cu = cu.download();
    r.pages = s.page ? pages.download() : std::vector<int32_t>{};
    if (s.page) r.pages.resize(size_t(s.B));
    r.status = status.download();
    r.thr = thr.download();
    r.thr.resize(size_t(n_thr));
    r.k = raw_bytes(k.download());
    r.v = raw_bytes(v.download());
    r.dk = raw_bytes(dk.download());
    r.dv = raw_bytes(dv.download());
    return r;
  }
};

//! The unsharded device compressor on `m` (synchronous), its outputs.
template <class T>
result run_unsharded(device_model<T>& m, const pk::compress_plan& plan, const policy& pol) {
  m.poison();
  cudaError_t e = m.with_args(pol, [&](auto& a) {
    size_t bytes = 0;
    cudaError_t r = pk::compress(nullptr, bytes, plan, a);
    if (r != cudaSuccess) return r;
    device_buffer<unsigned char> tmp(bytes);
    r = pk::compress(tmp.get(), bytes, plan, a, 0);
    if (r == cudaSuccess) r = cudaDeviceSynchronize();
    return r;
  });
  return m.download(e);
}

//! The unsharded host compressor on host model m (a copy is compressed), as a result.
template <class T>
result run_host(const model<T>& m0, const pk::compress_plan& plan, const policy& pol, int64_t problems) {
  model<T> m = m0;
  m.views();
  result r;
  const int64_t Hs = pol.gran == pk::granularity::head ? m.s.H : 1;
  r.len.assign(size_t(m.s.L * m.s.B * Hs), 0);
  r.cu.assign(size_t(m.s.L * (m.s.B * Hs + 1)), 0);
  r.pages.assign(m.s.page ? size_t(m.s.B) : 0, 0);
  r.thr.assign(size_t(problems), 0.0f);
  r.status.assign(1, 0);
  pk::compress_outputs out{r.len.data(), r.cu.data(), m.s.page ? r.pages.data() : nullptr, r.thr.data(), r.status.data()};
  auto go = [&](auto cache, auto dst) {
    pk::compress_args<decltype(cache), T, decltype(dst)> a;
    a.cache = cache;
    a.dst = dst;
    a.lengths = m.lengths.data();
    a.lengths_per_segment = m.s.per_segment_lengths;
    a.attention = m.pv.data();
    a.queries = m.qv.data();
    a.lse = pol.lse ? m.lv.data() : nullptr;
    a.scores = m.scores.data();
    a.score_stride = m.score_stride;
    a.out = out;
    return pk::compress_host(plan, a);
  };
  r.e = m.s.page ? go(m.paged(), m.paged_dst()) : go(m.strided(), m.strided_dst());
  r.why = r.e == cudaSuccess ? pk::reason::none : pk::last_error().why;
  r.k = raw_bytes(m.k);
  r.v = raw_bytes(m.v);
  r.dk = raw_bytes(m.dk);
  r.dv = raw_bytes(m.dv);
  return r;
}

}  // namespace dist_test
