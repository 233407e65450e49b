// Curve building (gather + CUB stable segmented sort + double-precision normalised prefix sums) for
// 32 x 4K, 32 x 32K and 80 x 128K segments, against CUB's segmented sort alone on the same candidates, timed in
// the same benchmark.
//
//   bench_curve --benchmark_repetitions=7 --benchmark_report_aggregates_only=true
//
// Counters: sort_ms (median of the sort alone), ratio_vs_sort (build_curves / sort alone).
#include "support/bench_util.cuh"

#include <prefixkv/curve/curve.cuh>
#include <prefixkv/core/launch.cuh>

#include <numeric>
#include <random>
#include <vector>

using namespace prefixkv_bench;
namespace pk = prefixkv;

namespace {

void BM_build_curves(benchmark::State& state) {
  const int64_t S = state.range(0), n = state.range(1);
  const pk::protect_policy protect{};
  const int64_t c = pk::candidate_count(n, protect), total = S * c;
  std::vector<float> h(static_cast<size_t>(S * n));
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  for (auto& x : h) x = u(rng);
  device_array<float> scores(h.size()), cum(static_cast<size_t>(total)), sorted(static_cast<size_t>(total)), keys(static_cast<size_t>(total));
  device_array<int32_t> pos(static_cast<size_t>(total)), vals(static_cast<size_t>(total));
  device_array<int64_t> offsets(static_cast<size_t>(S + 1)), tokens(static_cast<size_t>(S));
  device_array<unsigned> status(1);
  PKV_BENCH_CHECK(cudaMemcpy(scores.ptr, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
  PKV_BENCH_CHECK(cudaMemset(status.ptr, 0, 4));
  const auto rows = pk::make_uniform_segments(S, n);
  pk::curve_device_out out{offsets.ptr, tokens.ptr, pos.ptr, cum.ptr, sorted.ptr};
  pk::curve_set set;
  size_t bytes = 0;
  PKV_BENCH_CHECK(pk::build_curves(nullptr, bytes, scores.ptr, rows, protect, total, out, set, status.ptr));
  device_array<char> temp(bytes);
  auto build = [&](cudaStream_t s) {
    PKV_BENCH_CHECK(pk::build_curves(temp.ptr, bytes, scores.ptr, rows, protect, total, out, set, status.ptr, s));
  };
  // Baseline: the CUB sort alone on the same candidate layout (offsets from a first build).
  build(0);
  PKV_BENCH_CHECK(cudaDeviceSynchronize());
  std::vector<float> hk(static_cast<size_t>(total));
  for (auto& x : hk) x = u(rng);
  std::vector<int32_t> hv(static_cast<size_t>(total));
  for (int64_t i = 0; i < total; ++i) hv[static_cast<size_t>(i)] = int32_t(i % c);
  PKV_BENCH_CHECK(cudaMemcpy(keys.ptr, hk.data(), hk.size() * 4, cudaMemcpyHostToDevice));
  PKV_BENCH_CHECK(cudaMemcpy(vals.ptr, hv.data(), hv.size() * 4, cudaMemcpyHostToDevice));
  size_t sort_bytes = 0;
  PKV_BENCH_CHECK(pk::segmented_sort_only(nullptr, sort_bytes, keys.ptr, sorted.ptr, vals.ptr, pos.ptr, total, offsets.ptr, S));
  device_array<char> sort_temp(sort_bytes);
  const float sort_ms = median_ms([&](cudaStream_t s) {
    PKV_BENCH_CHECK(pk::segmented_sort_only(sort_temp.ptr, sort_bytes, keys.ptr, sorted.ptr, vals.ptr, pos.ptr, total, offsets.ptr, S, s));
  });
  const double mean_ms = timed_loop(state, build);
  state.counters["sort_ms"] = sort_ms;
  state.counters["ratio_vs_sort"] = mean_ms / sort_ms;
  state.counters["items_M"] = double(total) / 1e6;
}

}  // namespace

BENCHMARK(BM_build_curves)->Args({32, 4096})->Args({32, 32768})->Args({80, 131072})->UseManualTime()->Iterations(10)->Repetitions(5)->ReportAggregatesOnly(true)->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
