// prefixkv demo: compress the KV cache of a real pretrained model (stories260K, a tiny LLaMA with grouped-query
// attention) with PrefixKV, and show what happened.
//
//   prefixkv_demo [--model DIR] [--prompt-tokens N] [--evict-ratio R] [--continue N]
//
// 1. prefill: the model writes its story from BOS for N tokens, recording every layer's attention probabilities;
// 2. compress: one call of the compressor (`compress_host`) scores every cached token per layer (accumulated
//    attention, the paper's scorer), builds the curves (sinks 4 / recent 1 protected), solves one global threshold
//    meeting the evict ratio exactly, and compacts every layer's K and V in place to its own length;
// 3. continue generating from the compressed cache and from the full one, and compare.
// Built as CUDA (demo_gpu.cu) it also runs the compressor on the GPU (`compress`) and checks that it writes
// byte-identical caches.
#include <prefixkv/prefixkv.hpp>

#include "tiny_llama.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// The bundled model (models/stories260K); CMake passes its absolute path, so the demo runs from any directory.
#ifndef PREFIXKV_DEMO_MODEL_DIR
#define PREFIXKV_DEMO_MODEL_DIR "models/stories260K"
#endif

namespace {

struct options {
  std::string model_dir = PREFIXKV_DEMO_MODEL_DIR;
  int prompt_tokens = 256;
  double evict_ratio = 0.5;
  int continue_tokens = 64;
};

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

[[noreturn]] void die(const std::string& why) {
  std::fprintf(stderr, "prefixkv_demo: %s\n", why.c_str());
  std::exit(2);
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) die(std::string(what) + ": " + prefixkv::last_error().message);
}

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) die("missing value after " + a);
      return argv[++i];
    };
    if (a == "--model") o.model_dir = value();
    else if (a == "--prompt-tokens") o.prompt_tokens = std::atoi(value().c_str());
    else if (a == "--evict-ratio") o.evict_ratio = std::atof(value().c_str());
    else if (a == "--continue") o.continue_tokens = std::atoi(value().c_str());
    else die("unknown option " + a + " (see the header of examples/demo.cpp)");
  }
  if (o.prompt_tokens < 8) die("--prompt-tokens must be at least 8");
  if (!(o.evict_ratio >= 0.0 && o.evict_ratio < 1.0)) die("--evict-ratio must be in [0, 1)");
  if (o.continue_tokens < 0) die("--continue must be >= 0");
  return o;
}

// Greedy continuation from `cache` (modified), starting with `token` at position `pos`.
std::vector<int> generate(tiny_llama::model& m, tiny_llama::kv_cache& cache, int token, int pos, int n) {
  std::vector<int> out;
  for (int i = 0; i < n; ++i) {
    token = tiny_llama::model::argmax(m.forward(token, pos + i, cache));
    out.push_back(token);
  }
  return out;
}

std::string text(const tiny_llama::tokenizer& tk, int prev, const std::vector<int>& toks) {
  std::string s;
  for (int t : toks) {
    s += tk.piece(prev, t);
    prev = t;
  }
  for (auto& c : s)
    if (c == '\n') c = ' ';
  return s;
}

}  // namespace

#if defined(PREFIXKV_DEMO_GPU)
#include "demo_gpu_pipeline.cuh"
#endif

int main(int argc, char** argv) {
  const options opt = parse(argc, argv);
  tiny_llama::model m;
  tiny_llama::tokenizer tk;
  std::string err;
  if (!m.load(opt.model_dir + "/stories260K.bin", err)) die(err);
  if (!tk.load(opt.model_dir + "/tok512.bin", m.cfg().vocab_size, err)) die(err);
  const auto& c = m.cfg();
  const int T = std::min(opt.prompt_tokens, c.seq_len - opt.continue_tokens - 1);
  const int L = c.n_layers, Hq = c.n_heads, Hkv = c.n_kv_heads, hs = c.head_size();
  std::printf("model: stories260K (%d layers, %d query / %d KV heads, head size %d), prompt %d tokens\n", L, Hq, Hkv,
              hs, T);

  // ---- 1. prefill, recording attention probabilities P (layer) (1, q_head, query, key) ---------------------------
  tiny_llama::kv_cache cache;
  cache.init(c, T + opt.continue_tokens + 1);
  std::vector<std::vector<float>> P(L, std::vector<float>(size_t(Hq) * T * T, 0.f));
  std::vector<std::vector<float>> probs;
  std::vector<int> prompt;
  int token = 1;  // BOS
  auto t0 = std::chrono::steady_clock::now();
  for (int q = 0; q < T; ++q) {
    const auto& logits = m.forward(token, q, cache, &probs);
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < Hq; ++h)
        std::memcpy(&P[l][(size_t(h) * T + q) * T], &probs[l][size_t(h) * (q + 1)], sizeof(float) * (q + 1));
    token = tiny_llama::model::argmax(logits);
    prompt.push_back(token);
  }
  const double prefill_ms = ms_since(t0);
  const int next_token = prompt.back();
  prompt.pop_back();  // the last sampled token is fed at position T by the continuation
  std::printf("prompt: \"%.160s...\"\n", text(tk, 1, prompt).c_str());

  tiny_llama::kv_cache full = cache;  // uncompressed copy for the comparison
  const size_t bytes_before = cache.bytes();

  // ---- 2-5. the compressor: score, curve, solve, select and compact every layer in one call --------------------
  const prefixkv::protect_policy protect{4, 1};
  prefixkv::compress_config cfg;
  cfg.layers = L, cfg.q_heads = Hq, cfg.kv_heads = Hkv, cfg.head_dim = hs, cfg.max_tokens = T;
  cfg.scorer = prefixkv::scorer_kind::attention;  // the paper's accumulated attention
  cfg.evict_ratio = opt.evict_ratio;
  cfg.protect = protect;
  prefixkv::compress_plan plan;
  check(prefixkv::make_plan(cfg, plan), "plan");
  std::vector<prefixkv::kv_view<float>> kv(L), vv(L);
  std::vector<prefixkv::kv_view<const float>> pv(L);
  for (int l = 0; l < L; ++l) {
    kv[l] = prefixkv::make_kv_view_bhsd(cache.k[l].data(), 1, Hkv, T, hs, cache.capacity);
    vv[l] = prefixkv::make_kv_view_bhsd(cache.v[l].data(), 1, Hkv, T, hs, cache.capacity);
    pv[l] = prefixkv::make_kv_view_bhsd(static_cast<const float*>(P[l].data()), 1, Hq, T, T);
  }
  const int32_t tokens = T;
  std::vector<int32_t> new_len(L);
  float threshold = 0.f;
  prefixkv::compress_args<prefixkv::kv_layers<float>, float> args;
  args.cache = {kv.data(), vv.data(), nullptr, nullptr, L};
  args.lengths = &tokens;
  args.attention = pv.data();
  args.out.lengths = new_len.data();
  args.out.threshold = &threshold;
  t0 = std::chrono::steady_clock::now();
  check(prefixkv::compress_host(plan, args), "compress");
  const double compress_ms = ms_since(t0);
  std::vector<int64_t> keep(new_len.begin(), new_len.end());
  for (int l = 0; l < L; ++l) cache.length[l] = new_len[l];
  const size_t bytes_after = cache.bytes();

  std::printf("\nPrefixKV, evict ratio %.2f, global threshold p = %.4f (host backend)\n", opt.evict_ratio, threshold);
  std::printf("  layer  tokens  kept  evicted  kept%%\n");
  for (int l = 0; l < L; ++l)
    std::printf("  %5d  %6d  %4lld  %7lld  %5.1f\n", l, T, (long long)keep[l], (long long)(T - keep[l]),
                100.0 * double(keep[l]) / T);
  std::printf("  KV bytes: %zu -> %zu (%.1f%% of the original)\n", bytes_before, bytes_after,
              100.0 * double(bytes_after) / double(bytes_before));
  std::printf("  time (ms): prefill %.1f | compress (score, curve, solve, select, compact) %.3f\n", prefill_ms,
              compress_ms);

#if defined(PREFIXKV_DEMO_GPU)
  run_gpu_pipeline(P, T, Hq, Hkv, hs, full, cache, keep, plan);
#endif

  // ---- 6. continue from both caches ------------------------------------------------------------------------------
  if (opt.continue_tokens > 0) {
    const auto a = generate(m, full, next_token, T, opt.continue_tokens);
    const auto b = generate(m, cache, next_token, T, opt.continue_tokens);
    int same = 0;
    while (same < int(a.size()) && a[same] == b[same]) ++same;
    std::printf("\ncontinuation, full cache:       \"%s\"\n", text(tk, next_token, a).c_str());
    std::printf("continuation, compressed cache: \"%s\"\n", text(tk, next_token, b).c_str());
    std::printf("identical for the first %d of %d tokens\n", same, int(a.size()));
  }
  return 0;
}
