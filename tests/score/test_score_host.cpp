// Host twins of the scorers vs straightforward reference loops (double precision, written independently here),
// per-head row lengths, all-layers calls, paged K, sequence-major grids, the numeric conversions, and argument
// validation (distinct reasons, outputs untouched).
#include <doctest/doctest.h>

#include <prefixkv/core/numeric.hpp>
#include <prefixkv/score/score.hpp>

#include "support/test_random.hpp"
#include "score_storage.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

using namespace prefixkv_test;
namespace pk = prefixkv;
using score_test::to_storage;

namespace {

// ---- reference implementations (double, no shared code with the twins) ----------------------------------
template <class V>
double at(const V& v, int64_t b, int64_t h, int64_t t, int64_t d) {
  return double(pk::to_float(v(b, h, t, d)));
}

using len_fn = std::function<int64_t(int64_t b, int64_t kh)>;  // row length seen by kv head kh of sequence b

// A[b][h][t] for t < n(b, h / G): sum over window queries of the softmax probabilities.
template <class T, class KV>
std::vector<std::vector<std::vector<double>>> ref_window_A(const pk::kv_view<const T>& q, const KV& k, const len_fn& n,
                                                           double scale, const std::vector<double>* lse /*(b,h,i)*/) {
  const int64_t B = q.batch, Hq = q.heads, G = q.heads / k.heads, w = q.tokens, D = q.dim;
  std::vector<std::vector<std::vector<double>>> A(B, std::vector<std::vector<double>>(Hq));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t nb = n(b, h / G);
      A[b][h].assign(nb, 0.0);
      for (int64_t i = 0; i < w; ++i) {
        const int64_t vis = nb - w + i + 1;
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

// Expected values of one layer written into `out` (NaN elsewhere stays).
template <class T, class KV>
void ref_window(const pk::kv_view<const T>& q, const KV& k, const pk::window_options& opt, const pk::segment_grid& grid,
                int64_t layer, const std::vector<int64_t>& begins, const std::vector<int64_t>& lens,
                const std::vector<double>* lse, std::vector<double>& out) {
  const double scale = opt.scale > 0 ? opt.scale : 1.0 / std::sqrt(double(q.dim));
  auto n = [&](int64_t b, int64_t kh) { return lens[grid.id(layer, b, grid.heads == 1 ? 0 : kh)]; };
  auto A = ref_window_A(q, k, n, scale, lse);
  const int64_t Hk = k.heads, G = q.heads / k.heads;
  for (int64_t b = 0; b < q.batch; ++b) {
    std::vector<std::vector<double>> kv(Hk);
    for (int64_t kh = 0; kh < Hk; ++kh) {
      const int64_t nb = n(b, kh);
      std::vector<double> g(nb, opt.group == pk::head_reduce::max ? -INFINITY : 0.0);
      for (int64_t j = 0; j < G; ++j)
        for (int64_t t = 0; t < nb; ++t)
          g[t] = opt.group == pk::head_reduce::max ? std::max(g[t], A[b][kh * G + j][t]) : g[t] + A[b][kh * G + j][t] / G;
      kv[kh] = ref_pool(g, opt.pool, opt.pool_kernel);
    }
    if (grid.heads == 1) {
      const int64_t id = grid.id(layer, b, 0);
      for (int64_t t = 0; t < lens[id]; ++t) {
        double r = opt.heads == pk::head_reduce::max ? -INFINITY : 0.0;
        for (int64_t kh = 0; kh < Hk; ++kh) r = opt.heads == pk::head_reduce::max ? std::max(r, kv[kh][t]) : r + kv[kh][t] / Hk;
        out[begins[id] + t] = r;
      }
    } else {
      for (int64_t kh = 0; kh < Hk; ++kh) {
        const int64_t id = grid.id(layer, b, kh);
        for (int64_t t = 0; t < lens[id]; ++t) out[begins[id] + t] = kv[kh][t];
      }
    }
  }
}

// Reference LSE in double, (b, h, i) packed; n(b, kh) as above.
template <class T>
std::vector<double> ref_lse(const pk::kv_view<const T>& q, const pk::kv_view<const T>& k, const len_fn& n, double scale) {
  const int64_t B = q.batch, Hq = q.heads, G = q.heads / k.heads, w = q.tokens, D = q.dim;
  std::vector<double> out(size_t(B * Hq * w));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i = 0; i < w; ++i) {
        double m = -INFINITY;
        std::vector<double> lg;
        for (int64_t t = 0; t <= n(b, h / G) - w + i; ++t) {
          double s = 0;
          for (int64_t d = 0; d < D; ++d) s += at(q, b, h, i, d) * at(k, b, h / G, t, d);
          lg.push_back(s * scale);
          m = std::max(m, s * scale);
        }
        double z = 0;
        for (double x : lg) z += std::exp(x - m);
        out[(b * Hq + h) * w + i] = m + std::log(z);
      }
  return out;
}

// Rows of a grid laid out with gaps of `gap` elements, lengths from `len(id)`.
struct row_table {
  std::vector<int64_t> begins, lens;
  int64_t size = 0;
  pk::segments rows() const { return pk::make_ragged_segments(int64_t(begins.size()), begins.data(), lens.data()); }
};
template <class F>
row_table make_rows(const pk::segment_grid& grid, F&& len, int64_t gap = 2) {
  row_table r;
  r.begins.resize(size_t(grid.count()));
  r.lens.resize(size_t(grid.count()));
  for (int64_t id = 0; id < grid.count(); ++id) {  // storage order = id order
    r.begins[id] = r.size;
    r.lens[id] = len(id);
    r.size += r.lens[id] + gap;
  }
  return r;
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
// One window-scorer case on one layer of a 2-layer grid: per-sequence (layer rows) or per-(sequence, kv head)
// lengths (per-head rows, unequal), K tokens past every row's length poisoned with NaN (a read of them fails the
// call), optionally paged K (the paged twin must equal the strided one bit for bit).
template <class T>
void window_case(std::mt19937_64& rng, int64_t B, int64_t Hk, int64_t G, int64_t D, int64_t w, bool strided,
                 bool with_lse, pk::window_options opt, bool per_head, bool seq_major, bool paged) {
  const int64_t Hq = Hk * G, cap = w + int64_t(rng() % 50);
  const int64_t layers = 2, layer = int64_t(rng() % layers);
  const pk::segment_grid grid{layers, B, per_head ? Hk : 1, seq_major};
  INFO("B ", B, " Hk ", Hk, " G ", G, " D ", D, " w ", w, " cap ", cap, " per_head ", per_head, " seq_major ", seq_major,
       " paged ", paged, " lse ", with_lse);
  const auto rt = make_rows(grid, [&](int64_t) { return w + int64_t(rng() % (cap - w + 1)); });
  auto n = [&](int64_t b, int64_t kh) { return rt.lens[grid.id(layer, b, grid.heads == 1 ? 0 : kh)]; };
  // Q: (B, Hq, w, D); strided = [B, w, Hq, D] with padding, else bhsd. K likewise [B, cap, Hk, D + pad].
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
  for (int64_t b = 0; b < B; ++b)  // keys past the row the twin must read: NaN
    for (int64_t kh = 0; kh < Hk; ++kh)
      for (int64_t t = n(b, kh); t < cap; ++t)
        for (int64_t d = 0; d < D; ++d) ks[size_t(k.offset(b, kh, t, d))] = score_test::from_float<T>(NAN);
  std::vector<double> lse_d;
  std::vector<float> lse_f;
  pk::lse_view lse{};
  if (with_lse) {
    lse_d = ref_lse(q, k, n, opt.scale > 0 ? opt.scale : 1.0 / std::sqrt(double(D)));
    lse_f.assign(lse_d.begin(), lse_d.end());
    lse = pk::lse_view{lse_f.data(), Hq * w, w, 1};
  }
  std::vector<float> out(size_t(rt.size), -7.0f);
  REQUIRE(pk::window_attention_host(q, k, lse, opt, grid, layer, rt.rows(), out.data()) == cudaSuccess);
  std::vector<double> expect(out.size(), std::nan(""));
  ref_window(q, k, opt, grid, layer, rt.begins, rt.lens, with_lse ? &lse_d : nullptr, expect);
  for (size_t i = 0; i < out.size(); ++i) {
    if (std::isnan(expect[i]))
      CHECK(out[i] == -7.0f);  // untouched outside this layer's rows
    else
      CHECK(std::fabs(out[i] - expect[i]) <= 2e-5 * std::fabs(expect[i]) + 2e-6);
  }
  if (paged) {
    const auto pc = score_test::make_paged_copy<T>(rng, B, Hk, cap, D, 1 + int64_t(rng() % 5), rng() & 1,
                                                   [&](int64_t b, int64_t h, int64_t t, int64_t d) { return k(b, h, t, d); },
                                                   score_test::from_float<T>(NAN));
    std::vector<float> out2(out.size(), -7.0f);
    REQUIRE(pk::window_attention_host(q, pc.host_view(), lse, opt, grid, layer, rt.rows(), out2.data()) == cudaSuccess);
    CHECK(std::memcmp(out.data(), out2.data(), out.size() * sizeof(float)) == 0);
  }
}
}  // namespace

TEST_CASE("window scorer host twin matches the double-precision reference (per-head lengths, paged K)") {
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
    INFO("rep ", rep);
    window_case<float>(rng, B, Hk, G, D, w, rep & 1, rep % 5 == 0, opt, rep % 4 == 3, rep % 3 == 0, rep % 2 == 0);
    window_case<pk::bf16>(rng, B, Hk, G, D, w, rep & 2, rep % 7 == 0, opt, rep % 4 == 1, rep % 3 == 1, rep % 3 == 0);
    window_case<pk::f16>(rng, B, Hk, G, D, w, false, rep % 2 == 0, opt, rep % 2 == 0, rep % 3 == 2, rep % 4 == 1);
  }
}

TEST_CASE("accumulated attention host twin: paper formula, the defined fp32 order, strided P, per-head lengths") {
  // The defined order, written out here: chunks of 32 consecutive queries; a chunk sums heads (outer) x its queries
  // (inner) from 0.0f; the chunk sums are added in chunk order from 0.0f; one division by the group size.
  static_assert(pk::attention_query_chunk == 32, "the reference below spells out chunks of 32 queries");
  auto rng = make_rng(22);
  for (int rep = 0; rep < 12; ++rep) {
    const int64_t B = 1 + rng() % 3, Hk = 1 + rng() % 3, G = 1 + rng() % 4, Hq = Hk * G;
    const int64_t Q = rep % 3 == 0 ? 1 + rng() % 9 : (rep % 3 == 1 ? 32 * (1 + rng() % 3) : 33 + rng() % 90);
    const int64_t cap = 1 + rng() % 70;
    const bool per_head = rep & 1;
    INFO("rep ", rep, " Q ", Q, " Hq ", Hq, " cap ", cap);
    // P stored (B, Q, Hq, cap + 3): strided.
    std::vector<float> pf = random_vector<float>(rng, size_t(B * Q * Hq * (cap + 3)), 0, 1);
    auto p = pk::make_kv_view<const float>(pf.data(), B, Hq, Q, cap, Q * Hq * (cap + 3), cap + 3, Hq * (cap + 3), 1);
    const pk::segment_grid grid{3, B, per_head ? Hk : 1, rep % 3 == 0};
    const int64_t layer = 2;
    const auto rt = make_rows(grid, [&](int64_t) { return int64_t(rng() % (cap + 1)); }, 0);
    // keys past a row's length: NaN (the twin must not read them)
    const int64_t GG = Hq / grid.heads;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t oh = 0; oh < grid.heads; ++oh)
        for (int64_t g = 0; g < GG; ++g)
          for (int64_t qi = 0; qi < Q; ++qi)
            for (int64_t t = rt.lens[grid.id(layer, b, oh)]; t < cap; ++t)
              pf[size_t(p.offset(b, oh * GG + g, qi, t))] = NAN;
    std::vector<float> out(size_t(rt.size), -1.f);
    REQUIRE(pk::accumulated_attention_host(p, grid, layer, rt.rows(), out.data()) == cudaSuccess);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t oh = 0; oh < grid.heads; ++oh) {
        const int64_t id = grid.id(layer, b, oh);
        for (int64_t t = 0; t < rt.lens[id]; ++t) {
          float s = 0;  // the defined order, fp32
          double sd = 0;
          for (int64_t q0 = 0; q0 < Q; q0 += 32) {
            float c = 0;
            for (int64_t g = 0; g < GG; ++g)
              for (int64_t qi = q0; qi < std::min(Q, q0 + 32); ++qi) {
                c += pf[((b * Q + qi) * Hq + oh * GG + g) * (cap + 3) + t];
                sd += pf[((b * Q + qi) * Hq + oh * GG + g) * (cap + 3) + t];
              }
            s += c;
          }
          const float want = s / float(GG);
          sd /= double(GG);
          const float got = out[rt.begins[id] + t];
          CHECK(got == want);
          CHECK(std::fabs(got - sd) <= 1e-5 * sd + 1e-6);
        }
      }
    for (int64_t id = 0; id < grid.count(); ++id)  // other layers untouched
      if (grid.layer_of(id) != layer)
        for (int64_t t = 0; t < rt.lens[id]; ++t) CHECK(out[rt.begins[id] + t] == -1.f);
  }
}

TEST_CASE("key-norm host twin matches the reference (per-head lengths, paged K)") {
  auto rng = make_rng(23);
  for (int rep = 0; rep < 12; ++rep) {
    const int64_t B = 1 + rng() % 3, Hk = 1 + rng() % 4, D = 1 + rng() % 70, cap = 1 + rng() % 40;
    std::vector<float> kf = random_vector<float>(rng, size_t(B * Hk * cap * D));
    auto ks = to_storage<pk::bf16>(kf);
    auto k = pk::make_kv_view_bshd<const pk::bf16>(ks.data(), B, cap, Hk, D);
    const bool per_head = rep & 1, recip = rep & 2;
    const pk::segment_grid grid{2, B, per_head ? Hk : 1, rep % 3 == 1};
    const int64_t layer = rep % 2;
    const auto rt = make_rows(grid, [&](int64_t) { return int64_t(rng() % (cap + 1)); }, 1);
    for (int64_t b = 0; b < B; ++b)  // keys past the rows: NaN
      for (int64_t h = 0; h < Hk; ++h)
        for (int64_t t = rt.lens[grid.id(layer, b, per_head ? h : 0)]; t < cap; ++t)
          for (int64_t d = 0; d < D; ++d) ks[size_t(k.offset(b, h, t, d))] = pk::bf16::from_float(NAN);
    std::vector<float> out(size_t(rt.size), -1.f);
    REQUIRE(pk::key_norm_host(k, pk::key_norm_options{recip}, grid, layer, rt.rows(), out.data()) == cudaSuccess);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t nl = rt.lens[grid.id(layer, b, 0)];
      for (int64_t t = 0; t < cap; ++t) {
        double mean = 0;
        for (int64_t h = 0; h < Hk; ++h) {
          const int64_t id = grid.id(layer, b, per_head ? h : 0);
          if (t >= rt.lens[id]) continue;
          double ss = 0;
          for (int64_t d = 0; d < D; ++d) ss += std::pow(at(k, b, h, t, d), 2);
          const double v = recip ? 1.0 / std::sqrt(ss) : -std::sqrt(ss);
          mean += v / Hk;
          if (per_head) CHECK(std::fabs(out[rt.begins[id] + t] - v) <= 1e-5 * std::fabs(v) + 1e-6);
        }
        if (!per_head && t < nl) CHECK(std::fabs(out[rt.begins[grid.id(layer, b, 0)] + t] - mean) <= 1e-5 * std::fabs(mean) + 1e-6);
      }
    }
    for (int64_t id = 0; id < grid.count(); ++id) {
      CHECK(out[rt.begins[id] + rt.lens[id]] == -1.f);  // gap untouched
      if (grid.layer_of(id) != layer)
        for (int64_t t = 0; t < rt.lens[id]; ++t) CHECK(out[rt.begins[id] + t] == -1.f);
    }
    // paged copy (NHD or HND, page sizes 1..5, pages past the longest row of a sequence invalid): same bits
    auto pc = score_test::make_paged_copy<pk::bf16>(rng, B, Hk, cap, D, 1 + int64_t(rng() % 5), rng() & 1,
                                                    [&](int64_t b, int64_t h, int64_t t, int64_t d) { return k(b, h, t, d); },
                                                    pk::bf16::from_float(NAN));
    for (int64_t b = 0; b < B; ++b) {
      int64_t nmax = 0;
      for (int64_t h = 0; h < grid.heads; ++h) nmax = std::max(nmax, rt.lens[grid.id(layer, b, h)]);
      pc.break_blocks_from(b, (nmax + pc.page_size - 1) / pc.page_size, rep & 1 ? -1 : int32_t(pc.num_pages));
    }
    std::vector<float> out2(out.size(), -1.f);
    REQUIRE(pk::key_norm_host(pc.host_view(), pk::key_norm_options{recip}, grid, layer, rt.rows(), out2.data()) == cudaSuccess);
    CHECK(std::memcmp(out.data(), out2.data(), out.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("per-head rows of unequal length: each head writes exactly its own row (issue reproducers)") {
  // key_norm_host on a (1, 2, 4, 2) float view, one row per kv head: head 0 holds 4 tokens, head 1 one token;
  // the output holds exactly 5 floats.
  std::vector<float> kf = {3, 4, 0, 1, 1, 0, 2, 0,   // head 0, tokens 0-3
                           6, 8, 9, 9, 9, 9, 9, 9};  // head 1, tokens 0-3 (only token 0 is scored)
  auto k = pk::make_kv_view_bhsd<const float>(kf.data(), 1, 2, 4, 2);
  const pk::segment_grid grid{1, 1, 2};
  const std::vector<int64_t> begins = {0, 4}, lens = {4, 1};
  const auto rows = pk::make_ragged_segments(2, begins.data(), lens.data());
  std::vector<float> out(5, -1.f);
  REQUIRE(pk::key_norm_host(k, {}, grid, 0, rows, out.data()) == cudaSuccess);
  CHECK(out == std::vector<float>{-5.f, -1.f, -1.f, -2.f, -10.f});
  // head 1 longer than the cache: rejected, nothing written
  const std::vector<int64_t> lens_bad = {1, 5};
  std::fill(out.begin(), out.end(), -1.f);
  CHECK(pk::key_norm_host(k, {}, grid, 0, pk::make_ragged_segments(2, begins.data(), lens_bad.data()), out.data()) ==
        cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::out_of_range);
  CHECK(out == std::vector<float>(5, -1.f));

  // window_attention_host, one row per kv head, head rows 4 and 2 tokens long, window 2: 6 floats in all
  std::vector<float> qf(1 * 2 * 2 * 2, 0.5f);
  auto q = pk::make_kv_view_bhsd<const float>(qf.data(), 1, 2, 2, 2);
  const std::vector<int64_t> wlens = {4, 2};
  std::vector<float> wout(6, -1.f);
  REQUIRE(pk::window_attention_host(q, k, {}, {}, grid, 0, pk::make_ragged_segments(2, begins.data(), wlens.data()),
                                    wout.data()) == cudaSuccess);
  // head 1: window queries at positions 0 and 1 of its 2 tokens: key 0 gets 1 + p, key 1 gets 1 - p
  CHECK(std::fabs(wout[4] + wout[5] - 2.0f) < 1e-6f);
  CHECK(wout[4] > 1.0f);
  double sum0 = 0;
  for (int i = 0; i < 4; ++i) sum0 += wout[i];
  CHECK(std::fabs(sum0 - 2.0) < 1e-5);
  const std::vector<int64_t> wlens_short = {4, 1};  // head 1 shorter than the window
  CHECK(pk::window_attention_host(q, k, {}, {}, grid, 0, pk::make_ragged_segments(2, begins.data(), wlens_short.data()),
                                  wout.data()) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::bad_parameter);

  // accumulated_attention_host: P with 3 keys, head 1's row claims 4 keys (past P): rejected
  std::vector<float> pf(1 * 2 * 1 * 3, 0.25f);
  auto p = pk::make_kv_view_bhsd<const float>(pf.data(), 1, 2, 1, 3);  // (batch, q_head, query, key)
  const std::vector<int64_t> alens = {2, 4};
  std::vector<float> aout(6, -1.f);
  CHECK(pk::accumulated_attention_host(p, grid, 0, pk::make_ragged_segments(2, begins.data(), alens.data()), aout.data()) ==
        cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::out_of_range);
  CHECK(aout == std::vector<float>(6, -1.f));
}

TEST_CASE("all-layers host twins equal one call per layer, bit for bit") {
  auto rng = make_rng(24);
  for (int rep = 0; rep < 6; ++rep) {
    const int64_t L = 1 + rng() % 4, B = 1 + rng() % 2, Hk = 1 + rng() % 2, G = 1 + rng() % 3, Hq = Hk * G;
    const int64_t D = 1 + rng() % 24, w = 1 + rng() % 6, cap = w + rng() % 30;
    const bool per_head = rep & 1;
    const pk::segment_grid grid{L, B, per_head ? Hk : 1, rep % 3 == 2};
    INFO("rep ", rep, " L ", L);
    const auto rt = make_rows(grid, [&](int64_t) { return w + int64_t(rng() % (cap - w + 1)); });
    std::vector<std::vector<pk::f16>> qs(L), ks(L);
    std::vector<std::vector<float>> ls(L);
    std::vector<pk::kv_view<const pk::f16>> qv(L), kv(L);
    std::vector<pk::lse_view> lv(L);
    std::vector<score_test::paged_copy<pk::f16>> pcs;
    std::vector<pk::paged_kv_view<const pk::f16>> pv(L);
    const int64_t ps = 1 + rng() % 4;
    for (int64_t l = 0; l < L; ++l) {
      qs[l] = to_storage<pk::f16>(random_vector<float>(rng, size_t(B * Hq * w * D), -2, 2));
      ks[l] = to_storage<pk::f16>(random_vector<float>(rng, size_t(B * Hk * cap * D), -2, 2));
      ls[l] = random_vector<float>(rng, size_t(B * Hq * w), 2, 4);
      qv[l] = pk::make_kv_view_bhsd<const pk::f16>(qs[l].data(), B, Hq, w, D);
      kv[l] = pk::make_kv_view_bhsd<const pk::f16>(ks[l].data(), B, Hk, cap, D);
      lv[l] = pk::lse_view{ls[l].data(), Hq * w, w, 1};
    }
    // one shared block table: the first layer's paged copy decides it, the others reuse it
    for (int64_t l = 0; l < L; ++l) {
      auto pc = score_test::make_paged_copy<pk::f16>(rng, B, Hk, cap, D, ps, false,
                                                     [&](int64_t b, int64_t h, int64_t t, int64_t d) { return kv[l](b, h, t, d); },
                                                     pk::f16::from_float(NAN));
      if (l > 0) {  // rebuild on layer 0's table
        pc.table = pcs[0].table;
        std::fill(pc.pool.begin(), pc.pool.end(), pk::f16::from_float(NAN));
        const auto v = pc.host_view();
        for (int64_t b = 0; b < B; ++b)
          for (int64_t h = 0; h < Hk; ++h)
            for (int64_t t = 0; t < cap; ++t)
              for (int64_t d = 0; d < D; ++d) pc.pool[size_t(v.offset(b, h, t, d))] = kv[l](b, h, t, d);
      }
      pcs.push_back(std::move(pc));
    }
    for (int64_t l = 0; l < L; ++l) pv[l] = pcs[l].view(pcs[l].pool.data(), pcs[0].table.data());
    for (bool lse : {false, true}) {
      std::vector<float> a(size_t(rt.size), -3.f), b(a), c(a);
      for (int64_t l = 0; l < L; ++l)
        REQUIRE(pk::window_attention_host(qv[l], kv[l], lse ? lv[l] : pk::lse_view{}, {}, grid, l, rt.rows(), a.data()) ==
                cudaSuccess);
      REQUIRE(pk::window_attention_layers_host(qv.data(), kv.data(), lse ? lv.data() : nullptr, {}, grid, rt.rows(),
                                               b.data()) == cudaSuccess);
      REQUIRE(pk::window_attention_layers_host(qv.data(), pv.data(), lse ? lv.data() : nullptr, {}, grid, rt.rows(),
                                               c.data()) == cudaSuccess);
      CHECK(std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
      CHECK(std::memcmp(a.data(), c.data(), a.size() * 4) == 0);
    }
    {
      std::vector<float> a(size_t(rt.size), -3.f), b(a), c(a);
      for (int64_t l = 0; l < L; ++l)
        REQUIRE(pk::key_norm_host(kv[l], {}, grid, l, rt.rows(), a.data()) == cudaSuccess);
      REQUIRE(pk::key_norm_layers_host(kv.data(), {}, grid, rt.rows(), b.data()) == cudaSuccess);
      REQUIRE(pk::key_norm_layers_host(pv.data(), {}, grid, rt.rows(), c.data()) == cudaSuccess);
      CHECK(std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
      CHECK(std::memcmp(a.data(), c.data(), a.size() * 4) == 0);
    }
    {
      // P of layer l: (B, Hq, w queries, cap keys) = the K storage reinterpreted (any values >= 0 would do)
      std::vector<std::vector<float>> ps_(L);
      std::vector<pk::kv_view<const float>> pvw(L);
      for (int64_t l = 0; l < L; ++l) {
        ps_[l] = random_vector<float>(rng, size_t(B * Hq * w * cap), 0, 1);
        pvw[l] = pk::make_kv_view_bhsd<const float>(ps_[l].data(), B, Hq, w, cap);
      }
      std::vector<float> a(size_t(rt.size), -3.f), b(a);
      for (int64_t l = 0; l < L; ++l)
        REQUIRE(pk::accumulated_attention_host(pvw[l], grid, l, rt.rows(), a.data()) == cudaSuccess);
      REQUIRE(pk::accumulated_attention_layers_host(pvw.data(), grid, rt.rows(), b.data()) == cudaSuccess);
      CHECK(std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
    }
  }
}

TEST_CASE("paged K: page ids outside the pool are rejected before anything is written") {
  auto rng = make_rng(25);
  const int64_t B = 2, Hk = 2, G = 2, D = 8, w = 3, cap = 20;
  const auto kf = random_vector<float>(rng, size_t(B * Hk * cap * D));
  const auto qf = random_vector<float>(rng, size_t(B * Hk * G * w * D));
  auto k = pk::make_kv_view_bhsd<const float>(kf.data(), B, Hk, cap, D);
  auto q = pk::make_kv_view_bhsd<const float>(qf.data(), B, Hk * G, w, D);
  auto pc = score_test::make_paged_copy<float>(rng, B, Hk, cap, D, 4, true,
                                               [&](int64_t b, int64_t h, int64_t t, int64_t d) { return k(b, h, t, d); }, NAN);
  const pk::segment_grid grid{1, B, Hk};
  const auto rows = pk::make_uniform_segments(grid.count(), 10, 10);  // 10 tokens: blocks 0-2
  std::vector<float> out(size_t(grid.count() * 10), -5.f);
  pc.break_blocks_from(1, 3, -1);  // blocks past the rows: never read, fine
  CHECK(pk::key_norm_host(pc.host_view(), {}, grid, 0, rows, out.data()) == cudaSuccess);
  CHECK(pk::window_attention_host(q, pc.host_view(), {}, {}, grid, 0, rows, out.data()) == cudaSuccess);
  std::fill(out.begin(), out.end(), -5.f);
  for (int32_t bad : {int32_t(-1), int32_t(pc.num_pages), int32_t(1 << 30)}) {
    auto pb = pc;
    pb.table[size_t(1 * pb.max_blocks + 2)] = bad;  // sequence 1, block 2 (tokens 8-11): read
    CHECK(pk::key_norm_host(pb.host_view(), {}, grid, 0, rows, out.data()) == cudaErrorInvalidValue);
    CHECK(pk::last_error().why == pk::reason::out_of_range);
    CHECK(pk::window_attention_host(q, pb.host_view(), {}, {}, grid, 0, rows, out.data()) == cudaErrorInvalidValue);
    CHECK(pk::last_error().why == pk::reason::out_of_range);
    for (float x : out) REQUIRE(x == -5.f);
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
    CHECK(pk::key_norm_layers_host(std::vector<pk::kv_view<const float>>(2, k).data(), {}, grid, rows, nullptr) ==
          cudaErrorInvalidValue);
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
  // all-layers forms: per-layer views that differ in geometry, an LSE for some layers only, too many layers
  pk::segment_grid grid2{2, 2, 1};
  const auto rows2 = pk::make_uniform_segments(4, 32);
  const pk::kv_view<const float> qq[2] = {q, pk::make_kv_view_bhsd<const float>(qf.data(), 2, 8, 4, 16)};
  const pk::kv_view<const float> kk[2] = {k, pk::make_kv_view_bshd<const float>(kf.data(), 2, 32, 2, 16)};
  const pk::kv_view<const float> kk_same[2] = {k, k};
  expect_reason(pk::window_attention_layers_host(qq, kk, nullptr, opt, grid2, rows2, out.data()), pk::reason::shape_mismatch);
  expect_reason(pk::key_norm_layers_host(kk, {}, grid2, rows2, out.data()), pk::reason::shape_mismatch);
  expect_reason(pk::accumulated_attention_layers_host(kk, grid2, rows2, out.data()), pk::reason::shape_mismatch);
  std::vector<float> lse_vals(2 * 8 * 4, 1.0f);
  const pk::lse_view mixed[2] = {pk::lse_view{lse_vals.data(), 32, 4, 1}, pk::lse_view{}};
  expect_reason(pk::window_attention_layers_host(qq, kk_same, mixed, opt, grid2, rows2, out.data()), pk::reason::bad_parameter);
  expect_reason(pk::key_norm_layers_host(static_cast<const pk::kv_view<const float>*>(nullptr), {}, grid2, rows2, out.data()),
                pk::reason::null_pointer);
  const pk::segment_grid big{pk::score_max_layers + 1, 2, 1};
  std::vector<pk::kv_view<const float>> many(size_t(big.layers), k);
  expect_reason(pk::key_norm_layers_host(many.data(), {}, big, pk::make_uniform_segments(big.count(), 0), out.data()),
                pk::reason::unsupported);
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
