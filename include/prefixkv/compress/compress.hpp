//! \file prefixkv/compress/compress.hpp
//! The compressor: one call compresses a whole model's KV cache — score -> curve -> solve -> select -> compact for
//! every layer and every sequence of a ragged batch. This header holds the public types, the plan (validated
//! once, reused for every call) and the host backend; the CUDA backend is `prefixkv/compress/compress.cuh`.
//!
//! Plan once from the model shape and the policy, then run as often as needed:
//! \code
//! prefixkv::compress_config cfg;
//! cfg.layers = 32; cfg.q_heads = 32; cfg.kv_heads = 8; cfg.head_dim = 128;
//! cfg.max_batch = 8; cfg.max_tokens = 32768;              // the largest call the plan serves
//! cfg.scorer = prefixkv::scorer_kind::attention;           // the paper's accumulated attention
//! cfg.evict_ratio = 0.5;                                   // evict half of every sequence's tokens
//! prefixkv::compress_plan plan;
//! if (prefixkv::make_plan(cfg, plan) != cudaSuccess) puts(prefixkv::last_error().message);
//! \endcode
//! Then, per call, a `compress_args` names the cache (all layers), the tokens per sequence, the scorer's inputs
//! and the outputs; `compress_host(plan, args)` runs it on the CPU, `compress(d_temp, temp_bytes, plan, args,
//! stream)` on the GPU (compress.cuh). Both keep the same tokens and write the same bytes.
//!
//! Semantics (both backends):
//! * Segments: one per (layer, sequence) (`granularity::layer`), or one per (layer, sequence, kv head)
//!   (`granularity::head`); segment (l, b[, h]) holds the n tokens of that cache row list.
//! * Protected tokens (`protect`: the first `sinks` and the last `recent` of every segment) are always kept.
//! * Budget of a sequence (all its segments together): `evict_ratio` r evicts E = rint(r * N) candidates, N = the
//!   sequence's tokens summed over its segments; `keep_tokens` T keeps T * (1 or kv_heads) tokens, protected
//!   included. `allocation::profile` instead evicts rint(f_l * N_l) candidates of every layer l.
//! * Allocation of the budget over the layers: `prefix` (PrefixKV) solves one global cumulative-importance
//!   threshold over all segments of the sequence (docs/solver.md); `uniform` gives every layer the same count,
//!   `pyramid` PyramidKV's linear schedule (the first layer 39x the last), `profile` the profile's counts. With
//!   head granularity, a layer's count is then spread over its kv heads by one threshold per layer (Ada-KV style).
//! * Inside a segment the kept candidates are the highest-scored ones (ties: lower position first); kept tokens stay
//!   in token order. New length of segment s = its kept tokens; rows beyond it keep their old bytes.
//! * One status for the chain: any bad input met on the way (non-finite or negative scores, a length past the
//!   capacity or shorter than the window, an infeasible budget, a bad page id) stops the chain before anything is
//!   moved: the cache stays byte-identical, the output lengths equal the input lengths, and the status holds the
//!   `reason` (the host backend returns cudaErrorInvalidValue with the same reason).
//! * Paged caches: the layers share one block table, or each layer has its own (`paged_kv_layers`): then every layer
//!   packs its kept tokens into the first pages of its own table and can free the rest of them on its own. The
//!   window and key-norm scorers need one shared table (they read K); the attention and recency scorers and caller
//!   scores work with either.
#pragma once

#include "../compact/compact.hpp"
#include "../core/error.hpp"
#include "../core/validate.hpp"
#include "../core/views.hpp"
#include "../curve/curve.hpp"
#include "../profile/profile.hpp"
#include "../score/score.hpp"
#include "../select/select.hpp"
#include "../solve/solve.hpp"

#include <cmath>
#include <limits>
#include <vector>

PREFIXKV_NAMESPACE_BEGIN

//! Where the token scores come from.
enum class scorer_kind : int {
  scores = 0,     //!< the caller's float scores (>= 0), one row per segment
  attention = 1,  //!< accumulated attention from materialised probabilities (the paper's scorer)
  window = 2,     //!< observation-window attention of the last w queries over the cached K (+ optional LSE)
  key_norm = 3,   //!< 1 / ||k|| of the cached keys
  recency = 4,    //!< the position: the most recent candidates score highest (StreamingLLM with `uniform`)
};

//! What one segment (one score row, one kept list) covers.
enum class granularity : int {
  layer = 0,  //!< one segment per (layer, sequence): the kv heads of a layer keep the same tokens
  head = 1,   //!< one segment per (layer, sequence, kv head): every kv head keeps its own tokens
};

//! How a sequence's budget is spread over its layers.
enum class allocation : int {
  prefix = 0,   //!< PrefixKV: one global cumulative-importance threshold over all layers (and heads)
  uniform = 1,  //!< every layer keeps the same count
  pyramid = 2,  //!< PyramidKV: counts falling linearly with depth, the first layer 39x the last
  profile = 3,  //!< per-layer eviction fractions calibrated offline (the paper's serving mode)
};

//! The policy and the model shape, given once (`make_plan`). Plain data; arrays are copied by `make_plan`.
struct compress_config {
  // ---- model shape
  int64_t layers = 0;    //!< layers of the cache (at most `compact_max_layers`)
  int64_t q_heads = 0;   //!< query heads (attention / window scorers)
  int64_t kv_heads = 0;  //!< kv heads of the cache
  int64_t head_dim = 0;  //!< elements per cached row
  // ---- the largest call the plan serves (sizes the device workspace)
  int64_t max_batch = 1;   //!< sequences per call
  int64_t max_tokens = 0;  //!< tokens per sequence (per segment)
  int64_t max_window = 0;  //!< window scorer: query rows per sequence
  int64_t max_pages = 0;   //!< paged caches: pages in the pool
  int64_t page_size = 0;   //!< paged caches: tokens per page (the cache's views must use it); 0 for strided caches
  // ---- policy
  scorer_kind scorer = scorer_kind::attention;
  window_options window{};  //!< window scorer options (scale, group/head reductions, pooling)
  granularity gran = granularity::layer;
  allocation alloc = allocation::prefix;
  budget_kind budget = budget_kind::evict_ratio;  //!< evict_ratio or keep_tokens (per sequence)
  double evict_ratio = 0.5;                       //!< in [0, 1)
  int64_t keep_tokens = 0;                        //!< per sequence, summed over layers (per kv head: head granularity)
  const double* profile = nullptr;                //!< (layers) eviction fractions for `allocation::profile`
  protect_policy protect{};                       //!< sinks and recent tokens, always kept (default 4 and 1)
  int64_t min_keep = 0;                           //!< kept candidates per segment, at least (clipped to its candidates)
  int64_t max_keep = std::numeric_limits<int64_t>::max();  //!< and at most
  bool in_place = true;                                    //!< compact the cache itself, or gather into `dst`
};

//! A validated configuration. Trivially copyable; make it with `make_plan`, reuse it for every call.
struct compress_plan {
  compress_config cfg{};                      //!< `cfg.profile` points at `profile` below
  double profile[compact_max_layers] = {};    //!< the copied profile
  int64_t seg_heads = 1;                      //!< segments per (layer, sequence): 1 or kv_heads
  bool valid = false;
  //! Segments of a call with `batch` sequences.
  PREFIXKV_HOST_DEVICE int64_t segments(int64_t batch) const { return cfg.layers * batch * seg_heads; }
  //! Solver problems of a call: one per sequence (`prefix`), else one per (sequence, layer).
  PREFIXKV_HOST_DEVICE int64_t problems(int64_t batch) const {
    return cfg.alloc == allocation::prefix ? batch : batch * cfg.layers;
  }
};

//! Outputs of a call (device memory for `compress`, host memory for `compress_host`); every pointer optional.
//! Written on success and on a chain failure alike (then they describe the unchanged cache).
struct compress_outputs {
  int32_t* lengths = nullptr;       //!< (layers, batch[, kv_heads]) tokens per segment after the call
  int32_t* cu_seqlens = nullptr;    //!< (layers, batch[ * kv_heads] + 1) per-layer prefix sums of `lengths`
  int32_t* pages_in_use = nullptr;  //!< (batch) paged caches: pages each sequence still needs, the most over its
                                    //!< layers (per-layer block tables: ceil(lengths / page_size) per layer)
  float* threshold = nullptr;       //!< (problems) the solver's threshold per problem (see `compress_plan::problems`)
  int32_t* status = nullptr;        //!< (1) 0, or the `prefixkv::reason` that stopped the chain (device)
};

//! The element type of a cache (`kv_layers<T>` or `paged_kv_layers<T>`).
template <class Cache>
using cache_element_t = typename Cache::element_type;

//! One call. `Cache` is `kv_layers<T>` or `paged_kv_layers<T>` (host arrays of per-layer views), `P` the element
//! type of attention probabilities, `Dst` the destination of an out-of-place call.
template <class Cache, class P = cache_element_t<Cache>, class Dst = Cache>
struct compress_args {
  using T = cache_element_t<Cache>;
  Cache cache{};  //!< all layers; batch = the views' batch extent; capacity = their token extent (paged: blocks x page)
  Dst dst{};      //!< out of place: where the kept rows go (same layers, batch and row bytes)
  //! Tokens per segment before the call: (batch), the same for every layer and head, or with `lengths_per_segment`
  //! (layers, batch[, kv_heads]) as `compress_outputs::lengths` returns them (repeated compression).
  const int32_t* lengths = nullptr;
  bool lengths_per_segment = false;
  // ---- the scorer's inputs (the one the plan names)
  const kv_view<const P>* attention = nullptr;  //!< (layers) P_l: (batch, q_head, query, key) probabilities
  const kv_view<const T>* queries = nullptr;    //!< (layers) Q_l: (batch, q_head, window, dim), the last w queries
  const lse_view* lse = nullptr;                //!< (layers) optional per-query LSE of the window queries
  const float* scores = nullptr;                //!< (layers, batch[, kv_heads], score_stride) caller scores
  int64_t score_stride = 0;                     //!< floats between two score rows (>= every length)
  compress_outputs out{};
};

namespace detail {

//! Integer pyramid weight of layer l of L (PyramidKV's schedule with beta = 20: linear, first/last = 39).
PREFIXKV_HOST_DEVICE int64_t pyramid_weight(int64_t l, int64_t L) { return L <= 1 ? 1 : 39 * (L - 1) - 38 * l; }

//! Spread B over L bins proportionally to the integer weights w (> 0) within [lo, hi] (sum lo <= B <= sum hi):
//! x_l = clamp(floor(lambda * w_l / w_max), lo_l, hi_l) at the largest integer level lambda whose sum is <= B (one
//! step of lambda grows a bin by at most one), then one more to the lowest-numbered bins that grow at lambda + 1
//! until the sum is B. Exact integer arithmetic, so host and device agree. `w(l)`, `lo(l)`, `hi(l)` give the bin
//! data; x is written.
template <class Weight, class Lo, class Hi>
PREFIXKV_HOST_DEVICE void distribute_budget(int64_t B, int64_t L, Weight w, Lo lo, Hi hi, int64_t* x) {
  int64_t wmin = 0, wmax = 0, top = 0;
  for (int64_t l = 0; l < L; ++l) {
    if (wmin == 0 || w(l) < wmin) wmin = w(l);
    if (w(l) > wmax) wmax = w(l);
    if (hi(l) > top) top = hi(l);
  }
  auto at = [&](int64_t lam, int64_t l) {
    const int64_t v = lam * w(l) / wmax;  // lam <= top * wmax / wmin: no overflow for the plan's sizes
    return v < lo(l) ? lo(l) : (v > hi(l) ? hi(l) : v);
  };
  auto sum_at = [&](int64_t lam) {
    int64_t s = 0;
    for (int64_t l = 0; l < L; ++l) s += at(lam, l);
    return s;
  };
  // at lam = top * wmax / wmin + 1 every bin sits at hi, so the answer lies in [0, that]
  int64_t a = 0, b = wmin > 0 ? top / wmin * wmax + (top % wmin) * wmax / wmin + 1 : 0;
  if (sum_at(0) > B) {  // cannot happen when sum lo <= B (sum_at(0) == sum lo); keep the bounds anyway
    for (int64_t l = 0; l < L; ++l) x[l] = lo(l);
    return;
  }
  while (a < b) {
    const int64_t m = b - (b - a) / 2;
    if (sum_at(m) <= B)
      a = m;
    else
      b = m - 1;
  }
  int64_t rest = B;
  for (int64_t l = 0; l < L; ++l) rest -= (x[l] = at(a, l));
  for (int64_t l = 0; l < L && rest > 0; ++l)
    if (at(a + 1, l) > x[l]) {
      ++x[l];
      --rest;
    }
}

//! The budgets of one sequence: kept candidates of each of its solver problems (prefix: 1 problem, else one per
//! layer). `tokens(l, h)` is the segment's token count. Returns reason::none or why the budget cannot be met.
template <class Tokens>
PREFIXKV_HOST_DEVICE reason sequence_budgets(const compress_plan& pl, Tokens tokens, int64_t* counts) {
  const compress_config& c = pl.cfg;
  const int64_t L = c.layers, H = pl.seg_heads;
  const keep_bounds kb{c.min_keep, c.max_keep, nullptr, nullptr};
  problem_totals all;
  // per-layer totals (at most compact_max_layers layers)
  int64_t lay_c[compact_max_layers], lay_lo[compact_max_layers], lay_hi[compact_max_layers], lay_n[compact_max_layers];
  for (int64_t l = 0; l < L; ++l) {
    lay_c[l] = lay_lo[l] = lay_hi[l] = lay_n[l] = 0;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t n = tokens(l, h), cc = candidate_count(n, c.protect);
      int64_t lo = 0, hi = 0;
      segment_bounds(kb, 0, cc, lo, hi);
      lay_n[l] += n;
      lay_c[l] += cc;
      lay_lo[l] += lo;
      lay_hi[l] += hi;
    }
    all.tokens += lay_n[l];
    all.candidates += lay_c[l];
    all.lo += lay_lo[l];
    all.hi += lay_hi[l];
  }
  if (c.alloc == allocation::profile) {
    reason why = reason::none;
    for (int64_t l = 0; l < L; ++l) {
      const double e = rint(pl.profile[l] * static_cast<double>(lay_n[l]));
      const int64_t ev = e >= static_cast<double>(lay_c[l]) ? lay_c[l] : (e <= 0.0 ? 0 : static_cast<int64_t>(e));
      int64_t k = lay_c[l] - ev;
      if (k < lay_lo[l] || k > lay_hi[l]) {
        why = reason::infeasible_bounds;
        k = k < lay_lo[l] ? lay_lo[l] : lay_hi[l];
      }
      counts[l] = k;
    }
    return why;
  }
  // kept candidates of the whole sequence
  int64_t B = 0;
  reason why = reason::none;
  if (c.budget == budget_kind::evict_ratio) {
    const double e = rint(c.evict_ratio * static_cast<double>(all.tokens));
    if (e > static_cast<double>(all.candidates)) {
      why = reason::infeasible_budget;
      B = 0;
    } else {
      B = all.candidates - static_cast<int64_t>(e);
    }
  } else {
    const int64_t T = c.keep_tokens * H, prot = all.tokens - all.candidates;
    if (T < prot || T - prot > all.candidates) {
      why = reason::infeasible_budget;
      B = T < prot ? 0 : all.candidates;
    } else {
      B = T - prot;
    }
  }
  if (why == reason::none && (B < all.lo || B > all.hi)) why = reason::infeasible_bounds;
  if (B < all.lo) B = all.lo;
  if (B > all.hi) B = all.hi;
  if (c.alloc == allocation::prefix) {
    counts[0] = B;
    return why;
  }
  if (c.alloc == allocation::uniform)
    distribute_budget(B, L, [](int64_t) { return int64_t(1); }, [&](int64_t l) { return lay_lo[l]; },
                      [&](int64_t l) { return lay_hi[l]; }, counts);
  else
    distribute_budget(B, L, [&](int64_t l) { return pyramid_weight(l, L); }, [&](int64_t l) { return lay_lo[l]; },
                      [&](int64_t l) { return lay_hi[l]; }, counts);
  return why;
}

//! Static message of a chain failure.
inline const char* compress_message(reason r) noexcept {
  switch (r) {
    case reason::nonfinite_input: return "compress: NaN or infinity in the scorer's input or the scores";
    case reason::negative_input: return "compress: a score is negative";
    case reason::out_of_range: return "compress: a length exceeds the cache capacity (or the plan's max_tokens), or a page id is out of range";
    case reason::bad_parameter: return "compress: a sequence is shorter than the window";
    case reason::infeasible_budget: return "compress: the budget cannot be met by a sequence's candidates";
    case reason::infeasible_bounds: return "compress: min_keep / max_keep cannot meet a sequence's budget";
    case reason::capacity_exceeded: return "compress: a length exceeds the plan's max_tokens";
    case reason::overlapping_buffers: return "compress: a page appears twice in a block table";
    default: return "compress: the chain stopped on bad input";
  }
}

}  // namespace detail

//! Check a configuration (CUTLASS's `can_implement`): extents, policy values, and that the plan's sizes fit the
//! library's index types. Nothing is allocated.
[[nodiscard]] inline cudaError_t can_implement(const compress_config& c) noexcept {
  using detail::fail;
  if (c.layers <= 0 || c.q_heads <= 0 || c.kv_heads <= 0 || c.head_dim <= 0)
    return fail(reason::bad_parameter, "compress: layers, q_heads, kv_heads and head_dim must be positive");
  if (c.layers > compact_max_layers) return fail(reason::unsupported, "compress: more than compact_max_layers layers");
  if (c.q_heads % c.kv_heads != 0) return fail(reason::shape_mismatch, "compress: q_heads is not a multiple of kv_heads");
  if (c.max_batch < 0 || c.max_tokens < 0 || c.max_window < 0 || c.max_pages < 0 || c.page_size < 0)
    return fail(reason::negative_extent, "compress: a max_* size or the page size is negative");
  if (c.page_size > INT32_MAX) return fail(reason::out_of_range, "compress: page_size too large");
  if (c.max_tokens > INT32_MAX) return fail(reason::out_of_range, "compress: max_tokens must fit int32 positions");
  if (c.kv_heads > 4096 || c.max_batch > (int64_t(1) << 24))
    return fail(reason::out_of_range, "compress: kv_heads or max_batch too large");
  // every per-call product (segments x tokens, in bytes) must stay far from int64 overflow
  const int64_t seg_heads = c.gran == granularity::head ? c.kv_heads : 1;
  const int64_t per_seq = c.layers * seg_heads;  // <= 2^7 * 2^12
  if (c.max_tokens > 0 && per_seq > (int64_t(1) << 46) / c.max_tokens)
    return fail(reason::out_of_range, "compress: layers x kv_heads x max_tokens too large for one sequence");
  if (c.max_batch > 0 && c.max_tokens > 0 && c.max_batch > (int64_t(1) << 56) / (per_seq * c.max_tokens))
    return fail(reason::out_of_range, "compress: the plan's sizes overflow 64-bit byte counts");
  if (c.scorer != scorer_kind::scores && c.scorer != scorer_kind::attention && c.scorer != scorer_kind::window &&
      c.scorer != scorer_kind::key_norm && c.scorer != scorer_kind::recency)
    return fail(reason::bad_parameter, "compress: unknown scorer");
  if (c.gran != granularity::layer && c.gran != granularity::head)
    return fail(reason::bad_parameter, "compress: unknown granularity");
  if (c.alloc != allocation::prefix && c.alloc != allocation::uniform && c.alloc != allocation::pyramid &&
      c.alloc != allocation::profile)
    return fail(reason::bad_parameter, "compress: unknown allocation");
  if (c.alloc == allocation::profile) {
    PREFIXKV_TRY(validate_profile(c.profile, c.layers));
  } else if (c.budget == budget_kind::evict_ratio) {
    if (!(c.evict_ratio >= 0.0 && c.evict_ratio < 1.0))
      return fail(reason::bad_parameter, "compress: evict_ratio must be in [0, 1)");
  } else if (c.budget == budget_kind::keep_tokens) {
    if (c.keep_tokens < 0) return fail(reason::bad_parameter, "compress: keep_tokens is negative");
    if (c.keep_tokens > (int64_t(1) << 46) / seg_heads)
      return fail(reason::out_of_range, "compress: keep_tokens too large");
  } else {
    return fail(reason::bad_parameter, "compress: the budget must be evict_ratio or keep_tokens");
  }
  PREFIXKV_TRY(validate(c.protect));
  if (c.min_keep < 0 || c.max_keep < c.min_keep)
    return fail(reason::infeasible_bounds, "compress: need 0 <= min_keep <= max_keep");
  if (c.scorer == scorer_kind::window) {
    if (c.max_window <= 0) return fail(reason::bad_parameter, "compress: the window scorer needs max_window >= 1");
    if (!(c.window.scale >= 0.0f) || !std::isfinite(c.window.scale))
      return fail(reason::bad_parameter, "compress: window scale must be finite and >= 0 (0 = 1/sqrt(dim))");
    if (c.window.pool != pool_kind::none && (c.window.pool_kernel < 1 || c.window.pool_kernel % 2 == 0))
      return fail(reason::bad_parameter, "compress: window pool_kernel must be odd and >= 1");
  }
  return cudaSuccess;
}

//! Validate `cfg` and make the plan (copies the profile). On error `plan` is left as it was.
[[nodiscard]] inline cudaError_t make_plan(const compress_config& cfg, compress_plan& plan) noexcept {
  PREFIXKV_TRY(can_implement(cfg));
  compress_plan p;
  p.cfg = cfg;
  if (cfg.alloc == allocation::profile)
    for (int64_t l = 0; l < cfg.layers; ++l) p.profile[l] = cfg.profile[l];
  p.cfg.profile = nullptr;
  p.seg_heads = cfg.gran == granularity::head ? cfg.kv_heads : 1;
  p.valid = true;
  plan = p;
  return cudaSuccess;
}

namespace detail {

//! A cache's batch, token capacity and kv heads (kind 0 = K).
template <class T, class S>
inline void cache_shape(const kv_layers<T, S>& c, int64_t& batch, int64_t& capacity, int64_t& heads, int64_t& dim) {
  batch = c.k[0].batch;
  capacity = c.k[0].tokens;
  heads = c.k[0].heads;
  dim = c.k[0].dim;
}
template <class T, class S>
inline void cache_shape(const paged_kv_layers<T, S>& c, int64_t& batch, int64_t& capacity, int64_t& heads,
                        int64_t& dim) {
  batch = c.k[0].batch;
  capacity = c.k[0].max_blocks * c.k[0].page_size;
  heads = c.k[0].heads;
  dim = c.k[0].dim;
}
template <class Cache>
struct is_paged_cache : std::false_type {};
template <class T, class S>
struct is_paged_cache<paged_kv_layers<T, S>> : std::true_type {};

//! Do the layers of a paged cache have their own block tables? (Strided caches: no.)
template <class T, class S>
inline bool per_layer_tables(const kv_layers<T, S>&) {
  return false;
}
template <class T, class S>
inline bool per_layer_tables(const paged_kv_layers<T, S>& c) {
  for (int64_t l = 1; l < c.layers; ++l)
    if (c.k[l].block_table != c.k[0].block_table) return true;
  return false;
}

//! Host-side checks shared by both backends (everything the host can see). `batch`/`capacity` are returned.
template <class Cache, class P, class Dst>
inline cudaError_t compress_check_args(const compress_plan& pl, const compress_args<Cache, P, Dst>& a,
                                       int64_t layer_or_all, int64_t& batch, int64_t& capacity) {
  if (!pl.valid) return fail(reason::bad_parameter, "compress: the plan was not made by make_plan");
  const compress_config& c = pl.cfg;
  if (a.cache.layers != c.layers) return fail(reason::shape_mismatch, "compress: the cache's layers differ from the plan");
  if (a.cache.k == nullptr) return fail(reason::null_pointer, "compress: the cache's K view array is null");
  if (layer_or_all >= c.layers) return fail(reason::out_of_range, "compress: layer outside the plan");
  if (layer_or_all >= 0 && c.alloc == allocation::prefix)
    return fail(reason::bad_parameter, "compress: one layer at a time needs a per-layer budget (uniform, pyramid or profile)");
  int64_t heads = 0, dim = 0;
  cache_shape(a.cache, batch, capacity, heads, dim);
  if constexpr (is_paged_cache<Cache>::value) {
    if (a.cache.k[0].page_size != c.page_size)
      return fail(reason::shape_mismatch, "compress: the paged cache's page size differs from the plan's page_size");
  }
  if (heads != c.kv_heads || dim != c.head_dim)
    return fail(reason::shape_mismatch, "compress: the cache's kv heads or head_dim differ from the plan");
  if (batch > c.max_batch) return fail(reason::capacity_exceeded, "compress: batch exceeds the plan's max_batch");
  if (batch > 0 && a.lengths == nullptr) return fail(reason::null_pointer, "compress: lengths is null");
  if (!c.in_place && a.dst.layers != c.layers)
    return fail(reason::shape_mismatch, "compress: the destination's layers differ from the plan");
  const int64_t L = c.layers;
  const int64_t l0 = layer_or_all < 0 ? 0 : layer_or_all, l1 = layer_or_all < 0 ? L : layer_or_all + 1;
  if ((c.scorer == scorer_kind::window || c.scorer == scorer_kind::key_norm) && per_layer_tables(a.cache))
    return fail(reason::unsupported,
                "compress: the window and key-norm scorers read K through one block table shared by the layers; "
                "with per-layer block tables use the attention or recency scorer, or caller scores");
  switch (c.scorer) {
    case scorer_kind::attention:
      if (a.attention == nullptr) return fail(reason::null_pointer, "compress: attention probabilities are missing");
      for (int64_t l = l0; l < l1; ++l) {
        const auto& p = a.attention[l];
        if (p.batch != batch || p.heads != c.q_heads)
          return fail(reason::shape_mismatch, "compress: P must be (batch, q_heads, query, key)");
      }
      break;
    case scorer_kind::window:
      if (a.queries == nullptr) return fail(reason::null_pointer, "compress: window queries are missing");
      for (int64_t l = l0; l < l1; ++l) {
        const auto& q = a.queries[l];
        if (q.batch != batch || q.heads != c.q_heads || q.dim != c.head_dim)
          return fail(reason::shape_mismatch, "compress: Q must be (batch, q_heads, window, head_dim)");
        if (q.tokens < 1 || q.tokens > c.max_window)
          return fail(reason::bad_parameter, "compress: the window must be in [1, max_window]");
      }
      break;
    case scorer_kind::scores:
      if (batch > 0 && a.scores == nullptr) return fail(reason::null_pointer, "compress: scores is null");
      if (a.score_stride < 0) return fail(reason::negative_stride, "compress: score_stride is negative");
      if (a.score_stride > 0 && L * batch * pl.seg_heads > std::numeric_limits<int64_t>::max() / a.score_stride)
        return fail(reason::out_of_range, "compress: score rows overflow 64-bit offsets");
      break;
    default: break;
  }
  return cudaSuccess;
}

}  // namespace detail

PREFIXKV_NAMESPACE_END

#include "detail/compress_host.hpp"
