//! \file prefixkv/score/score.hpp
//! Token-importance scorers, host twins (plain C++17). The CUDA versions live in `prefixkv/score/score.cuh`
//! and follow exactly the semantics written here, with the same arguments in the same order.
//!
//! Output rows. Every scorer writes float32 rows into a flat buffer described by `segments rows` and numbered by
//! `segment_grid grid` (`rows.count == grid.count()`, row id `grid.id(layer, b, h)`, layer-major or
//! sequence-major). `grid.heads` selects the output: 1 = one row per (layer, sequence), kv_heads = one row per
//! (layer, sequence, kv head). Each row has its own length: row (layer, b) of layer rows is the number of cached
//! tokens n of sequence b in that layer; row (layer, b, h) of per-head rows the number of tokens kv head h keeps
//! (heads may hold different numbers of tokens, e.g. after a head-wise compaction). Lengths are at most the token
//! extent of the input (a padded capacity).
//!
//! 1. `accumulated_attention_host` — the paper's scorer, from materialised probabilities P (batch, q_head,
//!    query, key): score[k] = (1 / G) sum_q sum_{h in group} P[b,h,q,k], G = |group| (all q heads for layer
//!    rows, q_heads / kv_heads for per-head rows), in fp32 and in this defined order, which the device kernel
//!    follows exactly (bit-identical results):
//!    - the queries are cut into chunks of `attention_query_chunk` (32) consecutive queries from query 0; the last
//!      chunk may be shorter;
//!    - chunk j's partial sum c_j[k] is one fp32 accumulator starting at 0.0f that adds P[b,h,q,k] over the
//!      group's heads in ascending order (outer loop) and, for each head, the chunk's queries in ascending order
//!      (inner loop);
//!    - s[k] starts at 0.0f and adds c_0[k], c_1[k], ... in chunk order;
//!    - score[k] = s[k] / G, one correctly rounded IEEE division (x / 1 == x).
//!    Only additions and that one division: there is nothing to contract into a fused multiply-add. The chunks let
//!    the device spread the query sum over warps without changing a bit.
//! 2. `window_attention_host` — observation-window attention from Q (batch, q_head, w, dim) and K (batch,
//!    kv_head, token, dim) without materialising probabilities. With n the length of the row that kv head kh
//!    writes (its own row, or the (layer, sequence) row), window query i of the q heads of kh sits at position
//!    n - w + i and sees keys t <= n - w + i (causal inside the window). With l = scale * q.k and
//!    lse_i = log sum_t exp(l_t) (or the caller's LSE), A[h, t] = sum_i exp(l_{i,t} - lse_i);
//!    group reduction over the q heads of a kv head (mean|max), optional 1-D pooling along tokens (max|avg, odd
//!    kernel, zero padding counted by avg as in torch's avg_pool1d), then head reduction (mean|max) for layer
//!    rows.
//! 3. `key_norm_host` — minus the L2 norm of each key, mean over kv heads (or 1/||k|| when asked, a
//!    non-negative score usable by the curve builders, which need scores >= 0).
//!
//! Every scorer has a single-layer form (views of one layer, `layer` = its grid layer) and an all-layers form
//! (`*_layers_host`: host arrays of `grid.layers` per-layer views with equal extents and strides, at most
//! `score_max_layers`). `key_norm` and `window_attention` also read K from a paged cache (`paged_kv_view`,
//! block table per sequence; every page id a row needs must lie in [0, num_pages)).
//!
//! Inputs are views of T in {float, f16, bf16} (see core/numeric.hpp; reinterpret_cast `__half` /
//! `__nv_bfloat16` buffers). NaN/Inf in an element that is read makes the host twins return
//! `reason::nonfinite_input` before writing anything; every other rejection writes nothing either.
//!
//! \code
//! // one layer, batch 2, layer rows (grid.heads == 1), contiguous output rows of 4096 tokens each
//! prefixkv::segment_grid grid{32, 2, 1};
//! auto rows = prefixkv::make_uniform_segments(grid.count(), 4096);
//! prefixkv::window_options opt;                 // scale 1/sqrt(dim), group mean, no pooling, head mean
//! auto e = prefixkv::window_attention_host(q, k, prefixkv::lse_view{}, opt, grid, /*layer*/ 3, rows, scores);
//! // all 32 layers at once: q_layers[l], k_layers[l] are layer l's views
//! e = prefixkv::window_attention_layers_host(q_layers, k_layers, nullptr, opt, grid, rows, scores);
//! \endcode
#pragma once

#include "../core/error.hpp"
#include "../core/numeric.hpp"
#include "../core/validate.hpp"
#include "../core/views.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
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
  status_bad_page = 16u,     //!< a page id a scorer needed lies outside [0, num_pages) of the page pool
};

//! Most layers one all-layers scorer call takes (their pointers travel as kernel parameters).
inline constexpr int64_t score_max_layers = 128;

//! Queries per chunk of the accumulated-attention scorer's defined summation order (see the file comment): part of
//! the result's definition, shared by the host twin and the device kernel.
inline constexpr int64_t attention_query_chunk = 32;

namespace detail {

//! The element types the scorers read.
template <class T>
struct is_score_element
    : std::integral_constant<bool, std::is_same<T, float>::value || std::is_same<T, f16>::value ||
                                       std::is_same<T, bf16>::value> {};

#define PREFIXKV_SCORE_ELEMENT_MESSAGE                                                                           \
  "prefixkv scorers read T = float, prefixkv::f16 or prefixkv::bf16 only; view __half / __nv_bfloat16 buffers " \
  "as prefixkv::f16 / prefixkv::bf16 with reinterpret_cast (see prefixkv/core/numeric.hpp)"

//! 64-bit multiply-accumulate helpers that report overflow instead of wrapping.
inline bool score_mul(int64_t a, int64_t b, int64_t& out) noexcept {
  if (a < 0 || b < 0) return false;
  if (a != 0 && b > std::numeric_limits<int64_t>::max() / a) return false;
  out = a * b;
  return true;
}

//! Token capacity of a K view: the token extent of a strided view, max_blocks x page_size of a paged one.
template <class T>
inline int64_t k_capacity(const kv_view<T>& k) noexcept {
  return k.tokens;
}
template <class T>
inline int64_t k_capacity(const paged_kv_view<T>& k) noexcept {
  int64_t c = 0;
  return score_mul(k.max_blocks, k.page_size, c) ? c : -1;
}

//! Row id of kv head kh of (layer, b): its own row, or the (layer, sequence) row for layer rows.
PREFIXKV_HOST_DEVICE int64_t score_row(const segment_grid& grid, int64_t layer, int64_t b, int64_t kh) {
  return grid.id(layer, b, grid.heads == 1 ? 0 : kh);
}

//! Grid checks for `nlayers` layers starting at grid layer `layer`.
inline cudaError_t check_grid(const segment_grid& grid, int64_t layer, int64_t nlayers, const segments& rows,
                              int64_t batch, int64_t heads_allowed) {
  PREFIXKV_TRY(validate(rows));
  if (grid.layers <= 0 || grid.batch < 0 || grid.heads <= 0)
    return fail(reason::bad_parameter, "score: segment_grid extents must be positive");
  int64_t count = 0, lb = 0;
  if (!score_mul(grid.layers, grid.batch, lb) || !score_mul(lb, grid.heads, count))
    return fail(reason::bad_parameter, "score: segment_grid count overflows 64 bits");
  if (layer < 0 || layer >= grid.layers || nlayers > grid.layers - layer)
    return fail(reason::out_of_range, "score: layer outside the segment grid");
  if (grid.batch != batch) return fail(reason::shape_mismatch, "score: grid.batch differs from the input batch");
  if (grid.heads != 1 && grid.heads != heads_allowed)
    return fail(reason::shape_mismatch, "score: grid.heads must be 1 (layer rows) or the kv-head count");
  if (rows.count != count) return fail(reason::shape_mismatch, "score: rows.count differs from grid.count()");
  return cudaSuccess;
}

//! Uniform rows of length 0: a call over them writes nothing (device entry points return before launching).
PREFIXKV_HOST_DEVICE bool rows_all_empty(const segments& rows) { return rows.offsets == nullptr && rows.uniform_length == 0; }

//! A null `scores` is accepted only when the call provably writes nothing: every row of the layers scored is empty.
//! Host twins read their row table; device entry points can read only uniform rows (device-resident offsets
//! count as "may write", so they need a real pointer).
inline cudaError_t check_scores_out(const segment_grid& grid, int64_t layer, int64_t nlayers, const segments& rows,
                                    int64_t batch, const float* scores, bool rows_on_host, const char* message) {
  if (scores != nullptr || rows.count == 0 || batch <= 0 || rows_all_empty(rows)) return cudaSuccess;
  if (rows.offsets == nullptr || !rows_on_host) return fail(reason::null_pointer, message);
  for (int64_t l = layer; l < layer + nlayers; ++l)
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < grid.heads; ++h)
        if (rows.length(grid.id(l, b, h)) != 0) return fail(reason::null_pointer, message);
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

//! Host twins: every row of the layers scored has a length in [min_len, capacity] and an end that fits int64.
inline cudaError_t check_host_lengths(const segment_grid& grid, int64_t layer, int64_t nlayers, const segments& rows,
                                      int64_t batch, int64_t min_len, int64_t capacity) {
  PREFIXKV_TRY(validate_host_contents(rows));
  for (int64_t l = layer; l < layer + nlayers; ++l)
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < grid.heads; ++h) {
        const int64_t id = grid.id(l, b, h), n = rows.length(id);
        if (n > capacity) return fail(reason::out_of_range, "score: row length exceeds the token extent of the input");
        if (n < min_len)
          return fail(reason::bad_parameter, "window scorer: window is longer than the sequence (row length < window)");
        if (rows.begin(id) > std::numeric_limits<int64_t>::max() - n)
          return fail(reason::out_of_range, "score: a row's end overflows 64 bits");
      }
  return cudaSuccess;
}

//! Every view of a layer array has the geometry of layer 0 (only the data pointer may differ) and is valid.
template <class T>
inline bool same_geometry(const kv_view<T>& a, const kv_view<T>& b) {
  return a.batch == b.batch && a.heads == b.heads && a.tokens == b.tokens && a.dim == b.dim &&
         a.stride_batch == b.stride_batch && a.stride_head == b.stride_head && a.stride_token == b.stride_token &&
         a.stride_dim == b.stride_dim;
}
template <class T>
inline bool same_geometry(const paged_kv_view<T>& a, const paged_kv_view<T>& b) {
  return a.num_pages == b.num_pages && a.page_size == b.page_size && a.heads == b.heads && a.dim == b.dim &&
         a.stride_page == b.stride_page && a.stride_slot == b.stride_slot && a.stride_head == b.stride_head &&
         a.stride_dim == b.stride_dim && a.block_table == b.block_table && a.batch == b.batch &&
         a.max_blocks == b.max_blocks && a.block_table_stride == b.block_table_stride;
}
template <class View>
inline cudaError_t check_layer_views(const View* v, int64_t nlayers, const char* null_message,
                                     const char* mismatch_message) {
  if (nlayers > score_max_layers)
    return fail(reason::unsupported, "score: more than score_max_layers layers in one call");
  if (v == nullptr) return fail(reason::null_pointer, null_message);
  for (int64_t l = 0; l < nlayers; ++l) {
    PREFIXKV_TRY(validate(v[l]));
    if (!same_geometry(v[0], v[l])) return fail(reason::shape_mismatch, mismatch_message);
  }
  return cudaSuccess;
}

//! Paged K: the page ids of the blocks holding tokens [0, n) of every row of the layers scored, on the host.
template <class T>
inline cudaError_t check_host_pages(const paged_kv_view<T>& k, const segment_grid& grid, int64_t layer,
                                    int64_t nlayers, const segments& rows) {
  for (int64_t b = 0; b < k.batch; ++b) {
    int64_t n = 0;
    for (int64_t l = layer; l < layer + nlayers; ++l)
      for (int64_t h = 0; h < grid.heads; ++h) n = std::max(n, rows.length(grid.id(l, b, h)));
    const int64_t blocks = n > 0 ? (n - 1) / k.page_size + 1 : 0;
    for (int64_t j = 0; j < blocks; ++j) {
      const int64_t page = k.block_table[b * k.block_table_stride + j];
      if (page < 0 || page >= k.num_pages)
        return fail(reason::out_of_range, "score: a block-table page id lies outside the page pool");
    }
  }
  return cudaSuccess;
}
template <class T>
inline cudaError_t check_host_pages(const kv_view<T>&, const segment_grid&, int64_t, int64_t, const segments&) {
  return cudaSuccess;
}

template <class View>
inline bool finite_at(const View& v, int64_t b, int64_t h, int64_t t) {
  for (int64_t d = 0; d < v.dim; ++d)
    if (!std::isfinite(to_float(v(b, h, t, d)))) return false;
  return true;
}

//! Keys that a scorer reads: tokens [0, n) of every kv head of every row of the layers scored.
template <class View>
inline bool keys_finite_host(const View* k, const segment_grid& grid, int64_t layer, int64_t nlayers,
                             const segments& rows) {
  for (int64_t l = 0; l < nlayers; ++l)
    for (int64_t b = 0; b < k[l].batch; ++b)
      for (int64_t kh = 0; kh < k[l].heads; ++kh) {
        const int64_t n = rows.length(score_row(grid, layer + l, b, kh));
        for (int64_t t = 0; t < n; ++t)
          if (!finite_at(k[l], b, kh, t)) return false;
      }
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

// ------------------------------------------------------------------------------------------------------------
// Window scorer
// ------------------------------------------------------------------------------------------------------------

//! Shape checks shared by the host twin and the device entry points (layer 0's views; `check_layer_views` checks
//! the rest). `KView` is `kv_view<const T>` or `paged_kv_view<const T>`.
template <class T, class KView>
inline cudaError_t check_window_args(const kv_view<const T>& q, const KView& k, const lse_view& lse,
                                     const window_options& opt, const segment_grid& grid, int64_t layer,
                                     int64_t nlayers, const segments& rows, const float* scores, bool rows_on_host) {
  PREFIXKV_TRY(validate(q));
  PREFIXKV_TRY(validate(k));
  const int64_t cap = k_capacity(k);
  if (cap < 0) return fail(reason::bad_parameter, "window scorer: the token capacity overflows 64 bits");
  if (q.batch != k.batch) return fail(reason::shape_mismatch, "window scorer: Q and K batch differ");
  if (q.dim != k.dim) return fail(reason::shape_mismatch, "window scorer: Q and K head_dim differ");
  if (k.heads <= 0 || q.heads % k.heads != 0)
    return fail(reason::shape_mismatch, "window scorer: q_heads is not a multiple of kv_heads");
  if (q.dim <= 0) return fail(reason::bad_parameter, "window scorer: head_dim must be positive");
  if (q.tokens <= 0) return fail(reason::bad_parameter, "window scorer: window must be >= 1");
  if (q.tokens > cap) return fail(reason::bad_parameter, "window scorer: window is longer than the keys");
  if (!(opt.scale >= 0.0f) || !std::isfinite(opt.scale))
    return fail(reason::bad_parameter, "window scorer: scale must be finite and >= 0 (0 = 1/sqrt(dim))");
  if (opt.pool != pool_kind::none && (opt.pool_kernel < 1 || opt.pool_kernel % 2 == 0))
    return fail(reason::bad_parameter, "window scorer: pool_kernel must be odd and >= 1");
  if (lse.data && (lse.stride_batch < 0 || lse.stride_head < 0 || lse.stride_query < 0))
    return fail(reason::negative_stride, "window scorer: LSE strides must be >= 0");
  PREFIXKV_TRY(check_grid(grid, layer, nlayers, rows, q.batch, k.heads));
  PREFIXKV_TRY(check_scores_out(grid, layer, nlayers, rows, q.batch, scores, rows_on_host,
                                "window scorer: scores is null"));
  return check_uniform_lengths(rows, q.tokens, cap);
}

//! All of the window scorer's host-side argument checks for `nlayers` layers (arrays of per-layer views; `lse`
//! null = in-kernel softmax for every layer, else nlayers entries, all with data or all without, equal strides).
template <class T, class KView>
inline cudaError_t check_window_layers(const kv_view<const T>* q, const KView* k, const lse_view* lse,
                                       const window_options& opt, const segment_grid& grid, int64_t layer,
                                       int64_t nlayers, const segments& rows, const float* scores, bool rows_on_host) {
  if (nlayers <= 0) return fail(reason::bad_parameter, "window scorer: no layer to score");
  PREFIXKV_TRY(check_layer_views(q, nlayers, "window scorer: the Q view array is null",
                                 "window scorer: per-layer Q views differ in extents or strides"));
  PREFIXKV_TRY(check_layer_views(k, nlayers, "window scorer: the K view array is null",
                                 "window scorer: per-layer K views differ in extents, strides or block table"));
  const lse_view none{};
  const lse_view& l0 = lse ? lse[0] : none;
  if (lse)
    for (int64_t l = 1; l < nlayers; ++l) {
      if ((lse[l].data == nullptr) != (l0.data == nullptr))
        return fail(reason::bad_parameter, "window scorer: give an LSE for every layer or for none");
      if (l0.data && (lse[l].stride_batch != l0.stride_batch || lse[l].stride_head != l0.stride_head ||
                      lse[l].stride_query != l0.stride_query))
        return fail(reason::shape_mismatch, "window scorer: per-layer LSE views differ in strides");
    }
  return check_window_args(q[0], k[0], l0, opt, grid, layer, nlayers, rows, scores, rows_on_host);
}

template <class T, class KView>
inline cudaError_t window_attention_host_run(const kv_view<const T>* q, const KView* k, const lse_view* lse,
                                             const window_options& opt, const segment_grid& grid, int64_t layer,
                                             int64_t nlayers, const segments& rows, float* scores) {
  PREFIXKV_TRY(check_window_layers(q, k, lse, opt, grid, layer, nlayers, rows, scores, true));
  const int64_t B = q[0].batch, Hq = q[0].heads, Hk = k[0].heads, G = Hq / Hk, w = q[0].tokens, D = q[0].dim;
  PREFIXKV_TRY(check_host_lengths(grid, layer, nlayers, rows, B, w, k_capacity(k[0])));
  PREFIXKV_TRY(check_host_pages(k[0], grid, layer, nlayers, rows));
  for (int64_t l = 0; l < nlayers; ++l) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hq; ++h)
        for (int64_t i = 0; i < w; ++i)
          if (!finite_at(q[l], b, h, i))
            return fail(reason::nonfinite_input, "window scorer: NaN or infinity in Q or K");
    if (lse && lse[l].data)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < Hq; ++h)
          for (int64_t i = 0; i < w; ++i)
            if (!std::isfinite(lse[l](b, h, i)))
              return fail(reason::nonfinite_input, "window scorer: NaN or infinity in the LSE");
  }
  if (!keys_finite_host(k, grid, layer, nlayers, rows))
    return fail(reason::nonfinite_input, "window scorer: NaN or infinity in Q or K");
  const float scale = effective_scale(opt.scale, D);
  std::vector<float> logits, acc, grp;
  std::vector<std::vector<float>> kv_rows(Hk);
  for (int64_t l = 0; l < nlayers; ++l) {
    const kv_view<const T>& qv = q[l];
    const KView& kv = k[l];
    const bool caller_lse = lse && lse[l].data;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t kh = 0; kh < Hk; ++kh) {
        const int64_t n = rows.length(score_row(grid, layer + l, b, kh));
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
              for (int64_t d = 0; d < D; ++d) dot += to_float(qv(b, h, i, d)) * to_float(kv(b, kh, t, d));
              logits[t] = dot * scale;
              m = std::fmax(m, logits[t]);
            }
            float lv;
            if (caller_lse) {
              lv = lse[l](b, h, i);
            } else {
              float sum = 0.0f;
              for (int64_t t = 0; t <= last; ++t) sum += std::exp(logits[t] - m);
              lv = m + std::log(sum);
            }
            for (int64_t t = 0; t <= last; ++t) acc[t] += std::exp(logits[t] - lv);
          }
          for (int64_t t = 0; t < n; ++t)
            grp[t] = opt.group == head_reduce::max ? std::fmax(grp[t], acc[t]) : grp[t] + acc[t];
        }
        if (opt.group == head_reduce::mean)
          for (auto& x : grp) x /= static_cast<float>(G);
        pool_row_host(grp, opt.pool, opt.pool_kernel);
        kv_rows[kh] = grp;
      }
      if (grid.heads == 1) {
        const int64_t id = grid.id(layer + l, b, 0), n = rows.length(id);
        float* out = n > 0 ? scores + rows.begin(id) : nullptr;  // (scores may be null when no row has a token)
        for (int64_t t = 0; t < n; ++t) {
          float v = opt.heads == head_reduce::max ? -INFINITY : 0.0f;
          for (int64_t kh = 0; kh < Hk; ++kh)
            v = opt.heads == head_reduce::max ? std::fmax(v, kv_rows[kh][t]) : v + kv_rows[kh][t];
          out[t] = opt.heads == head_reduce::max ? v : v / static_cast<float>(Hk);
        }
      } else {
        for (int64_t kh = 0; kh < Hk; ++kh) {
          const int64_t id = grid.id(layer + l, b, kh), n = rows.length(id);
          float* out = n > 0 ? scores + rows.begin(id) : nullptr;  // (scores may be null when no row has a token)
          for (int64_t t = 0; t < n; ++t) out[t] = kv_rows[kh][t];
        }
      }
    }
  }
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------------------------------
// Accumulated attention
// ------------------------------------------------------------------------------------------------------------
template <class T>
inline cudaError_t check_attention_args(const kv_view<const T>* p, const segment_grid& grid, int64_t layer,
                                        int64_t nlayers, const segments& rows, const float* scores,
                                        bool rows_on_host) {
  if (nlayers <= 0) return fail(reason::bad_parameter, "attention scorer: no layer to score");
  PREFIXKV_TRY(check_layer_views(p, nlayers, "attention scorer: the P view array is null",
                                 "attention scorer: per-layer P views differ in extents or strides"));
  if (p[0].heads <= 0) return fail(reason::bad_parameter, "attention scorer: q_heads must be positive");
  PREFIXKV_TRY(check_grid(grid, layer, nlayers, rows, p[0].batch, grid.heads));
  if (p[0].heads % grid.heads != 0)
    return fail(reason::shape_mismatch, "attention scorer: q_heads is not a multiple of grid.heads (kv heads)");
  PREFIXKV_TRY(check_scores_out(grid, layer, nlayers, rows, p[0].batch, scores, rows_on_host,
                                "attention scorer: scores is null"));
  return check_uniform_lengths(rows, 0, p[0].dim);
}

template <class T>
inline cudaError_t accumulated_attention_host_run(const kv_view<const T>* p, const segment_grid& grid, int64_t layer,
                                                  int64_t nlayers, const segments& rows, float* scores) {
  PREFIXKV_TRY(check_attention_args(p, grid, layer, nlayers, rows, scores, true));
  const int64_t B = p[0].batch, G = p[0].heads / grid.heads;
  PREFIXKV_TRY(check_host_lengths(grid, layer, nlayers, rows, B, 0, p[0].dim));
  for (int64_t l = 0; l < nlayers; ++l)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t oh = 0; oh < grid.heads; ++oh) {
        const int64_t n = rows.length(grid.id(layer + l, b, oh));
        for (int64_t g = 0; g < G; ++g)
          for (int64_t qi = 0; qi < p[l].tokens; ++qi)
            for (int64_t t = 0; t < n; ++t)
              if (!std::isfinite(to_float(p[l](b, oh * G + g, qi, t))))
                return fail(reason::nonfinite_input, "attention scorer: NaN or infinity in P");
      }
  // The defined order (see the file comment): per key, chunk sums c_j over (head of the group, query of the chunk),
  // heads outer, queries inner, each from 0.0f; the chunk sums added in chunk order from 0.0f; one division by G.
  // The loops below run keys innermost (independent accumulators), which leaves each key's order unchanged.
  const int64_t Q = p[0].tokens, QC = attention_query_chunk;
  const float Gf = static_cast<float>(G);
  std::vector<float> sum, chunk;
  for (int64_t l = 0; l < nlayers; ++l)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t oh = 0; oh < grid.heads; ++oh) {
        const int64_t id = grid.id(layer + l, b, oh), n = rows.length(id);
        if (n <= 0) continue;
        sum.assign(static_cast<size_t>(n), 0.0f);
        chunk.resize(static_cast<size_t>(n));
        for (int64_t q0 = 0; q0 < Q; q0 += QC) {
          const int64_t q1 = std::min(Q, q0 + QC);
          std::fill(chunk.begin(), chunk.end(), 0.0f);
          for (int64_t g = 0; g < G; ++g)
            for (int64_t qi = q0; qi < q1; ++qi) {
              const T* row = p[l].data + p[l].offset(b, oh * G + g, qi, 0);
              for (int64_t t = 0; t < n; ++t) chunk[size_t(t)] += to_float(row[t * p[l].stride_dim]);
            }
          for (int64_t t = 0; t < n; ++t) sum[size_t(t)] += chunk[size_t(t)];
        }
        float* out = n > 0 ? scores + rows.begin(id) : nullptr;  // (scores may be null when no row has a token)
        for (int64_t t = 0; t < n; ++t) out[t] = sum[size_t(t)] / Gf;
      }
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------------------------------
// Key norm
// ------------------------------------------------------------------------------------------------------------
template <class KView>
inline cudaError_t check_key_norm_args(const KView* k, const segment_grid& grid, int64_t layer, int64_t nlayers,
                                       const segments& rows, const float* scores, bool rows_on_host) {
  if (nlayers <= 0) return fail(reason::bad_parameter, "key-norm scorer: no layer to score");
  PREFIXKV_TRY(check_layer_views(k, nlayers, "key-norm scorer: the K view array is null",
                                 "key-norm scorer: per-layer K views differ in extents, strides or block table"));
  const int64_t cap = k_capacity(k[0]);
  if (cap < 0) return fail(reason::bad_parameter, "key-norm scorer: the token capacity overflows 64 bits");
  if (k[0].heads <= 0) return fail(reason::bad_parameter, "key-norm scorer: kv_heads must be positive");
  PREFIXKV_TRY(check_grid(grid, layer, nlayers, rows, k[0].batch, k[0].heads));
  PREFIXKV_TRY(check_scores_out(grid, layer, nlayers, rows, k[0].batch, scores, rows_on_host,
                                "key-norm scorer: scores is null"));
  return check_uniform_lengths(rows, 0, cap);
}

//! -||k|| or min(1/||k||, FLT_MAX) from the sum of squares (the device uses the same expression).
PREFIXKV_HOST_DEVICE float key_norm_value(float ss, bool reciprocal) {
#if defined(__CUDA_ARCH__)
  const float nrm = sqrtf(ss);
  return reciprocal ? (nrm > 0.0f ? fminf(1.0f / nrm, 3.402823466e38f) : 3.402823466e38f) : -nrm;
#else
  const float nrm = std::sqrt(ss);
  return reciprocal ? (nrm > 0.0f ? std::fmin(1.0f / nrm, 3.402823466e38f) : 3.402823466e38f) : -nrm;
#endif
}

template <class KView>
inline cudaError_t key_norm_host_run(const KView* k, const key_norm_options& opt, const segment_grid& grid,
                                     int64_t layer, int64_t nlayers, const segments& rows, float* scores) {
  PREFIXKV_TRY(check_key_norm_args(k, grid, layer, nlayers, rows, scores, true));
  const int64_t B = k[0].batch, Hk = k[0].heads;
  PREFIXKV_TRY(check_host_lengths(grid, layer, nlayers, rows, B, 0, k_capacity(k[0])));
  PREFIXKV_TRY(check_host_pages(k[0], grid, layer, nlayers, rows));
  if (!keys_finite_host(k, grid, layer, nlayers, rows))
    return fail(reason::nonfinite_input, "key-norm scorer: NaN or infinity in K");
  auto value = [&](const KView& kv, int64_t b, int64_t h, int64_t t) {
    float ss = 0.0f;
    for (int64_t d = 0; d < kv.dim; ++d) {
      const float x = to_float(kv(b, h, t, d));
      ss += x * x;
    }
    return key_norm_value(ss, opt.reciprocal);
  };
  for (int64_t l = 0; l < nlayers; ++l)
    for (int64_t b = 0; b < B; ++b) {
      if (grid.heads == 1) {
        const int64_t id = grid.id(layer + l, b, 0), n = rows.length(id);
        float* out = n > 0 ? scores + rows.begin(id) : nullptr;  // (scores may be null when no row has a token)
        for (int64_t t = 0; t < n; ++t) {
          float sum = 0.0f;
          for (int64_t h = 0; h < Hk; ++h) sum += value(k[l], b, h, t);
          out[t] = sum / static_cast<float>(Hk);
        }
      } else {
        for (int64_t h = 0; h < Hk; ++h) {
          const int64_t id = grid.id(layer + l, b, h), n = rows.length(id);
          float* out = n > 0 ? scores + rows.begin(id) : nullptr;  // (scores may be null when no row has a token)
          for (int64_t t = 0; t < n; ++t) out[t] = value(k[l], b, h, t);
        }
      }
    }
  return cudaSuccess;
}

}  // namespace detail

// ------------------------------------------------------------------------------------------------------------
// Public host twins
// ------------------------------------------------------------------------------------------------------------

//! Host twin of the observation-window scorer, one layer (see the file comment for the formula).
//! q: (batch, q_head, w, dim); k: (batch, kv_head, token, dim); lse: (batch, q_head, w) or empty;
//! rows: host segments; scores: host flat output.
template <class T>
[[nodiscard]] inline cudaError_t window_attention_host(kv_view<const T> q, kv_view<const T> k, lse_view lse,
                                                       window_options opt, segment_grid grid, int64_t layer,
                                                       segments rows, float* scores) {
  static_assert(detail::is_score_element<T>::value, PREFIXKV_SCORE_ELEMENT_MESSAGE);
  if constexpr (detail::is_score_element<T>::value)
    return detail::window_attention_host_run(&q, &k, &lse, opt, grid, layer, 1, rows, scores);
  else
    return cudaErrorInvalidValue;
}

//! The same with K in a paged cache (host pool and block table; every page id of tokens [0, n) is checked).
template <class T>
[[nodiscard]] inline cudaError_t window_attention_host(kv_view<const T> q, paged_kv_view<const T> k, lse_view lse,
                                                       window_options opt, segment_grid grid, int64_t layer,
                                                       segments rows, float* scores) {
  static_assert(detail::is_score_element<T>::value, PREFIXKV_SCORE_ELEMENT_MESSAGE);
  if constexpr (detail::is_score_element<T>::value)
    return detail::window_attention_host_run(&q, &k, &lse, opt, grid, layer, 1, rows, scores);
  else
    return cudaErrorInvalidValue;
}

//! Host twin of the observation-window scorer for all `grid.layers` layers: q[l], k[l] (and lse[l] when `lse` is
//! not null) are layer l's views, equal in extents and strides; `lse == nullptr` = in-kernel softmax everywhere.
template <class T>
[[nodiscard]] inline cudaError_t window_attention_layers_host(const kv_view<const T>* q, const kv_view<const T>* k,
                                                              const lse_view* lse, window_options opt,
                                                              segment_grid grid, segments rows, float* scores) {
  static_assert(detail::is_score_element<T>::value, PREFIXKV_SCORE_ELEMENT_MESSAGE);
  if constexpr (detail::is_score_element<T>::value)
    return detail::window_attention_host_run(q, k, lse, opt, grid, 0, grid.layers, rows, scores);
  else
    return cudaErrorInvalidValue;
}

//! The same with K in a paged cache (one pool per layer, one block table shared by the layers).
template <class T>
[[nodiscard]] inline cudaError_t window_attention_layers_host(const kv_view<const T>* q,
                                                              const paged_kv_view<const T>* k, const lse_view* lse,
                                                              window_options opt, segment_grid grid, segments rows,
                                                              float* scores) {
  static_assert(detail::is_score_element<T>::value, PREFIXKV_SCORE_ELEMENT_MESSAGE);
  if constexpr (detail::is_score_element<T>::value)
    return detail::window_attention_host_run(q, k, lse, opt, grid, 0, grid.layers, rows, scores);
  else
    return cudaErrorInvalidValue;
}

//! Host twin of the paper's accumulated-attention scorer, one layer.
//! p: (batch, q_head, query, key) as a kv_view (heads = q heads, tokens = queries, dim = keys), any strides.
//! With grid.heads == 1 the mean runs over all q heads; with grid.heads == kv_heads over each kv head's group.
template <class T>
[[nodiscard]] inline cudaError_t accumulated_attention_host(kv_view<const T> p, segment_grid grid, int64_t layer,
                                                            segments rows, float* scores) {
  static_assert(detail::is_score_element<T>::value, PREFIXKV_SCORE_ELEMENT_MESSAGE);
  if constexpr (detail::is_score_element<T>::value)
    return detail::accumulated_attention_host_run(&p, grid, layer, 1, rows, scores);
  else
    return cudaErrorInvalidValue;
}

//! Host twin of the accumulated-attention scorer for all `grid.layers` layers (p[l] = layer l's probabilities).
template <class T>
[[nodiscard]] inline cudaError_t accumulated_attention_layers_host(const kv_view<const T>* p, segment_grid grid,
                                                                   segments rows, float* scores) {
  static_assert(detail::is_score_element<T>::value, PREFIXKV_SCORE_ELEMENT_MESSAGE);
  if constexpr (detail::is_score_element<T>::value)
    return detail::accumulated_attention_host_run(p, grid, 0, grid.layers, rows, scores);
  else
    return cudaErrorInvalidValue;
}

//! Host twin of the key-norm scorer, one layer. k: (batch, kv_head, token, dim). Per key: -||k|| (or 1/||k||
//! with `reciprocal`, +inf for a zero key is replaced by FLT_MAX), mean over kv heads for layer rows.
template <class T>
[[nodiscard]] inline cudaError_t key_norm_host(kv_view<const T> k, key_norm_options opt, segment_grid grid,
                                               int64_t layer, segments rows, float* scores) {
  static_assert(detail::is_score_element<T>::value, PREFIXKV_SCORE_ELEMENT_MESSAGE);
  if constexpr (detail::is_score_element<T>::value)
    return detail::key_norm_host_run(&k, opt, grid, layer, 1, rows, scores);
  else
    return cudaErrorInvalidValue;
}

//! The same with K in a paged cache (host pool and block table).
template <class T>
[[nodiscard]] inline cudaError_t key_norm_host(paged_kv_view<const T> k, key_norm_options opt, segment_grid grid,
                                               int64_t layer, segments rows, float* scores) {
  static_assert(detail::is_score_element<T>::value, PREFIXKV_SCORE_ELEMENT_MESSAGE);
  if constexpr (detail::is_score_element<T>::value)
    return detail::key_norm_host_run(&k, opt, grid, layer, 1, rows, scores);
  else
    return cudaErrorInvalidValue;
}

//! Host twin of the key-norm scorer for all `grid.layers` layers (k[l] = layer l's keys).
template <class T>
[[nodiscard]] inline cudaError_t key_norm_layers_host(const kv_view<const T>* k, key_norm_options opt,
                                                      segment_grid grid, segments rows, float* scores) {
  static_assert(detail::is_score_element<T>::value, PREFIXKV_SCORE_ELEMENT_MESSAGE);
  if constexpr (detail::is_score_element<T>::value)
    return detail::key_norm_host_run(k, opt, grid, 0, grid.layers, rows, scores);
  else
    return cudaErrorInvalidValue;
}

//! The same with K in a paged cache (one pool per layer, one block table shared by the layers).
template <class T>
[[nodiscard]] inline cudaError_t key_norm_layers_host(const paged_kv_view<const T>* k, key_norm_options opt,
                                                      segment_grid grid, segments rows, float* scores) {
  static_assert(detail::is_score_element<T>::value, PREFIXKV_SCORE_ELEMENT_MESSAGE);
  if constexpr (detail::is_score_element<T>::value)
    return detail::key_norm_host_run(k, opt, grid, 0, grid.layers, rows, scores);
  else
    return cudaErrorInvalidValue;
}

PREFIXKV_NAMESPACE_END
