// Runs the host snippets of docs/api.md (extracted at build time) and checks what they return.
#include <doctest/doctest.h>

#include "doc_snippets.hpp"
#include "support/test_random.hpp"

#include <algorithm>
#include <cmath>
#include <random>

using namespace prefixkv_test;
namespace pk = prefixkv;

TEST_CASE("docs: explain() reports why a view is rejected") {
  std::vector<float> keys(2 * 4 * 8 * 16);
  auto k = pk::make_kv_view_bhsd(keys.data(), 2, 4, 8, 16);
  CHECK(api_snippets::explain(k));
  k.stride_token = 1;  // rows overlap
  CHECK_FALSE(api_snippets::explain(k));
  CHECK(pk::last_error().why == pk::reason::overlapping_strides);
  std::vector<pk::bf16> a(16), b(16), c(16);
  std::vector<int32_t> table(1024);
  api_snippets::three_layouts(a.data(), b.data(), c.data(), table.data());  // views only: nothing is read
}

TEST_CASE("docs: ragged_rows() numbers 32 layers x 3 sequences") {
  std::vector<int64_t> offsets;
  const pk::segments rows = api_snippets::ragged_rows(offsets);
  REQUIRE(rows.count == 96);
  CHECK(pk::validate_host_contents(rows) == cudaSuccess);
  CHECK(rows.end(95) == 32 * (100 + 4096 + 17));
  CHECK(rows.length(pk::segment_grid{32, 3, 1}.id(7, 1)) == 4096);
}

TEST_CASE("docs: solve_batch_host() meets every sequence's budget with the lower bound") {
  auto rng = make_rng(1901);
  const int64_t P = 3, L = 4;
  const pk::segment_grid grid{L, P, 1, true};
  std::vector<int64_t> offsets(size_t(grid.count() + 1), 0);
  for (int64_t s = 0; s < grid.count(); ++s) offsets[size_t(s + 1)] = offsets[size_t(s)] + 40 + int64_t(rng() % 60);
  std::vector<float> scores(size_t(offsets.back()));
  std::exponential_distribution<float> ex(1.0f);
  for (auto& x : scores) x = ex(rng);
  pk::curve_buffers curves;
  REQUIRE(pk::build_curves_host(scores.data(), pk::make_offset_segments(grid.count(), offsets.data()), {}, curves) ==
          cudaSuccess);
  std::vector<int64_t> keep;
  std::vector<float> thr;
  REQUIRE(api_snippets::solve_batch_host(curves.view(), P, L, keep, thr) == cudaSuccess);
  for (int64_t p = 0; p < P; ++p) {
    int64_t tokens = 0, kept = 0;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t s = grid.id(l, p), n = curves.tokens[size_t(s)];
      tokens += n;
      kept += keep[size_t(s)];
      const int64_t cand = pk::candidate_count(n, curves.protect);
      CHECK(keep[size_t(s)] - (n - cand) >= std::min<int64_t>(16, cand));
    }
    CHECK(kept == tokens - int64_t(std::nearbyint(0.5 * double(tokens))));
    CHECK(thr[size_t(p)] > 0.0f);
  }
}

TEST_CASE("docs: compress_host() keeps the budget, the protected rows and the row order") {
  auto rng = make_rng(1902);
  doc_case c(rng);
  const auto k0 = c.k, v0 = c.v;
  std::vector<pk::kv_view<const float>> probs;
  std::vector<pk::kv_view<float>> kv, vv;
  for (int64_t l = 0; l < c.L; ++l) {
    probs.push_back(pk::make_kv_view_bhsd(static_cast<const float*>(c.p[size_t(l)].data()), 1, c.Hq, c.T, c.T));
    kv.push_back(pk::make_kv_view_bhsd(c.k[size_t(l)].data(), 1, c.Hkv, c.T, c.D));
    vv.push_back(pk::make_kv_view_bhsd(c.v[size_t(l)].data(), 1, c.Hkv, c.T, c.D));
  }
  std::vector<int32_t> lengths;
  REQUIRE(api_snippets::compress_host(probs, kv, vv, 0.5, lengths) == cudaSuccess);
  int64_t kept = 0;
  for (int64_t l = 0; l < c.L; ++l) {
    const int64_t n = lengths[size_t(l)];
    kept += n;
    REQUIRE(n >= 5);  // 4 sinks + 1 recent
    for (int64_t h = 0; h < c.Hkv; ++h) {
      auto row = [&](const std::vector<float>& x, int64_t t) { return x.data() + (h * c.T + t) * c.D; };
      // every kept row is an original row, in ascending order: sinks first, the last token last
      int64_t prev = -1;
      for (int64_t j = 0; j < n; ++j) {
        int64_t src = -1;
        for (int64_t t = prev + 1; t < c.T && src < 0; ++t)
          if (std::equal(row(c.k[size_t(l)], j), row(c.k[size_t(l)], j) + c.D, row(k0[size_t(l)], t)) &&
              std::equal(row(c.v[size_t(l)], j), row(c.v[size_t(l)], j) + c.D, row(v0[size_t(l)], t)))
            src = t;
        REQUIRE(src >= 0);
        if (j < 4) CHECK(src == j);
        if (j == n - 1) CHECK(src == c.T - 1);
        prev = src;
      }
    }
  }
  CHECK(kept == c.L * c.T - int64_t(std::nearbyint(0.5 * double(c.L * c.T))));
}

TEST_CASE("docs: calibrate_and_apply() averages the samples and applies the fractions") {
  std::string json;
  std::vector<int64_t> keep;
  REQUIRE(api_snippets::calibrate_and_apply({{60, 80}, {40, 80}}, {100, 100}, 1000, json, keep) == cudaSuccess);
  std::vector<double> f;
  REQUIRE(pk::profile_from_json(json.data(), json.size(), f) == cudaSuccess);
  REQUIRE(f.size() == 2);
  CHECK(f[0] == doctest::Approx(0.5));
  CHECK(f[1] == doctest::Approx(0.2));
  CHECK(keep == std::vector<int64_t>{500, 800});
}

TEST_CASE("docs: place_generated_token() keeps the original positions and appends after the kept rows") {
  const int32_t table[4] = {7, 3, 9, 2};
  const auto p = api_snippets::place_generated_token(/*prompt*/ 100, /*generated*/ 2, /*kept*/ 37, table, 16);
  CHECK(p.position == 102);
  CHECK(p.row == 39);
  CHECK(p.slot == 9 * 16 + 7);  // row 39: block 2 -> page 9, offset 7
  CHECK(api_snippets::place_generated_token(100, 0, 37, nullptr, 16).slot == -1);
}

TEST_CASE("docs: llama.cpp-style K and transposed V views address the runtime's layout") {
  const int64_t n_ctx = 32, H = 2, D = 4, n = 20;
  std::vector<pk::f16> k(size_t(n_ctx * H * D)), v(size_t(n_ctx * H * D));
  const auto kv = api_snippets::k_view(k.data(), n_ctx, H, D, n);
  const auto vv = api_snippets::v_view_transposed(v.data(), n_ctx, H, D, n);
  CHECK(pk::validate(kv) == cudaSuccess);
  CHECK(pk::validate(vv) == cudaSuccess);
  CHECK(kv.offset(0, 1, 5, 3) == (5 * H + 1) * D + 3);       // [n_ctx][n_head_kv][head_dim]
  CHECK(vv.offset(0, 1, 5, 3) == (1 * D + 3) * n_ctx + 5);   // [n_head_kv][head_dim][n_ctx]
}
