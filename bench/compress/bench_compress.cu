// The whole compression step (prefixkv::compress) against its memory floor, timed in the same process.
//
// BM_paper_path: the paper's setting — LLaVA-1.5-7B shape (32 layers, 32 heads, head_dim 128, fp16 cache), fp16
//   attention probabilities materialised per layer as (1, 32, S, S), accumulated-attention scorer, one global
//   threshold, evict ratio 0.5 (4 sinks, 1 recent token), in place. S = 700 / 2048 / 4096.
//   Floor = the probabilities read once + the kept K/V rows read and written.
// BM_long_context: Llama-3-8B shape (32 layers, 32 query / 8 kv heads, head_dim 128, bf16), observation-window
//   scorer (64 query rows, the caller's LSE as flash attention returns it), evict ratio 0.5, in place, contiguous
//   [B, H, S, D] or paged (page 16, NHD); batch 1 at 32K / 128K tokens, or a ragged batch of 8 sequences of
//   4K..32K tokens. Floor = K read once (scoring) + the kept K/V rows read and written.
//
// Counters: ms (median, cold L2, plain launches), floor_ms (cudaMemcpyAsync D2D moving the floor's bytes, same
// process), ratio = ms / floor_ms (goals: <= 1.15 paper path, <= 1.25 long context), graph_ms / graph_ratio (the
// same call captured into a CUDA graph and launched), ms_<stage> (CUDA events between the stages of the plain
// calls), ws_frac = workspace bytes / cache bytes.
#include <prefixkv/compress/compress.cuh>

#include "support/bench_util.cuh"

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

namespace {

using namespace prefixkv_bench;
namespace pk = prefixkv;

const char* stage_names[pk::detail::compress_stage_count] = {"prologue", "score", "curve", "solve",
                                                            "select", "compact", "outputs"};

// Fill `n` 16-bit elements with x ~ U(-a, a) (f16 or bf16 bits), on the device.
template <class T>
__global__ void fill_kernel(T* p, size_t n, float a, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    const float u = (h & 0xFFFFFF) / float(0x1000000);
    p[i] = T::from_float(a * (2.0f * u - 1.0f));
  }
}
template <class T>
void fill(T* p, size_t n, float a, uint32_t seed) {
  fill_kernel<<<2048, 256>>>(p, n, a, seed);
  PKV_BENCH_CHECK(cudaGetLastError());
}
// Attention-like rows: causal (1, H, S, S) probabilities, each row summing to about 1 over its visible keys.
__global__ void causal_probs_kernel(pk::f16* p, int64_t H, int64_t S, uint32_t seed) {
  const int64_t row = blockIdx.x;  // (h, q)
  const int64_t q = row % S;
  for (int64_t k = threadIdx.x; k < S; k += blockDim.x) {
    uint32_t h = uint32_t(row * S + k) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    const float u = (h & 0xFFFF) / 65536.0f;
    const float v = k <= q ? 2.0f * u / float(q + 1) : 0.0f;
    p[row * S + k] = pk::f16::from_float(v);
  }
}
__global__ void lse_kernel(float* lse, int64_t B, int64_t Hq, int64_t w, const int32_t* len) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= B * Hq * w) return;
  const int64_t b = i / (Hq * w), q = i % w;
  lse[i] = logf(float(len[b] - w + q + 1));  // logits near 0: the LSE of n equal logits
}

struct stage_times {
  cudaEvent_t start{};
  pk::detail::compress_stage_events ev;
  std::vector<std::vector<float>> ms;
  stage_times() : ms(pk::detail::compress_stage_count + 1) {
    PKV_BENCH_CHECK(cudaEventCreate(&start));
    for (auto& e : ev.after) PKV_BENCH_CHECK(cudaEventCreate(&e));
  }
  ~stage_times() {
    cudaEventDestroy(start);
    for (auto& e : ev.after) cudaEventDestroy(e);
  }
  void collect() {
    PKV_BENCH_CHECK(cudaEventSynchronize(ev.after[pk::detail::compress_stage_count - 1]));
    cudaEvent_t prev = start;
    float total = 0;
    for (int i = 0; i < pk::detail::compress_stage_count; ++i) {
      float x = 0;
      PKV_BENCH_CHECK(cudaEventElapsedTime(&x, prev, ev.after[i]));
      ms[i].push_back(x);
      total += x;
      prev = ev.after[i];
    }
    ms.back().push_back(total);
  }
  static float median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0f : v[v.size() / 2];
  }
  void report(benchmark::State& state) const {
    for (int i = 0; i < pk::detail::compress_stage_count; ++i)
      state.counters[std::string("ms_") + stage_names[i]] = median(ms[i]);
  }
};

// Runs `call(stream, events)` (one compression) under the benchmark loop; returns the median ms.
template <class Call>
double run_timed(benchmark::State& state, Call&& call) {
  stage_times st;
  event_timer t;
  call(nullptr);  // warm-up
  PKV_BENCH_CHECK(cudaDeviceSynchronize());
  std::vector<float> all;
  for (auto _ : state) {
    flush_l2();
    PKV_BENCH_CHECK(cudaEventRecord(st.start, 0));
    call(&st.ev);
    st.collect();
    const float ms = st.ms.back().back();
    state.SetIterationTime(ms / 1e3);
    all.push_back(ms);
  }
  st.report(state);
  return stage_times::median(all);
}

// The same compression captured once into a CUDA graph and launched: what an engine that captures its step pays
// (no per-kernel launch overhead). Median ms over `reps` cold-L2 launches.
template <class Call>
double graph_ms(Call&& call, int reps = 15) {
  cudaStream_t s;
  PKV_BENCH_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaGraph_t g;
  cudaGraphExec_t e;
  PKV_BENCH_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  call(s);
  PKV_BENCH_CHECK(cudaStreamEndCapture(s, &g));
  PKV_BENCH_CHECK(cudaGraphInstantiate(&e, g, 0));
  const double ms = median_ms([&](cudaStream_t st) { PKV_BENCH_CHECK(cudaGraphLaunch(e, st)); }, reps, s);
  cudaGraphExecDestroy(e);
  cudaGraphDestroy(g);
  cudaStreamDestroy(s);
  return ms;
}

// ---------------------------------------------------------------------------------------------------------------
void BM_paper_path(benchmark::State& state) {
  const int64_t S = state.range(0), L = 32, H = 32, D = 128;
  const size_t kv_elems = size_t(H) * S * D, p_elems = size_t(H) * S * S;
  device_array<pk::f16> k(kv_elems * L), v(kv_elems * L), p(p_elems * L);
  fill(k.ptr, k.n, 1.0f, 1);
  fill(v.ptr, v.n, 1.0f, 2);
  for (int64_t l = 0; l < L; ++l) causal_probs_kernel<<<unsigned(H * S), 256>>>(p.ptr + l * p_elems, H, S, 7 + uint32_t(l));
  PKV_BENCH_CHECK(cudaDeviceSynchronize());
  std::vector<pk::kv_view<pk::f16>> kv(L), vv(L);
  std::vector<pk::kv_view<const pk::f16>> pv(L);
  for (int64_t l = 0; l < L; ++l) {
    kv[l] = pk::make_kv_view_bhsd(k.ptr + l * kv_elems, 1, H, S, D);
    vv[l] = pk::make_kv_view_bhsd(v.ptr + l * kv_elems, 1, H, S, D);
    pv[l] = pk::make_kv_view_bhsd<const pk::f16>(p.ptr + l * p_elems, 1, H, S, S);
  }
  pk::compress_config cfg;
  cfg.layers = L;
  cfg.q_heads = cfg.kv_heads = H;
  cfg.head_dim = D;
  cfg.max_batch = 1;
  cfg.max_tokens = S;
  cfg.scorer = pk::scorer_kind::attention;
  cfg.evict_ratio = 0.5;
  pk::compress_plan plan;
  PKV_BENCH_CHECK(pk::make_plan(cfg, plan));
  device_array<int32_t> len(1), out_len(L), status(1);
  const int32_t n = int32_t(S);
  PKV_BENCH_CHECK(cudaMemcpy(len.ptr, &n, 4, cudaMemcpyHostToDevice));
  pk::compress_args<pk::kv_layers<pk::f16>> a;
  a.cache = {kv.data(), vv.data(), nullptr, nullptr, L};
  a.lengths = len.ptr;
  a.attention = pv.data();
  a.out.lengths = out_len.ptr;
  a.out.status = status.ptr;
  size_t bytes = 0;
  PKV_BENCH_CHECK(pk::compress(nullptr, bytes, plan, a));
  device_array<char> temp(bytes);
  const double ms = run_timed(state, [&](const pk::detail::compress_stage_events* ev) {
    PKV_BENCH_CHECK(pk::detail::compress_run(temp.ptr, bytes, plan, a, -1, 0, ev));
  });
  int32_t st = -1;
  std::vector<int32_t> kept(L);
  PKV_BENCH_CHECK(cudaMemcpy(&st, status.ptr, 4, cudaMemcpyDeviceToHost));
  PKV_BENCH_CHECK(cudaMemcpy(kept.data(), out_len.ptr, 4 * L, cudaMemcpyDeviceToHost));
  if (st != 0) state.SkipWithError("the chain reported a status");
  int64_t kept_rows = 0;
  for (int32_t x : kept) kept_rows += x;
  const size_t row = size_t(H) * D * 2;
  const size_t floor_bytes = p.bytes() + 2 * 2 * size_t(kept_rows) * row;  // P read + K/V kept read and written
  const double floor_ms = time_memcpy_d2d(floor_bytes / 2);
  const double gms = graph_ms([&](cudaStream_t st) { PKV_BENCH_CHECK(pk::compress(temp.ptr, bytes, plan, a, st)); });
  state.counters["floor_ms"] = floor_ms;
  state.counters["ratio"] = ms / floor_ms;
  state.counters["graph_ms"] = gms;
  state.counters["graph_ratio"] = gms / floor_ms;
  state.counters["ws_frac"] = double(bytes) / double(k.bytes() + v.bytes());
  state.counters["ws_MB"] = double(bytes) / 1e6;
}
BENCHMARK(BM_paper_path)->Arg(700)->Arg(2048)->Arg(4096)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(10)->Repetitions(3)->ReportAggregatesOnly(true);

// ---------------------------------------------------------------------------------------------------------------
template <bool Paged>
void long_context(benchmark::State& state) {
  const int64_t tokens = state.range(0), ragged = state.range(1);
  const int64_t L = 32, Hq = 32, Hk = 8, D = 128, w = 64, page = 16;
  const int64_t B = ragged ? 8 : 1, cap = ragged ? 32768 : tokens;
  std::vector<int32_t> lengths(B);
  for (int64_t b = 0; b < B; ++b) lengths[b] = int32_t(ragged ? 4096 * (b + 1) : tokens);
  const size_t kv_elems = size_t(B) * Hk * cap * D;
  device_array<pk::bf16> k(kv_elems * L), v(kv_elems * L), q(size_t(L) * B * Hq * w * D);
  fill(k.ptr, k.n, 0.25f, 3);
  fill(v.ptr, v.n, 1.0f, 4);
  fill(q.ptr, q.n, 0.25f, 5);
  device_array<int32_t> len(B), out_len(L * B), status(1), pages(B);
  PKV_BENCH_CHECK(cudaMemcpy(len.ptr, lengths.data(), 4 * B, cudaMemcpyHostToDevice));
  device_array<float> lse(size_t(B) * Hq * w);
  lse_kernel<<<unsigned((B * Hq * w + 255) / 256), 256>>>(lse.ptr, B, Hq, w, len.ptr);
  // paged: the same pool, page ids of each sequence shuffled
  const int64_t blocks = cap / page, num_pages = B * blocks;
  std::vector<int32_t> table(static_cast<size_t>(num_pages));
  for (int64_t i = 0; i < num_pages; ++i) table[i] = int32_t(i);
  std::shuffle(table.begin(), table.end(), std::mt19937(11));
  device_array<int32_t> dtable(table.size());
  PKV_BENCH_CHECK(cudaMemcpy(dtable.ptr, table.data(), 4 * table.size(), cudaMemcpyHostToDevice));
  std::vector<pk::kv_view<const pk::bf16>> qv(L);
  std::vector<pk::lse_view> lv(L);
  for (int64_t l = 0; l < L; ++l) {
    qv[l] = pk::make_kv_view_bhsd<const pk::bf16>(q.ptr + size_t(l) * B * Hq * w * D, B, Hq, w, D);
    lv[l] = pk::lse_view{lse.ptr, Hq * w, w, 1};
  }
  pk::compress_config cfg;
  cfg.layers = L;
  cfg.q_heads = Hq;
  cfg.kv_heads = Hk;
  cfg.head_dim = D;
  cfg.max_batch = B;
  cfg.max_tokens = cap;
  cfg.max_window = w;
  cfg.max_pages = num_pages;
  cfg.page_size = page;
  cfg.scorer = pk::scorer_kind::window;
  cfg.evict_ratio = 0.5;
  pk::compress_plan plan;
  PKV_BENCH_CHECK(pk::make_plan(cfg, plan));
  size_t bytes = 0;
  double ms = 0, gms = 0;
  auto go = [&](auto& a) {
    a.lengths = len.ptr;
    a.queries = qv.data();
    a.lse = lv.data();
    a.out.lengths = out_len.ptr;
    a.out.status = status.ptr;
    a.out.pages_in_use = Paged ? pages.ptr : nullptr;
    const cudaError_t e = pk::compress(nullptr, bytes, plan, a);
    if (e != cudaSuccess) {
      state.SkipWithError(pk::last_error().message);
      return false;
    }
    device_array<char> temp(bytes);
    if (pk::compress(temp.ptr, bytes, plan, a) != cudaSuccess) {  // e.g. a scorer this cache layout lacks
      state.SkipWithError(pk::last_error().message);
      return false;
    }
    ms = run_timed(state, [&](const pk::detail::compress_stage_events* ev) {
      const cudaError_t r = pk::detail::compress_run(temp.ptr, bytes, plan, a, -1, 0, ev);
      if (r != cudaSuccess) {
        std::fprintf(stderr, "compress: %s\n", pk::last_error().message);
        std::abort();
      }
    });
    gms = graph_ms([&](cudaStream_t st) { PKV_BENCH_CHECK(pk::compress(temp.ptr, bytes, plan, a, st)); });
    return true;
  };
  bool ok = false;
  if constexpr (Paged) {
    std::vector<pk::paged_kv_view<pk::bf16>> kv(L), vv(L);
    for (int64_t l = 0; l < L; ++l) {
      kv[l] = pk::make_paged_kv_view(k.ptr + l * kv_elems, pk::page_layout::nhd, num_pages, page, Hk, D, dtable.ptr, B, blocks);
      vv[l] = pk::make_paged_kv_view(v.ptr + l * kv_elems, pk::page_layout::nhd, num_pages, page, Hk, D, dtable.ptr, B, blocks);
    }
    pk::compress_args<pk::paged_kv_layers<pk::bf16>> a;
    a.cache = {kv.data(), vv.data(), nullptr, nullptr, L};
    ok = go(a);
  } else {
    std::vector<pk::kv_view<pk::bf16>> kv(L), vv(L);
    for (int64_t l = 0; l < L; ++l) {
      kv[l] = pk::make_kv_view_bhsd(k.ptr + l * kv_elems, B, Hk, cap, D);
      vv[l] = pk::make_kv_view_bhsd(v.ptr + l * kv_elems, B, Hk, cap, D);
    }
    pk::compress_args<pk::kv_layers<pk::bf16>> a;
    a.cache = {kv.data(), vv.data(), nullptr, nullptr, L};
    ok = go(a);
  }
  if (!ok) return;
  int32_t st = -1;
  std::vector<int32_t> kept(L * B);
  PKV_BENCH_CHECK(cudaMemcpy(&st, status.ptr, 4, cudaMemcpyDeviceToHost));
  PKV_BENCH_CHECK(cudaMemcpy(kept.data(), out_len.ptr, 4 * kept.size(), cudaMemcpyDeviceToHost));
  if (st != 0) state.SkipWithError("the chain reported a status");
  int64_t kept_rows = 0, total_rows = 0;
  for (int32_t x : kept) kept_rows += x;
  for (int32_t x : lengths) total_rows += int64_t(x) * L;
  const size_t row = size_t(Hk) * D * 2;
  const size_t floor_bytes = size_t(total_rows) * row + 2 * 2 * size_t(kept_rows) * row;
  const double floor_ms = time_memcpy_d2d(floor_bytes / 2);
  state.counters["floor_ms"] = floor_ms;
  state.counters["ratio"] = ms / floor_ms;
  state.counters["graph_ms"] = gms;
  state.counters["graph_ratio"] = gms / floor_ms;
  state.counters["ws_frac"] = double(bytes) / double(k.bytes() + v.bytes());
  state.counters["ws_MB"] = double(bytes) / 1e6;
}
void BM_long_context(benchmark::State& state) { long_context<false>(state); }
void BM_long_context_paged(benchmark::State& state) { long_context<true>(state); }
BENCHMARK(BM_long_context)->ArgNames({"tokens", "ragged8"})->Args({32768, 0})->Args({131072, 0})->Args({0, 1})
    ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(10)->Repetitions(3)->ReportAggregatesOnly(true);
BENCHMARK(BM_long_context_paged)->ArgNames({"tokens", "ragged8"})->Args({32768, 0})->Args({131072, 0})->Args({0, 1})
    ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(10)->Repetitions(3)->ReportAggregatesOnly(true);

}  // namespace

BENCHMARK_MAIN();
