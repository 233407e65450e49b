// prefixkv-llama: decode-time budget upkeep (prefixkv/decode) — the options of `--decode-budget` /
// `--decode-policy`, and the host upkeep that the host backend runs after every generated token.
//
// After the prefill compression every generated token adds a row to every (layer, kv head) cache; without upkeep the
// caches grow back. With upkeep, every step ends with `prefixkv::decode_step_host` over all layers: each segment (a
// layer, or a (layer, kv head) with head granularity — the compressor's segments) is brought back to its budget,
//
//   budget prefill  T(N) = ceil(N * n0 / N0)   the fraction n0 / N0 the prefill compression kept (default)
//   budget profile  T(N) = ceil(N * (1 - f_l)) the profile's eviction fraction f_l of the layer (the paper's rule)
//   budget cap:C    T(N) = T_prefill(min(N, C)) the prefill fractions, frozen once C tokens were seen: a fixed cap
//
// (N = tokens seen so far), by one of the library's policies:
//
//   fixed[:D]       the paper's code: evict the row at a fixed position p = n0 + D (default D = -25; D > 0: row D) —
//                   the first p rows stay, the rest is a sliding window (fixed:4 = sinks + recent tokens)
//   score           running accumulated attention (each step's attention row added), the lowest-scored candidate
//                   evicted; the hole is refilled from the end (row order not kept)
//   score-ordered   the same tokens, rows shifted down (token order kept)
//   amortised:M     no per-step eviction: segments overshoot by up to M tokens, then one solve + in-place
//                   compaction of every layer keeps each segment's highest-scored tokens
//   rebalance:M     amortised, and each compression re-solves PrefixKV's global threshold over the layers (the
//                   layer split follows the current scores; the total stays the sum of the budgets)
//
// The protected tokens (the first `sinks` and last `recent` rows of every segment) are never evicted by the
// score-based policies. docs/decode.md describes the library; docs/quality.md measures the policies.
#pragma once

#include <prefixkv/decode/decode.hpp>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace prefixkv_llama {

//! Where the per-segment budgets come from.
enum class decode_budget_kind : int {
  off = 0,      //!< no upkeep: every step adds a row to every cache
  prefill = 1,  //!< the fractions the prefill compression kept
  profile = 2,  //!< a per-layer profile of eviction fractions
  cap = 3,      //!< the prefill fractions, frozen after `cap` tokens
};

//! What `--decode-budget` and `--decode-policy` ask for.
struct decode_options {
  decode_budget_kind budget = decode_budget_kind::off;
  int64_t cap = 0;              //!< cap: tokens seen after which the budgets stop growing
  std::vector<double> profile;  //!< profile: eviction fraction per layer
  prefixkv::decode_policy policy = prefixkv::decode_policy::score;
  prefixkv::decode_order order = prefixkv::decode_order::reuse;
  int64_t distance = -25;  //!< fixed: evicted row n0 + distance (or distance when > 0)
  int64_t slack = 64;      //!< amortised / rebalance
  bool rebalance = false;
  prefixkv::protect_policy protect{4, 1};
  prefixkv::granularity gran = prefixkv::granularity::layer;  //!< as the prefill compression's
  bool enabled() const { return budget != decode_budget_kind::off; }
};

namespace detail_decode {
inline bool parse_count(const std::string& s, int64_t lo, int64_t& out) {
  if (s.empty() || s.size() > 12) return false;
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (end != s.c_str() + s.size() || errno != 0 || v < lo || v > (int64_t(1) << 30)) return false;
  out = v;
  return true;
}
}  // namespace detail_decode

//! `prefill`, `profile` or `cap:C` (C >= 1). False with a one-line reason.
inline bool parse_decode_budget(const std::string& s, decode_options& o, std::string& err) {
  if (s == "prefill") return o.budget = decode_budget_kind::prefill, true;
  if (s == "profile") return o.budget = decode_budget_kind::profile, true;
  if (s.rfind("cap:", 0) == 0 && detail_decode::parse_count(s.substr(4), 1, o.cap))
    return o.budget = decode_budget_kind::cap, true;
  err = "--decode-budget: '" + s + "' is not prefill, profile or cap:N (N >= 1 tokens)";
  return false;
}

//! `fixed[:D]`, `score`, `score-ordered`, `amortised:M` or `rebalance:M`. False with a one-line reason.
inline bool parse_decode_policy(const std::string& s, decode_options& o, std::string& err) {
  namespace pk = prefixkv;
  const size_t colon = s.find(':');
  const std::string name = s.substr(0, colon), arg = colon == std::string::npos ? "" : s.substr(colon + 1);
  bool ok = false;
  if (name == "fixed") {
    o.policy = pk::decode_policy::fixed_position;
    o.distance = -25;
    if (colon == std::string::npos) {
      ok = true;
    } else {
      int64_t d = 0;
      const bool neg = !arg.empty() && arg[0] == '-';
      ok = detail_decode::parse_count(neg ? arg.substr(1) : arg, 0, d);
      o.distance = neg ? -d : d;
    }
  } else if ((name == "score" || name == "score-ordered") && colon == std::string::npos) {
    o.policy = pk::decode_policy::score;
    o.order = name == "score" ? pk::decode_order::reuse : pk::decode_order::preserve;
    ok = true;
  } else if (name == "amortised" || name == "rebalance") {
    o.policy = pk::decode_policy::amortised;
    o.rebalance = name == "rebalance";
    ok = detail_decode::parse_count(arg, 0, o.slack);
  }
  if (!ok)
    err = "--decode-policy: '" + s + "' is not fixed[:D], score, score-ordered, amortised:M or rebalance:M (M >= 0)";
  return ok;
}

//! The policy as `parse_decode_policy` reads it back.
inline std::string decode_policy_name(const decode_options& o) {
  switch (o.policy) {
    case prefixkv::decode_policy::fixed_position:
      return o.distance == -25 ? "fixed" : "fixed:" + std::to_string(o.distance);
    case prefixkv::decode_policy::score: return o.order == prefixkv::decode_order::reuse ? "score" : "score-ordered";
    default: return std::string(o.rebalance ? "rebalance:" : "amortised:") + std::to_string(o.slack);
  }
}

//! The budget as `parse_decode_budget` reads it back ("off" without upkeep).
inline std::string decode_budget_name(const decode_options& o) {
  switch (o.budget) {
    case decode_budget_kind::prefill: return "prefill";
    case decode_budget_kind::profile: return "profile";
    case decode_budget_kind::cap: return "cap:" + std::to_string(o.cap);
    default: return "off";
  }
}

//! The library's configuration of the upkeep for a cache of `capacity` rows per (layer, kv head), batch 1.
inline prefixkv::decode_config make_decode_config(const decode_options& o, int layers, int q_heads, int kv_heads,
                                                  int head_dim, int64_t capacity) {
  prefixkv::decode_config c;
  c.layers = layers;
  c.q_heads = q_heads;
  c.kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.max_batch = 1;
  c.max_tokens = capacity;
  c.gran = o.gran;
  c.profile = o.budget == decode_budget_kind::profile ? o.profile.data() : nullptr;
  c.horizon = o.budget == decode_budget_kind::cap ? o.cap : 0;
  c.protect = o.protect;
  c.policy = o.policy;
  c.distance = o.distance;
  c.order = o.order;
  c.slack = o.slack;
  c.rebalance = o.rebalance;
  return c;
}

//! The upkeep of one host cache (batch 1): K and V per layer (kv_head, capacity, head_dim), a side tensor per layer
//! (kv_head, capacity) that moves with the rows (the host backend's original positions), and lengths per
//! (layer, kv head). `begin` after the prefill (and its compression); `step` after every forward pass that
//! appended one row to every (layer, kv head), with the step's attention rows in `row(l, h)` when `observes()`.
class host_decode_upkeep {
 public:
  host_decode_upkeep() = default;
  host_decode_upkeep(const host_decode_upkeep&) = delete;
  host_decode_upkeep& operator=(const host_decode_upkeep&) = delete;

  //! Start from the caches' current `lengths` (layer, kv_head) after `seen` tokens. False with a reason.
  bool begin(const decode_options& o, int layers, int q_heads, int kv_heads, int head_dim, int64_t capacity,
             const int32_t* lengths, int64_t seen, std::string& err) {
    namespace pk = prefixkv;
    end();
    if (o.budget == decode_budget_kind::off) return err = "decode upkeep: no budget given", false;
    if (o.budget == decode_budget_kind::profile && o.profile.size() != size_t(layers))
      return err = "decode upkeep: the profile has " + std::to_string(o.profile.size()) + " fractions, the model " +
                   std::to_string(layers) + " layers",
             false;
    pk::decode_plan plan;
    if (pk::make_plan(make_decode_config(o, layers, q_heads, kv_heads, head_dim, capacity), plan) != cudaSuccess)
      return err = std::string("decode upkeep: ") + pk::last_error().message, false;
    const int64_t H = plan.seg_heads;
    std::vector<int32_t> init(size_t(layers) * size_t(H));
    for (int l = 0; l < layers; ++l)
      for (int h = 0; h < kv_heads; ++h) {
        const int32_t n = lengths[size_t(l) * kv_heads + h];
        if (H == 1 && n != lengths[size_t(l) * kv_heads])
          return err = "decode upkeep: layer granularity needs one length per layer (use the compressor's granularity)",
                 false;
        init[size_t(l) * H + (H == 1 ? 0 : h)] = n;
      }
    if (seen < 0 || seen > INT32_MAX) return err = "decode upkeep: tokens seen out of range", false;
    plan_ = plan;
    buf_ = pk::decode_state_buffers(plan_);
    st_ = buf_.state();
    const int32_t seen32 = int32_t(seen);
    pk::decode_init_args a;
    a.batch = 1;
    a.lengths = init.data();
    a.lengths_per_segment = true;
    a.seen = &seen32;
    if (pk::decode_init_host(plan_, st_, a) != cudaSuccess)
      return err = std::string("decode upkeep: ") + pk::last_error().message, false;
    if (*st_.status != 0) return err = "decode upkeep: a cache length is outside the cache", false;
    L_ = layers, Hq_ = q_heads, Hk_ = kv_heads, hs_ = head_dim, cap_ = capacity;
    if (observes()) probs_.assign(size_t(L_) * size_t(Hq_) * size_t(cap_), 0.0f);
    active_ = true;
    return true;
  }
  void end() { active_ = false; }
  bool active() const { return active_; }
  //! Does the policy read each step's attention probabilities (score-based policies)?
  bool observes() const { return plan_.valid && plan_.has_scores(); }
  //! Where the forward pass puts query head h's attention probabilities of layer l (capacity floats).
  float* row(int l, int h) { return probs_.data() + (size_t(l) * Hq_ + size_t(h)) * size_t(cap_); }

  //! After a forward pass appended one row to every (layer, kv head): commit it and evict down to the budgets.
  //! `k`, `v`, `side`: per layer; `lengths` (layer, kv_head) is updated. False with a reason (caches untouched
  //! when the lengths do not match the upkeep's).
  bool step(float* const* k, float* const* v, float* const* side, int32_t* lengths, std::string& err) {
    namespace pk = prefixkv;
    if (!active_) return err = "decode upkeep: not started", false;
    const int64_t H = plan_.seg_heads;
    for (int l = 0; l < L_; ++l)
      for (int h = 0; h < Hk_; ++h)
        if (int64_t(st_.lengths[plan_.state_index(l, 0, H == 1 ? 0 : h)]) + 1 != lengths[size_t(l) * Hk_ + h])
          return err = "decode upkeep: the caches changed outside the upkeep (restart it after restore)", false;
    kv_.resize(size_t(L_)), vv_.resize(size_t(L_)), sv_.resize(size_t(L_)), pv_.resize(size_t(L_));
    for (int l = 0; l < L_; ++l) {
      kv_[l] = pk::make_kv_view_bhsd(k[l], 1, Hk_, cap_, hs_);
      vv_[l] = pk::make_kv_view_bhsd(v[l], 1, Hk_, cap_, hs_);
      sv_[l] = pk::make_kv_view_bhsd(side[l], 1, Hk_, cap_, 1);
      pv_[l] = pk::make_kv_view_bhsd(static_cast<const float*>(row(l, 0)), 1, Hq_, 1, cap_);
    }
    pk::decode_step_args<pk::kv_layers<float>, float> a;
    a.cache = pk::kv_layers<float>{kv_.data(), vv_.data(), sv_.data(), nullptr, L_};
    a.appended = 1;
    if (observes()) {
      a.observe = pk::decode_observe::attention;
      a.attention = pv_.data();
    }
    if (pk::decode_step_host(plan_, st_, a) != cudaSuccess)
      return err = std::string("decode upkeep: ") + pk::last_error().message, false;
    if (*st_.status != 0)
      return err = std::string("decode upkeep: bad data (reason ") + std::to_string(*st_.status) + ")", false;
    for (int l = 0; l < L_; ++l)
      for (int h = 0; h < Hk_; ++h) lengths[size_t(l) * Hk_ + h] = st_.lengths[plan_.state_index(l, 0, H == 1 ? 0 : h)];
    return true;
  }

  //! Rows segment (l, kv head h) may hold now: max(T(N), floor) (the amortised policies may exceed it by up to
  //! the slack between compressions).
  int64_t budget(int l, int h) const {
    const int64_t s = plan_.state_index(l, 0, plan_.seg_heads == 1 ? 0 : h);
    const int64_t p = st_.position ? st_.position[s] : 0;
    return prefixkv::decode_target_length(plan_, l, INT32_MAX, st_.seen[s], st_.frac_num[s], st_.frac_den[s], p);
  }
  //! Tokens the sequence has seen.
  int64_t seen() const { return active_ ? st_.seen[0] : 0; }
  const prefixkv::decode_plan& plan() const { return plan_; }
  const prefixkv::decode_state& state() const { return st_; }

 private:
  prefixkv::decode_plan plan_{};
  prefixkv::decode_state_buffers buf_{};
  prefixkv::decode_state st_{};
  std::vector<float> probs_;  // (layer, q_head, capacity): this step's attention rows
  std::vector<prefixkv::kv_view<float>> kv_, vv_, sv_;
  std::vector<prefixkv::kv_view<const float>> pv_;
  int L_ = 0, Hq_ = 0, Hk_ = 0, hs_ = 0;
  int64_t cap_ = 0;
  bool active_ = false;
};

}  // namespace prefixkv_llama
