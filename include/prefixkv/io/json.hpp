//! \file prefixkv/io/json.hpp
//! The little JSON prefixkv needs: writing numbers (shortest text that reads back to the same value) and arrays,
//! and reading a JSON array of numbers (the profile format). The reader is strict (RFC 8259 number grammar,
//! whitespace, nothing else) and reports `reason::bad_file`; nothing here throws.
//!
//! \code
//! std::string s;
//! prefixkv::json_append_number(s, 0.25);           // "0.25"
//! std::vector<double> v;
//! auto e = prefixkv::json_parse_number_array("[0.1, 2e-3]", 11, v);
//! \endcode
#pragma once

#include "../core/error.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

PREFIXKV_NAMESPACE_BEGIN

// The append helpers return false (and leave `s` in a valid but unspecified state) if memory runs out; they
// never throw.

//! Append the shortest decimal text that reads back as `x` (finite; NaN/inf are written as null).
inline bool json_append_number(std::string& s, double x) noexcept {
  char buf[40] = "null";
  if (std::isfinite(x)) {
    for (int prec = 1; prec <= 17; ++prec) {
      std::snprintf(buf, sizeof(buf), "%.*g", prec, x);
      if (std::strtod(buf, nullptr) == x) break;
    }
  }
  try {
    s += buf;
    return true;
  } catch (...) {
    return false;
  }
}
//! Append a float with the shortest text that reads back as the same float.
inline bool json_append_float(std::string& s, float x) noexcept {
  char buf[40] = "null";
  if (std::isfinite(x)) {
    for (int prec = 1; prec <= 9; ++prec) {
      std::snprintf(buf, sizeof(buf), "%.*g", prec, static_cast<double>(x));
      if (std::strtof(buf, nullptr) == x) break;
    }
  }
  try {
    s += buf;
    return true;
  } catch (...) {
    return false;
  }
}
inline bool json_append_int(std::string& s, int64_t v) noexcept {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%lld", static_cast<long long>(v));
  try {
    s += buf;
    return true;
  } catch (...) {
    return false;
  }
}

//! Append `[a, b, ...]`.
template <class T>
inline bool json_append_int_array(std::string& s, const T* v, int64_t n) noexcept {
  try {
    s += '[';
    for (int64_t i = 0; i < n; ++i) {
      if (i) s += ", ";
      if (!json_append_int(s, static_cast<int64_t>(v[i]))) return false;
    }
    s += ']';
    return true;
  } catch (...) {
    return false;
  }
}
inline bool json_append_number_array(std::string& s, const double* v, int64_t n) noexcept {
  try {
    s += '[';
    for (int64_t i = 0; i < n; ++i) {
      if (i) s += ", ";
      if (!json_append_number(s, v[i])) return false;
    }
    s += ']';
    return true;
  } catch (...) {
    return false;
  }
}

namespace detail {
inline bool json_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
inline bool json_digit(char c) { return c >= '0' && c <= '9'; }
// Length of a JSON number at p (0 if none).
inline size_t json_number_length(const char* p, const char* end) {
  const char* q = p;
  if (q < end && *q == '-') ++q;
  if (q >= end) return 0;
  if (*q == '0') {
    ++q;
  } else if (json_digit(*q)) {
    while (q < end && json_digit(*q)) ++q;
  } else {
    return 0;
  }
  if (q < end && *q == '.') {
    ++q;
    if (q >= end || !json_digit(*q)) return 0;
    while (q < end && json_digit(*q)) ++q;
  }
  if (q < end && (*q == 'e' || *q == 'E')) {
    ++q;
    if (q < end && (*q == '+' || *q == '-')) ++q;
    if (q >= end || !json_digit(*q)) return 0;
    while (q < end && json_digit(*q)) ++q;
  }
  return static_cast<size_t>(q - p);
}
}  // namespace detail

//! Parse a JSON array of numbers (the whole text; surrounding whitespace allowed). `out` is replaced only on
//! success. Numbers must be finite as doubles.
[[nodiscard]] inline cudaError_t json_parse_number_array(const char* text, size_t n, std::vector<double>& out) noexcept {
  try {
    if (text == nullptr && n > 0) return detail::fail(reason::null_pointer, "json: null text");
    const char *p = text, *end = text + n;
    auto skip = [&] {
      while (p < end && detail::json_ws(*p)) ++p;
    };
    std::vector<double> v;
    skip();
    if (p >= end || *p != '[') return detail::fail(reason::bad_file, "json: expected '[' (a JSON array of numbers)");
    ++p;
    skip();
    if (p < end && *p == ']') {
      ++p;
    } else {
      for (;;) {
        skip();
        const size_t len = detail::json_number_length(p, end);
        if (len == 0 || len > 64) return detail::fail(reason::bad_file, "json: expected a number");
        char buf[72];
        for (size_t i = 0; i < len; ++i) buf[i] = p[i];
        buf[len] = '\0';
        const double x = std::strtod(buf, nullptr);
        if (!std::isfinite(x)) return detail::fail(reason::bad_file, "json: number out of range");
        v.push_back(x);
        p += len;
        skip();
        if (p < end && *p == ',') {
          ++p;
          continue;
        }
        if (p < end && *p == ']') {
          ++p;
          break;
        }
        return detail::fail(reason::bad_file, "json: expected ',' or ']'");
      }
    }
    skip();
    if (p != end) return detail::fail(reason::bad_file, "json: trailing characters after the array");
    out.swap(v);
    return cudaSuccess;
  } catch (...) {
    return detail::fail(reason::capacity_exceeded, "json: out of memory", cudaErrorMemoryAllocation);
  }
}

PREFIXKV_NAMESPACE_END
