// Curve building (candidates gathered, ranked by a CUB sort, double-precision normalised prefix sums) for
// 32 x 4K, 32 x 32K and 80 x 128K segments, with each `curve_sort` method, against two CUB sorts alone on the
// same number of candidates, timed in the same benchmark:
//   sort_ms  = cub::DeviceSegmentedSort::StableSortPairsDescending (float keys, int32 values), as the
//              `segmented` method calls it;
//   radix_ms = cub::DeviceRadixSort::SortPairs on the 64-bit (segment, score) keys the `radix` method sorts.
//
//   bench_curve --benchmark_counters_tabular=true
//
// Arguments: segments, tokens, method (0 automatic, 1 block, 2 radix, 3 segmented).
// Counters: ratio_vs_sort = build_curves / sort_ms, ratio_vs_radix = build_curves / radix_ms.
#include "support/bench_util.cuh"

#include <prefixkv/curve/curve.cuh>
#include <prefixkv/core/launch.cuh>

#include <numeric>
#include <random>
#include <vector>

using namespace prefixkv_bench;
namespace pk = prefixkv;

namespace {

// The baseline: CUB's segmented sort alone, called as `build_curves` calls it (chunks of curve_sort_chunk segments).
#define BENCH_TRY(x) do { const cudaError_t e_ = (x); if (e_ != cudaSuccess) return e_; } while (0)
cudaError_t segmented_sort_only(void* d_temp, size_t& temp_bytes, const float* keys_in,
                                                     float* keys_out, const int32_t* vals_in, int32_t* vals_out,
                                                     int64_t capacity, const int64_t* offsets, int64_t S,
                                                     cudaStream_t stream = 0) noexcept {
  const int64_t chunk = S < pk::detail::curve_sort_chunk ? S : pk::detail::curve_sort_chunk;
  if (d_temp == nullptr)
    return cub::DeviceSegmentedSort::StableSortPairsDescending(nullptr, temp_bytes, keys_in, keys_out, vals_in,
                                                               vals_out, capacity, chunk > 0 ? chunk : 1, offsets,
                                                               offsets + 1, stream);
  for (int64_t c0 = 0; c0 < S; c0 += pk::detail::curve_sort_chunk) {
    const int64_t ns = S - c0 < pk::detail::curve_sort_chunk ? S - c0 : pk::detail::curve_sort_chunk;
    size_t bytes = temp_bytes;
    BENCH_TRY(cub::DeviceSegmentedSort::StableSortPairsDescending(d_temp, bytes, keys_in, keys_out, vals_in,
                                                                     vals_out, capacity, ns, offsets + c0,
                                                                     offsets + c0 + 1, stream));
  }
  return cudaSuccess;
}


void BM_build_curves(benchmark::State& state) {
  const int64_t S = state.range(0), n = state.range(1);
  const auto method = static_cast<pk::curve_sort>(state.range(2));
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
  PKV_BENCH_CHECK(pk::build_curves(nullptr, bytes, scores.ptr, rows, protect, total, out, set, pk::curve_options{method}, status.ptr, 0));
  device_array<char> temp(bytes);
  auto build = [&](cudaStream_t s) {
    PKV_BENCH_CHECK(pk::build_curves(temp.ptr, bytes, scores.ptr, rows, protect, total, out, set, pk::curve_options{method}, status.ptr, s));
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
  PKV_BENCH_CHECK(segmented_sort_only(nullptr, sort_bytes, keys.ptr, sorted.ptr, vals.ptr, pos.ptr, total, offsets.ptr, S));
  device_array<char> sort_temp(sort_bytes);
  const float sort_ms = median_ms([&](cudaStream_t s) {
    PKV_BENCH_CHECK(segmented_sort_only(sort_temp.ptr, sort_bytes, keys.ptr, sorted.ptr, vals.ptr, pos.ptr, total, offsets.ptr, S, s));
  });
  // Baseline 2: the radix sort alone on composite keys of the same count and bit width.
  int seg_bits = 0;
  while ((int64_t(1) << seg_bits) < S) ++seg_bits;
  std::vector<uint64_t> hk64(static_cast<size_t>(total));
  for (int64_t i = 0; i < total; ++i)
    hk64[static_cast<size_t>(i)] = (uint64_t(i / c) << 31) | uint64_t(rng() & 0x7FFFFFFFu);
  device_array<uint64_t> k64(static_cast<size_t>(total) * 2);
  PKV_BENCH_CHECK(cudaMemcpy(k64.ptr, hk64.data(), hk64.size() * 8, cudaMemcpyHostToDevice));
  size_t radix_bytes = 0;
  {
    cub::DoubleBuffer<uint64_t> kb(k64.ptr, k64.ptr + total);
    cub::DoubleBuffer<int32_t> vb(vals.ptr, pos.ptr);
    PKV_BENCH_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, radix_bytes, kb, vb, total, 0, 31 + seg_bits));
  }
  device_array<char> radix_temp(radix_bytes);
  const float radix_ms = median_ms([&](cudaStream_t s) {
    cub::DoubleBuffer<uint64_t> kb(k64.ptr, k64.ptr + total);
    cub::DoubleBuffer<int32_t> vb(vals.ptr, pos.ptr);
    PKV_BENCH_CHECK(cub::DeviceRadixSort::SortPairs(radix_temp.ptr, radix_bytes, kb, vb, total, 0, 31 + seg_bits, s));
  });
  const double mean_ms = timed_loop(state, build);
  unsigned h_status = 0;
  PKV_BENCH_CHECK(cudaMemcpy(&h_status, status.ptr, 4, cudaMemcpyDeviceToHost));
  if (h_status != 0) state.SkipWithError("device status flag set");
  state.counters["sort_ms"] = sort_ms;
  state.counters["radix_ms"] = radix_ms;
  state.counters["ratio_vs_sort"] = mean_ms / sort_ms;
  state.counters["ratio_vs_radix"] = mean_ms / radix_ms;
  state.counters["items_M"] = double(total) / 1e6;
}

}  // namespace

BENCHMARK(BM_build_curves)
    ->ArgNames({"segments", "tokens", "method"})
    ->Args({32, 4096, 0})->Args({32, 4096, 1})->Args({32, 4096, 2})->Args({32, 4096, 3})
    ->Args({32, 32768, 0})->Args({32, 32768, 2})->Args({32, 32768, 3})
    ->Args({80, 131072, 0})->Args({80, 131072, 2})->Args({80, 131072, 3})
    ->UseManualTime()->Iterations(10)->Repetitions(5)->ReportAggregatesOnly(true)->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
