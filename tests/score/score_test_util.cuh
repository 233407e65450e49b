// Shared by the scorer GPU tests: random window-scorer cases, run on the device three ways (size query, plain,
// graph) and compared with the host twin.
#pragma once

#include <doctest/doctest.h>

#include <prefixkv/core/launch.cuh>
#include <prefixkv/score/score.cuh>

#include "support/gpu_harness.cuh"
#include "support/test_random.hpp"
#include "score_storage.hpp"

#include <cmath>
#include <type_traits>
#include <vector>

namespace score_test {
using namespace prefixkv_test;
namespace pk = prefixkv;

// Documented tolerance of the window scorer vs its host twin (both accumulate in fp32; only the order of the
// dot products and of the sums over window queries differs): |gpu - host| <= 2e-4 |host| + 1e-6.
inline bool window_close(float got, float want) { return std::fabs(got - want) <= 2e-4f * std::fabs(want) + 1e-6f; }

struct window_cfg {
  int64_t B = 1, Hk = 1, G = 1, D = 64, w = 1, cap = 64;
  bool strided = false;      // Q, K stored [B, S, H, D] with padded rows instead of [B, H, S, D]
  bool ragged = true;        // per-sequence lengths in [w, cap], device begins+lengths with gaps
  bool caller_lse = false;   // pass the double-precision reference LSE
  bool per_head = false;     // one output row per kv head
  pk::window_options opt{};
  float lo = -2.f, hi = 2.f;
};

// Host-side reference LSE (double) for (b, h, i), packed.
template <class T>
std::vector<float> reference_lse(const pk::kv_view<const T>& q, const pk::kv_view<const T>& k, const std::vector<int64_t>& n,
                                 float scale_opt) {
  const int64_t B = q.batch, Hq = q.heads, G = q.heads / k.heads, w = q.tokens, D = q.dim;
  const double scale = scale_opt > 0 ? scale_opt : 1.0 / std::sqrt(double(D));
  std::vector<float> out(size_t(B * Hq * w));
  std::vector<double> lg;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i = 0; i < w; ++i) {
        lg.clear();
        double m = -INFINITY;
        for (int64_t t = 0; t <= n[b] - w + i; ++t) {
          double s = 0;
          for (int64_t d = 0; d < D; ++d) s += double(pk::to_float(q(b, h, i, d))) * double(pk::to_float(k(b, h / G, t, d)));
          lg.push_back(s * scale);
          m = std::max(m, s * scale);
        }
        double z = 0;
        for (double x : lg) z += std::exp(x - m);
        out[(b * Hq + h) * w + i] = float(m + std::log(z));
      }
  return out;
}

template <class T>
void run_window_case(std::mt19937_64& rng, const window_cfg& c) {
  const int64_t B = c.B, Hk = c.Hk, Hq = c.Hk * c.G, D = c.D, w = c.w, cap = c.cap;
  INFO("B ", B, " Hk ", Hk, " G ", c.G, " D ", D, " w ", w, " cap ", cap, " strided ", c.strided, " lse ", c.caller_lse,
       " per_head ", c.per_head, " group ", int(c.opt.group), " heads ", int(c.opt.heads), " pool ", int(c.opt.pool), "/",
       c.opt.pool_kernel);
  const int64_t layers = 3, layer = int64_t(rng() % layers);
  std::vector<int64_t> n(B);
  for (auto& x : n) x = c.ragged ? w + int64_t(rng() % (cap - w + 1)) : cap;
  const int64_t qpad = c.strided ? 8 : 0, kpad = c.strided ? 8 : 0;  // keep 16-byte rows when strided
  const auto qs = to_storage<T>(random_vector<float>(rng, size_t(B * Hq * w * (D + qpad)), c.lo, c.hi));
  const auto ks = to_storage<T>(random_vector<float>(rng, size_t(B * Hk * cap * (D + kpad)), c.lo, c.hi));
  device_buffer<T> dq(qs), dk(ks);
  auto mk = [&](const T* qp, const T* kp, pk::kv_view<const T>& q, pk::kv_view<const T>& k) {
    if (c.strided) {
      q = pk::make_kv_view<const T>(qp, B, Hq, w, D, w * Hq * (D + qpad), D + qpad, Hq * (D + qpad), 1);
      k = pk::make_kv_view<const T>(kp, B, Hk, cap, D, cap * Hk * (D + kpad), D + kpad, Hk * (D + kpad), 1);
    } else {
      q = pk::make_kv_view_bhsd<const T>(qp, B, Hq, w, D);
      k = pk::make_kv_view_bhsd<const T>(kp, B, Hk, cap, D);
    }
  };
  pk::kv_view<const T> hq, hk, gq, gk;
  mk(qs.data(), ks.data(), hq, hk);
  mk(dq.get(), dk.get(), gq, gk);
  pk::segment_grid grid{layers, B, c.per_head ? Hk : 1};
  std::vector<int64_t> begins(grid.count()), lens(grid.count());
  int64_t off = 0;
  for (int64_t l = 0; l < layers; ++l)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < grid.heads; ++h) {
        begins[grid.id(l, b, h)] = off;
        lens[grid.id(l, b, h)] = n[b];
        off += n[b] + 3;
      }
  device_buffer<int64_t> dbeg(begins), dlen(lens);
  const auto hrows = pk::make_ragged_segments(grid.count(), begins.data(), lens.data());
  const auto drows = pk::make_ragged_segments(grid.count(), dbeg.get(), dlen.get());
  const float kPoison = poison_value<float>();
  std::vector<float> expect(size_t(off), kPoison);
  REQUIRE(pk::window_attention_host(hq, hk, pk::lse_view{}, c.opt, grid, layer, hrows, expect.data()) == cudaSuccess);
  std::vector<float> lse_h;
  device_buffer<float> dlse;
  pk::lse_view lse{};
  if (c.caller_lse) {
    lse_h = reference_lse(hq, hk, n, c.opt.scale);
    dlse = device_buffer<float>(lse_h);
    lse = pk::lse_view{dlse.get(), Hq * w, w, 1};
  }
  device_buffer<float> out{size_t(off)};
  device_buffer<unsigned> status(1);
  run_three_ways(
      [&](void* t, size_t& bytes, cudaStream_t s) {
        return pk::window_attention(t, bytes, gq, gk, lse, c.opt, grid, layer, drows, out.get(), status.get(), s);
      },
      [&] {
        out.poison();
        PKV_CUDA_CHECK(cudaMemset(status.get(), 0, sizeof(unsigned)));
      },
      [&](const char* mode) {
        INFO("mode ", mode);
        const auto got = out.download();
        CHECK(status.download()[0] == 0u);
        int bad = 0;
        for (size_t i = 0; i < got.size(); ++i) {
          const bool ok = std::memcmp(&expect[i], &kPoison, 4) == 0
                              ? std::memcmp(&got[i], &expect[i], 4) == 0  // outside this layer's rows: untouched
                              : window_close(got[i], expect[i]);
          if (!ok && bad++ < 5) FAIL_CHECK("element ", i, ": gpu ", got[i], " host ", expect[i]);
        }
        CHECK(bad == 0);
      });
}

}  // namespace score_test
