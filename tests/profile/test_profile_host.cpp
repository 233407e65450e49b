// Profiles: the paper's published files load, round-trip, and apply with the serving rule; the accumulator
// averages per-sample solver outputs.
#include <doctest/doctest.h>

#include <prefixkv/profile/profile.hpp>
#include <prefixkv/solve/solve.hpp>

#include "support/test_random.hpp"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace pk = prefixkv;
using namespace prefixkv_test;

#ifndef PKV_PROFILE_DATA
#error "PKV_PROFILE_DATA must name tests/profile/data"
#endif

namespace {
std::string data(const char* name) { return std::string(PKV_PROFILE_DATA) + "/" + name; }
}  // namespace

TEST_CASE("published profiles load with the right layer counts and mean ratios") {
  struct item {
    const char* file;
    size_t layers;
    double ratio;
  };
  for (item it : {item{"prefixkv_llava-v1.5-7b_0.5.json", 32, 0.5}, item{"prefixkv_llava-v1.5-13b_0.3.json", 40, 0.3},
                  item{"prefixkv_llava-v1.5-7b_0.0.json", 32, 0.0}, item{"prefixkv_llava-v1.5-7b_0.9.json", 32, 0.9}}) {
    INFO(it.file);
    std::vector<double> f;
    REQUIRE(pk::profile_load(data(it.file).c_str(), f) == cudaSuccess);
    CHECK(f.size() == it.layers);
    double mean = 0;
    for (double x : f) mean += x;
    mean /= double(f.size());
    CHECK(std::fabs(mean - it.ratio) < 0.01);  // the profile averages to its overall ratio
  }
  // the example of SOURCE.md: at r = 0.5 for 7B, layer 0 evicts 11.4%, layer 21 evicts 76.5%
  std::vector<double> f;
  REQUIRE(pk::profile_load(data("prefixkv_llava-v1.5-7b_0.5.json").c_str(), f) == cudaSuccess);
  CHECK(std::fabs(f[0] - 0.114) < 5e-4);
  CHECK(std::fabs(f[21] - 0.765) < 5e-4);
}

TEST_CASE("serving rule: round(f_l * n) evictions clipped to the candidate count") {
  std::vector<double> f;
  REQUIRE(pk::profile_load(data("prefixkv_llava-v1.5-7b_0.5.json").c_str(), f) == cudaSuccess);
  const pk::protect_policy prot{};
  for (int64_t n : {0, 1, 4, 5, 6, 10, 100, 577, 1000, 4096}) {
    std::vector<int64_t> keep(f.size(), -1);
    REQUIRE(pk::apply_profile(f.data(), int64_t(f.size()), n, prot, keep.data()) == cudaSuccess);
    const int64_t cand = pk::candidate_count(n, prot);
    for (size_t l = 0; l < f.size(); ++l) {
      // independent computation: Python's round (half to even) on the double product
      double e = std::nearbyint(f[l] * double(n));
      int64_t ev = int64_t(e);
      if (ev > cand) ev = cand;
      CHECK(keep[l] == n - ev);
      CHECK(keep[l] >= n - cand);  // protected tokens always kept
    }
  }
  // a worked value: 1000 tokens, layer 0 (0.11433945...) evicts 114, layer 21 (0.76457...) evicts 765
  std::vector<int64_t> keep(f.size());
  REQUIRE(pk::apply_profile(f.data(), int64_t(f.size()), 1000, prot, keep.data()) == cudaSuccess);
  CHECK(keep[0] == 886);
  CHECK(keep[21] == 235);
  // all-zero profile keeps everything; 0.9 profile with a 3-token prompt keeps the 3 protected ones
  std::vector<double> z;
  REQUIRE(pk::profile_load(data("prefixkv_llava-v1.5-7b_0.0.json").c_str(), z) == cudaSuccess);
  REQUIRE(pk::apply_profile(z.data(), int64_t(z.size()), 321, prot, keep.data()) == cudaSuccess);
  for (auto k : keep) CHECK(k == 321);
  std::vector<double> h;
  REQUIRE(pk::profile_load(data("prefixkv_llava-v1.5-7b_0.9.json").c_str(), h) == cudaSuccess);
  REQUIRE(pk::apply_profile(h.data(), int64_t(h.size()), 3, prot, keep.data()) == cudaSuccess);
  for (auto k : keep) CHECK(k == 3);
  // ties round half to even: 0.5 * 5 = 2.5 -> 2, 0.5 * 7 = 3.5 -> 4
  const double half = 0.5;
  int64_t k1 = 0;
  REQUIRE(pk::apply_profile(&half, 1, 5, pk::protect_policy{0, 0}, &k1) == cudaSuccess);
  CHECK(k1 == 3);
  REQUIRE(pk::apply_profile(&half, 1, 7, pk::protect_policy{0, 0}, &k1) == cudaSuccess);
  CHECK(k1 == 3);
}

TEST_CASE("profile JSON round-trips exactly; bad files are rejected") {
  auto rng = make_rng(601);
  std::vector<double> f = random_vector<double>(rng, 40, 0.0, 1.0);
  f[3] = 0.0;
  f[7] = 1.0;
  const std::string path = "test_profile_roundtrip.json";
  REQUIRE(pk::profile_save(path.c_str(), f) == cudaSuccess);
  std::vector<double> g;
  REQUIRE(pk::profile_load(path.c_str(), g) == cudaSuccess);
  CHECK(g == f);  // bit-exact
  std::remove(path.c_str());
  for (const char* bad : {"", "[", "[0.1,]", "[0.1 0.2]", "{\"a\": 1}", "[1.5]", "[-0.1]", "[nan]", "[0.1] x",
                          "[01]", "[.5]", "[1e999]", "[\"0.1\"]"}) {
    INFO(bad);
    std::vector<double> out = {42};
    CHECK(pk::profile_from_json(bad, std::strlen(bad), out) == cudaErrorInvalidValue);
    CHECK(pk::last_error().why == pk::reason::bad_file);
    CHECK(out == std::vector<double>{42});
  }
  std::vector<double> out;
  CHECK(pk::profile_from_json(" [ ] ", 5, out) == cudaSuccess);
  CHECK(out.empty());
  CHECK(pk::profile_load("does/not/exist.json", out) == cudaErrorInvalidValue);
  f[0] = 1.5;
  CHECK(pk::profile_save(path.c_str(), f) == cudaErrorInvalidValue);
}

TEST_CASE("accumulator averages per-sample solver outputs; the published format comes out") {
  auto rng = make_rng(602);
  const int64_t layers = 6;
  pk::profile_accumulator acc;
  std::vector<double> expect(layers, 0.0);
  const int samples = 5;
  for (int smp = 0; smp < samples; ++smp) {
    const int64_t n = 20 + int64_t(rng() % 200);
    std::vector<float> x = random_vector<float>(rng, size_t(layers * n), 0.0, 1.0);
    pk::curve_buffers c;
    REQUIRE(pk::build_curves_host(x.data(), pk::make_uniform_segments(layers, n), pk::protect_policy{}, c) == cudaSuccess);
    std::vector<int64_t> keep;
    REQUIRE(pk::solve_host(c.view(), pk::budget_evict_ratio(0.5), {}, keep) == cudaSuccess);
    REQUIRE(acc.add(keep.data(), c.tokens.data(), layers) == cudaSuccess);
    int64_t evicted = 0;
    for (int64_t l = 0; l < layers; ++l) {
      expect[l] += double(n - keep[l]) / double(n) / samples;
      evicted += n - keep[l];
    }
    CHECK(evicted == int64_t(std::nearbyint(0.5 * double(layers * n))));
  }
  std::vector<double> f;
  REQUIRE(acc.fractions(f) == cudaSuccess);
  REQUIRE(f.size() == size_t(layers));
  double mean = 0;
  for (int64_t l = 0; l < layers; ++l) {
    CHECK(f[l] == doctest::Approx(expect[l]).epsilon(1e-12));
    mean += f[l] / layers;
  }
  CHECK(mean == doctest::Approx(0.5).epsilon(0.02));
  // layer count mismatch, bad keep
  std::vector<int64_t> k(3, 1), t(3, 2);
  CHECK(acc.add(k.data(), t.data(), 3) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::shape_mismatch);
  pk::profile_accumulator empty;
  CHECK(empty.fractions(f) == cudaErrorInvalidValue);
  k[0] = 3;
  CHECK(empty.add(k.data(), t.data(), 3) == cudaErrorInvalidValue);
}
