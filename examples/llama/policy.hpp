// prefixkv-llama: the budget-allocation methods and scorers, mapped onto the prefixkv compressor.
//
// Every method uses the same scorer, the same protected tokens (the first `sinks` and the last `recent` of every
// segment) and the same total budget (the compressor's evict ratio R evicts rint(R * N) candidates, N = the cached
// tokens summed over every segment, round half to even), and differs only in how that budget is spread:
//
// | method        | compressor                                                   |
// |---------------|--------------------------------------------------------------|
// | full          | not called (nothing evicted)                                 |
// | streaming     | scorer recency, allocation uniform, granularity layer        |
// | uniform       | allocation uniform, granularity layer                        |
// | pyramid       | allocation pyramid, granularity layer                        |
// | adakv         | allocation uniform, granularity head (per-layer totals spread over kv heads by one threshold) |
// | prefixkv      | allocation prefix, granularity layer (the paper)             |
// | prefixkv-head | allocation prefix, granularity head                          |
// | profile       | allocation profile (per-layer fractions from a JSON profile), granularity layer |
//
// Scorers: `attention` (prefill attention probabilities summed over the prompt's query rows, averaged over query
// heads), `window` (the last w prompt queries over the cached keys), `keynorm` (1 / ||k||).
// `profile` takes its budget from the profile's fractions, not from R; R = 0 turns eviction off for every method
// (for `profile` the fractions are then taken as 0).
#pragma once

#include "backend.hpp"

#include <prefixkv/compress/compress.hpp>

#include <string>
#include <vector>

namespace prefixkv_llama {

enum class method_kind : int { full, streaming, uniform, pyramid, adakv, prefixkv, prefixkv_head, profile };
enum class scorer_name : int { attention, window, keynorm };

inline const char* method_names[] = {"full", "streaming", "uniform", "pyramid", "adakv", "prefixkv", "prefixkv-head",
                                     "profile"};
inline const char* scorer_names[] = {"attention", "window", "keynorm"};

inline const char* to_string(method_kind m) { return method_names[static_cast<int>(m)]; }
inline const char* to_string(scorer_name s) { return scorer_names[static_cast<int>(s)]; }

inline bool parse_method(const std::string& s, method_kind& out) {
  for (int i = 0; i < 8; ++i)
    if (s == method_names[i]) return out = static_cast<method_kind>(i), true;
  return false;
}
inline bool parse_scorer(const std::string& s, scorer_name& out) {
  for (int i = 0; i < 3; ++i)
    if (s == scorer_names[i]) return out = static_cast<scorer_name>(i), true;
  return false;
}

//! One compression policy: method, scorer, budget and protected tokens.
struct policy {
  method_kind method = method_kind::prefixkv;
  scorer_name scorer = scorer_name::attention;
  double evict_ratio = 0.5;
  std::vector<double> profile;  //!< (layers) eviction fractions, method `profile`
  int64_t sinks = 4, recent = 1;
  int window = 16;  //!< scorer `window`: prompt queries scored
};

//! Does the policy call the compressor at all?
inline bool compresses(const policy& p) { return p.method != method_kind::full; }

//! Head granularity: every kv head keeps its own tokens.
inline bool per_head(method_kind m) { return m == method_kind::adakv || m == method_kind::prefixkv_head; }

//! What the prefill must record for the policy's scorer.
inline prefill_record record_for(const policy& p) {
  prefill_record r;
  if (!compresses(p) || p.method == method_kind::streaming) return r;
  r.attention = p.scorer == scorer_name::attention;
  r.window = p.scorer == scorer_name::window ? p.window : 0;
  return r;
}

//! The compressor's configuration of a policy for model `c` (batch 1, up to seq_len tokens, in place).
inline prefixkv::compress_config make_compress_config(const policy& p, const config& c) {
  namespace pk = prefixkv;
  pk::compress_config k;
  k.layers = c.n_layers;
  k.q_heads = c.n_heads;
  k.kv_heads = c.n_kv_heads;
  k.head_dim = c.head_size();
  k.max_batch = 1;
  k.max_tokens = c.seq_len;
  k.protect = pk::protect_policy{p.sinks, p.recent};
  k.evict_ratio = p.evict_ratio;
  k.gran = per_head(p.method) ? pk::granularity::head : pk::granularity::layer;
  switch (p.scorer) {
    case scorer_name::attention: k.scorer = pk::scorer_kind::attention; break;
    case scorer_name::window:
      k.scorer = pk::scorer_kind::window;
      k.max_window = p.window;
      break;
    case scorer_name::keynorm: k.scorer = pk::scorer_kind::key_norm; break;
  }
  switch (p.method) {
    case method_kind::streaming:
      k.scorer = pk::scorer_kind::recency;
      k.max_window = 0;
      k.alloc = pk::allocation::uniform;
      break;
    case method_kind::uniform:
    case method_kind::adakv: k.alloc = pk::allocation::uniform; break;
    case method_kind::pyramid: k.alloc = pk::allocation::pyramid; break;
    case method_kind::profile:
      k.alloc = pk::allocation::profile;
      k.profile = p.profile.data();
      break;
    default: k.alloc = pk::allocation::prefix; break;
  }
  return k;
}

//! The compressor's plan of a policy; false with a one-line reason. For `profile`, R = 0 means zero fractions.
//! `max_batch` / `max_pages`: the largest call (sequences, pages of a paged pool) the plan serves; `page_size`: the
//! paged pool's tokens per page (0 for strided caches).
inline bool make_policy_plan(const policy& p, const config& c, prefixkv::compress_plan& plan, std::string& err,
                             int64_t max_batch = 1, int64_t max_pages = 0, int64_t page_size = 0) {
  policy q = p;
  if (p.method == method_kind::profile) {
    if (p.profile.size() != size_t(c.n_layers))
      return err = "the profile has " + std::to_string(p.profile.size()) + " fractions, the model " +
                   std::to_string(c.n_layers) + " layers",
             false;
    if (p.evict_ratio == 0.0) q.profile.assign(p.profile.size(), 0.0);
  }
  prefixkv::compress_config k = make_compress_config(q, c);
  k.max_batch = max_batch;
  k.max_pages = max_pages;
  k.page_size = page_size;
  if (prefixkv::make_plan(k, plan) != cudaSuccess) return err = prefixkv::last_error().message, false;
  return true;
}

}  // namespace prefixkv_llama
