// Host twins of the scorers vs straightforward reference loops (double precision, written independently here),
// the numeric conversions, and argument validation (distinct reasons, outputs untouched).
#include <doctest/doctest.h>

#include <prefixkv/core/numeric.hpp>
#include <prefixkv/score/score.hpp>

#include "support/test_random.hpp"
#include "score_storage.hpp"

#include <cmath>
#include <cstring>
#include <vector>

using namespace prefixkv_test;
namespace pk = prefixkv;
using score_test::to_storage;

namespace {

// ---- reference implementations (double, no shared code with the twins) ----------------------------------
template <class T>
double at(const pk::kv_view<const T>& v, int64_t b, int64_t h, int64_t t, int64_t d) {
  return double(pk::to_float(v.data[b * v.stride_batch + h * v.stride_head + t * v.stride_token + d * v.stride_dim]));
}

// A[b][h][t] for t < n_b: sum over window queries of the softmax probabilities.
template <class T>
std::vector<std::vector<std::vector<double>>> ref_window_A(const pk::kv_view<const T>& q, const pk::kv_view<const T>& k,
                                                           const std::vector<int64_t>& n, double scale,
                                                           const std::vector<double>* lse /*(b,h,i) packed*/) {
  const int64_t B = q.batch, Hq = q.heads, G = q.heads / k.heads, w = q.tokens, D = q.dim;
  std::vector<std::vector<std::vector<double>>> A(B, std::vector<std::vector<double>>(Hq));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      A[b][h].assign(n[b], 0.0);
      for (int64_t i = 0; i < w; ++i) {
        const int64_t vis = n[b] - w + i + 1;
        std::vector<double> lg(vis);
        for (int64_t t = 0; t < vis; ++t) {
          double s = 0;
          for (int64_t d = 0; d < D; ++d) s += at(q, b, h, i, d) * at(k, b, h / G, t, d);
          lg[t] = s * scale;
        }
        double l;
        if (lse) {
          l = (*lse)[(b * Hq + h) * w + i];
        } else {
          double m = -INFINITY, z = 0;
          for (double x : lg) m = std::max(m, x);
          for (double x : lg) z += std::exp(x - m);
          l = m + std::log(z);
        }
        for (int64_t t = 0; t < vis; ++t) A[b][h][t] += std::exp(lg[t] - l);
      }
    }
  return A;
}

std::vector<double> ref_pool(const std::vector<double>& r, pk::pool_kind pool, int kernel) {
  if (pool == pk::pool_kind::none) return r;
  const int64_t n = int64_t(r.size()), h = kernel / 2;
  std::vector<double> o(n);
  for (int64_t t = 0; t < n; ++t) {
    double a = pool == pk::pool_kind::max ? -INFINITY : 0.0;
    for (int64_t j = std::max<int64_t>(0, t - h); j <= std::min(n - 1, t + h); ++j)
      a = pool == pk::pool_kind::max ? std::max(a, r[j]) : a + r[j];
    o[t] = pool == pk::pool_kind::max ? a : a / kernel;
  }
  return o;
}

// Expected flat output.
template <class T>
std::vector<double> ref_window(const pk::kv_view<const T>& q, const pk::kv_view<const T>& k, const std::vector<int64_t>& n,
                               const pk::window_options& opt, const pk::segment_grid& grid, int64_t layer,
                               const std::vector<int64_t>& begins, size_t out_size, const std::vector<double>* lse) {
  const double scale = opt.scale > 0 ? opt.scale : 1.0 / std::sqrt(double(q.dim));
  auto A = ref_window_A(q, k, n, scale, lse);
  const int64_t Hk = k.heads, G = q.heads / k.heads;
  std::vector<double> out(out_size, std::nan(""));
  for (int64_t b = 0; b < q.batch; ++b) {
    std::vector<std::vector<double>> kv(Hk);
    for (int64_t kh = 0; kh < Hk; ++kh) {
      std::vector<double> g(n[b], opt.group == pk::head_reduce::max ? -INFINITY : 0.0);
      for (int64_t j = 0; j < G; ++j)
        for (int64_t t = 0; t < n[b]; ++t)
          g[t] = opt.group == pk::head_reduce::max ? std::max(g[t], A[b][kh * G + j][t]) : g[t] + A[b][kh * G + j][t] / G;
      kv[kh] = ref_pool(g, opt.pool, opt.pool_kernel);
    }
    for (int64_t t = 0; t < n[b]; ++t) {
      if (grid.heads == 1) {
        double r = opt.heads == pk::head_reduce::max ? -INFINITY : 0.0;
        for (int64_t kh = 0; kh < Hk; ++kh) r = opt.heads == pk::head_reduce::max ? std::max(r, kv[kh][t]) : r + kv[kh][t] / Hk;
        out[begins[grid.id(layer, b, 0)] + t] = r;
      } else {
        for (int64_t kh = 0; kh < Hk; ++kh) out[begins[grid.id(layer, b, kh)] + t] = kv[kh][t];
      }
    }
  }
  return out;
}

}  // namespace

TEST_CASE("numeric: f16/bf16 conversions are exact and round to nearest even") {
  for (uint32_t b = 0; b < 65536; ++b) {
    const uint16_t h = uint16_t(b);
    const float fh = pk::half_bits_to_float(h), fb = pk::bf16_bits_to_float(h);
    if (std::isnan(fh)) {
      CHECK(std::isnan(pk::half_bits_to_float(pk::float_to_half_bits(fh))));
    } else {
      CHECK(pk::float_to_half_bits(fh) == h);
    }
    if (std::isnan(fb)) {
      CHECK(std::isnan(pk::bf16_bits_to_float(pk::float_to_bf16_bits(fb))));
    } else {
      CHECK(pk::float_to_bf16_bits(fb) == h);
    }
  }
  // a few known values
  CHECK(pk::half_bits_to_float(0x3C00) == 1.0f);
  CHECK(pk::half_bits_to_float(0x0001) == std::ldexp(1.0f, -24));
  CHECK(pk::float_to_half_bits(65520.0f) == 0x7C00);
  CHECK(pk::float_to_half_bits(65519.0f) == 0x7BFF);
  CHECK(pk::float_to_bf16_bits(1.0f + std::ldexp(1.0f, -8)) == 0x3F80);  // tie -> even
  CHECK(pk::float_to_bf16_bits(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3F82);
  // random floats: the result is the nearest representable value (ties to even)
  auto rng = make_rng(11);
  std::uniform_real_distribution<double> e(-30, 17);
  for (int i = 0; i < 200000; ++i) {
    const float x = float((rng() & 1 ? -1 : 1) * std::pow(2.0, e(rng)));
    const uint16_t h = pk::float_to_half_bits(x);
    const double hx = pk::half_bits_to_float(h);
    if (std::isinf(hx)) {
      CHECK(std::fabs(x) >= 65520.0f);
      continue;
    }
    const double up = pk::half_bits_to_float(uint16_t(h + 1)), dn = h & 0x7FFF ? pk::half_bits_to_float(uint16_t(h - 1)) : -hx;
    const double err = std::fabs(double(x) - hx);
    if (!std::isinf(up)) CHECK(err <= std::fabs(double(x) - up));
    CHECK(err <= std::fabs(double(x) - dn));
    const uint16_t bb = pk::float_to_bf16_bits(x);
    const double bx = pk::bf16_bits_to_float(bb);
    CHECK(std::fabs(double(x) - bx) <= std::fabs(double(x) - double(pk::bf16_bits_to_float(uint16_t(bb + 1)))));
  }
}

namespace {
template <class T>
void window_case(std::mt19937_64& rng, int64_t B, int64_t Hk, int64_t G, int64_t D, int64_t w, bool strided,
                 bool ragged, bool with_lse, pk::window_options opt, bool per_head) {
  const int64_t Hq = Hk * G, cap = w + int64_t(rng() % 50);
  const int64_t layers = 2, layer = int64_t(rng() % layers);
  std::vector<int64_t> n(B);
  for (auto& x : n) x = ragged ? w + int64_t(rng() % (cap - w + 1)) : cap;
  // Q: (B, Hq, w, D); strided = [B, w, Hq, D] with padding, else bhsd.
  const int64_t qpad = strided ? 3 : 0, kpad = strided ? 5 : 0;
  std::vector<float> qf = random_vector<float>(rng, size_t(B * Hq * w * (D + qpad)), -2, 2);
  std::vector<float> kf = random_vector<float>(rng, size_t(B * Hk * cap * (D + kpad)), -2, 2);
  auto qs = to_storage<T>(qf);
  auto ks = to_storage<T>(kf);
  pk::kv_view<const T> q, k;
  if (strided) {
    q = pk::make_kv_view<const T>(qs.data(), B, Hq, w, D, w * Hq * (D + qpad), D + qpad, Hq * (D + qpad), 1);
    k = pk::make_kv_view<const T>(ks.data(), B, Hk, cap, D, cap * Hk * (D + kpad), D + kpad, Hk * (D + kpad), 1);
  } else {
    q = pk::make_kv_view_bhsd<const T>(qs.data(), B, Hq, w, D);
    k = pk::make_kv_view_bhsd<const T>(ks.data(), B, Hk, cap, D);
  }
  pk::segment_grid grid{layers, B, per_head ? Hk : 1};
  std::vector<int64_t> begins(grid.count()), lens(grid.count());
  int64_t off = 0;
  for (int64_t l = 0; l < layers; ++l)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < grid.heads; ++h) {
        begins[grid.id(l, b, h)] = off;
        lens[grid.id(l, b, h)] = n[b];
        off += n[b] + 2;  // gaps between rows
      }
  auto rows = pk::make_ragged_segments(grid.count(), begins.data(), lens.data());
  std::vector<double> lse_d;
  std::vector<float> lse_f;
  pk::lse_view lse{};
  if (with_lse) {
    // Reference LSE in double.
    const double scale = opt.scale > 0 ? opt.scale : 1.0 / std::sqrt(double(D));
    lse_d.resize(B * Hq * w);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hq; ++h)
        for (int64_t i = 0; i < w; ++i) {
          double m = -INFINITY;
          std::vector<double> lg;
          for (int64_t t = 0; t <= n[b] - w + i; ++t) {
            double s = 0;
            for (int64_t d = 0; d < D; ++d) s += at(q, b, h, i, d) * at(k, b, h / G, t, d);
            lg.push_back(s * scale);
            m = std::max(m, s * scale);
          }
          double z = 0;
          for (double x : lg) z += std::exp(x - m);
          lse_d[(b * Hq + h) * w + i] = m + std::log(z);
        }
    lse_f.assign(lse_d.begin(), lse_d.end());
    lse = pk::lse_view{lse_f.data(), Hq * w, w, 1};
  }
  std::vector<float> out(size_t(off), -7.0f);
  REQUIRE(pk::window_attention_host(q, k, lse, opt, grid, layer, rows, out.data()) == cudaSuccess);
  const auto expect = ref_window(q, k, n, opt, grid, layer, begins, out.size(), with_lse ? &lse_d : nullptr);
  for (size_t i = 0; i < out.size(); ++i) {
    if (std::isnan(expect[i])) {
      bool in_layer = false;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < grid.heads; ++h) {
          const int64_t id = grid.id(layer, b, h);
          in_layer |= int64_t(i) >= begins[id] && int64_t(i) < begins[id] + lens[id];
        }
      CHECK(!in_layer);
      CHECK(out[i] == -7.0f);  // untouched outside this layer's rows
    } else {
      CHECK(std::fabs(out[i] - expect[i]) <= 2e-5 * std::fabs(expect[i]) + 2e-6);
    }
  }
}
}  // namespace

TEST_CASE("window scorer host twin matches the double-precision reference") {
  auto rng = make_rng(21);
  for (int rep = 0; rep < 24; ++rep) {
    const int64_t G = int64_t(1) << (rng() % 4), Hk = 1 + rng() % 3, B = 1 + rng() % 3;
    const int64_t D = rep % 3 == 0 ? 8 : 1 + rng() % 40, w = 1 + rng() % 12;
    pk::window_options opt;
    opt.group = rng() & 1 ? pk::head_reduce::max : pk::head_reduce::mean;
    opt.heads = rng() & 1 ? pk::head_reduce::max : pk::head_reduce::mean;
    opt.pool = pk::pool_kind(rng() % 3);
    opt.pool_kernel = 1 + 2 * int(rng() % 4);
    if (rng() % 3 == 0) opt.scale = 0.05f;
    INFO("rep ", rep, " G ", G, " Hk ", Hk, " D ", D, " w ", w);
    window_case<float>(rng, B, Hk, G, D, w, rep & 1, rep & 2, rep % 5 == 0, opt, rep % 4 == 3);
    window_case<pk::bf16>(rng, B, Hk, G, D, w, rep & 2, rep & 1, rep % 7 == 0, opt, rep % 4 == 1);
    window_case<pk::f16>(rng, B, Hk, G, D, w, false, true, false, opt, false);
  }
}

TEST_CASE("accumulated attention host twin: paper formula, exact fp32 order, strided P") {
  auto rng = make_rng(22);
  for (int rep = 0; rep < 10; ++rep) {
    const int64_t B = 1 + rng() % 3, Hk = 1 + rng() % 3, G = 1 + rng() % 4, Hq = Hk * G, Q = 1 + rng() % 9,
                  cap = 1 + rng() % 70;
    const bool per_head = rep & 1;
    // P stored (B, Q, Hq, cap + 3): strided.
    std::vector<float> pf = random_vector<float>(rng, size_t(B * Q * Hq * (cap + 3)), 0, 1);
    auto p = pk::make_kv_view<const float>(pf.data(), B, Hq, Q, cap, Q * Hq * (cap + 3), cap + 3, Hq * (cap + 3), 1);
    pk::segment_grid grid{3, B, per_head ? Hk : 1};
    const int64_t layer = 2;
    std::vector<int64_t> n(B);
    for (auto& x : n) x = int64_t(rng() % (cap + 1));
    std::vector<int64_t> cu(grid.count() + 1, 0);
    for (int64_t id = 0; id < grid.count(); ++id) cu[id + 1] = cu[id] + n[grid.batch_of(id)];
    auto rows = pk::make_offset_segments(grid.count(), cu.data());
    std::vector<float> out(size_t(cu.back()), -1.f);
    REQUIRE(pk::accumulated_attention_host(p, grid, layer, rows, out.data()) == cudaSuccess);
    const int64_t GG = Hq / grid.heads;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t oh = 0; oh < grid.heads; ++oh)
        for (int64_t t = 0; t < n[b]; ++t) {
          float s = 0;  // the paper's order, fp32
          double sd = 0;
          for (int64_t qi = 0; qi < Q; ++qi) {
            float hs = 0;
            double hd = 0;
            for (int64_t g = 0; g < GG; ++g) {
              hs += pf[((b * Q + qi) * Hq + oh * GG + g) * (cap + 3) + t];
              hd += pf[((b * Q + qi) * Hq + oh * GG + g) * (cap + 3) + t];
            }
            s += hs / float(GG);
            sd += hd / GG;
          }
          const float got = out[cu[grid.id(layer, b, oh)] + t];
          CHECK(got == s);
          CHECK(std::fabs(got - sd) <= 1e-5 * sd + 1e-6);
        }
  }
}

TEST_CASE("key-norm host twin matches the reference") {
  auto rng = make_rng(23);
  for (int rep = 0; rep < 8; ++rep) {
    const int64_t B = 1 + rng() % 3, Hk = 1 + rng() % 4, D = 1 + rng() % 70, cap = 1 + rng() % 40;
    std::vector<float> kf = random_vector<float>(rng, size_t(B * Hk * cap * D));
    auto ks = to_storage<pk::bf16>(kf);
    auto k = pk::make_kv_view_bshd<const pk::bf16>(ks.data(), B, cap, Hk, D);
    const bool per_head = rep & 1, recip = rep & 2;
    pk::segment_grid grid{1, B, per_head ? Hk : 1};
    auto rows = pk::make_uniform_segments(grid.count(), cap, cap + 1);
    std::vector<float> out(size_t(grid.count() * (cap + 1)), -1.f);
    REQUIRE(pk::key_norm_host(k, pk::key_norm_options{recip}, grid, 0, rows, out.data()) == cudaSuccess);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < cap; ++t) {
        double mean = 0;
        for (int64_t h = 0; h < Hk; ++h) {
          double ss = 0;
          for (int64_t d = 0; d < D; ++d) ss += std::pow(double(pk::to_float(k(b, h, t, d))), 2);
          const double v = recip ? 1.0 / std::sqrt(ss) : -std::sqrt(ss);
          mean += v / Hk;
          if (per_head) CHECK(std::fabs(out[grid.id(0, b, h) * (cap + 1) + t] - v) <= 1e-5 * std::fabs(v) + 1e-6);
        }
        if (!per_head) CHECK(std::fabs(out[grid.id(0, b, 0) * (cap + 1) + t] - mean) <= 1e-5 * std::fabs(mean) + 1e-6);
      }
    for (int64_t id = 0; id < grid.count(); ++id) CHECK(out[id * (cap + 1) + cap] == -1.f);  // gap untouched
  }
}

TEST_CASE("scorers accept a null output exactly when every row of the layer is empty") {
  std::vector<float> pf(2 * 4 * 3 * 8, 0.5f), kf(2 * 2 * 8 * 4, 0.25f);
  auto p = pk::make_kv_view_bhsd<const float>(pf.data(), 2, 4, 3, 8);  // (batch, q_head, query, key)
  auto k = pk::make_kv_view_bhsd<const float>(kf.data(), 2, 2, 8, 4);  // (batch, kv_head, token, dim)
  for (int64_t heads : {int64_t(1), int64_t(2)}) {
    pk::segment_grid grid{2, 2, heads};
    const int64_t S = grid.count();
    // Layer 1 empty, layer 0 not: the rows of the layer scored decide.
    std::vector<int64_t> cu(size_t(S + 1), 0);
    for (int64_t id = 0; id < S; ++id) cu[size_t(id + 1)] = cu[size_t(id)] + (id < 2 * heads ? 5 : 0);
    auto rows = pk::make_offset_segments(S, cu.data());
    CHECK(pk::accumulated_attention_host(p, grid, 1, rows, nullptr) == cudaSuccess);
    CHECK(pk::key_norm_host(k, {}, grid, 1, rows, nullptr) == cudaSuccess);
    CHECK(pk::accumulated_attention_host(p, grid, 0, rows, nullptr) == cudaErrorInvalidValue);
    CHECK(pk::last_error().why == pk::reason::null_pointer);
    CHECK(pk::key_norm_host(k, {}, grid, 0, rows, nullptr) == cudaErrorInvalidValue);
    CHECK(pk::last_error().why == pk::reason::null_pointer);
    CHECK(pk::key_norm_host(k, {}, grid, 0, pk::make_uniform_segments(S, 0), nullptr) == cudaSuccess);
    CHECK(pk::key_norm_host(k, {}, grid, 0, pk::make_uniform_segments(S, 1), nullptr) == cudaErrorInvalidValue);
  }
}

TEST_CASE("scorers reject bad input with distinct reasons and write nothing") {
  std::vector<float> qf(2 * 8 * 4 * 16, 0.5f), kf(2 * 2 * 32 * 16, 0.25f), out(64 * 8, -3.f);
  auto q = pk::make_kv_view_bhsd<const float>(qf.data(), 2, 8, 4, 16);
  auto k = pk::make_kv_view_bhsd<const float>(kf.data(), 2, 2, 32, 16);
  pk::segment_grid grid{1, 2, 1};
  auto rows = pk::make_uniform_segments(2, 32);
  pk::window_options opt;
  auto expect_reason = [&](cudaError_t e, pk::reason r) {
    CHECK(e == cudaErrorInvalidValue);
    CHECK(pk::last_error().why == r);
    for (float x : out) REQUIRE(x == -3.f);
  };
  REQUIRE(pk::window_attention_host(q, k, {}, opt, grid, 0, rows, out.data()) == cudaSuccess);
  std::fill(out.begin(), out.end(), -3.f);
  auto q_bad_heads = pk::make_kv_view_bhsd<const float>(qf.data(), 2, 3, 4, 16);
  expect_reason(pk::window_attention_host(q_bad_heads, k, {}, opt, grid, 0, rows, out.data()), pk::reason::shape_mismatch);
  auto q_bad_dim = pk::make_kv_view_bhsd<const float>(qf.data(), 2, 8, 4, 8);
  expect_reason(pk::window_attention_host(q_bad_dim, k, {}, opt, grid, 0, rows, out.data()), pk::reason::shape_mismatch);
  auto q_long = pk::make_kv_view_bhsd<const float>(qf.data(), 1, 8, 40, 16);
  auto k1 = pk::make_kv_view_bhsd<const float>(kf.data(), 1, 2, 32, 16);
  pk::segment_grid grid1{1, 1, 1};
  expect_reason(pk::window_attention_host(q_long, k1, {}, opt, grid1, 0, pk::make_uniform_segments(1, 32), out.data()),
                pk::reason::bad_parameter);
  // window longer than a (ragged) sequence
  expect_reason(pk::window_attention_host(q, k, {}, opt, grid, 0, pk::make_uniform_segments(2, 3), out.data()),
                pk::reason::bad_parameter);
  expect_reason(pk::window_attention_host(q, k, {}, opt, grid, 0, pk::make_uniform_segments(2, 33), out.data()),
                pk::reason::out_of_range);
  auto q_mis = pk::make_kv_view_bhsd<const float>(reinterpret_cast<const float*>(reinterpret_cast<const char*>(qf.data()) + 2), 2, 8, 4, 16);
  expect_reason(pk::window_attention_host(q_mis, k, {}, opt, grid, 0, rows, out.data()), pk::reason::misaligned);
  pk::window_options even = opt;
  even.pool = pk::pool_kind::avg;
  even.pool_kernel = 4;
  expect_reason(pk::window_attention_host(q, k, {}, even, grid, 0, rows, out.data()), pk::reason::bad_parameter);
  expect_reason(pk::window_attention_host(q, k, {}, opt, grid, 1, rows, out.data()), pk::reason::out_of_range);
  expect_reason(pk::window_attention_host(q, k, {}, opt, grid, 0, rows, nullptr), pk::reason::null_pointer);
  expect_reason(pk::window_attention_host(q, k, {}, opt, pk::segment_grid{1, 2, 3}, 0, pk::make_uniform_segments(6, 32), out.data()),
                pk::reason::shape_mismatch);
  qf[5] = NAN;
  expect_reason(pk::window_attention_host(q, k, {}, opt, grid, 0, rows, out.data()), pk::reason::nonfinite_input);
  qf[5] = 0.5f;
  kf[77] = INFINITY;
  expect_reason(pk::window_attention_host(q, k, {}, opt, grid, 0, rows, out.data()), pk::reason::nonfinite_input);
  expect_reason(pk::key_norm_host(k, {}, grid, 0, rows, out.data()), pk::reason::nonfinite_input);
  kf[77] = 0.25f;
  auto p = pk::make_kv_view_bhsd<const float>(kf.data(), 2, 2, 32, 16);  // (B, H, Q, key=16)
  expect_reason(pk::accumulated_attention_host(p, grid, 0, rows, out.data()), pk::reason::out_of_range);  // 32 > 16 keys
  expect_reason(pk::accumulated_attention_host(p, pk::segment_grid{1, 2, 3}, 0, pk::make_uniform_segments(6, 8), out.data()),
                pk::reason::shape_mismatch);
}
