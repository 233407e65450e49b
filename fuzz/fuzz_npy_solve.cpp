// libFuzzer target: the .npy reader and JSON reader on untrusted bytes, then (when the bytes decode to a small
// 2-D score matrix) the host curve builder, the host solver and the selection writer, checked against the
// brute-force oracle of the tests. Any crash, sanitizer report or violated invariant aborts.
//   clang++ -std=c++17 -fsanitize=fuzzer,address -Iinclude -Itests fuzz/fuzz_npy_solve.cpp
#include <prefixkv/io/json.hpp>
#include <prefixkv/io/npy.hpp>
#include <prefixkv/select/select.hpp>
#include <prefixkv/solve/solve.hpp>

#include "solve/solve_oracle.hpp"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace pk = prefixkv;

#define FUZZ_ASSERT(c)                                                  \
  do {                                                                  \
    if (!(c)) {                                                         \
      std::fprintf(stderr, "invariant failed: %s (line %d)\n", #c, __LINE__); \
      std::abort();                                                     \
    }                                                                   \
  } while (0)

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<double> v;
  (void)pk::json_parse_number_array(reinterpret_cast<const char*>(data), size, v);
  pk::npy_array a;
  if (pk::npy_parse(data, size, a) != cudaSuccess) return 0;
  int64_t count = 1;
  for (int64_t d : a.shape) count *= d;
  FUZZ_ASSERT(count == a.size());
  // (a shape such as (6000000, 0) holds no data but asks for millions of empty segments: the work of every stage
  // is proportional to the segment count, which the caller chose; the CLI refuses rows without data)
  if (a.rank() != 2 || a.size() > 4096 || a.shape[0] > 4096) return 0;
  const int64_t S = a.shape[0], n = a.shape[1];
  std::vector<float> x(a.data.size());
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(a.data[i]);
  const uint8_t tail = size ? data[size - 1] : 0;
  const pk::protect_policy prot{tail % 5, (tail / 5) % 3};
  pk::curve_buffers c;
  if (pk::build_curves_host(x.data(), pk::make_uniform_segments(S, n), prot, c) != cudaSuccess) return 0;
  const auto cv = c.view();
  const int64_t N = S * n, C = c.offsets[S];
  // evict-ratio budget
  const double r = (size > 1 ? data[size - 2] : 0) / 256.0;
  std::vector<int64_t> keep;
  float thr = 0;
  const cudaError_t e = pk::solve_host(cv, pk::budget_evict_ratio(r), {}, keep, &thr);
  const auto o = prefixkv_test::oracle_solve(cv, 0, S, 0, r, 0);
  FUZZ_ASSERT((e == cudaSuccess) == o.ok);
  if (e == cudaSuccess) {
    FUZZ_ASSERT(keep == o.keep);
    FUZZ_ASSERT(thr == o.threshold);
    int64_t total = 0;
    for (int64_t s = 0; s < S; ++s) total += keep[s];
    FUZZ_ASSERT(total == N - static_cast<int64_t>(std::nearbyint(r * double(N))));
    pk::selection_buffers sel;
    FUZZ_ASSERT(pk::write_selection_host(cv, keep.data(), sel) == cudaSuccess);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t i = sel.offsets[s] + 1; i < sel.offsets[s + 1]; ++i) FUZZ_ASSERT(sel.indices[i - 1] < sel.indices[i]);
  }
  // keep-candidates budget with bounds
  const int64_t B = C ? static_cast<int64_t>(tail) % (C + 1) : 0;
  pk::keep_bounds bd;
  bd.min_keep = tail % 3;
  bd.max_keep = bd.min_keep + tail % 7;
  const cudaError_t e2 = pk::solve_host(cv, pk::budget_keep_candidates(B), bd, keep, &thr);
  const auto o2 = prefixkv_test::oracle_solve(cv, 0, S, 2, 0, B, bd.min_keep, bd.max_keep);
  FUZZ_ASSERT((e2 == cudaSuccess) == o2.ok);
  if (e2 == cudaSuccess) FUZZ_ASSERT(keep == o2.keep && thr == o2.threshold);
  return 0;
}
