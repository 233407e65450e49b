// prefixkv-llama: llama2.c checkpoints (the model description and its float32 weights, held on the host).
//
// File format (little-endian): 7 x int32 header {dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
// seq_len}, then float32 tensors in this order: token embedding (vocab, dim); per layer RMSNorm of attention (L, dim);
// wq (L, dim, dim); wk (L, kv_dim, dim); wv (L, kv_dim, dim); wo (L, dim, dim); RMSNorm of the feed-forward (L, dim);
// w1 (L, hidden, dim); w2 (L, dim, hidden); w3 (L, hidden, dim); final RMSNorm (dim); the legacy RoPE tables
// (seq_len, head_size / 2) twice (unused: RoPE is computed); the classifier (vocab, dim) only when vocab_size is
// negative in the header (a positive vocab_size means the classifier shares the embedding).
//
// `load_checkpoint` validates everything before it trusts a size: every header field, the products (checked, in
// 64 bits), the file size (it must hold exactly the header and the tensors the header announces) and every weight
// (finite). Errors come back as one line of text.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace prefixkv_llama {

//! The model's shape, as read from the checkpoint header.
struct config {
  int dim = 0, hidden_dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, vocab_size = 0, seq_len = 0;
  bool shared_classifier = true;
  int head_size() const { return dim / n_heads; }
  int kv_dim() const { return head_size() * n_kv_heads; }
  int group() const { return n_heads / n_kv_heads; }
};

//! Weights: views into one float buffer (row-major, W (out, in)).
struct weights {
  std::vector<float> data;
  const float *emb = nullptr, *rms_att = nullptr, *wq = nullptr, *wk = nullptr, *wv = nullptr, *wo = nullptr;
  const float *rms_ffn = nullptr, *w1 = nullptr, *w2 = nullptr, *w3 = nullptr, *rms_final = nullptr, *wcls = nullptr;
};

//! A loaded model: shape + weights (host memory; a device backend uploads them).
struct model {
  config cfg;
  weights w;
};

namespace detail {

//! Checked a * b for non-negative 64-bit values; false on overflow.
inline bool mul_ok(int64_t a, int64_t b, int64_t& out) {
  if (a < 0 || b < 0) return false;
  if (a != 0 && b > INT64_MAX / a) return false;
  out = a * b;
  return true;
}
inline bool add_ok(int64_t a, int64_t b, int64_t& out) {
  if (a < 0 || b < 0 || a > INT64_MAX - b) return false;
  out = a + b;
  return true;
}

//! Size of a file in bytes, -1 when it cannot be determined.
inline int64_t file_size(std::FILE* f) {
  if (std::fseek(f, 0, SEEK_END) != 0) return -1;
  const long n = std::ftell(f);
  if (n < 0 || std::fseek(f, 0, SEEK_SET) != 0) return -1;
  return static_cast<int64_t>(n);
}

}  // namespace detail

//! The float counts of every tensor, in file order, for a validated header; false if any product overflows.
inline bool checkpoint_floats(const config& c, int64_t& total) {
  using detail::add_ok;
  using detail::mul_ok;
  const int64_t L = c.n_layers, D = c.dim, KV = c.kv_dim(), H = c.hidden_dim, V = c.vocab_size;
  const int64_t S = c.seq_len, hs = c.head_size();
  int64_t emb, dd, dkv, hd, ld, rope, t = 0;
  if (!mul_ok(V, D, emb) || !mul_ok(D, D, dd) || !mul_ok(D, KV, dkv) || !mul_ok(H, D, hd) || !mul_ok(L, D, ld) ||
      !mul_ok(S, hs, rope))
    return false;
  int64_t l_dd, l_dkv, l_hd;
  if (!mul_ok(L, dd, l_dd) || !mul_ok(L, dkv, l_dkv) || !mul_ok(L, hd, l_hd)) return false;
  const int64_t parts[] = {emb, ld, l_dd, l_dkv, l_dkv, l_dd, ld, l_hd, l_hd, l_hd, D, rope};
  for (int64_t p : parts)
    if (!add_ok(t, p, t)) return false;
  if (!c.shared_classifier && !add_ok(t, emb, t)) return false;
  total = t;
  return true;
}

//! Load and validate a llama2.c checkpoint. Returns false with a one-line reason in `err`.
inline bool load_checkpoint(const std::string& path, model& m, std::string& err) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return err = "cannot open the checkpoint " + path, false;
  auto bad = [&](const std::string& why) {
    std::fclose(f);
    err = "malformed checkpoint " + path + ": " + why;
    return false;
  };
  const int64_t bytes = detail::file_size(f);
  if (bytes < 0) return bad("cannot determine its size");
  int32_t h[7];
  if (bytes < int64_t(sizeof(h)) || std::fread(h, sizeof(h), 1, f) != 1) return bad("shorter than the 28-byte header");
  config c;
  c.dim = h[0];
  c.hidden_dim = h[1];
  c.n_layers = h[2];
  c.n_heads = h[3];
  c.n_kv_heads = h[4];
  c.shared_classifier = h[5] > 0;
  c.vocab_size = h[5] == INT32_MIN ? 0 : (h[5] < 0 ? -h[5] : h[5]);
  c.seq_len = h[6];
  // generous limits: far beyond the tiny models this runtime is for, well inside every 64-bit product
  auto in = [](int v, int lo, int hi) { return v >= lo && v <= hi; };
  if (!in(c.dim, 1, 1 << 16) || !in(c.hidden_dim, 1, 1 << 18) || !in(c.n_layers, 1, 1024) ||
      !in(c.n_heads, 1, 1 << 12) || !in(c.n_kv_heads, 1, 1 << 12) || !in(c.vocab_size, 1, 1 << 20) ||
      !in(c.seq_len, 1, 1 << 20))
    return bad("a header field is out of range (dim " + std::to_string(c.dim) + ", hidden_dim " +
               std::to_string(c.hidden_dim) + ", n_layers " + std::to_string(c.n_layers) + ", n_heads " +
               std::to_string(c.n_heads) + ", n_kv_heads " + std::to_string(c.n_kv_heads) + ", vocab_size " +
               std::to_string(h[5]) + ", seq_len " + std::to_string(c.seq_len) + ")");
  if (c.dim % c.n_heads != 0) return bad("dim is not a multiple of n_heads");
  if (c.n_heads % c.n_kv_heads != 0) return bad("n_heads is not a multiple of n_kv_heads");
  if (c.head_size() % 2 != 0) return bad("the head size is odd (RoPE rotates pairs of dimensions)");
  int64_t floats = 0, need = 0;
  if (!checkpoint_floats(c, floats) || !detail::mul_ok(floats, 4, need) || !detail::add_ok(need, 28, need))
    return bad("the header's sizes overflow");
  if (bytes != need)
    return bad("the file has " + std::to_string(bytes) + " bytes, the header announces " + std::to_string(need));
  std::vector<float> data;
  try {
    data.resize(static_cast<size_t>(floats));
  } catch (...) {
    return bad("out of memory for " + std::to_string(floats) + " weights");
  }
  if (std::fread(data.data(), sizeof(float), data.size(), f) != data.size()) return bad("read error");
  std::fclose(f);
  for (float x : data)
    if (!std::isfinite(x)) return err = "malformed checkpoint " + path + ": a weight is NaN or infinite", false;
  m.cfg = c;
  m.w.data.swap(data);
  const float* p = m.w.data.data();
  auto take = [&](int64_t n) {
    const float* q = p;
    p += n;
    return q;
  };
  const int64_t L = c.n_layers, D = c.dim, KV = c.kv_dim(), H = c.hidden_dim, V = c.vocab_size;
  m.w.emb = take(V * D);
  m.w.rms_att = take(L * D);
  m.w.wq = take(L * D * D);
  m.w.wk = take(L * KV * D);
  m.w.wv = take(L * KV * D);
  m.w.wo = take(L * D * D);
  m.w.rms_ffn = take(L * D);
  m.w.w1 = take(L * H * D);
  m.w.w2 = take(L * D * H);
  m.w.w3 = take(L * H * D);
  m.w.rms_final = take(D);
  take(int64_t(c.seq_len) * c.head_size());  // legacy RoPE tables
  m.w.wcls = c.shared_classifier ? m.w.emb : take(V * D);
  return true;
}

}  // namespace prefixkv_llama
