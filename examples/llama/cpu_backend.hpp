// prefixkv-llama: the host backend — the LLaMA forward pass in plain C++ (RMSNorm, RoPE on pairs of adjacent
// dimensions with theta 10000, grouped-query attention over per-(layer, kv head) caches of different lengths,
// SwiGLU), the prefixkv host compressor (`prefixkv::compress_host`) on its caches and the decode-time upkeep
// (`prefixkv::decode_step_host`, decode_upkeep.hpp) after every generated token. Its arithmetic is math.hpp's,
// which the CUDA backend shares: both compute the same logits and attention probabilities, bit for bit.
#pragma once

#include "backend.hpp"
#include "math.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace prefixkv_llama {

//! One layer's cache as the forward pass sees it: K and V (kv_head, capacity, head_size), `lengths` (kv_head), and
//! optionally `positions` (kv_head, capacity): the RoPE position of every cached row.
struct layer_cache_ref {
  float* k = nullptr;
  float* v = nullptr;
  int64_t capacity = 0;
  int32_t* lengths = nullptr;
  float* positions = nullptr;
};

//! The forward pass of one token (host). Holds scratch buffers only; the weights stay in the model.
class cpu_forward {
 public:
  explicit cpu_forward(const model& m) : m_(&m) {
    const config& c = m.cfg;
    x_.resize(c.dim), xb_.resize(c.dim), xb2_.resize(c.dim), q_.resize(c.dim), k_.resize(c.kv_dim());
    v_.resize(c.kv_dim()), hb_.resize(c.hidden_dim), hb2_.resize(c.hidden_dim), logits_.resize(c.vocab_size);
    att_.resize(c.seq_len);
    rope_ = rope_table(c.head_size(), c.seq_len);
  }
  const config& cfg() const { return m_->cfg; }

  //! Token `token` at RoPE position `pos`: appends its K/V to every (layer, kv head) of `layers` (n_layers
  //! entries) and attends over what is cached there. `on_probs(l, h, p, n)` sees query head h's attention
  //! probabilities over the n tokens of its kv head in layer l; `on_query(l, q)` the post-RoPE queries (n_heads x
  //! head_size). Returns the logits, or null when a cache is full.
  template <class OnProbs, class OnQuery>
  const float* run(int token, int pos, layer_cache_ref* layers, OnProbs&& on_probs, OnQuery&& on_query) {
    const config& c = m_->cfg;
    const weights& w = m_->w;
    const int D = c.dim, KV = c.kv_dim(), hs = c.head_size(), H = c.hidden_dim, G = c.group();
    const float scale = 1.0f / std::sqrt(float(hs));
    std::memcpy(x_.data(), w.emb + size_t(token) * D, sizeof(float) * D);
    for (int l = 0; l < c.n_layers; ++l) {
      layer_cache_ref& lc = layers[l];
      for (int h = 0; h < c.n_kv_heads; ++h)
        if (lc.lengths[h] < 0 || lc.lengths[h] >= lc.capacity) return nullptr;
      rmsnorm(xb_.data(), x_.data(), w.rms_att + size_t(l) * D, D);
      matmul(q_.data(), xb_.data(), w.wq + size_t(l) * D * D, D, D);
      matmul(k_.data(), xb_.data(), w.wk + size_t(l) * KV * D, D, KV);
      matmul(v_.data(), xb_.data(), w.wv + size_t(l) * KV * D, D, KV);
      rope(q_.data(), D, pos);
      rope(k_.data(), KV, pos);
      on_query(l, static_cast<const float*>(q_.data()));
      for (int h = 0; h < c.n_kv_heads; ++h) {
        const int64_t t = lc.lengths[h]++;
        std::memcpy(lc.k + (h * lc.capacity + t) * hs, k_.data() + h * hs, sizeof(float) * hs);
        std::memcpy(lc.v + (h * lc.capacity + t) * hs, v_.data() + h * hs, sizeof(float) * hs);
        if (lc.positions) lc.positions[h * lc.capacity + t] = float(pos);
      }
      for (int h = 0; h < c.n_heads; ++h) {
        const int kvh = h / G;
        const int64_t n = lc.lengths[kvh];
        const float* q = q_.data() + h * hs;
        const float* K = lc.k + kvh * lc.capacity * hs;
        const float* V = lc.v + kvh * lc.capacity * hs;
        float mx = -INFINITY;
        for (int64_t t = 0; t < n; ++t) {
          const float* kk = K + t * hs;
          float d = 0.f;
          for (int i = 0; i < hs; ++i) d = f_add(d, f_mul(q[i], kk[i]));
          att_[t] = f_mul(d, scale);
          mx = std::max(mx, att_[t]);
        }
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) sum = f_add(sum, att_[t] = exp_rn(f_sub(att_[t], mx)));
        const float inv = f_div(1.0f, sum);
        for (int64_t t = 0; t < n; ++t) att_[t] = f_mul(att_[t], inv);
        on_probs(l, h, static_cast<const float*>(att_.data()), n);
        float* out = xb_.data() + h * hs;
        std::fill(out, out + hs, 0.f);
        for (int64_t t = 0; t < n; ++t) {
          const float p = att_[t];
          const float* vv = V + t * hs;
          for (int i = 0; i < hs; ++i) out[i] = f_add(out[i], f_mul(p, vv[i]));
        }
      }
      matmul(xb2_.data(), xb_.data(), w.wo + size_t(l) * D * D, D, D);
      for (int i = 0; i < D; ++i) x_[i] = f_add(x_[i], xb2_[i]);
      rmsnorm(xb_.data(), x_.data(), w.rms_ffn + size_t(l) * D, D);
      matmul(hb_.data(), xb_.data(), w.w1 + size_t(l) * H * D, D, H);
      matmul(hb2_.data(), xb_.data(), w.w3 + size_t(l) * H * D, D, H);
      for (int i = 0; i < H; ++i) hb_[i] = silu_mul(hb_[i], hb2_[i]);
      matmul(xb_.data(), hb_.data(), w.w2 + size_t(l) * D * H, H, D);
      for (int i = 0; i < D; ++i) x_[i] = f_add(x_[i], xb_[i]);
    }
    rmsnorm(x_.data(), x_.data(), w.rms_final, D);
    matmul(logits_.data(), x_.data(), w.wcls, D, c.vocab_size);
    return logits_.data();
  }

 private:
  static void rmsnorm(float* o, const float* x, const float* w, int n) {
    const float ss = rms_scale(x, n);
    for (int i = 0; i < n; ++i) o[i] = rms_apply(w[i], ss, x[i]);
  }
  //! o (d) = W (d, n) @ x (n), eight partial sums per row (`dot`; vectorisable without reassociation flags).
  static void matmul(float* o, const float* x, const float* w, int n, int d) {
    for (int i = 0; i < d; ++i) o[i] = dot(w + size_t(i) * n, x, n);
  }
  //! RoPE on pairs of adjacent dimensions of every head in `v` (n elements).
  void rope(float* v, int n, int pos) const {
    const int hs = m_->cfg.head_size();
    for (int i = 0; i < n; i += 2) {
      float c, s;
      rope_.at(pos, (i % hs) / 2, c, s);
      rope_pair(v[i], v[i + 1], c, s);
    }
  }

  const model* m_;
  std::vector<float> x_, xb_, xb2_, q_, k_, v_, hb_, hb2_, att_, logits_;
  rope_table rope_;
};

//! The host backend. Besides K and V it keeps the original position of every cached row (a (kv_head, capacity, 1)
//! float side tensor per layer that the compressor moves with the rows, as it moves quantisation scales), so that
//! callers can see which prompt tokens every (layer, kv head) kept.
class cpu_backend final : public backend {
 public:
  explicit cpu_backend(const model& m) : m_(m), fwd_(m) {
    const config& c = m.cfg;
    cap_ = c.seq_len;
    const size_t per_layer = size_t(c.n_kv_heads) * size_t(cap_) * size_t(c.head_size());
    k_.assign(c.n_layers, std::vector<float>(per_layer, 0.f));
    v_ = k_;
    pos_.assign(c.n_layers, std::vector<float>(size_t(c.n_kv_heads) * size_t(cap_), 0.f));
    len_.assign(size_t(c.n_layers) * c.n_kv_heads, 0);
    refs_.resize(c.n_layers);
    bind();
    for (int l = 0; l < c.n_layers; ++l) {
      kp_.push_back(k_[l].data());
      vp_.push_back(v_[l].data());
      pp_.push_back(pos_[l].data());
    }
  }
  const config& cfg() const override { return m_.cfg; }
  const char* device() const override { return "cpu"; }
  void reset() override {
    std::fill(len_.begin(), len_.end(), 0);
    upkeep_.end();
  }

  bool prefill(const int* tokens, int n, const prefill_record& rec, std::vector<float>& logits,
               std::string& err) override {
    const config& c = m_.cfg;
    if (n < 1 || n > cap_) return err = "the prompt must have 1 to seq_len (" + std::to_string(cap_) + ") tokens", false;
    reset();
    const int Hq = c.n_heads, hs = c.head_size();
    prompt_len_ = n;
    seen_ = n;
    window_ = rec.window > 0 ? std::min(rec.window, n) : 0;
    has_attention_ = rec.attention;
    if (rec.attention) {
      P_.resize(c.n_layers);
      for (auto& p : P_) p.assign(size_t(Hq) * n * n, 0.f);
    } else {
      P_.clear();
    }
    Q_.assign(c.n_layers, std::vector<float>(size_t(Hq) * window_ * hs, 0.f));
    for (int t = 0; t < n; ++t) {
      const int wi = t - (n - window_);  // index inside the window, < 0 before it
      const float* out = fwd_.run(
          tokens[t], t, refs_.data(),
          [&](int l, int h, const float* p, int64_t m) {
            if (rec.attention) std::memcpy(&P_[l][(size_t(h) * n + t) * n], p, sizeof(float) * size_t(m));
          },
          [&](int l, const float* q) {
            if (wi >= 0)
              for (int h = 0; h < Hq; ++h)
                std::memcpy(&Q_[l][(size_t(h) * window_ + wi) * hs], q + h * hs, sizeof(float) * hs);
          });
      if (!out) return err = "the cache is full", false;
      if (t == n - 1) logits.assign(out, out + c.vocab_size);
    }
    prefilled_ = true;
    return true;
  }

  bool step(int token, int pos, std::vector<float>& logits, std::string& err) override {
    const config& c = m_.cfg;
    if (token < 0 || token >= c.vocab_size) return err = "token id out of range", false;
    const bool observe = upkeep_.active() && upkeep_.observes();
    const float* out = fwd_.run(
        token, pos, refs_.data(),
        [&](int l, int h, const float* p, int64_t n) {
          if (observe) std::memcpy(upkeep_.row(l, h), p, sizeof(float) * size_t(n));
        },
        [](int, const float*) {});
    if (!out) return err = "the cache is full (seq_len " + std::to_string(cap_) + ")", false;
    logits.assign(out, out + c.vocab_size);
    prefilled_ = false;
    seen_ = int64_t(pos) + 1;
    if (upkeep_.active() && !upkeep_.step(kp_.data(), vp_.data(), pp_.data(), len_.data(), err)) return false;
    return true;
  }

  bool begin_decode(const decode_options& o, std::string& err) override {
    const config& c = m_.cfg;
    return upkeep_.begin(o, c.n_layers, c.n_heads, c.n_kv_heads, c.head_size(), cap_, len_.data(), seen_, err);
  }
  void end_decode() override { upkeep_.end(); }
  //! The running upkeep (inactive unless `begin_decode` succeeded since the last prefill / reset / restore).
  const host_decode_upkeep& upkeep() const { return upkeep_; }

  bool compress(const prefixkv::compress_plan& plan, std::string& err) override {
    namespace pk = prefixkv;
    const config& c = m_.cfg;
    const int L = c.n_layers, Hk = c.n_kv_heads, Hq = c.n_heads, hs = c.head_size();
    if (!compress_ready(plan, prefilled_, len_, prompt_len_, has_attention_, window_, err)) return false;
    const pk::scorer_kind sk = plan.cfg.scorer;
    std::vector<pk::kv_view<float>> kv(L), vv(L), ps(L);
    std::vector<pk::kv_view<const float>> pv, qv;
    for (int l = 0; l < L; ++l) {
      kv[l] = pk::make_kv_view_bhsd(k_[l].data(), 1, Hk, cap_, hs);
      vv[l] = pk::make_kv_view_bhsd(v_[l].data(), 1, Hk, cap_, hs);
      ps[l] = pk::make_kv_view_bhsd(pos_[l].data(), 1, Hk, cap_, 1);  // positions travel with the rows
    }
    pk::compress_args<pk::kv_layers<float>, float> a;
    a.cache = pk::kv_layers<float>{kv.data(), vv.data(), ps.data(), nullptr, L};
    const int32_t n = prompt_len_;
    a.lengths = &n;
    if (sk == pk::scorer_kind::attention) {
      pv.resize(L);
      for (int l = 0; l < L; ++l)
        pv[l] = pk::make_kv_view_bhsd(static_cast<const float*>(P_[l].data()), 1, Hq, prompt_len_, prompt_len_);
      a.attention = pv.data();
    }
    if (sk == pk::scorer_kind::window) {
      qv.resize(L);
      for (int l = 0; l < L; ++l)
        qv[l] = pk::make_kv_view_bhsd(static_cast<const float*>(Q_[l].data()), 1, Hq, window_, hs);
      a.queries = qv.data();
    }
    const int64_t segs = plan.segments(1);
    std::vector<int32_t> out(static_cast<size_t>(segs), -1);
    a.out.lengths = out.data();
    if (pk::compress_host(plan, a) != cudaSuccess)
      return err = pk::last_error().message, false;
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < Hk; ++h) len_[size_t(l) * Hk + h] = out[size_t(l) * plan.seg_heads + (plan.seg_heads > 1 ? h : 0)];
    prefilled_ = false;
    return true;
  }

  std::vector<int32_t> lengths() const override { return len_; }

  //! Layer l's cache rows (kv_head, capacity(), head_size): for tests and tools that inspect the cache.
  const float* keys(int l) const { return k_[size_t(l)].data(); }
  const float* values(int l) const { return v_[size_t(l)].data(); }
  int capacity() const { return cap_; }
  //! Original (RoPE) positions of the rows cached in (layer l, kv head h), in cache order.
  std::vector<int> positions(int l, int h) const {
    const int n = len_[size_t(l) * m_.cfg.n_kv_heads + h];
    std::vector<int> out(static_cast<size_t>(n));
    for (int t = 0; t < n; ++t) out[t] = int(pos_[size_t(l)][size_t(h) * cap_ + t]);
    return out;
  }

  void save(int slot) override {
    snapshot& s = saved_[slot & 1];
    s.k = k_;
    s.v = v_;
    s.pos = pos_;
    s.len = len_;
    s.prefilled = prefilled_;
    s.seen = seen_;
  }
  void restore(int slot) override {
    const snapshot& s = saved_[slot & 1];
    const int hs = m_.cfg.head_size();
    for (size_t l = 0; l < k_.size(); ++l)  // copy only the rows in use
      for (int h = 0; h < m_.cfg.n_kv_heads; ++h) {
        const size_t off = size_t(h) * cap_ * hs, rows = size_t(s.len[l * m_.cfg.n_kv_heads + h]) * hs;
        std::memcpy(k_[l].data() + off, s.k[l].data() + off, sizeof(float) * rows);
        std::memcpy(v_[l].data() + off, s.v[l].data() + off, sizeof(float) * rows);
        std::memcpy(pos_[l].data() + size_t(h) * cap_, s.pos[l].data() + size_t(h) * cap_, sizeof(float) * rows / hs);
      }
    std::copy(s.len.begin(), s.len.end(), len_.begin());  // refs_ point into len_
    prefilled_ = s.prefilled;
    seen_ = s.seen;
    upkeep_.end();
  }

 private:
  void bind() {
    for (int l = 0; l < m_.cfg.n_layers; ++l)
      refs_[l] = layer_cache_ref{k_[l].data(), v_[l].data(), cap_, len_.data() + size_t(l) * m_.cfg.n_kv_heads,
                                 pos_[l].data()};
  }
  struct snapshot {
    std::vector<std::vector<float>> k, v, pos;
    std::vector<int32_t> len;
    bool prefilled = false;
    int64_t seen = 0;
  };
  const model& m_;
  cpu_forward fwd_;
  int cap_ = 0;
  std::vector<std::vector<float>> k_, v_;  // (layer) (kv_head, capacity, head_size)
  std::vector<std::vector<float>> pos_;    // (layer) (kv_head, capacity): original position of every row
  std::vector<int32_t> len_;               // (layer, kv_head)
  std::vector<layer_cache_ref> refs_;
  std::vector<std::vector<float>> P_, Q_;  // (layer) (q_head, T, T) / (q_head, w, head_size)
  std::vector<float*> kp_, vp_, pp_;       // (layer) K, V and positions, for the upkeep
  host_decode_upkeep upkeep_;
  int64_t seen_ = 0;                       // tokens fed since the prefill began (the next position)
  int prompt_len_ = 0, window_ = 0;
  bool has_attention_ = false, prefilled_ = false;
  snapshot saved_[2];
};

}  // namespace prefixkv_llama
