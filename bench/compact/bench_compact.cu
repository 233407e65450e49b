// Compaction bandwidth on a Llama-3-8B-like cache: 32 layers, 8 kv-heads, head_dim 128, bf16 (256-byte rows),
// batch 1, 4K / 32K / 128K tokens, 25 / 50 / 75 % kept (per-(layer, sequence) lists shared by the heads).
// Modes: contiguous [B,H,S,D] in place / out of place, paged (page 16, NHD) in place / paged -> contiguous.
//
// Counters (per benchmark, from the median of the timed iterations, cold L2):
//   GBps        bytes moved / time, bytes moved = kept rows read + written = 2 * kept * row bytes (K and V)
//   memcpy_GBps the same for cudaMemcpyAsync D2D of the kept bytes, timed in the same process
//   ratio       memcpy time / kernel time (1.0 = copy speed)
// `trusted:1` skips the device-side index check kernel (index_check::trusted).
// BM_copy: plain copy kernels (no gather) against cudaMemcpyAsync of the same bytes, the references for the
// compaction kernels' shapes: shape 0 = one 32 KB tile per short-lived block (the out-of-place grid), 1 = 2 x SMs
// persistent blocks with a fixed grid stride, 2 = 512 independent streams, one long-lived block each (the in-place
// grid's shape: one block per lane of 32 layers x 8 heads x K/V; a block barrier per tile changes nothing there).
#include <prefixkv/compact/compact.cuh>

#include "support/bench_util.cuh"

#include <algorithm>
#include <map>
#include <numeric>
#include <random>
#include <vector>

namespace {

using namespace prefixkv_bench;
using bf16 = uint16_t;

constexpr int64_t L = 32, H = 8, D = 128, B = 1, P = 16;

enum mode { contig_inplace = 0, contig_gather = 1, paged_inplace = 2, paged_gather = 3 };
const char* mode_name[] = {"contig_inplace", "contig_gather", "paged_inplace", "paged_to_contig_gather"};

// One arena for every case, allocated once at the size of the largest case (out-of-place, 128K tokens, 75 %):
// growing it between cases made the first case timed on a fresh allocation slow (measured: contiguous gather at
// 4K tokens with the device check read 0.77 of memcpy right after a re-allocation, 0.87-0.90 otherwise).
constexpr size_t arena_max = size_t(2) * 32 * 8 * 128 * 2 * (131072 + 131072 * 75 / 100);
char* arena(size_t bytes) {
  static char* p = nullptr;
  static size_t have = 0;
  if (bytes < arena_max) bytes = arena_max;
  if (have < bytes) {
    if (p) PKV_BENCH_CHECK(cudaFree(p));
    PKV_BENCH_CHECK(cudaMalloc(&p, bytes));
    PKV_BENCH_CHECK(cudaMemset(p, 3, bytes));
    have = bytes;
    // warm-up (clocks, first touch): without it the first 4K-token cases timed 0.1-0.3 of memcpy low
    for (int i = 0; i < 300; ++i)
      PKV_BENCH_CHECK(cudaMemcpyAsync(p, p + (size_t(1) << 30), size_t(1) << 30, cudaMemcpyDeviceToDevice));
    PKV_BENCH_CHECK(cudaDeviceSynchronize());
  }
  return p;
}

float memcpy_ms(size_t bytes) {
  static std::map<size_t, float> cache;
  auto it = cache.find(bytes);
  if (it != cache.end()) return it->second;
  const float ms = time_memcpy_d2d(bytes, 21);
  cache[bytes] = ms;
  return ms;
}

void BM_compact(benchmark::State& state) {
  const int64_t T = state.range(0);
  const int64_t pct = state.range(1);
  const mode md = static_cast<mode>(state.range(2));
  const auto check = state.range(3) ? prefixkv::index_check::trusted : prefixkv::index_check::device;
  const int64_t kept = T * pct / 100;
  const int64_t row = D * sizeof(bf16);
  const size_t layer_bytes = size_t(B * H * T * row);           // one K or V tensor of one layer
  const size_t out_layer_bytes = size_t(B * H * kept * row);
  const bool inplace = md == contig_inplace || md == paged_inplace;
  const size_t total = 2 * L * layer_bytes + (inplace ? 0 : 2 * L * out_layer_bytes);
  char* base = arena(total);

  // selection: per (layer, sequence) random kept subsets, ascending
  std::mt19937_64 rng(1234 + T + pct);
  std::vector<int64_t> off(L * B + 1, 0);
  std::vector<int32_t> idx;
  std::vector<int32_t> all(T);
  for (int64_t s = 0; s < L * B; ++s) {
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    std::vector<int32_t> pick(all.begin(), all.begin() + kept);
    std::sort(pick.begin(), pick.end());
    idx.insert(idx.end(), pick.begin(), pick.end());
    off[s + 1] = int64_t(idx.size());
  }
  device_array<int64_t> d_off(off.size());
  device_array<int32_t> d_idx(std::max<size_t>(idx.size(), 1));
  PKV_BENCH_CHECK(cudaMemcpy(d_off.ptr, off.data(), off.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
  PKV_BENCH_CHECK(cudaMemcpy(d_idx.ptr, idx.data(), idx.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
  const prefixkv::selection sel{L * B, d_off.ptr, d_idx.ptr};
  const prefixkv::segment_grid grid{L, B, 1};

  // block table: pages of a sequence in shuffled order (as after allocation churn)
  const int64_t blocks = (T + P - 1) / P, pages = B * blocks;
  std::vector<int32_t> table(pages);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), rng);
  device_array<int32_t> d_table(table.size());
  PKV_BENCH_CHECK(cudaMemcpy(d_table.ptr, table.data(), table.size() * sizeof(int32_t), cudaMemcpyHostToDevice));

  std::vector<prefixkv::kv_view<bf16>> ck(L), cv(L), ok(L), ov(L);
  std::vector<prefixkv::paged_kv_view<bf16>> pk(L), pv(L);
  char* out_base = base + 2 * L * layer_bytes;
  for (int64_t l = 0; l < L; ++l) {
    bf16* kp = reinterpret_cast<bf16*>(base + (2 * l) * layer_bytes);
    bf16* vp = reinterpret_cast<bf16*>(base + (2 * l + 1) * layer_bytes);
    ck[l] = prefixkv::make_kv_view_bhsd(kp, B, H, T, D);
    cv[l] = prefixkv::make_kv_view_bhsd(vp, B, H, T, D);
    pk[l] = prefixkv::make_paged_kv_view(kp, prefixkv::page_layout::nhd, pages, P, H, D, d_table.ptr, B, blocks);
    pv[l] = prefixkv::make_paged_kv_view(vp, prefixkv::page_layout::nhd, pages, P, H, D, d_table.ptr, B, blocks);
    ok[l] = prefixkv::make_kv_view_bhsd(reinterpret_cast<bf16*>(out_base + (2 * l) * out_layer_bytes), B, H, kept, D);
    ov[l] = prefixkv::make_kv_view_bhsd(reinterpret_cast<bf16*>(out_base + (2 * l + 1) * out_layer_bytes), B, H, kept, D);
  }
  const prefixkv::kv_layers<bf16> contig{ck.data(), cv.data(), nullptr, nullptr, L};
  const prefixkv::kv_layers<bf16> outc{ok.data(), ov.data(), nullptr, nullptr, L};
  const prefixkv::paged_kv_layers<bf16> paged{pk.data(), pv.data(), nullptr, nullptr, L};

  auto call = [&](void* t, size_t& bytes, cudaStream_t s) -> cudaError_t {
    switch (md) {
      case contig_inplace: return prefixkv::compact_in_place(t, bytes, contig, sel, grid, {}, check, s);
      case contig_gather: return prefixkv::gather_kept(t, bytes, contig, outc, sel, grid, {}, check, s);
      case paged_inplace: return prefixkv::compact_in_place(t, bytes, paged, sel, grid, {}, check, s);
      default: return prefixkv::gather_kept(t, bytes, paged, outc, sel, grid, {}, check, s);
    }
  };
  size_t temp_bytes = 0;
  PKV_BENCH_CHECK(call(nullptr, temp_bytes, 0));
  device_array<char> temp(temp_bytes);
  auto run = [&](cudaStream_t s) { PKV_BENCH_CHECK(call(temp.ptr, temp_bytes, s)); };
  PKV_BENCH_CHECK(cudaDeviceSynchronize());

  event_timer timer;
  timer.time_ms(run);  // warm-up
  std::vector<float> times;
  for (auto _ : state) {
    const float ms = timer.time_ms(run);
    state.SetIterationTime(ms / 1e3);
    times.push_back(ms);
  }
  std::sort(times.begin(), times.end());
  const float med = times[times.size() / 2];
  const size_t kept_bytes = size_t(2 * L * B * H * kept * row);  // K and V
  const float base_ms = kept_bytes ? memcpy_ms(kept_bytes) : 0.f;
  state.counters["median_ms"] = med;
  state.counters["memcpy_ms"] = base_ms;
  state.counters["GBps"] = 2.0 * kept_bytes / (med * 1e6);
  state.counters["memcpy_GBps"] = base_ms > 0 ? 2.0 * kept_bytes / (base_ms * 1e6) : 0;
  state.counters["ratio"] = med > 0 ? base_ms / med : 0;
  state.SetLabel(mode_name[md]);
}

void args(benchmark::internal::Benchmark* b) {
  for (int64_t trusted : {0, 1})
    for (int64_t md : {0, 1, 2, 3})
      for (int64_t T : {4096, 32768, 131072})
        for (int64_t pct : {25, 50, 75}) {
          if (trusted && T != 4096) continue;  // the check kernel only matters for short caches
          b->Args({T, pct, md, trusted});
        }
  b->ArgNames({"tokens", "kept_pct", "mode", "trusted"});
}

// One tile of the copies: words [base, base + 256 U) below `end`, all loads of a thread before its stores.
template <int U>
__device__ __forceinline__ void copy_tile(const uint4* src, uint4* dst, int64_t base, int64_t end) {
  uint4 buf[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t i = base + u * 256 + threadIdx.x;
    if (i < end) buf[u] = src[i];
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t i = base + u * 256 + threadIdx.x;
    if (i < end) dst[i] = buf[u];
  }
}

// Shapes 0 and 1: tiles of 256 x 8 words, grid-stride (one tile per block when the grid covers every tile).
__global__ void __launch_bounds__(256, 2) copy_kernel(const uint4* __restrict__ s, uint4* __restrict__ d, int64_t n) {
  constexpr int64_t tile = int64_t(256) * 8;
  for (int64_t base = int64_t(blockIdx.x) * tile; base < n; base += int64_t(gridDim.x) * tile)
    copy_tile<8>(s, d, base, n);
}

// Shape 2: 512 independent streams of `per` words, one long-lived block each.
__global__ void __launch_bounds__(256, 2) stream_copy_kernel(const uint4* __restrict__ s, uint4* __restrict__ d,
                                                             int64_t per) {
  const uint4* src = s + int64_t(blockIdx.x) * per;
  uint4* dst = d + int64_t(blockIdx.x) * per;
  for (int64_t base = 0; base < per; base += int64_t(256) * 8) copy_tile<8>(src, dst, base, per);
}

void BM_copy(benchmark::State& state) {
  const int64_t T = state.range(0), pct = state.range(1), shape = state.range(2);
  const size_t bytes = size_t(2 * L * B * H * (T * pct / 100) * D * sizeof(bf16));
  char* base = arena(2 * bytes);
  const int64_t n = int64_t(bytes / 16);
  int sms = 0;
  PKV_BENCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  auto launch = [&](cudaStream_t st) {
    const auto* s = reinterpret_cast<const uint4*>(base);
    auto* d = reinterpret_cast<uint4*>(base + bytes);
    const int64_t tiles = (n + 2047) / 2048;
    if (shape == 0)
      copy_kernel<<<static_cast<unsigned>(tiles), 256, 0, st>>>(s, d, n);
    else if (shape == 1)
      copy_kernel<<<static_cast<unsigned>(std::min<int64_t>(tiles, 2 * int64_t(sms))), 256, 0, st>>>(s, d, n);
    else
      stream_copy_kernel<<<512, 256, 0, st>>>(s, d, n / 512);
    PKV_BENCH_CHECK(cudaGetLastError());
  };
  event_timer timer;
  timer.time_ms(launch);  // warm-up
  std::vector<float> times;
  for (auto _ : state) {
    const float ms = timer.time_ms(launch);
    state.SetIterationTime(ms / 1e3);
    times.push_back(ms);
  }
  std::sort(times.begin(), times.end());
  const float med = times[times.size() / 2];
  const float base_ms = memcpy_ms(bytes);
  state.counters["median_ms"] = med;
  state.counters["memcpy_ms"] = base_ms;
  state.counters["GBps"] = 2.0 * bytes / (med * 1e6);
  state.counters["ratio"] = med > 0 ? base_ms / med : 0;
}

void copy_args(benchmark::internal::Benchmark* b) {
  for (int64_t T : {4096, 131072})
    for (int64_t pct : {25, 75})
      for (int64_t shape : {0, 1, 2}) b->Args({T, pct, shape});
  b->ArgNames({"tokens", "kept_pct", "shape"});
}

}  // namespace

BENCHMARK(BM_compact)->Apply(args)->UseManualTime()->Iterations(15)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_copy)->Apply(copy_args)->UseManualTime()->Iterations(15)->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
