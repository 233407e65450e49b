//! \file prefixkv/decode/decode.hpp
//! Decode-time budget upkeep: during generation every (layer, sequence[, kv head]) segment of the cache stays
//! within its layer-adaptive budget — the layer's fraction of the tokens its sequence has seen so far. One call per
//! generated token (`decode_step`) commits the new tokens and evicts, for all layers and sequences of a batch.
//! This header holds the public types, the plan, the state and the host backend; the CUDA backend is
//! `prefixkv/decode/decode.cuh`. Users' guide: docs/decode.md.
//!
//! \code
//! prefixkv::decode_config cfg;
//! cfg.layers = 32; cfg.q_heads = 32; cfg.kv_heads = 8; cfg.head_dim = 128;
//! cfg.max_batch = 8; cfg.max_tokens = 20000;          // rows per segment the cache holds
//! cfg.policy = prefixkv::decode_policy::amortised; cfg.slack = 64;
//! prefixkv::decode_plan plan;
//! PREFIXKV_TRY(prefixkv::make_plan(cfg, plan));
//! size_t bytes = 0;
//! PREFIXKV_TRY(prefixkv::decode_state_bytes(plan, bytes));      // persistent state: allocate once
//! prefixkv::decode_state st;
//! PREFIXKV_TRY(prefixkv::decode_state_bind(plan, d_mem, bytes, st));
//! // after prefill (e.g. prefixkv::compress): decode_init with the lengths, then per generated token decode_step
//! \endcode
//!
//! Semantics (both backends; segment s = (layer l, sequence b[, kv head h]), row r = row r of that cache row list):
//! * State per segment: its length n (`state.lengths`, what attention reads), the tokens N its sequence has seen,
//!   its budget fraction, and (per policy) the fixed eviction row, running scores and token stamps of its rows.
//! * Budget after N tokens: T(N) = ceil(N * n0 / N0) for the fraction the segment had when decoding started (n0
//!   rows kept of N0 seen, e.g. what the compressor's prefix solve chose at prefill), or, with a `profile`
//!   (eviction fraction f_l per layer), the official code's rule: the largest n with fl(n - fl(N * (1 - f_l))) < 1.
//!   `horizon` > 0 freezes the budget at T(horizon). A policy never evicts below its floor (protected tokens).
//! * A step: every active sequence b has written `appended` = a tokens at rows [n, n + a) of each of its
//!   segments; the step commits them (n += a, N += a), updates the running scores from the observation (score
//!   and amortised policies), then evicts n - max(T(N), floor) tokens (fixed-position and score policies) or, for
//!   the amortised policy, compresses every segment back to max(T(N), floor) once every `slack` + 1 tokens.
//! * Policies:
//!   - `fixed_position` (the paper's code): the evicted row p is fixed per segment at `decode_init`:
//!     p = n0 + distance (default -25; n0 / 2 if that is < 1; p = distance when distance > 0). Eviction removes
//!     rows [p, p + k) and shifts the rows after them down (token order kept) — so the cache is the first p rows
//!     of the prefill cache followed by a window of the most recent tokens. Floor: min(n, p).
//!   - `score`: running accumulated scores; evicts the k candidates (rows [sinks, n - recent)) with the lowest
//!     scores, ties to the newest token. `order::preserve` shifts the rows after each hole (token order kept,
//!     O(n - hole) rows moved); `order::reuse` (default) fills the holes with the last candidate rows and shifts
//!     the recent window down (O(recent + 1) rows per eviction; candidate rows then lose token order, the sinks
//!     stay first and the recent window last, in order). Evictions go in rounds of at most `decode_round`.
//!   - `amortised`: no per-step eviction; every segment may overshoot its budget by up to `slack` tokens, then one
//!     pass (curves -> solve -> selection -> in-place compaction, all layers and sequences) keeps the protected
//!     tokens and the highest-scored candidates (ties: older first), token order kept. `rebalance` re-solves
//!     the global PrefixKV threshold over each sequence's segments instead (the per-sequence total is kept and
//!     the layer fractions are re-set from the result: new length over min(N, horizon) tokens, so that a
//!     `horizon` cap keeps holding).
//! * Observation (score, amortised): `attention` adds, for every row r < n, sum_q ((sum_{g in group} P[b, g, q,
//!   r]) / |group|) (the accumulated-attention scorer's formula; group = all q heads for layer segments, the kv
//!   head's q heads for head segments); `add_scores` / `set_scores` add or assign caller rows (e.g. the window
//!   scorer's output on the last w queries). New rows start at score 0. NaN, infinite or negative values count
//!   as 0 and are reported.
//! * Problems met in device data (a length outside the cache, an observation shorter than the length, bad values)
//!   are reported in `state.status` (the smallest `reason` since `decode_init`); a segment whose new tokens would
//!   not fit is left unchanged. The host backend reports them the same way and returns cudaSuccess.
#pragma once

#include "../compact/compact.hpp"
#include "../compress/compress.hpp"
#include "../core/error.hpp"
#include "../core/validate.hpp"
#include "../core/views.hpp"
#include "../core/workspace.hpp"
#include "../curve/curve.hpp"
#include "../profile/profile.hpp"
#include "../select/select.hpp"
#include "../solve/solve.hpp"
#include "detail/decode_rules.hpp"

#include <limits>
#include <vector>

PREFIXKV_NAMESPACE_BEGIN

//! How the cache is kept within budget during generation.
enum class decode_policy : int {
  fixed_position = 0,  //!< the paper's code: one row at a fixed position per due eviction
  score = 1,           //!< running accumulated scores, the lowest-scored candidate evicted when due
  amortised = 2,       //!< overshoot by up to `slack` tokens, then one solve + in-place compaction of all layers
};

//! Row order of the score policy's evictions.
enum class decode_order : int {
  reuse = 0,     //!< a hole takes the last candidate row; the recent window shifts down (O(recent) rows)
  preserve = 1,  //!< the rows after a hole shift down (token order kept, O(n - hole) rows)
};

//! What the step's observation input holds (score and amortised policies).
enum class decode_observe : int {
  none = 0,        //!< scores unchanged (new rows start at 0)
  attention = 1,   //!< this step's attention probabilities, per layer (batch, q_head, query, key)
  add_scores = 2,  //!< caller score rows added to the running scores
  set_scores = 3,  //!< caller score rows replace the running scores (e.g. window-scorer output)
};

//! When the amortised policy compresses.
enum class decode_when : int {
  automatic = 0,  //!< `decode_schedule` decides (state.pending > slack), the usual choice
  skip = 1,       //!< never in this call (graph capture of an ordinary step)
  now = 2,        //!< in this call (graph capture of a compressing step)
};

//! Model shape and policy, given once (`make_plan`). Arrays are copied by `make_plan`.
struct decode_config {
  // ---- model shape
  int64_t layers = 0;    //!< layers of the cache (at most `compact_max_layers`)
  int64_t q_heads = 0;   //!< query heads (attention observation)
  int64_t kv_heads = 0;  //!< kv heads of the cache
  int64_t head_dim = 0;  //!< elements per cached row
  int64_t max_batch = 1;   //!< sequences the state tracks (calls may use fewer: sequences [0, batch))
  int64_t max_tokens = 0;  //!< rows per segment the state tracks (>= every length, slack included)
  granularity gran = granularity::layer;  //!< one segment per (layer, sequence) or per (layer, sequence, kv head)
  // ---- budget
  const double* profile = nullptr;  //!< (layers) eviction fractions f_l (the paper's rule); null: fractions from decode_init
  int64_t horizon = 0;              //!< > 0: budgets stop growing once a sequence has seen `horizon` tokens
  protect_policy protect{};         //!< score / amortised: first `sinks` and last `recent` rows always kept
  // ---- policy
  decode_policy policy = decode_policy::score;
  int64_t distance = -25;                    //!< fixed_position: evicted row n0 + distance (or distance if > 0)
  decode_order order = decode_order::reuse;  //!< score: how holes are filled
  int64_t slack = 64;                        //!< amortised: tokens a segment may exceed its budget by
  bool rebalance = false;                    //!< amortised: re-solve the layer split at each compression
};

//! A validated configuration (trivially copyable; made by `make_plan`).
struct decode_plan {
  decode_config cfg{};                     //!< `cfg.profile` is null; the fractions live in `keep`
  double keep[compact_max_layers] = {};    //!< profile budgets: 1 - f_l per layer
  bool from_profile = false;
  int64_t seg_heads = 1;                   //!< segments per (layer, sequence): 1 or kv_heads
  bool valid = false;
  //! Segments of a call with `batch` sequences.
  PREFIXKV_HOST_DEVICE int64_t segments(int64_t batch) const { return cfg.layers * batch * seg_heads; }
  //! Segments the state tracks.
  PREFIXKV_HOST_DEVICE int64_t state_segments() const { return segments(cfg.max_batch); }
  //! State index of segment (l, b, h): layer-major over `max_batch` sequences, as `state.lengths` is laid out.
  PREFIXKV_HOST_DEVICE int64_t state_index(int64_t l, int64_t b, int64_t h) const {
    return (l * cfg.max_batch + b) * seg_heads + h;
  }
  //! Keep fraction of layer l for the paper's rule, or -1 (fractions from decode_init).
  PREFIXKV_HOST_DEVICE double keep_of(int64_t l) const { return from_profile ? keep[l] : -1.0; }
  PREFIXKV_HOST_DEVICE bool has_scores() const { return cfg.policy != decode_policy::fixed_position; }
  PREFIXKV_HOST_DEVICE bool has_stamps() const { return cfg.policy == decode_policy::score; }
};

//! The persistent state: views of memory bound by `decode_state_bind` (device memory for the CUDA backend, host
//! memory for the host backend), plus one host counter. Arrays are indexed by `plan.state_index(l, b, h)`.
struct decode_state {
  int32_t* lengths = nullptr;   //!< (layers, max_batch[, kv_heads]) rows per segment — what attention reads
  int64_t* seen = nullptr;      //!< (segments) tokens the segment's sequence has seen (N)
  int64_t* frac_num = nullptr;  //!< (segments) budget fraction numerator (rows kept when it was set)
  int64_t* frac_den = nullptr;  //!< (segments) budget fraction denominator (tokens seen when it was set)
  int32_t* position = nullptr;  //!< (segments) fixed_position: the evicted row p
  float* scores = nullptr;      //!< (segments, max_tokens) running scores of the rows (score, amortised)
  int32_t* stamps = nullptr;    //!< (segments, max_tokens) score: arrival stamp of each row's token
  int32_t* status = nullptr;    //!< (1) 0 or the smallest `reason` met in device data since decode_init
  int64_t pending = 0;          //!< host: tokens appended since the last compression (amortised)
};

//! The prefill result a decode starts from (device memory for `decode_init`, host memory for the host backend).
struct decode_init_args {
  int64_t batch = 0;                  //!< sequences given (<= max_batch); the others start empty
  const int32_t* lengths = nullptr;   //!< (batch), or (layers, batch[, kv_heads]) with `lengths_per_segment`
  bool lengths_per_segment = false;   //!< e.g. `compress_outputs::lengths`
  const int32_t* seen = nullptr;      //!< (batch) tokens each sequence has seen (its prompt length)
  const float* scores = nullptr;      //!< optional (layers, batch[, kv_heads], score_stride) initial running scores
  int64_t score_stride = 0;           //!< floats between two score rows (>= every length; rows past it start at 0)
};

//! One step. `Cache` is `kv_layers<T>` or `paged_kv_layers<T>` (host arrays of per-layer views; data in the
//! backend's memory), `P` the element type of attention probabilities.
template <class Cache, class P = typename Cache::element_type>
struct decode_step_args {
  Cache cache{};                      //!< all layers; batch = the views' batch extent (<= max_batch)
  int32_t appended = 1;               //!< tokens every active sequence wrote at rows [n, n + appended)
  const int32_t* active = nullptr;    //!< (batch) 0: the sequence appended nothing this step; null: all active
  decode_observe observe = decode_observe::none;
  const kv_view<const P>* attention = nullptr;  //!< (layers) P_l: (batch, q_heads, queries, keys >= n + appended)
  const float* scores = nullptr;                //!< (layers, batch[, kv_heads], score_stride) caller rows
  int64_t score_stride = 0;                     //!< floats between two caller rows (>= every new length)
  decode_when when = decode_when::automatic;    //!< amortised: compress now, never, or as scheduled
};

//! Check a configuration (extents, policy values, sizes that fit the index types). Nothing is allocated.
[[nodiscard]] inline cudaError_t can_implement(const decode_config& c) noexcept {
  using detail::fail;
  if (c.layers <= 0 || c.q_heads <= 0 || c.kv_heads <= 0 || c.head_dim <= 0)
    return fail(reason::bad_parameter, "decode: layers, q_heads, kv_heads and head_dim must be positive");
  if (c.layers > compact_max_layers) return fail(reason::unsupported, "decode: more than compact_max_layers layers");
  if (c.q_heads % c.kv_heads != 0) return fail(reason::shape_mismatch, "decode: q_heads is not a multiple of kv_heads");
  if (c.max_batch < 0 || c.max_tokens < 0) return fail(reason::negative_extent, "decode: max_batch or max_tokens is negative");
  if (c.max_tokens > INT32_MAX) return fail(reason::out_of_range, "decode: max_tokens must fit int32 rows");
  if (c.kv_heads > 4096 || c.max_batch > (int64_t(1) << 24))
    return fail(reason::out_of_range, "decode: kv_heads or max_batch too large");
  if (c.gran != granularity::layer && c.gran != granularity::head)
    return fail(reason::bad_parameter, "decode: unknown granularity");
  const int64_t seg = c.layers * (c.gran == granularity::head ? c.kv_heads : 1);
  if (c.max_batch > 0 && c.max_tokens > 0 && c.max_batch > (int64_t(1) << 56) / (seg * c.max_tokens))
    return fail(reason::out_of_range, "decode: the plan's sizes overflow 64-bit byte counts");
  if (c.max_batch * seg > INT32_MAX) return fail(reason::out_of_range, "decode: too many segments");
  if (c.policy != decode_policy::fixed_position && c.policy != decode_policy::score &&
      c.policy != decode_policy::amortised)
    return fail(reason::bad_parameter, "decode: unknown policy");
  if (c.order != decode_order::reuse && c.order != decode_order::preserve)
    return fail(reason::bad_parameter, "decode: unknown order");
  if (c.profile) PREFIXKV_TRY(validate_profile(c.profile, c.layers));
  if (c.horizon < 0) return fail(reason::bad_parameter, "decode: horizon is negative");
  PREFIXKV_TRY(validate(c.protect));
  if (c.protect.sinks > INT32_MAX || c.protect.recent > INT32_MAX)
    return fail(reason::bad_parameter, "decode: sinks / recent too large");
  if (c.distance > INT32_MAX || c.distance < -int64_t(INT32_MAX))
    return fail(reason::bad_parameter, "decode: distance out of range");
  if (c.slack < 0) return fail(reason::bad_parameter, "decode: slack is negative");
  if (c.rebalance && (c.policy != decode_policy::amortised || c.profile != nullptr))
    return fail(reason::bad_parameter, "decode: rebalance needs the amortised policy and fractions from decode_init");
  return cudaSuccess;
}

//! Validate `cfg` and make the plan (copies the profile as keep fractions). On error `plan` is left as it was.
[[nodiscard]] inline cudaError_t make_plan(const decode_config& cfg, decode_plan& plan) noexcept {
  PREFIXKV_TRY(can_implement(cfg));
  decode_plan p;
  p.cfg = cfg;
  p.from_profile = cfg.profile != nullptr;
  for (int64_t l = 0; l < cfg.layers && p.from_profile; ++l) p.keep[l] = 1.0 - cfg.profile[l];  // numpy's 1 - ratios
  p.cfg.profile = nullptr;
  p.seg_heads = cfg.gran == granularity::head ? cfg.kv_heads : 1;
  p.valid = true;
  plan = p;
  return cudaSuccess;
}

namespace detail {
enum decode_piece : int { ds_lengths = 0, ds_seen, ds_num, ds_den, ds_position, ds_scores, ds_stamps, ds_status, ds_count };
inline void decode_state_layout(const decode_plan& pl, workspace_layout<ds_count>& ws) {
  const size_t S = static_cast<size_t>(pl.state_segments()), rows = S * static_cast<size_t>(pl.cfg.max_tokens);
  ws.reserve<int32_t>(ds_lengths, S);
  ws.reserve<int64_t>(ds_seen, S);
  ws.reserve<int64_t>(ds_num, S);
  ws.reserve<int64_t>(ds_den, S);
  ws.reserve<int32_t>(ds_position, pl.cfg.policy == decode_policy::fixed_position ? S : 0);
  ws.reserve<float>(ds_scores, pl.has_scores() ? rows : 0);
  ws.reserve<int32_t>(ds_stamps, pl.has_stamps() ? rows : 0);
  ws.reserve<int32_t>(ds_status, 1);
}
}  // namespace detail

//! Bytes of the persistent state of `plan` (256-byte aligned pieces).
[[nodiscard]] inline cudaError_t decode_state_bytes(const decode_plan& plan, size_t& bytes) noexcept {
  if (!plan.valid) return detail::fail(reason::bad_parameter, "decode: the plan was not made by make_plan");
  workspace_layout<detail::ds_count> ws;
  detail::decode_state_layout(plan, ws);
  bytes = ws.bytes();
  return cudaSuccess;
}

//! Carve the state out of `mem` (256-byte aligned, `decode_state_bytes` long). Nothing is written to `mem`;
//! call `decode_init` before the first step.
[[nodiscard]] inline cudaError_t decode_state_bind(const decode_plan& plan, void* mem, size_t bytes,
                                                   decode_state& state) noexcept {
  if (!plan.valid) return detail::fail(reason::bad_parameter, "decode: the plan was not made by make_plan");
  workspace_layout<detail::ds_count> ws;
  detail::decode_state_layout(plan, ws);
  PREFIXKV_TRY(ws.map(mem, bytes));
  decode_state s;
  s.lengths = ws.get<int32_t>(detail::ds_lengths);
  s.seen = ws.get<int64_t>(detail::ds_seen);
  s.frac_num = ws.get<int64_t>(detail::ds_num);
  s.frac_den = ws.get<int64_t>(detail::ds_den);
  s.position = ws.get<int32_t>(detail::ds_position);
  s.scores = ws.get<float>(detail::ds_scores);
  s.stamps = ws.get<int32_t>(detail::ds_stamps);
  s.status = ws.get<int32_t>(detail::ds_status);
  state = s;
  return cudaSuccess;
}

//! The amortised policy's schedule (host, no device access): adds `appended` to `state.pending` and returns
//! true — resetting it — once it exceeds the slack, i.e. once every slack + 1 single-token steps. Between two
//! compressions a segment's length exceeds its budget by at most `pending` <= slack. `decode_step` calls it
//! itself with `decode_when::automatic`; a runtime replaying captured graphs calls it to pick the graph.
inline bool decode_schedule(const decode_plan& plan, decode_state& state, int64_t appended) noexcept {
  if (plan.cfg.policy != decode_policy::amortised) return false;
  state.pending += appended > 0 ? appended : 0;
  if (state.pending <= plan.cfg.slack) return false;
  state.pending = 0;
  return true;
}

//! The length a segment has after a step of the fixed-position or score policy (and after a compression of the
//! amortised policy): min(n, max(budget, floor)). `n` = rows after the commit, `N` = tokens seen, `num`/`den` its
//! fraction, `p` its fixed row. Runtimes can mirror the device lengths on the host with it (no synchronisation).
PREFIXKV_HOST_DEVICE int64_t decode_target_length(const decode_plan& plan, int64_t layer, int64_t n, int64_t N,
                                                  int64_t num, int64_t den, int64_t p) {
  const int64_t t = detail::decode_budget(N, plan.keep_of(layer), num, den, plan.cfg.horizon);
  const int64_t fl = plan.cfg.policy == decode_policy::fixed_position ? detail::decode_floor_fixed(n, p)
                                                                      : detail::decode_floor_protected(n, plan.cfg.protect);
  const int64_t keep = t > fl ? t : fl;
  return keep < n ? keep : n;
}

//! Owning host storage for a state (host backend, tests): `state()` views it.
struct decode_state_buffers {
  std::vector<int32_t> lengths, position, stamps;
  std::vector<int64_t> seen, frac_num, frac_den;
  std::vector<float> scores;
  int32_t status = 0;
  int64_t pending = 0;
  explicit decode_state_buffers(const decode_plan& pl = {}) {
    const size_t S = pl.valid ? static_cast<size_t>(pl.state_segments()) : 0;
    const size_t rows = S * static_cast<size_t>(pl.valid ? pl.cfg.max_tokens : 0);
    lengths.assign(S, 0);
    seen.assign(S, 0);
    frac_num.assign(S, 0);
    frac_den.assign(S, 0);
    position.assign(pl.valid && pl.cfg.policy == decode_policy::fixed_position ? S : 0, 0);
    scores.assign(pl.valid && pl.has_scores() ? rows : 0, 0.0f);
    stamps.assign(pl.valid && pl.has_stamps() ? rows : 0, 0);
  }
  //! A view whose `pending` is a copy: keep the `decode_state` between steps (or copy `pending` back).
  decode_state state() {
    decode_state s;
    s.lengths = lengths.data();
    s.seen = seen.data();
    s.frac_num = frac_num.data();
    s.frac_den = frac_den.data();
    s.position = position.empty() ? nullptr : position.data();
    s.scores = scores.empty() ? nullptr : scores.data();
    s.stamps = stamps.empty() ? nullptr : stamps.data();
    s.status = &status;
    s.pending = pending;
    return s;
  }
};

PREFIXKV_NAMESPACE_END

#include "detail/decode_host.hpp"
