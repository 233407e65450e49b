// A small CPU implementation of the LLaMA forward pass for llama2.c checkpoints (e.g. stories260K), written for
// prefixkv's examples: it keeps a per-layer KV cache in the Hugging Face layout (kv_head, token, dim) whose
// length may differ per layer after compression, and it can record the attention probabilities of a prefill so
// that importance scores can be computed from them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace tiny_llama {

struct config {
  int dim = 0, hidden_dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, vocab_size = 0, seq_len = 0;
  int head_size() const { return dim / n_heads; }
  int kv_dim() const { return head_size() * n_kv_heads; }
};

struct weights {
  std::vector<float> data;
  const float *emb, *rms_att, *wq, *wk, *wv, *wo, *rms_ffn, *w1, *w2, *w3, *rms_final, *wcls;
};

//! Per-layer cache: keys and values stored (kv_head, capacity, head_size); `length[l]` valid tokens.
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
  bool load(const std::string& path, std::string& err) {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) return err = "cannot open " + path, false;
    int32_t h[7];
    if (std::fread(h, sizeof(h), 1, f) != 1) return std::fclose(f), err = "short header", false;
    cfg_ = {h[0], h[1], h[2], h[3], h[4], h[5] < 0 ? -h[5] : h[5], h[6]};
    const bool shared = h[5] > 0;
    if (cfg_.dim <= 0 || cfg_.n_heads <= 0 || cfg_.n_kv_heads <= 0 || cfg_.dim % cfg_.n_heads ||
        cfg_.n_heads % cfg_.n_kv_heads || cfg_.n_layers <= 0 || cfg_.seq_len <= 0)
      return std::fclose(f), err = "bad header", false;
    std::fseek(f, 0, SEEK_END);
    const long bytes = std::ftell(f) - long(sizeof(h));
    std::fseek(f, sizeof(h), SEEK_SET);
    w_.data.resize(size_t(bytes) / sizeof(float));
    if (std::fread(w_.data.data(), sizeof(float), w_.data.size(), f) != w_.data.size())
      return std::fclose(f), err = "short weights", false;
    std::fclose(f);
    const size_t L = cfg_.n_layers, D = cfg_.dim, KV = cfg_.kv_dim(), H = cfg_.hidden_dim, hs = cfg_.head_size();
    const size_t need = size_t(cfg_.vocab_size) * D + L * D * 2 + L * D * D * 2 + L * D * KV * 2 + L * H * D * 3 + D +
                        size_t(cfg_.seq_len) * hs + (shared ? 0 : size_t(cfg_.vocab_size) * D);
    if (w_.data.size() < need) return err = "weights smaller than the header says", false;
    const float* p = w_.data.data();
    auto take = [&](size_t n) { const float* q = p; p += n; return q; };
    w_.emb = take(size_t(cfg_.vocab_size) * D);
    w_.rms_att = take(L * D);
    w_.wq = take(L * D * D);
    w_.wk = take(L * D * KV);
    w_.wv = take(L * D * KV);
    w_.wo = take(L * D * D);
    w_.rms_ffn = take(L * D);
    w_.w1 = take(L * H * D);
    w_.w2 = take(L * D * H);
    w_.w3 = take(L * H * D);
    w_.rms_final = take(D);
    take(size_t(cfg_.seq_len) * hs);  // legacy RoPE tables, unused
    w_.wcls = shared ? w_.emb : take(size_t(cfg_.vocab_size) * D);
    return true;
  }

  const config& cfg() const { return cfg_; }

  //! One token at absolute position `pos`; appends its K/V to every layer of `cache`. If `probs` is given,
  //! probs[l] receives the attention probabilities of every query head over layer l's cached tokens
  //! (n_heads x length[l] after the append). Returns the logits.
  const std::vector<float>& forward(int token, int pos, kv_cache& cache, std::vector<std::vector<float>>* probs = nullptr) {
    const int D = cfg_.dim, KV = cfg_.kv_dim(), hs = cfg_.head_size(), H = cfg_.hidden_dim;
    const int group = cfg_.n_heads / cfg_.n_kv_heads;
    x_.assign(w_.emb + size_t(token) * D, w_.emb + size_t(token + 1) * D);
    xb_.resize(D), xb2_.resize(D), q_.resize(D), k_.resize(KV), v_.resize(KV), hb_.resize(H), hb2_.resize(H);
    if (probs) probs->resize(cfg_.n_layers);
    for (int l = 0; l < cfg_.n_layers; ++l) {
      rmsnorm(xb_.data(), x_.data(), w_.rms_att + size_t(l) * D, D);
      matmul(q_.data(), xb_.data(), w_.wq + size_t(l) * D * D, D, D);
      matmul(k_.data(), xb_.data(), w_.wk + size_t(l) * D * KV, D, KV);
      matmul(v_.data(), xb_.data(), w_.wv + size_t(l) * D * KV, D, KV);
      for (int i = 0; i < D; i += 2) {  // RoPE on adjacent pairs
        const float freq = 1.0f / std::pow(10000.0f, float(i % hs) / float(hs));
        const float c = std::cos(pos * freq), s = std::sin(pos * freq);
        for (int which = 0; which < (i < KV ? 2 : 1); ++which) {
          float* vec = which == 0 ? q_.data() : k_.data();
          const float a = vec[i], b = vec[i + 1];
          vec[i] = a * c - b * s;
          vec[i + 1] = a * s + b * c;
        }
      }
      const int64_t t_new = cache.length[l];
      if (t_new >= cache.capacity) std::abort();
      for (int h = 0; h < cfg_.n_kv_heads; ++h) {
        std::memcpy(cache.key(l, h, t_new), k_.data() + h * hs, hs * sizeof(float));
        std::memcpy(cache.value(l, h, t_new), v_.data() + h * hs, hs * sizeof(float));
      }
      const int64_t n = ++cache.length[l];
      if (probs) (*probs)[l].assign(size_t(cfg_.n_heads) * n, 0.f);
      att_.resize(n);
      for (int h = 0; h < cfg_.n_heads; ++h) {
        const float* q = q_.data() + h * hs;
        const int kvh = h / group;
        float mx = -INFINITY;
        for (int64_t t = 0; t < n; ++t) {
          const float* kk = cache.key(l, kvh, t);
          float dot = 0.f;
          for (int i = 0; i < hs; ++i) dot += q[i] * kk[i];
          att_[t] = dot / std::sqrt(float(hs));
          mx = std::max(mx, att_[t]);
        }
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) sum += (att_[t] = std::exp(att_[t] - mx));
        float* out = xb_.data() + h * hs;
        std::fill(out, out + hs, 0.f);
        for (int64_t t = 0; t < n; ++t) {
          const float p = att_[t] / sum;
          if (probs) (*probs)[l][size_t(h) * n + t] = p;
          const float* vv = cache.value(l, kvh, t);
          for (int i = 0; i < hs; ++i) out[i] += p * vv[i];
        }
      }
      matmul(xb2_.data(), xb_.data(), w_.wo + size_t(l) * D * D, D, D);
      for (int i = 0; i < D; ++i) x_[i] += xb2_[i];
      rmsnorm(xb_.data(), x_.data(), w_.rms_ffn + size_t(l) * D, D);
      matmul(hb_.data(), xb_.data(), w_.w1 + size_t(l) * D * H, D, H);
      matmul(hb2_.data(), xb_.data(), w_.w3 + size_t(l) * D * H, D, H);
      for (int i = 0; i < H; ++i) hb_[i] = hb_[i] / (1.0f + std::exp(-hb_[i])) * hb2_[i];
      matmul(xb_.data(), hb_.data(), w_.w2 + size_t(l) * H * D, H, D);
      for (int i = 0; i < D; ++i) x_[i] += xb_[i];
    }
    rmsnorm(x_.data(), x_.data(), w_.rms_final, D);
    logits_.resize(cfg_.vocab_size);
    matmul(logits_.data(), x_.data(), w_.wcls, D, cfg_.vocab_size);
    return logits_;
  }

  static int argmax(const std::vector<float>& v) {
    int best = 0;
    for (int i = 1; i < int(v.size()); ++i)
      if (v[i] > v[best]) best = i;
    return best;
  }

 private:
  static void rmsnorm(float* o, const float* x, const float* w, int n) {
    float ss = 0.f;
    for (int i = 0; i < n; ++i) ss += x[i] * x[i];
    ss = 1.0f / std::sqrt(ss / n + 1e-5f);
    for (int i = 0; i < n; ++i) o[i] = w[i] * (ss * x[i]);
  }
  // o (d) = W (d, n) @ x (n)
  static void matmul(float* o, const float* x, const float* w, int n, int d) {
    for (int i = 0; i < d; ++i) {
      float s = 0.f;
      const float* row = w + size_t(i) * n;
      for (int j = 0; j < n; ++j) s += row[j] * x[j];
      o[i] = s;
    }
  }
  config cfg_;
  weights w_;
  std::vector<float> x_, xb_, xb2_, q_, k_, v_, hb_, hb2_, att_, logits_;
};

//! llama2.c tokenizer, decoding only.
struct tokenizer {
  std::vector<std::string> vocab;
  bool load(const std::string& path, int vocab_size, std::string& err) {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) return err = "cannot open " + path, false;
    int32_t max_len = 0;
    if (std::fread(&max_len, 4, 1, f) != 1) return std::fclose(f), err = "short tokenizer", false;
    vocab.resize(vocab_size);
    for (int i = 0; i < vocab_size; ++i) {
      float score;
      int32_t len;
      if (std::fread(&score, 4, 1, f) != 1 || std::fread(&len, 4, 1, f) != 1 || len < 0 || len > 1024)
        return std::fclose(f), err = "bad tokenizer entry", false;
      vocab[i].resize(len);
      if (len && std::fread(&vocab[i][0], 1, len, f) != size_t(len)) return std::fclose(f), err = "short entry", false;
    }
    std::fclose(f);
    return true;
  }
  std::string piece(int prev, int token) const {
    std::string s = vocab.at(token);
    if (prev == 1 && !s.empty() && s[0] == ' ') s.erase(0, 1);
    unsigned byte = 0;
    if (s.size() == 6 && std::sscanf(s.c_str(), "<0x%02X>", &byte) == 1) s = std::string(1, char(byte));
    return s;
  }
};

}  // namespace tiny_llama
