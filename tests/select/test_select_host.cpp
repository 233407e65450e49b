// Host selection writer: exact output on a worked example, validation before any write.
#include <doctest/doctest.h>

#include <prefixkv/select/select.hpp>
#include <prefixkv/solve/solve.hpp>

#include <vector>

namespace pk = prefixkv;

TEST_CASE("selection of a worked example") {
  // one segment of 7 tokens, 1 sink + 1 recent: candidates 1..5 ranked 4 (7), 2 (5), 3 (3), 5 (2), 1 (1)
  std::vector<float> x = {9, 1, 5, 3, 7, 2, 8};
  pk::curve_buffers c;
  REQUIRE(pk::build_curves_host(x.data(), pk::make_uniform_segments(1, 7), pk::protect_policy{1, 1}, c) == cudaSuccess);
  CHECK(c.positions == std::vector<int32_t>{4, 2, 3, 5, 1});
  const std::vector<std::vector<int32_t>> want = {{0, 6}, {0, 4, 6}, {0, 2, 4, 6}, {0, 2, 3, 4, 6},
                                                  {0, 2, 3, 4, 5, 6}, {0, 1, 2, 3, 4, 5, 6}};
  for (int64_t k = 0; k <= 5; ++k) {
    const int64_t keep = 2 + k;
    pk::selection_buffers sel;
    REQUIRE(pk::write_selection_host(c.view(), &keep, sel) == cudaSuccess);
    CHECK(sel.offsets == std::vector<int64_t>{0, keep});
    CHECK(sel.indices == want[k]);
    const pk::selection v = sel.view();
    CHECK(v.count == 1);
    CHECK(v.kept(0) == keep);
  }
}

TEST_CASE("selection: bad input is rejected before anything is written") {
  std::vector<float> x = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  std::vector<int64_t> rows = {0, 4, 10};
  pk::curve_buffers c;
  REQUIRE(pk::build_curves_host(x.data(), pk::make_offset_segments(2, rows.data()), pk::protect_policy{1, 1}, c) ==
          cudaSuccess);
  std::vector<int64_t> off(3, -9);
  std::vector<int32_t> idx(10, -9);
  auto untouched = [&] { return off == std::vector<int64_t>(3, -9) && idx == std::vector<int32_t>(10, -9); };
  std::vector<int64_t> keep = {1, 6};  // below protected (2)
  CHECK(pk::write_selection_host(c.view(), keep.data(), off.data(), idx.data(), 10) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::out_of_range);
  keep = {4, 7};  // above tokens
  CHECK(pk::write_selection_host(c.view(), keep.data(), off.data(), idx.data(), 10) == cudaErrorInvalidValue);
  keep = {4, 6};
  CHECK(pk::write_selection_host(c.view(), keep.data(), off.data(), idx.data(), 9) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::capacity_exceeded);
  auto bad = c;
  bad.positions[0] = 0;  // a protected position among the candidates
  CHECK(pk::write_selection_host(bad.view(), keep.data(), off.data(), idx.data(), 10) == cudaErrorInvalidValue);
  bad = c;
  bad.positions[3] = bad.positions[2];  // repeated
  CHECK(pk::write_selection_host(bad.view(), keep.data(), off.data(), idx.data(), 10) == cudaErrorInvalidValue);
  CHECK(untouched());
  CHECK(pk::write_selection_host(c.view(), keep.data(), off.data(), idx.data(), 10) == cudaSuccess);
  CHECK(off == std::vector<int64_t>{0, 4, 10});
  CHECK(idx == std::vector<int32_t>{0, 1, 2, 3, 0, 1, 2, 3, 4, 5});
}
