//! \file prefixkv/decode/detail/decode_host.hpp
//! Decode-time upkeep, host backend: `decode_init_host`, `decode_step_host`, and the argument checks shared with
//! the CUDA backend. Included by decode.hpp.
#pragma once

#include "../decode.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

//! Static message of a device-data problem.
inline const char* decode_message(reason r) noexcept {
  switch (r) {
    case reason::nonfinite_input: return "decode: NaN or infinity in an observation (counted as 0)";
    case reason::negative_input: return "decode: a negative observed score (counted as 0)";
    case reason::out_of_range: return "decode: a length outside [0, capacity], or an observation shorter than the new length";
    case reason::capacity_exceeded: return "decode: the new tokens do not fit the cache (segment left unchanged)";
    default: return "decode: bad device data";
  }
}

//! Shape checks of `decode_init` (both backends).
inline cudaError_t decode_check_init(const decode_plan& pl, const decode_state& st, const decode_init_args& a) {
  if (!pl.valid) return fail(reason::bad_parameter, "decode: the plan was not made by make_plan");
  if (a.batch < 0 || a.batch > pl.cfg.max_batch) return fail(reason::capacity_exceeded, "decode: batch outside [0, max_batch]");
  if (st.lengths == nullptr || st.seen == nullptr || st.frac_num == nullptr || st.frac_den == nullptr ||
      st.status == nullptr)
    return fail(reason::null_pointer, "decode: the state is not bound");
  if (pl.cfg.policy == decode_policy::fixed_position && st.position == nullptr)
    return fail(reason::null_pointer, "decode: the state has no fixed positions (bound for another plan?)");
  if (pl.has_scores() && pl.cfg.max_tokens > 0 && st.scores == nullptr)
    return fail(reason::null_pointer, "decode: the state has no scores (bound for another plan?)");
  if (pl.has_stamps() && pl.cfg.max_tokens > 0 && st.stamps == nullptr)
    return fail(reason::null_pointer, "decode: the state has no stamps (bound for another plan?)");
  if (a.batch > 0 && (a.lengths == nullptr || a.seen == nullptr))
    return fail(reason::null_pointer, "decode: init lengths or seen is null");
  if (a.scores && a.score_stride < 0) return fail(reason::negative_stride, "decode: score_stride is negative");
  if (a.scores && a.score_stride > 0 &&
      pl.segments(a.batch) > std::numeric_limits<int64_t>::max() / a.score_stride)
    return fail(reason::out_of_range, "decode: init score rows overflow 64-bit offsets");
  return cudaSuccess;
}

//! Length / seen of segment (l, b, h) in the init arguments (host or device pointers alike).
PREFIXKV_HOST_DEVICE int64_t decode_init_length(const decode_init_args& a, int64_t seg_heads, int64_t l, int64_t b,
                                                int64_t h) {
  return a.lengths_per_segment ? a.lengths[(l * a.batch + b) * seg_heads + h] : a.lengths[b];
}

//! One segment of `decode_init`: writes its scalars (the caller writes its score/stamp rows); returns a reason.
//! `r_of(row)` reads the initial score of a row, `stamp_of(row)` its stamp (both only for rows < n).
PREFIXKV_HOST_DEVICE reason decode_init_scalars(const decode_plan& pl, const decode_state& st, const decode_init_args& a,
                                                int64_t l, int64_t b, int64_t h, int64_t& n_out) {
  const int64_t s = pl.state_index(l, b, h);
  reason why = reason::none;
  int64_t n = 0, N = 0;
  if (b < a.batch) {
    n = decode_init_length(a, pl.seg_heads, l, b, h);
    N = a.seen[b];
    if (n < 0 || n > pl.cfg.max_tokens) {
      why = reason::out_of_range;
      n = n < 0 ? 0 : pl.cfg.max_tokens;
    }
    if (N < n) {  // a segment cannot hold more tokens than its sequence has seen (stamps rely on it)
      why = reason::out_of_range;
      N = n;
    }
  }
  st.lengths[s] = static_cast<int32_t>(n);
  st.seen[s] = N;
  st.frac_num[s] = n;
  st.frac_den[s] = N;
  if (pl.cfg.policy == decode_policy::fixed_position) {
    const int64_t p = decode_fixed_row(n, pl.cfg.distance);
    st.position[s] = static_cast<int32_t>(p > INT32_MAX ? INT32_MAX : p);
  }
  n_out = n;
  return why;
}

//! Paged caches: every block holding rows [0, n) of sequence b names a page of the pool (rows are moved without
//! further checks; distinct pages are the runtime's invariant).
PREFIXKV_HOST_DEVICE bool decode_pages_ok(const compact_table& t, int64_t b, int64_t n) {
  if (!t.paged) return true;
  for (int64_t blk = 0; blk * t.page_size < n; ++blk) {
    const int64_t page = t.table[b * t.stride + blk];
    if (page < 0 || page >= t.num_pages) return false;
  }
  return true;
}

//! Geometry of the attention observation shared by all layers (the device kernels read one descriptor).
template <class P>
inline bool decode_same_view(const kv_view<const P>& a, const kv_view<const P>& b) {
  return a.batch == b.batch && a.heads == b.heads && a.tokens == b.tokens && a.dim == b.dim &&
         a.stride_batch == b.stride_batch && a.stride_head == b.stride_head && a.stride_token == b.stride_token &&
         a.stride_dim == b.stride_dim;
}

//! Host-visible checks of a step (both backends); fills the compaction description of the cache (geometry and
//! per-layer pointers, used for the row moves), the call's batch and the segment capacity.
template <class Cache, class P>
inline cudaError_t decode_check_step(const decode_plan& pl, const decode_state& st, const decode_step_args<Cache, P>& a,
                                     compact_meta& m, compact_ptrs* ptrs, int64_t& batch, int64_t& capacity) {
  if (!pl.valid) return fail(reason::bad_parameter, "decode: the plan was not made by make_plan");
  const decode_config& c = pl.cfg;
  if (a.cache.layers != c.layers) return fail(reason::shape_mismatch, "decode: the cache's layers differ from the plan");
  if (a.cache.k == nullptr) return fail(reason::null_pointer, "decode: the cache's K view array is null");
  int64_t heads = 0, dim = 0;
  cache_shape(a.cache, batch, capacity, heads, dim);
  if (heads != c.kv_heads || dim != c.head_dim)
    return fail(reason::shape_mismatch, "decode: the cache's kv heads or head_dim differ from the plan");
  if (batch > c.max_batch) return fail(reason::capacity_exceeded, "decode: batch exceeds the plan's max_batch");
  if (capacity > c.max_tokens) capacity = c.max_tokens;
  if (st.lengths == nullptr || st.seen == nullptr || st.frac_num == nullptr || st.frac_den == nullptr ||
      st.status == nullptr)
    return fail(reason::null_pointer, "decode: the state is not bound");
  if (c.policy == decode_policy::fixed_position && st.position == nullptr)
    return fail(reason::null_pointer, "decode: the state has no fixed positions (bound for another plan?)");
  if (pl.has_scores() && c.max_tokens > 0 && st.scores == nullptr)
    return fail(reason::null_pointer, "decode: the state has no scores (bound for another plan?)");
  if (pl.has_stamps() && c.max_tokens > 0 && st.stamps == nullptr)
    return fail(reason::null_pointer, "decode: the state has no stamps (bound for another plan?)");
  if (a.appended < 0 || a.appended > c.max_tokens)
    return fail(reason::bad_parameter, "decode: appended must be in [0, max_tokens]");
  if (a.when != decode_when::automatic && a.when != decode_when::skip && a.when != decode_when::now)
    return fail(reason::bad_parameter, "decode: unknown decode_when");
  const decode_observe ob = a.observe;
  if (ob != decode_observe::none && ob != decode_observe::attention && ob != decode_observe::add_scores &&
      ob != decode_observe::set_scores)
    return fail(reason::bad_parameter, "decode: unknown observation kind");
  if (pl.has_scores() && ob == decode_observe::attention) {
    if (a.attention == nullptr) return fail(reason::null_pointer, "decode: attention probabilities are missing");
    for (int64_t l = 0; l < c.layers; ++l) {
      const auto& p = a.attention[l];
      PREFIXKV_TRY(validate(p));
      if (p.batch != batch || p.heads != c.q_heads)
        return fail(reason::shape_mismatch, "decode: P must be (batch, q_heads, queries, keys)");
      if (!decode_same_view(p, a.attention[0]))
        return fail(reason::shape_mismatch, "decode: every layer's P must share extents and strides");
      if (batch > 0 && p.tokens > 0 && p.data == nullptr) return fail(reason::null_pointer, "decode: P data is null");
    }
  }
  if (pl.has_scores() && (ob == decode_observe::add_scores || ob == decode_observe::set_scores)) {
    if (batch > 0 && a.scores == nullptr) return fail(reason::null_pointer, "decode: observed scores are null");
    if (a.score_stride < 0) return fail(reason::negative_stride, "decode: score_stride is negative");
    if (a.score_stride > 0 && pl.segments(batch) > std::numeric_limits<int64_t>::max() / a.score_stride)
      return fail(reason::out_of_range, "decode: score rows overflow 64-bit offsets");
  }
  // the cache's views (validated by the compaction's planner; the selection is a stand-in, never read here)
  const segment_grid grid{c.layers, batch, pl.seg_heads};
  static const int64_t fake_off = 0;
  static const int32_t fake_idx = 0;
  const selection fake{grid.count(), &fake_off, &fake_idx};
  PREFIXKV_TRY(compact_plan(a.cache, a.cache, true, fake, grid, compact_outputs{}, m, ptrs));
  if (per_layer_tables(a.cache))
    return fail(reason::unsupported, "decode: paged caches need one block table shared by the layers");
  return cudaSuccess;
}

//! The scores of the state as a cache of 1-element rows, (batch, seg_heads, max_tokens, 1) per layer, so that the
//! compaction moves them with the K/V rows.
inline void decode_score_views(const decode_plan& pl, float* scores, int64_t batch, std::vector<kv_view<float>>& out) {
  const int64_t T = pl.cfg.max_tokens, H = pl.seg_heads;
  out.clear();
  for (int64_t l = 0; l < pl.cfg.layers; ++l)
    out.push_back(make_kv_view(scores + pl.state_index(l, 0, 0) * T, batch, H, T, int64_t(1), H * T, T, int64_t(1), int64_t(1)));
}

//! Kept candidates of segment s for a compression (its target length minus its protected tokens).
PREFIXKV_HOST_DEVICE int64_t decode_compress_count(const decode_plan& pl, const decode_state& st, int64_t l, int64_t s) {
  const int64_t n = st.lengths[s];
  const int64_t keep = decode_target_length(pl, l, n, st.seen[s], st.frac_num[s], st.frac_den[s], 0);
  return keep - protected_count(n, pl.cfg.protect);
}

// ---- host row moves ------------------------------------------------------------------------------------------

//! Moves row `src` to row `dst` of every lane of segment (l, b[, h]) (K, V, scales; all heads for layer
//! segments), as bytes.
inline void decode_move_row_host(const compact_meta& m, const compact_ptrs& p, int64_t seg_heads, int64_t l, int64_t b,
                                 int64_t h, int64_t src, int64_t dst) {
  for (int32_t k = 0; k < m.kinds; ++k) {
    const compact_geom& g = m.src[k];
    const int64_t unit = g.contiguous ? g.row_bytes : g.elem_bytes;
    const int64_t h0 = seg_heads == 1 ? 0 : h, h1 = seg_heads == 1 ? g.heads : h + 1;
    for (int64_t hh = h0; hh < h1; ++hh) {
      const char* sr = p.src[l][k] + m.st.row(g, b, hh, src);
      char* dr = p.src[l][k] + m.st.row(g, b, hh, dst);
      for (int64_t x = 0; unit > 0 && x < g.row_bytes; x += unit)
        std::memmove(dr + g.chunk(x), sr + g.chunk(x), static_cast<size_t>(unit));
    }
  }
}

//! Host step of one segment for the fixed-position and score policies: evicts down to the target length.
inline void decode_evict_host(const decode_plan& pl, const decode_state& st, const compact_meta& m,
                              const compact_ptrs& p, int64_t l, int64_t b, int64_t h) {
  const decode_config& c = pl.cfg;
  const int64_t s = pl.state_index(l, b, h);
  int64_t n = st.lengths[s];
  const int64_t pos = c.policy == decode_policy::fixed_position ? st.position[s] : 0;
  const int64_t target = decode_target_length(pl, l, n, st.seen[s], st.frac_num[s], st.frac_den[s], pos);
  int64_t k = n - target;
  if (k <= 0) return;
  float* sc = st.scores ? st.scores + s * c.max_tokens : nullptr;
  int32_t* sp = st.stamps ? st.stamps + s * c.max_tokens : nullptr;
  auto move = [&](int64_t src, int64_t dst) {
    if (src == dst) return;
    decode_move_row_host(m, p, pl.seg_heads, l, b, h, src, dst);
    if (sc) sc[dst] = sc[src];
    if (sp) sp[dst] = sp[src];
  };
  if (c.policy == decode_policy::fixed_position) {  // rows [pos, pos + k) go, the rest of the tail shifts down
    for (int64_t r = pos + k; r < n; ++r) move(r, r - k);
    st.lengths[s] = static_cast<int32_t>(n - k);
    return;
  }
  std::vector<std::pair<uint64_t, int64_t>> keys;
  std::vector<int64_t> holes, fillers;
  while (k > 0) {
    const int64_t kr = k < decode_round ? k : decode_round;
    const int64_t lo = c.protect.sinks, end = n - c.protect.recent;  // candidates (k > 0 implies n > sinks + recent)
    keys.clear();
    for (int64_t r = lo; r < end; ++r) keys.push_back({decode_key(sc[r], sp[r]), r});
    std::nth_element(keys.begin(), keys.begin() + (kr - 1), keys.end());
    holes.clear();
    for (int64_t i = 0; i < kr; ++i) holes.push_back(keys[i].second);
    std::sort(holes.begin(), holes.end());
    if (c.order == decode_order::preserve) {
      int64_t w = holes[0];
      size_t hi = 0;
      for (int64_t r = holes[0]; r < n; ++r) {
        if (hi < holes.size() && holes[hi] == r) {
          ++hi;
          continue;
        }
        move(r, w++);
      }
    } else {
      const int64_t bound = end - kr;  // candidates end here after the round
      fillers.clear();
      size_t hi = 0;
      while (hi < holes.size() && holes[hi] < bound) ++hi;  // holes [0, hi) are inside, the rest in [bound, end)
      size_t hj = hi;
      for (int64_t r = bound; r < end; ++r) {
        if (hj < holes.size() && holes[hj] == r) {
          ++hj;
          continue;
        }
        fillers.push_back(r);
      }
      for (size_t i = 0; i < fillers.size(); ++i) move(fillers[i], holes[i]);
      for (int64_t r = end; r < n; ++r) move(r, r - kr);  // the recent window
    }
    n -= kr;
    k -= kr;
  }
  st.lengths[s] = static_cast<int32_t>(n);
}

template <class Cache, class P>
inline cudaError_t decode_step_host_run(const decode_plan& pl, decode_state& st, const decode_step_args<Cache, P>& a) {
  compact_meta m;
  std::vector<compact_ptrs> ptrs(1);
  int64_t batch = 0, capacity = 0;
  PREFIXKV_TRY(decode_check_step(pl, st, a, m, ptrs.data(), batch, capacity));
  const decode_config& c = pl.cfg;
  const int64_t L = c.layers, H = pl.seg_heads, T = c.max_tokens;
  const bool compress_now = c.policy == decode_policy::amortised &&
                            (a.when == decode_when::now || (a.when == decode_when::automatic && decode_schedule(pl, st, a.appended)));
  reason why = reason::none;
  // ---- commit and observe, every segment; a segment whose length is bad or whose new tokens do not fit is left
  //      unchanged (and not evicted)
  std::vector<char> skip(static_cast<size_t>(pl.segments(batch)), 0);
  for (int64_t l = 0; l < L; ++l)
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t s = pl.state_index(l, b, h);
        const int64_t add = a.active == nullptr || a.active[b] != 0 ? a.appended : 0;
        const int64_t n = st.lengths[s], N = st.seen[s];
        if (n < 0 || n > capacity) {
          why = decode_min_reason(why, reason::out_of_range);
          skip[(l * batch + b) * H + h] = 1;
          continue;
        }
        if (n + add > capacity || N + add > INT32_MAX) {
          why = decode_min_reason(why, reason::capacity_exceeded);
          skip[(l * batch + b) * H + h] = 1;
          continue;
        }
        if (!decode_pages_ok(m.st, b, n + add)) {
          why = decode_min_reason(why, reason::out_of_range);
          skip[(l * batch + b) * H + h] = 1;
          continue;
        }
        const int64_t n1 = n + add;
        if (pl.has_scores()) {
          float* sc = st.scores + s * T;
          for (int64_t r = n; r < n1; ++r) sc[r] = 0.0f;
          if (pl.has_stamps())
            for (int64_t r = n; r < n1; ++r) st.stamps[s * T + r] = static_cast<int32_t>(N + (r - n));
          const int64_t j = (l * batch + b) * H + h;  // caller row of the observed scores
          if (a.observe == decode_observe::attention) {
            const kv_view<const P>& pv = a.attention[l];
            if (n1 > pv.dim) {
              why = decode_min_reason(why, reason::out_of_range);
            } else {
              const int64_t G = c.q_heads / H, h0 = h * G;
              for (int64_t r = 0; r < n1; ++r) {
                float x = 0.0f;
                for (int64_t q = 0; q < pv.tokens; ++q) {
                  float hs = 0.0f;
                  for (int64_t g = 0; g < G; ++g) hs += to_float(pv(b, h0 + g, q, r));
                  x += hs / static_cast<float>(G);
                }
                sc[r] = decode_accumulate(sc[r], decode_sanitise(x, why), why);
              }
            }
          } else if (a.observe == decode_observe::add_scores || a.observe == decode_observe::set_scores) {
            if (n1 > a.score_stride) {
              why = decode_min_reason(why, reason::out_of_range);
            } else {
              const float* in = a.scores + j * a.score_stride;
              for (int64_t r = 0; r < n1; ++r) {
                const float x = decode_sanitise(in[r], why);
                sc[r] = a.observe == decode_observe::set_scores ? x : decode_accumulate(sc[r], x, why);
              }
            }
          }
        }
        st.lengths[s] = static_cast<int32_t>(n1);
        st.seen[s] = N + add;
      }
  // ---- evict
  if (c.policy != decode_policy::amortised) {
    for (int64_t l = 0; l < L; ++l)
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t h = 0; h < H; ++h)
          if (!skip[(l * batch + b) * H + h]) decode_evict_host(pl, st, m, ptrs[0], l, b, h);
  } else if (compress_now && batch > 0) {
    // one solve + in-place compaction over all layers: rows sequence-major (a sequence's segments contiguous)
    const segment_grid grid{L, batch, H, true};
    const int64_t S = grid.count();
    std::vector<int64_t> begins(static_cast<size_t>(S)), lens(static_cast<size_t>(S)), state_of(static_cast<size_t>(S));
    for (int64_t l = 0; l < L; ++l)
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t j = grid.id(l, b, h), s = pl.state_index(l, b, h);
          const int64_t n = st.lengths[s];
          state_of[j] = s;
          begins[j] = s * T;
          lens[j] = n >= 0 && n <= capacity && decode_pages_ok(m.st, b, n) ? n : -1;  // bad: left alone (empty row)
        }

    std::vector<char> bad(static_cast<size_t>(S), 0);
    for (int64_t j = 0; j < S; ++j) {
      bad[j] = lens[j] < 0;
      if (bad[j]) lens[j] = 0;
    }
    const segments rows = make_ragged_segments(S, begins.data(), lens.data());
    curve_buffers curves;
    PREFIXKV_TRY(build_curves_host(st.scores, rows, c.protect, curves));
    const int64_t np = c.rebalance ? batch : S, per = c.rebalance ? L * H : 1;
    std::vector<int64_t> counts(static_cast<size_t>(np), 0), poff(static_cast<size_t>(np + 1)), keep(static_cast<size_t>(S));
    for (int64_t j = 0; j < S; ++j)
      if (!bad[j]) counts[j / per] += decode_compress_count(pl, st, grid.layer_of(j), state_of[j]);
    for (int64_t q = 0; q <= np; ++q) poff[q] = q * per;
    solve_budget budget;
    budget.kind = budget_kind::keep_candidates;
    budget.counts = counts.data();
    PREFIXKV_TRY(solve_host(curves.view(), np, poff.data(), budget, keep_bounds{}, keep.data(), nullptr));
    selection_buffers sel;
    PREFIXKV_TRY(write_selection_host(curves.view(), keep.data(), sel));
    PREFIXKV_TRY(compact_in_place_host(a.cache, sel.view(), grid));
    std::vector<kv_view<float>> sv;
    decode_score_views(pl, st.scores, batch, sv);
    PREFIXKV_TRY(compact_in_place_host(kv_layers<float>{sv.data(), nullptr, nullptr, nullptr, L}, sel.view(), grid));
    for (int64_t j = 0; j < S; ++j) {
      const int64_t s = state_of[j];
      if (bad[j]) continue;
      st.lengths[s] = static_cast<int32_t>(keep[j]);
      if (c.rebalance) {
        st.frac_num[s] = keep[j];
        st.frac_den[s] = decode_fraction_den(st.seen[s], c.horizon);
      }
    }
  }
  if (why != reason::none) *st.status = static_cast<int32_t>(decode_min_reason(static_cast<reason>(*st.status), why));
  return cudaSuccess;
}

}  // namespace detail

//! Start decoding (host backend; every pointer host memory): lengths, tokens seen, budget fractions (n0 / N0 per
//! segment), fixed rows, initial scores (0 unless given) and stamps (the row index) of every segment;
//! sequences [batch, max_batch) start empty; `state.status` and `state.pending` are cleared. Lengths outside
//! [0, max_tokens] are clamped, a `seen` below a segment's length is raised to it, and both are reported in
//! `state.status` (cudaSuccess is returned).
[[nodiscard]] inline cudaError_t decode_init_host(const decode_plan& plan, decode_state& state,
                                                  const decode_init_args& args) noexcept {
  PREFIXKV_TRY(detail::decode_check_init(plan, state, args));
  const decode_config& c = plan.cfg;
  const int64_t T = c.max_tokens;
  reason why = reason::none;
  for (int64_t l = 0; l < c.layers; ++l)
    for (int64_t b = 0; b < c.max_batch; ++b)
      for (int64_t h = 0; h < plan.seg_heads; ++h) {
        int64_t n = 0;
        why = detail::decode_min_reason(why, detail::decode_init_scalars(plan, state, args, l, b, h, n));
        const int64_t s = plan.state_index(l, b, h), j = (l * args.batch + b) * plan.seg_heads + h;
        if (plan.has_scores() && args.scores && n > args.score_stride)
          why = detail::decode_min_reason(why, reason::out_of_range);  // rows past the stride start at 0
        if (plan.has_scores())
          for (int64_t r = 0; r < T; ++r) {
            float x = 0.0f;
            if (r < n && r < args.score_stride && args.scores)
              x = detail::decode_sanitise(args.scores[j * args.score_stride + r], why);
            state.scores[s * T + r] = x;
          }
        if (plan.has_stamps())
          for (int64_t r = 0; r < T; ++r) state.stamps[s * T + r] = static_cast<int32_t>(r);
      }
  *state.status = static_cast<int32_t>(why);
  state.pending = 0;
  return cudaSuccess;
}

//! One generated step (host backend; every pointer host memory, the cache included): commit the appended
//! tokens, observe, evict or compress (see decode.hpp). Host-visible problems return cudaErrorInvalidValue before
//! anything is written; problems in the data are reported in `*state.status` and cudaSuccess is returned.
template <class Cache, class P>
[[nodiscard]] cudaError_t decode_step_host(const decode_plan& plan, decode_state& state,
                                           const decode_step_args<Cache, P>& args) noexcept {
  try {
    return detail::decode_step_host_run(plan, state, args);
  } catch (...) {
    return detail::fail(reason::capacity_exceeded, "decode: out of host memory", cudaErrorMemoryAllocation);
  }
}

PREFIXKV_NAMESPACE_END
