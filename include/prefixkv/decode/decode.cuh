//! \file prefixkv/decode/decode.cuh
//! Decode-time budget upkeep, CUDA backend: `decode_init` and `decode_step` (one call per generated token, every
//! layer and sequence of the batch). Types, the plan, the state and the host backend: decode/decode.hpp; the
//! semantics are written there and both backends keep the same tokens and write the same bytes.
//!
//! A step is one kernel launch (one block per (layer, sequence[, kv head]) segment: commit the new tokens, update
//! the running scores from the observation, select the rows to evict and move rows inside the segment), plus — for
//! the amortised policy on a compressing step — the chain: budgets -> curves -> solve -> selection -> gate ->
//! in-place compaction of the cache and of the running scores -> new lengths. No allocation, no host
//! synchronisation; a step can be captured into a CUDA graph (fixed shapes; see `decode_when` for the amortised
//! policy's two graphs).
//! \code
//! size_t ws = 0;
//! PREFIXKV_TRY(prefixkv::decode_step(nullptr, ws, plan, st, args));    // size query (from the plan alone)
//! cudaMalloc(&d_ws, ws);                                                // once
//! // per generated token, after the forward pass wrote the new K/V rows at rows st.lengths[s]:
//! PREFIXKV_TRY(prefixkv::decode_step(d_ws, ws, plan, st, args, stream));
//! \endcode
#pragma once

#include "decode.hpp"

#include "../compact/compact.cuh"
#include "../core/launch.cuh"
#include "../core/workspace.hpp"
#include "../curve/curve.cuh"
#include "../select/select.cuh"
#include "../solve/solve.cuh"
#include "detail/decode_kernels.cuh"

#include <algorithm>

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

//! Workspace pieces of a step (the amortised policy's chain; the other policies use none).
enum decode_piece_ws : int {
  dw_words = 0, dw_seg_begin, dw_seg_len, dw_bad, dw_counts, dw_poff, dw_solve_status, dw_thr, dw_keep, dw_sel_off,
  dw_curve_off, dw_curve_tokens, dw_positions, dw_cumulative, dw_sorted, dw_indices, dw_stage, dw_count
};

inline void decode_reserve(workspace_layout<dw_count>& ws, const decode_plan& pl, int64_t batch, size_t stage) {
  const int64_t S = pl.segments(batch), P = pl.cfg.rebalance ? batch : S, C = S * pl.cfg.max_tokens;
  ws.reserve<int32_t>(dw_words, decode_st_words);
  ws.reserve<int64_t>(dw_seg_begin, S);
  ws.reserve<int64_t>(dw_seg_len, S);
  ws.reserve<int32_t>(dw_bad, S);
  ws.reserve<int64_t>(dw_counts, P);
  ws.reserve<int64_t>(dw_poff, P + 1);
  ws.reserve<int32_t>(dw_solve_status, P);
  ws.reserve<float>(dw_thr, P);
  ws.reserve<int64_t>(dw_keep, S);
  ws.reserve<int64_t>(dw_sel_off, S + 1);
  ws.reserve<int64_t>(dw_curve_off, S + 1);
  ws.reserve<int64_t>(dw_curve_tokens, S);
  ws.reserve<int32_t>(dw_positions, C);
  ws.reserve<float>(dw_cumulative, C);
  ws.reserve<float>(dw_sorted, C);
  ws.reserve<int32_t>(dw_indices, C);
  ws.reserve_bytes(dw_stage, stage);
}

template <class X>
inline X* decode_fake_ptr() {
  return reinterpret_cast<X*>(static_cast<std::uintptr_t>(1) << 12);
}

//! Largest stage workspace of any chain the plan serves (curves; the solver, the selection and the trusted
//! compaction need the 256-byte minimum).
inline cudaError_t decode_stage_bound(const decode_plan& pl, size_t& bytes) {
  bytes = workspace_alignment;
  const int64_t S = pl.state_segments();
  if (S == 0) return cudaSuccess;
  const segments rows = make_ragged_segments(S, decode_fake_ptr<const int64_t>(), decode_fake_ptr<const int64_t>());
  curve_device_out co{decode_fake_ptr<int64_t>(), decode_fake_ptr<int64_t>(), decode_fake_ptr<int32_t>(),
                      decode_fake_ptr<float>(), decode_fake_ptr<float>()};
  curve_set set;
  size_t b = 0;
  PREFIXKV_TRY(build_curves(nullptr, b, decode_fake_ptr<const float>(), rows, pl.cfg.protect, S * pl.cfg.max_tokens, co,
                            set, nullptr, 0));
  bytes = std::max(bytes, b);
  return cudaSuccess;
}

inline cudaError_t decode_stage_fits(size_t need, size_t have) {
  if (need > have) return fail(reason::workspace_too_small, "decode: a stage needs more workspace than the plan provides");
  return cudaSuccess;
}

//! The amortised policy's compression of every segment of the call (after the step kernel committed the tokens).
template <class Cache>
cudaError_t decode_compress(void* d_temp, size_t temp_bytes, const decode_plan& pl, const decode_state& st,
                            const Cache& cache, const compact_table& table, int64_t batch, int64_t capacity,
                            cudaStream_t stream) {
  const decode_config& c = pl.cfg;
  size_t stage_bytes = 0;
  PREFIXKV_TRY(decode_stage_bound(pl, stage_bytes));
  workspace_layout<dw_count> ws;
  decode_reserve(ws, pl, batch, stage_bytes);
  PREFIXKV_TRY(ws.map(d_temp, temp_bytes));
  decode_chain_args k;
  k.plan = pl;
  k.st = st;
  k.batch = batch;
  k.capacity = capacity;
  k.words = ws.get<int32_t>(dw_words);
  k.seg_begin = ws.get<int64_t>(dw_seg_begin);
  k.seg_len = ws.get<int64_t>(dw_seg_len);
  k.bad = ws.get<int32_t>(dw_bad);
  k.counts = ws.get<int64_t>(dw_counts);
  k.poff = ws.get<int64_t>(dw_poff);
  k.solve_status = ws.get<int32_t>(dw_solve_status);
  k.keep = ws.get<int64_t>(dw_keep);
  k.sel_off = ws.get<int64_t>(dw_sel_off);
  k.table = table;
  const int64_t S = k.segments(), P = k.problems(), C = S * c.max_tokens;
  const segment_grid grid = k.grid();
  void* stage = ws.get<void>(dw_stage);
  const size_t have = ws.size_of(dw_stage);
  PREFIXKV_TRY(check_runtime(cudaMemsetAsync(k.words, 0, decode_st_words * sizeof(int32_t), stream), "decode: memset"));
  decode_chain_prologue_kernel<><<<static_cast<unsigned>((batch + 127) / 128), 128, 0, stream>>>(k);
  PREFIXKV_TRY(check_launch(stream));
  // curves of the running scores
  const segments rows = make_ragged_segments(S, k.seg_begin, k.seg_len);
  curve_device_out co{ws.get<int64_t>(dw_curve_off), ws.get<int64_t>(dw_curve_tokens), ws.get<int32_t>(dw_positions),
                      ws.get<float>(dw_cumulative), ws.get<float>(dw_sorted)};
  curve_set curves;
  unsigned* bits = reinterpret_cast<unsigned*>(k.words + decode_st_bits);
  size_t need = 0;
  PREFIXKV_TRY(build_curves(nullptr, need, st.scores, rows, c.protect, C, co, curves, bits, stream));
  PREFIXKV_TRY(decode_stage_fits(need, have));
  PREFIXKV_TRY(build_curves(stage, need, st.scores, rows, c.protect, C, co, curves, bits, stream));
  // solve: every segment back to its budget (one problem each), or one problem per sequence (rebalance)
  solve_budget budget;
  budget.kind = budget_kind::keep_candidates;
  budget.counts = k.counts;
  need = 0;
  float* thr = ws.get<float>(dw_thr);
  PREFIXKV_TRY(solve(nullptr, need, curves, P, k.poff, budget, keep_bounds{}, k.keep, thr, k.solve_status, stream));
  PREFIXKV_TRY(decode_stage_fits(need, have));
  PREFIXKV_TRY(solve(stage, need, curves, P, k.poff, budget, keep_bounds{}, k.keep, thr, k.solve_status, stream));
  // selection, gate
  int32_t* indices = ws.get<int32_t>(dw_indices);
  need = 0;
  PREFIXKV_TRY(write_selection(nullptr, need, curves, k.keep, k.sel_off, indices, C, k.words + decode_st_select, stream));
  PREFIXKV_TRY(decode_stage_fits(need, have));
  PREFIXKV_TRY(write_selection(stage, need, curves, k.keep, k.sel_off, indices, C, k.words + decode_st_select, stream));
  decode_chain_gate_kernel<><<<1, 256, 0, stream>>>(k);
  PREFIXKV_TRY(check_launch(stream));
  // in-place compaction of the cache and of the running scores (the selection is the solver's own: trusted)
  const selection sel{S, k.sel_off, indices};
  need = 0;
  PREFIXKV_TRY(compact_in_place(nullptr, need, cache, sel, grid, compact_outputs{}, index_check::trusted, stream));
  PREFIXKV_TRY(decode_stage_fits(need, have));
  PREFIXKV_TRY(compact_in_place(stage, need, cache, sel, grid, compact_outputs{}, index_check::trusted, stream));
  std::vector<kv_view<float>> sv;
  decode_score_views(pl, st.scores, batch, sv);
  const kv_layers<float> score_cache{sv.data(), nullptr, nullptr, nullptr, c.layers};
  need = 0;
  PREFIXKV_TRY(compact_in_place(nullptr, need, score_cache, sel, grid, compact_outputs{}, index_check::trusted, stream));
  PREFIXKV_TRY(decode_stage_fits(need, have));
  PREFIXKV_TRY(compact_in_place(stage, need, score_cache, sel, grid, compact_outputs{}, index_check::trusted, stream));
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((S + 255) / 256, 1024));
  decode_chain_finalize_kernel<><<<blocks, 256, 0, stream>>>(k);
  return check_launch(stream);
}

template <class Cache, class P>
cudaError_t decode_step_run(void* d_temp, size_t& temp_bytes, const decode_plan& pl, decode_state& st,
                            const decode_step_args<Cache, P>& a, cudaStream_t stream) {
  if (!pl.valid) return fail(reason::bad_parameter, "decode: the plan was not made by make_plan");
  const bool chain = pl.cfg.policy == decode_policy::amortised;
  size_t stage_bytes = 0;
  if (chain) PREFIXKV_TRY(decode_stage_bound(pl, stage_bytes));
  workspace_layout<dw_count> full;
  if (chain) decode_reserve(full, pl, pl.cfg.max_batch, stage_bytes);
  if (d_temp == nullptr) {  // size query: from the plan alone
    temp_bytes = full.bytes();
    return cudaSuccess;
  }
  PREFIXKV_TRY(full.map(d_temp, temp_bytes));
  decode_kargs k;
  compact_ptrs ptrs;
  int64_t batch = 0, capacity = 0;
  PREFIXKV_TRY(decode_check_step(pl, st, a, k.m, &ptrs, batch, capacity));
  const bool compress_now =
      chain && (a.when == decode_when::now || (a.when == decode_when::automatic && decode_schedule(pl, st, a.appended)));
  k.plan = pl;
  k.st = st;
  k.batch = batch;
  k.capacity = capacity;
  k.appended = a.appended;
  k.active = a.active;
  k.observe = pl.has_scores() ? a.observe : decode_observe::none;
  if (k.observe == decode_observe::attention) {
    const auto& p0 = a.attention[0];
    k.p_tokens = p0.tokens;
    k.p_dim = p0.dim;
    k.p_sb = p0.stride_batch;
    k.p_sh = p0.stride_head;
    k.p_st = p0.stride_token;
    k.p_sd = p0.stride_dim;
    for (int64_t l = 0; l < pl.cfg.layers; ++l) k.p_data[l] = a.attention[l].data;
  }
  if (k.observe == decode_observe::add_scores || k.observe == decode_observe::set_scores) {
    k.obs = a.scores;
    k.obs_stride = a.score_stride;
  }
  const int64_t S = pl.segments(batch);
  if (S > 0) {
    decode_step_kernel<P><<<static_cast<unsigned>(S), decode_threads, 0, stream>>>(k, ptrs);
    PREFIXKV_TRY(check_launch(stream));
    if (compress_now) PREFIXKV_TRY(decode_compress(d_temp, temp_bytes, pl, st, a.cache, k.m.st, batch, capacity, stream));
  }
  return cudaSuccess;
}

}  // namespace detail

//! Start decoding on the device (see `decode_init_host` for the semantics): every state segment's length, tokens
//! seen, budget fraction, fixed row, scores and stamps; `state.status` cleared, `state.pending` = 0. `args`
//! points to device memory. One memset and one kernel; `d_temp` is not used beyond the size query's minimum.
[[nodiscard]] inline cudaError_t decode_init(void* d_temp, size_t& temp_bytes, const decode_plan& plan,
                                             decode_state& state, const decode_init_args& args,
                                             cudaStream_t stream = 0) {
  if (d_temp == nullptr) {
    if (!plan.valid) return detail::fail(reason::bad_parameter, "decode: the plan was not made by make_plan");
    temp_bytes = workspace_alignment;
    return cudaSuccess;
  }
  workspace_layout<1> ws;
  PREFIXKV_TRY(ws.map(d_temp, temp_bytes));
  PREFIXKV_TRY(detail::decode_check_init(plan, state, args));
  PREFIXKV_TRY(detail::check_runtime(cudaMemsetAsync(state.status, 0, sizeof(int32_t), stream), "decode: memset"));
  const int64_t S = plan.state_segments();
  if (S > 0) {
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(S, 65535));
    detail::decode_init_kernel<><<<blocks, detail::decode_threads, 0, stream>>>(plan, state, args);
    PREFIXKV_TRY(detail::check_launch(stream));
  }
  state.pending = 0;
  return cudaSuccess;
}

//! One generated token on the device: commit the appended rows, observe, evict or compress, for every layer and
//! sequence of `args.cache` (see decode.hpp). `d_temp == nullptr`: size query — `temp_bytes` receives the
//! workspace of any step the plan serves (the amortised policy's chain; 256 bytes for the others). Host-visible
//! problems return cudaErrorInvalidValue before anything is enqueued; problems in device data are reported in
//! `state.status`. With `decode_when::automatic` the amortised policy's schedule advances `state.pending` (host).
template <class Cache, class P>
[[nodiscard]] cudaError_t decode_step(void* d_temp, size_t& temp_bytes, const decode_plan& plan, decode_state& state,
                                      const decode_step_args<Cache, P>& args, cudaStream_t stream = 0) {
  return detail::decode_step_run(d_temp, temp_bytes, plan, state, args, stream);
}

PREFIXKV_NAMESPACE_END
