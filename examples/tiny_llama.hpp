// The demo's view of the prefixkv-llama runtime (examples/llama/): a model whose `forward` appends one token to a
// per-layer KV cache in the Hugging Face layout (kv_head, token, dim), whose length may differ per layer after
// compression, and can record the attention probabilities of every query head so that importance scores can be
// computed from them. The forward pass itself is `prefixkv_llama::cpu_forward`, shared with prefixkv-llama.
#pragma once

#include "llama/cpu_backend.hpp"
#include "llama/model.hpp"
#include "llama/tokenizer.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

namespace tiny_llama {

using config = prefixkv_llama::config;
using tokenizer = prefixkv_llama::tokenizer;

//! Per-layer cache: keys and values stored (kv_head, capacity, head_size); `length[l]` valid tokens (the same for
//! every kv head of a layer).
struct kv_cache {
  int layers = 0, kv_heads = 0, capacity = 0, head_size = 0;
  std::vector<std::vector<float>> k, v;
  std::vector<int64_t> length;
  void init(const config& c, int cap) {
    layers = c.n_layers;
    kv_heads = c.n_kv_heads;
    capacity = cap;
    head_size = c.head_size();
    k.assign(layers, std::vector<float>(size_t(kv_heads) * cap * head_size, 0.f));
    v = k;
    length.assign(layers, 0);
  }
  float* key(int l, int h, int64_t t) { return k[l].data() + (size_t(h) * capacity + t) * head_size; }
  float* value(int l, int h, int64_t t) { return v[l].data() + (size_t(h) * capacity + t) * head_size; }
  size_t bytes() const {
    size_t n = 0;
    for (auto x : length) n += size_t(x) * kv_heads * head_size * sizeof(float) * 2;
    return n;
  }
};

class model {
 public:
  model() = default;
  model(const model&) = delete;
  model& operator=(const model&) = delete;

  bool load(const std::string& path, std::string& err) {
    fwd_.reset();
    if (!prefixkv_llama::load_checkpoint(path, m_, err)) return false;
    fwd_.reset(new prefixkv_llama::cpu_forward(m_));
    return true;
  }
  const config& cfg() const { return m_.cfg; }

  //! One token at absolute position `pos`; appends its K/V to every layer of `cache`. If `probs` is given,
  //! probs[l] receives the attention probabilities of every query head over layer l's cached tokens
  //! (n_heads x length[l] after the append). Returns the logits; aborts if a layer's cache is full.
  const std::vector<float>& forward(int token, int pos, kv_cache& cache, std::vector<std::vector<float>>* probs = nullptr) {
    const config& c = m_.cfg;
    lens_.resize(size_t(c.n_layers) * c.n_kv_heads);
    refs_.resize(c.n_layers);
    for (int l = 0; l < c.n_layers; ++l) {
      for (int h = 0; h < c.n_kv_heads; ++h) lens_[size_t(l) * c.n_kv_heads + h] = int32_t(cache.length[l]);
      refs_[l] = prefixkv_llama::layer_cache_ref{cache.k[l].data(), cache.v[l].data(), cache.capacity,
                                                 lens_.data() + size_t(l) * c.n_kv_heads};
    }
    if (probs) probs->resize(c.n_layers);
    const float* out = fwd_->run(
        token, pos, refs_.data(),
        [&](int l, int h, const float* p, int64_t n) {
          if (!probs) return;
          auto& row = (*probs)[l];
          if (h == 0) row.assign(size_t(c.n_heads) * n, 0.f);
          std::copy(p, p + n, row.begin() + size_t(h) * n);
        },
        [](int, const float*) {});
    if (!out) std::abort();
    for (int l = 0; l < c.n_layers; ++l) cache.length[l] = lens_[size_t(l) * c.n_kv_heads];
    logits_.assign(out, out + c.vocab_size);
    return logits_;
  }

  static int argmax(const std::vector<float>& v) {
    int best = 0;
    for (int i = 1; i < int(v.size()); ++i)
      if (v[i] > v[best]) best = i;
    return best;
  }

 private:
  prefixkv_llama::model m_;
  std::unique_ptr<prefixkv_llama::cpu_forward> fwd_;
  std::vector<int32_t> lens_;
  std::vector<prefixkv_llama::layer_cache_ref> refs_;
  std::vector<float> logits_;
};

}  // namespace tiny_llama
