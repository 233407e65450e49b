// prefixkv-llama: the LLaMA forward pass for a batch of tokens from any number of sequences, written once as
// per-output "thread bodies" that run as CUDA kernels (cuda_forward.cuh) or as plain loops on the host
// (`forward_host`). Used by the CUDA backend (contiguous caches, one sequence) and by the serving loop (a paged pool,
// many sequences, prefills and decodes, on the GPU or on the host).
//
// Bit-identical to the host backend (cpu_backend.hpp): one body per output value, every sum in the order the host
// backend uses, every operation through math.hpp (no FMA contraction, the portable exponential, RoPE tables
// computed on the host). A token's values never depend on the other tokens of the batch or on the cache layout: the
// batch only decides which bodies run.
//
// A batch of n tokens: token i of cache sequence (slot) seq[i] at RoPE position pos[i], the off[i]-th of the cnt[i]
// tokens that sequence gets in this batch (off ascends with the position). Every layer appends token i's K/V at row
// len[l][seq][h] + off[i] of every kv head h and attends over rows [0, len + off + 1) — a prefill of a whole prompt
// into an empty cache (off = position, cnt = prompt length) and a decode step (off = 0, cnt = 1) alike; after the
// last layer every sequence's lengths grow by cnt.
#pragma once

#include "math.hpp"
#include "model.hpp"

#include <cstdint>
#include <vector>

namespace prefixkv_llama {

//! The model's shape and where its weights and RoPE table live (host or device memory).
struct model_ref {
  int dim = 0, hidden = 0, layers = 0, heads = 0, kv_heads = 0, vocab = 0, seq_len = 0, hs = 0, kv_dim = 0, group = 0;
  float att_scale = 0.f;
  const float *emb = nullptr, *rms_att = nullptr, *wq = nullptr, *wk = nullptr, *wv = nullptr, *wo = nullptr;
  const float *rms_ffn = nullptr, *w1 = nullptr, *w2 = nullptr, *w3 = nullptr, *rms_final = nullptr, *wcls = nullptr;
  const float *rope_cos = nullptr, *rope_sin = nullptr;  // (seq_len, hs / 2)

  //! The shape of `m` (pointers left null).
  static model_ref shape_of(const model& m) {
    const config& c = m.cfg;
    model_ref d;
    d.dim = c.dim, d.hidden = c.hidden_dim, d.layers = c.n_layers, d.heads = c.n_heads, d.kv_heads = c.n_kv_heads;
    d.vocab = c.vocab_size, d.seq_len = c.seq_len, d.hs = c.head_size(), d.kv_dim = c.kv_dim(), d.group = c.group();
    d.att_scale = 1.0f / std::sqrt(float(d.hs));  // as the host backend computes it
    return d;
  }
  //! Weight pointers relative to `base`, which holds a copy of the checkpoint's floats (m.w.data).
  void bind_weights(const model& m, const float* base) {
    auto at = [&](const float* hp) { return base + (hp - m.w.data.data()); };
    emb = at(m.w.emb), rms_att = at(m.w.rms_att), wq = at(m.w.wq), wk = at(m.w.wk), wv = at(m.w.wv);
    wo = at(m.w.wo), rms_ffn = at(m.w.rms_ffn), w1 = at(m.w.w1), w2 = at(m.w.w2), w3 = at(m.w.w3);
    rms_final = at(m.w.rms_final), wcls = at(m.w.wcls);
  }
};

//! Contiguous caches: K and V (layers, slots, kv_head, capacity, head_size).
struct contiguous_kv {
  float* k = nullptr;
  float* v = nullptr;
  int slots = 1, kv_heads = 0, capacity = 0, hs = 0;
  PKL_HD int64_t row(int l, int s, int h, int t) const {
    return (((int64_t(l) * slots + s) * kv_heads + h) * capacity + t) * hs;
  }
};

//! A paged pool shared by the layers: K and V pages (page, slot, kv_head, head_size) (NHD), block tables per
//! (layer, sequence): table[(l * slots + s) * max_blocks + block] is the page holding tokens [block * page_size, ...).
struct paged_kv {
  float* k = nullptr;
  float* v = nullptr;
  const int32_t* table = nullptr;
  int slots = 0, max_blocks = 0, page_size = 16, kv_heads = 0, hs = 0;
  PKL_HD int64_t row(int l, int s, int h, int t) const {
    const int64_t page = table[(int64_t(l) * slots + s) * max_blocks + t / page_size];
    return ((page * page_size + t % page_size) * kv_heads + h) * hs;
  }
};

//! One batch of tokens (see the file comment). Every pointer in the memory of the device that runs it.
struct batch_args {
  int n = 0;                     // tokens
  const int* token = nullptr;    // (n)
  const int* pos = nullptr;      // (n) RoPE positions, in [0, seq_len)
  const int* seq = nullptr;      // (n) cache sequence
  const int* off = nullptr;      // (n)
  const int* cnt = nullptr;      // (n)
  const int* rec = nullptr;      // (n) the token's sequence in P (-1: not recorded); null: nothing recorded
  int32_t* len = nullptr;        // (layers, slots, kv_heads) tokens cached
  int slots = 1;
  // attention probabilities, recorded for the scorer: (layers, rec_batch, q_head, p_tokens, p_tokens); row off[i] of
  // the token's sequence; the caller zeroes the buffer first (rows and columns past a sequence's length stay 0)
  float* P = nullptr;
  int rec_batch = 0;
  int64_t p_tokens = 0;
  // window queries of a one-sequence prefill: (layers, q_head, q_window, head_size), tokens with off >= q_first
  float* Q = nullptr;
  int q_first = 0, q_window = 0;
  // activations (n, dim) x3, (n, hidden), attention scratch (n, q_heads, seq_len)
  float *x = nullptr, *xb = nullptr, *q = nullptr, *hb = nullptr, *scratch = nullptr;
};

//! The bodies: each computes the outputs of one "thread" g of one step of the forward pass. `*_count` is the number
//! of bodies of a step.
namespace body {

PKL_HD int64_t embed_count(const model_ref& m, const batch_args& a) { return int64_t(a.n) * m.dim; }
PKL_HD void embed(const model_ref& m, const batch_args& a, int64_t g) {
  const int64_t t = g / m.dim, d = g % m.dim;
  a.x[g] = m.emb[int64_t(a.token[t]) * m.dim + d];
}

//! o[r] = RMSNorm(x[r]) * w (x and o may alias); one body per row, as the host backend.
PKL_HD void rmsnorm(const float* x, const float* w, float* o, int dim, int64_t r) {
  const float* xr = x + r * dim;
  float* orow = o + r * dim;
  const float s = rms_scale(xr, dim);
  for (int d = 0; d < dim; ++d) orow[d] = rms_apply(w[d], s, xr[d]);
}

//! Q, K, V (one body per pair of outputs), RoPE on Q and K, K and V appended to the cache.
PKL_HD int64_t qkv_count(const model_ref& m, const batch_args& a) { return int64_t(a.n) * (m.dim / 2 + m.kv_dim); }
template <class Cache>
PKL_HD void qkv(const model_ref& m, int l, const Cache& c, const batch_args& a, int64_t g) {
  const int qp = m.dim / 2, kp = m.kv_dim / 2, per = qp + 2 * kp;
  const int i = int(g / per), j = int(g % per);
  const float* x = a.xb + int64_t(i) * m.dim;
  const int D = m.dim, KV = m.kv_dim, hs = m.hs;
  const int pos = a.pos[i];
  if (j < qp) {  // query pair
    const int o = 2 * j;
    const float* w = m.wq + int64_t(l) * D * D;
    float e0 = dot(w + int64_t(o) * D, x, D), e1 = dot(w + int64_t(o + 1) * D, x, D);
    const int pi = (o % hs) / 2;
    rope_pair(e0, e1, m.rope_cos[int64_t(pos) * (hs / 2) + pi], m.rope_sin[int64_t(pos) * (hs / 2) + pi]);
    a.q[int64_t(i) * D + o] = e0;
    a.q[int64_t(i) * D + o + 1] = e1;
    if (a.Q && a.off[i] >= a.q_first) {
      const int h = o / hs;
      float* dst = a.Q + ((int64_t(l) * m.heads + h) * a.q_window + (a.off[i] - a.q_first)) * hs + o % hs;
      dst[0] = e0;
      dst[1] = e1;
    }
    return;
  }
  const bool is_k = j < qp + kp;
  const int o = 2 * (is_k ? j - qp : j - qp - kp);
  const float* w = (is_k ? m.wk : m.wv) + int64_t(l) * KV * D;
  float e0 = dot(w + int64_t(o) * D, x, D), e1 = dot(w + int64_t(o + 1) * D, x, D);
  const int h = o / hs, s = a.seq[i];
  if (is_k) {
    const int pi = (o % hs) / 2;
    rope_pair(e0, e1, m.rope_cos[int64_t(pos) * (hs / 2) + pi], m.rope_sin[int64_t(pos) * (hs / 2) + pi]);
  }
  const int t = a.len[(int64_t(l) * a.slots + s) * m.kv_heads + h] + a.off[i];
  float* dst = (is_k ? c.k : c.v) + c.row(l, s, h, t) + o % hs;
  dst[0] = e0;
  dst[1] = e1;
}

//! Attention of one (token, query head): scores over its kv head's cached rows, softmax, the probabilities recorded
//! when asked, the weighted sum of V into xb.
PKL_HD int64_t attention_count(const model_ref& m, const batch_args& a) { return int64_t(a.n) * m.heads; }
template <class Cache>
PKL_HD void attention(const model_ref& m, int l, const Cache& c, const batch_args& a, int64_t g) {
  const int i = int(g / m.heads), h = int(g % m.heads), kvh = h / m.group, s = a.seq[i], hs = m.hs;
  const int n = a.len[(int64_t(l) * a.slots + s) * m.kv_heads + kvh] + a.off[i] + 1;
  const float* q = a.q + int64_t(i) * m.dim + h * hs;
  const int r = a.P && a.rec ? a.rec[i] : -1;
  float* att = r >= 0 ? a.P + (((int64_t(l) * a.rec_batch + r) * m.heads + h) * a.p_tokens + a.off[i]) * a.p_tokens
                      : a.scratch + (int64_t(i) * m.heads + h) * m.seq_len;
  float mx = -INFINITY;
  for (int t = 0; t < n; ++t) {
    const float* kr = c.k + c.row(l, s, kvh, t);
    float d = 0.f;
    for (int e = 0; e < hs; ++e) d = f_add(d, f_mul(q[e], kr[e]));
    const float v = f_mul(d, m.att_scale);
    att[t] = v;
    if (mx < v) mx = v;  // std::max(mx, v)
  }
  float sum = 0.f;
  for (int t = 0; t < n; ++t) {
    const float e = exp_rn(f_sub(att[t], mx));
    att[t] = e;
    sum = f_add(sum, e);
  }
  const float inv = f_div(1.0f, sum);
  for (int t = 0; t < n; ++t) att[t] = f_mul(att[t], inv);
  float* out = a.xb + int64_t(i) * m.dim + h * hs;
  for (int e0 = 0; e0 < hs; e0 += 8) {  // every output element sums over t in order
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int w = hs - e0 < 8 ? hs - e0 : 8;
    for (int t = 0; t < n; ++t) {
      const float p = att[t];
      const float* vr = c.v + c.row(l, s, kvh, t) + e0;
      for (int u = 0; u < 8; ++u)
        if (u < w) acc[u] = f_add(acc[u], f_mul(p, vr[u]));
    }
    for (int u = 0; u < w; ++u) out[e0 + u] = acc[u];
  }
}

//! x[r][o] += W[o] . in[r] (W: (nout, nin)), one body per output.
PKL_HD void matmul_add(const float* in, const float* w, float* x, int nin, int nout, int64_t g) {
  const int64_t r = g / nout, o = g % nout;
  x[g] = f_add(x[g], dot(w + o * nin, in + r * nin, nin));
}

//! hb[r][j] = silu(w1[j] . xb[r]) * (w3[j] . xb[r]), one body per hidden unit.
PKL_HD void ffn_gate(const float* xb, const float* w1, const float* w3, float* hb, int dim, int hidden, int64_t g) {
  const int64_t r = g / hidden, j = g % hidden;
  hb[g] = silu_mul(dot(w1 + j * dim, xb + r * dim, dim), dot(w3 + j * dim, xb + r * dim, dim));
}

//! After the last layer: every sequence's lengths grow by its tokens (its last token's bodies do it).
PKL_HD int64_t grow_count(const model_ref& m, const batch_args& a) { return int64_t(a.n) * m.layers * m.kv_heads; }
PKL_HD void grow_lengths(const model_ref& m, const batch_args& a, int64_t g) {
  const int64_t per = int64_t(m.layers) * m.kv_heads;
  const int i = int(g / per), lh = int(g % per), l = lh / m.kv_heads, h = lh % m.kv_heads;
  if (a.off[i] != a.cnt[i] - 1) return;
  a.len[(int64_t(l) * a.slots + a.seq[i]) * m.kv_heads + h] += a.cnt[i];
}

//! The final RMSNorm of the rows whose logits are wanted: o[k] = RMSNorm(x[rows[k]]).
PKL_HD void final_norm(const model_ref& m, const float* x, const int* rows, float* o, int64_t r) {
  const float* xr = x + int64_t(rows[r]) * m.dim;
  const float s = rms_scale(xr, m.dim);
  for (int d = 0; d < m.dim; ++d) o[r * m.dim + d] = rms_apply(m.rms_final[d], s, xr[d]);
}

//! Logits: out[k][v] = wcls[v] . xn[k].
PKL_HD void classify(const model_ref& m, const float* xn, float* out, int64_t g) {
  const int64_t r = g / m.vocab, v = g % m.vocab;
  out[g] = dot(m.wcls + v * m.dim, xn + r * m.dim, m.dim);
}

}  // namespace body

//! Host memory for `forward_host`: activations of up to `tokens` tokens, `rows` logit rows.
struct host_forward_buffers {
  std::vector<float> x, xb, q, hb, scratch, xn, logits;
  void reserve(const model_ref& m, int n, int k) {
    const size_t t = size_t(n);
    if (x.size() < t * m.dim) {
      x.resize(t * m.dim), xb.resize(t * m.dim), q.resize(t * m.dim), hb.resize(t * m.hidden);
      scratch.resize(t * m.heads * size_t(m.seq_len));
    }
    if (xn.size() < size_t(k) * m.dim) xn.resize(size_t(k) * m.dim), logits.resize(size_t(k) * m.vocab);
  }
};

//! The whole forward pass of batch `a` over cache `c` on the host (the CUDA kernels' bodies, run as loops); the
//! logits of the k tokens listed in `rows` land in fb.logits (k, vocab).
template <class Cache>
void forward_host(const model_ref& m, const Cache& c, batch_args a, host_forward_buffers& fb, const int* rows, int k) {
  if (a.n <= 0) return;
  fb.reserve(m, a.n, k);
  a.x = fb.x.data(), a.xb = fb.xb.data(), a.q = fb.q.data(), a.hb = fb.hb.data(), a.scratch = fb.scratch.data();
  const int64_t n = a.n;
  for (int64_t g = 0; g < body::embed_count(m, a); ++g) body::embed(m, a, g);
  for (int l = 0; l < m.layers; ++l) {
    for (int64_t r = 0; r < n; ++r) body::rmsnorm(a.x, m.rms_att + int64_t(l) * m.dim, a.xb, m.dim, r);
    for (int64_t g = 0; g < body::qkv_count(m, a); ++g) body::qkv(m, l, c, a, g);
    for (int64_t g = 0; g < body::attention_count(m, a); ++g) body::attention(m, l, c, a, g);
    for (int64_t g = 0; g < n * m.dim; ++g)
      body::matmul_add(a.xb, m.wo + int64_t(l) * m.dim * m.dim, a.x, m.dim, m.dim, g);
    for (int64_t r = 0; r < n; ++r) body::rmsnorm(a.x, m.rms_ffn + int64_t(l) * m.dim, a.xb, m.dim, r);
    for (int64_t g = 0; g < n * m.hidden; ++g)
      body::ffn_gate(a.xb, m.w1 + int64_t(l) * m.hidden * m.dim, m.w3 + int64_t(l) * m.hidden * m.dim, a.hb, m.dim,
                     m.hidden, g);
    for (int64_t g = 0; g < n * m.dim; ++g)
      body::matmul_add(a.hb, m.w2 + int64_t(l) * m.dim * m.hidden, a.x, m.hidden, m.dim, g);
  }
  for (int64_t g = 0; g < body::grow_count(m, a); ++g) body::grow_lengths(m, a, g);
  for (int64_t r = 0; r < k; ++r) body::final_norm(m, a.x, rows, fb.xn.data(), r);
  for (int64_t g = 0; g < int64_t(k) * m.vocab; ++g) body::classify(m, fb.xn.data(), fb.logits.data(), g);
}

}  // namespace prefixkv_llama
