// Random inputs for tests: a fresh seed per run (printed, so a failure can be replayed with
// PREFIXKV_TEST_SEED=<seed>), and helpers to fill buffers.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace prefixkv_test {

inline uint64_t test_seed() {
  static const uint64_t seed = [] {
    if (const char* s = std::getenv("PREFIXKV_TEST_SEED")) return static_cast<uint64_t>(std::strtoull(s, nullptr, 10));
    std::random_device rd;
    const uint64_t v = (static_cast<uint64_t>(rd()) << 32) ^ rd();
    return v;
  }();
  static const bool printed = [] {
    std::printf("PREFIXKV_TEST_SEED=%llu\n", static_cast<unsigned long long>(seed));
    return true;
  }();
  (void)printed;
  return seed;
}

//! True when PREFIXKV_TEST_QUICK is set (scripts/gpu-check.sh sets it for the compute-sanitizer runs, which are
//! 10-100x slower): tests shrink their largest cases, keeping every code path covered.
inline bool quick_mode() { return std::getenv("PREFIXKV_TEST_QUICK") != nullptr; }

//! True when PREFIXKV_TEST_QUICK=2 (compute-sanitizer racecheck, the slowest tool): random-case loops run only a
//! few rounds; every kernel and code path is still launched at least once.
inline bool tiny_mode() {
  const char* q = std::getenv("PREFIXKV_TEST_QUICK");
  return q != nullptr && q[0] == '2' && q[1] == '\0';
}

//! Loop count by mode: `full` normally, `quick` under PREFIXKV_TEST_QUICK, `tiny` under PREFIXKV_TEST_QUICK=2.
inline int rounds(int full, int quick, int tiny) { return tiny_mode() ? tiny : quick_mode() ? quick : full; }

//! A generator seeded from the run seed and a per-test salt.
inline std::mt19937_64 make_rng(uint64_t salt = 0) { return std::mt19937_64(test_seed() ^ (salt * 0x9E3779B97F4A7C15ull)); }

template <class T>
std::vector<T> random_vector(std::mt19937_64& rng, size_t n, double lo = -1.0, double hi = 1.0) {
  std::uniform_real_distribution<double> d(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(d(rng));
  return v;
}

inline std::vector<unsigned char> random_bytes(std::mt19937_64& rng, size_t n) {
  std::vector<unsigned char> v(n);
  for (auto& x : v) x = static_cast<unsigned char>(rng());
  return v;
}

}  // namespace prefixkv_test
