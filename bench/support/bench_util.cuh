// Shared benchmark helpers: CUDA-event timing with Google Benchmark's manual time, cold-L2 runs, and the
// device-to-device copy baseline timed in the same process.
//
// Conventions for every prefixkv benchmark:
// * register with ->UseManualTime()->Repetitions(n)->ReportAggregatesOnly(true) and read the *median*;
// * time with `event_timer` around the device work only, after `flush_l2()` (cold inputs);
// * report `ratio_*` counters computed against a baseline timed in the same benchmark (same process, same
//   sizes), e.g. `time_memcpy_d2d(bytes)` for bandwidth-bound kernels.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <vector>

#include <cuda_runtime.h>

#define PKV_BENCH_CHECK(expr)                                                           \
  do {                                                                                  \
    const cudaError_t pkv_e_ = (expr);                                                  \
    if (pkv_e_ != cudaSuccess) {                                                        \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(pkv_e_)); \
      std::abort();                                                                     \
    }                                                                                   \
  } while (0)

namespace prefixkv_bench {

//! A device allocation owned by the benchmark (benchmarks may own memory; the library core never does).
template <class T>
struct device_array {
  T* ptr = nullptr;
  size_t n = 0;
  explicit device_array(size_t count = 0) : n(count) {
    if (n) PKV_BENCH_CHECK(cudaMalloc(&ptr, n * sizeof(T)));
  }
  ~device_array() {
    if (ptr) cudaFree(ptr);
  }
  device_array(const device_array&) = delete;
  device_array& operator=(const device_array&) = delete;
  size_t bytes() const { return n * sizeof(T); }
};

//! Evicts L2 by writing a buffer twice its size (so the next kernel reads cold inputs from HBM).
inline void flush_l2(cudaStream_t stream = 0) {
  static device_array<char>* buf = [] {
    int dev = 0, l2 = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev);
    return new device_array<char>(size_t(l2 > 0 ? l2 : 64 << 20) * 2);
  }();
  PKV_BENCH_CHECK(cudaMemsetAsync(buf->ptr, 0, buf->bytes(), stream));
}

//! Times device work enqueued by `fn(stream)` with CUDA events, in milliseconds.
struct event_timer {
  cudaEvent_t a{}, b{};
  event_timer() {
    PKV_BENCH_CHECK(cudaEventCreate(&a));
    PKV_BENCH_CHECK(cudaEventCreate(&b));
  }
  ~event_timer() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
  template <class F>
  float time_ms(F&& fn, cudaStream_t stream = 0, bool cold = true) {
    if (cold) flush_l2(stream);
    PKV_BENCH_CHECK(cudaEventRecord(a, stream));
    fn(stream);
    PKV_BENCH_CHECK(cudaEventRecord(b, stream));
    PKV_BENCH_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    PKV_BENCH_CHECK(cudaEventElapsedTime(&ms, a, b));
    return ms;
  }
};

//! The benchmark loop: one warm-up, then every iteration timed with CUDA events (cold L2) and handed to Google
//! Benchmark as manual time. Returns the mean of the timed iterations in milliseconds (register the benchmark
//! with Repetitions(...) to get the median over repetitions).
template <class F>
double timed_loop(benchmark::State& state, F&& fn) {
  event_timer t;
  t.time_ms(fn);  // warm-up
  double sum = 0;
  int iters = 0;
  for (auto _ : state) {
    const float ms = t.time_ms(fn);
    state.SetIterationTime(ms / 1e3);
    sum += ms;
    ++iters;
  }
  return iters ? sum / iters : 0.0;
}

//! Median of a few timings of `fn` (after one warm-up), in milliseconds.
template <class F>
float median_ms(F&& fn, int reps = 15, cudaStream_t stream = 0) {
  event_timer t;
  t.time_ms(fn, stream);  // warm-up
  std::vector<float> v(reps);
  for (auto& x : v) x = t.time_ms(fn, stream);
  std::sort(v.begin(), v.end());
  return v[reps / 2];
}

//! Median time of a cudaMemcpyAsync device-to-device copy of `bytes` (the bandwidth baseline).
inline float time_memcpy_d2d(size_t bytes, int reps = 15) {
  device_array<char> src(bytes), dst(bytes);
  PKV_BENCH_CHECK(cudaMemset(src.ptr, 1, bytes));
  return median_ms([&](cudaStream_t s) { PKV_BENCH_CHECK(cudaMemcpyAsync(dst.ptr, src.ptr, bytes, cudaMemcpyDeviceToDevice, s)); },
                   reps);
}

}  // namespace prefixkv_bench
