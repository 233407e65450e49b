// Scorers at the Llama-3-8B shape (32 q heads, 8 kv heads, head_dim 128, window 64, bf16, batch 1), 4K / 32K / 128K
// cached tokens, against baselines timed in the same benchmark (cold L2, CUDA events):
//
//   bench_score --benchmark_repetitions=10 --benchmark_report_aggregates_only=true
//
// * BM_window_*: one layer per call; floor_ms = a vectorised kernel reading K once, ratio_vs_floor = time / floor.
//   `_mma_sync`: the portable accumulate kernel (the default of builds without PREFIXKV_SM90A) through a policy.
//   `_paged`: K in a paged cache (NHD pages of 16 tokens, shuffled block table), ratio_vs_strided = time / the
//   same call on strided K of the same size.
//   `_32_layers`: window_attention_layers over 32 layers, ratio_vs_per_layer = time / 32 single-layer calls.
// * BM_key_norm / BM_key_norm_paged: memcpy_ms = cudaMemcpyAsync device-to-device of the same K bytes,
//   copy_bw_fraction = (bytes the scorer reads + writes) / time divided by (2 x K bytes) / memcpy time, i.e. its
//   bandwidth as a fraction of the copy's; ratio_vs_floor as above.
// * BM_attention_layers*: the paper's accumulated-attention scorer at the LLaVA-1.5-7B shape (32 layers, 32 q heads,
//   32 kv heads, f16 probabilities P (batch, 32, S, S) per layer), all layers in one accumulated_attention_layers
//   call; the argument is S. `BM_attention_layers`: batch 1, layer rows (mean over the 32 heads);
//   `_heads`: one row per kv head; `_batch`: batch 4, ragged rows of S, 0.9 S, 0.75 S + 3 and S / 2 + 1 keys
//   (device-side lengths; keys past a row are not read). P_GiB = the bytes of P the call reads; memcpy_ms =
//   cudaMemcpyAsync device-to-device of as many bytes (timed on at most 4 GiB and scaled); copy_bw_fraction as
//   above; floor_ms = the vectorised read-once kernel over the same P (full rows only). Layers beyond 24 GiB of P
//   reuse earlier layers' buffers (each layer's P is then far larger than the L2).
#include "support/bench_util.cuh"

#include <prefixkv/core/launch.cuh>
#include <prefixkv/score/score.cuh>

#include <algorithm>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

using namespace prefixkv_bench;
namespace pk = prefixkv;

namespace {

__global__ void read_once_kernel(const uint4* p, size_t n, unsigned* sink) {
  unsigned acc = 0;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint4 v = p[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) *sink = acc;  // practically never: keeps the loads alive
}

__global__ void fill_bf16(uint16_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2654435761u ^ seed;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    const float f = (float(x & 0xFFFF) / 65535.0f - 0.5f) * 4.0f;
    p[i] = pk::float_to_bf16_bits(f);
  }
}

// The accumulate kernel of builds without PREFIXKV_SM90A, in any build.
struct policy_mma_sync : pk::detail::window_policy {
  static constexpr bool wgmma = false;
};

struct llama_layer {
  static constexpr int64_t Hq = 32, Hk = 8, D = 128, w = 64, page = 16;
  int64_t tokens;
  device_array<pk::bf16> q, k;
  device_array<float> scores, lse;
  device_array<unsigned> status, sink;
  explicit llama_layer(int64_t t, bool with_k = true)
      : tokens(t), q(static_cast<size_t>(Hq * w * D)), k(with_k ? static_cast<size_t>(Hk * t * D) : 0),
        scores(static_cast<size_t>(t)), lse(static_cast<size_t>(Hq * w)), status(1), sink(1) {
    fill_bf16<<<1024, 256>>>(reinterpret_cast<uint16_t*>(q.ptr), q.n, 1u);
    if (with_k) fill_bf16<<<4096, 256>>>(reinterpret_cast<uint16_t*>(k.ptr), k.n, 2u);
    // A realistic LSE: the scorer's own first pass is not exposed, so use a value that keeps the probabilities
    // finite (the time does not depend on the values).
    std::vector<float> h(static_cast<size_t>(Hq * w), 8.0f);
    PKV_BENCH_CHECK(cudaMemcpy(lse.ptr, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    PKV_BENCH_CHECK(cudaMemset(status.ptr, 0, 4));
    PKV_BENCH_CHECK(cudaDeviceSynchronize());
  }
  pk::kv_view<const pk::bf16> qv() const { return pk::make_kv_view_bhsd<const pk::bf16>(q.ptr, 1, Hq, w, D); }
  pk::kv_view<const pk::bf16> kv() const { return pk::make_kv_view_bhsd<const pk::bf16>(k.ptr, 1, Hk, tokens, D); }
  pk::lse_view lv() const { return pk::lse_view{lse.ptr, Hq * w, w, 1}; }
  float floor_ms(const void* data, size_t bytes) {
    return median_ms([&](cudaStream_t s) { read_once_kernel<<<132 * 8, 512, 0, s>>>(static_cast<const uint4*>(data), bytes / 16, sink.ptr); }, 21);
  }
};

// The same K as a paged cache: NHD pages of 16 tokens, the sequence's blocks on a shuffled block table.
struct paged_k {
  device_array<pk::bf16> pool;
  device_array<int32_t> table;
  int64_t pages;
  explicit paged_k(int64_t tokens)
      : pool(static_cast<size_t>(tokens * llama_layer::Hk * llama_layer::D)),
        table(static_cast<size_t>(tokens / llama_layer::page)), pages(tokens / llama_layer::page) {
    fill_bf16<<<4096, 256>>>(reinterpret_cast<uint16_t*>(pool.ptr), pool.n, 2u);
    std::vector<int32_t> h(static_cast<size_t>(pages));
    std::iota(h.begin(), h.end(), 0);
    std::shuffle(h.begin(), h.end(), std::mt19937(7));
    PKV_BENCH_CHECK(cudaMemcpy(table.ptr, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    PKV_BENCH_CHECK(cudaDeviceSynchronize());
  }
  pk::paged_kv_view<const pk::bf16> view() const {
    return pk::make_paged_kv_view<const pk::bf16>(pool.ptr, pk::page_layout::nhd, pages, llama_layer::page,
                                                  llama_layer::Hk, llama_layer::D, table.ptr, 1, pages);
  }
};

template <class Policy, class KV>
cudaError_t window_call(void* t, size_t& bytes, const llama_layer& L, const KV& k, pk::lse_view lse, float* scores,
                        cudaStream_t s) {
  const pk::segment_grid grid{1, 1, 1};
  const auto rows = pk::make_uniform_segments(1, L.tokens);
  const auto q = L.qv();
  return pk::detail::window_attention_run<Policy>(t, bytes, &q, &k, &lse, pk::window_options{}, grid, 0, 1, rows, scores,
                                                  L.status.ptr, s);
}

// Times fn(stream) (workspace from a size query first) and returns the mean ms.
template <class Call>
double time_call(benchmark::State& state, Call&& call) {
  size_t bytes = 0;
  PKV_BENCH_CHECK(call(nullptr, bytes, cudaStream_t(0)));
  device_array<char> temp(bytes);
  return timed_loop(state, [&](cudaStream_t s) { PKV_BENCH_CHECK(call(temp.ptr, bytes, s)); });
}
template <class Call>
float median_call(Call&& call, int reps = 11) {
  size_t bytes = 0;
  PKV_BENCH_CHECK(call(nullptr, bytes, cudaStream_t(0)));
  device_array<char> temp(bytes);
  return median_ms([&](cudaStream_t s) { PKV_BENCH_CHECK(call(temp.ptr, bytes, s)); }, reps);
}

template <class Policy>
void run_window(benchmark::State& state, bool with_lse) {
  llama_layer L(state.range(0));
  const pk::lse_view lse = with_lse ? L.lv() : pk::lse_view{};
  const auto k = L.kv();
  const double mean_ms = time_call(state, [&](void* t, size_t& b, cudaStream_t s) {
    return window_call<Policy>(t, b, L, k, lse, L.scores.ptr, s);
  });
  const float floor = L.floor_ms(L.k.ptr, L.k.bytes());
  state.counters["floor_ms"] = floor;
  state.counters["ms"] = mean_ms;
  state.counters["ratio_vs_floor"] = mean_ms / floor;
  state.counters["K_MiB"] = double(L.k.bytes()) / (1 << 20);
  pk::detail::window_mma_plan pl;
  PKV_BENCH_CHECK((pk::detail::plan_window_accumulate<Policy, pk::bf16, false>(pk::detail::make_window_shape(&k, &k, 1), pl)));
  state.counters["wgmma"] = pl.NJ == 0 ? 1 : 0;
  state.counters["stages"] = pl.stages;
}

void BM_window_caller_lse(benchmark::State& state) { run_window<pk::detail::window_policy>(state, true); }
void BM_window_two_pass(benchmark::State& state) { run_window<pk::detail::window_policy>(state, false); }
void BM_window_caller_lse_mma_sync(benchmark::State& state) { run_window<policy_mma_sync>(state, true); }

void BM_window_caller_lse_paged(benchmark::State& state) {
  llama_layer L(state.range(0));
  paged_k P(state.range(0));
  const auto kp = P.view();
  const auto ks = L.kv();
  const double mean_ms = time_call(state, [&](void* t, size_t& b, cudaStream_t s) {
    return window_call<pk::detail::window_policy>(t, b, L, kp, L.lv(), L.scores.ptr, s);
  });
  const float strided = median_call([&](void* t, size_t& b, cudaStream_t s) {
    return window_call<pk::detail::window_policy>(t, b, L, ks, L.lv(), L.scores.ptr, s);
  });
  state.counters["ms"] = mean_ms;
  state.counters["strided_ms"] = strided;
  state.counters["ratio_vs_strided"] = mean_ms / strided;
}

// All 32 layers of the model in one call vs 32 single-layer calls (caller LSE), K of every layer resident.
void BM_window_caller_lse_32_layers(benchmark::State& state) {
  constexpr int64_t layers = 32;
  const int64_t tokens = state.range(0);
  llama_layer L(tokens, false);
  device_array<pk::bf16> k(static_cast<size_t>(layers * llama_layer::Hk * tokens * llama_layer::D));
  fill_bf16<<<4096, 256>>>(reinterpret_cast<uint16_t*>(k.ptr), k.n, 3u);
  device_array<float> scores(static_cast<size_t>(layers * tokens));
  PKV_BENCH_CHECK(cudaDeviceSynchronize());
  std::vector<pk::kv_view<const pk::bf16>> qv(layers, L.qv()), kv(layers);
  std::vector<pk::lse_view> lv(layers, L.lv());
  for (int64_t l = 0; l < layers; ++l)
    kv[size_t(l)] = pk::make_kv_view_bhsd<const pk::bf16>(k.ptr + l * llama_layer::Hk * tokens * llama_layer::D, 1,
                                                          llama_layer::Hk, tokens, llama_layer::D);
  const pk::segment_grid grid{layers, 1, 1};
  const auto rows = pk::make_uniform_segments(layers, tokens);
  const double mean_ms = time_call(state, [&](void* t, size_t& b, cudaStream_t s) {
    return pk::window_attention_layers(t, b, qv.data(), kv.data(), lv.data(), {}, grid, rows, scores.ptr, L.status.ptr, s);
  });
  const float per_layer = median_call([&](void* t, size_t& b, cudaStream_t s) {
    for (int64_t l = 0; l < layers; ++l)
      PREFIXKV_TRY(pk::window_attention(t, b, qv[size_t(l)], kv[size_t(l)], lv[size_t(l)], {}, grid, l, rows, scores.ptr,
                                        L.status.ptr, s));
    return cudaSuccess;
  }, 5);
  state.counters["ms"] = mean_ms;
  state.counters["per_layer_calls_ms"] = per_layer;
  state.counters["ratio_vs_per_layer"] = mean_ms / per_layer;
}

void report_key_norm(benchmark::State& state, double mean_ms, const llama_layer& L, size_t k_bytes) {
  const float copy = time_memcpy_d2d(k_bytes);
  const double moved = double(k_bytes) + double(L.tokens) * sizeof(float);  // K read + scores written
  state.counters["ms"] = mean_ms;
  state.counters["memcpy_ms"] = copy;
  state.counters["copy_bw_fraction"] = (moved / mean_ms) / (2.0 * double(k_bytes) / copy);
  state.counters["K_MiB"] = double(k_bytes) / (1 << 20);
}

void BM_key_norm(benchmark::State& state) {
  llama_layer L(state.range(0));
  const pk::segment_grid grid{1, 1, 1};
  const auto rows = pk::make_uniform_segments(1, L.tokens);
  const double mean_ms = time_call(state, [&](void* t, size_t& b, cudaStream_t s) {
    return pk::key_norm(t, b, L.kv(), {}, grid, 0, rows, L.scores.ptr, L.status.ptr, s);
  });
  report_key_norm(state, mean_ms, L, L.k.bytes());
  const float floor = L.floor_ms(L.k.ptr, L.k.bytes());
  state.counters["floor_ms"] = floor;
  state.counters["ratio_vs_floor"] = mean_ms / floor;
}

void BM_key_norm_paged(benchmark::State& state) {
  llama_layer L(state.range(0), false);
  paged_k P(state.range(0));
  const pk::segment_grid grid{1, 1, 1};
  const auto rows = pk::make_uniform_segments(1, L.tokens);
  const double mean_ms = time_call(state, [&](void* t, size_t& b, cudaStream_t s) {
    return pk::key_norm(t, b, P.view(), {}, grid, 0, rows, L.scores.ptr, L.status.ptr, s);
  });
  report_key_norm(state, mean_ms, L, P.pool.bytes());
}

// ---- accumulated attention at the LLaVA-1.5-7B shape ---------------------------------------------------------------
__global__ void fill_f16_probs(uint16_t* p, size_t n, float scale, uint32_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2654435761u ^ seed;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    p[i] = pk::float_to_half_bits(float(x & 0xFFFF) / 65535.0f * scale);
  }
}

struct llava_attention {
  static constexpr int64_t L = 32, Hq = 32, Hk = 32;
  static constexpr size_t max_resident = size_t(24) << 30;  // bytes of P held on the device at most
  int64_t B, S;
  std::vector<std::unique_ptr<device_array<pk::f16>>> bufs;
  std::vector<pk::kv_view<const pk::f16>> views;
  device_array<unsigned> status, sink;
  size_t layer_bytes;
  llava_attention(int64_t batch, int64_t s) : B(batch), S(s), status(1), sink(1) {
    const size_t elems = size_t(B * Hq * S * S);
    layer_bytes = elems * sizeof(pk::f16);
    const size_t distinct = std::max<size_t>(1, std::min<size_t>(L, max_resident / layer_bytes));
    for (size_t i = 0; i < distinct; ++i) {
      bufs.push_back(std::make_unique<device_array<pk::f16>>(elems));
      fill_f16_probs<<<4096, 256>>>(reinterpret_cast<uint16_t*>(bufs.back()->ptr), elems, 2.0f / float(S), uint32_t(i + 5));
    }
    for (int64_t l = 0; l < L; ++l)
      views.push_back(pk::make_kv_view_bhsd<const pk::f16>(bufs[size_t(l) % distinct]->ptr, B, Hq, S, S));
    PKV_BENCH_CHECK(cudaMemset(status.ptr, 0, 4));
    PKV_BENCH_CHECK(cudaDeviceSynchronize());
  }
  float floor_ms() {
    return median_ms([&](cudaStream_t s) {
      for (const auto& v : views)
        read_once_kernel<<<132 * 8, 512, 0, s>>>(reinterpret_cast<const uint4*>(v.data), layer_bytes / 16, sink.ptr);
    }, 7);
  }
};

// memcpy time for `bytes` (timed on at most 4 GiB, scaled linearly), and the counters shared by the variants.
void report_attention(benchmark::State& state, double mean_ms, double p_bytes, double score_bytes) {
  const size_t copied = size_t(std::min(p_bytes, double(size_t(4) << 30)));
  const double copy = double(time_memcpy_d2d(copied)) * p_bytes / double(copied);
  state.counters["ms"] = mean_ms;
  state.counters["P_GiB"] = p_bytes / double(1 << 30);
  state.counters["memcpy_ms"] = copy;
  state.counters["copy_bw_fraction"] = ((p_bytes + score_bytes) / mean_ms) / (2.0 * p_bytes / copy);
}

void run_attention_layers(benchmark::State& state, int64_t batch, bool per_head, bool ragged) {
  const int64_t S = state.range(0);
  llava_attention A(batch, S);
  const int64_t L = llava_attention::L, heads = per_head ? llava_attention::Hk : 1;
  const pk::segment_grid grid{L, batch, heads};
  std::vector<int64_t> begins(size_t(grid.count())), lens(size_t(grid.count()));
  double p_bytes = 0, score_floats = 0;
  int64_t off = 0;
  for (int64_t id = 0; id < grid.count(); ++id) {
    const int64_t b = grid.batch_of(id);
    const int64_t n = !ragged ? S : (b % 4 == 0 ? S : b % 4 == 1 ? S * 9 / 10 : b % 4 == 2 ? S * 3 / 4 + 3 : S / 2 + 1);
    begins[size_t(id)] = off;
    lens[size_t(id)] = n;
    off += n;
    p_bytes += double(llava_attention::Hq / heads) * double(S) * double(n) * sizeof(pk::f16);
    score_floats += double(n);
  }
  device_array<int64_t> dbeg(begins.size()), dlen(lens.size());
  PKV_BENCH_CHECK(cudaMemcpy(dbeg.ptr, begins.data(), begins.size() * 8, cudaMemcpyHostToDevice));
  PKV_BENCH_CHECK(cudaMemcpy(dlen.ptr, lens.data(), lens.size() * 8, cudaMemcpyHostToDevice));
  device_array<float> scores(static_cast<size_t>(off));
  const auto rows = ragged ? pk::make_ragged_segments(grid.count(), dbeg.ptr, dlen.ptr)
                           : pk::make_uniform_segments(grid.count(), S);
  const double mean_ms = time_call(state, [&](void* t, size_t& b, cudaStream_t s) {
    return pk::accumulated_attention_layers(t, b, A.views.data(), grid, rows, scores.ptr, A.status.ptr, s);
  });
  unsigned bits = 0;
  PKV_BENCH_CHECK(pk::read_status(A.status.ptr, bits));
  report_attention(state, mean_ms, p_bytes, score_floats * sizeof(float));
  if (!ragged) {
    const float floor = A.floor_ms();
    state.counters["floor_ms"] = floor;
    state.counters["ratio_vs_floor"] = mean_ms / floor;
  }
}

void BM_attention_layers(benchmark::State& state) { run_attention_layers(state, 1, false, false); }
void BM_attention_layers_heads(benchmark::State& state) { run_attention_layers(state, 1, true, false); }
void BM_attention_layers_batch(benchmark::State& state) { run_attention_layers(state, 4, false, true); }

}  // namespace

BENCHMARK(BM_attention_layers)->Arg(700)->Arg(2048)->Arg(4096)->UseManualTime()->Iterations(5)->Repetitions(5)->ReportAggregatesOnly(true)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_attention_layers_heads)->Arg(700)->Arg(2048)->UseManualTime()->Iterations(5)->Repetitions(5)->ReportAggregatesOnly(true)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_attention_layers_batch)->Arg(700)->Arg(2048)->UseManualTime()->Iterations(5)->Repetitions(5)->ReportAggregatesOnly(true)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_window_caller_lse)->Arg(4096)->Arg(32768)->Arg(131072)->UseManualTime()->Iterations(20)->Repetitions(7)->ReportAggregatesOnly(true)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_window_two_pass)->Arg(4096)->Arg(32768)->Arg(131072)->UseManualTime()->Iterations(20)->Repetitions(7)->ReportAggregatesOnly(true)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_window_caller_lse_mma_sync)->Arg(4096)->Arg(32768)->Arg(131072)->UseManualTime()->Iterations(20)->Repetitions(7)->ReportAggregatesOnly(true)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_window_caller_lse_paged)->Arg(32768)->Arg(131072)->UseManualTime()->Iterations(20)->Repetitions(7)->ReportAggregatesOnly(true)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_window_caller_lse_32_layers)->Arg(4096)->Arg(32768)->UseManualTime()->Iterations(5)->Repetitions(5)->ReportAggregatesOnly(true)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_key_norm)->Arg(32768)->Arg(131072)->UseManualTime()->Iterations(20)->Repetitions(7)->ReportAggregatesOnly(true)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_key_norm_paged)->Arg(32768)->Arg(131072)->UseManualTime()->Iterations(20)->Repetitions(7)->ReportAggregatesOnly(true)->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
