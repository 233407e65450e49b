// Shared helpers of the libFuzzer harnesses (fuzz/fuzz_*.cpp): an input reader that mixes small sizes with
// hostile extremes, an invariant check that aborts, and byte snapshots for "rejection leaves buffers untouched".
#pragma once

#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#define FUZZ_ASSERT(c)                                                          \
  do {                                                                          \
    if (!(c)) {                                                                 \
      std::fprintf(stderr, "invariant failed: %s (%s:%d)\n", #c, __FILE__, __LINE__); \
      std::abort();                                                             \
    }                                                                           \
  } while (0)

namespace fuzz {

//! Values that break unchecked size arithmetic.
inline int64_t hostile_int(FuzzedDataProvider& in) {
  static const int64_t v[] = {-1,
                              0,
                              1,
                              2,
                              std::numeric_limits<int64_t>::max(),
                              std::numeric_limits<int64_t>::min(),
                              std::numeric_limits<int64_t>::max() - 1,
                              int64_t(1) << 31,
                              (int64_t(1) << 31) - 1,
                              int64_t(1) << 32,
                              int64_t(1) << 61,
                              int64_t(1) << 62,
                              (int64_t(1) << 62) + 1,
                              int64_t(1) << 45,
                              -(int64_t(1) << 40),
                              std::numeric_limits<int64_t>::max() / 2};
  return v[in.ConsumeIntegralInRange<size_t>(0, sizeof(v) / sizeof(v[0]) - 1)];
}

//! Mostly a value in [lo, hi]; sometimes (1 in 16) a hostile extreme, sometimes (1 in 64) any int64.
inline int64_t size_or_hostile(FuzzedDataProvider& in, int64_t lo, int64_t hi) {
  const uint8_t mode = in.ConsumeIntegral<uint8_t>();
  if (mode < 236) return in.ConsumeIntegralInRange<int64_t>(lo, hi);
  if (mode < 252) return hostile_int(in);
  return in.ConsumeIntegral<int64_t>();
}

//! A float score: mostly small non-negative values (with ties), sometimes -0.0, negative, NaN or infinity.
inline float score(FuzzedDataProvider& in) {
  const uint8_t mode = in.ConsumeIntegral<uint8_t>();
  if (mode < 200) return static_cast<float>(in.ConsumeIntegralInRange<int>(0, 12)) * 0.25f;
  if (mode < 215) return -0.0f;
  if (mode < 225) return in.ConsumeFloatingPointInRange<float>(0.0f, 1e30f);
  if (mode < 240) return -static_cast<float>(in.ConsumeIntegralInRange<int>(1, 5));
  if (mode < 248) return std::numeric_limits<float>::quiet_NaN();
  return mode & 1 ? std::numeric_limits<float>::infinity() : -std::numeric_limits<float>::infinity();
}

//! A double in [0, 1) most of the time, or a hostile one.
inline double ratio(FuzzedDataProvider& in) {
  const uint8_t mode = in.ConsumeIntegral<uint8_t>();
  if (mode < 200) return static_cast<double>(in.ConsumeIntegralInRange<int>(0, 255)) / 256.0;
  static const double v[] = {1.0, -0.0, -1e-300, 4.9e-324, 0.9999999999999999, 1e300,
                             std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                             -std::numeric_limits<double>::infinity(), 0.5};
  return v[in.ConsumeIntegralInRange<size_t>(0, sizeof(v) / sizeof(v[0]) - 1)];
}

template <class T>
inline std::vector<unsigned char> bytes_of(const T* p, size_t n) {
  std::vector<unsigned char> b(n * sizeof(T));
  if (n) std::memcpy(b.data(), p, b.size());
  return b;
}
template <class T>
inline bool same_bytes(const T* p, size_t n, const std::vector<unsigned char>& b) {
  return b.size() == n * sizeof(T) && (n == 0 || std::memcmp(p, b.data(), b.size()) == 0);
}

//! Exact (a * b + c) as __int128, for independent size checks.
inline __int128 wide(int64_t a) { return static_cast<__int128>(a); }
inline bool fits_i64(__int128 x) {
  return x >= static_cast<__int128>(std::numeric_limits<int64_t>::min()) &&
         x <= static_cast<__int128>(std::numeric_limits<int64_t>::max());
}

}  // namespace fuzz
