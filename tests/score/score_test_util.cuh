// Shared by the scorer GPU tests: random window-scorer cases (one layer or all layers, strided or paged K, layer or
// per-head rows of unequal length, layer- or sequence-major grids), run on the device three ways (size query,
// plain, graph), compared with the host twin, and checked for bitwise reproducibility.
#pragma once

#include <doctest/doctest.h>

#include <prefixkv/core/launch.cuh>
#include <prefixkv/score/score.cuh>

#include "support/gpu_harness.cuh"
#include "support/test_random.hpp"
#include "score_storage.hpp"

#include <cmath>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

namespace score_test {
using namespace prefixkv_test;
namespace pk = prefixkv;

// Accumulate-kernel choices for tests (compile-time policies of the window scorer's dispatch).
struct policy_mma_sync : pk::detail::window_policy {  // the mma.sync kernel even in PREFIXKV_SM90A builds
  static constexpr bool wgmma = false;
};
struct policy_wgmma_2stages : pk::detail::window_policy {  // wgmma with at most two K stages per warp
  static constexpr int wgmma_max_stages = 2;
};
struct policy_wgmma_1stage : pk::detail::window_policy {  // wgmma with one K stage per warp
  static constexpr int wgmma_max_stages = 1;
};

// Documented tolerance of the window scorer vs its host twin (both accumulate in fp32; only the order of the
// dot products and of the sums over window queries differs): |gpu - host| <= 2e-4 |host| + 1e-6.
inline bool window_close(float got, float want) { return std::fabs(got - want) <= 2e-4f * std::fabs(want) + 1e-6f; }

struct window_cfg {
  int64_t B = 1, Hk = 1, G = 1, D = 64, w = 1, cap = 64;
  bool strided = false;       // Q, K stored [B, S, H, D] with padded rows instead of [B, H, S, D]
  bool ragged = true;         // per-row lengths in [w, cap] (per kv head with per-head rows), device begins+lengths
  bool caller_lse = false;    // pass the double-precision reference LSE
  bool per_head = false;      // one output row per kv head
  bool seq_major = false;     // sequence-major segment grid
  int64_t layers = 0;         // 0: one layer of a 3-layer grid (window_attention); L: window_attention_layers on L
  int64_t page_size = 0;      // > 0: K paged (random page order, pages past the rows invalid); cap rounds up to pages
  bool hnd = false;           // paged layout HND instead of NHD
  int repeats = 0;            // further plain runs whose bits must equal the first run's
  pk::window_options opt{};
  float lo = -2.f, hi = 2.f;
};

using len_fn = std::function<int64_t(int64_t b, int64_t kh)>;

// Host-side reference LSE (double) for (b, h, i), packed; kv head kh of sequence b holds n(b, kh) tokens.
template <class T>
std::vector<float> reference_lse(const pk::kv_view<const T>& q, const pk::kv_view<const T>& k, const len_fn& n,
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
        for (int64_t t = 0; t <= n(b, h / G) - w + i; ++t) {
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

// The window scorer through the public entry points (default policy) or the dispatch with another policy.
// layers_call == 0: one layer (`layer`); else all grid layers.
template <class Policy, class T, class KV>
cudaError_t call_window(void* t, size_t& bytes, const pk::kv_view<const T>* q, const KV* k, const pk::lse_view* lse,
                        const pk::window_options& opt, const pk::segment_grid& grid, int64_t layer, int64_t layers_call,
                        const pk::segments& rows, float* out, unsigned* status, cudaStream_t s) {
  if constexpr (std::is_same_v<Policy, pk::detail::window_policy>) {
    if (layers_call == 0)
      return pk::window_attention(t, bytes, q[0], k[0], lse ? lse[0] : pk::lse_view{}, opt, grid, layer, rows, out, status, s);
    return pk::window_attention_layers(t, bytes, q, k, lse, opt, grid, rows, out, status, s);
  } else {
    return pk::detail::window_attention_run<Policy>(t, bytes, q, k, lse, opt, grid, layers_call == 0 ? layer : 0,
                                                    layers_call == 0 ? 1 : grid.layers, rows, out, status, s);
  }
}

template <class T, class Policy = pk::detail::window_policy>
void run_window_case(std::mt19937_64& rng, const window_cfg& c) {
  const int64_t B = c.B, Hk = c.Hk, Hq = c.Hk * c.G, D = c.D, w = c.w;
  const int64_t cap = c.page_size > 0 ? (c.cap + c.page_size - 1) / c.page_size * c.page_size : c.cap;
  INFO("B ", B, " Hk ", Hk, " G ", c.G, " D ", D, " w ", w, " cap ", cap, " strided ", c.strided, " lse ", c.caller_lse,
       " per_head ", c.per_head, " seq_major ", c.seq_major, " layers ", c.layers, " page ", c.page_size, " hnd ", c.hnd,
       " group ", int(c.opt.group), " heads ", int(c.opt.heads), " pool ", int(c.opt.pool), "/", c.opt.pool_kernel);
  const int64_t GL = c.layers > 0 ? c.layers : 3, SL = c.layers > 0 ? c.layers : 1;
  const int64_t layer0 = c.layers > 0 ? 0 : int64_t(rng() % GL);
  const pk::segment_grid grid{GL, B, c.per_head ? Hk : 1, c.seq_major};
  std::vector<int64_t> begins(grid.count()), lens(grid.count());
  int64_t off = 0;
  for (int64_t id = 0; id < grid.count(); ++id) {
    begins[id] = off;
    lens[id] = c.ragged ? w + int64_t(rng() % (cap - w + 1)) : cap;
    off += lens[id] + 3;
  }
  auto n_of = [&](int64_t l, int64_t b, int64_t kh) { return lens[grid.id(l, b, grid.heads == 1 ? 0 : kh)]; };
  const int64_t qpad = c.strided ? 8 : 0, kpad = c.strided ? 8 : 0;  // keep 16-byte rows when strided
  std::vector<std::vector<T>> qs(SL), ks(SL);
  std::vector<device_buffer<T>> dq(SL), dk(SL);
  std::vector<pk::kv_view<const T>> hq(SL), hk(SL), gq(SL), gk(SL);
  auto mk = [&](const T* qp, const T* kp, pk::kv_view<const T>& q, pk::kv_view<const T>& k) {
    if (c.strided) {
      q = pk::make_kv_view<const T>(qp, B, Hq, w, D, w * Hq * (D + qpad), D + qpad, Hq * (D + qpad), 1);
      k = pk::make_kv_view<const T>(kp, B, Hk, cap, D, cap * Hk * (D + kpad), D + kpad, Hk * (D + kpad), 1);
    } else {
      q = pk::make_kv_view_bhsd<const T>(qp, B, Hq, w, D);
      k = pk::make_kv_view_bhsd<const T>(kp, B, Hk, cap, D);
    }
  };
  for (int64_t s = 0; s < SL; ++s) {
    qs[s] = to_storage<T>(random_vector<float>(rng, size_t(B * Hq * w * (D + qpad)), c.lo, c.hi));
    ks[s] = to_storage<T>(random_vector<float>(rng, size_t(B * Hk * cap * (D + kpad)), c.lo, c.hi));
    mk(qs[s].data(), ks[s].data(), hq[s], hk[s]);
    for (int64_t b = 0; b < B; ++b)  // keys past the rows of this layer: NaN (a device read of them is flagged)
      for (int64_t kh = 0; kh < Hk; ++kh)
        for (int64_t t = n_of(layer0 + s, b, kh); t < cap; ++t)
          for (int64_t d = 0; d < D; ++d) ks[s][size_t(hk[s].offset(b, kh, t, d))] = from_float<T>(NAN);
    dq[s] = device_buffer<T>(qs[s]);
    dk[s] = device_buffer<T>(ks[s]);
    mk(dq[s].get(), dk[s].get(), gq[s], gk[s]);
  }
  // Paged copies: one block table for all layers; blocks past the longest scored row of a sequence invalid.
  std::vector<paged_copy<T>> pcs;
  std::vector<device_buffer<T>> dpool(SL);
  device_buffer<int32_t> dtable;
  std::vector<pk::paged_kv_view<const T>> hpv(SL), gpv(SL);
  if (c.page_size > 0) {
    for (int64_t s = 0; s < SL; ++s) {
      auto value = [&](int64_t b, int64_t h, int64_t t, int64_t d) { return hk[s](b, h, t, d); };
      auto pc = make_paged_copy<T>(rng, B, Hk, cap, D, c.page_size, c.hnd, value, from_float<T>(NAN));
      if (s > 0) {  // rebuild on layer 0's table
        pc.table = pcs[0].table;
        std::fill(pc.pool.begin(), pc.pool.end(), from_float<T>(NAN));
        const auto v = pc.host_view();
        for (int64_t b = 0; b < B; ++b)
          for (int64_t h = 0; h < Hk; ++h)
            for (int64_t t = 0; t < cap; ++t)
              for (int64_t d = 0; d < D; ++d) pc.pool[size_t(v.offset(b, h, t, d))] = value(b, h, t, d);
      }
      pcs.push_back(std::move(pc));
    }
    for (int64_t b = 0; b < B; ++b) {
      int64_t nmax = 0;
      for (int64_t s = 0; s < SL; ++s)
        for (int64_t kh = 0; kh < Hk; ++kh) nmax = std::max(nmax, n_of(layer0 + s, b, kh));
      pcs[0].break_blocks_from(b, (nmax + c.page_size - 1) / c.page_size, (b & 1) ? -1 : int32_t(pcs[0].num_pages));
    }
    dtable = device_buffer<int32_t>(pcs[0].table);
    for (int64_t s = 0; s < SL; ++s) {
      dpool[s] = device_buffer<T>(pcs[s].pool);
      hpv[s] = pcs[s].view(pcs[s].pool.data(), pcs[0].table.data());
      gpv[s] = pcs[s].view(dpool[s].get(), dtable.get());
    }
  }
  device_buffer<int64_t> dbeg(begins), dlen(lens);
  const auto hrows = pk::make_ragged_segments(grid.count(), begins.data(), lens.data());
  const auto drows = pk::make_ragged_segments(grid.count(), dbeg.get(), dlen.get());
  std::vector<std::vector<float>> lse_h(SL);
  std::vector<device_buffer<float>> dlse(SL);
  std::vector<pk::lse_view> hl(SL), gl(SL);
  if (c.caller_lse)
    for (int64_t s = 0; s < SL; ++s) {
      lse_h[s] = reference_lse(hq[s], hk[s], [&](int64_t b, int64_t kh) { return n_of(layer0 + s, b, kh); }, c.opt.scale);
      dlse[s] = device_buffer<float>(lse_h[s]);
      hl[s] = pk::lse_view{lse_h[s].data(), Hq * w, w, 1};
      gl[s] = pk::lse_view{dlse[s].get(), Hq * w, w, 1};
    }
  const float kPoison = poison_value<float>();
  std::vector<float> expect(size_t(off), kPoison);
  {
    const pk::lse_view* l = c.caller_lse ? hl.data() : nullptr;
    cudaError_t e;
    if (c.layers > 0)
      e = c.page_size > 0 ? pk::window_attention_layers_host(hq.data(), hpv.data(), l, c.opt, grid, hrows, expect.data())
                          : pk::window_attention_layers_host(hq.data(), hk.data(), l, c.opt, grid, hrows, expect.data());
    else
      e = c.page_size > 0 ? pk::window_attention_host(hq[0], hpv[0], l ? l[0] : pk::lse_view{}, c.opt, grid, layer0, hrows, expect.data())
                          : pk::window_attention_host(hq[0], hk[0], l ? l[0] : pk::lse_view{}, c.opt, grid, layer0, hrows, expect.data());
    REQUIRE(e == cudaSuccess);
  }
  const pk::lse_view* dl = c.caller_lse ? gl.data() : nullptr;
  device_buffer<float> out{size_t(off)};
  device_buffer<unsigned> status(1);
  auto op = [&](void* t, size_t& bytes, cudaStream_t s) {
    if (c.page_size > 0)
      return call_window<Policy>(t, bytes, gq.data(), gpv.data(), dl, c.opt, grid, layer0, c.layers, drows, out.get(),
                                 status.get(), s);
    return call_window<Policy>(t, bytes, gq.data(), gk.data(), dl, c.opt, grid, layer0, c.layers, drows, out.get(),
                               status.get(), s);
  };
  std::vector<float> first;
  run_three_ways(
      op,
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
                              ? std::memcmp(&got[i], &expect[i], 4) == 0  // outside the rows scored: untouched
                              : window_close(got[i], expect[i]);
          if (!ok && bad++ < 5) FAIL_CHECK("element ", i, ": gpu ", got[i], " host ", expect[i]);
        }
        CHECK(bad == 0);
        if (first.empty())
          first = got;
        else
          CHECK(std::memcmp(first.data(), got.data(), got.size() * 4) == 0);  // graph replay: the same bits
      });
  if (c.repeats > 0 || c.page_size > 0) {
    cudaStream_t s = nullptr;
    PKV_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    size_t bytes = 0;
    PKV_CUDA_CHECK(op(nullptr, bytes, s));
    device_buffer<unsigned char> temp(bytes);
    for (int r = 0; r < c.repeats; ++r) {  // same input, same device: same bits
      out.poison();
      temp.poison(static_cast<unsigned char>(r * 37 + 1));
      PKV_CUDA_CHECK(op(temp.get(), bytes, s));
      PKV_CUDA_CHECK(cudaStreamSynchronize(s));
      CHECK(std::memcmp(first.data(), out.download().data(), first.size() * 4) == 0);
    }
    if (c.page_size > 0) {
      // the strided path on the same logical K: the same bits when both take the same kernels (same 16-byte loads)
      bool same_vec = true;
      for (int64_t l = 0; l < SL; ++l) same_vec = same_vec && pk::vector_bytes(gk[l]) == pk::vector_bytes(gpv[l]);
      size_t sbytes = 0;
      PKV_CUDA_CHECK((call_window<Policy>(nullptr, sbytes, gq.data(), gk.data(), dl, c.opt, grid, layer0, c.layers, drows,
                                          out.get(), status.get(), s)));
      device_buffer<unsigned char> stemp(sbytes);
      out.poison();
      PKV_CUDA_CHECK((call_window<Policy>(stemp.get(), sbytes, gq.data(), gk.data(), dl, c.opt, grid, layer0, c.layers,
                                          drows, out.get(), status.get(), s)));
      PKV_CUDA_CHECK(cudaStreamSynchronize(s));
      const auto strided = out.download();
      if (same_vec) {
        CHECK(std::memcmp(first.data(), strided.data(), first.size() * 4) == 0);
      } else {
        for (size_t i = 0; i < first.size(); ++i) CHECK(window_close(first[i], strided[i]));
      }
    }
    cudaStreamDestroy(s);
  }
}

}  // namespace score_test
