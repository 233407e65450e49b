// Header hygiene: this translation unit and test_views_gpu.cu both include the whole device API, and the test
// binary links them together, so any non-inline function or non-template kernel defined in a header shows up
// here as a "multiple definition" link error. It also checks that the umbrella is self-sufficient.
#include <prefixkv/prefixkv.cuh>

#include <doctest/doctest.h>

TEST_CASE("the device umbrella header links into several translation units") {
  size_t bytes = 0;
  prefixkv::curve_set empty;
  // A size query of each stage's entry point with empty inputs succeeds and touches no memory.
  CHECK(prefixkv::solve(nullptr, bytes, empty, 1, nullptr, prefixkv::budget_keep_candidates(0), prefixkv::keep_bounds{},
                        nullptr) == cudaSuccess);
  CHECK(bytes > 0);
  CHECK(PREFIXKV_VERSION == 100);
}
