// score -> curve -> solve -> kept indices on the device, in one stream, with no host sync: the whole chain is
// run plainly and captured into a CUDA graph (run_three_ways; a host sync inside would break the capture).
// Each stage is checked against its host twin applied to the device's previous stage output (so the check is
// exact where the twins are exact: positions, keep counts, indices), and the device scores against the host
// scorer within the documented tolerance.
#include <doctest/doctest.h>

#include <prefixkv/curve/curve.cuh>
#include <prefixkv/prefixkv.cuh>
#include <prefixkv/score/score.cuh>
#include <prefixkv/select/select.cuh>
#include <prefixkv/select/select.hpp>
#include <prefixkv/solve/solve.cuh>
#include <prefixkv/solve/solve.hpp>

#include "support/gpu_harness.cuh"
#include "support/test_random.hpp"

#include <cmath>
#include <vector>

using namespace prefixkv_test;
namespace pk = prefixkv;

TEST_CASE("pipeline: window scores -> curves -> solve -> kept indices, device-only, graph-capturable") {
  auto rng = make_rng(501);
  const int64_t layers = 3, B = 2, Hk = 2, G = 4, Hq = Hk * G, D = 128, w = 16, cap = 700;
  const std::vector<int64_t> n = {cap, 411};  // ragged batch
  std::vector<pk::bf16> qh(static_cast<size_t>(layers * B * Hq * w * D)), kh(static_cast<size_t>(layers * B * Hk * cap * D));
  for (auto& x : qh) x = pk::bf16::from_float(float(int64_t(rng() % 2001) - 1000) / 500.f);
  for (auto& x : kh) x = pk::bf16::from_float(float(int64_t(rng() % 2001) - 1000) / 500.f);
  device_buffer<pk::bf16> dq(qh), dk(kh);
  const pk::segment_grid grid{layers, B, 1};
  const int64_t S = grid.count();
  std::vector<int64_t> cu(S + 1, 0);
  for (int64_t id = 0; id < S; ++id) cu[id + 1] = cu[id] + n[grid.batch_of(id)];
  const int64_t total = cu.back();
  device_buffer<int64_t> dcu(cu);
  const auto drows = pk::make_offset_segments(S, dcu.get());
  auto qv = [&](const pk::bf16* base, int64_t l) { return pk::make_kv_view_bhsd<const pk::bf16>(base + l * B * Hq * w * D, B, Hq, w, D); };
  auto kv = [&](const pk::bf16* base, int64_t l) { return pk::make_kv_view_bhsd<const pk::bf16>(base + l * B * Hk * cap * D, B, Hk, cap, D); };
  const pk::protect_policy protect{4, 1};
  const auto budget = pk::budget_evict_ratio(0.6);

  device_buffer<float> scores(static_cast<size_t>(total));
  device_buffer<int64_t> c_off(static_cast<size_t>(S + 1)), c_tok(static_cast<size_t>(S)), keep(static_cast<size_t>(S)), sel_off(static_cast<size_t>(S + 1));
  device_buffer<int32_t> c_pos(static_cast<size_t>(total)), sel_idx(static_cast<size_t>(total)), solve_status(1), sel_status(1);
  device_buffer<float> c_cum(static_cast<size_t>(total)), c_sorted(static_cast<size_t>(total));
  device_buffer<unsigned> status(1);
  pk::curve_set curves;
  bool full_chain = true;  // false: score + curves only (isolates the curve stage)

  // The whole chain as one CUB-style op: one workspace carved for the stages.
  auto chain = [&](void* d_temp, size_t& temp_bytes, cudaStream_t s) -> cudaError_t {
    size_t b_score = 0, b_curve = 0, b_solve = 0, b_sel = 0;
    for (int64_t l = 0; l < layers; ++l) {
      size_t b = 0;
      PREFIXKV_TRY(pk::window_attention(nullptr, b, qv(dq.get(), l), kv(dk.get(), l), {}, {}, grid, l, drows, scores.get(), status.get(), s));
      b_score = b > b_score ? b : b_score;
    }
    pk::curve_device_out out{c_off.get(), c_tok.get(), c_pos.get(), c_cum.get(), c_sorted.get()};
    PREFIXKV_TRY(pk::build_curves(nullptr, b_curve, scores.get(), drows, protect, total, out, curves, status.get(), s));
    PREFIXKV_TRY(pk::solve(nullptr, b_solve, curves, 1, nullptr, budget, {}, keep.get(), nullptr, solve_status.get(), s));
    PREFIXKV_TRY(pk::write_selection(nullptr, b_sel, curves, keep.get(), sel_off.get(), sel_idx.get(), total, sel_status.get(), s));
    pk::workspace_layout<4> ws;
    ws.reserve_bytes(0, b_score);
    ws.reserve_bytes(1, b_curve);
    ws.reserve_bytes(2, b_solve);
    ws.reserve_bytes(3, b_sel);
    if (d_temp == nullptr) {
      temp_bytes = ws.bytes();
      return cudaSuccess;
    }
    PREFIXKV_TRY(ws.map(d_temp, temp_bytes));
    for (int64_t l = 0; l < layers; ++l)
      PREFIXKV_TRY(pk::window_attention(ws.get<void>(0), b_score, qv(dq.get(), l), kv(dk.get(), l), {}, {}, grid, l, drows,
                                        scores.get(), status.get(), s));
    PREFIXKV_TRY(pk::build_curves(ws.get<void>(1), b_curve, scores.get(), drows, protect, total, out, curves, status.get(), s));
    if (!full_chain) return cudaSuccess;
    PREFIXKV_TRY(pk::solve(ws.get<void>(2), b_solve, curves, 1, nullptr, budget, {}, keep.get(), nullptr, solve_status.get(), s));
    return pk::write_selection(ws.get<void>(3), b_sel, curves, keep.get(), sel_off.get(), sel_idx.get(), total,
                               sel_status.get(), s);
  };

  // Host scores (twin) for the tolerance check.
  std::vector<float> host_scores(static_cast<size_t>(total));
  const auto hrows = pk::make_offset_segments(S, cu.data());
  for (int64_t l = 0; l < layers; ++l)
    REQUIRE(pk::window_attention_host(qv(qh.data(), l), kv(kh.data(), l), {}, {}, grid, l, hrows, host_scores.data()) == cudaSuccess);

  for (bool full : {false, true}) {
  full_chain = full;
  INFO("full chain ", full);
  run_three_ways(chain,
                 [&] {
                   scores.poison();
                   c_off.poison();
                   c_pos.poison();
                   c_cum.poison();
                   keep.poison();
                   sel_off.poison();
                   sel_idx.poison();
                   PKV_CUDA_CHECK(cudaMemset(status.get(), 0, 4));
                   PKV_CUDA_CHECK(cudaMemset(solve_status.get(), 0, 4));
                   PKV_CUDA_CHECK(cudaMemset(sel_status.get(), 0, 4));
                 },
                 [&](const char* mode) {
                   INFO("mode ", mode);
                   CHECK(status.download()[0] == 0u);
                   CHECK(solve_status.download()[0] == 0);
                   CHECK(sel_status.download()[0] == 0);
                   // 1. scores ~ host scorer
                   const auto gs = scores.download();
                   int bad = 0;
                   for (int64_t i = 0; i < total; ++i)
                     bad += !(std::fabs(gs[i] - host_scores[i]) <= 2e-4f * std::fabs(host_scores[i]) + 1e-6f);
                   CHECK(bad == 0);
                   // 2. curves == host curves of the device scores
                   pk::curve_buffers hc;
                   REQUIRE(pk::build_curves_host(gs.data(), hrows, protect, hc) == cudaSuccess);
                   CHECK(c_off.download() == hc.offsets);
                   // Outputs are sized by the capacity (total tokens); the curves fill the first
                   // hc.offsets.back() (total candidates) entries.
                   const size_t ncand = static_cast<size_t>(hc.offsets.back());
                   auto gp = c_pos.download();
                   auto gsorted = c_sorted.download();
                   gp.resize(ncand);
                   gsorted.resize(ncand);
                   CHECK(gp == hc.positions);
                   CHECK(gsorted == hc.sorted_scores);
                   {
                     int64_t unwritten = 0, first_bad = -1;
                     for (size_t i = 0; i < gp.size(); ++i) {
                       unwritten += gp[i] < 0 || gp[i] >= 700;  // a rank left unwritten
                       if (first_bad < 0 && (gp[i] != hc.positions[i] || gsorted[i] != hc.sorted_scores[i])) first_bad = int64_t(i);
                     }
                     if (first_bad >= 0) {
                       int64_t seg = 0;
                       while (hc.offsets[seg + 1] <= first_bad) ++seg;
                       MESSAGE("first mismatch at rank ", first_bad, " (segment ", seg, ", r ", first_bad - hc.offsets[seg],
                               " of ", hc.offsets[seg + 1] - hc.offsets[seg], "): device pos ", gp[first_bad], " score ",
                               gsorted[first_bad], " | host pos ", hc.positions[first_bad], " score ",
                               hc.sorted_scores[first_bad], "; positions outside [0, 700): ", unwritten);
                     }
                   }
                   auto gc = c_cum.download();
                   gc.resize(ncand);
                   int badc = 0;
                   for (size_t i = 0; i < gc.size(); ++i) badc += !(std::fabs(gc[i] - hc.cumulative[i]) <= 1e-6f);
                   CHECK(badc == 0);
                   if (!full_chain) return;
                   // 3. keep counts == host solve on the device curves (exact)
                   pk::curve_buffers dc = hc;
                   dc.cumulative = gc;
                   std::vector<int64_t> hkeep(static_cast<size_t>(S));
                   REQUIRE(pk::solve_host(dc.view(), 1, nullptr, budget, {}, hkeep.data()) == cudaSuccess);
                   const auto gk = keep.download();
                   CHECK(gk == hkeep);
                   int64_t kept = 0;
                   for (auto x : gk) kept += x;
                   CHECK(kept == total - int64_t(std::llround(0.6 * double(total))));
                   // 4. kept indices == host selection
                   std::vector<int64_t> hoff(static_cast<size_t>(S + 1));
                   std::vector<int32_t> hidx(static_cast<size_t>(total));
                   REQUIRE(pk::write_selection_host(dc.view(), hkeep.data(), hoff.data(), hidx.data(), total) == cudaSuccess);
                   CHECK(sel_off.download() == hoff);
                   const auto gi = sel_idx.download();
                   CHECK(std::vector<int32_t>(gi.begin(), gi.begin() + hoff.back()) ==
                         std::vector<int32_t>(hidx.begin(), hidx.begin() + hoff.back()));
                 });
  }
}

TEST_CASE("pipeline: a negative score empties the curves; the device solver then keeps every token and says why") {
  // 3 segments of 40 tokens, one negative score in segment 1: the builder flags it and empties every curve, the
  // solver reports shape_mismatch for the problem and keeps all tokens — never a ranking with the sign lost
  const int64_t S = 3, n = 40, total = S * n;
  std::vector<float> x(total);
  for (int64_t i = 0; i < total; ++i) x[i] = float((i * 37) % 11);
  x[n + 17] = -5.0f;
  device_buffer<float> dx(x);
  device_buffer<int64_t> offsets(S + 1), tokens(S), keep(S);
  device_buffer<int32_t> pos(total), solve_status(1);
  device_buffer<float> cum(total);
  device_buffer<unsigned> status(1);
  const pk::curve_device_out out{offsets.get(), tokens.get(), pos.get(), cum.get(), nullptr};
  pk::curve_set curves;
  for (unsigned* st : {status.get(), static_cast<unsigned*>(nullptr)}) {
    run_three_ways(
        [&](void* t, size_t& bytes, cudaStream_t s) -> cudaError_t {
          size_t b_curve = 0, b_solve = 0;
          PREFIXKV_TRY(pk::build_curves(nullptr, b_curve, dx.get(), pk::make_uniform_segments(S, n), {}, total, out, curves, st, s));
          PREFIXKV_TRY(pk::solve(nullptr, b_solve, curves, 1, nullptr, pk::budget_evict_ratio(0.5), {}, keep.get(), nullptr,
                                 solve_status.get(), s));
          pk::workspace_layout<2> ws;
          ws.reserve_bytes(0, b_curve);
          ws.reserve_bytes(1, b_solve);
          if (t == nullptr) {
            bytes = ws.bytes();
            return cudaSuccess;
          }
          PREFIXKV_TRY(ws.map(t, bytes));
          PREFIXKV_TRY(pk::build_curves(ws.get<void>(0), b_curve, dx.get(), pk::make_uniform_segments(S, n), {}, total, out,
                                        curves, st, s));
          return pk::solve(ws.get<void>(1), b_solve, curves, 1, nullptr, pk::budget_evict_ratio(0.5), {}, keep.get(), nullptr,
                           solve_status.get(), s);
        },
        [&] {
          keep.poison();
          PKV_CUDA_CHECK(cudaMemset(status.get(), 0, 4));
          PKV_CUDA_CHECK(cudaMemset(solve_status.get(), 0, 4));
        },
        [&](const char* mode) {
          INFO("mode ", mode, st ? " with status" : " without status");
          if (st) CHECK(status.download()[0] == unsigned(pk::status_negative));
          CHECK(offsets.download() == std::vector<int64_t>(S + 1, 0));
          CHECK(solve_status.download()[0] == int32_t(pk::reason::shape_mismatch));
          CHECK(keep.download() == std::vector<int64_t>(S, n));
        });
  }
}
