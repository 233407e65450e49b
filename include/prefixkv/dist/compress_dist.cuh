//! \file prefixkv/dist/compress_dist.cuh
//! The compressor's CUDA backend on a sharded model: `compress(d_temp, temp_bytes, plan, args, shard, stream)`.
//! Semantics, the shard and what a rank passes: prefixkv/dist/compress_dist.hpp; the protocol and its bytes:
//! docs/multigpu.md.
//!
//! Everything is enqueued on `stream` — kernels and the communicator's collectives (NCCL: `prefixkv/dist/nccl.hpp`)
//! alike — with no allocation and no host synchronisation, so the call can be captured into a CUDA graph when the
//! communicator can (NCCL can). The workspace size depends on the plan, the shard's layer count and its
//! tensor-parallel size only:
//! \code
//! size_t bytes = 0;
//! PREFIXKV_TRY(prefixkv::compress(nullptr, bytes, plan, args, shard));          // size query
//! cudaMalloc(&d_temp, bytes);                                                   // once
//! PREFIXKV_TRY(prefixkv::compress(d_temp, bytes, plan, args, shard, stream));   // every rank, same order
//! \endcode
//! Host-visible rejections (shapes, pointers, the shard) return before anything is enqueued, on the rank that
//! found them: give every rank the same plan and batch, as with any collective.
#pragma once

#include "compress_dist.hpp"

#include "../compress/compress.cuh"

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

// Status words of the sharded chain (cleared by one memset per call).
inline constexpr int dist_st_prologue = 0;  // int32: lengths, pages, budgets
inline constexpr int dist_st_bits = 1;      // unsigned: scorer and curve-builder status bits
inline constexpr int dist_st_select = 2;    // int32: selection writer
inline constexpr int dist_st_compact = 3;   // int32: the compaction's checks
inline constexpr int dist_st_chain = 4;     // int32: the whole model's reason (after the exchange)
inline constexpr int dist_st_words = 8;

//! Everything the kernels of the sharded chain need (by value).
struct dist_kargs {
  compress_plan plan;  // the whole model's
  dist_geometry g;
  const int32_t* lengths = nullptr;
  bool per_segment = false;
  int64_t h_in = 1;
  int64_t window[compact_max_layers] = {};  // window queries of this rank's layers (window scorer), else 0
  int64_t score_stride = 0;
  bool caller_scores = false;
  int32_t* status = nullptr;  // dist_st_words
  int64_t* seg_begin = nullptr;   // (S) this rank's score rows
  int64_t* seg_len = nullptr;
  int64_t* hseg_begin = nullptr;  // (lc * B * hc) per-head rows (head_rows)
  int64_t* hseg_len = nullptr;
  int64_t* R = nullptr;      // (P) candidates kept beyond the lower bounds, per problem
  int64_t* known = nullptr;  // (NQ) the threshold key's digits found so far
  int64_t* hist = nullptr;   // (NQ x 256)
  int64_t* tally = nullptr;  // (tally_words)
  int64_t* keep_g = nullptr; // (SG) kept tokens of every segment of the model
  int64_t* keep = nullptr;   // (S) of this rank's segments
  float* thr = nullptr;      // (P)
  int64_t* sel_off = nullptr;  // (S + 1)
  int32_t* vstatus = nullptr;  // compaction checks: one word per block
  int vblocks = 0;
  const int32_t* table = nullptr;
  int64_t table_stride = 0, table_page = 0, table_pages = 0;
  int64_t page_size = 0;  // of the cache holding the result (0: strided)
  dist_record* rec = nullptr;     // (1) this rank's record, then the tensor-parallel group's
  dist_record* rec_tp = nullptr;  // (tp) gathered
  dist_record* rec_pp = nullptr;  // (pp) gathered
  compress_outputs out;

  PREFIXKV_HOST_DEVICE int64_t n_in(int64_t l, int64_t b, int64_t h) const {
    return dist_length(lengths, per_segment, g.B, h_in, l, b, per_segment ? h : 0);
  }
  PREFIXKV_HOST_DEVICE int64_t n_cl(int64_t l, int64_t b, int64_t h) const {
    const int64_t n = n_in(l, b, h);
    return n < 0 ? int64_t(0) : (n > g.capacity ? g.capacity : n);
  }
  //! Local segment id of global segment (l, b, h), or -1 when this rank does not hold it.
  PREFIXKV_HOST_DEVICE int64_t local_of(int64_t l, int64_t b, int64_t h) const {
    const int64_t li = l - g.l0;
    if (li < 0 || li >= g.lc) return -1;
    if (g.H == 1) return b * g.lc + li;
    const int64_t hl = h - g.h0;
    if (hl < 0 || hl >= g.hc) return -1;
    return (b * g.lc + li) * g.Hl + hl;
  }
};

//! One thread per sequence: checks its lengths (this rank's segments fully, every segment's range), the block table,
//! writes this rank's rows and every problem's R (budget minus the lower bounds; from the whole model's lengths).
template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(128) dist_prologue_kernel(dist_kargs a) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const dist_geometry& g = a.g;
  const compress_config& c = a.plan.cfg;
  if (b >= g.B) return;
  reason why = reason::none;
  for (int64_t l = 0; l < g.L; ++l)
    for (int64_t h = 0; h < g.H; ++h) {
      const int64_t n = a.n_in(l, b, h), s = a.local_of(l, b, h);
      reason r = reason::none;
      if (s >= 0) {
        const int64_t li = l - g.l0;
        r = compress_length_reason(n, g.capacity, c.max_tokens, a.window[li], a.score_stride, a.caller_scores);
        const int64_t nn = r == reason::none ? n : 0;  // a bad row is scored as empty (the chain stops anyway)
        const int64_t hl = g.H == 1 ? 0 : h - g.h0;
        a.seg_len[s] = nn;
        a.seg_begin[s] = a.caller_scores ? ((li * g.B + b) * g.Hl + hl) * a.score_stride : s * g.T;
        if (g.head_rows)
          for (int64_t x = s * g.hc; x < (s + 1) * g.hc; ++x) {
            a.hseg_len[x] = nn;
            a.hseg_begin[x] = x * g.T;
          }
      } else if (n < 0 || n > g.capacity) {
        r = reason::out_of_range;
      }
      why = compress_min_reason(why, r);
    }
  if (a.table != nullptr) {
    int64_t nmax = 0;
    for (int64_t l = 0; l < g.L; ++l)
      for (int64_t h = 0; h < g.H; ++h) nmax = max(nmax, a.n_cl(l, b, h));
    for (int64_t blk = 0; blk * a.table_page < nmax; ++blk) {
      const int32_t page = a.table[b * a.table_stride + blk];
      if (page < 0 || page >= a.table_pages) why = compress_min_reason(why, reason::out_of_range);
    }
  }
  int64_t counts[compact_max_layers];
  why = compress_min_reason(
      why, sequence_budgets(a.plan, [&](int64_t l, int64_t h) { return a.n_cl(l, b, h); }, counts));
  if (g.prefix) {
    int64_t lo = 0;
    for (int64_t l = 0; l < g.L; ++l)
      for (int64_t h = 0; h < g.H; ++h) lo += dist_segment_of(c, a.n_cl(l, b, h)).lo;
    a.R[b] = counts[0] - lo;
  } else {
    for (int64_t l = 0; l < g.L; ++l) {
      int64_t lo = 0;
      for (int64_t h = 0; h < g.H; ++h) lo += dist_segment_of(c, a.n_cl(l, b, h)).lo;
      a.R[b * g.L + l] = counts[l] - lo;
    }
  }
  compress_report(a.status + dist_st_prologue, why);
}

//! Layer rows under tensor parallelism: every rank's head rows (gathered) reduced over kv heads in order.
//! Grid: (token blocks, rows), both grid-stride.
template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(256) dist_reduce_heads_kernel(dist_kargs a, head_reduce op,
                                                                       const float* gathered, float* rows) {
  const int64_t S = a.g.local_segments();
  for (int64_t s = blockIdx.y; s < S; s += gridDim.y) {
    const int64_t n = a.seg_len[s];
    for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < n; t += int64_t(gridDim.x) * blockDim.x)
      rows[s * a.g.T + t] = dist_head_value(a.g, op, gathered, s, t);
  }
}

//! Bounds of local segment s clipped to its curve row (they agree unless the chain stops anyway).
PREFIXKV_DEVICE dist_segment dist_local_bounds(const dist_kargs& a, const curve_set& cv, int64_t s) {
  const int64_t gid = a.g.global_of_local(s);
  const int64_t h = gid % a.g.H, l = (gid / a.g.H) % a.g.L, b = gid / (a.g.H * a.g.L);
  dist_segment d = dist_segment_of(a.plan.cfg, a.n_cl(l, b, h));
  const int64_t c = cv.offsets[s + 1] - cv.offsets[s];
  d.lo = d.lo < c ? d.lo : c;
  d.hi = d.hi < c ? d.hi : c;
  return d;
}

//! One radix round: one block of 256 threads per local segment, thread d counts the segment's eligible ranks whose
//! key is <= the round's key of digit d (exact integer atomics: the order does not matter).
template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(256) dist_hist_kernel(dist_kargs a, curve_set cv, int round) {
  const int64_t S = a.g.local_segments();
  for (int64_t s = blockIdx.x; s < S; s += gridDim.x) {
    const int64_t q = a.g.local_problem_of(s), p = a.g.problem_of_local(q);
    if (a.R[p] <= 0) continue;
    const dist_segment d = dist_local_bounds(a, cv, s);
    if (d.hi <= d.lo) continue;
    const float* row = cv.cumulative + cv.offsets[s];
    const int64_t cnt = entries_le(row, d.lo, d.hi, dist_radix_key(a.known[q], round, threadIdx.x));
    if (cnt) atomicAdd(reinterpret_cast<unsigned long long*>(a.hist + q * dist_radix_bins + threadIdx.x),
                       static_cast<unsigned long long>(cnt));
  }
}

//! After the histograms were summed over the ranks: one thread per local problem appends its digit and clears its
//! histogram for the next round.
template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(128) dist_pick_kernel(dist_kargs a) {
  const int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (q >= a.g.local_problems()) return;
  int64_t* h = a.hist + q * dist_radix_bins;
  a.known[q] = (a.known[q] << 8) | dist_radix_pick(h, a.R[a.g.problem_of_local(q)]);
  for (int d = 0; d < dist_radix_bins; ++d) h[d] = 0;
}

//! (less, equal) of every local segment at the found key, and the key of every problem this rank owns, into the
//! (zeroed) tally.
template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(128) dist_tally_kernel(dist_kargs a, curve_set cv) {
  const int64_t x = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const dist_geometry& g = a.g;
  const int64_t S = g.local_segments(), SG = g.global_segments();
  if (x < S) {
    const int64_t q = g.local_problem_of(x), p = g.problem_of_local(q), gid = g.global_of_local(x);
    const int64_t v = a.R[p] > 0 ? a.known[q] : -1;
    const dist_segment d = dist_local_bounds(a, cv, x);
    const float* row = cv.cumulative + cv.offsets[x];
    const int64_t less = d.hi > d.lo ? entries_le(row, d.lo, d.hi, v - 1) : 0;
    const int64_t le = d.hi > d.lo ? entries_le(row, d.lo, d.hi, v) : 0;
    a.tally[gid] = less;
    a.tally[SG + gid] = le - less;
  }
  if (x < g.local_problems()) {
    const int64_t p = g.problem_of_local(x);
    if (g.owns_problem(p)) a.tally[2 * SG + p] = a.R[p] > 0 ? a.known[x] + 1 : 0;
  }
}

//! One block per problem of the model: the kept tokens of its segments (ties to the lower segment, as the
//! single-GPU solver), its threshold; this rank's segments also into `keep`.
template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(256) dist_keep_kernel(dist_kargs a) {
  __shared__ block_scratch sc;
  const dist_geometry& g = a.g;
  const int64_t p = blockIdx.x, SG = g.global_segments(), per = g.per_problem(), s0 = p * per;
  long long less = 0;
  for (int64_t s = s0 + threadIdx.x; s < s0 + per; s += blockDim.x) less += a.tally[s];
  const long long total_less = block_sum(less, sc);
  long long rem = a.R[p] - total_less, carry = 0;
  for (int64_t j0 = 0; j0 < per; j0 += blockDim.x) {
    const int64_t s = s0 + j0 + threadIdx.x;
    const long long eq = s < s0 + per ? a.tally[SG + s] : 0;
    long long tot = 0;
    const long long before = carry + block_exclusive_sum(eq, tot, sc);
    if (s < s0 + per) {
      long long take = rem - before;
      take = take < 0 ? 0 : (take > eq ? eq : take);
      const int64_t h = s % g.H, l = (s / g.H) % g.L, b = s / (g.H * g.L);
      const dist_segment d = dist_segment_of(a.plan.cfg, a.n_cl(l, b, h));
      const int64_t k = d.prot + d.lo + a.tally[s] + take;
      a.keep_g[s] = k;
      const int64_t ls = a.local_of(l, b, h);
      if (ls >= 0) a.keep[ls] = k;
    }
    carry += tot;
  }
  if (threadIdx.x == 0) {
    const int64_t vp = a.tally[2 * SG + p];
    a.thr[p] = vp > 0 ? key_value(static_cast<uint32_t>(vp - 1)) : 0.0f;
  }
}

//! This rank's record (stage reasons, status bits, its layers), from the status words and the compaction's checks.
template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(256) dist_record_kernel(dist_kargs a) {
  __shared__ int best;
  if (threadIdx.x == 0) best = INT_MAX;
  __syncthreads();
  int found = INT_MAX;
  for (int i = threadIdx.x; i < a.vblocks; i += blockDim.x)
    if (a.vstatus[i] != 0 && a.vstatus[i] < found) found = a.vstatus[i];
  if (found != INT_MAX) atomicMin(&best, found);
  __syncthreads();
  if (threadIdx.x == 0) {
    dist_record r;
    r.why[0] = a.status[dist_st_prologue];
    r.bits = a.status[dist_st_bits];
    r.why[2] = a.status[dist_st_select];
    r.why[3] = best == INT_MAX ? 0 : best;
    r.l0 = static_cast<int32_t>(a.g.l0);
    r.lc = static_cast<int32_t>(a.g.lc);
    r.batch = static_cast<int32_t>(a.g.B);
    *a.rec = r;
  }
}

//! Merge the tensor-parallel group's records into `rec`.
template <int = 0>
PREFIXKV_KERNEL void dist_merge_kernel(dist_kargs a, int n) {
  if (threadIdx.x == 0 && blockIdx.x == 0) *a.rec = dist_merge(a.rec_tp, n, false, a.g.L);
}

//! The gate: the whole model's reason (from the pipeline stages' records, or this rank's); on a failure every kept
//! list of this rank is emptied, so the compaction moves nothing.
template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(256) dist_gate_kernel(dist_kargs a, int n, int64_t segments) {
  __shared__ int chain;
  if (threadIdx.x == 0) {
    const dist_record m = n > 0 ? dist_merge(a.rec_pp, n, true, a.g.L) : dist_merge(a.rec, 1, true, a.g.L);
    chain = static_cast<int>(dist_chain_reason(m, [](unsigned bits) { return compress_bits_reason(bits); }));
    a.status[dist_st_chain] = chain;
  }
  __syncthreads();
  if (chain != 0)
    for (int64_t s = threadIdx.x; s <= segments; s += blockDim.x) a.sel_off[s] = 0;
}

//! The whole model's outputs, one block per layer of the model (block 0 also writes pages_in_use, thresholds and
//! the status).
template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(256) dist_finalize_kernel(dist_kargs a) {
  __shared__ block_scratch sc;
  const dist_geometry& g = a.g;
  const int64_t H = g.H, l = blockIdx.x;
  const int32_t chain = a.status[dist_st_chain];
  auto new_len = [&](int64_t ll, int64_t b, int64_t h) -> int64_t {
    return chain ? a.n_in(ll, b, h) : a.keep_g[g.global_id(ll, b, h)];
  };
  compress_write_layer_lengths(a.out, l, g.B, H, [&](int64_t b, int64_t h) { return new_len(l, b, h); }, sc);
  if (blockIdx.x != 0) return;
  if (a.out.pages_in_use && a.page_size > 0)
    compress_write_pages_in_use(a.out.pages_in_use, g.B, g.L, H, a.page_size, new_len);
  if (a.out.threshold)
    for (int64_t p = threadIdx.x; p < g.problems(); p += blockDim.x) a.out.threshold[p] = chain ? 0.0f : a.thr[p];
  if (a.out.status && threadIdx.x == 0) *a.out.status = chain;
}

//! Workspace pieces of the sharded chain.
enum dist_piece : int {
  dw_status = 0, dw_rec, dw_rec_tp, dw_rec_pp, dw_seg_begin, dw_seg_len, dw_hseg_begin, dw_hseg_len, dw_R, dw_known,
  dw_hist, dw_tally, dw_keep_g, dw_keep, dw_thr, dw_sel_off, dw_curve_off, dw_curve_tokens, dw_scores, dw_gathered,
  dw_vstatus, dw_union, dw_count
};

//! Piece sizes for a call with `batch` sequences (`g` gives the shard; its B is ignored). The union piece is the
//! single-GPU compressor's: the scorer's temp while scoring, then the curve arrays and the later stages' temp.
inline void dist_reserve(workspace_layout<dw_count>& ws, dist_geometry g, int64_t batch, const compress_temps& temps,
                         int sms) {
  g.B = batch;
  const int64_t S = g.local_segments(), SG = g.global_segments(), P = g.problems(), NQ = g.local_problems();
  const int64_t C = S * g.T, Sh = g.head_rows ? g.lc * batch * g.hc : 0;
  ws.reserve<int32_t>(dw_status, dist_st_words);
  ws.reserve<dist_record>(dw_rec, 1);
  ws.reserve<dist_record>(dw_rec_tp, static_cast<size_t>(g.tp_size));
  ws.reserve<dist_record>(dw_rec_pp, static_cast<size_t>(g.pp_size));
  ws.reserve<int64_t>(dw_seg_begin, static_cast<size_t>(S));
  ws.reserve<int64_t>(dw_seg_len, static_cast<size_t>(S));
  ws.reserve<int64_t>(dw_hseg_begin, static_cast<size_t>(Sh));
  ws.reserve<int64_t>(dw_hseg_len, static_cast<size_t>(Sh));
  ws.reserve<int64_t>(dw_R, static_cast<size_t>(P));
  ws.reserve<int64_t>(dw_known, static_cast<size_t>(NQ));
  ws.reserve<int64_t>(dw_hist, static_cast<size_t>(NQ * dist_radix_bins));
  ws.reserve<int64_t>(dw_tally, static_cast<size_t>(g.tally_words()));
  ws.reserve<int64_t>(dw_keep_g, static_cast<size_t>(SG));
  ws.reserve<int64_t>(dw_keep, static_cast<size_t>(S));
  ws.reserve<float>(dw_thr, static_cast<size_t>(P));
  ws.reserve<int64_t>(dw_sel_off, static_cast<size_t>(S + 1));
  ws.reserve<int64_t>(dw_curve_off, static_cast<size_t>(S + 1));
  ws.reserve<int64_t>(dw_curve_tokens, static_cast<size_t>(S));
  ws.reserve<float>(dw_scores, static_cast<size_t>(C));  // scores, then the kept indices (int32)
  ws.reserve<float>(dw_gathered, static_cast<size_t>(g.tp_size * Sh * g.T));
  ws.reserve<int32_t>(dw_vstatus, static_cast<size_t>(2 * sms));
  ws.reserve_bytes(dw_union, compress_union(C, temps).bytes);
}

template <class Cache, class P, class Dst>
cudaError_t compress_dist_run(void* d_temp, size_t& temp_bytes, const compress_plan& pl,
                              const compress_args<Cache, P, Dst>& a, const compress_shard& sh, cudaStream_t stream) {
  using T = cache_element_t<Cache>;
  const compress_config& c = pl.cfg;
  dist_geometry g;
  compress_plan local;
  PREFIXKV_TRY(dist_prepare(pl, sh, comm_memory::device, g, local));
  int sms = 0;
  PREFIXKV_TRY(sm_count(sms));
  compress_temps temps;
  PREFIXKV_TRY(compress_stage_bound<T>(local, temps));
  workspace_layout<dw_count> full;
  dist_reserve(full, g, c.max_batch, temps, sms);
  if (d_temp == nullptr) {  // size query: from the plan and the shard alone
    temp_bytes = full.bytes();
    return cudaSuccess;
  }
  int64_t batch = 0, capacity = 0;
  PREFIXKV_TRY(compress_check_args(local, a, -1, batch, capacity));
  PREFIXKV_TRY(dist_check_tables(pl, a));
  PREFIXKV_TRY(full.map(d_temp, temp_bytes));  // the caller's buffer covers the plan
  g.B = batch;
  g.capacity = capacity;
  workspace_layout<dw_count> ws;  // this call's pieces, inside the same buffer
  dist_reserve(ws, g, batch, temps, sms);
  PREFIXKV_TRY(ws.map(d_temp, temp_bytes));
  const int64_t S = g.local_segments(), NQ = g.local_problems();
  const segment_grid grid = g.local_grid();
  const int64_t token_cap = std::min(capacity, c.max_tokens);

  dist_kargs k;
  k.plan = pl;
  k.g = g;
  k.lengths = a.lengths;
  k.per_segment = a.lengths_per_segment;
  k.h_in = a.lengths_per_segment ? g.H : 1;
  for (int64_t li = 0; li < g.lc && c.scorer == scorer_kind::window; ++li) k.window[li] = a.queries[li].tokens;
  k.caller_scores = c.scorer == scorer_kind::scores;
  k.score_stride = a.score_stride;
  k.status = ws.get<int32_t>(dw_status);
  k.seg_begin = ws.get<int64_t>(dw_seg_begin);
  k.seg_len = ws.get<int64_t>(dw_seg_len);
  k.hseg_begin = ws.get<int64_t>(dw_hseg_begin);
  k.hseg_len = ws.get<int64_t>(dw_hseg_len);
  k.R = ws.get<int64_t>(dw_R);
  k.known = ws.get<int64_t>(dw_known);
  k.hist = ws.get<int64_t>(dw_hist);
  k.tally = ws.get<int64_t>(dw_tally);
  k.keep_g = ws.get<int64_t>(dw_keep_g);
  k.keep = ws.get<int64_t>(dw_keep);
  k.thr = ws.get<float>(dw_thr);
  k.sel_off = ws.get<int64_t>(dw_sel_off);
  k.vstatus = ws.get<int32_t>(dw_vstatus);
  k.page_size = c.in_place ? cache_page_size(a.cache) : cache_page_size(a.dst);
  k.rec = ws.get<dist_record>(dw_rec);
  k.rec_tp = ws.get<dist_record>(dw_rec_tp);
  k.rec_pp = ws.get<dist_record>(dw_rec_pp);
  k.out = a.out;
  if constexpr (is_paged_cache<Cache>::value) {
    k.table = a.cache.k[0].block_table;
    k.table_stride = a.cache.k[0].block_table_stride;
    k.table_page = a.cache.k[0].page_size;
    k.table_pages = a.cache.k[0].num_pages;
  }
  const compress_union un(S * c.max_tokens, temps);
  char* const ubase = ws.get<char>(dw_union);
  void* const scorer_temp = ubase;
  const size_t scorer_have = ws.size_of(dw_union);
  void* const stage = ubase + 3 * un.curve_array;
  const size_t stage_have = ws.size_of(dw_union) - 3 * un.curve_array;
  unsigned* bits = reinterpret_cast<unsigned*>(k.status + dist_st_bits);
  float* own = ws.get<float>(dw_scores);
  const float* scores = k.caller_scores ? a.scores : own;
  const int64_t NP = g.problems();

  // ---- clear: status words, histograms, the known digits
  PREFIXKV_TRY(check_runtime(cudaMemsetAsync(k.status, 0, dist_st_words * sizeof(int32_t), stream), "compress: memset"));
  if (NQ > 0) {
    PREFIXKV_TRY(check_runtime(cudaMemsetAsync(k.hist, 0, size_t(NQ) * dist_radix_bins * sizeof(int64_t), stream),
                               "compress: memset"));
    PREFIXKV_TRY(check_runtime(cudaMemsetAsync(k.known, 0, size_t(NQ) * sizeof(int64_t), stream), "compress: memset"));
  }
  if (g.tally_words() > 0)
    PREFIXKV_TRY(check_runtime(cudaMemsetAsync(k.tally, 0, size_t(g.tally_words()) * sizeof(int64_t), stream),
                               "compress: memset"));
  // ---- prologue
  if (batch > 0) {
    dist_prologue_kernel<><<<static_cast<unsigned>((batch + 127) / 128), 128, 0, stream>>>(k);
    PREFIXKV_TRY(check_launch(stream));
  }
  // ---- score this rank's segments (layer rows under tensor parallelism: per-head rows of every rank, reduced)
  curve_set curves{};
  if (S > 0) {
    const segments rows = make_ragged_segments(S, k.seg_begin, k.seg_len);
    size_t need = 0;
    if (g.head_rows) {
      const int64_t block = g.lc * batch * g.hc * g.T;
      float* gathered = ws.get<float>(dw_gathered);
      float* mine = gathered + g.tp_rank * block;
      const segment_grid hgrid{g.lc, batch, g.hc, true};
      const segments hrows = make_ragged_segments(g.lc * batch * g.hc, k.hseg_begin, k.hseg_len);
      compress_key_views<Cache> keys;
      keys.fill(a.cache, 0, g.lc, token_cap);
      if (c.scorer == scorer_kind::window) {
        PREFIXKV_TRY(window_attention_layers(nullptr, need, a.queries, keys.k, a.lse, c.window, hgrid, hrows, mine,
                                             bits, stream));
        PREFIXKV_TRY(compress_stage_fits(need, scorer_have));
        PREFIXKV_TRY(window_attention_layers(scorer_temp, need, a.queries, keys.k, a.lse, c.window, hgrid, hrows, mine,
                                             bits, stream));
      } else {
        PREFIXKV_TRY(key_norm_layers(nullptr, need, keys.k, key_norm_options{true}, hgrid, hrows, mine, bits, stream));
        PREFIXKV_TRY(compress_stage_fits(need, scorer_have));
        PREFIXKV_TRY(key_norm_layers(scorer_temp, need, keys.k, key_norm_options{true}, hgrid, hrows, mine, bits, stream));
      }
      PREFIXKV_TRY(sh.tp.all_gather(mine, gathered, size_t(block) * sizeof(float), stream));
      const int64_t bx = std::max<int64_t>(1, std::min<int64_t>((c.max_tokens + 255) / 256, 64));
      const int64_t gy = std::min<int64_t>(S, 65535);
      dist_reduce_heads_kernel<><<<dim3(unsigned(bx), unsigned(gy)), 256, 0, stream>>>(
          k, c.scorer == scorer_kind::window ? c.window.heads : head_reduce::mean, gathered, own);
      PREFIXKV_TRY(check_launch(stream));
    } else if (c.scorer == scorer_kind::attention) {
      PREFIXKV_TRY(accumulated_attention_layers(nullptr, need, a.attention, grid, rows, own, bits, stream));
      PREFIXKV_TRY(compress_stage_fits(need, scorer_have));
      PREFIXKV_TRY(accumulated_attention_layers(scorer_temp, need, a.attention, grid, rows, own, bits, stream));
    } else if (c.scorer == scorer_kind::window || c.scorer == scorer_kind::key_norm) {
      compress_key_views<Cache> keys;
      keys.fill(a.cache, 0, g.lc, token_cap);
      if (c.scorer == scorer_kind::window) {
        PREFIXKV_TRY(window_attention_layers(nullptr, need, a.queries, keys.k, a.lse, c.window, grid, rows, own, bits,
                                             stream));
        PREFIXKV_TRY(compress_stage_fits(need, scorer_have));
        PREFIXKV_TRY(window_attention_layers(scorer_temp, need, a.queries, keys.k, a.lse, c.window, grid, rows, own, bits,
                                             stream));
      } else {
        PREFIXKV_TRY(key_norm_layers(nullptr, need, keys.k, key_norm_options{true}, grid, rows, own, bits, stream));
        PREFIXKV_TRY(compress_stage_fits(need, scorer_have));
        PREFIXKV_TRY(key_norm_layers(scorer_temp, need, keys.k, key_norm_options{true}, grid, rows, own, bits, stream));
      }
    } else if (c.scorer == scorer_kind::recency) {
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
    // ---- curves
    const int64_t C = S * c.max_tokens;
    curve_device_out co{ws.get<int64_t>(dw_curve_off), ws.get<int64_t>(dw_curve_tokens),
                        reinterpret_cast<int32_t*>(ubase), reinterpret_cast<float*>(ubase + un.curve_array),
                        reinterpret_cast<float*>(ubase + 2 * un.curve_array)};
    need = 0;
    const curve_options copt{curve_sort::automatic, c.max_tokens};
    PREFIXKV_TRY(build_curves(nullptr, need, scores, rows, c.protect, C, co, curves, copt, bits, stream));
    PREFIXKV_TRY(compress_stage_fits(need, stage_have));
    PREFIXKV_TRY(build_curves(stage, need, scores, rows, c.protect, C, co, curves, copt, bits, stream));
  } else if (g.head_rows) {  // no rows here, but the group's exchange still needs this rank
    const int64_t block = g.lc * batch * g.hc * g.T;
    float* gathered = ws.get<float>(dw_gathered);
    PREFIXKV_TRY(sh.tp.all_gather(gathered + g.tp_rank * block, gathered, size_t(block) * sizeof(float), stream));
  }
  // ---- the threshold key of every problem: one 8-bit digit per round from exact integer counts
  const dist_scope hs = dist_hist_scope(g);
  for (int round = 0; round < dist_radix_rounds; ++round) {
    if (S > 0) {
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(S, int64_t(1) << 30));
      dist_hist_kernel<><<<blocks, dist_radix_bins, 0, stream>>>(k, curves, round);
      PREFIXKV_TRY(check_launch(stream));
    }
    PREFIXKV_TRY(dist_sum(sh, hs, k.hist, NQ * dist_radix_bins, stream));
    if (NQ > 0) {
      dist_pick_kernel<><<<static_cast<unsigned>((NQ + 127) / 128), 128, 0, stream>>>(k);
      PREFIXKV_TRY(check_launch(stream));
    }
  }
  // ---- (less, equal) per segment and the keys, summed over the ranks; every segment's kept tokens
  const int64_t tx = std::max(S, NQ);
  if (tx > 0) {
    dist_tally_kernel<><<<static_cast<unsigned>((tx + 127) / 128), 128, 0, stream>>>(k, curves);
    PREFIXKV_TRY(check_launch(stream));
  }
  PREFIXKV_TRY(dist_sum(sh, dist_tally_scope(g), k.tally, g.tally_words(), stream));
  if (NP > 0) {
    dist_keep_kernel<><<<static_cast<unsigned>(NP), 256, 0, stream>>>(k);
    PREFIXKV_TRY(check_launch(stream));
  }
  // ---- selection and the compaction's checks, before anything moves
  int32_t* indices = reinterpret_cast<int32_t*>(own);
  const selection sel{S, k.sel_off, indices};
  const auto src = a.cache;
  const bool device_checks = is_paged_cache<Cache>::value || !c.in_place;
  if (S > 0) {
    const int64_t C = S * c.max_tokens;
    size_t need = 0;
    PREFIXKV_TRY(write_selection(nullptr, need, curves, k.keep, k.sel_off, indices, C, k.status + dist_st_select, stream));
    PREFIXKV_TRY(compress_stage_fits(need, stage_have));
    PREFIXKV_TRY(write_selection(stage, need, curves, k.keep, k.sel_off, indices, C, k.status + dist_st_select, stream));
    if (device_checks) {
      compact_meta m;
      compact_ptrs ptrs;
      PREFIXKV_TRY(c.in_place ? compact_plan(src, src, true, sel, grid, compact_outputs{}, m, &ptrs)
                              : compact_plan(src, a.dst, false, sel, grid, compact_outputs{}, m, &ptrs));
      m.vchunk = std::max<int64_t>(1, std::min<int64_t>((4 * sms + sel.count - 1) / std::max<int64_t>(sel.count, 1),
                                                        (m.src_tokens + 1023) / 1024));
      const int64_t vblocks = std::max<int64_t>(1, std::min<int64_t>(sel.count * m.vchunk, 2 * sms));
      const bool need_owner = m.paged_dst && m.dt.num_pages > 0;
      const size_t owner_bytes = need_owner ? size_t(m.owner_words()) * sizeof(int32_t) : 0;
      PREFIXKV_TRY(compress_stage_fits(owner_bytes, stage_have));
      if (need_owner) {
        PREFIXKV_TRY(check_runtime(cudaMemsetAsync(stage, 0xFF, owner_bytes, stream), "compress: memset"));
        m.owner = static_cast<int32_t*>(stage);
      }
      compact_check_kernel<0><<<static_cast<unsigned>(vblocks), compact_threads, 0, stream>>>(m, ptrs.tab, k.vstatus);
      PREFIXKV_TRY(check_launch(stream));
      k.vblocks = static_cast<int>(vblocks);
    }
  }
  // ---- one status for the whole model
  dist_record_kernel<><<<1, 256, 0, stream>>>(k);
  PREFIXKV_TRY(check_launch(stream));
  if (sh.tp.present()) {
    PREFIXKV_TRY(sh.tp.all_gather(k.rec, k.rec_tp, sizeof(dist_record), stream));
    dist_merge_kernel<><<<1, 32, 0, stream>>>(k, g.tp_size);
    PREFIXKV_TRY(check_launch(stream));
  }
  if (sh.pp.present()) PREFIXKV_TRY(sh.pp.all_gather(k.rec, k.rec_pp, sizeof(dist_record), stream));
  dist_gate_kernel<><<<1, 256, 0, stream>>>(k, sh.pp.present() ? g.pp_size : 0, S);
  PREFIXKV_TRY(check_launch(stream));
  // ---- compact this rank's shard (checked above; an emptied selection moves nothing)
  if (S > 0) {
    size_t need = 0;
    if (c.in_place) {
      PREFIXKV_TRY(compact_in_place(nullptr, need, src, sel, grid, compact_outputs{}, index_check::trusted, stream));
      PREFIXKV_TRY(compress_stage_fits(need, stage_have));
      PREFIXKV_TRY(compact_in_place(stage, need, src, sel, grid, compact_outputs{}, index_check::trusted, stream));
    } else {
      PREFIXKV_TRY(gather_kept(nullptr, need, src, a.dst, sel, grid, compact_outputs{}, index_check::trusted, stream));
      PREFIXKV_TRY(compress_stage_fits(need, stage_have));
      PREFIXKV_TRY(gather_kept(stage, need, src, a.dst, sel, grid, compact_outputs{}, index_check::trusted, stream));
    }
  }
  // ---- the whole model's outputs
  if (batch > 0 || a.out.status) {
    dist_finalize_kernel<><<<static_cast<unsigned>(g.L), 256, 0, stream>>>(k);
    PREFIXKV_TRY(check_launch(stream));
  }
  return cudaSuccess;
}

}  // namespace detail

//! Compress this rank's shard of a sharded model on `stream` (see compress_dist.hpp for the semantics and what each
//! rank passes). `d_temp == nullptr`: size query — `temp_bytes` receives the workspace for any call the plan serves
//! on this shard. The communicators of `shard` must move device memory (NCCL: `nccl_comm`); their collectives are
//! enqueued on `stream` between the chain's kernels. `args.out.status` (device) receives the whole model's reason,
//! the same on every rank.
template <class Cache, class P, class Dst>
[[nodiscard]] cudaError_t compress(void* d_temp, size_t& temp_bytes, const compress_plan& plan,
                                   const compress_args<Cache, P, Dst>& args, const compress_shard& shard,
                                   cudaStream_t stream = 0) {
  return detail::compress_dist_run(d_temp, temp_bytes, plan, args, shard, stream);
}

PREFIXKV_NAMESPACE_END
