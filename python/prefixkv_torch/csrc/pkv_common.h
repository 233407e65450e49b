// prefixkv_torch: what the host (ops.cpp) and CUDA (*.cu) translation units share — argument checks that turn
// into Python ValueErrors, tensor -> prefixkv view conversions, and the compressor's plan and arguments built
// from the op's inputs. Nothing here launches work.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <prefixkv/prefixkv.hpp>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace pkv_torch {

namespace pk = prefixkv;

// "Tensor?" in an op schema: c10::optional before PyTorch 2, std::optional (which c10::optional aliases) after.
#if TORCH_VERSION_MAJOR >= 2
using opt_tensor = std::optional<at::Tensor>;
#else
using opt_tensor = c10::optional<at::Tensor>;
#endif

//! An error message built as one std::string (text and numbers only). Passing a single string to TORCH_CHECK keeps
//! message formatting out of std::ostream: no stream is constructed in this extension's error paths.
inline void message_append(std::string& s, const char* x) { s += x != nullptr ? x : "(null)"; }
inline void message_append(std::string& s, const std::string& x) { s += x; }
template <class N, std::enable_if_t<std::is_arithmetic_v<N>, int> = 0>
void message_append(std::string& s, N x) {
  s += std::to_string(x);
}
template <class... A>
std::string message(const A&... a) {
  std::string s;
  (message_append(s, a), ...);
  return s;
}

//! Raise the reason prefixkv recorded for its last rejected call: ValueError for bad input
//! (cudaErrorInvalidValue), RuntimeError for anything else (a CUDA runtime failure, out of memory).
[[noreturn]] inline void raise_last(const char* op) {
  const pk::error_info e = pk::last_error();
  if (e.code == cudaErrorInvalidValue)
    TORCH_CHECK_VALUE(false, message("prefixkv [", pk::to_string(e.why), "] ", e.message));
  TORCH_CHECK(false, message("prefixkv [", pk::to_string(e.why), "] ", op, ": ", e.message, " (error ",
                             static_cast<int>(e.code), ")"));
}

inline void check(cudaError_t e, const char* op) {
  if (e != cudaSuccess) raise_last(op);
}

//! A ValueError in prefixkv's format for checks made here (reason names as in prefixkv::reason).
#define PKV_REQUIRE(cond, reason_name, ...)                                                       \
  do {                                                                                            \
    if (!(cond))                                                                                  \
      TORCH_CHECK_VALUE(false, ::pkv_torch::message("prefixkv [" reason_name "] ", __VA_ARGS__)); \
  } while (0)

//! The element type behind an at::ScalarType, as a tag value: float, prefixkv::f16 or prefixkv::bf16.
template <class F>
decltype(auto) dispatch_kv(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(pk::f16{});
    case at::kBFloat16: return f(pk::bf16{});
    default: break;
  }
  PKV_REQUIRE(false, "bad_parameter", "cache tensors must be float32, float16 or bfloat16, got ", c10::toString(st));
  return f(float{});  // not reached
}

//! Cache layouts: 0 = [batch, kv_heads, tokens, head_dim] (Hugging Face), 1 = [batch, tokens, kv_heads, head_dim].
inline void check_layout(int64_t layout) {
  PKV_REQUIRE(layout == 0 || layout == 1, "bad_parameter", "layout must be 'bhsd' or 'bshd'");
}
//! (batch, heads, tokens, dim) of a 4-D tensor in `layout`.
inline std::array<int64_t, 4> bhsd_sizes(const at::Tensor& t, int64_t layout) {
  if (layout == 0) return {t.size(0), t.size(1), t.size(2), t.size(3)};
  return {t.size(0), t.size(2), t.size(1), t.size(3)};
}
template <class T>
pk::kv_view<T> kv_of(const at::Tensor& t, int64_t layout) {
  T* p = reinterpret_cast<T*>(t.data_ptr());
  if (layout == 0)
    return pk::make_kv_view(p, t.size(0), t.size(1), t.size(2), t.size(3), t.stride(0), t.stride(1), t.stride(2),
                            t.stride(3));
  return pk::make_kv_view(p, t.size(0), t.size(2), t.size(1), t.size(3), t.stride(0), t.stride(2), t.stride(1),
                          t.stride(3));
}

//! "[a, b, c]" for error messages (built here rather than streamed as an ArrayRef).
inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

//! All tensors on one device (the first one's).
inline void check_device(const at::Tensor& t, const at::Device& d, const char* what) {
  PKV_REQUIRE(t.device() == d, "shape_mismatch", what, " is on ", t.device().str(), ", the cache on ", d.str());
}

//! A per-layer list of cache tensors (K or V): `layers` 4-D tensors of one dtype and device, all of the same shape.
inline void check_layer_list(at::TensorList ts, int64_t layers, const at::Tensor& ref, const char* what,
                             bool same_shape_as_ref) {
  PKV_REQUIRE(static_cast<int64_t>(ts.size()) == layers, "shape_mismatch", what, " has ", ts.size(),
              " tensors, keys has ", layers);
  for (const at::Tensor& t : ts) {
    PKV_REQUIRE(t.defined(), "null_pointer", what, " holds an undefined tensor");
    PKV_REQUIRE(t.dim() == 4, "shape_mismatch", what, " tensors must be 4-D, got ", t.dim(), "-D");
    PKV_REQUIRE(t.scalar_type() == ref.scalar_type(), "shape_mismatch", what, " tensors must all be ",
                c10::toString(ref.scalar_type()), ", got ", c10::toString(t.scalar_type()));
    check_device(t, ref.device(), what);
    if (same_shape_as_ref)
      PKV_REQUIRE(t.sizes() == ref.sizes(), "shape_mismatch", what, " tensors must all have the shape ", shape_str(ref.sizes()),
                  ", got ", shape_str(t.sizes()));
  }
}

//! The compressor's options as the op receives them (enum values as in compress.hpp / score.hpp).
struct compress_opts {
  int64_t layout = 0, q_heads = 0, scorer = 1, gran = 0, alloc = 0, budget = 0;
  double evict_ratio = 0.5;
  int64_t keep_tokens = 0;
  std::vector<double> profile;
  int64_t sinks = 4, recent = 1, min_keep = 0, max_keep = std::numeric_limits<int64_t>::max();
  double window_scale = 0.0;
  int64_t window_group = 0, window_pool = 0, window_pool_kernel = 7, window_heads = 0;
};

//! The op's scalar arguments as compress_opts.
inline compress_opts make_opts(int64_t layout, int64_t q_heads, int64_t scorer, int64_t gran, int64_t alloc, int64_t budget,
                        double evict_ratio, int64_t keep_tokens, at::ArrayRef<double> profile, int64_t sinks,
                        int64_t recent, int64_t min_keep, int64_t max_keep, double window_scale, int64_t window_group,
                        int64_t window_pool, int64_t window_pool_kernel, int64_t window_heads) {
  compress_opts o;
  o.layout = layout;
  o.q_heads = q_heads;
  o.scorer = scorer;
  o.gran = gran;
  o.alloc = alloc;
  o.budget = budget;
  o.evict_ratio = evict_ratio;
  o.keep_tokens = keep_tokens;
  o.profile.assign(profile.begin(), profile.end());
  o.sinks = sinks;
  o.recent = recent;
  o.min_keep = min_keep;
  o.max_keep = max_keep;
  o.window_scale = window_scale;
  o.window_group = window_group;
  o.window_pool = window_pool;
  o.window_pool_kernel = window_pool_kernel;
  o.window_heads = window_heads;
  return o;
}

//! A validated compressor call: shapes, the plan, the lengths (int32, on the cache's device) and caller scores.
struct compress_call {
  int64_t L = 0, B = 0, H = 0, S = 0, D = 0, Hq = 0, window = 0;
  bool per_segment = false;
  at::Tensor lengths;  // int32, contiguous, on the cache's device
  at::Tensor scores;   // float32, contiguous (caller scores) or undefined
  int64_t score_stride = 0;
  at::ScalarType p_type = at::kFloat;  // element type of the attention probabilities
  pk::compress_plan plan;
  std::vector<int64_t> out_shape;  // (L, B) or (L, B, H)
};

//! Check every input of a compressor call and make its plan. Raises ValueError (nothing touched) on bad input.
inline compress_call prepare_compress(at::TensorList keys, at::TensorList values, const opt_tensor& lengths,
                                      at::TensorList attention, at::TensorList queries, at::TensorList lse,
                                      const opt_tensor& scores, const compress_opts& o) {
  compress_call c;
  check_layout(o.layout);
  PKV_REQUIRE(!keys.empty(), "bad_parameter", "keys must hold one tensor per layer (got an empty list)");
  const at::Tensor& k0 = keys[0];
  PKV_REQUIRE(k0.defined() && k0.dim() == 4, "shape_mismatch", "keys tensors must be 4-D");
  dispatch_kv(k0.scalar_type(), [](auto) { return 0; });  // dtype check
  c.L = static_cast<int64_t>(keys.size());
  check_layer_list(keys, c.L, k0, "keys", true);
  PKV_REQUIRE(values.empty() || static_cast<int64_t>(values.size()) == c.L, "shape_mismatch",
              "values must hold one tensor per layer (or be empty for a K-only cache)");
  if (!values.empty()) {
    check_layer_list(values, c.L, values[0], "values", true);
    PKV_REQUIRE(values[0].scalar_type() == k0.scalar_type(), "shape_mismatch", "values must have the keys' dtype");
    check_device(values[0], k0.device(), "values");
  }
  const auto sz = bhsd_sizes(k0, o.layout);
  c.B = sz[0];
  c.H = sz[1];
  c.S = sz[2];
  c.D = sz[3];
  if (!values.empty()) {
    const auto vs = bhsd_sizes(values[0], o.layout);
    PKV_REQUIRE(vs[0] == c.B && vs[1] == c.H && vs[2] == c.S, "shape_mismatch",
                "values must have the keys' batch, kv heads and tokens");
  }
  const bool head = o.gran == 1;
  c.out_shape = head ? std::vector<int64_t>{c.L, c.B, c.H} : std::vector<int64_t>{c.L, c.B};
  const at::Device dev = k0.device();
  // ---- scorer inputs
  c.Hq = o.q_heads > 0 ? o.q_heads : c.H;
  if (o.scorer == static_cast<int64_t>(pk::scorer_kind::attention)) {
    PKV_REQUIRE(static_cast<int64_t>(attention.size()) == c.L, "null_pointer",
                "the attention scorer needs one probability tensor per layer, got ", attention.size());
    const at::Tensor& p0 = attention[0];
    PKV_REQUIRE(p0.defined() && p0.dim() == 4, "shape_mismatch", "attention tensors must be (batch, q_heads, query, key)");
    PKV_REQUIRE(p0.scalar_type() == at::kFloat || p0.scalar_type() == k0.scalar_type(), "bad_parameter",
                "attention probabilities must be float32 or the cache's dtype");
    check_layer_list(attention, c.L, p0, "attention", false);
    c.p_type = p0.scalar_type();
    c.Hq = p0.size(1);
    for (const at::Tensor& p : attention)
      PKV_REQUIRE(p.size(0) == c.B && p.size(1) == c.Hq, "shape_mismatch",
                  "attention tensors must be (batch, q_heads, query, key) with the cache's batch and one q_heads");
  } else if (o.scorer == static_cast<int64_t>(pk::scorer_kind::window)) {
    PKV_REQUIRE(static_cast<int64_t>(queries.size()) == c.L, "null_pointer",
                "the window scorer needs one query tensor per layer, got ", queries.size());
    const at::Tensor& q0 = queries[0];
    PKV_REQUIRE(q0.defined() && q0.dim() == 4, "shape_mismatch", "query tensors must be 4-D");
    check_layer_list(queries, c.L, q0, "queries", true);
    PKV_REQUIRE(q0.scalar_type() == k0.scalar_type(), "shape_mismatch", "queries must have the cache's dtype");
    const auto qs = bhsd_sizes(q0, o.layout);
    PKV_REQUIRE(qs[0] == c.B && qs[3] == c.D, "shape_mismatch",
                "queries must be (batch, q_heads, window, head_dim) in the cache's layout");
    c.Hq = qs[1];
    c.window = qs[2];
    PKV_REQUIRE(lse.empty() || static_cast<int64_t>(lse.size()) == c.L, "shape_mismatch",
                "lse must hold one tensor per layer (or be empty)");
    for (const at::Tensor& x : lse) {
      PKV_REQUIRE(x.defined() && x.dim() == 3 && x.scalar_type() == at::kFloat, "shape_mismatch",
                  "lse tensors must be float32 (batch, q_heads, window)");
      PKV_REQUIRE(x.size(0) == c.B && x.size(1) == c.Hq && x.size(2) == c.window, "shape_mismatch",
                  "lse tensors must be (batch, q_heads, window)");
      check_device(x, dev, "lse");
    }
  } else if (o.scorer == static_cast<int64_t>(pk::scorer_kind::scores)) {
    PKV_REQUIRE(scores.has_value() && scores->defined(), "null_pointer", "the scores scorer needs a scores tensor");
    const at::Tensor& s = *scores;
    PKV_REQUIRE(s.scalar_type() == at::kFloat, "bad_parameter", "scores must be float32");
    check_device(s, dev, "scores");
    if (head)
      PKV_REQUIRE(s.dim() == 4 && s.size(0) == c.L && s.size(1) == c.B && s.size(2) == c.H, "shape_mismatch",
                  "scores must be (layers, batch, kv_heads, tokens) with head granularity");
    else
      PKV_REQUIRE(s.dim() == 3 && s.size(0) == c.L && s.size(1) == c.B, "shape_mismatch",
                  "scores must be (layers, batch, tokens)");
    c.scores = s.contiguous();
    c.score_stride = s.size(-1);
  }
  // ---- lengths
  if (lengths.has_value() && lengths->defined()) {
    const at::Tensor& n = *lengths;
    PKV_REQUIRE(n.scalar_type() == at::kInt || n.scalar_type() == at::kLong, "bad_parameter",
                "lengths must be an int32 or int64 tensor");
    if (n.dim() == 1) {
      PKV_REQUIRE(n.size(0) == c.B, "shape_mismatch", "lengths must be (batch,) or (layers, batch[, kv_heads])");
    } else {
      PKV_REQUIRE(n.sizes() == at::IntArrayRef(c.out_shape), "shape_mismatch", "per-segment lengths must be ",
                  shape_str(c.out_shape), ", got ", shape_str(n.sizes()));
      c.per_segment = true;
    }
    c.lengths = n.to(dev, at::kInt).contiguous();
  } else {
    PKV_REQUIRE(c.S <= std::numeric_limits<int32_t>::max(), "out_of_range", "the cache has more than 2^31 - 1 tokens");
    c.lengths = at::full({c.B}, c.S, at::TensorOptions().dtype(at::kInt).device(dev));
  }
  // ---- the plan
  pk::compress_config cfg;
  cfg.layers = c.L;
  cfg.q_heads = c.Hq;
  cfg.kv_heads = c.H;
  cfg.head_dim = c.D;
  cfg.max_batch = c.B;
  cfg.max_tokens = c.S;
  cfg.max_window = c.window;
  cfg.scorer = static_cast<pk::scorer_kind>(o.scorer);
  cfg.window.scale = static_cast<float>(o.window_scale);
  cfg.window.group = static_cast<pk::head_reduce>(o.window_group);
  cfg.window.pool = static_cast<pk::pool_kind>(o.window_pool);
  cfg.window.pool_kernel = static_cast<int>(o.window_pool_kernel);
  cfg.window.heads = static_cast<pk::head_reduce>(o.window_heads);
  cfg.gran = static_cast<pk::granularity>(o.gran);
  cfg.alloc = static_cast<pk::allocation>(o.alloc);
  cfg.budget = static_cast<pk::budget_kind>(o.budget);
  cfg.evict_ratio = o.evict_ratio;
  cfg.keep_tokens = o.keep_tokens;
  if (o.alloc == static_cast<int64_t>(pk::allocation::profile)) {
    PKV_REQUIRE(static_cast<int64_t>(o.profile.size()) == c.L, "shape_mismatch", "the profile has ", o.profile.size(),
                " fractions, the cache ", c.L, " layers");
    cfg.profile = o.profile.data();
  }
  cfg.protect = pk::protect_policy{o.sinks, o.recent};
  cfg.min_keep = o.min_keep;
  cfg.max_keep = o.max_keep;
  cfg.in_place = true;
  check(pk::make_plan(cfg, c.plan), "compress_");
  return c;
}

//! Per-layer views and the compressor's arguments for one call (`T` the cache's element type, `P` the
//! probabilities'). The vectors own the view arrays the arguments point at.
template <class T, class P>
struct compress_views {
  std::vector<pk::kv_view<T>> k, v;
  std::vector<pk::kv_view<const P>> p;
  std::vector<pk::kv_view<const T>> q;
  std::vector<pk::lse_view> lse;
  pk::compress_args<pk::kv_layers<T>, P> args;

  compress_views(const compress_call& c, const compress_opts& o, at::TensorList keys, at::TensorList values,
                 at::TensorList attention, at::TensorList queries, at::TensorList lses) {
    for (const at::Tensor& t : keys) k.push_back(kv_of<T>(t, o.layout));
    for (const at::Tensor& t : values) v.push_back(kv_of<T>(t, o.layout));
    args.cache = pk::kv_layers<T>{k.data(), v.empty() ? nullptr : v.data(), nullptr, nullptr, c.L};
    args.lengths = c.lengths.data_ptr<int32_t>();
    args.lengths_per_segment = c.per_segment;
    if (c.plan.cfg.scorer == pk::scorer_kind::attention) {
      for (const at::Tensor& t : attention) p.push_back(kv_of<const P>(t, 0));
      args.attention = p.data();
    } else if (c.plan.cfg.scorer == pk::scorer_kind::window) {
      for (const at::Tensor& t : queries) q.push_back(kv_of<const T>(t, o.layout));
      args.queries = q.data();
      if (!lses.empty()) {
        for (const at::Tensor& t : lses) {
          pk::lse_view x;
          x.data = t.data_ptr<float>();
          x.stride_batch = t.stride(0);
          x.stride_head = t.stride(1);
          x.stride_query = t.stride(2);
          lse.push_back(x);
        }
        args.lse = lse.data();
      }
    } else if (c.plan.cfg.scorer == pk::scorer_kind::scores) {
      args.scores = c.scores.data_ptr<float>();
      args.score_stride = c.score_stride;
    }
  }
};

//! Outputs of a compressor call: (lengths (L, B[, H]) int32, status (1) int32, threshold (problems) float32).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> compress_outputs_like(const compress_call& c, const at::Device& d) {
  const auto i32 = at::TensorOptions().dtype(at::kInt).device(d);
  return {at::empty(c.out_shape, i32), at::zeros({1}, i32),
          at::zeros({c.plan.problems(c.B)}, at::TensorOptions().dtype(at::kFloat).device(d))};
}

// ---- lower-level stages ------------------------------------------------------------------------------------------

//! Score rows (S, N) float32, unit stride along tokens; lengths (S,) integer or undefined (= N for every row).
inline void check_score_rows(const at::Tensor& scores, const opt_tensor& lengths) {
  PKV_REQUIRE(scores.defined() && scores.dim() == 2, "shape_mismatch", "scores must be 2-D (segments, tokens)");
  PKV_REQUIRE(scores.scalar_type() == at::kFloat, "bad_parameter", "scores must be float32");
  PKV_REQUIRE(scores.size(1) <= std::numeric_limits<int32_t>::max(), "out_of_range", "rows longer than 2^31 - 1");
  if (lengths.has_value() && lengths->defined()) {
    PKV_REQUIRE(lengths->dim() == 1 && lengths->size(0) == scores.size(0), "shape_mismatch",
                "lengths must be (segments,)");
    PKV_REQUIRE(lengths->scalar_type() == at::kInt || lengths->scalar_type() == at::kLong, "bad_parameter",
                "lengths must be an int32 or int64 tensor");
  }
}

//! A curve set made of tensors: offsets (S+1) int64, tokens (S) int64, positions (C) int32 and cumulative (C)
//! float32 (either of the last two may be undefined where the stage does not read it).
inline pk::curve_set curve_set_of(const at::Tensor& offsets, const at::Tensor& tokens, const at::Tensor& positions,
                                  const at::Tensor& cumulative, int64_t sinks, int64_t recent) {
  PKV_REQUIRE(offsets.defined() && tokens.defined() && offsets.scalar_type() == at::kLong &&
                  tokens.scalar_type() == at::kLong,
              "bad_parameter", "curve offsets and tokens must be int64");
  PKV_REQUIRE(offsets.dim() == 1 && tokens.dim() == 1 && offsets.size(0) == tokens.size(0) + 1, "shape_mismatch",
              "curve offsets must have one entry more than tokens");
  PKV_REQUIRE(offsets.is_contiguous() && tokens.is_contiguous(), "bad_parameter", "curve tensors must be contiguous");
  PKV_REQUIRE(tokens.device() == offsets.device(), "shape_mismatch", "curve tensors must be on one device");
  pk::curve_set c;
  c.count = tokens.size(0);
  c.offsets = offsets.data_ptr<int64_t>();
  c.tokens = tokens.data_ptr<int64_t>();
  if (positions.defined()) {
    PKV_REQUIRE(positions.scalar_type() == at::kInt && positions.dim() == 1 && positions.is_contiguous(),
                "bad_parameter", "curve positions must be a contiguous int32 vector");
    PKV_REQUIRE(positions.device() == offsets.device(), "shape_mismatch", "curve tensors must be on one device");
    c.positions = positions.data_ptr<int32_t>();
  }
  if (cumulative.defined()) {
    PKV_REQUIRE(cumulative.scalar_type() == at::kFloat && cumulative.dim() == 1 && cumulative.is_contiguous(),
                "bad_parameter", "curve cumulative values must be a contiguous float32 vector");
    PKV_REQUIRE(cumulative.device() == offsets.device(), "shape_mismatch", "curve tensors must be on one device");
    c.cumulative = cumulative.data_ptr<float>();
  }
  PKV_REQUIRE(sinks >= 0 && recent >= 0, "bad_parameter", "sinks and recent must be >= 0");
  c.protect = pk::protect_policy{sinks, recent};
  return c;
}

//! An optional per-problem / per-segment array of `dtype` and `n` entries, on `dev`; null when absent.
template <class X>
const X* opt_array(const opt_tensor& t, at::ScalarType dtype, int64_t n, const at::Device& dev, const char* what,
                   at::Tensor& keep_alive) {
  if (!t.has_value() || !t->defined()) return nullptr;
  PKV_REQUIRE(t->dim() == 1 && t->size(0) == n, "shape_mismatch", what, " must be 1-D with ", n, " entries");
  keep_alive = t->to(dev, dtype).contiguous();
  return keep_alive.data_ptr<X>();
}

//! The caches of a compaction call (per-layer views of K and V) for element type T.
template <class T>
struct cache_views {
  std::vector<pk::kv_view<T>> k, v;
  pk::kv_layers<T> layers(int64_t L) const {
    return pk::kv_layers<T>{k.data(), v.empty() ? nullptr : v.data(), nullptr, nullptr, L};
  }
  cache_views(at::TensorList keys, at::TensorList values, int64_t layout) {
    for (const at::Tensor& t : keys) k.push_back(kv_of<T>(t, layout));
    for (const at::Tensor& t : values) v.push_back(kv_of<T>(t, layout));
  }
};

//! Checks of a compaction call's caches and selection; returns the segment grid.
inline pk::segment_grid check_gather(at::TensorList keys, at::TensorList values, const at::Tensor& sel_offsets,
                                     const at::Tensor& indices, int64_t heads_grid, bool sequence_major, int64_t layout,
                                     const char* what) {
  check_layout(layout);
  PKV_REQUIRE(!keys.empty(), "bad_parameter", what, " must hold one tensor per layer (got an empty list)");
  const at::Tensor& k0 = keys[0];
  PKV_REQUIRE(k0.defined() && k0.dim() == 4, "shape_mismatch", what, " tensors must be 4-D");
  dispatch_kv(k0.scalar_type(), [](auto) { return 0; });
  const int64_t L = static_cast<int64_t>(keys.size());
  check_layer_list(keys, L, k0, what, true);
  if (!values.empty()) {
    check_layer_list(values, L, values[0], "values", true);
    PKV_REQUIRE(values[0].scalar_type() == k0.scalar_type(), "shape_mismatch", "values must have the keys' dtype");
    check_device(values[0], k0.device(), "values");
  }
  const auto sz = bhsd_sizes(k0, layout);
  PKV_REQUIRE(heads_grid == 1 || heads_grid == sz[1], "shape_mismatch",
              "a selection has one row per (layer, sequence) or per (layer, sequence, kv head)");
  PKV_REQUIRE(sel_offsets.scalar_type() == at::kLong && sel_offsets.dim() == 1 && sel_offsets.is_contiguous(),
              "bad_parameter", "selection offsets must be a contiguous int64 vector");
  PKV_REQUIRE(indices.scalar_type() == at::kInt && indices.dim() == 1 && indices.is_contiguous(), "bad_parameter",
              "selection indices must be a contiguous int32 vector");
  check_device(sel_offsets, k0.device(), "selection offsets");
  check_device(indices, k0.device(), "selection indices");
  pk::segment_grid g{L, sz[0], heads_grid, sequence_major};
  PKV_REQUIRE(sel_offsets.size(0) == g.count() + 1, "shape_mismatch", "the selection has ", sel_offsets.size(0) - 1,
              " rows, the cache ", g.count(), " segments");
  return g;
}

//! A valid int32 pointer for selection indices that may be empty (prefixkv needs a real pointer even when a
//! selection keeps nothing; with an empty index vector it is never read).
inline const int32_t* index_ptr(const at::Tensor& indices) {
  static const int32_t none = 0;
  return indices.numel() > 0 ? indices.data_ptr<int32_t>() : &none;
}

//! Checks of an out-of-place compaction's destination: one tensor per layer of each kind, the source's dtype,
//! device, batch and kv heads (any token capacity and strides).
inline void check_gather_dst(at::TensorList keys, at::TensorList values, at::TensorList out_keys,
                             at::TensorList out_values, int64_t layout) {
  const int64_t L = static_cast<int64_t>(keys.size());
  PKV_REQUIRE(static_cast<int64_t>(out_keys.size()) == L && out_values.size() == values.size(), "shape_mismatch",
              "out_keys / out_values must hold one tensor per layer of keys / values");
  if (L == 0) return;
  check_layer_list(out_keys, L, out_keys[0], "out_keys", true);
  PKV_REQUIRE(out_keys[0].scalar_type() == keys[0].scalar_type(), "shape_mismatch", "out_keys must have the keys' dtype");
  check_device(out_keys[0], keys[0].device(), "out_keys");
  const auto s = bhsd_sizes(keys[0], layout), d = bhsd_sizes(out_keys[0], layout);
  PKV_REQUIRE(s[0] == d[0] && s[1] == d[1] && s[3] == d[3], "shape_mismatch",
              "out_keys must have the keys' batch, kv heads and head_dim");
  if (!values.empty()) {
    check_layer_list(out_values, L, out_values[0], "out_values", true);
    PKV_REQUIRE(out_values[0].scalar_type() == keys[0].scalar_type(), "shape_mismatch",
                "out_values must have the keys' dtype");
    check_device(out_values[0], keys[0].device(), "out_values");
    const auto vs = bhsd_sizes(values[0], layout), vd = bhsd_sizes(out_values[0], layout);
    PKV_REQUIRE(vs[0] == vd[0] && vs[1] == vd[1] && vs[3] == vd[3], "shape_mismatch",
                "out_values must have the values' batch, kv heads and head_dim");
    PKV_REQUIRE(vd[2] == d[2], "shape_mismatch", "out_keys and out_values must have one token capacity");
  }
}

}  // namespace pkv_torch
