// prefixkv-llama: the CUDA backend (see cuda_backend.cuh). Caches: per layer K and V (kv_head, capacity, head_size)
// in one device buffer each, lengths per (layer, kv head) on the device with a host mirror. The compressor is the
// device one (`prefixkv::compress`) on `kv_layers` views of those caches; its inputs (the prefill's attention
// probabilities or window queries) stay on the device.
#include "cuda_backend.cuh"
#include "cuda_forward.cuh"

#include <prefixkv/compress/compress.cuh>

#include <algorithm>

namespace prefixkv_llama {
namespace {

using gpu::dev_array;

class cuda_backend final : public backend {
 public:
  explicit cuda_backend(const model& m) : m_(m) {}
  ~cuda_backend() override {
    if (st_) cudaStreamDestroy(st_);
  }

  bool init(std::string& err) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0)
      return err = std::string("--device cuda: no CUDA device is usable (") +
                   (e == cudaSuccess ? "0 devices" : cudaGetErrorString(e)) + ")",
             false;
    PKL_CUDA_TRY(cudaStreamCreateWithFlags(&st_, cudaStreamNonBlocking), err);
    if (!store_.upload(m_, err)) return false;
    const model_ref& d = store_.m;
    cap_ = d.seq_len;
    const size_t cache = size_t(d.layers) * d.kv_heads * size_t(cap_) * d.hs;
    if (!k_.reserve(cache, err) || !v_.reserve(cache, err) || !len_d_.reserve(size_t(d.layers) * d.kv_heads, err) ||
        !batch_.reserve(6 * size_t(cap_), err) || !one_.reserve(2, err) ||
        !out_len_.reserve(size_t(d.layers) * d.kv_heads, err))
      return false;
    for (auto& s : saved_)
      if (!s.k.reserve(cache, err) || !s.v.reserve(cache, err)) return false;
    PKL_CUDA_TRY(cudaMemset(k_.p, 0, sizeof(float) * cache), err);
    PKL_CUDA_TRY(cudaMemset(v_.p, 0, sizeof(float) * cache), err);
    len_.assign(size_t(d.layers) * d.kv_heads, 0);
    return upload_lengths(err);
  }

  const config& cfg() const override { return m_.cfg; }
  const char* device() const override { return "cuda"; }
  void reset() override {
    std::fill(len_.begin(), len_.end(), 0);
    std::string err;
    (void)upload_lengths(err);
  }

  bool prefill(const int* tokens, int n, const prefill_record& rec, std::vector<float>& logits,
               std::string& err) override {
    const model_ref& d = store_.m;
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
    if (rec.attention) {
      const size_t p = size_t(d.layers) * d.heads * size_t(n) * size_t(n);
      if (!P_.reserve(p, err)) return false;
      PKL_CUDA_TRY(cudaMemsetAsync(P_.p, 0, sizeof(float) * p, st_), err);
      a.P = P_.p;
      a.rec_batch = 1;
      a.p_tokens = n;
    }
    if (window_ > 0) {
      if (!Q_.reserve(size_t(d.layers) * d.heads * size_t(window_) * d.hs, err)) return false;
      a.Q = Q_.p;
      a.q_first = n - window_;
      a.q_window = window_;
    }
    std::vector<int> host(6 * size_t(n));  // token, pos, seq, off, cnt, rec
    for (int i = 0; i < n; ++i) {
      host[i] = tokens[i];
      host[n + i] = i;
      host[2 * n + i] = 0;
      host[3 * n + i] = i;
      host[4 * n + i] = n;
      host[5 * n + i] = 0;
    }
    if (!run(host, n, a, n - 1, logits, err)) return false;
    prefilled_ = true;
    return true;
  }

  bool step(int token, int pos, std::vector<float>& logits, std::string& err) override {
    const model_ref& d = store_.m;
    if (token < 0 || token >= d.vocab) return err = "token id out of range", false;
    if (pos < 0 || pos >= d.seq_len)
      return err = "position " + std::to_string(pos) + " outside the context (seq_len " + std::to_string(cap_) + ")",
             false;
    for (int32_t x : len_)
      if (x >= cap_) return err = "the cache is full (seq_len " + std::to_string(cap_) + ")", false;
    std::vector<int> host{token, pos, 0, 0, 1, -1};
    if (!run(host, 1, batch_args{}, 0, logits, err)) return false;
    prefilled_ = false;
    return true;
  }

  bool compress(const prefixkv::compress_plan& plan, std::string& err) override {
    namespace pk = prefixkv;
    const model_ref& d = store_.m;
    const int L = d.layers, Hk = d.kv_heads, Hq = d.heads, hs = d.hs;
    if (!prefilled_) return err = "compress: the caches must come straight from a prefill", false;
    for (int32_t x : len_)
      if (x != prompt_len_) return err = "compress: the caches were already compressed", false;
    const pk::scorer_kind sk = plan.cfg.scorer;
    if (sk == pk::scorer_kind::attention && !has_attention_)
      return err = "compress: the prefill did not record attention probabilities", false;
    if (sk == pk::scorer_kind::window && window_ == 0)
      return err = "compress: the prefill did not record window queries", false;
    std::vector<pk::kv_view<float>> kv(L), vv(L);
    std::vector<pk::kv_view<const float>> pv, qv;
    const size_t per_layer = size_t(Hk) * size_t(cap_) * hs;
    for (int l = 0; l < L; ++l) {
      kv[l] = pk::make_kv_view_bhsd(k_.p + l * per_layer, 1, Hk, cap_, hs);
      vv[l] = pk::make_kv_view_bhsd(v_.p + l * per_layer, 1, Hk, cap_, hs);
    }
    pk::compress_args<pk::kv_layers<float>, float> a;
    a.cache = pk::kv_layers<float>{kv.data(), vv.data(), nullptr, nullptr, L};
    const int32_t host_n[2] = {prompt_len_, 0};
    PKL_CUDA_TRY(cudaMemcpyAsync(one_.p, host_n, sizeof(host_n), cudaMemcpyHostToDevice, st_), err);
    a.lengths = one_.p;
    const int64_t T = prompt_len_;
    if (sk == pk::scorer_kind::attention) {
      pv.resize(L);
      for (int l = 0; l < L; ++l)
        pv[l] = pk::make_kv_view_bhsd(static_cast<const float*>(P_.p) + size_t(l) * Hq * T * T, 1, Hq, T, T);
      a.attention = pv.data();
    }
    if (sk == pk::scorer_kind::window) {
      qv.resize(L);
      for (int l = 0; l < L; ++l)
        qv[l] = pk::make_kv_view_bhsd(static_cast<const float*>(Q_.p) + size_t(l) * Hq * window_ * hs, 1, Hq,
                                      window_, hs);
      a.queries = qv.data();
    }
    a.out.lengths = out_len_.p;
    a.out.status = one_.p + 1;
    // The window and key-norm scores: the library's host twins on this cache's K and the recorded Q (both equal to
    // the host backend's, bit for bit), handed to the device compressor as caller scores. The device scorers round
    // differently from their twins (fused multiply-adds, a fast exp2), which could move a near-tie across the budget;
    // the accumulated-attention scorer and the rest of the chain are equal on both.
    pk::compress_plan run_plan = plan;
    if (sk == pk::scorer_kind::window || sk == pk::scorer_kind::key_norm) {
      if (!host_scores(plan, err)) return false;
      if (have_scores_) {
        run_plan.cfg.scorer = pk::scorer_kind::scores;
        a.scores = scores_.p;
        a.score_stride = T;
      }  // else the scorer refused its input: the device chain reports the same reason
    }
    size_t bytes = 0;
    if (pk::compress(nullptr, bytes, run_plan, a, st_) != cudaSuccess) return err = pk::last_error().message, false;
    if (!ws_.reserve(bytes, err)) return false;
    if (pk::compress(ws_.p, bytes, run_plan, a, st_) != cudaSuccess) return err = pk::last_error().message, false;
    const int64_t segs = plan.segments(1);
    std::vector<int32_t> out(size_t(segs) + 1);
    PKL_CUDA_TRY(cudaMemcpyAsync(out.data(), out_len_.p, sizeof(int32_t) * segs, cudaMemcpyDeviceToHost, st_), err);
    PKL_CUDA_TRY(cudaMemcpyAsync(out.data() + segs, one_.p + 1, sizeof(int32_t), cudaMemcpyDeviceToHost, st_), err);
    PKL_CUDA_TRY(cudaStreamSynchronize(st_), err);
    if (out[size_t(segs)] != 0) {  // the chain stopped on the device: the reason the host backend would give
      const auto why = static_cast<pk::reason>(out[size_t(segs)]);
      (void)pk::detail::fail(why, pk::detail::compress_message(why));
      return err = pk::last_error().message, false;
    }
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < Hk; ++h)
        len_[size_t(l) * Hk + h] = out[size_t(l) * plan.seg_heads + (plan.seg_heads > 1 ? h : 0)];
    prefilled_ = false;
    return upload_lengths(err);
  }

  std::vector<int32_t> lengths() const override { return len_; }

  //! Window / key-norm scores of the prefilled caches with the host twins (see `compress`): scores_ holds them as
  //! caller scores (layers, 1[, kv heads], prompt_len), have_scores_ says whether the scorer accepted its input.
  bool host_scores(const prefixkv::compress_plan& plan, std::string& err) {
    namespace pk = prefixkv;
    const model_ref& d = store_.m;
    const int L = d.layers, Hk = d.kv_heads, Hq = d.heads, hs = d.hs;
    const int64_t T = prompt_len_, H = plan.seg_heads;
    const size_t per_layer = size_t(Hk) * size_t(cap_) * hs;
    std::vector<float> k(size_t(L) * per_layer), q;
    PKL_CUDA_TRY(cudaMemcpyAsync(k.data(), k_.p, sizeof(float) * k.size(), cudaMemcpyDeviceToHost, st_), err);
    if (plan.cfg.scorer == pk::scorer_kind::window) {
      q.resize(size_t(L) * Hq * window_ * hs);
      PKL_CUDA_TRY(cudaMemcpyAsync(q.data(), Q_.p, sizeof(float) * q.size(), cudaMemcpyDeviceToHost, st_), err);
    }
    PKL_CUDA_TRY(cudaStreamSynchronize(st_), err);
    const int64_t S = L * H;
    std::vector<int64_t> begins(static_cast<size_t>(S)), lens(static_cast<size_t>(S), T);
    for (int64_t sgi = 0; sgi < S; ++sgi) begins[size_t(sgi)] = sgi * T;
    const auto rows = pk::make_ragged_segments(S, begins.data(), lens.data());
    const pk::segment_grid grid{L, 1, H};
    std::vector<float> sc(size_t(S * T), 0.f);
    have_scores_ = true;
    for (int l = 0; l < L && have_scores_; ++l) {
      // as the host compressor sees them: K over the plan's token capacity, Q over the recorded window
      const auto kv = pk::make_kv_view_bhsd(static_cast<const float*>(k.data()) + l * per_layer, 1, Hk, cap_, hs)
                          .with_tokens(std::min<int64_t>(cap_, plan.cfg.max_tokens));
      cudaError_t e;
      if (plan.cfg.scorer == pk::scorer_kind::window) {
        const auto qv =
            pk::make_kv_view_bhsd(static_cast<const float*>(q.data()) + size_t(l) * Hq * window_ * hs, 1, Hq, window_, hs);
        e = pk::window_attention_host(qv, kv, pk::lse_view{}, plan.cfg.window, grid, l, rows, sc.data());
      } else {
        e = pk::key_norm_host(kv, pk::key_norm_options{true}, grid, l, rows, sc.data());
      }
      have_scores_ = e == cudaSuccess;
    }
    if (!have_scores_) return true;
    if (!scores_.reserve(sc.size(), err)) return false;
    PKL_CUDA_TRY(cudaMemcpyAsync(scores_.p, sc.data(), sizeof(float) * sc.size(), cudaMemcpyHostToDevice, st_), err);
    return true;
  }

  void save(int slot) override {
    snapshot& s = saved_[slot & 1];
    const size_t bytes = sizeof(float) * k_.n;
    cudaMemcpyAsync(s.k.p, k_.p, bytes, cudaMemcpyDeviceToDevice, st_);
    cudaMemcpyAsync(s.v.p, v_.p, bytes, cudaMemcpyDeviceToDevice, st_);
    cudaStreamSynchronize(st_);
    s.len = len_;
    s.prefilled = prefilled_;
  }
  void restore(int slot) override {
    const snapshot& s = saved_[slot & 1];
    const size_t bytes = sizeof(float) * k_.n;
    cudaMemcpyAsync(k_.p, s.k.p, bytes, cudaMemcpyDeviceToDevice, st_);
    cudaMemcpyAsync(v_.p, s.v.p, bytes, cudaMemcpyDeviceToDevice, st_);
    len_ = s.len;
    prefilled_ = s.prefilled;
    std::string err;
    (void)upload_lengths(err);
  }

 private:
  bool upload_lengths(std::string& err) {
    PKL_CUDA_TRY(cudaMemcpyAsync(len_d_.p, len_.data(), sizeof(int32_t) * len_.size(), cudaMemcpyHostToDevice, st_),
                 err);
    PKL_CUDA_TRY(cudaStreamSynchronize(st_), err);
    return true;
  }

  //! One batch of n tokens of sequence 0 (`host`: token, pos, seq, off, cnt, rec columns); the logits of token
  //! `last`.
  bool run(const std::vector<int>& host, int n, batch_args a, int last, std::vector<float>& logits,
           std::string& err) {
    const model_ref& d = store_.m;
    if (!batch_.reserve(host.size() + 1, err)) return false;
    int* b = batch_.p;
    PKL_CUDA_TRY(cudaMemcpyAsync(b, host.data(), sizeof(int) * host.size(), cudaMemcpyHostToDevice, st_), err);
    PKL_CUDA_TRY(cudaMemcpyAsync(b + host.size(), &last, sizeof(int), cudaMemcpyHostToDevice, st_), err);
    a.n = n;
    a.token = b, a.pos = b + n, a.seq = b + 2 * n, a.off = b + 3 * n, a.cnt = b + 4 * n, a.rec = b + 5 * n;
    a.len = len_d_.p;
    a.slots = 1;
    contiguous_kv c;
    c.k = k_.p, c.v = v_.p, c.slots = 1, c.kv_heads = d.kv_heads, c.capacity = cap_, c.hs = d.hs;
    if (!gpu::forward(d, c, a, fb_, b + host.size(), 1, st_, err)) return false;
    logits.resize(size_t(d.vocab));
    PKL_CUDA_TRY(cudaMemcpyAsync(logits.data(), fb_.logits.p, sizeof(float) * d.vocab, cudaMemcpyDeviceToHost, st_),
                 err);
    PKL_CUDA_TRY(cudaStreamSynchronize(st_), err);
    for (int32_t& x : len_) x += n;
    return true;
  }

  struct snapshot {
    dev_array<float> k, v;
    std::vector<int32_t> len;
    bool prefilled = false;
  };
  const model& m_;
  cudaStream_t st_ = nullptr;
  gpu::dev_model_store store_;
  gpu::forward_buffers fb_;
  int cap_ = 0;
  dev_array<float> k_, v_, P_, Q_, scores_;
  bool have_scores_ = false;
  dev_array<int32_t> len_d_, out_len_, one_;  // one_: the prompt length and the compressor's status word
  dev_array<int> batch_;
  dev_array<unsigned char> ws_;
  std::vector<int32_t> len_;  // (layer, kv_head)
  int prompt_len_ = 0, window_ = 0;
  bool has_attention_ = false, prefilled_ = false;
  snapshot saved_[2];
};

}  // namespace

std::unique_ptr<backend> make_cuda_backend(const model& m, std::string& err) {
  auto b = std::make_unique<cuda_backend>(m);
  if (!b->init(err)) return nullptr;
  return b;
}

}  // namespace prefixkv_llama
