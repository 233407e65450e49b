// prefixkv-llama: a backend built on the batched forward pass (batch_forward.hpp) over contiguous caches, written once
// over a memory-and-launch layer `Ops`: the CUDA backend (cuda_backend.cu: device memory, kernels, the device
// compressor) and a host instance (`host_ops` below: host memory, the same bodies as loops, the host compressor), which
// the host tests run against cpu_backend.hpp to check this file's bookkeeping without a GPU.
//
// Caches: K and V (layer, kv_head, capacity, head_size) in one buffer each, lengths per (layer, kv head) with a host
// mirror. The compressor runs on `kv_layers` views of those caches with the prefill's recorded attention
// probabilities (scorer `attention`); the window and key-norm scores are computed by the library's host twins on
// this cache's K and the recorded Q (equal to the host backend's, bit for bit) and handed to the compressor as caller
// scores: the device scorers round differently from their twins (fused multiply-adds, a fast exp2), which could move
// a near-tie across the budget.
//
// Ops interface (`A<T>`: an owning array with `T* p`, `size_t n`, `bool reserve(count, err)`, contents not kept):
//   template <class T> using array = A<T>;
//   bool init(const model& m, std::string& err);            const model_ref& mr() const;
//   bool h2d(void* dst, const void* src, size_t bytes, std::string& err);   (and d2h, d2d)
//   bool zero(void* dst, size_t bytes, std::string& err);   bool sync(std::string& err);
//   template <class Cache> bool forward(const Cache& c, batch_args a, const int* rows, int k,
//                                        std::vector<float>& logits, std::string& err);   // logits: host, (k, vocab)
//   template <class Args> cudaError_t compress(void* ws, size_t& bytes, const prefixkv::compress_plan& plan,
//                                                const Args& args);  // the compressor (a size query when ws is null)
//   static constexpr const char* name;
#pragma once

#include "backend.hpp"
#include "batch_forward.hpp"

#include <prefixkv/compress/compress.hpp>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace prefixkv_llama {

template <class Ops>
class batched_backend final : public backend {
 public:
  template <class T>
  using array = typename Ops::template array<T>;

  explicit batched_backend(const model& m) : m_(m) {}

  bool init(std::string& err) {
    if (!ops_.init(m_, err)) return false;
    const model_ref& d = ops_.mr();
    cap_ = d.seq_len;
    const size_t cache = size_t(d.layers) * d.kv_heads * size_t(cap_) * d.hs;
    if (!k_.reserve(cache, err) || !v_.reserve(cache, err) || !len_d_.reserve(size_t(d.layers) * d.kv_heads, err) ||
        !one_.reserve(2, err) || !out_len_.reserve(size_t(d.layers) * d.kv_heads, err))
      return false;
    for (auto& s : saved_)
      if (!s.k.reserve(cache, err) || !s.v.reserve(cache, err)) return false;
    if (!ops_.zero(k_.p, sizeof(float) * cache, err) || !ops_.zero(v_.p, sizeof(float) * cache, err)) return false;
    len_.assign(size_t(d.layers) * d.kv_heads, 0);
    return upload_lengths(err);
  }

  const config& cfg() const override { return m_.cfg; }
  const char* device() const override { return Ops::name; }
  void reset() override {
    std::fill(len_.begin(), len_.end(), 0);
    std::string err;
    (void)upload_lengths(err);
  }

  bool prefill(const int* tokens, int n, const prefill_record& rec, std::vector<float>& logits,
               std::string& err) override {
    const model_ref& d = ops_.mr();
    if (n < 1 || n > cap_) return err = "the prompt must have 1 to seq_len (" + std::to_string(cap_) + ") tokens", false;
    for (int i = 0; i < n; ++i)
      if (tokens[i] < 0 || tokens[i] >= d.vocab) return err = "token id out of range", false;
    prefilled_ = false;
    std::fill(len_.begin(), len_.end(), 0);
    if (!upload_lengths(err)) return false;
    prompt_len_ = n;
    window_ = rec.window > 0 ? std::min(rec.window, n) : 0;
    has_attention_ = rec.attention;
    batch_args a;
    if (rec.attention) {  // P (layer, 1, q_head, n, n): row t holds token t's probabilities, zeros after it
      const size_t p = size_t(d.layers) * d.heads * size_t(n) * size_t(n);
      if (!P_.reserve(p, err) || !ops_.zero(P_.p, sizeof(float) * p, err)) return false;
      a.P = P_.p;
      a.rec_batch = 1;
      a.p_tokens = n;
    }
    if (window_ > 0) {  // Q (layer, q_head, window, head_size): the last `window` prompt tokens
      if (!Q_.reserve(size_t(d.layers) * d.heads * size_t(window_) * d.hs, err)) return false;
      a.Q = Q_.p;
      a.q_first = n - window_;
      a.q_window = window_;
    }
    std::vector<int> cols(6 * size_t(n) + 1);  // token, pos, seq, off, cnt, rec; then the logit row
    for (int i = 0; i < n; ++i) {
      cols[i] = tokens[i];
      cols[n + i] = i;
      cols[2 * n + i] = 0;
      cols[3 * n + i] = i;
      cols[4 * n + i] = n;
      cols[5 * n + i] = 0;
    }
    cols[6 * size_t(n)] = n - 1;
    if (!run(cols, n, a, logits, err)) return false;
    prefilled_ = true;
    return true;
  }

  bool step(int token, int pos, std::vector<float>& logits, std::string& err) override {
    const model_ref& d = ops_.mr();
    if (token < 0 || token >= d.vocab) return err = "token id out of range", false;
    if (pos < 0 || pos >= d.seq_len)
      return err = "position " + std::to_string(pos) + " outside the context (seq_len " + std::to_string(cap_) + ")",
             false;
    for (int32_t x : len_)
      if (x >= cap_) return err = "the cache is full (seq_len " + std::to_string(cap_) + ")", false;
    const std::vector<int> cols{token, pos, 0, 0, 1, -1, 0};
    if (!run(cols, 1, batch_args{}, logits, err)) return false;
    prefilled_ = false;
    return true;
  }

  bool compress(const prefixkv::compress_plan& plan, std::string& err) override {
    namespace pk = prefixkv;
    const model_ref& d = ops_.mr();
    const int L = d.layers, Hk = d.kv_heads, Hq = d.heads, hs = d.hs;
    if (!compress_ready(plan, prefilled_, len_, prompt_len_, has_attention_, window_, err)) return false;
    const pk::scorer_kind sk = plan.cfg.scorer;
    std::vector<pk::kv_view<float>> kv(static_cast<size_t>(L)), vv(static_cast<size_t>(L));
    std::vector<pk::kv_view<const float>> pv, qv;
    const size_t per_layer = size_t(Hk) * size_t(cap_) * hs;
    for (int l = 0; l < L; ++l) {
      kv[l] = pk::make_kv_view_bhsd(k_.p + l * per_layer, 1, Hk, cap_, hs);
      vv[l] = pk::make_kv_view_bhsd(v_.p + l * per_layer, 1, Hk, cap_, hs);
    }
    pk::compress_args<pk::kv_layers<float>, float> a;
    a.cache = pk::kv_layers<float>{kv.data(), vv.data(), nullptr, nullptr, L};
    const int32_t host_n[2] = {prompt_len_, -1};
    if (!ops_.h2d(one_.p, host_n, sizeof(host_n), err)) return false;
    a.lengths = one_.p;
    const int64_t T = prompt_len_;
    if (sk == pk::scorer_kind::attention) {
      pv.resize(static_cast<size_t>(L));
      for (int l = 0; l < L; ++l)
        pv[l] = pk::make_kv_view_bhsd(static_cast<const float*>(P_.p) + size_t(l) * Hq * T * T, 1, Hq, T, T);
      a.attention = pv.data();
    }
    if (sk == pk::scorer_kind::window) {
      qv.resize(static_cast<size_t>(L));
      for (int l = 0; l < L; ++l)
        qv[l] = pk::make_kv_view_bhsd(static_cast<const float*>(Q_.p) + size_t(l) * Hq * window_ * hs, 1, Hq,
                                      window_, hs);
      a.queries = qv.data();
    }
    a.out.lengths = out_len_.p;
    a.out.status = one_.p + 1;
    pk::compress_plan run_plan = plan;
    if (sk == pk::scorer_kind::window || sk == pk::scorer_kind::key_norm) {
      bool have = false;
      if (!host_scores(plan, have, err)) return false;
      if (have) {
        run_plan.cfg.scorer = pk::scorer_kind::scores;
        a.scores = scores_.p;
        a.score_stride = T;
      }  // else the scorer refused its input: the compressor's own chain reports the same reason
    }
    size_t bytes = 0;
    if (ops_.compress(nullptr, bytes, run_plan, a) != cudaSuccess) return err = pk::last_error().message, false;
    if (!ws_.reserve(bytes, err)) return false;
    const cudaError_t e = ops_.compress(ws_.p, bytes, run_plan, a);
    const int64_t segs = plan.segments(1);
    std::vector<int32_t> out(size_t(segs) + 1);
    if (!ops_.d2h(out.data(), out_len_.p, sizeof(int32_t) * segs, err) ||
        !ops_.d2h(out.data() + segs, one_.p + 1, sizeof(int32_t), err) || !ops_.sync(err))
      return false;
    const int32_t status = out[size_t(segs)];
    if (status > 0 && e == cudaSuccess) {  // the device chain stopped on bad data: the reason, as the host one says it
      const auto why = static_cast<pk::reason>(status);
      (void)pk::detail::fail(why, pk::detail::compress_message(why));
    }
    if (status != 0 || e != cudaSuccess) return err = pk::last_error().message, false;
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < Hk; ++h)
        len_[size_t(l) * Hk + h] = out[size_t(l) * plan.seg_heads + (plan.seg_heads > 1 ? h : 0)];
    prefilled_ = false;
    return upload_lengths(err);
  }

  std::vector<int32_t> lengths() const override { return len_; }

  void save(int slot) override {
    snapshot& s = saved_[slot & 1];
    std::string err;
    (void)(ops_.d2d(s.k.p, k_.p, sizeof(float) * k_.n, err) && ops_.d2d(s.v.p, v_.p, sizeof(float) * v_.n, err) &&
           ops_.sync(err));
    s.len = len_;
    s.prefilled = prefilled_;
  }
  void restore(int slot) override {
    const snapshot& s = saved_[slot & 1];
    std::string err;
    (void)(ops_.d2d(k_.p, s.k.p, sizeof(float) * k_.n, err) && ops_.d2d(v_.p, s.v.p, sizeof(float) * v_.n, err));
    len_ = s.len;
    prefilled_ = s.prefilled;
    (void)upload_lengths(err);
  }

 private:
  bool upload_lengths(std::string& err) {
    return ops_.h2d(len_d_.p, len_.data(), sizeof(int32_t) * len_.size(), err) && ops_.sync(err);
  }

  //! Window / key-norm scores of the prefilled caches with the host twins (see the file comment), uploaded to scores_
  //! as caller scores (layers, 1[, kv heads], prompt_len); `have`: the scorer accepted its input.
  bool host_scores(const prefixkv::compress_plan& plan, bool& have, std::string& err) {
    namespace pk = prefixkv;
    const model_ref& d = ops_.mr();
    const int L = d.layers, Hk = d.kv_heads, Hq = d.heads, hs = d.hs;
    const int64_t T = prompt_len_, H = plan.seg_heads;
    const size_t per_layer = size_t(Hk) * size_t(cap_) * hs;
    std::vector<float> k(size_t(L) * per_layer), q;
    if (!ops_.d2h(k.data(), k_.p, sizeof(float) * k.size(), err)) return false;
    if (plan.cfg.scorer == pk::scorer_kind::window) {
      q.resize(size_t(L) * Hq * window_ * hs);
      if (!ops_.d2h(q.data(), Q_.p, sizeof(float) * q.size(), err)) return false;
    }
    if (!ops_.sync(err)) return false;
    const int64_t S = L * H;
    std::vector<int64_t> begins(static_cast<size_t>(S)), lens(static_cast<size_t>(S), T);
    for (int64_t s = 0; s < S; ++s) begins[size_t(s)] = s * T;
    const auto rows = pk::make_ragged_segments(S, begins.data(), lens.data());
    const pk::segment_grid grid{L, 1, H};
    std::vector<float> sc(size_t(S * T), 0.f);
    have = true;
    for (int l = 0; l < L && have; ++l) {
      // as the host compressor sees them: K over the plan's token capacity, Q over the recorded window
      const auto kl = pk::make_kv_view_bhsd(static_cast<const float*>(k.data()) + l * per_layer, 1, Hk, cap_, hs)
                          .with_tokens(std::min<int64_t>(cap_, plan.cfg.max_tokens));
      cudaError_t e;
      if (plan.cfg.scorer == pk::scorer_kind::window) {
        const auto ql = pk::make_kv_view_bhsd(static_cast<const float*>(q.data()) + size_t(l) * Hq * window_ * hs, 1,
                                              Hq, window_, hs);
        e = pk::window_attention_host(ql, kl, pk::lse_view{}, plan.cfg.window, grid, l, rows, sc.data());
      } else {
        e = pk::key_norm_host(kl, pk::key_norm_options{true}, grid, l, rows, sc.data());
      }
      have = e == cudaSuccess;
    }
    if (!have) return true;
    return scores_.reserve(sc.size(), err) && ops_.h2d(scores_.p, sc.data(), sizeof(float) * sc.size(), err) &&
           ops_.sync(err);
  }

  //! One batch of n tokens of sequence 0 (`cols`: token, pos, seq, off, cnt, rec, then the logit row).
  bool run(const std::vector<int>& cols, int n, batch_args a, std::vector<float>& logits, std::string& err) {
    const model_ref& d = ops_.mr();
    if (!batch_.reserve(cols.size(), err) || !ops_.h2d(batch_.p, cols.data(), sizeof(int) * cols.size(), err))
      return false;
    const int* b = batch_.p;
    a.n = n;
    a.token = b, a.pos = b + n, a.seq = b + 2 * n, a.off = b + 3 * n, a.cnt = b + 4 * n, a.rec = b + 5 * n;
    a.len = len_d_.p;
    a.slots = 1;
    contiguous_kv c;
    c.k = k_.p, c.v = v_.p, c.slots = 1, c.kv_heads = d.kv_heads, c.capacity = cap_, c.hs = d.hs;
    if (!ops_.forward(c, a, b + 6 * size_t(n), 1, logits, err)) return false;
    for (int32_t& x : len_) x += n;  // as the forward pass grew the lengths
    return true;
  }

  struct snapshot {
    array<float> k, v;
    std::vector<int32_t> len;
    bool prefilled = false;
  };
  const model& m_;
  Ops ops_;
  int cap_ = 0;
  array<float> k_, v_, P_, Q_, scores_;
  array<int32_t> len_d_, out_len_, one_;  // one_: the prompt length and the compressor's status word
  array<int> batch_;
  array<unsigned char> ws_;
  std::vector<int32_t> len_;  // (layer, kv_head)
  int prompt_len_ = 0, window_ = 0;
  bool has_attention_ = false, prefilled_ = false;
  snapshot saved_[2];
};

//! The host instance of the layer below `batched_backend` (host memory, the bodies as loops, the host compressor).
struct host_ops {
  static constexpr const char* name = "cpu-batched";
  template <class T>
  struct array {
    std::vector<T> v;
    T* p = nullptr;
    size_t n = 0;
    bool reserve(size_t count, std::string&) {
      if (count > n || !p) {
        v.assign(count ? count : 1, T{});
        p = v.data();
        n = count;
      }
      return true;
    }
  };
  bool init(const model& m, std::string&) {
    mr_ = model_ref::shape_of(m);
    mr_.bind_weights(m, m.w.data.data());
    rope_ = rope_table(mr_.hs, mr_.seq_len);
    mr_.rope_cos = rope_.cos.data();
    mr_.rope_sin = rope_.sin.data();
    return true;
  }
  const model_ref& mr() const { return mr_; }
  bool h2d(void* dst, const void* src, size_t bytes, std::string&) { return std::memmove(dst, src, bytes), true; }
  bool d2h(void* dst, const void* src, size_t bytes, std::string&) { return std::memmove(dst, src, bytes), true; }
  bool d2d(void* dst, const void* src, size_t bytes, std::string&) { return std::memmove(dst, src, bytes), true; }
  bool zero(void* dst, size_t bytes, std::string&) { return std::memset(dst, 0, bytes), true; }
  bool sync(std::string&) { return true; }
  template <class Cache>
  bool forward(const Cache& c, batch_args a, const int* rows, int k, std::vector<float>& logits, std::string&) {
    forward_host(mr_, c, a, fb_, rows, k);
    logits.assign(fb_.logits.begin(), fb_.logits.begin() + size_t(k) * mr_.vocab);
    return true;
  }
  template <class Args>
  cudaError_t compress(void* ws, size_t& bytes, const prefixkv::compress_plan& plan, const Args& args) {
    if (ws == nullptr) return bytes = 1, cudaSuccess;
    return prefixkv::compress_host(plan, args);
  }

 private:
  model_ref mr_;
  rope_table rope_;
  host_forward_buffers fb_;
};

//! `batched_backend` on the host (for tests: it must behave exactly as cpu_backend does).
inline std::unique_ptr<backend> make_batched_host_backend(const model& m, std::string& err) {
  auto b = std::make_unique<batched_backend<host_ops>>(m);
  if (!b->init(err)) return nullptr;
  return b;
}

}  // namespace prefixkv_llama
