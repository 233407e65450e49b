//! \file prefixkv/decode/detail/decode_rules.hpp
//! The arithmetic that defines decode-time budgets, shared by the host backend and the device kernels (both call
//! these functions, so both keep the same lengths and evict the same tokens). Included by decode.hpp.
#pragma once

#include "../../core/config.hpp"
#include "../../curve/curve.hpp"
#include "../../solve/solve.hpp"

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

//! a * b and a - b in double, rounded once each (never fused into one FMA, on the host or the device): the
//! paper's budget rule is written with numpy float64 operations, and fusing would change its integer results.
PREFIXKV_HOST_DEVICE double decode_dmul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  volatile double p = a * b;  // a volatile store keeps the compiler from contracting the product into an FMA
  return p;
#endif
}
PREFIXKV_HOST_DEVICE double decode_dsub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  volatile double d = a - b;
  return d;
#endif
}

//! The paper's budget of a layer with keep fraction `keep` = 1 - f (f the layer's eviction fraction) after N
//! tokens: the official code evicts while `int(n - N * (1 - f)) > 0` (numpy float64: product, then difference,
//! then truncation), i.e. it keeps the largest n with fl(n - fl(N * keep)) < 1 — ceil(N * keep) up to the rounding
//! of the product.
PREFIXKV_HOST_DEVICE int64_t decode_paper_target(int64_t N, double keep) {
  const double c = decode_dmul(static_cast<double>(N), keep);
  int64_t n = c > 0.0 ? static_cast<int64_t>(c) : 0;
  while (n > 0 && !(decode_dsub(static_cast<double>(n), c) < 1.0)) --n;
  while (decode_dsub(static_cast<double>(n + 1), c) < 1.0) ++n;
  return n;
}

//! ceil(N * num / den) without overflow for N, num, den < 2^31 * 2^31 products (den > 0).
PREFIXKV_HOST_DEVICE int64_t decode_ceil_fraction(int64_t N, int64_t num, int64_t den) {
  const int64_t q = N / den, r = N % den;
  return q * num + (r * num + den - 1) / den;
}

//! A segment's budget after its sequence has seen N tokens, before the protected floor: the layer's fraction of
//! the tokens seen so far. `keep` >= 0: the paper's rule with that keep fraction (profile budgets); otherwise the
//! exact fraction num / den (the segment's tokens over the tokens seen when its budget was last set; den == 0
//! keeps everything). `horizon` > 0 stops the growth at N = horizon (a fixed cap).
PREFIXKV_HOST_DEVICE int64_t decode_budget(int64_t N, double keep, int64_t num, int64_t den, int64_t horizon) {
  const int64_t ne = horizon > 0 && N > horizon ? horizon : N;
  if (keep >= 0.0) return decode_paper_target(ne, keep);
  if (den <= 0) return ne;
  return decode_ceil_fraction(ne, num, den);
}

//! The denominator of a fraction set after N tokens (rebalance): N, or the horizon once N passed it, so that the
//! budget T(N') = ceil(min(N', horizon) * num / den) of the new fraction is `num` from then on.
PREFIXKV_HOST_DEVICE int64_t decode_fraction_den(int64_t N, int64_t horizon) {
  return horizon > 0 && N > horizon ? horizon : N;
}

//! The evicted row of the fixed-position policy, set once per segment from its length n0 when decoding starts
//! (the official code: `distance` > 0 gives that row; otherwise n0 + distance, or n0 / 2 when that is < 1).
PREFIXKV_HOST_DEVICE int64_t decode_fixed_row(int64_t n0, int64_t distance) {
  if (distance > 0) return distance;
  const int64_t p = n0 + distance;
  return p >= 1 ? p : n0 / 2;
}

//! Rows a segment of n tokens never drops below: the fixed-position policy evicts rows [p, n) only, the others
//! keep the protected tokens (the first `sinks` and the last `recent` rows).
PREFIXKV_HOST_DEVICE int64_t decode_floor_fixed(int64_t n, int64_t p) { return n < p ? n : p; }
PREFIXKV_HOST_DEVICE int64_t decode_floor_protected(int64_t n, protect_policy pr) { return protected_count(n, pr); }

//! Eviction key of a candidate: the lowest score first; between equal scores the newest token (the largest
//! stamp) first — the compressor's ranking (score descending, then position ascending) read from its end.
//! Keys are unique within a segment because stamps are.
PREFIXKV_HOST_DEVICE uint64_t decode_key(float score, int32_t stamp) {
  return (static_cast<uint64_t>(order_key(score)) << 32) | static_cast<uint64_t>(~static_cast<uint32_t>(stamp));
}

//! Evictions per round of the score policy (the reuse order's moves depend on the rounds; see decode.hpp).
inline constexpr int64_t decode_round = 1024;

//! The smaller non-zero of two reasons (0 = none).
PREFIXKV_HOST_DEVICE reason decode_min_reason(reason a, reason b) {
  if (a == reason::none) return b;
  if (b == reason::none) return a;
  return static_cast<int>(a) < static_cast<int>(b) ? a : b;
}

//! An observed score made safe to accumulate: NaN, infinities and negative values count as 0 and set `why`.
PREFIXKV_HOST_DEVICE float decode_sanitise(float x, reason& why) {
  if (!(x - x == 0.0f)) {  // NaN or infinity (x - x is NaN for both)
    why = decode_min_reason(why, reason::nonfinite_input);
    return 0.0f;
  }
  if (x < 0.0f) {
    why = decode_min_reason(why, reason::negative_input);
    return 0.0f;
  }
  return x;
}

//! old + x, unless that overflows (then old stays and `why` records it).
PREFIXKV_HOST_DEVICE float decode_accumulate(float old, float x, reason& why) {
  const float s = old + x;
  if (!(s - s == 0.0f)) {
    why = decode_min_reason(why, reason::nonfinite_input);
    return old;
  }
  return s;
}

}  // namespace detail
PREFIXKV_NAMESPACE_END
