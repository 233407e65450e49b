// Compaction bandwidth on a Llama-3-8B-like cache: 32 layers, 8 kv-heads, head_dim 128, bf16 (256-byte rows),
// batch 1, 4K / 32K / 128K tokens, 25 / 50 / 75 % kept (per-(layer, sequence) lists shared by the heads).
// Modes: contiguous [B,H,S,D] in place / out of place, paged (page 16, NHD) in place / paged -> contiguous.
//
// Counters (per benchmark, from the median of the timed iterations, cold L2):
//   GBps        bytes moved / time, bytes moved = kept rows read + written = 2 * kept * row bytes (K and V)
//   memcpy_GBps the same for cudaMemcpyAsync D2D of the kept bytes, timed in the same process
//   ratio       memcpy time / kernel time (1.0 = copy speed)
// `trusted:1` skips the device-side index check kernel (index_check::trusted).
// `kernel`, `resident`, `chunk_rows` pick move-kernel variants (detail::compact_tune, same run; see args()).
// BM_copy: a plain copy kernel against cudaMemcpyAsync of the same bytes (diagnostic, same run); variants 5-9
// copy the same bytes as 512 long-lived streams (the in-place kernel's one block per lane), 10 as one-shot
// blocks interleaved over the 512 streams, 11-15 as 512 long-lived blocks over 64 / 128 / 256 streams (with or
// without a cluster barrier per round), 16-17 as 512 streams with rotated tile order, 18-25 as 2 x SMs persistent
// blocks taking tiles from a ticket counter (one stream; 512 streams chunk-major; groups of 8-128 streams); see
// RESULTS.md.
#include <prefixkv/compact/compact.cuh>

#include "support/bench_util.cuh"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
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
    // warm-up (clocks, first touch): device run 7 timed the first 4K-token cases 0.1-0.3 of memcpy low without it
    for (int i = 0; i < 300; ++i)
      PKV_BENCH_CHECK(cudaMemcpyAsync(p, p + (size_t(1) << 30), size_t(1) << 30, cudaMemcpyDeviceToDevice));
    PKV_BENCH_CHECK(cudaDeviceSynchronize());
  }
  return p;
}

// Opt-in (not used for RESULTS.md run 8): PREFIXKV_BENCH_HOLD_US=N queues a kernel that spins N microseconds
// after the L2 flush and before the start event, so that the host has enqueued the whole timed call before the
// timed region starts (host-side planning and launches then cannot leave the GPU idle inside it). Applied to the
// compaction calls, the copy kernels and the memcpy baseline alike.
__global__ void hold_kernel(long long ns) {
  const long long t0 = clock64();
  // clock64 counts SM cycles; ~1.98 GHz boost on H100: 2 cycles per ns is an upper bound, good enough here
  while (clock64() - t0 < 2 * ns) {
  }
}
int hold_us() {
  static const int v = [] {
    const char* e = std::getenv("PREFIXKV_BENCH_HOLD_US");
    return e ? std::atoi(e) : 0;
  }();
  return v;
}
template <class F>
float hold_time_ms(event_timer& t, F&& fn) {
  if (hold_us() <= 0) return t.time_ms(fn);
  flush_l2(0);
  hold_kernel<<<1, 1>>>(static_cast<long long>(hold_us()) * 1000);
  return t.time_ms(fn, 0, false);  // (flush already queued, before the hold kernel)
}

float memcpy_ms(size_t bytes) {
  static std::map<size_t, float> cache;
  auto it = cache.find(bytes);
  if (it != cache.end()) return it->second;
  float ms = 0;
  if (hold_us() <= 0) {
    ms = time_memcpy_d2d(bytes, 21);
  } else {
    device_array<char> src(bytes), dst(bytes);
    PKV_BENCH_CHECK(cudaMemset(src.ptr, 1, bytes));
    event_timer t;
    auto cp = [&](cudaStream_t st) {
      PKV_BENCH_CHECK(cudaMemcpyAsync(dst.ptr, src.ptr, bytes, cudaMemcpyDeviceToDevice, st));
    };
    hold_time_ms(t, cp);
    std::vector<float> v(21);
    for (auto& x : v) x = hold_time_ms(t, cp);
    std::sort(v.begin(), v.end());
    ms = v[v.size() / 2];
  }
  cache[bytes] = ms;
  return ms;
}

void BM_compact(benchmark::State& state) {
  const int64_t T = state.range(0);
  const int64_t pct = state.range(1);
  const mode md = static_cast<mode>(state.range(2));
  const auto check = state.range(3) ? prefixkv::index_check::trusted : prefixkv::index_check::device;
  auto& tune = prefixkv::detail::compact_tune();
  tune = prefixkv::detail::compact_tuning{};
  tune.kernel = static_cast<int>(state.range(4));
  tune.resident = static_cast<int>(state.range(5));
  tune.chunk_rows = state.range(6);
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
      case contig_inplace: return prefixkv::compact_in_place(t, bytes, contig, sel, grid, {}, s, check);
      case contig_gather: return prefixkv::gather_kept(t, bytes, contig, outc, sel, grid, {}, s, check);
      case paged_inplace: return prefixkv::compact_in_place(t, bytes, paged, sel, grid, {}, s, check);
      default: return prefixkv::gather_kept(t, bytes, paged, outc, sel, grid, {}, s, check);
    }
  };
  size_t temp_bytes = 0;
  PKV_BENCH_CHECK(call(nullptr, temp_bytes, 0));
  device_array<char> temp(temp_bytes);
  auto run = [&](cudaStream_t s) { PKV_BENCH_CHECK(call(temp.ptr, temp_bytes, s)); };
  PKV_BENCH_CHECK(cudaDeviceSynchronize());

  event_timer timer;
  hold_time_ms(timer, run);  // warm-up
  std::vector<float> times;
  for (auto _ : state) {
    const float ms = hold_time_ms(timer, run);
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

// kernel: -1 = the library default; 0 = general move kernel; 1.. = fast kernel variants (compact_fast_pick).
// resident: 0 = default grid; k > 0 = persistent grid (blocks per SM x SMs), out of place cut in ~k x grid chunks.
// chunk_rows: -1 = default; 0 = out of place split in ~16 x SMs work items (grid <= 64 x SMs); r > 0 = out of
// place cut in chunks of ~r destination rows, one short-lived block each.
// PREFIXKV_BENCH_EXPLORE=1 registers the move-kernel variants (one process, same arena; device run 6 had three
// more fast variants, since removed) and every copy-kernel variant; the default set times the library default
// everywhere plus the out-of-place chunking variants.
void args(benchmark::internal::Benchmark* b) {
  const bool explore = std::getenv("PREFIXKV_BENCH_EXPLORE") != nullptr;
  struct variant {
    int64_t kernel, resident, chunk_rows;
  };
  std::vector<variant> variants = {{-1, 0, -1}, {-1, 0, 0}, {-1, 0, 128}, {-1, 0, 512}};
  if (explore) {
    variants = {{0, 0, 0}, {0, 4, 0}};
    for (int64_t v = 1; v <= prefixkv::detail::compact_fast_variants; ++v) variants.push_back({v, 0, 0});
    variants.push_back({1, 4, 0});
  }
  for (int64_t trusted : {0, 1})
    for (int64_t md : {0, 1, 2, 3})
      for (int64_t T : {4096, 32768, 131072})
        for (int64_t pct : {25, 50, 75})
          for (const auto& v : variants) {
            if (trusted && T != 4096) continue;  // the check kernel only matters for short caches
            if (explore && (T == 32768 || pct == 50)) continue;
            if (explore && trusted && v.kernel > 1) continue;
            const bool gather = md == contig_gather || md == paged_gather;
            if (!explore && v.chunk_rows != -1 && (!gather || trusted)) continue;
            b->Args({T, pct, md, trusted, v.kernel, v.resident, v.chunk_rows});
          }
  b->ArgNames({"tokens", "kept_pct", "mode", "trusted", "kernel", "resident", "chunk_rows"});
}

// Diagnostic: a plain 16-byte-vector copy kernel (no gather) against cudaMemcpyAsync of the same bytes, to split
// the gap into "kernel copy vs driver copy" and "gather overhead". U words in flight per thread, MinB blocks/SM,
// Hint as compact_load/compact_store; grid: 0 = persistent (MinB x SMs, grid-stride), 1 = one tile per block.
template <int U, int MinB, int Hint>
__global__ void __launch_bounds__(256, MinB) copy_kernel(const uint4* __restrict__ s, uint4* __restrict__ d, int64_t n) {
  constexpr int64_t tile = int64_t(256) * U;
  for (int64_t base = int64_t(blockIdx.x) * tile; base < n; base += int64_t(gridDim.x) * tile) {
    uint4 buf[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + u * 256 + threadIdx.x;
      if (i < n) buf[u] = prefixkv::detail::compact_load<uint4, Hint>(s + i);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + u * 256 + threadIdx.x;
      if (i < n) prefixkv::detail::compact_store<uint4, Hint>(d + i, buf[u]);
    }
  }
}

// One tile of the diagnostic copies: words [base, base + 256 U) below `end`, all loads of a thread before its
// stores, an optional block barrier in between (as in place).
template <int U, bool Bar>
__device__ __forceinline__ void copy_tile(const uint4* src, uint4* dst, int64_t base, int64_t end) {
  uint4 buf[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t i = base + u * 256 + threadIdx.x;
    if (i < end) buf[u] = src[i];
  }
  if (Bar) __syncthreads();
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t i = base + u * 256 + threadIdx.x;
    if (i < end) dst[i] = buf[u];
  }
}

// Diagnostic for the in-place gap: 512 independent streams (one block each, like the in-place kernel's one block
// per lane of a 32-layer x 8-head x K/V cache), each copying its own contiguous region in tiles of 256 x U words
// with all loads of a tile before its stores. Bar: a block barrier between the loads and the stores of a tile (as
// in place). Shift: the region's second half moves onto its first half within the source buffer (an in-place move,
// reads ahead of writes), instead of copying to the destination buffer.
template <int U, bool Bar, bool Shift>
__global__ void __launch_bounds__(256, 2) stream_copy_kernel(uint4* __restrict__ s, uint4* __restrict__ d, int64_t per) {
  uint4* src = s + int64_t(blockIdx.x) * per + (Shift ? per / 2 : 0);
  uint4* dst = Shift ? s + int64_t(blockIdx.x) * per : d + int64_t(blockIdx.x) * per;
  const int64_t n = Shift ? per / 2 : per;
  for (int64_t base = 0; base < n; base += int64_t(256) * U) copy_tile<U, Bar>(src, dst, base, n);
}

// Partition-camping check for the in-place gap: the 512 streams of stream_copy_kernel are 2^k words apart and move
// in lockstep, so at any moment all blocks touch addresses congruent modulo the stream size. Here stream b walks its
// tiles starting at tile (b * 37) mod tiles (wrapping around), so the blocks are spread over the regions' phases;
// everything else (tile size, one block per stream, optional barrier per tile) is stream_copy_kernel's.
template <bool Bar>
__global__ void __launch_bounds__(256, 2) stream_rot_kernel(const uint4* __restrict__ s, uint4* __restrict__ d,
                                                            int64_t per) {
  constexpr int U = 8;
  constexpr int64_t tile = int64_t(256) * U;
  const uint4* src = s + int64_t(blockIdx.x) * per;
  uint4* dst = d + int64_t(blockIdx.x) * per;
  const int64_t tiles = (per + tile - 1) / tile;
  const int64_t t0 = (int64_t(blockIdx.x) * 37) % tiles;
  for (int64_t k = 0; k < tiles; ++k) {
    copy_tile<U, Bar>(src, dst, ((t0 + k) % tiles) * tile, per);
  }
}

// The block's next ticket (thread 0 takes it, every thread gets it).
__device__ __forceinline__ int64_t take_ticket(unsigned* counter) {
  __shared__ int64_t next;
  if (threadIdx.x == 0) next = atomicAdd(counter, 1u);
  __syncthreads();
  const int64_t t = next;
  __syncthreads();
  return t;
}

// Load-balance checks: 2 x SMs long-lived blocks take tiles of 256 x 8 words from a ticket counter (one atomicAdd
// per tile; `counter` is a fresh zeroed word per launch) instead of a fixed grid stride, so faster SMs take more
// tiles. The streams go in groups of `group` consecutive ones, one group after the other, chunk-major inside a
// group (ticket t -> group t / (group x tiles), r = the rest; tile r / group of stream r % group), as an in-place
// kernel would order its (lane, chunk) work: group == streams is chunk-major over all streams (variants 19, 20),
// smaller groups keep the tiles in flight in about 2 x group regions (21-25: how many interleaved lanes an in-place
// kernel can afford). Rot: stream b's tiles rotated by b * 37, so that concurrent blocks are not at congruent
// addresses.
template <bool Rot>
__global__ void __launch_bounds__(256, 2) ticket_streams_kernel(const uint4* __restrict__ s, uint4* __restrict__ d,
                                                                int64_t per, int64_t streams, int64_t group,
                                                                unsigned* counter) {
  constexpr int U = 8;
  constexpr int64_t tile = int64_t(256) * U;
  const int64_t tiles = (per + tile - 1) / tile;
  for (;;) {
    const int64_t t = take_ticket(counter);
    if (t >= streams * tiles) return;
    const int64_t g = t / (group * tiles), r = t - g * group * tiles;
    const int64_t k = r / group, stream = g * group + (r - k * group);
    const int64_t base = stream * per + (Rot ? (k + stream * 37) % tiles : k) * tile;
    copy_tile<U, false>(s, d, base, stream * per + per);
  }
}

// The same 512 streams through a shared-memory ring of NS tiles filled with 16-byte cp.async copies, so that
// NS - 1 tiles of loads stay in flight while a tile is stored (no registers held by loads in flight). Each thread
// stores exactly the words it copied, so only the in-place case (Shift) needs the block barrier per tile.
template <int U, int NS, bool Shift>
__global__ void __launch_bounds__(256, 2) stream_pipe_kernel(uint4* __restrict__ s, uint4* __restrict__ d, int64_t per) {
  extern __shared__ uint4 ring[];  // [NS][256 * U]
  uint4* src = s + int64_t(blockIdx.x) * per + (Shift ? per / 2 : 0);
  uint4* dst = Shift ? s + int64_t(blockIdx.x) * per : d + int64_t(blockIdx.x) * per;
  const int64_t n = Shift ? per / 2 : per;
  constexpr int64_t tile = int64_t(256) * U;
  const int64_t tiles = (n + tile - 1) / tile;
  auto issue = [&](int64_t t) {
    if (t < tiles) {
      uint4* slot = ring + (t % NS) * tile;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t i = t * tile + u * 256 + threadIdx.x;
        if (i < n) {
          const unsigned sa = static_cast<unsigned>(__cvta_generic_to_shared(slot + u * 256 + threadIdx.x));
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sa), "l"(src + i) : "memory");
        }
      }
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
  };
  for (int t = 0; t < NS - 1; ++t) issue(t);
  for (int64_t t = 0; t < tiles; ++t) {
    asm volatile("cp.async.wait_group %0;" ::"n"(NS - 2) : "memory");
    if (Shift) __syncthreads();  // every thread's loads of tile t done before any store of it
    issue(t + NS - 1);           // into the slot of tile t - 1, whose words this thread stored already
    const uint4* slot = ring + (t % NS) * tile;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = t * tile + u * 256 + threadIdx.x;
      if (i < n) dst[i] = slot[u * 256 + threadIdx.x];
    }
  }
}

// One-shot blocks over the same 512 streams, interleaved: block b copies tile b / 512 of stream b % 512, so the
// resident blocks touch ~264 separate regions at any time, like the lanes, but each block lives for one tile.
__global__ void __launch_bounds__(256, 2) stream_oneshot_kernel(const uint4* __restrict__ s, uint4* __restrict__ d,
                                                                int64_t per) {
  constexpr int U = 8;
  const int64_t stream = blockIdx.x % 512, t = blockIdx.x / 512;
  const uint4* src = s + stream * per;
  uint4* dst = d + stream * per;
  uint4 buf[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t i = t * 256 * U + u * 256 + threadIdx.x;
    if (i < per) buf[u] = src[i];
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t i = t * 256 * U + u * 256 + threadIdx.x;
    if (i < per) dst[i] = buf[u];
  }
}

// 512 long-lived blocks over 512 / G streams, G blocks per stream (member m takes tiles m, m + G, ...), to split
// the in-place gap into "how many separate regions are in flight" and "block lifetime"; Sync: the G blocks of a
// stream form a cluster and meet at a cluster barrier between each round's loads and stores (what an in-place
// kernel with several blocks per lane in lockstep would need).
template <int G, bool Sync>
__global__ void __cluster_dims__(G, 1, 1) __launch_bounds__(256, 2)
    stream_group_kernel(const uint4* __restrict__ s, uint4* __restrict__ d, int64_t per) {
  constexpr int U = 8;
  constexpr int64_t tile = 256 * U;
  const int64_t stream = blockIdx.x / G, m = blockIdx.x % G;
  const uint4* src = s + stream * per;
  uint4* dst = d + stream * per;
  const int64_t tiles = (per + tile - 1) / tile, rounds = (tiles + G - 1) / G;
  for (int64_t r = 0; r < rounds; ++r) {
    uint4 buf[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = (r * G + m) * tile + u * 256 + threadIdx.x;
      if (i < per) buf[u] = src[i];
    }
    if (Sync) asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = (r * G + m) * tile + u * 256 + threadIdx.x;
      if (i < per) dst[i] = buf[u];
    }
  }
}

void BM_copy(benchmark::State& state) {
  const int64_t T = state.range(0), pct = state.range(1), v = state.range(2), one_shot = state.range(3);
  const size_t bytes = size_t(2 * L * B * H * (T * pct / 100) * D * sizeof(bf16));
  char* base = arena(2 * bytes);
  for (auto k : {stream_pipe_kernel<8, 3, false>, stream_pipe_kernel<8, 3, true>})
    PKV_BENCH_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, 3 * 256 * 8 * 16));
  const int64_t n = int64_t(bytes / 16);
  int sms = 0;
  PKV_BENCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  // variants 18-25: one zeroed counter word per launch (words are not reused: a used one would end the copy at once)
  constexpr int64_t ticket_words = 65536;
  static unsigned* tickets = nullptr;
  static int64_t launches = 0;
  if (v >= 18 && tickets == nullptr) {
    PKV_BENCH_CHECK(cudaMalloc(&tickets, ticket_words * sizeof(unsigned)));
    PKV_BENCH_CHECK(cudaMemset(tickets, 0, ticket_words * sizeof(unsigned)));
  }
  auto next_ticket = [&]() -> unsigned* {
    if (launches >= ticket_words) {
      std::fprintf(stderr, "BM_copy: more than %lld ticket-copy launches in one process\n", (long long)ticket_words);
      std::exit(1);
    }
    return tickets + launches++;
  };
  auto launch = [&](cudaStream_t st) {
    const auto* s = reinterpret_cast<const uint4*>(base);
    auto* d = reinterpret_cast<uint4*>(base + bytes);
    auto grid = [&](int u, int per_sm) {
      const int64_t tiles = (n + 256 * u - 1) / (256 * u);
      return static_cast<unsigned>(one_shot ? tiles : std::min<int64_t>(tiles, int64_t(per_sm) * sms));
    };
    switch (v) {
      case 0: copy_kernel<8, 2, 3><<<grid(8, 2), 256, 0, st>>>(s, d, n); break;
      case 1: copy_kernel<8, 2, 0><<<grid(8, 2), 256, 0, st>>>(s, d, n); break;
      case 2: copy_kernel<16, 2, 3><<<grid(16, 2), 256, 0, st>>>(s, d, n); break;
      case 3: copy_kernel<4, 4, 3><<<grid(4, 4), 256, 0, st>>>(s, d, n); break;
      case 4: copy_kernel<4, 8, 0><<<grid(4, 8), 256, 0, st>>>(s, d, n); break;
      // 512 streams (n / 512 words each; the moved bytes are n words, as above, except Shift: n / 2)
      case 5: stream_copy_kernel<8, false, false><<<512, 256, 0, st>>>(const_cast<uint4*>(s), d, n / 512); break;
      case 6: stream_copy_kernel<8, true, false><<<512, 256, 0, st>>>(const_cast<uint4*>(s), d, n / 512); break;
      case 7: stream_copy_kernel<8, true, true><<<512, 256, 0, st>>>(const_cast<uint4*>(s), d, n / 512); break;
      case 8: stream_pipe_kernel<8, 3, false><<<512, 256, 3 * 256 * 8 * 16, st>>>(const_cast<uint4*>(s), d, n / 512); break;
      case 9: stream_pipe_kernel<8, 3, true><<<512, 256, 3 * 256 * 8 * 16, st>>>(const_cast<uint4*>(s), d, n / 512); break;
      // 512 long-lived blocks over fewer streams (the moved bytes are n words)
      case 11: stream_group_kernel<8, false><<<512, 256, 0, st>>>(s, d, n / 64); break;
      case 12: stream_group_kernel<8, true><<<512, 256, 0, st>>>(s, d, n / 64); break;
      case 13: stream_group_kernel<4, true><<<512, 256, 0, st>>>(s, d, n / 128); break;
      case 14: stream_group_kernel<2, true><<<512, 256, 0, st>>>(s, d, n / 256); break;
      case 15: stream_group_kernel<4, false><<<512, 256, 0, st>>>(s, d, n / 128); break;
      // 512 long-lived streams with rotated tile order (partition-camping check)
      case 16: stream_rot_kernel<false><<<512, 256, 0, st>>>(s, d, n / 512); break;
      case 17: stream_rot_kernel<true><<<512, 256, 0, st>>>(s, d, n / 512); break;
      case 18: ticket_streams_kernel<false><<<2 * sms, 256, 0, st>>>(s, d, n, 1, 1, next_ticket()); break;
      case 19: ticket_streams_kernel<false><<<2 * sms, 256, 0, st>>>(s, d, n / 512, 512, 512, next_ticket()); break;
      case 20: ticket_streams_kernel<true><<<2 * sms, 256, 0, st>>>(s, d, n / 512, 512, 512, next_ticket()); break;
      case 21: ticket_streams_kernel<false><<<2 * sms, 256, 0, st>>>(s, d, n / 512, 512, 8, next_ticket()); break;
      case 22: ticket_streams_kernel<false><<<2 * sms, 256, 0, st>>>(s, d, n / 512, 512, 16, next_ticket()); break;
      case 23: ticket_streams_kernel<false><<<2 * sms, 256, 0, st>>>(s, d, n / 512, 512, 32, next_ticket()); break;
      case 24: ticket_streams_kernel<false><<<2 * sms, 256, 0, st>>>(s, d, n / 512, 512, 64, next_ticket()); break;
      case 25: ticket_streams_kernel<false><<<2 * sms, 256, 0, st>>>(s, d, n / 512, 512, 128, next_ticket()); break;
      default: {
        const int64_t per = n / 512, tiles = (per + 2047) / 2048;  // variant 10
        stream_oneshot_kernel<<<static_cast<unsigned>(512 * tiles), 256, 0, st>>>(s, d, per);
        break;
      }
    }
    PKV_BENCH_CHECK(cudaGetLastError());
  };
  event_timer timer;
  hold_time_ms(timer, launch);
  std::vector<float> times;
  for (auto _ : state) {
    const float ms = hold_time_ms(timer, launch);
    state.SetIterationTime(ms / 1e3);
    times.push_back(ms);
  }
  std::sort(times.begin(), times.end());
  const float med = times[times.size() / 2];
  const size_t moved = v == 7 || v == 9 ? bytes / 2 : bytes;  // Shift moves half of each region
  const float base_ms = memcpy_ms(moved);
  state.counters["median_ms"] = med;
  state.counters["memcpy_ms"] = base_ms;
  state.counters["GBps"] = 2.0 * moved / (med * 1e6);
  state.counters["ratio"] = med > 0 ? base_ms / med : 0;
}

void copy_args(benchmark::internal::Benchmark* b) {
  const bool explore = std::getenv("PREFIXKV_BENCH_EXPLORE") != nullptr;
  for (int64_t T : {4096, 131072})
    for (int64_t pct : {25, 75})
      for (int64_t v = 0; v < 26; ++v)
        for (int64_t one_shot : {0, 1})
          if ((explore || v == 0 || v == 1 || v >= 5) && !(v >= 5 && one_shot)) b->Args({T, pct, v, one_shot});
  b->ArgNames({"tokens", "kept_pct", "copy_variant", "one_shot"});
}

}  // namespace

BENCHMARK(BM_compact)->Apply(args)->UseManualTime()->Iterations(15)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_copy)->Apply(copy_args)->UseManualTime()->Iterations(15)->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
