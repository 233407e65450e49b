// Solve time of the exact global prefix solver on the device, against the paper's method as the baseline: a
// float bisection on the shared threshold p, each step one device count kernel followed by a device-to-host copy
// of the count (a host round-trip), stopping within 5 tokens of the target (the paper's tolerance).
//
// Shapes (segments x tokens): 32 x 4K, 80 x 32K, 80 x 128K (one problem each), and 16 problems of 32 x 4K in one
// launch. Heavy-tailed random scores; curves built once on the host. Cold L2 before every timed run.
// Counters: baseline_us (median of the bisection), ratio_vs_bisection (baseline / this run's median),
// bisection_steps (host round-trips the baseline needed). path:3 = `prefixkv::solve` (cluster path for problems
// that fit a thread-block cluster, sample-select for the others), path:1 = sample-select only (the block path,
// no clusters), path:0 = general path only (solve_policy variants, same answers, timed in the same run).
// cluster: CTAs per cluster for path 3 (0 = the library's choice from the device and the problem count).
// BM_floor: launch and barrier floors of the cluster launch on this device.
#include <prefixkv/select/select.cuh>
#include <prefixkv/solve/solve.cuh>

#include "support/bench_util.cuh"

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <random>
#include <vector>

namespace pk = prefixkv;
using namespace prefixkv_bench;

namespace {

constexpr double evict_ratio = 0.5;

struct workload {
  int64_t problems = 1, segments = 0, tokens = 0;
  pk::curve_buffers host;
  std::unique_ptr<device_array<int64_t>> offsets, toks, poff;
  std::unique_ptr<device_array<int32_t>> positions;
  std::unique_ptr<device_array<float>> cumulative;
  pk::curve_set dev;
};

template <class T>
std::unique_ptr<device_array<T>> upload(const std::vector<T>& h) {
  auto d = std::make_unique<device_array<T>>(h.size());
  if (!h.empty()) PKV_BENCH_CHECK(cudaMemcpy(d->ptr, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

workload& get(int64_t problems, int64_t segments, int64_t tokens) {
  static std::map<std::tuple<int64_t, int64_t, int64_t>, std::unique_ptr<workload>> cache;
  auto& slot = cache[{problems, segments, tokens}];
  if (slot) return *slot;
  slot = std::make_unique<workload>();
  workload& w = *slot;
  w.problems = problems;
  w.segments = segments;
  w.tokens = tokens;
  const int64_t S = problems * segments;
  std::mt19937_64 rng(12345);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<float> x(size_t(S * tokens));
  for (int64_t s = 0; s < S; ++s) {
    const double skew = 0.5 + 2.0 * u(rng);  // layers differ in how concentrated their attention is
    for (int64_t t = 0; t < tokens; ++t) x[size_t(s * tokens + t)] = float(std::pow(1.0 - u(rng), -skew) - 1.0);
  }
  if (pk::build_curves_host(x.data(), pk::make_uniform_segments(S, tokens), pk::protect_policy{}, w.host) != cudaSuccess)
    std::abort();
  w.offsets = upload(w.host.offsets);
  w.toks = upload(w.host.tokens);
  w.positions = upload(w.host.positions);
  w.cumulative = upload(w.host.cumulative);
  std::vector<int64_t> poff(problems + 1);
  for (int64_t p = 0; p <= problems; ++p) poff[p] = p * segments;
  w.poff = upload(poff);
  w.dev = w.host.view();
  w.dev.offsets = w.offsets->ptr;
  w.dev.tokens = w.toks->ptr;
  w.dev.positions = w.positions->ptr;
  w.dev.cumulative = w.cumulative->ptr;
  w.dev.sorted_scores = nullptr;
  return w;
}

// ---- baseline: the paper's host-synchronised float bisection ----------------------------------------------
// kept candidates at threshold p: per segment the shortest prefix holding >= p of the mass (ranks whose entry
// value is < p), summed over all segments of all problems.
__global__ void count_kept(pk::curve_set cv, float p, unsigned long long* total) {
  const int64_t s = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (s >= cv.count) return;
  const float* row = cv.cumulative + cv.offsets[s];
  int64_t a = 0, n = cv.offsets[s + 1] - cv.offsets[s];
  while (n > 0) {  // first rank with entry value >= p
    const int64_t h = n / 2;
    if (pk::entry_value(row, a + h) < p) {
      a += h + 1;
      n -= h + 1;
    } else {
      n = h;
    }
  }
  atomicAdd(total, static_cast<unsigned long long>(a));
}

struct bisection {
  unsigned long long* d_total = nullptr;
  unsigned long long* h_total = nullptr;
  int steps = 0;
  bisection() {
    PKV_BENCH_CHECK(cudaMalloc(&d_total, sizeof(unsigned long long)));
    PKV_BENCH_CHECK(cudaMallocHost(&h_total, sizeof(unsigned long long)));
  }
  ~bisection() {
    cudaFree(d_total);
    cudaFreeHost(h_total);
  }
  // One problem's worth per call (the paper solves one sample at a time); returns the final threshold.
  float run(const workload& w, cudaStream_t st) {
    const int64_t C = w.host.offsets.back(), N = w.problems * w.segments * w.tokens;
    const int64_t target = C - int64_t(std::nearbyint(evict_ratio * double(N)));
    float lo = 0.0f, hi = 1.0f, p = 0.5f;
    steps = 0;
    for (int it = 0; it < 40; ++it) {
      p = 0.5f * (lo + hi);
      PKV_BENCH_CHECK(cudaMemsetAsync(d_total, 0, sizeof(unsigned long long), st));
      const int64_t S = w.dev.count;
      count_kept<<<unsigned((S + 127) / 128), 128, 0, st>>>(w.dev, p, d_total);
      PKV_BENCH_CHECK(cudaMemcpyAsync(h_total, d_total, sizeof(unsigned long long), cudaMemcpyDeviceToHost, st));
      PKV_BENCH_CHECK(cudaStreamSynchronize(st));
      ++steps;
      const int64_t kept = int64_t(*h_total);
      if (std::llabs(kept - target) <= 5) break;
      if (kept < target)
        lo = p;
      else
        hi = p;
    }
    return p;
  }
};

// The timed loop of every benchmark here: one warm-up, then each iteration timed with CUDA events (cold L2) and
// handed to Google Benchmark; returns the iteration times (ms) sorted, so that the median is the middle one.
template <class F>
std::vector<float> timed_runs(benchmark::State& state, F&& fn, cudaStream_t st) {
  event_timer timer;
  timer.time_ms(fn, st);  // warm-up
  std::vector<float> ms;
  for (auto _ : state) {
    const float t = timer.time_ms(fn, st);
    ms.push_back(t);
    state.SetIterationTime(t * 1e-3);
  }
  std::sort(ms.begin(), ms.end());
  return ms;
}
float median_of(const std::vector<float>& sorted) { return sorted.empty() ? 0.f : sorted[sorted.size() / 2]; }

void set_counters(benchmark::State& state, const std::vector<float>& ms, float baseline_ms, int steps) {
  const float med = median_of(ms);  // (sorted by timed_runs)
  state.counters["baseline_us"] = baseline_ms * 1e3;
  state.counters["median_us"] = med * 1e3;
  state.counters["ratio_vs_bisection"] = med > 0 ? baseline_ms / med : 0.0;
  state.counters["bisection_steps"] = steps;
}

// path (3 default, 1 sample-select only, 0 general only) and cluster size (path 3) -> the entry point timed.
using solve_fn = cudaError_t (*)(void*, size_t&, const pk::curve_set&, int64_t, const int64_t*,
                                 const pk::solve_budget&, const pk::keep_bounds&, int64_t*, float*, int32_t*,
                                 cudaStream_t);
solve_fn pick(int path, int cluster) {
  if (path == 1) return &pk::detail::solve_dispatch<pk::solve_policy<false, true>>;
  if (path == 0) return &pk::detail::solve_dispatch<pk::solve_policy<false, false>>;
  switch (cluster) {
    case 4: return &pk::detail::solve_dispatch<pk::solve_policy<true, true, 4>>;
    case 8: return &pk::detail::solve_dispatch<pk::solve_policy<true, true, 8>>;
    case 16: return &pk::detail::solve_dispatch<pk::solve_policy<true, true, 16>>;
    default: return &pk::solve;
  }
}

void BM_solve_device(benchmark::State& state) {
  workload& w = get(state.range(0), state.range(1), state.range(2));
  cudaStream_t st;
  PKV_BENCH_CHECK(cudaStreamCreate(&st));
  device_array<int64_t> keep(size_t(w.dev.count));
  device_array<float> thr(size_t(w.problems));
  device_array<int32_t> status(size_t(w.problems));
  size_t bytes = 0;
  const auto budget = pk::budget_evict_ratio(evict_ratio);
  const solve_fn fn = pick(int(state.range(3)), int(state.range(4)));
  PKV_BENCH_CHECK(fn(nullptr, bytes, w.dev, w.problems, w.poff->ptr, budget, {}, keep.ptr, thr.ptr, status.ptr, st));
  device_array<char> temp(bytes);
  auto solve = [&](cudaStream_t s) {
    PKV_BENCH_CHECK(fn(temp.ptr, bytes, w.dev, w.problems, w.poff->ptr, budget, {}, keep.ptr, thr.ptr, status.ptr, s));
  };
  // baseline in the same run: the paper's bisection, one problem at a time
  bisection bis;
  workload& one = get(1, w.segments, w.tokens);
  const float base_one = median_ms([&](cudaStream_t s) { bis.run(one, s); }, 9, st);
  const float baseline = base_one * float(w.problems);
  const std::vector<float> ms = timed_runs(state, solve, st);
  // sanity: the device answer meets the budget exactly
  std::vector<int64_t> k(size_t(w.dev.count));
  PKV_BENCH_CHECK(cudaMemcpy(k.data(), keep.ptr, k.size() * sizeof(int64_t), cudaMemcpyDeviceToHost));
  int64_t total = 0;
  for (int64_t x : k) total += x;
  const int64_t N = w.dev.count * w.tokens;
  if (total != N - int64_t(std::nearbyint(evict_ratio * double(w.segments * w.tokens))) * w.problems)
    state.SkipWithError("device solve missed the budget");
  set_counters(state, ms, baseline, bis.steps);
  cudaStreamDestroy(st);
}

void BM_select_device(benchmark::State& state) {
  workload& w = get(state.range(0), state.range(1), state.range(2));
  cudaStream_t st;
  PKV_BENCH_CHECK(cudaStreamCreate(&st));
  std::vector<int64_t> keep;
  if (pk::solve_host(w.host.view(), pk::budget_evict_ratio(evict_ratio), {}, keep) != cudaSuccess) std::abort();
  auto dkeep = upload(keep);
  const int64_t cap = w.dev.count * w.tokens;
  device_array<int64_t> offsets(size_t(w.dev.count + 1));
  device_array<int32_t> indices{size_t(cap)};
  device_array<int32_t> status(1);
  size_t bytes = 0;
  PKV_BENCH_CHECK(pk::write_selection(nullptr, bytes, w.dev, dkeep->ptr, offsets.ptr, indices.ptr, cap, status.ptr, st));
  device_array<char> temp(bytes);
  auto run = [&](cudaStream_t s) {
    PKV_BENCH_CHECK(pk::write_selection(temp.ptr, bytes, w.dev, dkeep->ptr, offsets.ptr, indices.ptr, cap, status.ptr, s));
  };
  // bandwidth reference: copying the kept positions' worth of int32 (read positions + write indices)
  const float copy = time_memcpy_d2d(size_t(cap) * sizeof(int32_t));
  const float med = median_of(timed_runs(state, run, st));
  state.counters["median_us"] = med * 1e3;
  state.counters["memcpy_us"] = copy * 1e3;
  state.counters["ratio_vs_memcpy"] = med > 0 ? med / copy : 0.0;
  cudaStreamDestroy(st);
}

// Floors of the cluster path on this device, same launch shape as the solve (one cluster of `csize` CTAs x
// solve_threads, the solve's dynamic shared memory): mode 0 = an empty kernel (launch + cold start), 1 = `n`
// cluster barriers, 2 = `n` block barriers, 3 = `n` rounds of 16-byte remote stores of 1 KB per destination CTA
// followed by a cluster barrier (what one radix pass exchanges, with a plain barrier). Per-operation cost =
// (time(n) - time(0)) / n.
template <int Mode>
__global__ void __launch_bounds__(pk::detail::solve_threads, 1) floor_kernel(int n, unsigned* sink) {
  extern __shared__ __align__(16) unsigned char floor_smem[];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const auto cluster = cooperative_groups::this_cluster();
  uint4* g = reinterpret_cast<uint4*>(floor_smem);
  const int csize = int(cluster.num_blocks()), rank = int(cluster.block_rank());
  if (Mode == 3) cluster.sync();
  for (int i = 0; i < n; ++i) {
    if (Mode == 1) cluster.sync();
    if (Mode == 2) __syncthreads();
    if (Mode == 3) {
      const int q = threadIdx.x & 63;  // 64 x 16 B = 1 KB per destination, as the radix passes push
      for (int r = threadIdx.x >> 6; r < csize; r += pk::detail::solve_threads / 64)
        *cluster.map_shared_rank(g + rank * 64 + q, r) = make_uint4(i, q, r, 0);
      cluster.sync();
    }
  }
  if (threadIdx.x == 0 && n < 0) sink[blockIdx.x] = g[0].x;
#else
  if (threadIdx.x == 0 && n < 0) sink[blockIdx.x] = floor_smem[0];
#endif
}

void BM_floor(benchmark::State& state) {
  const int mode = int(state.range(0)), n = int(state.range(1)), csize = int(state.range(2));
  auto fn = mode == 0 ? floor_kernel<0> : mode == 1 ? floor_kernel<1> : mode == 2 ? floor_kernel<2> : floor_kernel<3>;
  const size_t smem = size_t(pk::detail::solve_key_cap()) * sizeof(uint32_t);
  PKV_BENCH_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  PKV_BENCH_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  device_array<unsigned> sink(64);
  cudaStream_t st;
  PKV_BENCH_CHECK(cudaStreamCreate(&st));
  auto run = [&](cudaStream_t s) {
    cudaLaunchAttribute attr[1];
    const cudaLaunchConfig_t cfg = pk::detail::solve_launch_config(attr, csize, csize, smem, s);
    PKV_BENCH_CHECK(cudaLaunchKernelEx(&cfg, fn, n, sink.ptr));
  };
  state.counters["median_us"] = median_of(timed_runs(state, run, st)) * 1e3;
  cudaStreamDestroy(st);
}

}  // namespace

BENCHMARK(BM_floor)
    ->ArgsProduct({{0, 1, 2, 3}, {0, 16}, {8, 16}})
    ->ArgNames({"mode", "n", "csize"})
    ->UseManualTime()
    ->Iterations(50)
    ->Repetitions(3)
    ->ReportAggregatesOnly(true);

BENCHMARK(BM_solve_device)
    ->Args({1, 32, 4096, 3, 0})
    ->Args({1, 32, 4096, 3, 8})
    ->Args({1, 32, 4096, 3, 16})
    ->Args({1, 32, 4096, 3, 4})
    ->Args({1, 80, 32768, 3, 0})
    ->Args({1, 80, 131072, 3, 0})
    ->Args({16, 32, 4096, 3, 0})
    ->Args({1, 32, 4096, 1, 0})
    ->Args({1, 80, 32768, 1, 0})
    ->Args({1, 80, 131072, 1, 0})
    ->Args({16, 32, 4096, 1, 0})
    ->Args({1, 32, 4096, 0, 0})
    ->ArgNames({"problems", "segments", "tokens", "path", "cluster"})
    ->UseManualTime()
    ->Iterations(50)
    ->Repetitions(5)
    ->ReportAggregatesOnly(true)
    ->Unit(benchmark::kMicrosecond);

BENCHMARK(BM_select_device)
    ->Args({1, 32, 4096})
    ->Args({1, 80, 32768})
    ->ArgNames({"problems", "segments", "tokens"})
    ->UseManualTime()
    ->Iterations(30)
    ->Repetitions(3)
    ->ReportAggregatesOnly(true)
    ->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();
