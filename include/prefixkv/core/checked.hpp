//! \file prefixkv/core/checked.hpp
//! Overflow-checked 64-bit integer arithmetic for host-side validation.
//!
//! Every size, product, sum and end offset that prefixkv derives from caller-supplied extents, strides, counts or
//! offsets goes through these helpers before it is trusted, so a description whose arithmetic would wrap is
//! rejected instead of being accepted with a wrapped (small, or zero) value.
//!
//! \code
//! int64_t n = 0;
//! if (!prefixkv::detail::checked_mul(rows, cols, n)) return fail(reason::out_of_range, "too many elements");
//! prefixkv::detail::checked_i64 bytes = prefixkv::detail::checked_i64(n) * 4 + 64;   // sticky overflow flag
//! if (!bytes.ok()) ...
//! \endcode
#pragma once

#include "config.hpp"

#include <cstdint>
#include <limits>

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

//! r = a + b; false (r unspecified) when the exact sum does not fit int64_t.
[[nodiscard]] inline bool checked_add(int64_t a, int64_t b, int64_t& r) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  long long t = 0;
  const bool of = __builtin_add_overflow(static_cast<long long>(a), static_cast<long long>(b), &t);
  r = static_cast<int64_t>(t);
  return !of;
#else
  if ((b > 0 && a > std::numeric_limits<int64_t>::max() - b) || (b < 0 && a < std::numeric_limits<int64_t>::min() - b))
    return false;
  r = a + b;
  return true;
#endif
}

//! r = a - b; false when the exact difference does not fit int64_t.
[[nodiscard]] inline bool checked_sub(int64_t a, int64_t b, int64_t& r) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  long long t = 0;
  const bool of = __builtin_sub_overflow(static_cast<long long>(a), static_cast<long long>(b), &t);
  r = static_cast<int64_t>(t);
  return !of;
#else
  if ((b < 0 && a > std::numeric_limits<int64_t>::max() + b) || (b > 0 && a < std::numeric_limits<int64_t>::min() + b))
    return false;
  r = a - b;
  return true;
#endif
}

//! r = a * b; false when the exact product does not fit int64_t.
[[nodiscard]] inline bool checked_mul(int64_t a, int64_t b, int64_t& r) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  long long t = 0;
  const bool of = __builtin_mul_overflow(static_cast<long long>(a), static_cast<long long>(b), &t);
  r = static_cast<int64_t>(t);
  return !of;
#else
  if (a == 0 || b == 0) {
    r = 0;
    return true;
  }
  const int64_t mx = std::numeric_limits<int64_t>::max(), mn = std::numeric_limits<int64_t>::min();
  if (a > 0 ? (b > 0 ? a > mx / b : b < mn / a) : (b > 0 ? a < mn / b : (a != 0 && b < mx / a))) return false;
  r = a * b;
  return true;
#endif
}

//! An int64_t that remembers whether any operation producing it overflowed (a sticky flag), for chains such as
//! `(n - 1) * stride + len`. `value()` is meaningful only when `ok()`.
class checked_i64 {
 public:
  constexpr checked_i64() noexcept = default;
  constexpr checked_i64(int64_t v) noexcept : v_(v) {}  // NOLINT(google-explicit-constructor): arithmetic type
  static constexpr checked_i64 overflowed() noexcept {
    checked_i64 c;
    c.ok_ = false;
    return c;
  }
  constexpr bool ok() const noexcept { return ok_; }
  constexpr int64_t value() const noexcept { return v_; }

  friend checked_i64 operator+(checked_i64 a, checked_i64 b) noexcept {
    checked_i64 r;
    r.ok_ = a.ok_ && b.ok_ && checked_add(a.v_, b.v_, r.v_);
    return r;
  }
  friend checked_i64 operator-(checked_i64 a, checked_i64 b) noexcept {
    checked_i64 r;
    r.ok_ = a.ok_ && b.ok_ && checked_sub(a.v_, b.v_, r.v_);
    return r;
  }
  friend checked_i64 operator*(checked_i64 a, checked_i64 b) noexcept {
    checked_i64 r;
    r.ok_ = a.ok_ && b.ok_ && checked_mul(a.v_, b.v_, r.v_);
    return r;
  }
  checked_i64& operator+=(checked_i64 b) noexcept { return *this = *this + b; }
  checked_i64& operator*=(checked_i64 b) noexcept { return *this = *this * b; }

 private:
  int64_t v_ = 0;
  bool ok_ = true;
};

//! Product of non-negative extents, 0 as soon as one of them is 0 (an empty box is empty whatever the other
//! extents are). False when the product of non-zero extents overflows.
template <int N>
[[nodiscard]] inline bool checked_extent_product(const int64_t (&ext)[N], int64_t& r) noexcept {
  for (int i = 0; i < N; ++i)
    if (ext[i] == 0) {
      r = 0;
      return true;
    }
  checked_i64 p = 1;
  for (int i = 0; i < N; ++i) p *= ext[i];
  r = p.value();
  return p.ok();
}

//! Elements addressed by a strided box with non-negative extents and strides: 1 + sum (ext - 1) * stride, or 0
//! for an empty box. False on overflow.
template <int N>
[[nodiscard]] inline bool checked_box_span(const int64_t (&ext)[N], const int64_t (&str)[N], int64_t& r) noexcept {
  for (int i = 0; i < N; ++i)
    if (ext[i] == 0) {
      r = 0;
      return true;
    }
  checked_i64 last = 0;
  for (int i = 0; i < N; ++i) last += (checked_i64(ext[i]) - 1) * str[i];
  last += 1;
  r = last.value();
  return last.ok();
}

//! True when the byte range [p, p + bytes) does not wrap around the address space (bytes >= 0).
[[nodiscard]] inline bool address_range_fits(const void* p, int64_t bytes) noexcept {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  return bytes >= 0 && static_cast<std::uint64_t>(bytes) <= std::numeric_limits<std::uintptr_t>::max() - a;
}

}  // namespace detail
PREFIXKV_NAMESPACE_END
