// Device curve builder vs build_curves_host: identical offsets, tokens, positions and sorted scores (distinct
// scores and the tie rule: score descending, position ascending); cumulative within 1e-6 absolute (documented:
// at most 1 float ulp); zero-mass rows; protect policies; more segments than one CUB call takes; status flags
// and argument validation.
#include <doctest/doctest.h>

#include <prefixkv/curve/curve.cuh>
#include <prefixkv/core/launch.cuh>
#include <prefixkv/score/score.cuh>

#include "support/gpu_harness.cuh"
#include "support/test_random.hpp"

#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

using namespace prefixkv_test;
namespace pk = prefixkv;

namespace {

enum class dist { distinct, ties, zeros, tiny };

struct curve_case {
  std::vector<int64_t> lengths;
  pk::protect_policy protect{};
  dist d = dist::distinct;
  bool uniform = false;
  bool with_sorted = true;
  int64_t extra_capacity = 0;
};

constexpr pk::curve_sort kMethods[] = {pk::curve_sort::automatic, pk::curve_sort::block, pk::curve_sort::radix,
                                       pk::curve_sort::segmented};

//! Whether `build_curves` must accept curve_sort::block for these rows (the host-provable rule).
bool block_allowed(const curve_case& c, int64_t capacity) {
  if (capacity <= pk::curve_block_capacity) return true;
  return c.uniform && !c.lengths.empty() && pk::candidate_count(c.lengths[0], c.protect) <= pk::curve_block_capacity;
}

void run_curve_case_with(std::mt19937_64& rng, const curve_case& c, pk::curve_sort method, int64_t max_row = -1) {
  const int64_t S = int64_t(c.lengths.size());
  INFO("S ", S, " sinks ", c.protect.sinks, " recent ", c.protect.recent, " dist ", int(c.d), " uniform ", c.uniform,
       " method ", int(method));
  // rows with gaps (begins + lengths), or uniform
  std::vector<int64_t> begins(S);
  int64_t off = 0;
  for (int64_t s = 0; s < S; ++s) {
    begins[s] = off;
    off += c.lengths[s] + (c.uniform ? 0 : int64_t(rng() % 3));
  }
  std::vector<float> scores(size_t(off + 1));
  std::uniform_real_distribution<float> u(0.f, 10.f);
  for (auto& x : scores) {
    if (c.d == dist::distinct) x = u(rng);
    if (c.d == dist::ties) x = float(rng() % 4) * 0.5f;
    if (c.d == dist::zeros) x = (rng() % 2) ? 0.0f : -0.0f;
    if (c.d == dist::tiny) x = std::exp(std::normal_distribution<float>(-8.f, 3.f)(rng));  // attention-like magnitudes
  }
  if (c.d == dist::distinct) {  // make every score distinct (the random draws almost surely are; enforce it)
    for (size_t i = 0; i < scores.size(); ++i) scores[i] = float(i) * 1e-3f + std::floor(u(rng)) * 100.f;
  }
  device_buffer<float> dscores(scores);
  device_buffer<int64_t> dbeg(begins), dlen(c.lengths);
  const auto hrows = c.uniform ? pk::make_uniform_segments(S, S ? c.lengths[0] : 0) : pk::make_ragged_segments(S, begins.data(), c.lengths.data());
  const auto drows = c.uniform ? hrows : pk::make_ragged_segments(S, dbeg.get(), dlen.get());
  pk::curve_buffers host;
  REQUIRE(pk::build_curves_host(scores.data(), hrows, c.protect, host) == cudaSuccess);
  const int64_t total = host.offsets.back();
  const int64_t capacity = total + c.extra_capacity;
  device_buffer<int64_t> offsets(size_t(S + 1)), tokens(size_t(S ? S : 1));
  device_buffer<int32_t> positions(size_t(capacity ? capacity : 1));
  device_buffer<float> cumulative(size_t(capacity ? capacity : 1)), sorted(size_t(capacity ? capacity : 1));
  device_buffer<unsigned> status(1);
  pk::curve_device_out out{offsets.get(), tokens.get(), positions.get(), cumulative.get(), c.with_sorted ? sorted.get() : nullptr};
  pk::curve_set set;
  if (method == pk::curve_sort::block && !block_allowed(c, capacity)) {
    size_t bytes = 0;
    CHECK(pk::build_curves(nullptr, bytes, dscores.get(), drows, c.protect, capacity, out, set, pk::curve_options{method}, status.get(), 0) ==
          cudaErrorInvalidValue);
    CHECK(pk::last_error().why == pk::reason::bad_parameter);
    return;
  }
  run_three_ways(
      [&](void* t, size_t& bytes, cudaStream_t s) {
        return pk::build_curves(t, bytes, dscores.get(), drows, c.protect, capacity, out, set, pk::curve_options{method, max_row}, status.get(), s);
      },
      [&] {
        offsets.poison();
        tokens.poison();
        positions.poison();
        cumulative.poison();
        sorted.poison();
        PKV_CUDA_CHECK(cudaMemset(status.get(), 0, 4));
      },
      [&](const char* mode) {
        INFO("mode ", mode);
        CHECK(status.download()[0] == 0u);
        CHECK(set.count == S);
        CHECK(set.offsets == offsets.get());
        CHECK(set.positions == positions.get());
        CHECK(set.cumulative == cumulative.get());
        CHECK(set.protect.sinks == c.protect.sinks);
        auto go = offsets.download();
        auto gt = tokens.download();
        CHECK(std::vector<int64_t>(go.begin(), go.begin() + S + 1) == host.offsets);
        if (S) CHECK(std::vector<int64_t>(gt.begin(), gt.begin() + S) == host.tokens);
        auto gp = positions.download();
        auto gc = cumulative.download();
        std::vector<float> gs(static_cast<size_t>(total));
        if (total) {
          PKV_CUDA_CHECK(cudaMemcpy(gs.data(), set.sorted_scores, size_t(total) * 4, cudaMemcpyDeviceToHost));
        }
        int bad = 0;
        for (int64_t i = 0; i < total; ++i) {
          const bool ok = gp[i] == host.positions[i] && gs[i] == host.sorted_scores[i] &&
                          std::memcmp(&gc[i], &host.cumulative[i], sizeof(float)) == 0;  // bit-identical
          if (!ok && bad++ < 5)
            FAIL_CHECK("rank ", i, ": pos ", gp[i], "/", host.positions[i], " score ", gs[i], "/", host.sorted_scores[i],
                       " cum ", gc[i], "/", host.cumulative[i]);
        }
        // every non-empty curve ends at exactly 1
        for (int64_t s = 0; s < S; ++s)
          if (host.offsets[s + 1] > host.offsets[s]) CHECK(gc[host.offsets[s + 1] - 1] == 1.0f);
        // ranks beyond the total are untouched
        const float kPoison = poison_value<float>();
        for (int64_t i = total; i < capacity; ++i) CHECK(std::memcmp(&gc[i], &kPoison, 4) == 0);
      });
}

void run_curve_case(std::mt19937_64& rng, const curve_case& c) {
  for (pk::curve_sort m : kMethods) run_curve_case_with(rng, c, m);
  // a host-known bound on the row lengths lets `automatic` take the block path for ragged device rows
  int64_t longest = 0;
  for (int64_t n : c.lengths) longest = std::max(longest, n);
  run_curve_case_with(rng, c, pk::curve_sort::automatic, longest);
}

std::vector<int64_t> random_lengths(std::mt19937_64& rng, int64_t S, int64_t maxlen) {
  std::vector<int64_t> v(S);
  for (auto& x : v) x = int64_t(rng() % (maxlen + 1));
  return v;
}

}  // namespace

TEST_CASE("curves: GPU == host for distinct scores over ragged segments and protect policies") {
  auto rng = make_rng(401);
  for (pk::protect_policy p : {pk::protect_policy{}, pk::protect_policy{0, 0}, pk::protect_policy{2, 3}, pk::protect_policy{64, 16}}) {
    curve_case c;
    c.protect = p;
    c.lengths = random_lengths(rng, 1 + int64_t(rng() % 40), 700);
    c.lengths[0] = 0;
    if (c.lengths.size() > 2) {
      c.lengths[1] = 1;
      c.lengths[2] = 5;
    }
    c.extra_capacity = int64_t(rng() % 100);
    run_curve_case(rng, c);
  }
  curve_case big;  // a few large rows (CUB's large-segment path) and one of size 1
  big.lengths = {quick_mode() ? 9000 : 70000, 1, 33, 4097, quick_mode() ? 2000 : 20000};
  run_curve_case(rng, big);
  curve_case uni;  // uniform rows, sorted scores kept in the workspace
  uni.uniform = true;
  uni.lengths.assign(12, 333);
  uni.with_sorted = false;
  run_curve_case(rng, uni);
  // uniform rows at the block-sort boundary: exactly curve_block_capacity candidates (fills every item slot),
  // one more (block refused, automatic picks the radix sort), and ties among them
  for (int64_t extra : {0, 1}) {
    curve_case edge;
    edge.uniform = true;
    edge.d = extra ? dist::ties : dist::tiny;
    edge.lengths.assign(quick_mode() ? 2 : 5, pk::curve_block_capacity + 5 + extra);
    run_curve_case(rng, edge);
  }
}

TEST_CASE("curves: ties keep ascending positions; zero-mass rows; -0 == +0") {
  auto rng = make_rng(402);
  curve_case t;
  t.d = dist::ties;
  t.lengths = random_lengths(rng, 30, 3000);
  run_curve_case(rng, t);
  curve_case z;
  z.d = dist::zeros;
  z.lengths = random_lengths(rng, 10, 200);
  run_curve_case(rng, z);
}

TEST_CASE("curves: attention-like magnitudes (1e-8 .. 1), cu_seqlens rows, exact capacity") {
  auto rng = make_rng(404);
  curve_case c;
  c.d = dist::tiny;
  c.lengths = {700, 411, 700, 411, 700, 411};
  c.uniform = false;
  run_curve_case(rng, c);
  c.lengths = random_lengths(rng, 50, 5000);
  run_curve_case(rng, c);
}

TEST_CASE("curves: more segments than one sort call takes (chunked, still no host sync)") {
  auto rng = make_rng(403);
  curve_case c;
  c.lengths = random_lengths(rng, 777, 90);
  run_curve_case(rng, c);
  curve_case d;
  d.d = dist::ties;
  d.lengths = random_lengths(rng, 513, 40);
  run_curve_case(rng, d);
}

TEST_CASE("curves: NaN, negative scores, capacity and bad arguments") {
  std::vector<float> scores(64, 1.0f);
  scores[10] = NAN;
  scores[40] = -2.0f;
  std::vector<float> sink_nan(64, 1.0f);  // bad values only in protected positions (a sink, the recent token)
  sink_nan[32] = INFINITY;
  sink_nan[63] = -1.0f;
  device_buffer<float> d(scores), dsink(sink_nan);
  device_buffer<int64_t> offsets(3), tokens(2);
  device_buffer<int32_t> pos(64);
  device_buffer<float> cum(64);
  device_buffer<unsigned> status(1);
  pk::curve_device_out out{offsets.get(), tokens.get(), pos.get(), cum.get(), nullptr};
  pk::curve_set set;
  for (pk::curve_sort m : kMethods) {
    INFO("method ", int(m));
    for (const float* src : {d.get(), dsink.get()}) {
      run_three_ways(
          [&](void* t, size_t& bytes, cudaStream_t s) {
            return pk::build_curves(t, bytes, src, pk::make_uniform_segments(2, 32), {}, 64, out, set, pk::curve_options{m}, status.get(), s);
          },
          [&] { PKV_CUDA_CHECK(cudaMemset(status.get(), 0, 4)); },
          [&](const char*) { CHECK(status.download()[0] == unsigned(pk::status_nonfinite | pk::status_negative)); });
    }
  }
  // device-side lengths beyond the capacity: flagged, curves emptied, nothing written past capacity
  std::vector<int64_t> cu = {0, 30, 64};
  device_buffer<int64_t> dcu(cu);
  std::vector<float> ok(64, 1.0f);
  device_buffer<float> dok(ok);
  for (pk::curve_sort m : kMethods) {
    INFO("method ", int(m));
    run_three_ways(
        [&](void* t, size_t& bytes, cudaStream_t s) {
          return pk::build_curves(t, bytes, dok.get(), pk::make_offset_segments(2, dcu.get()), {}, 20, out, set, pk::curve_options{m}, status.get(), s);
        },
        [&] {
          PKV_CUDA_CHECK(cudaMemset(status.get(), 0, 4));
          cum.poison();
        },
        [&](const char*) {
          unsigned bits = 0;
          CHECK(pk::read_status(status.get(), bits) == cudaErrorInvalidValue);
          CHECK(pk::last_error().why == pk::reason::capacity_exceeded);
          CHECK(offsets.download() == std::vector<int64_t>{0, 0, 0});
          const auto gc = cum.download();  // nothing written at all (in particular not past the capacity)
          const float kPoison = poison_value<float>();
          for (float x : gc) CHECK(std::memcmp(&x, &kPoison, 4) == 0);
        });
  }
  size_t bytes = 0;
  CHECK(pk::build_curves(nullptr, bytes, d.get(), pk::make_uniform_segments(2, 32), {}, 10, out, set) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::capacity_exceeded);
  CHECK(pk::build_curves(nullptr, bytes, d.get(), pk::make_uniform_segments(2, 32), pk::protect_policy{-1, 0}, 64, out, set) ==
        cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::bad_parameter);
  CHECK(pk::build_curves(nullptr, bytes, d.get(), pk::make_uniform_segments(2, 32), {}, -1, out, set) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::negative_extent);
  pk::curve_device_out nul = out;
  nul.positions = nullptr;
  CHECK(pk::build_curves(nullptr, bytes, d.get(), pk::make_uniform_segments(2, 32), {}, 64, nul, set) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::null_pointer);
  CHECK(pk::build_curves(nullptr, bytes, d.get(), pk::make_uniform_segments(2, 32, 16), {}, 64, out, set) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::overlapping_strides);
  // block sort refused when a segment might not fit one block (uniform rows too long)
  CHECK(pk::build_curves(nullptr, bytes, d.get(), pk::make_uniform_segments(1, 5000), {}, 5000, out, set,
                         pk::curve_options{pk::curve_sort::block}, nullptr, 0) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::bad_parameter);
  // ... and accepted for ragged device rows when the caller bounds the rows by a length that fits one block
  const int64_t begins_len[2] = {0, 0};
  const auto ragged = pk::make_ragged_segments(1, begins_len, begins_len + 1);
  CHECK(pk::build_curves(nullptr, bytes, d.get(), ragged, {}, 5000, out, set,
                         pk::curve_options{pk::curve_sort::block, 4000}, nullptr, 0) == cudaSuccess);
  CHECK(pk::build_curves(nullptr, bytes, d.get(), ragged, {}, 5000, out, set,
                         pk::curve_options{pk::curve_sort::block, 5000}, nullptr, 0) == cudaErrorInvalidValue);
}

TEST_CASE("curves: a negative score anywhere is rejected like the host twin (flag + every curve empty); -0.0 is 0") {
  // two uniform rows of 32 tokens, default protection (4 sinks, 1 recent); one negative score per variant, in a
  // candidate of row 0 or 1, in a sink or in the recent token; -5 must never rank like 5
  const int64_t S = 2, n = 32, total = S * n;
  device_buffer<int64_t> offsets(S + 1), tokens(S);
  device_buffer<int32_t> pos(total);
  device_buffer<float> cum(total);
  device_buffer<unsigned> status(1);
  pk::curve_device_out out{offsets.get(), tokens.get(), pos.get(), cum.get(), nullptr};
  pk::curve_set set;
  const auto rows = pk::make_uniform_segments(S, n);
  for (pk::curve_sort m : kMethods) {
    const std::vector<int> where = tiny_mode() ? std::vector<int>{10, 63} : std::vector<int>{10, 40, 1, 31, 63};
    for (int at : where) {
      INFO("method ", int(m), " negative at ", at);
      std::vector<float> scores(total);
      for (int64_t i = 0; i < total; ++i) scores[i] = 1.0f + float(i % 7);
      scores[at] = -5.0f;
      pk::curve_buffers hc;
      CHECK(pk::build_curves_host(scores.data(), rows, {}, hc) == cudaErrorInvalidValue);
      CHECK(pk::last_error().why == pk::reason::negative_input);
      device_buffer<float> d(scores);
      for (unsigned* st : {status.get(), static_cast<unsigned*>(nullptr)}) {
        run_three_ways(
            [&](void* t, size_t& bytes, cudaStream_t s) {
              return pk::build_curves(t, bytes, d.get(), rows, {}, total, out, set, pk::curve_options{m}, st, s);
            },
            [&] {
              offsets.poison();
              PKV_CUDA_CHECK(cudaMemset(status.get(), 0, 4));
            },
            [&](const char* mode) {
              INFO("mode ", mode, st ? " with status" : " without status");
              if (st) {
                CHECK(status.download()[0] == unsigned(pk::status_negative));
                unsigned bits = 0;
                CHECK(pk::read_status(status.get(), bits) == cudaErrorInvalidValue);
                CHECK(pk::last_error().why == pk::reason::negative_input);
              }
              CHECK(offsets.download() == std::vector<int64_t>(S + 1, 0));  // no ranking at all
            });
      }
    }
    // -0.0 is a valid score equal to 0: accepted, same curves as the host twin, ranked as +0
    std::vector<float> z(total);
    for (int64_t i = 0; i < total; ++i) z[i] = (i % 3 == 0) ? -0.0f : float(i % 5);
    pk::curve_buffers hz;
    REQUIRE(pk::build_curves_host(z.data(), rows, {}, hz) == cudaSuccess);
    device_buffer<float> dz(z);
    device_buffer<float> sorted(total);
    pk::curve_device_out outz = out;
    outz.sorted_scores = sorted.get();
    run_three_ways(
        [&](void* t, size_t& bytes, cudaStream_t s) {
          return pk::build_curves(t, bytes, dz.get(), rows, {}, total, outz, set, pk::curve_options{m}, status.get(), s);
        },
        [&] {
          offsets.poison();
          pos.poison();
          sorted.poison();
          PKV_CUDA_CHECK(cudaMemset(status.get(), 0, 4));
        },
        [&](const char* mode) {
          INFO("method ", int(m), " -0.0, mode ", mode);
          CHECK(status.download()[0] == 0u);
          CHECK(offsets.download() == hz.offsets);
          const auto gp = pos.download();
          const auto gs = sorted.download();
          const int64_t c = hz.offsets.back();
          CHECK(std::vector<int32_t>(gp.begin(), gp.begin() + c) == hz.positions);
          for (int64_t i = 0; i < c; ++i) {
            uint32_t a = 0, b = 0;
            std::memcpy(&a, &gs[i], 4);
            std::memcpy(&b, &hz.sorted_scores[i], 4);
            CHECK(a == b);  // both +0 (no sign bit) where the score was -0.0
          }
        });
  }
  // every token protected (no candidate, capacity 0): a negative score is still flagged
  std::vector<float> p(total, 1.0f);
  p[7] = -1.0f;
  device_buffer<float> dp(p);
  pk::curve_buffers hp;
  CHECK(pk::build_curves_host(p.data(), rows, pk::protect_policy{40, 0}, hp) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::negative_input);
  run_three_ways(
      [&](void* t, size_t& bytes, cudaStream_t s) {
        return pk::build_curves(t, bytes, dp.get(), rows, pk::protect_policy{40, 0}, 0, out, set, status.get(), s);
      },
      [&] { PKV_CUDA_CHECK(cudaMemset(status.get(), 0, 4)); },
      [&](const char*) { CHECK(status.download()[0] == unsigned(pk::status_negative)); });
}
