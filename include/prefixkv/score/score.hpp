//! \file prefixkv/score/score.hpp
//! Token-importance scorers, host twins (plain C++17). The CUDA versions live in `prefixkv/score/score.cuh`
//! and follow exactly the semantics written here.
//!
//! Every scorer scores ONE layer and writes one float32 row per (layer, sequence) — or per (layer, sequence,
//! kv-head) — of a flat output addressed through `segments rows` numbered by `segment_grid grid`
//! (`rows.count == grid.count()`, row id `grid.id(layer, b, h)`). `grid.heads` selects the output:
//! 1 = layer rows, kv_heads = one row per kv head. The length of row (layer, b) is the number of cached tokens
//! n_b of sequence b (n_b <= the token extent of the input tensor, which may be a padded capacity).
//!
//! 1. `accumulated_attention_host` — the paper's scorer, from materialised probabilities P (batch, q_head,
//!    query, key): score[k] = sum_q ( (sum_{h in group} P[b,h,q,k]) / |group| ), fp32 accumulation in exactly
//!    this order (the device kernel uses the same order and matches bit for bit).
//! 2. `window_attention_host` — observation-window attention from Q (batch, q_head, w, dim) and K (batch,
//!    kv_head, token, dim) without materialising probabilities: window query i sits at position n_b - w + i and
//!    sees keys t <= n_b - w + i (causal inside the window). With l = scale * q.k and
//!    lse_i = log sum_t exp(l_t) (or the caller's LSE), A[h, t] = sum_i exp(l_{i,t} - lse_i);
//!    group reduction over the q heads of a kv head (mean|max), optional 1-D pooling along tokens (max|avg, odd
//!    kernel, zero padding counted by avg as in torch's avg_pool1d), then head reduction (mean|max) for layer
//!    rows.
//! 3. `key_norm_host` — minus the L2 norm of each key, mean over kv heads (or 1/||k|| when asked, a
//!    non-negative score usable by the curve builders, which need scores >= 0).
//!
//! Inputs are `kv_view<const T>` with T in {float, f16, bf16} (see core/numeric.hpp). NaN/Inf inputs make the
//! host twins return `reason::nonfinite_input` before writing anything.
//!
//! \code
//! // one layer, batch 2, layer rows (grid.heads == 1), contiguous output rows of 4096 tokens each
//! prefixkv::segment_grid grid{32, 2, 1};
//! auto rows = prefixkv::make_uniform_segments(grid.count(), 4096);
//! prefixkv::window_options opt;                 // scale 1/sqrt(dim), group mean, no pooling, head mean
//! auto e = prefixkv::window_attention_host(q, k, prefixkv::lse_view{}, opt, grid, /*layer*/ 3, rows, scores);
//! \endcode
#pragma once

#include "../core/error.hpp"
#include "../core/numeric.hpp"
#include "../core/validate.hpp"
#include "../core/views.hpp"

#include <cmath>
#include <vector>

PREFIXKV_NAMESPACE_BEGIN

//! Reductions over heads.
enum class head_reduce : int { mean = 0, max = 1 };
//! 1-D pooling along tokens.
enum class pool_kind : int { none = 0, max = 1, avg = 2 };

//! Options of the observation-window scorer.
struct window_options {
  float scale = 0.0f;                         //!< softmax scale; 0 means 1/sqrt(dim)
  head_reduce group = head_reduce::mean;      //!< over the q heads of one kv head
  pool_kind pool = pool_kind::none;           //!< pooling along tokens (after the group reduction)
  int pool_kernel = 7;                        //!< odd kernel size when pooling
  head_reduce heads = head_reduce::mean;      //!< over kv heads, for layer rows (grid.heads == 1)
};

//! Caller-supplied per-query log-sum-exp (natural log of sum_t exp(scale * q.k_t) over the keys the query sees,
//! as flash attention returns it): (batch, q_head, window query), strides in elements. `data == nullptr` means
//! "compute the softmax in-kernel".
struct lse_view {
  const float* data = nullptr;  // (batch, q_head, w)
  int64_t stride_batch = 0, stride_head = 0, stride_query = 1;
  PREFIXKV_HOST_DEVICE float operator()(int64_t b, int64_t h, int64_t i) const {
    return data[b * stride_batch + h * stride_head + i * stride_query];
  }
};

//! Key-norm options.
struct key_norm_options {
  bool reciprocal = false;  //!< false: -||k|| (the classic scorer); true: 1/||k|| (>= 0, for curves)
};

//! Bits of the device status word the scorers and curve builders OR into (read it with
//! `read_status` from score.cuh, or copy it yourself at a point where you sync anyway).
enum status_bits : unsigned {
  status_ok = 0u,
  status_nonfinite = 1u,     //!< NaN or infinity met in an input (or produced from one)
  status_bad_length = 2u,    //!< a row length (device-side segments) is outside [window, token capacity]
  status_negative = 4u,      //!< a negative score met by a curve builder
  status_capacity = 8u,      //!< the candidates did not fit the caller's capacity (curve builder wrote empty curves)
};

namespace detail {

inline cudaError_t check_grid(const segment_grid& grid, int64_t layer, const segments& rows, int64_t batch,
                              int64_t heads_allowed) {
  PREFIXKV_TRY(validate(rows));
  if (grid.layers <= 0 || grid.batch < 0 || grid.heads <= 0)
    return fail(reason::bad_parameter, "score: segment_grid extents must be positive");
  if (layer < 0 || layer >= grid.layers) return fail(reason::out_of_range, "score: layer outside the segment grid");
  if (grid.batch != batch) return fail(reason::shape_mismatch, "score: grid.batch differs from the input batch");
  if (grid.heads != 1 && grid.heads != heads_allowed)
    return fail(reason::shape_mismatch, "score: grid.heads must be 1 (layer rows) or the kv-head count");
  if (rows.count != grid.count()) return fail(reason::shape_mismatch, "score: rows.count differs from grid.count()");
  return cudaSuccess;
}

//! Uniform rows of length 0: a call over them writes nothing (device entry points return before launching).
PREFIXKV_HOST_DEVICE bool rows_all_empty(const segments& rows) { return rows.offsets == nullptr && rows.uniform_length == 0; }

//! A null `scores` is accepted only when the call provably writes nothing: every row of `layer` is empty.
//! Host twins read their row table; device entry points can read only uniform rows (device-resident offsets
//! count as "may write", so they need a real pointer).
inline cudaError_t check_scores_out(const segment_grid& grid, int64_t layer, const segments& rows, int64_t batch,
                                    const float* scores, bool rows_on_host, const char* message) {
  if (scores != nullptr || rows.count == 0 || batch <= 0 || rows_all_empty(rows)) return cudaSuccess;
  if (rows.offsets == nullptr || !rows_on_host) return fail(reason::null_pointer, message);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < grid.heads; ++h)
      if (rows.length(grid.id(layer, b, h)) != 0) return fail(reason::null_pointer, message);
  return cudaSuccess;
}

//! Uniform rows are checked on the host; device offsets are checked by the kernels (status_bad_length).
inline cudaError_t check_uniform_lengths(const segments& rows, int64_t min_len, int64_t capacity) {
  if (rows.offsets == nullptr && rows.count > 0) {
    if (rows.uniform_length > capacity)
      return fail(reason::out_of_range, "score: row length exceeds the token extent of the input");
    if (rows.uniform_length < min_len)
      return fail(reason::bad_parameter, "score: window is longer than the sequence (row length < window)");
  }
  return cudaSuccess;
}

template <class T>
inline cudaError_t check_window_args(const kv_view<const T>& q, const kv_view<const T>& k, const lse_view& lse,
                                     const window_options& opt, const segment_grid& grid, int64_t layer,
                                     const segments& rows, const float* scores, bool rows_on_host) {
  PREFIXKV_TRY(validate(q));
  PREFIXKV_TRY(validate(k));
  if (q.batch != k.batch) return fail(reason::shape_mismatch, "window scorer: Q and K batch differ");
  if (q.dim != k.dim) return fail(reason::shape_mismatch, "window scorer: Q and K head_dim differ");
  if (k.heads <= 0 || q.heads % k.heads != 0)
    return fail(reason::shape_mismatch, "window scorer: q_heads is not a multiple of kv_heads");
  if (q.dim <= 0) return fail(reason::bad_parameter, "window scorer: head_dim must be positive");
  if (q.tokens <= 0) return fail(reason::bad_parameter, "window scorer: window must be >= 1");
  if (q.tokens > k.tokens) return fail(reason::bad_parameter, "window scorer: window is longer than the keys");
  if (!(opt.scale >= 0.0f) || !std::isfinite(opt.scale))
    return fail(reason::bad_parameter, "window scorer: scale must be finite and >= 0 (0 = 1/sqrt(dim))");
  if (opt.pool != pool_kind::none && (opt.pool_kernel < 1 || opt.pool_kernel % 2 == 0))
    return fail(reason::bad_parameter, "window scorer: pool_kernel must be odd and >= 1");
  if (lse.data && (lse.stride_batch < 0 || lse.stride_head < 0 || lse.stride_query < 0))
    return fail(reason::negative_stride, "window scorer: LSE strides must be >= 0");
  PREFIXKV_TRY(check_grid(grid, layer, rows, q.batch, k.heads));
  PREFIXKV_TRY(check_scores_out(grid, layer, rows, q.batch, scores, rows_on_host, "window scorer: scores is null"));
  return check_uniform_lengths(rows, q.tokens, k.tokens);
}

template <class T>
inline bool all_finite_host(const kv_view<const T>& v, int64_t tokens_of_b_max = -1) {
  const int64_t tt = tokens_of_b_max < 0 ? v.tokens : tokens_of_b_max;
  for (int64_t b = 0; b < v.batch; ++b)
    for (int64_t h = 0; h < v.heads; ++h)
      for (int64_t t = 0; t < tt; ++t)
        for (int64_t d = 0; d < v.dim; ++d)
          if (!std::isfinite(to_float(v(b, h, t, d)))) return false;
  return true;
}

inline float effective_scale(float scale, int64_t dim) {
  return scale > 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(dim));
}

//! Pool one row in place (max ignores padding; avg divides by the kernel size, zero padding counted).
inline void pool_row_host(std::vector<float>& row, pool_kind pool, int kernel) {
  if (pool == pool_kind::none || kernel <= 1) return;
  const int64_t n = static_cast<int64_t>(row.size()), r = kernel / 2;
  std::vector<float> out(row.size());
  for (int64_t t = 0; t < n; ++t) {
    float acc = pool == pool_kind::max ? -INFINITY : 0.0f;
    for (int64_t j = t - r; j <= t + r; ++j) {
      if (j < 0 || j >= n) continue;
      acc = pool == pool_kind::max ? std::fmax(acc, row[j]) : acc + row[j];
    }
    out[t] = pool == pool_kind::max ? acc : acc / static_cast<float>(kernel);
  }
  row.swap(out);
}

}  // namespace detail

//! Host twin of the observation-window scorer (see the file comment for the formula).
//! q: (batch, q_head, w, dim); k: (batch, kv_head, token, dim); lse: (batch, q_head, w) or empty;
//! rows: host segments; scores: host flat output.
template <class T>
[[nodiscard]] inline cudaError_t window_attention_host(kv_view<const T> q, kv_view<const T> k, lse_view lse,
                                                       window_options opt, segment_grid grid, int64_t layer,
                                                       segments rows, float* scores) {
  PREFIXKV_TRY(detail::check_window_args(q, k, lse, opt, grid, layer, rows, scores, true));
  PREFIXKV_TRY(validate_host_contents(rows));
  const int64_t B = q.batch, Hq = q.heads, Hk = k.heads, G = Hq / Hk, w = q.tokens, D = q.dim;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = rows.length(grid.id(layer, b, 0));
    if (n > k.tokens) return detail::fail(reason::out_of_range, "score: row length exceeds the token extent of the input");
    if (n < w) return detail::fail(reason::bad_parameter, "window scorer: window is longer than the sequence (row length < window)");
  }
  if (!detail::all_finite_host(q) || !detail::all_finite_host(k))
    return detail::fail(reason::nonfinite_input, "window scorer: NaN or infinity in Q or K");
  if (lse.data)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hq; ++h)
        for (int64_t i = 0; i < w; ++i)
          if (!std::isfinite(lse(b, h, i))) return detail::fail(reason::nonfinite_input, "window scorer: NaN or infinity in the LSE");
  const float scale = detail::effective_scale(opt.scale, D);
  std::vector<float> logits, acc, grp, layer_row;
  std::vector<std::vector<float>> kv_rows(Hk);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = rows.length(grid.id(layer, b, 0));
    for (int64_t kh = 0; kh < Hk; ++kh) {
      grp.assign(n, opt.group == head_reduce::max ? -INFINITY : 0.0f);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kh * G + g;
        acc.assign(n, 0.0f);
        for (int64_t i = 0; i < w; ++i) {
          const int64_t last = n - w + i;  // keys [0, last] are visible
          logits.assign(last + 1, 0.0f);
          float m = -INFINITY;
          for (int64_t t = 0; t <= last; ++t) {
            float dot = 0.0f;
            for (int64_t d = 0; d < D; ++d) dot += to_float(q(b, h, i, d)) * to_float(k(b, kh, t, d));
            logits[t] = dot * scale;
            m = std::fmax(m, logits[t]);
          }
          float l;
          if (lse.data) {
            l = lse(b, h, i);
          } else {
            float sum = 0.0f;
            for (int64_t t = 0; t <= last; ++t) sum += std::exp(logits[t] - m);
            l = m + std::log(sum);
          }
          for (int64_t t = 0; t <= last; ++t) acc[t] += std::exp(logits[t] - l);
        }
        for (int64_t t = 0; t < n; ++t) grp[t] = opt.group == head_reduce::max ? std::fmax(grp[t], acc[t]) : grp[t] + acc[t];
      }
      if (opt.group == head_reduce::mean)
        for (auto& x : grp) x /= static_cast<float>(G);
      detail::pool_row_host(grp, opt.pool, opt.pool_kernel);
      kv_rows[kh] = grp;
    }
    if (grid.heads == 1) {
      float* out = scores + rows.begin(grid.id(layer, b, 0));
      for (int64_t t = 0; t < n; ++t) {
        float v = opt.heads == head_reduce::max ? -INFINITY : 0.0f;
        for (int64_t kh = 0; kh < Hk; ++kh) v = opt.heads == head_reduce::max ? std::fmax(v, kv_rows[kh][t]) : v + kv_rows[kh][t];
        out[t] = opt.heads == head_reduce::max ? v : v / static_cast<float>(Hk);
      }
    } else {
      for (int64_t kh = 0; kh < Hk; ++kh) {
        float* out = scores + rows.begin(grid.id(layer, b, kh));
        for (int64_t t = 0; t < n; ++t) out[t] = kv_rows[kh][t];
      }
    }
  }
  return cudaSuccess;
}

namespace detail {
template <class T>
inline cudaError_t check_attention_args(const kv_view<const T>& p, const segment_grid& grid, int64_t layer,
                                        const segments& rows, const float* scores, bool rows_on_host) {
  PREFIXKV_TRY(validate(p));
  if (p.heads <= 0) return fail(reason::bad_parameter, "attention scorer: q_heads must be positive");
  PREFIXKV_TRY(check_grid(grid, layer, rows, p.batch, grid.heads));
  if (p.heads % grid.heads != 0)
    return fail(reason::shape_mismatch, "attention scorer: q_heads is not a multiple of grid.heads (kv heads)");
  PREFIXKV_TRY(check_scores_out(grid, layer, rows, p.batch, scores, rows_on_host, "attention scorer: scores is null"));
  return check_uniform_lengths(rows, 0, p.dim);
}
}  // namespace detail

//! Host twin of the paper's accumulated-attention scorer.
//! p: (batch, q_head, query, key) as a kv_view (heads = q heads, tokens = queries, dim = keys), any strides.
//! With grid.heads == 1 the mean runs over all q heads; with grid.heads == kv_heads over each kv head's group.
template <class T>
[[nodiscard]] inline cudaError_t accumulated_attention_host(kv_view<const T> p, segment_grid grid, int64_t layer,
                                                            segments rows, float* scores) {
  PREFIXKV_TRY(detail::check_attention_args(p, grid, layer, rows, scores, true));
  PREFIXKV_TRY(validate_host_contents(rows));
  for (int64_t b = 0; b < p.batch; ++b)
    if (rows.length(grid.id(layer, b, 0)) > p.dim)
      return detail::fail(reason::out_of_range, "score: row length exceeds the token extent of the input");
  if (!detail::all_finite_host(p)) return detail::fail(reason::nonfinite_input, "attention scorer: NaN or infinity in P");
  const int64_t G = p.heads / grid.heads;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t oh = 0; oh < grid.heads; ++oh) {
      const int64_t id = grid.id(layer, b, oh), n = rows.length(id);
      float* out = scores + rows.begin(id);
      for (int64_t t = 0; t < n; ++t) {
        float s = 0.0f;
        for (int64_t qi = 0; qi < p.tokens; ++qi) {
          float hs = 0.0f;
          for (int64_t g = 0; g < G; ++g) hs += to_float(p(b, oh * G + g, qi, t));
          s += hs / static_cast<float>(G);
        }
        out[t] = s;
      }
    }
  return cudaSuccess;
}

namespace detail {
template <class T>
inline cudaError_t check_key_norm_args(const kv_view<const T>& k, const segment_grid& grid, int64_t layer,
                                       const segments& rows, const float* scores, bool rows_on_host) {
  PREFIXKV_TRY(validate(k));
  if (k.heads <= 0) return fail(reason::bad_parameter, "key-norm scorer: kv_heads must be positive");
  PREFIXKV_TRY(check_grid(grid, layer, rows, k.batch, k.heads));
  PREFIXKV_TRY(check_scores_out(grid, layer, rows, k.batch, scores, rows_on_host, "key-norm scorer: scores is null"));
  return check_uniform_lengths(rows, 0, k.tokens);
}
}  // namespace detail

//! Host twin of the key-norm scorer. k: (batch, kv_head, token, dim). Per key: -||k|| (or 1/||k|| with
//! `reciprocal`, +inf for a zero key is replaced by FLT_MAX), mean over kv heads for layer rows.
template <class T>
[[nodiscard]] inline cudaError_t key_norm_host(kv_view<const T> k, key_norm_options opt, segment_grid grid,
                                               int64_t layer, segments rows, float* scores) {
  PREFIXKV_TRY(detail::check_key_norm_args(k, grid, layer, rows, scores, true));
  PREFIXKV_TRY(validate_host_contents(rows));
  for (int64_t b = 0; b < k.batch; ++b)
    if (rows.length(grid.id(layer, b, 0)) > k.tokens)
      return detail::fail(reason::out_of_range, "score: row length exceeds the token extent of the input");
  if (!detail::all_finite_host(k)) return detail::fail(reason::nonfinite_input, "key-norm scorer: NaN or infinity in K");
  for (int64_t b = 0; b < k.batch; ++b) {
    const int64_t n = rows.length(grid.id(layer, b, 0));
    for (int64_t t = 0; t < n; ++t) {
      float sum = 0.0f;
      for (int64_t h = 0; h < k.heads; ++h) {
        float ss = 0.0f;
        for (int64_t d = 0; d < k.dim; ++d) {
          const float x = to_float(k(b, h, t, d));
          ss += x * x;
        }
        const float nrm = std::sqrt(ss);
        const float v = opt.reciprocal ? (nrm > 0.0f ? std::fmin(1.0f / nrm, 3.402823466e38f) : 3.402823466e38f) : -nrm;
        if (grid.heads == 1)
          sum += v;
        else
          scores[rows.begin(grid.id(layer, b, h)) + t] = v;
      }
      if (grid.heads == 1) scores[rows.begin(grid.id(layer, b, 0)) + t] = sum / static_cast<float>(k.heads);
    }
  }
  return cudaSuccess;
}

PREFIXKV_NAMESPACE_END
