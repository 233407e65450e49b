// prefixkv-llama: the batched forward pass (batch_forward.hpp) as CUDA kernels, one thread per body, and the device
// memory it needs (CUDA translation units only).
#pragma once

#include "batch_forward.hpp"

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace prefixkv_llama {
namespace gpu {

//! A CUDA runtime call that failed: the message, false.
inline bool cuda_fail(cudaError_t e, const char* what, std::string& err) {
  err = std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e);
  return false;
}
#define PKL_CUDA_TRY(call, err)                                    \
  do {                                                             \
    const cudaError_t pkl_e_ = (call);                             \
    if (pkl_e_ != cudaSuccess) return ::prefixkv_llama::gpu::cuda_fail(pkl_e_, #call, err); \
  } while (0)

//! A device allocation (freed by the owner).
template <class T>
struct dev_array {
  T* p = nullptr;
  size_t n = 0;
  dev_array() = default;
  dev_array(const dev_array&) = delete;
  dev_array& operator=(const dev_array&) = delete;
  ~dev_array() { reset(); }
  void reset() {
    if (p) cudaFree(p);
    p = nullptr;
    n = 0;
  }
  //! At least `count` elements (contents not kept when it grows).
  bool reserve(size_t count, std::string& err) {
    if (count <= n && p) return true;
    reset();
    const cudaError_t e = cudaMalloc(&p, sizeof(T) * (count ? count : 1));
    if (e != cudaSuccess) {
      p = nullptr;
      return cuda_fail(e, "cudaMalloc", err);
    }
    n = count;
    return true;
  }
};

//! Owner of the device copy of a model: the checkpoint's floats and the RoPE table.
struct dev_model_store {
  model_ref m;
  dev_array<float> weights, rope;
  bool upload(const model& host, std::string& err) {
    m = model_ref::shape_of(host);
    const std::vector<float>& w = host.w.data;
    if (!weights.reserve(w.size(), err)) return false;
    PKL_CUDA_TRY(cudaMemcpy(weights.p, w.data(), sizeof(float) * w.size(), cudaMemcpyHostToDevice), err);
    m.bind_weights(host, weights.p);
    const rope_table t(m.hs, m.seq_len);
    if (!rope.reserve(t.cos.size() * 2, err)) return false;
    PKL_CUDA_TRY(cudaMemcpy(rope.p, t.cos.data(), sizeof(float) * t.cos.size(), cudaMemcpyHostToDevice), err);
    PKL_CUDA_TRY(cudaMemcpy(rope.p + t.cos.size(), t.sin.data(), sizeof(float) * t.sin.size(), cudaMemcpyHostToDevice),
                 err);
    m.rope_cos = rope.p;
    m.rope_sin = rope.p + t.cos.size();
    return true;
  }
};

constexpr int threads = 128;
inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + threads - 1) / threads); }

// One kernel per step of the forward pass: thread g runs body g (batch_forward.hpp).
template <int = 0>
__global__ void __launch_bounds__(threads) embed_kernel(model_ref m, batch_args a) {
  const int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (g < body::embed_count(m, a)) body::embed(m, a, g);
}
template <int = 0>
__global__ void __launch_bounds__(threads) rmsnorm_kernel(const float* x, const float* w, float* o, int n, int dim) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r < n) body::rmsnorm(x, w, o, dim, r);
}
template <class Cache>
__global__ void __launch_bounds__(threads) qkv_kernel(model_ref m, int l, Cache c, batch_args a) {
  const int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (g < body::qkv_count(m, a)) body::qkv(m, l, c, a, g);
}
template <class Cache>
__global__ void __launch_bounds__(threads) attention_kernel(model_ref m, int l, Cache c, batch_args a) {
  const int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (g < body::attention_count(m, a)) body::attention(m, l, c, a, g);
}
template <int = 0>
__global__ void __launch_bounds__(threads) matmul_add_kernel(const float* in, const float* w, float* x, int n, int nin,
                                                             int nout) {
  const int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (g < int64_t(n) * nout) body::matmul_add(in, w, x, nin, nout, g);
}
template <int = 0>
__global__ void __launch_bounds__(threads) ffn_gate_kernel(const float* xb, const float* w1, const float* w3, float* hb,
                                                           int n, int dim, int hidden) {
  const int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (g < int64_t(n) * hidden) body::ffn_gate(xb, w1, w3, hb, dim, hidden, g);
}
template <int = 0>
__global__ void __launch_bounds__(threads) grow_lengths_kernel(model_ref m, batch_args a) {
  const int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (g < body::grow_count(m, a)) body::grow_lengths(m, a, g);
}
template <int = 0>
__global__ void __launch_bounds__(threads) final_norm_kernel(model_ref m, const float* x, const int* rows, int k,
                                                             float* o) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r < k) body::final_norm(m, x, rows, o, r);
}
template <int = 0>
__global__ void __launch_bounds__(threads) classify_kernel(model_ref m, const float* xn, int k, float* out) {
  const int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (g < int64_t(k) * m.vocab) body::classify(m, xn, out, g);
}

//! Activation buffers for batches of up to `tokens` tokens and `rows` logit rows.
struct forward_buffers {
  dev_array<float> x, xb, q, hb, scratch, xn, logits;
  int tokens = 0, rows = 0;
  bool reserve(const model_ref& m, int n, int k, std::string& err) {
    if (n > tokens) {
      const size_t t = size_t(n);
      if (!x.reserve(t * m.dim, err) || !xb.reserve(t * m.dim, err) || !q.reserve(t * m.dim, err) ||
          !hb.reserve(t * m.hidden, err) || !scratch.reserve(t * m.heads * size_t(m.seq_len), err))
        return false;
      tokens = n;
    }
    if (k > rows) {
      if (!xn.reserve(size_t(k) * m.dim, err) || !logits.reserve(size_t(k) * m.vocab, err)) return false;
      rows = k;
    }
    return true;
  }
  void bind(batch_args& a) {
    a.x = x.p, a.xb = xb.p, a.q = q.p, a.hb = hb.p, a.scratch = scratch.p;
  }
};

//! Launch the whole forward pass of batch `a` over cache `c`; the logits of the k tokens listed in `rows` (device)
//! land in fb.logits (k, vocab). Asynchronous on `st`; false with a reason on a launch error.
template <class Cache>
bool forward(const model_ref& m, const Cache& c, batch_args a, forward_buffers& fb, const int* rows, int k,
             cudaStream_t st, std::string& err) {
  if (a.n <= 0) return true;
  if (!fb.reserve(m, a.n, k, err)) return false;
  fb.bind(a);
  const int64_t n = a.n;
  embed_kernel<><<<blocks_for(n * m.dim), threads, 0, st>>>(m, a);
  for (int l = 0; l < m.layers; ++l) {
    rmsnorm_kernel<><<<blocks_for(n), threads, 0, st>>>(a.x, m.rms_att + int64_t(l) * m.dim, a.xb, a.n, m.dim);
    qkv_kernel<Cache><<<blocks_for(n * (m.dim / 2 + m.kv_dim)), threads, 0, st>>>(m, l, c, a);
    attention_kernel<Cache><<<blocks_for(n * m.heads), threads, 0, st>>>(m, l, c, a);
    // the attention output is in xb; wo's product is added to the residual stream x
    matmul_add_kernel<><<<blocks_for(n * m.dim), threads, 0, st>>>(a.xb, m.wo + int64_t(l) * m.dim * m.dim, a.x, a.n,
                                                                   m.dim, m.dim);
    rmsnorm_kernel<><<<blocks_for(n), threads, 0, st>>>(a.x, m.rms_ffn + int64_t(l) * m.dim, a.xb, a.n, m.dim);
    ffn_gate_kernel<><<<blocks_for(n * m.hidden), threads, 0, st>>>(a.xb, m.w1 + int64_t(l) * m.hidden * m.dim,
                                                                    m.w3 + int64_t(l) * m.hidden * m.dim, a.hb, a.n,
                                                                    m.dim, m.hidden);
    matmul_add_kernel<><<<blocks_for(n * m.dim), threads, 0, st>>>(a.hb, m.w2 + int64_t(l) * m.dim * m.hidden, a.x,
                                                                   a.n, m.hidden, m.dim);
  }
  grow_lengths_kernel<><<<blocks_for(n * m.layers * m.kv_heads), threads, 0, st>>>(m, a);
  if (k > 0) {
    final_norm_kernel<><<<blocks_for(k), threads, 0, st>>>(m, a.x, rows, k, fb.xn.p);
    classify_kernel<><<<blocks_for(int64_t(k) * m.vocab), threads, 0, st>>>(m, fb.xn.p, k, fb.logits.p);
  }
  PKL_CUDA_TRY(cudaGetLastError(), err);
  return true;
}

}  // namespace gpu
}  // namespace prefixkv_llama
