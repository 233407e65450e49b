//! \file prefixkv/core/numeric.hpp
//! 16-bit floating-point storage types and their bit-exact conversions to and from float, usable on the host
//! with any C++17 compiler and in device code.
//!
//! prefixkv reads half (IEEE binary16) and bfloat16 inputs through two tiny storage types, `f16` and `bf16`,
//! which hold the raw 16 bits. They have the size and alignment of `__half` / `__nv_bfloat16`, so a device
//! buffer of either CUDA type can be viewed as one of ours with a `reinterpret_cast`:
//! \code
//! __nv_bfloat16* d_keys = ...;
//! auto k = prefixkv::make_kv_view_bhsd(reinterpret_cast<const prefixkv::bf16*>(d_keys), B, H, S, D);
//! float x = prefixkv::to_float(prefixkv::bf16::from_float(1.5f));   // 1.5f
//! \endcode
//! Conversions to float are exact; conversions from float round to nearest even (NaN stays NaN).
#pragma once

#include "config.hpp"

#include <cstring>

PREFIXKV_NAMESPACE_BEGIN

//! Element types the scorers read.
enum class dtype : int { f32 = 0, f16 = 1, bf16 = 2 };

namespace detail {
PREFIXKV_HOST_DEVICE float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}
PREFIXKV_HOST_DEVICE uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}
}  // namespace detail

//! binary16 bits -> float (exact, subnormals, infinities and NaN included).
PREFIXKV_HOST_DEVICE float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  if (exp == 0x1Fu) return detail::bits_to_float(sign | 0x7F800000u | (man << 13));  // inf / NaN
  if (exp != 0) return detail::bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return detail::bits_to_float(sign);  // +-0
  // subnormal: value = man * 2^-24, exactly representable in float
  const float v = static_cast<float>(man) * 5.9604644775390625e-8f;
  return (h & 0x8000u) ? -v : v;
}

//! float -> binary16 bits, round to nearest even; overflow gives infinity, NaN stays a (quiet) NaN.
PREFIXKV_HOST_DEVICE uint16_t float_to_half_bits(float f) {
  const uint32_t x = detail::float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return static_cast<uint16_t>(sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u : 0u));
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to >= 65520 -> inf
  if (ax < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    if (ax < 0x33000000u) return sign;  // < 2^-25: rounds to zero
    const uint32_t e = ax >> 23;
    const uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14 + (113 - e) ... mantissa shift to units of 2^-24
    const uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
    const uint32_t r = q + ((rem > halfway || (rem == halfway && (q & 1u))) ? 1u : 0u);
    return static_cast<uint16_t>(sign | r);
  }
  const uint32_t rebased = ax - 0x38000000u;  // exponent 127 -> 15
  const uint32_t q = rebased >> 13, rem = rebased & 0x1FFFu;
  const uint32_t r = q + ((rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ? 1u : 0u);
  return static_cast<uint16_t>(sign | r);
}

//! bfloat16 bits -> float (exact).
PREFIXKV_HOST_DEVICE float bf16_bits_to_float(uint16_t b) { return detail::bits_to_float(static_cast<uint32_t>(b) << 16); }

//! float -> bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN.
PREFIXKV_HOST_DEVICE uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = detail::float_to_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  const uint32_t r = x + 0x7FFFu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(r >> 16);
}

//! IEEE binary16 storage (same size and alignment as `__half`).
struct alignas(2) f16 {
  uint16_t bits;
  PREFIXKV_HOST_DEVICE static f16 from_float(float f) { return f16{float_to_half_bits(f)}; }
};
//! bfloat16 storage (same size and alignment as `__nv_bfloat16`).
struct alignas(2) bf16 {
  uint16_t bits;
  PREFIXKV_HOST_DEVICE static bf16 from_float(float f) { return bf16{float_to_bf16_bits(f)}; }
};

PREFIXKV_HOST_DEVICE float to_float(float x) { return x; }
PREFIXKV_HOST_DEVICE float to_float(f16 x) { return half_bits_to_float(x.bits); }
PREFIXKV_HOST_DEVICE float to_float(bf16 x) { return bf16_bits_to_float(x.bits); }

//! The `dtype` of a storage type.
template <class T>
struct dtype_of;
template <>
struct dtype_of<float> {
  static constexpr dtype value = dtype::f32;
};
template <>
struct dtype_of<f16> {
  static constexpr dtype value = dtype::f16;
};
template <>
struct dtype_of<bf16> {
  static constexpr dtype value = dtype::bf16;
};

PREFIXKV_NAMESPACE_END
