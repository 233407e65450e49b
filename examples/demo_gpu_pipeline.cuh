// The GPU half of the demo (included by demo.cpp when built as demo_gpu.cu): the same score -> curve -> solve ->
// select -> compact chain on the device, enqueued on one stream with no host synchronisation in between, timed
// with CUDA events, and compared with the host backend's results.
#pragma once

#include <prefixkv/prefixkv.cuh>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstdio>
#include <vector>

namespace {

#define DEMO_CUDA(expr)                                                                         \
  do {                                                                                          \
    const cudaError_t demo_e_ = (expr);                                                         \
    if (demo_e_ != cudaSuccess)                                                                 \
      die(std::string(#expr) + ": " + cudaGetErrorString(demo_e_) + " / " + prefixkv::last_error().message); \
  } while (0)

template <class T>
struct dev {
  T* p = nullptr;
  explicit dev(size_t n) { DEMO_CUDA(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T))); }
  ~dev() { cudaFree(p); }
  dev(const dev&) = delete;
  dev& operator=(const dev&) = delete;
};

// full: the uncompressed cache (input); host: the cache the host backend compacted; host_keep: its keep counts.
void run_gpu_pipeline(const std::vector<std::vector<float>>& P, int T, int Hq, int Hkv, int hs,
                      const tiny_llama::kv_cache& full, const tiny_llama::kv_cache& host,
                      const std::vector<int64_t>& host_keep, double evict_ratio, prefixkv::protect_policy protect) {
  const int L = int(P.size());
  const int cap = full.capacity;
  cudaDeviceProp prop{};
  DEMO_CUDA(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t stream;
  DEMO_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  // Inputs: attention probabilities (layer)(1, q_head, query, key) and the per-layer caches (1, kv_head, token, dim).
  const size_t p_elems = size_t(Hq) * T * T, kv_elems = size_t(Hkv) * cap * hs;
  dev<float> d_p(p_elems * L), d_k(kv_elems * L), d_v(kv_elems * L);
  for (int l = 0; l < L; ++l) DEMO_CUDA(cudaMemcpy(d_p.p + l * p_elems, P[l].data(), p_elems * 4, cudaMemcpyHostToDevice));
  auto upload_cache = [&] {
    for (int l = 0; l < L; ++l) {
      DEMO_CUDA(cudaMemcpyAsync(d_k.p + l * kv_elems, full.k[l].data(), kv_elems * 4, cudaMemcpyHostToDevice, stream));
      DEMO_CUDA(cudaMemcpyAsync(d_v.p + l * kv_elems, full.v[l].data(), kv_elems * 4, cudaMemcpyHostToDevice, stream));
    }
  };

  // Outputs and intermediates (caller-owned memory: prefixkv itself never allocates).
  const int64_t total = int64_t(L) * T;
  const prefixkv::segment_grid grid{L, 1, 1};
  const prefixkv::segments rows = prefixkv::make_uniform_segments(L, T);
  dev<float> d_scores(total), d_cum(total), d_sorted(total);
  dev<int32_t> d_pos(total), d_indices(total), d_len(L), d_solve_status(1), d_sel_status(1), d_compact_status(1);
  dev<int64_t> d_cand_off(L + 1), d_tokens(L), d_keep(L), d_sel_off(L + 1);
  dev<float> d_thr(1);
  dev<unsigned> d_status(1);
  prefixkv::curve_device_out cout{d_cand_off.p, d_tokens.p, d_pos.p, d_cum.p, d_sorted.p};
  prefixkv::curve_set curves;
  std::vector<prefixkv::kv_view<float>> kviews(L), vviews(L);
  for (int l = 0; l < L; ++l) {
    kviews[l] = prefixkv::make_kv_view_bhsd(d_k.p + l * kv_elems, 1, Hkv, T, hs, cap);
    vviews[l] = prefixkv::make_kv_view_bhsd(d_v.p + l * kv_elems, 1, Hkv, T, hs, cap);
  }
  const prefixkv::kv_layers<float> layers{kviews.data(), vviews.data(), nullptr, nullptr, L};
  prefixkv::compact_outputs outs{};
  outs.lengths = d_len.p;
  outs.status = d_compact_status.p;
  const auto budget = prefixkv::budget_evict_ratio(evict_ratio);

  // The whole chain as one function of (d_temp, temp_bytes): with d_temp == nullptr it returns the largest
  // workspace any stage needs (the stages run one after another, so they share one buffer).
  auto chain = [&](void* d_temp, size_t& temp_bytes) -> cudaError_t {
    size_t need = 0, b = 0;
    const bool query = d_temp == nullptr;
    auto stage = [&](auto&& f) -> cudaError_t {
      b = query ? 0 : temp_bytes;
      const cudaError_t e = f(d_temp, b);
      need = std::max(need, b);
      return e;
    };
    for (int l = 0; l < L; ++l) {
      auto pv = prefixkv::make_kv_view_bhsd(static_cast<const float*>(d_p.p + l * p_elems), 1, Hq, T, T);
      PREFIXKV_TRY(stage([&](void* t, size_t& n) {
        return prefixkv::accumulated_attention(t, n, pv, grid, l, rows, d_scores.p, d_status.p, stream);
      }));
    }
    PREFIXKV_TRY(stage([&](void* t, size_t& n) {
      return prefixkv::build_curves(t, n, d_scores.p, rows, protect, total, cout, curves, d_status.p, stream);
    }));
    PREFIXKV_TRY(stage([&](void* t, size_t& n) {
      return prefixkv::solve(t, n, curves, 1, nullptr, budget, prefixkv::keep_bounds{}, d_keep.p, d_thr.p,
                             d_solve_status.p, stream);
    }));
    PREFIXKV_TRY(stage([&](void* t, size_t& n) {
      return prefixkv::write_selection(t, n, curves, d_keep.p, d_sel_off.p, d_indices.p, total, d_sel_status.p, stream);
    }));
    prefixkv::selection sel{L, d_sel_off.p, d_indices.p};
    PREFIXKV_TRY(stage([&](void* t, size_t& n) {
      return prefixkv::compact_in_place(t, n, layers, sel, grid, outs, prefixkv::index_check::device, stream);
    }));
    if (query) temp_bytes = need;
    return cudaSuccess;
  };

  size_t temp_bytes = 0;
  DEMO_CUDA(chain(nullptr, temp_bytes));
  dev<unsigned char> d_temp(temp_bytes);
  cudaEvent_t a, b;
  DEMO_CUDA(cudaEventCreate(&a));
  DEMO_CUDA(cudaEventCreate(&b));
  float best_ms = 1e30f;
  for (int rep = 0; rep < 5; ++rep) {  // first run warms up (module load); report the best of the rest
    DEMO_CUDA(cudaMemsetAsync(d_status.p, 0, sizeof(unsigned), stream));
    upload_cache();
    DEMO_CUDA(cudaEventRecord(a, stream));
    DEMO_CUDA(chain(d_temp.p, temp_bytes));
    DEMO_CUDA(cudaEventRecord(b, stream));
    DEMO_CUDA(cudaStreamSynchronize(stream));
    float ms = 0;
    DEMO_CUDA(cudaEventElapsedTime(&ms, a, b));
    if (rep > 0) best_ms = std::min(best_ms, ms);
  }

  // Read back and compare with the host backend.
  unsigned status = 0;
  int32_t solve_status = 0, sel_status = 0, compact_status = 0;
  std::vector<int64_t> keep(L);
  float thr = 0;
  DEMO_CUDA(cudaMemcpy(&status, d_status.p, sizeof(status), cudaMemcpyDeviceToHost));
  DEMO_CUDA(cudaMemcpy(&solve_status, d_solve_status.p, 4, cudaMemcpyDeviceToHost));
  DEMO_CUDA(cudaMemcpy(&sel_status, d_sel_status.p, 4, cudaMemcpyDeviceToHost));
  DEMO_CUDA(cudaMemcpy(&compact_status, d_compact_status.p, 4, cudaMemcpyDeviceToHost));
  DEMO_CUDA(cudaMemcpy(keep.data(), d_keep.p, L * 8, cudaMemcpyDeviceToHost));
  DEMO_CUDA(cudaMemcpy(&thr, d_thr.p, 4, cudaMemcpyDeviceToHost));
  if (status || solve_status || sel_status || compact_status)
    die("device pipeline reported a problem (status words " + std::to_string(status) + "/" +
        std::to_string(solve_status) + "/" + std::to_string(sel_status) + "/" + std::to_string(compact_status) + ")");
  size_t rows_equal = 0, rows_total = 0;
  std::vector<float> kk(kv_elems), vv(kv_elems);
  for (int l = 0; l < L; ++l) {
    DEMO_CUDA(cudaMemcpy(kk.data(), d_k.p + l * kv_elems, kv_elems * 4, cudaMemcpyDeviceToHost));
    DEMO_CUDA(cudaMemcpy(vv.data(), d_v.p + l * kv_elems, kv_elems * 4, cudaMemcpyDeviceToHost));
    if (keep[l] != host_keep[l]) continue;  // compare rows only where both backends chose the same budget
    const int64_t n = keep[l];
    for (int h = 0; h < Hkv; ++h)
      for (int64_t t = 0; t < n; ++t) {
        const size_t off = (size_t(h) * cap + t) * hs;
        const auto& hk = host.k[l];
        const auto& hv = host.v[l];
        rows_total += 2;
        rows_equal += std::equal(kk.begin() + off, kk.begin() + off + hs, hk.begin() + off);
        rows_equal += std::equal(vv.begin() + off, vv.begin() + off + hs, hv.begin() + off);
      }
  }
  std::printf("\nGPU backend (%s): score -> curve -> solve -> select -> compact on one stream, no host sync\n",
              prop.name);
  std::printf("  keep per layer:");
  for (auto k : keep) std::printf(" %lld", (long long)k);
  int64_t max_diff = 0;
  for (int l = 0; l < L; ++l) max_diff = std::max<int64_t>(max_diff, std::llabs(keep[l] - host_keep[l]));
  if (keep == host_keep)
    std::printf("   (host backend: identical)\n");
  else  // scores are float sums in a different order on the device; a budget boundary can move by a token
    std::printf("   (host backend: differs by up to %lld tokens in a layer: float summation order of the scores)\n",
                (long long)max_diff);
  std::printf("  threshold p = %.4f; compacted K/V rows equal to the host backend: %zu of %zu\n", thr, rows_equal,
              rows_total);
  std::printf("  device time for the whole chain: %.3f ms (CUDA events, best of 4 after warm-up, workspace %zu bytes)\n",
              best_ms, temp_bytes);
  if (rows_equal != rows_total) die("GPU and host backends compacted different rows for the same budget");
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaStreamDestroy(stream);
}

}  // namespace
