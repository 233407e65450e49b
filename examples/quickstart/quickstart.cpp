// prefixkv quick start, host backend: compress a 4-layer cache to half its tokens with the paper's scorer (accumulated
// attention) and one global threshold. Build: part of the examples (build/bin/prefixkv_quickstart), or
//   g++ -std=c++17 -I include examples/quickstart/quickstart.cpp
#include <prefixkv/prefixkv.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main() {
  const int64_t L = 4, Hq = 8, H = 2, D = 64, T = 256;  // layers, query / kv heads, head dim, prompt tokens
  // A toy model's prefill: per layer K, V as [1, H, T, D] and attention probabilities as [1, Hq, T, T].
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::vector<std::vector<float>> k(L, std::vector<float>(H * T * D)), v = k, p(L, std::vector<float>(Hq * T * T));
  for (auto* x : {&k, &v})
    for (auto& layer : *x)
      for (auto& e : layer) e = u(rng);
  for (int64_t l = 0; l < L; ++l)  // deeper layers attend to fewer tokens
    for (size_t i = 0; i < p[l].size(); ++i) p[l][i] = u(rng) * std::pow(float(i % T % 17) / 16.0f, float(3 * l));
  std::vector<prefixkv::kv_view<float>> kv, vv;
  std::vector<prefixkv::kv_view<const float>> pv;
  for (int64_t l = 0; l < L; ++l) {
    kv.push_back(prefixkv::make_kv_view_bhsd(k[l].data(), 1, H, T, D));
    vv.push_back(prefixkv::make_kv_view_bhsd(v[l].data(), 1, H, T, D));
    pv.push_back(prefixkv::make_kv_view_bhsd<const float>(p[l].data(), 1, Hq, T, T));
  }
  const int32_t tokens = T;
  std::vector<int32_t> new_len(L);

  // [quickstart-host]
  prefixkv::compress_config cfg;  // the model and the policy, once
  cfg.layers = L, cfg.q_heads = Hq, cfg.kv_heads = H, cfg.head_dim = D, cfg.max_tokens = T;
  cfg.scorer = prefixkv::scorer_kind::attention;  // the paper's score
  cfg.evict_ratio = 0.5;                            // evict half of the tokens, 4 sinks + 1 recent kept
  prefixkv::compress_plan plan;
  if (prefixkv::make_plan(cfg, plan) != cudaSuccess) return std::puts(prefixkv::last_error().message), 1;

  prefixkv::compress_args<prefixkv::kv_layers<float>, float> args;  // one call: every layer, in place
  args.cache = {kv.data(), vv.data(), nullptr, nullptr, L};
  args.lengths = &tokens;                // tokens per sequence before the call
  args.attention = pv.data();            // the scorer's input, per layer
  args.out.lengths = new_len.data();     // tokens per layer after the call
  if (prefixkv::compress_host(plan, args) != cudaSuccess) return std::puts(prefixkv::last_error().message), 1;
  // [quickstart-host]

  std::printf("tokens kept per layer:");
  for (int32_t n : new_len) std::printf(" %d", n);
  std::printf(" (of %d each)\n", tokens);
  return 0;
}
