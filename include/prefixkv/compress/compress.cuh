//! \file prefixkv/compress/compress.cuh
//! The compressor's CUDA backend: `compress` (all layers) and `compress_layer` (one layer, the paper's serving
//! mode). Types, the plan and the host backend: compress/compress.hpp.
//!
//! One call enqueues, on one stream and without a host synchronisation, the whole chain for every layer and every
//! sequence of a ragged batch: lengths + budgets (one kernel), the scorer, the curves, the solver, the selection,
//! a gate that reads every stage's status, the compaction, and the outputs. Every intermediate lives in the
//! caller's workspace, nothing is allocated, and the call can be captured into a CUDA graph. The workspace size
//! depends only on the plan (its `max_*` sizes) and the cache's element type, so one size query at start-up serves
//! every later call:
//! \code
//! size_t bytes = 0;
//! PREFIXKV_TRY(prefixkv::compress(nullptr, bytes, plan, args));   // size query
//! cudaMalloc(&d_temp, bytes);                                      // once
//! PREFIXKV_TRY(prefixkv::compress(d_temp, bytes, plan, args, stream));
//! // args.out.lengths / cu_seqlens / pages_in_use / status are valid when the stream gets there
//! \endcode
#pragma once

#include "compress.hpp"

#include "../compact/compact.cuh"
#include "../core/launch.cuh"
#include "../core/workspace.hpp"
#include "../curve/curve.cuh"
#include "../score/score.cuh"
#include "../select/block_util.cuh"
#include "../select/select.cuh"
#include "../solve/solve.cuh"

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

// Status words at the start of the workspace (cleared by one memset per call).
inline constexpr int compress_st_chain = 0;    // int32: the chain's reason (gate, then compaction's checks)
inline constexpr int compress_st_prologue = 1; // int32: lengths and budgets
inline constexpr int compress_st_select = 2;   // int32: selection writer
inline constexpr int compress_st_bits = 3;     // unsigned: scorer and curve-builder status bits
inline constexpr int compress_st_compact = 4;  // int32: the compaction's own checks (page ids of paged caches)
inline constexpr int compress_st_words = 8;

//! Everything the small kernels of the chain need (by value).
struct compress_kargs {
  compress_plan plan;
  compress_geometry geo;
  const int32_t* lengths_in = nullptr;  // caller lengths
  bool per_segment = false;
  int64_t heads_in = 1;                 // heads of the caller's per-segment lengths (1 or seg_heads)
  int64_t window[compact_max_layers] = {};  // window queries per layer of the call (window scorer), else 0
  int64_t score_stride = 0;
  bool caller_scores = false;
  int64_t row_stride = 0;       // floats between two rows of the workspace scores
  int32_t* status = nullptr;    // compress_st_words words
  int64_t* seg_begin = nullptr; // (S) sequence-major
  int64_t* seg_len = nullptr;   // (S)
  int64_t* counts = nullptr;    // (problems) kept candidates per problem
  int64_t* poff = nullptr;      // (problems + 1)
  int32_t* solve_status = nullptr;  // (problems)
  float* thr = nullptr;             // (problems)
  int64_t* keep = nullptr;          // (S)
  int64_t* sel_off = nullptr;       // (S + 1)
  int64_t page_size = 0;            // of the cache holding the result (0: strided)
  // paged source: every block a sequence's tokens occupy in a layer must name a page of the pool (per-layer
  // tables; the same pointer for every layer when the layers share one table)
  bool paged = false;
  const int32_t* table[compact_max_layers] = {};
  int64_t table_stride = 0, table_page = 0, table_pages = 0;
  bool whole = true;
  compress_outputs out;

  PREFIXKV_HOST_DEVICE int64_t n_in(int64_t l, int64_t b, int64_t h) const {
    return compress_input_length(lengths_in, per_segment, geo.batch, heads_in, l, b, per_segment ? h : 0);
  }
  PREFIXKV_HOST_DEVICE int64_t problems() const {
    return plan.cfg.alloc == allocation::prefix ? geo.batch : geo.batch * geo.lc;
  }
};

//! Keep the smallest non-zero reason in `word` (0 = none): the chain reports the same reason as the host backend
//! however the threads interleave.
PREFIXKV_DEVICE void compress_report(int32_t* word, reason r) {
  int v = static_cast<int>(r);
  if (v == 0) return;
  int old = *reinterpret_cast<volatile int*>(word);
  while (old == 0 || v < old) {
    const int seen = atomicCAS(reinterpret_cast<int*>(word), old, v);
    if (seen == old) break;
    old = seen;
  }
}

//! One thread per sequence: checks its lengths, writes its segments (rows of the scorers and curves), computes its
//! budgets and its problems' offsets.
template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(128) compress_prologue_kernel(compress_kargs a) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const compress_geometry& g = a.geo;
  const int64_t L = a.plan.cfg.layers, H = g.heads;
  if (b >= g.batch) return;
  const segment_grid grid = g.grid();
  reason why = reason::none;
  for (int64_t l = 0; l < L; ++l)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t n = a.n_in(l, b, h);
      const int64_t li = l - g.l0;
      reason r = reason::none;
      if (li >= 0 && li < g.lc) {
        r = compress_length_reason(n, g.capacity, a.plan.cfg.max_tokens, a.window[li], a.score_stride, a.caller_scores);
        const int64_t s = grid.id(li, b, h);
        const int64_t nn = r == reason::none ? n : 0;  // a bad row is scored as empty (the chain stops anyway)
        a.seg_len[s] = nn;
        a.seg_begin[s] = a.caller_scores ? g.caller_index(l, b, h) * a.score_stride : s * a.row_stride;
      } else if (n < 0 || n > g.capacity) {
        r = reason::out_of_range;
      }
      why = compress_min_reason(why, r);
    }
  // paged caches: the block-table entries are checked by compress_table_check_kernel (spread over the grid)
  // budgets (from every layer's lengths; a bad length makes them meaningless but keeps them in range)
  const bool prefix = a.plan.cfg.alloc == allocation::prefix;
  int64_t local[compact_max_layers];
  const reason rb = sequence_budgets(
      a.plan, [&](int64_t l, int64_t h) {
        const int64_t n = a.n_in(l, b, h);
        return n < 0 ? int64_t(0) : (n > g.capacity ? g.capacity : n);
      },
      local);
  why = compress_min_reason(why, rb);
  if (prefix) {
    a.counts[b] = local[0];
    a.poff[b] = b * g.lc * H;
    if (b == g.batch - 1) a.poff[g.batch] = g.batch * g.lc * H;
  } else {
    for (int64_t li = 0; li < g.lc; ++li) {
      const int64_t p = b * g.lc + li;
      a.counts[p] = local[g.l0 + li];
      a.poff[p] = p * H;
    }
    if (b == g.batch - 1) a.poff[g.batch * g.lc] = g.batch * g.lc * H;
  }
  compress_report(a.status + compress_st_prologue, why);
}

//! Paged caches: every block a sequence's tokens occupy in a layer must name a page of the pool. Grid (x, layers):
//! block (x, l) takes sequences x, x + gridDim.x, ... of layer l; its threads split the sequence's table entries.
//! Reports `out_range` into the prologue's word (the smallest reason wins, as in the prologue).
template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(256) compress_table_check_kernel(compress_kargs a) {
  const compress_geometry& g = a.geo;
  const int64_t l = blockIdx.y, H = g.heads;
  const int32_t* const table = a.table[l];
  bool bad = false;
  for (int64_t b = blockIdx.x; b < g.batch; b += gridDim.x) {
    int64_t nmax = 0;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t n = a.n_in(l, b, h);
      nmax = n > nmax ? (n > g.capacity ? g.capacity : n) : nmax;
    }
    const int64_t blocks = (nmax + a.table_page - 1) / a.table_page;
    for (int64_t blk = threadIdx.x; blk < blocks; blk += blockDim.x) {
      const int32_t page = table[b * a.table_stride + blk];
      bad |= page < 0 || page >= a.table_pages;
    }
  }
  if (bad) compress_report(a.status + compress_st_prologue, reason::out_of_range);
}

//! The recency scorer: score(t) = t + 1.
template <int = 0>
PREFIXKV_KERNEL void compress_recency_kernel(segments rows, float* scores) {
  const int64_t s = blockIdx.y;
  const int64_t n = rows.length(s), base = rows.begin(s);
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < n; t += int64_t(gridDim.x) * blockDim.x)
    scores[base + t] = static_cast<float>(t + 1);
}

//! Reason of the first scorer / curve-builder status bit.
PREFIXKV_HOST_DEVICE reason compress_bits_reason(unsigned bits) {
  if (bits & status_nonfinite) return reason::nonfinite_input;
  if (bits & status_bad_length) return reason::out_of_range;
  if (bits & status_negative) return reason::negative_input;
  if (bits & status_capacity) return reason::capacity_exceeded;
  if (bits & status_bad_page) return reason::out_of_range;
  return bits ? reason::out_of_range : reason::none;
}

//! The gate: the first reason any stage reported (in chain order). On a failure every selection row is emptied, so
//! the compaction that follows moves nothing.
template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(256) compress_gate_kernel(compress_kargs a, int64_t segments) {
  __shared__ int first, best;
  if (threadIdx.x == 0) {
    reason r = static_cast<reason>(a.status[compress_st_prologue]);
    if (r == reason::none) r = compress_bits_reason(static_cast<unsigned>(a.status[compress_st_bits]));
    first = static_cast<int>(r);
    best = INT_MAX;
  }
  __syncthreads();
  if (first == 0) {
    const int64_t P = a.problems();
    int found = INT_MAX;
    for (int64_t p = threadIdx.x; p < P; p += blockDim.x)
      if (a.solve_status[p] != 0 && a.solve_status[p] < found) found = a.solve_status[p];
    if (found != INT_MAX) atomicMin(&best, found);
    __syncthreads();
    if (threadIdx.x == 0) first = best != INT_MAX ? best : a.status[compress_st_select];
    __syncthreads();
  }
  if (first != 0) {
    for (int64_t s = threadIdx.x; s <= segments; s += blockDim.x) a.sel_off[s] = 0;
    if (threadIdx.x == 0) a.status[compress_st_chain] = first;
  }
}

//! Writes one layer's new lengths (and cu_seqlens) for the outputs: new_len(b, h) for the layer's batch x heads
//! segments, in (b, h) order. One block.
template <class NewLen>
PREFIXKV_DEVICE void compress_write_layer_lengths(const compress_outputs& out, int64_t l, int64_t batch, int64_t H,
                                                  NewLen new_len, block_scratch& sc) {
  const int64_t per_layer = batch * H;
  long long carry = 0;
  for (int64_t j0 = 0; j0 < per_layer; j0 += blockDim.x) {
    const int64_t j = j0 + threadIdx.x;
    long long n = 0;
    if (j < per_layer) n = new_len(j / H, j % H);
    long long total = 0;
    const long long ex = block_exclusive_sum(n, total, sc);
    if (j < per_layer) {
      if (out.lengths) out.lengths[l * per_layer + j] = static_cast<int32_t>(n);
      if (out.cu_seqlens) out.cu_seqlens[l * (per_layer + 1) + j + 1] = static_cast<int32_t>(carry + ex + n);
    }
    carry += total;
  }
  if (threadIdx.x == 0 && out.cu_seqlens) out.cu_seqlens[l * (per_layer + 1)] = 0;
}

//! pages_in_use[b] = the pages the longest of sequence b's segments needs, over `layers` x H (new_len(x, b, h)).
template <class NewLen>
PREFIXKV_DEVICE void compress_write_pages_in_use(int32_t* pages_in_use, int64_t batch, int64_t layers, int64_t H,
                                                 int64_t page_size, NewLen new_len) {
  for (int64_t b = threadIdx.x; b < batch; b += blockDim.x) {
    int64_t mx = 0;
    for (int64_t x = 0; x < layers; ++x)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t p = (new_len(x, b, h) + page_size - 1) / page_size;
        mx = p > mx ? p : mx;
      }
    pages_in_use[b] = static_cast<int32_t>(mx);
  }
}

//! The outputs, one block per layer of the call (block 0 also writes pages_in_use, thresholds and the status).
template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(256) compress_finalize_kernel(compress_kargs a) {
  __shared__ block_scratch sc;
  const compress_geometry& g = a.geo;
  const int64_t H = g.heads, L = a.plan.cfg.layers;
  const int32_t chain = a.status[compress_st_chain] ? a.status[compress_st_chain] : a.status[compress_st_compact];
  const segment_grid grid = g.grid();
  const int64_t li = blockIdx.x, l = g.l0 + li;
  auto new_len = [&](int64_t lli, int64_t b, int64_t h) -> int64_t {
    return chain ? a.n_in(g.l0 + lli, b, h) : a.keep[grid.id(lli, b, h)];
  };
  compress_write_layer_lengths(a.out, l, g.batch, H, [&](int64_t b, int64_t h) { return new_len(li, b, h); }, sc);
  if (blockIdx.x != 0) return;
  if (a.out.pages_in_use && a.whole && a.page_size > 0)
    compress_write_pages_in_use(a.out.pages_in_use, g.batch, g.lc, H, a.page_size, new_len);
  if (a.out.threshold) {
    const bool prefix = a.plan.cfg.alloc == allocation::prefix;
    const int64_t P = a.problems();
    for (int64_t p = threadIdx.x; p < P; p += blockDim.x) {
      const int64_t idx = prefix ? p : (p / g.lc) * L + g.l0 + p % g.lc;
      a.out.threshold[idx] = chain ? 0.0f : a.thr[p];
    }
  }
  if (a.out.status && threadIdx.x == 0) *a.out.status = chain;
}

//! Workspace pieces of the chain.
enum compress_piece : int {
  cw_status = 0, cw_seg_begin, cw_seg_len, cw_counts, cw_poff, cw_solve_status, cw_thr, cw_keep, cw_sel_off,
  cw_curve_off, cw_curve_tokens, cw_scores, cw_union, cw_count
};

//! Temporary storage of the stages: the scorer's, and the largest of the curve builder's, the solver's, the
//! selection writer's and the compaction's.
struct compress_temps {
  size_t scorer = 0, stages = 0;
};

//! The union piece: the scorer's temp while scoring, then the curve arrays (positions, cumulative, sorted scores;
//! C candidates each) followed by the temp of the later stages — the curve arrays are not alive while scoring.
struct compress_union {
  size_t curve_array = 0;  // bytes of one curve array, rounded
  size_t bytes = 0;
  compress_union(int64_t C, const compress_temps& t) {
    curve_array = workspace_round_up(static_cast<size_t>(C) * sizeof(float));
    const size_t after = 3 * curve_array + workspace_round_up(t.stages);
    bytes = t.scorer > after ? t.scorer : after;
  }
};

//! Piece sizes for a call with `batch` sequences over `lc` layers.
inline void compress_reserve(workspace_layout<cw_count>& ws, const compress_plan& pl, int64_t batch, int64_t lc,
                             const compress_temps& temps) {
  const int64_t S = lc * batch * pl.seg_heads;
  const int64_t P = pl.cfg.alloc == allocation::prefix ? batch : batch * lc;
  const int64_t C = S * pl.cfg.max_tokens;
  ws.reserve<int32_t>(cw_status, compress_st_words);
  ws.reserve<int64_t>(cw_seg_begin, S);
  ws.reserve<int64_t>(cw_seg_len, S);
  ws.reserve<int64_t>(cw_counts, P);
  ws.reserve<int64_t>(cw_poff, P + 1);
  ws.reserve<int32_t>(cw_solve_status, P);
  ws.reserve<float>(cw_thr, P);
  ws.reserve<int64_t>(cw_keep, S);
  ws.reserve<int64_t>(cw_sel_off, S + 1);
  ws.reserve<int64_t>(cw_curve_off, S + 1);
  ws.reserve<int64_t>(cw_curve_tokens, S);
  ws.reserve<float>(cw_scores, C);  // scores, then the kept indices (int32) once the curves are built
  ws.reserve_bytes(cw_union, compress_union(C, temps).bytes);
}

//! A never-dereferenced, suitably aligned stand-in pointer for size queries.
template <class X>
inline X* compress_fake_ptr() {
  return reinterpret_cast<X*>(static_cast<std::uintptr_t>(1) << 12);
}

//! Largest stage temps of any call the plan serves.
template <class T>
inline cudaError_t compress_stage_bound(const compress_plan& pl, compress_temps& temps) {
  const compress_config& c = pl.cfg;
  const int64_t B = c.max_batch, L = c.layers, H = pl.seg_heads;
  const int64_t S = L * B * H, C = S * c.max_tokens;
  temps = compress_temps{};
  if (S == 0) return cudaSuccess;
  size_t bytes = 0;
  const segments rows = make_ragged_segments(S, compress_fake_ptr<const int64_t>(), compress_fake_ptr<const int64_t>());
  const segment_grid grid{L, B, H, true};
  size_t b = 0;
  if (c.scorer == scorer_kind::window) {
    const auto q = make_kv_view_bhsd(compress_fake_ptr<const T>(), B, c.q_heads, c.max_window, c.head_dim);
    const auto k = make_kv_view_bhsd(compress_fake_ptr<const T>(), B, c.kv_heads, std::max(c.max_tokens, c.max_window),
                                     c.head_dim);
    kv_view<const T> fake_q[compact_max_layers], fake_k[compact_max_layers];
    for (int64_t l = 0; l < L; ++l) {
      fake_q[l] = q;
      fake_k[l] = k;
    }
    PREFIXKV_TRY(window_attention_layers(nullptr, b, fake_q, fake_k, nullptr, c.window, grid, rows,
                                         compress_fake_ptr<float>(), nullptr, 0));
    bytes = std::max(bytes, b);
    // the paged variant: the token capacity is max_tokens rounded up to whole pages
    const int64_t page = c.page_size > 0 ? c.page_size : 16, blocks = (std::max(c.max_tokens, c.max_window) + page - 1) / page;
    paged_kv_view<const T> pk = make_paged_kv_view(compress_fake_ptr<const T>(), page_layout::nhd,
                                                   std::max<int64_t>(c.max_pages, 1), page, c.kv_heads, c.head_dim,
                                                   compress_fake_ptr<const int32_t>(), B, blocks);
    paged_kv_view<const T> fake_pk[compact_max_layers];
    for (int64_t l = 0; l < L; ++l) fake_pk[l] = pk;
    b = 0;
    PREFIXKV_TRY(window_attention_layers(nullptr, b, fake_q, fake_pk, nullptr, c.window, grid, rows,
                                         compress_fake_ptr<float>(), nullptr, 0));
    bytes = std::max(bytes, b);
  }
  temps.scorer = bytes;
  bytes = 0;
  curve_device_out co{compress_fake_ptr<int64_t>(), compress_fake_ptr<int64_t>(), compress_fake_ptr<int32_t>(),
                      compress_fake_ptr<float>(), compress_fake_ptr<float>()};
  curve_set set;
  b = 0;
  PREFIXKV_TRY(build_curves(nullptr, b, compress_fake_ptr<const float>(), rows, c.protect, C, co, set,
                            curve_options{curve_sort::automatic, c.max_tokens}, nullptr, 0));
  bytes = std::max(bytes, b);
  // solver and selection: the 256-byte minimum; compaction: its check kernel's words (<= 2 per SM) and, for paged
  // caches, one word per page of the pool (per layer and page with per-layer tables over per-layer pools; the
  // compaction counts at most 2^31 pages, the most an int32 page id can name)
  const size_t pages = static_cast<size_t>(std::min<int64_t>(c.max_pages, int64_t(1) << 31));
  bytes = std::max<size_t>(bytes, workspace_round_up(2 * sizeof(int32_t) * static_cast<size_t>(sm_count())) +
                                      workspace_round_up(sizeof(int32_t) * pages * static_cast<size_t>(L)));
  temps.stages = std::max<size_t>(bytes, workspace_alignment);
  return cudaSuccess;
}

//! A stage's workspace query must fit the stage piece.
inline cudaError_t compress_stage_fits(size_t need, size_t have) {
  if (need > have)
    return fail(reason::workspace_too_small, "compress: a stage needs more workspace than the plan provides");
  return cudaSuccess;
}

//! Read-only K views of layers [l0, l0 + lc) over their first `tokens` positions, for the scorers (host arrays of
//! at most compact_max_layers views, on the stack).
template <class Cache>
struct compress_key_views;
template <class T, class S>
struct compress_key_views<kv_layers<T, S>> {
  kv_view<const T> k[compact_max_layers];
  void fill(const kv_layers<T, S>& c, int64_t l0, int64_t lc, int64_t tokens) {
    for (int64_t l = 0; l < lc; ++l) k[l] = c.k[l0 + l].as_const().with_tokens(tokens);
  }
};
template <class T, class S>
struct compress_key_views<paged_kv_layers<T, S>> {
  paged_kv_view<const T> k[compact_max_layers];
  void fill(const paged_kv_layers<T, S>& c, int64_t l0, int64_t lc, int64_t tokens) {
    for (int64_t l = 0; l < lc; ++l) k[l] = c.k[l0 + l].with_token_capacity(tokens).as_const();
  }
};

//! Stage boundaries of one call, for the benchmark's per-stage times: events recorded (when given) after the
//! prologue, the scorer, the curves, the solver, the selection + gate, the compaction and the outputs.
inline constexpr int compress_stage_count = 7;
struct compress_stage_events {
  cudaEvent_t after[compress_stage_count] = {};
};

template <class Cache, class P, class Dst>
cudaError_t compress_run(void* d_temp, size_t& temp_bytes, const compress_plan& pl, const compress_args<Cache, P, Dst>& a,
                         int64_t layer, cudaStream_t stream, const compress_stage_events* ev = nullptr) {
  auto mark = [&](int i) { return ev && ev->after[i] ? check_runtime(cudaEventRecord(ev->after[i], stream), "compress: event") : cudaSuccess; };
  using T = cache_element_t<Cache>;
  const compress_config& c = pl.cfg;
  // ---- size query: from the plan alone
  if (d_temp == nullptr) {
    if (!pl.valid) return fail(reason::bad_parameter, "compress: the plan was not made by make_plan");
    compress_temps temps;
    PREFIXKV_TRY(compress_stage_bound<T>(pl, temps));
    workspace_layout<cw_count> ws;
    compress_reserve(ws, pl, c.max_batch, c.layers, temps);
    temp_bytes = ws.bytes();
    return cudaSuccess;
  }
  int64_t batch = 0, capacity = 0;
  PREFIXKV_TRY(compress_check_args(pl, a, layer, batch, capacity));
  compress_temps temps;
  PREFIXKV_TRY(compress_stage_bound<T>(pl, temps));
  workspace_layout<cw_count> full;
  compress_reserve(full, pl, c.max_batch, c.layers, temps);
  PREFIXKV_TRY(full.map(d_temp, temp_bytes));  // the caller's buffer covers the plan
  compress_geometry g;
  g.l0 = layer < 0 ? 0 : layer;
  g.lc = layer < 0 ? c.layers : 1;
  g.batch = batch;
  g.heads = pl.seg_heads;
  g.capacity = capacity;
  workspace_layout<cw_count> ws;  // this call's pieces, inside the same buffer
  compress_reserve(ws, pl, batch, g.lc, temps);
  PREFIXKV_TRY(ws.map(d_temp, temp_bytes));
  const int64_t S = g.segments();
  const segment_grid grid = g.grid();
  const int64_t token_cap = std::min(capacity, c.max_tokens);

  compress_kargs k;
  k.plan = pl;
  k.geo = g;
  k.lengths_in = a.lengths;
  k.per_segment = a.lengths_per_segment;
  k.heads_in = a.lengths_per_segment ? g.heads : 1;
  for (int64_t li = 0; li < g.lc && c.scorer == scorer_kind::window; ++li) k.window[li] = a.queries[g.l0 + li].tokens;
  k.caller_scores = c.scorer == scorer_kind::scores;
  k.score_stride = a.score_stride;
  k.row_stride = c.max_tokens;
  k.status = ws.get<int32_t>(cw_status);
  k.seg_begin = ws.get<int64_t>(cw_seg_begin);
  k.seg_len = ws.get<int64_t>(cw_seg_len);
  k.counts = ws.get<int64_t>(cw_counts);
  k.poff = ws.get<int64_t>(cw_poff);
  k.solve_status = ws.get<int32_t>(cw_solve_status);
  k.thr = ws.get<float>(cw_thr);
  k.keep = ws.get<int64_t>(cw_keep);
  k.sel_off = ws.get<int64_t>(cw_sel_off);
  k.page_size = c.in_place ? cache_page_size(a.cache) : cache_page_size(a.dst);
  k.whole = layer < 0;
  k.out = a.out;
  if constexpr (is_paged_cache<Cache>::value) {
    k.paged = true;
    for (int64_t l = 0; l < c.layers; ++l) k.table[l] = a.cache.k[l].block_table;
    k.table_stride = a.cache.k[0].block_table_stride;
    k.table_page = a.cache.k[0].page_size;
    k.table_pages = a.cache.k[0].num_pages;
  }
  // the union piece: the scorer's temp first, then the curve arrays and the later stages' temp
  const compress_union un(S * c.max_tokens, temps);
  char* const ubase = ws.get<char>(cw_union);
  void* const scorer_temp = ubase;
  const size_t scorer_have = ws.size_of(cw_union);
  void* const stage = ubase + 3 * un.curve_array;
  const size_t stage_have = ws.size_of(cw_union) - 3 * un.curve_array;

  PREFIXKV_TRY(check_runtime(cudaMemsetAsync(k.status, 0, compress_st_words * sizeof(int32_t), stream), "compress: memset"));
  if (batch > 0) {
    compress_prologue_kernel<><<<static_cast<unsigned>((batch + 127) / 128), 128, 0, stream>>>(k);
    PREFIXKV_TRY(check_launch(stream));
    if (k.paged) {
      const dim3 tgrid(static_cast<unsigned>(batch < 64 ? batch : 64), static_cast<unsigned>(c.layers));
      compress_table_check_kernel<><<<tgrid, 256, 0, stream>>>(k);
      PREFIXKV_TRY(check_launch(stream));
    }
  }
  PREFIXKV_TRY(mark(0));
  if (S > 0) {
    const segments rows = make_ragged_segments(S, k.seg_begin, k.seg_len);
    unsigned* bits = reinterpret_cast<unsigned*>(k.status + compress_st_bits);
    float* own = ws.get<float>(cw_scores);
    const float* scores = c.scorer == scorer_kind::scores ? a.scores : own;
    // ---- score: every layer of the call in one scorer call (a constant number of launches)
    const int64_t l0 = g.l0, lc = g.lc;
    size_t need = 0;
    if (c.scorer == scorer_kind::attention) {
      PREFIXKV_TRY(accumulated_attention_layers(nullptr, need, a.attention + l0, grid, rows, own, bits, stream));
      PREFIXKV_TRY(compress_stage_fits(need, scorer_have));
      PREFIXKV_TRY(accumulated_attention_layers(scorer_temp, need, a.attention + l0, grid, rows, own, bits, stream));
    } else if (c.scorer == scorer_kind::window || c.scorer == scorer_kind::key_norm) {
      compress_key_views<Cache> keys;
      keys.fill(a.cache, l0, lc, token_cap);
      if (c.scorer == scorer_kind::window) {
        const lse_view* lse = a.lse ? a.lse + l0 : nullptr;
        PREFIXKV_TRY(window_attention_layers(nullptr, need, a.queries + l0, keys.k, lse, c.window, grid, rows, own,
                                             bits, stream));
        PREFIXKV_TRY(compress_stage_fits(need, scorer_have));
        PREFIXKV_TRY(window_attention_layers(scorer_temp, need, a.queries + l0, keys.k, lse, c.window, grid, rows, own,
                                             bits, stream));
      } else {
        PREFIXKV_TRY(key_norm_layers(nullptr, need, keys.k, key_norm_options{true}, grid, rows, own, bits, stream));
        PREFIXKV_TRY(compress_stage_fits(need, scorer_have));
        PREFIXKV_TRY(key_norm_layers(scorer_temp, need, keys.k, key_norm_options{true}, grid, rows, own, bits, stream));
      }
    }
    if (c.scorer == scorer_kind::recency) {
      const int64_t bx = std::max<int64_t>(1, std::min<int64_t>((c.max_tokens + 255) / 256, 64));
      const int64_t gy = std::min<int64_t>(S, 65535);
      for (int64_t s0 = 0; s0 < S; s0 += gy) {
        segments sub = rows;
        sub.offsets = k.seg_begin + s0;
        sub.lengths = k.seg_len + s0;
        sub.count = std::min<int64_t>(gy, S - s0);
        compress_recency_kernel<><<<dim3(unsigned(bx), unsigned(sub.count)), 256, 0, stream>>>(sub, own);
        PREFIXKV_TRY(check_launch(stream));
      }
    }
    PREFIXKV_TRY(mark(1));
    // ---- curves
    const int64_t C = S * c.max_tokens;
    curve_device_out co{ws.get<int64_t>(cw_curve_off), ws.get<int64_t>(cw_curve_tokens),
                        reinterpret_cast<int32_t*>(ubase), reinterpret_cast<float*>(ubase + un.curve_array),
                        reinterpret_cast<float*>(ubase + 2 * un.curve_array)};
    curve_set curves;
    need = 0;
    const curve_options copt{curve_sort::automatic, c.max_tokens};  // the prologue bounds every row by max_tokens
    PREFIXKV_TRY(build_curves(nullptr, need, scores, rows, c.protect, C, co, curves, copt, bits, stream));
    PREFIXKV_TRY(compress_stage_fits(need, stage_have));
    PREFIXKV_TRY(build_curves(stage, need, scores, rows, c.protect, C, co, curves, copt, bits, stream));
    PREFIXKV_TRY(mark(2));
    // ---- solve
    solve_budget budget;
    budget.kind = budget_kind::keep_candidates;
    budget.counts = k.counts;
    const keep_bounds bounds{c.min_keep, c.max_keep, nullptr, nullptr};
    const int64_t np = k.problems();
    need = 0;
    PREFIXKV_TRY(solve(nullptr, need, curves, np, k.poff, budget, bounds, k.keep, k.thr, k.solve_status, stream));
    PREFIXKV_TRY(compress_stage_fits(need, stage_have));
    PREFIXKV_TRY(solve(stage, need, curves, np, k.poff, budget, bounds, k.keep, k.thr, k.solve_status, stream));
    PREFIXKV_TRY(mark(3));
    // ---- select (the kept indices reuse the scores' piece: the scores are dead once the curves exist)
    int32_t* indices = reinterpret_cast<int32_t*>(own);
    need = 0;
    PREFIXKV_TRY(write_selection(nullptr, need, curves, k.keep, k.sel_off, indices, C, k.status + compress_st_select, stream));
    PREFIXKV_TRY(compress_stage_fits(need, stage_have));
    PREFIXKV_TRY(write_selection(stage, need, curves, k.keep, k.sel_off, indices, C, k.status + compress_st_select, stream));
    // ---- gate
    compress_gate_kernel<><<<1, 256, 0, stream>>>(k, S);
    PREFIXKV_TRY(check_launch(stream));
    PREFIXKV_TRY(mark(4));
    // ---- compact
    const selection sel{S, k.sel_off, indices};
    const auto src = cache_slice(a.cache, g.l0, g.lc);
    compact_outputs co2{};
    co2.status = k.status + compress_st_compact;  // 0, or what its checks found (the gate's word stays as it is)
    const index_check check = is_paged_cache<Cache>::value || !c.in_place ? index_check::device : index_check::trusted;
    need = 0;
    if (c.in_place) {
      PREFIXKV_TRY(compact_in_place(nullptr, need, src, sel, grid, co2, check, stream));
      PREFIXKV_TRY(compress_stage_fits(need, stage_have));
      PREFIXKV_TRY(compact_in_place(stage, need, src, sel, grid, co2, check, stream));
    } else {
      const auto dst = cache_slice(a.dst, g.l0, g.lc);
      PREFIXKV_TRY(gather_kept(nullptr, need, src, dst, sel, grid, co2, check, stream));
      PREFIXKV_TRY(compress_stage_fits(need, stage_have));
      PREFIXKV_TRY(gather_kept(stage, need, src, dst, sel, grid, co2, check, stream));
    }
  }
  PREFIXKV_TRY(mark(5));
  // ---- outputs
  if (g.lc > 0 && (batch > 0 || a.out.status)) {
    compress_finalize_kernel<><<<static_cast<unsigned>(g.lc), 256, 0, stream>>>(k);
    PREFIXKV_TRY(check_launch(stream));
  }
  return mark(6);
}

}  // namespace detail

//! Compress every layer of `args.cache` on `stream` (see compress.hpp for the semantics). `d_temp == nullptr`: size
//! query — `temp_bytes` receives the workspace for any call the plan serves (it depends on the plan and the element
//! types only). Host-visible problems (shapes, pointers, the plan) return cudaErrorInvalidValue before anything is
//! enqueued; problems in device data stop the chain on the device and show in `args.out.status`.
template <class Cache, class P, class Dst>
[[nodiscard]] cudaError_t compress(void* d_temp, size_t& temp_bytes, const compress_plan& plan,
                                   const compress_args<Cache, P, Dst>& args, cudaStream_t stream = 0) {
  return detail::compress_run(d_temp, temp_bytes, plan, args, -1, stream);
}

//! Compress layer `layer` only (the paper's serving mode; see `compress_layer_host`). Same workspace as `compress`.
template <class Cache, class P, class Dst>
[[nodiscard]] cudaError_t compress_layer(void* d_temp, size_t& temp_bytes, const compress_plan& plan,
                                         const compress_args<Cache, P, Dst>& args, int64_t layer,
                                         cudaStream_t stream = 0) {
  if (d_temp != nullptr && layer < 0) return detail::fail(reason::out_of_range, "compress: negative layer");
  return detail::compress_run(d_temp, temp_bytes, plan, args, layer < 0 ? 0 : layer, stream);
}

PREFIXKV_NAMESPACE_END
