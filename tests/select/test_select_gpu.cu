// Device selection writer == host selection writer, on solver outputs of ragged batches (and long segments
// that span several bitmap tiles); poisoned outputs, run_three_ways.
#include <doctest/doctest.h>

#include <prefixkv/select/select.cuh>
#include <prefixkv/solve/solve.hpp>

#include "solve/solve_oracle.hpp"
#include "support/gpu_harness.cuh"
#include "support/test_random.hpp"

#include <vector>

using namespace prefixkv_test;
namespace pk = prefixkv;

namespace {

void check_selection(const std::vector<int64_t>& rows, const std::vector<float>& scores, pk::protect_policy prot,
                     double ratio, std::mt19937_64& rng) {
  const int64_t S = int64_t(rows.size()) - 1;
  pk::curve_buffers c;
  REQUIRE(pk::build_curves_host(scores.data(), pk::make_offset_segments(S, rows.data()), prot, c) == cudaSuccess);
  std::vector<int64_t> keep;
  if (pk::solve_host(c.view(), pk::budget_evict_ratio(ratio), {}, keep) != cudaSuccess) {
    // infeasible ratio: keep a random prefix instead
    keep.resize(S);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t n = c.tokens[s], cc = c.offsets[s + 1] - c.offsets[s];
      keep[s] = (n - cc) + (cc ? int64_t(rng() % (cc + 1)) : 0);
    }
  }
  pk::selection_buffers want;
  REQUIRE(pk::write_selection_host(c.view(), keep.data(), want) == cudaSuccess);
  const int64_t total = rows[S], slack = 37;

  device_buffer<int64_t> doff(c.offsets), dtok(c.tokens), dkeep(keep), out_off(S + 1);
  // Non-null even when no segment has a candidate (the API takes no null arrays; see solve.cuh).
  std::vector<int32_t> pos = c.positions;
  if (pos.empty()) pos.push_back(0);
  device_buffer<int32_t> dpos(pos), out_idx(total + slack), status(1);
  std::vector<float> cum = c.cumulative;
  device_buffer<float> dcum(cum);
  pk::curve_set cv = c.view();
  cv.offsets = doff.get();
  cv.tokens = dtok.get();
  cv.positions = dpos.get();
  cv.cumulative = dcum.get();
  cv.sorted_scores = nullptr;
  INFO("S ", S, " total ", total);
  run_three_ways(
      [&](void* t, size_t& bytes, cudaStream_t st) {
        return pk::write_selection(t, bytes, cv, dkeep.get(), out_off.get(), out_idx.get(), total + slack,
                                   status.get(), st);
      },
      [&] {
        out_off.poison();
        out_idx.poison();
        status.poison();
      },
      [&](const char* mode) {
        INFO("mode ", mode);
        CHECK(out_off.download() == want.offsets);
        auto idx = out_idx.download();
        const int64_t kept = want.offsets[S];
        for (int64_t i = kept; i < int64_t(idx.size()); ++i) REQUIRE(idx[i] == poison_value<int32_t>());
        idx.resize(kept);
        CHECK(idx == want.indices);
        CHECK(status.download()[0] == 0);
      });
}

}  // namespace

TEST_CASE("device selection == host selection on ragged batches") {
  auto rng = make_rng(501);
  for (int rep = 0; rep < 6; ++rep) {
    const int64_t S = 1 + rng() % 3000;
    std::vector<int64_t> rows(S + 1, 0);
    for (int64_t s = 0; s < S; ++s) rows[s + 1] = rows[s] + (rng() % 6 == 0 ? int64_t(rng() % 2) : int64_t(rng() % 500));
    std::vector<float> x(rows[S]);
    for (int64_t s = 0; s < S; ++s) fill_row(rng, score_kind::mixed, x.data() + rows[s], rows[s + 1] - rows[s]);
    check_selection(rows, x, pk::protect_policy{int64_t(rng() % 6), int64_t(rng() % 4)},
                    std::uniform_real_distribution<double>(0, 0.7)(rng), rng);
  }
}

TEST_CASE("device selection: segments longer than one bitmap tile") {
  auto rng = make_rng(502);
  std::vector<int64_t> rows = {0, 600001, 600001 + 262144, 600001 + 262144 + 262145};
  std::vector<float> x(rows.back());
  for (int64_t s = 0; s < 3; ++s) fill_row(rng, score_kind::uniform, x.data() + rows[s], rows[s + 1] - rows[s]);
  check_selection(rows, x, pk::protect_policy{}, 0.6, rng);
}

TEST_CASE("device selection: capacity and bad keep counts are reported on the device") {
  auto rng = make_rng(503);
  std::vector<int64_t> rows = {0, 50, 120};
  std::vector<float> x(120);
  fill_row(rng, score_kind::uniform, x.data(), 120);
  pk::curve_buffers c;
  REQUIRE(pk::build_curves_host(x.data(), pk::make_offset_segments(2, rows.data()), pk::protect_policy{}, c) ==
          cudaSuccess);
  device_buffer<int64_t> doff(c.offsets), dtok(c.tokens), out_off(3);
  device_buffer<int32_t> dpos(c.positions), out_idx(60), status(1);
  pk::curve_set cv = c.view();
  cv.offsets = doff.get();
  cv.tokens = dtok.get();
  cv.positions = dpos.get();
  cv.cumulative = nullptr;
  cv.sorted_scores = nullptr;
  {  // 50 + 70 > capacity 60: the second segment is not written
    device_buffer<int64_t> keep(std::vector<int64_t>{50, 70});
    run_three_ways(
        [&](void* t, size_t& bytes, cudaStream_t st) {
          return pk::write_selection(t, bytes, cv, keep.get(), out_off.get(), out_idx.get(), 60, status.get(), st);
        },
        [&] {
          out_idx.poison();
          status.poison();
        },
        [&](const char*) {
          CHECK(status.download()[0] == int32_t(pk::reason::capacity_exceeded));
          const auto idx = out_idx.download();
          for (int i = 0; i < 50; ++i) CHECK(idx[i] == i);
          for (int i = 50; i < 60; ++i) CHECK(idx[i] == poison_value<int32_t>());
        });
  }
  {  // keep below the protected count is clamped and reported
    device_buffer<int64_t> keep(std::vector<int64_t>{2, 6});
    run_three_ways(
        [&](void* t, size_t& bytes, cudaStream_t st) {
          return pk::write_selection(t, bytes, cv, keep.get(), out_off.get(), out_idx.get(), 60, status.get(), st);
        },
        [&] { status.poison(); },
        [&](const char*) {
          CHECK(status.download()[0] == int32_t(pk::reason::out_of_range));
          CHECK(out_off.download() == std::vector<int64_t>{0, 5, 11});
        });
  }
  size_t bytes = 0;
  CHECK(pk::write_selection(nullptr, bytes, cv, nullptr, out_off.get(), out_idx.get(), 60) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::null_pointer);
}
