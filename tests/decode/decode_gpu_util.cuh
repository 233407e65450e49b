// Decode GPU tests: a random cache in any layout (host image + device mirror, compact_test::cache), a host and a
// device decode state, random observations, and checks that the CUDA backend leaves exactly the host backend's
// bytes (cache image and every state array) after decode_init and after every step.
#pragma once

#include <doctest/doctest.h>

#include <prefixkv/decode/decode.cuh>

#include "compact/compact_test_util.cuh"

#include <algorithm>
#include <string>
#include <vector>

namespace decode_gpu_test {

using namespace prefixkv_test;
using compact_test::layout;
namespace pk = prefixkv;

template <class X>
X from_double(double v) {
  if constexpr (std::is_same_v<X, float>) return static_cast<float>(v);
  else return X::from_float(static_cast<float>(v));
}

//! One configuration: cache layout and shape, plan, host and device states, observation buffers.
template <class T, class P>
struct gpu_case {
  layout lay;
  compact_test::geometry g;
  int64_t G = 2;  // q heads per kv head
  compact_test::cache<T> cache;
  pk::decode_plan plan;
  pk::decode_state_buffers hbuf;
  pk::decode_state hst, dst;
  device_buffer<unsigned char> dmem, dws;
  size_t state_bytes = 0, ws_bytes = 0;
  // observation: P (L, B, Hq, Q, T) and caller scores (L, B, Hs, stride)
  int64_t Q = 1, stride = 0;
  std::vector<P> p;
  std::vector<float> obs;
  std::vector<int32_t> active;
  device_buffer<P> dp;
  device_buffer<float> dobs;
  device_buffer<int32_t> dactive;
  std::vector<pk::kv_view<const P>> hpv, dpv;
  std::vector<unsigned char> image;  // host cache image at the last sync

  gpu_case(layout l, const compact_test::geometry& geo, pk::decode_config cfg, std::mt19937_64& rng, int64_t G_ = 2,
           int64_t Q_ = 1)
      : lay(l), g(geo), G(G_), cache(l, geo, rng, false), Q(Q_) {
    cfg.layers = g.L;
    cfg.kv_heads = g.H;
    cfg.q_heads = g.H * G;
    cfg.head_dim = g.D;
    cfg.max_batch = g.B;
    if (cfg.max_tokens == 0) cfg.max_tokens = g.T;
    REQUIRE(pk::make_plan(cfg, plan) == cudaSuccess);
    cache.upload(cache.host);
    image = cache.host;
    hbuf = pk::decode_state_buffers(plan);
    hst = hbuf.state();
    REQUIRE(pk::decode_state_bytes(plan, state_bytes) == cudaSuccess);
    dmem = device_buffer<unsigned char>(state_bytes);
    dmem.poison();
    REQUIRE(pk::decode_state_bind(plan, dmem.get(), state_bytes, dst) == cudaSuccess);
    const int64_t Hq = g.H * G, Hs = plan.seg_heads;
    stride = g.T + 5;
    p.assign(size_t(g.L * g.B * Hq * Q * g.T), P{});
    obs.assign(size_t(g.L * g.B * Hs * stride), 0.0f);
    active.assign(size_t(g.B), 1);
    dp = device_buffer<P>(p.size());
    dobs = device_buffer<float>(obs.size());
    dactive = device_buffer<int32_t>(active.size());
    for (int64_t layer = 0; layer < g.L; ++layer) {
      const size_t off = size_t(layer * g.B * Hq * Q * g.T);
      hpv.push_back(pk::make_kv_view_bhsd<const P>(p.data() + off, g.B, Hq, Q, g.T));
      dpv.push_back(pk::make_kv_view_bhsd<const P>(dp.get() + off, g.B, Hq, Q, g.T));
    }
    size_t ws = 0;
    pk::decode_step_args<pk::kv_layers<T>, P> probe;
    REQUIRE(pk::decode_step(nullptr, ws, plan, dst, probe) == cudaSuccess);
    ws_bytes = ws;
    dws = device_buffer<unsigned char>(ws_bytes);
  }

  //! Every state array of the device, as bytes, against the host backend's.
  void check_state(const char* where) {
    CAPTURE(where);
    const int64_t S = plan.state_segments(), R = S * plan.cfg.max_tokens;
    auto down = [](const auto* d, int64_t n) {
      using X = std::remove_cv_t<std::remove_pointer_t<decltype(d)>>;
      std::vector<X> h(static_cast<size_t>(n));
      if (n) PKV_CUDA_CHECK(cudaMemcpy(h.data(), d, size_t(n) * sizeof(X), cudaMemcpyDeviceToHost));
      return h;
    };
    CHECK(down(dst.lengths, S) == hbuf.lengths);
    CHECK(down(dst.seen, S) == hbuf.seen);
    CHECK(down(dst.frac_num, S) == hbuf.frac_num);
    CHECK(down(dst.frac_den, S) == hbuf.frac_den);
    if (dst.position) CHECK(down(dst.position, S) == hbuf.position);
    if (dst.scores) {
      const std::vector<float> ds = down(dst.scores, R);
      CHECK(std::memcmp(ds.data(), hbuf.scores.data(), size_t(R) * 4) == 0);
    }
    if (dst.stamps) CHECK(down(dst.stamps, R) == hbuf.stamps);
    CHECK(down(dst.status, 1)[0] == hbuf.status);
    CHECK(dst.pending == hst.pending);
  }
  void check_cache(const char* where) {
    CAPTURE(where);
    CHECK(cache.download() == cache.host);
  }

  //! Random prefill lengths (per segment) and tokens seen; init on both sides (device: three ways).
  void init(std::mt19937_64& rng, int64_t lo_frac_pct, int64_t hi_frac_pct) {
    const int64_t Hs = plan.seg_heads;
    std::vector<int32_t> len(size_t(g.L * g.B * Hs)), seen(size_t(g.B));
    for (int64_t b = 0; b < g.B; ++b) seen[b] = int32_t(g.T / 4 + int64_t(rng() % uint64_t(g.T)));
    for (int64_t l = 0; l < g.L; ++l)
      for (int64_t b = 0; b < g.B; ++b)
        for (int64_t h = 0; h < Hs; ++h) {
          const int64_t pct = lo_frac_pct + int64_t(rng() % uint64_t(hi_frac_pct - lo_frac_pct + 1));
          len[(l * g.B + b) * Hs + h] = int32_t(std::min<int64_t>(g.T / 2, seen[b] * pct / 100));
        }
    std::vector<float> sc(size_t(g.L * g.B * Hs * stride));
    for (auto& x : sc) x = float(rng() % 64) / 16.0f;  // ties on purpose
    sc[1] = -1.0f;  // reported, counted as 0
    device_buffer<int32_t> dlen(len), dseen(seen);
    device_buffer<float> dsc(sc);
    pk::decode_init_args ha, da;
    ha.batch = da.batch = g.B;
    ha.lengths_per_segment = da.lengths_per_segment = true;
    ha.lengths = len.data();
    da.lengths = dlen.get();
    ha.seen = seen.data();
    da.seen = dseen.get();
    ha.score_stride = da.score_stride = stride;
    if (plan.has_scores()) {
      ha.scores = sc.data();
      da.scores = dsc.get();
    }
    REQUIRE(pk::decode_init_host(plan, hst, ha) == cudaSuccess);
    hbuf.pending = hst.pending;
    run_three_ways([&](void* t, size_t& n, cudaStream_t s) { return pk::decode_init(t, n, plan, dst, da, s); },
                   [&] { dmem.poison(); }, [&](const char* how) { check_state(how); });
  }

  //! Init from per-sequence lengths for the first `batch` sequences only (the others start empty); one length past
  //! max_tokens and one `seen` below its length (both clamped and reported).
  void init_per_sequence(std::mt19937_64& rng, int64_t batch) {
    std::vector<int32_t> len(static_cast<size_t>(batch)), seen(static_cast<size_t>(batch));
    for (int64_t b = 0; b < batch; ++b) {
      seen[b] = int32_t(g.T / 2 + int64_t(rng() % uint64_t(g.T)));
      len[b] = int32_t(seen[b] / 3);
    }
    len[0] = int32_t(plan.cfg.max_tokens + 7);
    if (batch > 1) seen[1] = len[1] - 1;
    device_buffer<int32_t> dlen(len), dseen(seen);
    pk::decode_init_args ha, da;
    ha.batch = da.batch = batch;
    ha.lengths = len.data();
    da.lengths = dlen.get();
    ha.seen = seen.data();
    da.seen = dseen.get();
    REQUIRE(pk::decode_init_host(plan, hst, ha) == cudaSuccess);
    CHECK(hbuf.status == int32_t(pk::reason::out_of_range));
    CHECK(hbuf.lengths[plan.state_index(0, 0, 0)] == plan.cfg.max_tokens);
    run_three_ways([&](void* t, size_t& n, cudaStream_t s) { return pk::decode_init(t, n, plan, dst, da, s); },
                   [&] { dmem.poison(); }, [&](const char* how) { check_state(how); });
  }

  //! Random observation for a step (with `bad` NaN / negative values now and then), uploaded.
  void randomise(std::mt19937_64& rng, bool ties, bool bad) {
    for (auto& x : p) x = from_double<P>(ties ? double(rng() % 8) / 8.0 : double(rng() % 1000003) / 1000003.0);
    for (auto& x : obs) x = ties ? float(rng() % 8) / 8.0f : float(rng() % 1000003) / 1000003.0f;
    if (bad) {
      p[rng() % p.size()] = from_double<P>(std::nan(""));
      obs[rng() % obs.size()] = -0.25f;
    }
    dp.upload(p);
    dobs.upload(obs);
  }
  void set_active(std::mt19937_64& rng, bool all) {
    for (auto& x : active) x = all || rng() % 5 != 0;
    dactive.upload(active);
  }

  //! The step's arguments for the host image or the device mirror.
  template <class Cache>
  pk::decode_step_args<Cache, P> args(const Cache& c, bool on_host, pk::decode_observe ob, pk::decode_when when,
                                      int32_t appended, bool use_active) {
    pk::decode_step_args<Cache, P> a;
    a.cache = c;
    a.appended = appended;
    a.active = use_active ? (on_host ? active.data() : dactive.get()) : nullptr;
    a.observe = ob;
    a.attention = on_host ? hpv.data() : dpv.data();
    a.scores = on_host ? obs.data() : dobs.get();
    a.score_stride = stride;
    a.when = when;
    return a;
  }

  //! One step on both sides (device: a plain launch, or three ways), then compare everything (unless `quiet`).
  void step(pk::decode_observe ob, pk::decode_when when, int32_t appended, bool use_active, bool three_ways,
            const char* where, bool quiet = false) {
    CAPTURE(where);
    cache.visit(true, [&](const auto& hc) {
      auto a = args(hc, true, ob, when, appended, use_active);
      REQUIRE(pk::decode_step_host(plan, hst, a) == cudaSuccess);
    });
    hbuf.pending = hst.pending;
    cache.visit(false, [&](const auto& dc) {
      auto a = args(dc, false, ob, when, appended, use_active);
      if (!three_ways) {
        size_t n = ws_bytes;
        REQUIRE(pk::decode_step(dws.get(), n, plan, dst, a) == cudaSuccess);
        PKV_CUDA_CHECK(cudaDeviceSynchronize());
        return;
      }
      // three ways from the same starting point: cache image, state bytes and the host counter restored each time
      const std::vector<unsigned char> state0 = dmem.download();
      const int64_t pending0 = dst.pending;
      run_three_ways(
          [&](void* t, size_t& n, cudaStream_t s) { return pk::decode_step(t, n, plan, dst, a, s); },
          [&] {
            cache.upload(image);
            dmem.upload(state0);
            dst.pending = pending0;
          },
          [&](const char* how) {
            check_state(how);
            check_cache(how);
          });
    });
    if (quiet) {
      PKV_CUDA_CHECK(cudaDeviceSynchronize());
      return;  // (the next three-ways step re-reads the image)
    }
    check_state(where);
    check_cache(where);
    image = cache.host;
  }
};

}  // namespace decode_gpu_test
