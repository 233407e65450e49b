// Decode-time budget upkeep (prefixkv::decode_step): cost per generated token against a full copy of the cache per
// token (the paper's code rebuilds every layer's K/V with torch.cat at every step), timed in the same process.
//
// Shape: Llama-3-8B (32 layers, 32 query / 8 kv heads, head_dim 128, bf16), batch 8, every sequence has seen 32K
// tokens; the prefill kept a layer-adaptive share of them: layer l keeps 0.3 + 0.4 l / 31 of its tokens (mean 0.5,
// ~16K rows per layer and sequence, ~16 GB of K/V), [B, H, S, D] per layer with room for 24K rows.
//
// BM_decode/policy/slack/observe: `steps` consecutive decode_step calls (all layers and sequences each, eager
// launches), after decode_init (untimed); per-token time = total / steps. policy 0 = fixed_position (the paper's
// row, no observation), 1 = score (reuse order), 2 = score (preserve order), 3 = amortised with slack m.
// observe 1: each step reads this step's attention probabilities (8 x 32 x 1 x 24K bf16 per layer, 400 MB per step,
// what the score and amortised policies need from the runtime); observe 0: none (the upkeep alone).
// Steps: 256, or 4 (m + 1) for the amortised policy (four compressions).
//
// Counters: us_per_token (median over repetitions), copy_us = one cudaMemcpyAsync D2D of the live cache (the bytes
// torch.cat copies per step; cold L2, median, same process), speedup = copy_us / us_per_token, live_GB.
#include <prefixkv/decode/decode.cuh>

#include "support/bench_util.cuh"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using namespace prefixkv_bench;
namespace pk = prefixkv;

constexpr int64_t L = 32, Hq = 32, Hk = 8, D = 128, B = 8, N0 = 32768, CAP = 24576;

__global__ void fill_bf16(pk::bf16* p, size_t n, float a, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    p[i] = pk::bf16::from_float(a * float(h & 0xFFFF) / 65536.0f);
  }
}

int64_t kept_of(int64_t l) { return int64_t(std::llround((0.3 + 0.4 * double(l) / double(L - 1)) * double(N0))); }

struct setup {
  device_array<pk::bf16> k, v, p;
  std::vector<pk::kv_view<pk::bf16>> kv, vv;
  std::vector<pk::kv_view<const pk::bf16>> pv;
  device_array<int32_t> init_len, init_seen;
  size_t live_bytes = 0;
  setup()
      : k(size_t(L) * B * Hk * CAP * D), v(size_t(L) * B * Hk * CAP * D), p(size_t(L) * B * Hq * CAP),
        init_len(size_t(L) * B), init_seen(size_t(B)) {
    fill_bf16<<<4096, 256>>>(k.ptr, k.n, 1.0f, 1);
    fill_bf16<<<4096, 256>>>(v.ptr, v.n, 1.0f, 2);
    fill_bf16<<<4096, 256>>>(p.ptr, p.n, 2.0f / float(N0 / 2), 3);  // rows summing to about 1
    PKV_BENCH_CHECK(cudaGetLastError());
    const size_t per = size_t(B) * Hk * CAP * D;
    for (int64_t l = 0; l < L; ++l) {
      kv.push_back(pk::make_kv_view_bhsd(k.ptr + l * per, B, Hk, CAP, D));
      vv.push_back(pk::make_kv_view_bhsd(v.ptr + l * per, B, Hk, CAP, D));
      pv.push_back(pk::make_kv_view_bhsd<const pk::bf16>(p.ptr + l * size_t(B) * Hq * CAP, B, Hq, 1, CAP));
    }
    std::vector<int32_t> len(static_cast<size_t>(L * B)), seen(static_cast<size_t>(B), static_cast<int32_t>(N0));
    for (int64_t l = 0; l < L; ++l)
      for (int64_t b = 0; b < B; ++b) {
        len[l * B + b] = int32_t(kept_of(l));
        live_bytes += size_t(kept_of(l)) * Hk * D * 2 * 2;  // K and V rows
      }
    PKV_BENCH_CHECK(cudaMemcpy(init_len.ptr, len.data(), len.size() * 4, cudaMemcpyHostToDevice));
    PKV_BENCH_CHECK(cudaMemcpy(init_seen.ptr, seen.data(), seen.size() * 4, cudaMemcpyHostToDevice));
    PKV_BENCH_CHECK(cudaDeviceSynchronize());
  }
  pk::kv_layers<pk::bf16> cache() const { return {kv.data(), vv.data(), nullptr, nullptr, L}; }
};

setup& shared_setup() {
  static setup* s = new setup();
  return *s;
}

//! One cudaMemcpyAsync D2D of the live cache (what torch.cat copies at every step), from the cache buffer.
float copy_us(setup& s) {
  static float cached = -1.0f;
  if (cached >= 0.0f) return cached;
  device_array<char> dst(s.live_bytes);
  const char* src = reinterpret_cast<const char*>(s.k.ptr);  // (the K and V buffers hold more than the live bytes)
  const size_t half = s.live_bytes / 2;
  cached = 1e3f * median_ms([&](cudaStream_t st) {
    PKV_BENCH_CHECK(cudaMemcpyAsync(dst.ptr, src, half, cudaMemcpyDeviceToDevice, st));
    PKV_BENCH_CHECK(cudaMemcpyAsync(dst.ptr + half, reinterpret_cast<const char*>(s.v.ptr), s.live_bytes - half,
                                    cudaMemcpyDeviceToDevice, st));
  }, 9);
  return cached;
}

void BM_decode(benchmark::State& state) {
  const int policy = int(state.range(0));
  const int64_t slack = state.range(1);
  const bool observe = state.range(2) != 0;
  setup& s = shared_setup();
  pk::decode_config cfg;
  cfg.layers = L;
  cfg.q_heads = Hq;
  cfg.kv_heads = Hk;
  cfg.head_dim = D;
  cfg.max_batch = B;
  cfg.max_tokens = CAP;
  cfg.protect = {4, 32};
  cfg.policy = policy == 0 ? pk::decode_policy::fixed_position
                           : (policy == 3 ? pk::decode_policy::amortised : pk::decode_policy::score);
  cfg.order = policy == 2 ? pk::decode_order::preserve : pk::decode_order::reuse;
  cfg.slack = slack;
  pk::decode_plan plan;
  PKV_BENCH_CHECK(pk::make_plan(cfg, plan));
  size_t state_bytes = 0, ws_bytes = 0, init_bytes = 0;
  PKV_BENCH_CHECK(pk::decode_state_bytes(plan, state_bytes));
  device_array<char> mem(state_bytes);
  pk::decode_state st;
  PKV_BENCH_CHECK(pk::decode_state_bind(plan, mem.ptr, state_bytes, st));
  pk::decode_init_args ia;
  ia.batch = B;
  ia.lengths = s.init_len.ptr;
  ia.lengths_per_segment = true;
  ia.seen = s.init_seen.ptr;
  pk::decode_step_args<pk::kv_layers<pk::bf16>> a;
  a.cache = s.cache();
  a.observe = observe && policy != 0 ? pk::decode_observe::attention : pk::decode_observe::none;
  a.attention = s.pv.data();
  PKV_BENCH_CHECK(pk::decode_step(nullptr, ws_bytes, plan, st, a));
  PKV_BENCH_CHECK(pk::decode_init(nullptr, init_bytes, plan, st, ia));
  device_array<char> ws(ws_bytes), iws(init_bytes);
  const int64_t steps = policy == 3 ? 4 * (slack + 1) : 256;
  event_timer t;
  std::vector<float> per_token;
  auto run = [&] {
    PKV_BENCH_CHECK(pk::decode_init(iws.ptr, init_bytes, plan, st, ia));
    PKV_BENCH_CHECK(cudaDeviceSynchronize());
    return t.time_ms([&](cudaStream_t stream) {
      for (int64_t i = 0; i < steps; ++i) PKV_BENCH_CHECK(pk::decode_step(ws.ptr, ws_bytes, plan, st, a, stream));
    });
  };
  run();  // warm-up
  for (auto _ : state) {
    const float ms = run();
    state.SetIterationTime(ms / 1e3);
    per_token.push_back(1e3f * ms / float(steps));
  }
  int32_t status = -1;
  PKV_BENCH_CHECK(cudaMemcpy(&status, st.status, 4, cudaMemcpyDeviceToHost));
  if (status != 0) state.SkipWithError("the decode state reported a status");
  std::sort(per_token.begin(), per_token.end());
  const float us = per_token.empty() ? 0.0f : per_token[per_token.size() / 2];
  const float cp = copy_us(s);
  state.counters["us_per_token"] = us;
  state.counters["copy_us"] = cp;
  state.counters["speedup"] = us > 0 ? cp / us : 0.0;
  state.counters["live_GB"] = double(s.live_bytes) / 1e9;
  state.counters["steps"] = double(steps);
}

}  // namespace

BENCHMARK(BM_decode)
    ->ArgNames({"policy", "slack", "observe"})
    ->Args({0, 0, 0})
    ->Args({1, 0, 0})
    ->Args({1, 0, 1})
    ->Args({2, 0, 1})
    ->Args({3, 16, 0})
    ->Args({3, 64, 0})
    ->Args({3, 256, 0})
    ->Args({3, 16, 1})
    ->Args({3, 64, 1})
    ->Args({3, 256, 1})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(3)
    ->Repetitions(3)
    ->ReportAggregatesOnly(true);

BENCHMARK_MAIN();
