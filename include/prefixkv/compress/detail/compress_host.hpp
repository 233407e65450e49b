//! \file prefixkv/compress/detail/compress_host.hpp
//! The compressor's host backend: the chain of host twins, in the same segment order and with the same budgets as
//! the CUDA backend, so that both keep the same tokens and write the same bytes. Included by compress.hpp.
#pragma once

#include "../compress.hpp"

#include <algorithm>
#include <vector>

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

//! Per-call geometry shared by both backends: layers [l0, l0 + lc) of a call over `batch` sequences, segments in
//! sequence-major order (every sequence's segments contiguous, so a sequence is one solver problem).
struct compress_geometry {
  int64_t l0 = 0, lc = 0, batch = 0, heads = 1, capacity = 0;
  PREFIXKV_HOST_DEVICE segment_grid grid() const { return segment_grid{lc, batch, heads, true}; }
  PREFIXKV_HOST_DEVICE int64_t segments() const { return lc * batch * heads; }
  //! Index of segment (layer l, sequence b, head h) in the caller's layer-major arrays (lengths, scores, outputs).
  PREFIXKV_HOST_DEVICE int64_t caller_index(int64_t l, int64_t b, int64_t h) const { return (l * batch + b) * heads + h; }
};

//! Token count of segment (l, b, h) from the caller's `lengths` (host or device pointer alike).
PREFIXKV_HOST_DEVICE int64_t compress_input_length(const int32_t* lengths, bool per_segment, int64_t batch,
                                                    int64_t heads_in, int64_t l, int64_t b, int64_t h) {
  return per_segment ? lengths[(l * batch + b) * heads_in + h] : lengths[b];
}

//! The smaller non-zero of two reasons (0 = none): the chain reports the smallest reason it met, so that both
//! backends agree whatever order they check in.
PREFIXKV_HOST_DEVICE reason compress_min_reason(reason a, reason b) {
  if (a == reason::none) return b;
  if (b == reason::none) return a;
  return static_cast<int>(a) < static_cast<int>(b) ? a : b;
}

//! Checks one segment's length against everything the chain needs; reason::none when fine.
PREFIXKV_HOST_DEVICE reason compress_length_reason(int64_t n, int64_t capacity, int64_t max_tokens, int64_t window,
                                                   int64_t score_stride, bool caller_scores) {
  if (n < 0 || n > capacity) return reason::out_of_range;
  if (n > max_tokens) return reason::capacity_exceeded;
  if (caller_scores && n > score_stride) return reason::out_of_range;
  if (window > 0 && n < window) return reason::bad_parameter;
  return reason::none;
}

//! Page size of a paged cache, 0 for a strided one.
template <class T, class S>
inline int64_t cache_page_size(const kv_layers<T, S>&) {
  return 0;
}
template <class T, class S>
inline int64_t cache_page_size(const paged_kv_layers<T, S>& c) {
  return c.k[0].page_size;
}

//! Host: write the outputs from per-segment new lengths `len` (caller order, layers [l0, l0 + lc)). `page_size`:
//! of the cache holding the result (0: strided, no pages_in_use).
inline void compress_outputs_host(const compress_geometry& g, int64_t page_size, const std::vector<int64_t>& len,
                                  const compress_outputs& o, bool whole) {
  const int64_t per_layer = g.batch * g.heads;
  for (int64_t li = 0; li < g.lc; ++li) {
    const int64_t l = g.l0 + li;
    int64_t run = 0;
    if (o.cu_seqlens) o.cu_seqlens[l * (per_layer + 1)] = 0;
    for (int64_t j = 0; j < per_layer; ++j) {
      const int64_t n = len[li * per_layer + j];
      if (o.lengths) o.lengths[l * per_layer + j] = static_cast<int32_t>(n);
      run += n;
      if (o.cu_seqlens) o.cu_seqlens[l * (per_layer + 1) + j + 1] = static_cast<int32_t>(run);
    }
  }
  if (o.pages_in_use && whole && page_size > 0)
    for (int64_t b = 0; b < g.batch; ++b) {
      int64_t mx = 0;
      for (int64_t li = 0; li < g.lc; ++li)
        for (int64_t h = 0; h < g.heads; ++h)
          mx = std::max(mx, (len[(li * g.batch + b) * g.heads + h] + page_size - 1) / page_size);
      o.pages_in_use[b] = static_cast<int32_t>(mx);
    }
}

//! The layers [l0, l0 + n) of a cache as a cache of n layers.
template <class C>
inline C cache_slice(const C& c, int64_t l0, int64_t n) {
  C s = c;
  s.k = c.k ? c.k + l0 : nullptr;
  s.v = c.v ? c.v + l0 : nullptr;
  s.k_scale = c.k_scale ? c.k_scale + l0 : nullptr;
  s.v_scale = c.v_scale ? c.v_scale + l0 : nullptr;
  s.layers = n;
  return s;
}

//! Layer l's keys, read-only, over the first `tokens` positions (what the scorers see on both backends).
template <class T, class S>
inline kv_view<const T> layer_keys(const kv_layers<T, S>& c, int64_t l, int64_t tokens) {
  return c.k[l].as_const().with_tokens(tokens);
}
template <class T, class S>
inline paged_kv_view<const T> layer_keys(const paged_kv_layers<T, S>& c, int64_t l, int64_t tokens) {
  return c.k[l].with_token_capacity(tokens).as_const();
}

template <class Cache, class P, class Dst>
inline cudaError_t compress_host_run(const compress_plan& pl, const compress_args<Cache, P, Dst>& a, int64_t layer) {
  int64_t batch = 0, capacity = 0;
  PREFIXKV_TRY(compress_check_args(pl, a, layer, batch, capacity));
  const compress_config& c = pl.cfg;
  const int64_t L = c.layers, H = pl.seg_heads;
  compress_geometry g;
  g.l0 = layer < 0 ? 0 : layer;
  g.lc = layer < 0 ? L : 1;
  g.batch = batch;
  g.heads = H;
  g.capacity = capacity;
  const int64_t S = g.segments();
  const segment_grid grid = g.grid();
  const int64_t heads_in = a.lengths_per_segment ? H : 1;
  auto n_in = [&](int64_t l, int64_t b, int64_t h) {
    return compress_input_length(a.lengths, a.lengths_per_segment, batch, heads_in, l, b, a.lengths_per_segment ? h : 0);
  };
  // input lengths in caller order for layers [l0, l0 + lc) (also the outputs of a failed chain)
  std::vector<int64_t> len_in(static_cast<size_t>(S));
  reason why = reason::none;
  for (int64_t li = 0; li < g.lc; ++li)
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t l = g.l0 + li, n = n_in(l, b, h);
        len_in[(li * batch + b) * H + h] = n;
        const int64_t w = c.scorer == scorer_kind::window ? a.queries[l].tokens : 0;
        why = compress_min_reason(why, compress_length_reason(n, capacity, c.max_tokens, w, a.score_stride,
                                                              c.scorer == scorer_kind::scores));
      }
  // every layer's lengths enter the budgets (also those of layers outside a one-layer call)
  for (int64_t l = 0; l < L; ++l)
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t n = n_in(l, b, h);
        if (n < 0 || n > capacity) why = compress_min_reason(why, reason::out_of_range);
      }
  if constexpr (is_paged_cache<Cache>::value) {  // every block a sequence's tokens occupy in a layer names a page
    for (int64_t l = 0; l < L; ++l) {
      const auto& v = a.cache.k[l];  // its own block table (or the one all layers share)
      for (int64_t b = 0; b < batch; ++b) {
        int64_t nmax = 0;
        for (int64_t h = 0; h < H; ++h) nmax = std::max(nmax, std::min(std::max<int64_t>(n_in(l, b, h), 0), capacity));
        for (int64_t blk = 0; blk * v.page_size < nmax; ++blk) {
          const int32_t page = v.block_table[b * v.block_table_stride + blk];
          if (page < 0 || page >= v.num_pages) why = compress_min_reason(why, reason::out_of_range);
        }
      }
    }
  }
  const int64_t result_page_size = c.in_place ? cache_page_size(a.cache) : cache_page_size(a.dst);
  auto stop = [&](reason r, const char* msg) {
    compress_outputs_host(g, result_page_size, len_in, a.out, layer < 0);
    if (a.out.status) *a.out.status = static_cast<int32_t>(r);
    return fail(r, msg ? msg : compress_message(r));
  };
  // ---- budgets: kept candidates per solver problem (lengths clamped to the capacity, as on the device)
  const bool prefix = c.alloc == allocation::prefix;
  const int64_t np = prefix ? batch : batch * g.lc;
  std::vector<int64_t> counts(static_cast<size_t>(np)), poff(static_cast<size_t>(np + 1)), layer_counts(static_cast<size_t>(L));
  for (int64_t b = 0; b < batch; ++b) {
    const reason r = sequence_budgets(pl, [&](int64_t l, int64_t h) {
          const int64_t n = n_in(l, b, h);
          return n < 0 ? int64_t(0) : (n > capacity ? capacity : n);
        }, prefix ? counts.data() + b : layer_counts.data());
    if (!prefix)
      for (int64_t li = 0; li < g.lc; ++li) counts[b * g.lc + li] = layer_counts[g.l0 + li];
    why = compress_min_reason(why, r);
  }
  if (why != reason::none) return stop(why, nullptr);

  // ---- score: rows in sequence-major order
  std::vector<int64_t> begins(static_cast<size_t>(S)), lens(static_cast<size_t>(S));
  int64_t maxn = 0;
  for (int64_t x : len_in) maxn = std::max(maxn, x);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t li = 0; li < g.lc; ++li)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t s = grid.id(li, b, h);
        lens[s] = len_in[(li * batch + b) * H + h];
        begins[s] = c.scorer == scorer_kind::scores ? g.caller_index(g.l0 + li, b, h) * a.score_stride : s * maxn;
      }
  const segments rows = make_ragged_segments(S, begins.data(), lens.data());
  std::vector<float> own;
  const float* scores = a.scores;
  if (c.scorer != scorer_kind::scores) {
    own.assign(static_cast<size_t>(S * maxn), 0.0f);
    scores = own.data();
  } else {  // caller scores: NaN / infinity before negative, as the device's status bits order them
    reason r = reason::none;
    for (int64_t s = 0; s < S; ++s)
      for (int64_t t = 0; t < lens[s]; ++t) {
        const float x = a.scores[begins[s] + t];
        if (!std::isfinite(x)) r = reason::nonfinite_input;
        else if (x < 0.0f && r == reason::none) r = reason::negative_input;
      }
    if (r != reason::none) return stop(r, nullptr);
  }
  for (int64_t li = 0; li < g.lc && c.scorer != scorer_kind::scores; ++li) {
    const int64_t l = g.l0 + li;
    cudaError_t e = cudaSuccess;
    switch (c.scorer) {
      case scorer_kind::attention:
        e = accumulated_attention_host(a.attention[l], grid, li, rows, own.data());
        break;
      case scorer_kind::window:
      case scorer_kind::key_norm: {
        const auto k = layer_keys(a.cache, l, std::min(capacity, c.max_tokens));
        e = c.scorer == scorer_kind::window
                ? window_attention_host(a.queries[l], k, a.lse ? a.lse[l] : lse_view{}, c.window, grid, li, rows,
                                        own.data())
                : key_norm_host(k, key_norm_options{true}, grid, li, rows, own.data());
        break;
      }
      case scorer_kind::recency:
        for (int64_t b = 0; b < batch; ++b)
          for (int64_t h = 0; h < H; ++h) {
            const int64_t s = grid.id(li, b, h);
            for (int64_t t = 0; t < lens[s]; ++t) own[begins[s] + t] = static_cast<float>(t + 1);
          }
        break;
      default: break;
    }
    if (e != cudaSuccess) {
      const error_info info = last_error();
      if (info.why == reason::nonfinite_input || info.why == reason::out_of_range || info.why == reason::bad_parameter)
        return stop(info.why, info.message);
      return e;
    }
  }
  // ---- curves
  curve_buffers curves;
  if (build_curves_host(scores, rows, c.protect, curves) != cudaSuccess) {
    const error_info info = last_error();
    if (info.why == reason::nonfinite_input || info.why == reason::negative_input) return stop(info.why, info.message);
    return info.code;
  }
  const int64_t per_problem = prefix ? g.lc * H : H;
  for (int64_t p = 0; p <= np; ++p) poff[p] = p * per_problem;
  solve_budget budget;
  budget.kind = budget_kind::keep_candidates;
  budget.counts = counts.data();
  keep_bounds bounds{c.min_keep, c.max_keep, nullptr, nullptr};
  std::vector<int64_t> keep(static_cast<size_t>(S));
  std::vector<float> thr(static_cast<size_t>(np));
  if (solve_host(curves.view(), np, poff.data(), budget, bounds, keep.data(), thr.data()) != cudaSuccess) {
    const error_info info = last_error();
    if (info.why == reason::infeasible_budget || info.why == reason::infeasible_bounds) return stop(info.why, info.message);
    return info.code;
  }
  // ---- select
  selection_buffers sel;
  PREFIXKV_TRY(write_selection_host(curves.view(), keep.data(), sel));
  // ---- compact (a selection that keeps nothing, e.g. of empty sequences, still needs a valid index pointer)
  selection kept = sel.view();
  const int32_t no_index = 0;
  if (kept.indices == nullptr) kept.indices = &no_index;
  const auto src = cache_slice(a.cache, g.l0, g.lc);
  const cudaError_t ce = c.in_place ? compact_in_place_host(src, kept, grid)
                                    : gather_kept_host(src, cache_slice(a.dst, g.l0, g.lc), kept, grid);
  if (ce != cudaSuccess) {  // page ids the compaction checks (out of range, or a page twice): a chain failure
    const error_info info = last_error();
    if (info.why == reason::out_of_range || info.why == reason::overlapping_buffers) return stop(info.why, info.message);
    return ce;
  }
  // ---- outputs
  std::vector<int64_t> len_out(static_cast<size_t>(S));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t li = 0; li < g.lc; ++li)
      for (int64_t h = 0; h < H; ++h) len_out[(li * batch + b) * H + h] = keep[grid.id(li, b, h)];
  compress_outputs_host(g, result_page_size, len_out, a.out, layer < 0);
  if (a.out.threshold)
    for (int64_t p = 0; p < np; ++p) {
      const int64_t idx = prefix ? p : (p / g.lc) * L + g.l0 + p % g.lc;
      a.out.threshold[idx] = thr[p];
    }
  if (a.out.status) *a.out.status = 0;
  return cudaSuccess;
}

}  // namespace detail

//! The compressor on the host (CPU runtimes, and the reference of the CUDA backend): every pointer in `args` is
//! host memory. Returns cudaSuccess, or cudaErrorInvalidValue with `last_error()` saying why; when the chain stops
//! on bad input (see compress.hpp) the cache is untouched and the outputs describe it unchanged.
template <class Cache, class P, class Dst>
[[nodiscard]] cudaError_t compress_host(const compress_plan& plan, const compress_args<Cache, P, Dst>& args) noexcept {
  try {
    return detail::compress_host_run(plan, args, -1);
  } catch (...) {
    return detail::fail(reason::capacity_exceeded, "compress: out of host memory", cudaErrorMemoryAllocation);
  }
}

//! One layer at a time (the paper's serving mode: compress layer `layer` as soon as its prefill is done, so the
//! uncompressed caches of all layers never coexist). Needs a per-layer budget (`uniform`, `pyramid`, `profile`);
//! `args.lengths` must hold every layer's lengths (budgets of `uniform`/`pyramid` depend on all of them). Outputs
//! are written for this layer only (`pages_in_use` is not written; derive it from the lengths).
template <class Cache, class P, class Dst>
[[nodiscard]] cudaError_t compress_layer_host(const compress_plan& plan, const compress_args<Cache, P, Dst>& args,
                                              int64_t layer) noexcept {
  try {
    if (layer < 0) return detail::fail(reason::out_of_range, "compress: negative layer");
    return detail::compress_host_run(plan, args, layer);
  } catch (...) {
    return detail::fail(reason::capacity_exceeded, "compress: out of host memory", cudaErrorMemoryAllocation);
  }
}

PREFIXKV_NAMESPACE_END
