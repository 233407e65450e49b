// Runs the device snippets of docs/api.md (extracted at build time): the device pipeline against the host one.
#include <doctest/doctest.h>

#include <prefixkv/prefixkv.cuh>

#include "doc_snippets.hpp"
#include "support/gpu_harness.cuh"
#include "support/test_random.hpp"

#include <algorithm>
#include <cmath>

namespace api_snippets {
cudaError_t compress_device(const std::vector<prefixkv::kv_view<const float>>& probs,
                            const std::vector<prefixkv::kv_view<float>>& k,
                            const std::vector<prefixkv::kv_view<float>>& v, double evict_ratio, int32_t* d_lengths,
                            int32_t* d_status, cudaStream_t stream);
}  // namespace api_snippets

using namespace prefixkv_test;
namespace pk = prefixkv;

TEST_CASE("docs: compress_device() == compress_host() where both backends chose the same budget") {
  auto rng = make_rng(1903);
  doc_case c(rng);
  const int64_t L = c.L;
  // host
  auto hk = c.k, hv = c.v;
  std::vector<pk::kv_view<const float>> hp;
  std::vector<pk::kv_view<float>> hkv, hvv;
  for (int64_t l = 0; l < L; ++l) {
    hp.push_back(pk::make_kv_view_bhsd(static_cast<const float*>(c.p[size_t(l)].data()), 1, c.Hq, c.T, c.T));
    hkv.push_back(pk::make_kv_view_bhsd(hk[size_t(l)].data(), 1, c.Hkv, c.T, c.D));
    hvv.push_back(pk::make_kv_view_bhsd(hv[size_t(l)].data(), 1, c.Hkv, c.T, c.D));
  }
  std::vector<int32_t> host_len;
  REQUIRE(api_snippets::compress_host(hp, hkv, hvv, 0.5, host_len) == cudaSuccess);
  // device
  std::vector<device_buffer<float>> dp, dk, dv;
  std::vector<pk::kv_view<const float>> probs;
  std::vector<pk::kv_view<float>> kv, vv;
  for (int64_t l = 0; l < L; ++l) {
    dp.emplace_back(c.p[size_t(l)]);
    dk.emplace_back(c.k[size_t(l)]);
    dv.emplace_back(c.v[size_t(l)]);
  }
  for (int64_t l = 0; l < L; ++l) {
    probs.push_back(pk::make_kv_view_bhsd(static_cast<const float*>(dp[size_t(l)].get()), 1, c.Hq, c.T, c.T));
    kv.push_back(pk::make_kv_view_bhsd(dk[size_t(l)].get(), 1, c.Hkv, c.T, c.D));
    vv.push_back(pk::make_kv_view_bhsd(dv[size_t(l)].get(), 1, c.Hkv, c.T, c.D));
  }
  device_buffer<int32_t> lengths(static_cast<size_t>(L)), status(4);
  lengths.poison();
  status.poison();
  REQUIRE(api_snippets::compress_device(probs, kv, vv, 0.5, lengths.get(), status.get(), nullptr) == cudaSuccess);
  PKV_CUDA_CHECK(cudaDeviceSynchronize());
  CHECK(status.download() == std::vector<int32_t>(4, 0));
  const auto len = lengths.download();
  int64_t kept = 0;
  for (auto n : len) kept += n;
  CHECK(kept == L * c.T - int64_t(std::nearbyint(0.5 * double(L * c.T))));
  int64_t compared = 0;
  for (int64_t l = 0; l < L; ++l) {
    if (len[size_t(l)] != host_len[size_t(l)]) continue;  // curves agree within 1 ulp: a budget may move by a token
    const auto gk = dk[size_t(l)].download(), gv = dv[size_t(l)].download();
    for (int64_t h = 0; h < c.Hkv; ++h) {
      const size_t a = size_t(h * c.T * c.D), b = a + size_t(len[size_t(l)] * c.D);
      CHECK(std::equal(gk.begin() + a, gk.begin() + b, hk[size_t(l)].begin() + a));
      CHECK(std::equal(gv.begin() + a, gv.begin() + b, hv[size_t(l)].begin() + a));
    }
    ++compared;
  }
  CHECK(compared > 0);
}
