//! \file prefixkv/decode/detail/decode_kernels.cuh
//! Kernels of the decode-time upkeep (included by decode.cuh): the init kernel, the step kernel (one block per
//! segment: commit, observe, evict with in-block row moves), and the small kernels around the amortised policy's
//! compression chain.
#pragma once

#include "../decode.hpp"

#include "../../compact/compact.cuh"
#include "../../core/launch.cuh"
#include "../../core/numeric.hpp"

#include <climits>

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

inline constexpr int decode_threads = 256;
inline constexpr int decode_unroll = 4;  // words in flight per thread in a move round

//! Everything the step kernel needs (by value; the per-layer cache pointers travel separately).
struct decode_kargs {
  decode_plan plan;
  decode_state st;
  int64_t batch = 0, capacity = 0;
  int32_t appended = 0;
  const int32_t* active = nullptr;
  decode_observe observe = decode_observe::none;
  // attention observation: one geometry for all layers, one data pointer per layer
  int64_t p_tokens = 0, p_dim = 0, p_sb = 0, p_sh = 0, p_st = 0, p_sd = 0;
  const void* p_data[compact_max_layers] = {};
  const float* obs = nullptr;
  int64_t obs_stride = 0;
  compact_meta m;  // geometry of the cache's kinds (K, V, scales) and its row addressing
};

//! Keep the smallest non-zero reason in `word` (0 = none).
PREFIXKV_DEVICE void decode_report(int32_t* word, int v) {
  if (v == 0) return;
  int old = *reinterpret_cast<volatile int*>(word);
  while (old == 0 || v < old) {
    const int seen = atomicCAS(reinterpret_cast<int*>(word), old, v);
    if (seen == old) break;
    old = seen;
  }
}

//! Shared memory of the step kernel.
struct decode_smem {
  int32_t holes[decode_round];
  int32_t fill[decode_round];
  unsigned hist[256];
  unsigned long long wkey[decode_threads / 32];
  long long wrow[decode_threads / 32];
  int32_t wcount[decode_threads / 32];
  unsigned long long key;
  long long row;
  long long want;
  int32_t count;
  int32_t why;
};

//! Block-wide: the smallest non-zero reason of every thread's `why`, reported into `word` by thread 0.
__device__ inline void decode_block_report(decode_smem& sm, reason why, int32_t* word) {
  __syncthreads();
  if (threadIdx.x == 0) sm.why = INT_MAX;
  __syncthreads();
  if (why != reason::none) atomicMin(&sm.why, static_cast<int>(why));
  __syncthreads();
  if (threadIdx.x == 0 && sm.why != INT_MAX) decode_report(word, sm.why);
}

// ---- row moves ------------------------------------------------------------------------------------------------

//! Moves `count` rows of the lanes (heads [h0, h0 + hn) of one tensor kind) of sequence b: row src_row(i) to row
//! dst_row(i), W-byte words, in rounds of blockDim * decode_unroll words: every thread loads its words of a round,
//! the block meets, then stores them. Safe in place when the lists are "shift" lists (dst ascending, src >= dst
//! ascending: a word is only ever overwritten after every load of it, as in compact_move_rows) or when sources
//! and destinations are disjoint.
template <int W, class Src, class Dst>
__device__ void decode_move_kind(const compact_geom& g, const compact_table& t, char* base, int64_t b, int64_t h0,
                                 int64_t hn, int64_t count, Src src_row, Dst dst_row) {
  using word = typename compact_word<W>::type;
  const int64_t vpr = g.row_bytes / W, per_row = hn * vpr, items = count * per_row;
  const int64_t step = int64_t(blockDim.x) * decode_unroll;
  for (int64_t q0 = 0; q0 < items; q0 += step) {
    word buf[decode_unroll];
#pragma unroll
    for (int u = 0; u < decode_unroll; ++u) {
      const int64_t q = q0 + int64_t(u) * blockDim.x + threadIdx.x;
      if (q < items) {
        const int64_t i = q / per_row, rem = q - i * per_row, hh = rem / vpr, w = rem - hh * vpr;
        buf[u] = *reinterpret_cast<const word*>(base + t.row(g, b, h0 + hh, src_row(i)) + g.chunk(w * W));
      }
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < decode_unroll; ++u) {
      const int64_t q = q0 + int64_t(u) * blockDim.x + threadIdx.x;
      if (q < items) {
        const int64_t i = q / per_row, rem = q - i * per_row, hh = rem / vpr, w = rem - hh * vpr;
        *reinterpret_cast<word*>(base + t.row(g, b, h0 + hh, dst_row(i)) + g.chunk(w * W)) = buf[u];
      }
    }
    __syncthreads();
  }
}

//! The same for one 4-byte value per row (running scores, stamps).
template <class X, class Src, class Dst>
__device__ void decode_move_values(X* row, int64_t count, Src src_row, Dst dst_row) {
  const int64_t step = int64_t(blockDim.x) * decode_unroll;
  for (int64_t q0 = 0; q0 < count; q0 += step) {
    X buf[decode_unroll];
#pragma unroll
    for (int u = 0; u < decode_unroll; ++u) {
      const int64_t q = q0 + int64_t(u) * blockDim.x + threadIdx.x;
      if (q < count) buf[u] = row[src_row(q)];
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < decode_unroll; ++u) {
      const int64_t q = q0 + int64_t(u) * blockDim.x + threadIdx.x;
      if (q < count) row[dst_row(q)] = buf[u];
    }
    __syncthreads();
  }
}

//! Moves rows of every lane of segment (l, b[, h]) — K, V and scales, all heads for layer segments — and its
//! scores and stamps.
template <class Src, class Dst>
__device__ void decode_move_rows(const decode_kargs& a, const compact_ptrs& p, int64_t l, int64_t b, int64_t h,
                                 float* sc, int32_t* sp, int64_t count, Src src_row, Dst dst_row) {
  if (count <= 0) return;
  const compact_meta& m = a.m;
  for (int k = 0; k < m.kinds; ++k) {
    const compact_geom& g = m.src[k];
    const int64_t h0 = a.plan.seg_heads == 1 ? 0 : h, hn = a.plan.seg_heads == 1 ? g.heads : 1;
    char* base = p.src[l][k];
    switch (m.vec[k]) {
      case 16: decode_move_kind<16>(g, m.st, base, b, h0, hn, count, src_row, dst_row); break;
      case 8: decode_move_kind<8>(g, m.st, base, b, h0, hn, count, src_row, dst_row); break;
      case 4: decode_move_kind<4>(g, m.st, base, b, h0, hn, count, src_row, dst_row); break;
      case 2: decode_move_kind<2>(g, m.st, base, b, h0, hn, count, src_row, dst_row); break;
      default: decode_move_kind<1>(g, m.st, base, b, h0, hn, count, src_row, dst_row); break;
    }
  }
  if (sc) decode_move_values(sc, count, src_row, dst_row);
  if (sp) decode_move_values(sp, count, src_row, dst_row);
}

// ---- selection of the lowest keys -----------------------------------------------------------------------------

//! The candidate with the smallest key in rows [lo, hi) (keys unique): its key and row, in every thread.
__device__ inline void decode_block_min(decode_smem& sm, const float* sc, const int32_t* sp, int64_t lo, int64_t hi,
                                        unsigned long long& key, long long& row) {
  unsigned long long k = ~0ull;
  long long r = -1;
  for (int64_t x = lo + threadIdx.x; x < hi; x += blockDim.x) {
    const unsigned long long kx = decode_key(sc[x], sp[x]);
    if (kx < k) {
      k = kx;
      r = x;
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    const unsigned long long ko = __shfl_down_sync(0xffffffffu, k, off);
    const long long ro = __shfl_down_sync(0xffffffffu, r, off);
    if (ko < k) {
      k = ko;
      r = ro;
    }
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    sm.wkey[warp] = k;
    sm.wrow[warp] = r;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long bk = ~0ull;
    long long br = -1;
    for (int w = 0; w < int(blockDim.x >> 5); ++w)
      if (sm.wkey[w] < bk) {
        bk = sm.wkey[w];
        br = sm.wrow[w];
      }
    sm.key = bk;
    sm.row = br;
  }
  __syncthreads();
  key = sm.key;
  row = sm.row;
  __syncthreads();
}

//! The kr-th smallest key of the candidates in rows [lo, hi) (keys unique, 1 <= kr <= hi - lo), by an 8-bit radix
//! select over the 64-bit keys; the result in every thread.
__device__ inline unsigned long long decode_block_select(decode_smem& sm, const float* sc, const int32_t* sp,
                                                         int64_t lo, int64_t hi, int64_t kr) {
  unsigned long long prefix = 0, mask = 0;
  if (threadIdx.x == 0) sm.want = kr;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) sm.hist[i] = 0;
    __syncthreads();
    for (int64_t x = lo + threadIdx.x; x < hi; x += blockDim.x) {
      const unsigned long long kx = decode_key(sc[x], sp[x]);
      if ((kx & mask) == prefix) atomicAdd(&sm.hist[(kx >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      long long cum = 0;
      int d = 0;
      for (; d < 255; ++d) {
        if (cum + static_cast<long long>(sm.hist[d]) >= sm.want) break;
        cum += sm.hist[d];
      }
      sm.want -= cum;
      sm.key = prefix | (static_cast<unsigned long long>(d) << shift);
    }
    __syncthreads();
    prefix = sm.key;
    mask |= 0xFFull << shift;
    __syncthreads();
  }
  return prefix;
}

//! Rows of [lo, hi) whose key is <= K (`below` true) or > K (false), ascending, into `out` (at most `cap`).
//! Returns the count (in every thread).
__device__ inline int64_t decode_block_list(decode_smem& sm, const float* sc, const int32_t* sp, int64_t lo,
                                            int64_t hi, unsigned long long K, bool below, int32_t* out, int64_t cap) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = int(blockDim.x >> 5);
  int64_t written = 0;
  for (int64_t t0 = lo; t0 < hi; t0 += blockDim.x) {
    const int64_t x = t0 + threadIdx.x;
    bool f = false;
    if (x < hi) f = (decode_key(sc[x], sp[x]) <= K) == below;
    const unsigned bal = __ballot_sync(0xffffffffu, f);
    if (lane == 0) sm.wcount[warp] = __popc(bal);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < warps; ++w) {
      before += w < warp ? sm.wcount[w] : 0;
      total += sm.wcount[w];
    }
    if (f) {
      const int64_t at = written + before + __popc(bal & ((1u << lane) - 1u));
      if (at < cap) out[at] = static_cast<int32_t>(x);
    }
    written += total;
    __syncthreads();
  }
  return written;
}

// ---- the kernels ----------------------------------------------------------------------------------------------

//! decode_init: one block per state segment.
template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(decode_threads) decode_init_kernel(decode_plan pl, decode_state st,
                                                                          decode_init_args a) {
  __shared__ decode_smem sm;
  const int64_t S = pl.state_segments(), Hs = pl.seg_heads, T = pl.cfg.max_tokens;
  __shared__ long long n_s;
  for (int64_t s = blockIdx.x; s < S; s += gridDim.x) {
    const int64_t h = s % Hs, b = (s / Hs) % pl.cfg.max_batch, l = s / (Hs * pl.cfg.max_batch);
    reason why = reason::none;
    if (threadIdx.x == 0) {
      int64_t n0 = 0;
      why = decode_init_scalars(pl, st, a, l, b, h, n0);
      n_s = n0;
    }
    __syncthreads();
    const int64_t n = n_s;
    const int64_t j = (l * a.batch + b) * Hs + h;
    if (pl.has_scores() && a.scores && n > a.score_stride && threadIdx.x == 0)
      why = decode_min_reason(why, reason::out_of_range);  // rows past the stride start at 0
    if (pl.has_scores())
      for (int64_t r = threadIdx.x; r < T; r += blockDim.x) {
        float x = 0.0f;
        if (r < n && r < a.score_stride && a.scores) x = decode_sanitise(a.scores[j * a.score_stride + r], why);
        st.scores[s * T + r] = x;
      }
    if (pl.has_stamps())
      for (int64_t r = threadIdx.x; r < T; r += blockDim.x) st.stamps[s * T + r] = static_cast<int32_t>(r);
    decode_block_report(sm, why, st.status);  // (ends with a barrier: n_s may be rewritten)
  }
}

//! decode_step: one block per segment of the call (caller order (layer, sequence, head)).
template <class P>
PREFIXKV_KERNEL void __launch_bounds__(decode_threads) decode_step_kernel(const decode_kargs a, const compact_ptrs p) {
  __shared__ decode_smem sm;
  const decode_plan& pl = a.plan;
  const decode_config& c = pl.cfg;
  const int64_t Hs = pl.seg_heads, T = c.max_tokens;
  const int64_t j = blockIdx.x;
  const int64_t h = j % Hs, b = (j / Hs) % a.batch, l = j / (Hs * a.batch);
  const int64_t s = pl.state_index(l, b, h);
  const int64_t add = a.active == nullptr || a.active[b] != 0 ? a.appended : 0;
  const int64_t n = a.st.lengths[s], N = a.st.seen[s];
  reason why = reason::none;
  if (n < 0 || n > a.capacity) why = reason::out_of_range;
  else if (n + add > a.capacity || N + add > INT32_MAX) why = reason::capacity_exceeded;
  if (why == reason::none && a.m.st.paged) {  // every block of rows [0, n + add) names a page of the pool
    const compact_table& t = a.m.st;
    bool bad = false;
    for (int64_t blk = threadIdx.x; blk * t.page_size < n + add; blk += blockDim.x) {
      const int64_t page = t.table[b * t.stride + blk];
      bad = bad || page < 0 || page >= t.num_pages;
    }
    if (__syncthreads_or(bad)) why = reason::out_of_range;
  }
  if (why != reason::none) {  // the segment is left unchanged
    decode_block_report(sm, why, a.st.status);
    return;
  }
  const int64_t n1 = n + add, N1 = N + add;
  float* sc = pl.has_scores() ? a.st.scores + s * T : nullptr;
  int32_t* sp = pl.has_stamps() ? a.st.stamps + s * T : nullptr;
  // ---- new rows, observation
  if (sc) {
    decode_observe ob = a.observe;
    if (ob == decode_observe::attention && n1 > a.p_dim) {
      why = reason::out_of_range;
      ob = decode_observe::none;
    }
    if ((ob == decode_observe::add_scores || ob == decode_observe::set_scores) && n1 > a.obs_stride) {
      why = reason::out_of_range;
      ob = decode_observe::none;
    }
    const P* pd = static_cast<const P*>(a.p_data[l]);
    const int64_t G = c.q_heads / Hs, g0 = h * G;
    const float* in = a.obs ? a.obs + j * a.obs_stride : nullptr;
    for (int64_t r = threadIdx.x; r < n1; r += blockDim.x) {
      const bool fresh = r >= n;
      if (sp && fresh) sp[r] = static_cast<int32_t>(N + (r - n));
      if (ob == decode_observe::none) {
        if (fresh) sc[r] = 0.0f;
        continue;
      }
      const float old = fresh ? 0.0f : sc[r];
      float v;
      if (ob == decode_observe::attention) {
        float x = 0.0f;
        for (int64_t q = 0; q < a.p_tokens; ++q) {
          float hs = 0.0f;
          const P* col = pd + b * a.p_sb + q * a.p_st + r * a.p_sd;
#pragma unroll 8
          for (int64_t g = 0; g < G; ++g) hs += to_float(col[(g0 + g) * a.p_sh]);  // (loads hoisted, adds in order)
          x += hs / static_cast<float>(G);
        }
        v = decode_accumulate(old, decode_sanitise(x, why), why);
      } else if (ob == decode_observe::add_scores) {
        v = decode_accumulate(old, decode_sanitise(in[r], why), why);
      } else {
        v = decode_sanitise(in[r], why);
      }
      sc[r] = v;
    }
    __syncthreads();  // the scores are read by other threads below
  }
  int64_t nn = n1;
  // ---- evict
  if (c.policy != decode_policy::amortised) {
    const int64_t pos = c.policy == decode_policy::fixed_position ? a.st.position[s] : 0;
    int64_t k = n1 - decode_target_length(pl, l, n1, N1, a.st.frac_num[s], a.st.frac_den[s], pos);
    if (c.policy == decode_policy::fixed_position && k > 0) {
      decode_move_rows(a, p, l, b, h, sc, sp, n1 - pos - k, [&](int64_t i) { return pos + k + i; },
                       [&](int64_t i) { return pos + i; });
      nn = n1 - k;
    }
    while (c.policy == decode_policy::score && k > 0) {
      const int64_t kr = k < decode_round ? k : decode_round;
      const int64_t lo = c.protect.sinks, end = nn - c.protect.recent;
      unsigned long long K = 0;
      if (kr == 1) {
        long long row = -1;
        decode_block_min(sm, sc, sp, lo, end, K, row);
        if (threadIdx.x == 0) sm.holes[0] = static_cast<int32_t>(row);
        __syncthreads();
      } else {
        K = decode_block_select(sm, sc, sp, lo, end, kr);
        if (decode_block_list(sm, sc, sp, lo, end, K, true, sm.holes, kr) != kr) {
          why = reason::out_of_range;  // cannot happen with unique keys
          break;
        }
      }
      const int32_t* holes = sm.holes;
      if (c.order == decode_order::preserve) {
        const int64_t h0 = holes[0];
        // destination row d = h0 + i takes source row d + #{i' : holes[i'] - i' <= d}
        auto src = [&](int64_t i) {
          const int64_t d = h0 + i;
          int64_t lo2 = 0, hi2 = kr;
          while (lo2 < hi2) {
            const int64_t mid = (lo2 + hi2) >> 1;
            if (holes[mid] - mid <= d) lo2 = mid + 1;
            else hi2 = mid;
          }
          return d + lo2;
        };
        decode_move_rows(a, p, l, b, h, sc, sp, nn - kr - h0, src, [&](int64_t i) { return h0 + i; });
      } else {
        const int64_t bound = end - kr;
        int64_t inside = 0;  // holes below `bound` (a prefix of the sorted holes)
        {
          int64_t lo2 = 0, hi2 = kr;
          while (lo2 < hi2) {
            const int64_t mid = (lo2 + hi2) >> 1;
            if (holes[mid] < bound) lo2 = mid + 1;
            else hi2 = mid;
          }
          inside = lo2;
        }
        if (inside > 0) {  // fillers: the rows of [bound, end) that stay, ascending
          if (kr == 1) {
            if (threadIdx.x == 0) sm.fill[0] = static_cast<int32_t>(end - 1);
            __syncthreads();
          } else if (decode_block_list(sm, sc, sp, bound, end, K, false, sm.fill, kr) != inside) {
            why = reason::out_of_range;
            break;
          }
        }
        const int32_t* fill = sm.fill;
        decode_move_rows(a, p, l, b, h, sc, sp, inside, [&](int64_t i) { return int64_t(fill[i]); },
                         [&](int64_t i) { return int64_t(holes[i]); });
        decode_move_rows(a, p, l, b, h, sc, sp, nn - end, [&](int64_t i) { return end + i; },
                         [&](int64_t i) { return bound + i; });
      }
      nn -= kr;
      k -= kr;
      __syncthreads();
    }
  }
  if (threadIdx.x == 0) {
    a.st.lengths[s] = static_cast<int32_t>(nn);
    a.st.seen[s] = N1;
  }
  decode_block_report(sm, why, a.st.status);
}

// ---- the amortised policy's compression chain --------------------------------------------------------------------

inline constexpr int decode_st_bits = 0;    // unsigned: curve-builder status bits
inline constexpr int decode_st_select = 1;  // int32: selection writer
inline constexpr int decode_st_chain = 2;   // int32: the chain's reason (gate)
inline constexpr int decode_st_words = 8;

//! Arguments of the chain's small kernels.
struct decode_chain_args {
  decode_plan plan;
  decode_state st;
  int64_t batch = 0, capacity = 0;
  int32_t* words = nullptr;     // decode_st_words
  int64_t* seg_begin = nullptr; // (S) sequence-major
  int64_t* seg_len = nullptr;   // (S)
  int32_t* bad = nullptr;       // (S) 1: the segment's length is outside the cache (left alone)
  int64_t* counts = nullptr;    // (P)
  int64_t* poff = nullptr;      // (P + 1)
  int32_t* solve_status = nullptr;  // (P)
  int64_t* keep = nullptr;      // (S)
  int64_t* sel_off = nullptr;   // (S + 1)
  compact_table table;          // the cache's block table (paged caches)
  PREFIXKV_HOST_DEVICE int64_t segments() const { return plan.segments(batch); }
  PREFIXKV_HOST_DEVICE int64_t problems() const { return plan.cfg.rebalance ? batch : segments(); }
  PREFIXKV_HOST_DEVICE segment_grid grid() const { return segment_grid{plan.cfg.layers, batch, plan.seg_heads, true}; }
};

//! One thread per sequence: its segments' rows and its problems' budgets.
template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(128) decode_chain_prologue_kernel(decode_chain_args a) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= a.batch) return;
  const decode_plan& pl = a.plan;
  const segment_grid grid = a.grid();
  const int64_t L = pl.cfg.layers, Hs = pl.seg_heads, T = pl.cfg.max_tokens;
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l)
    for (int64_t h = 0; h < Hs; ++h) {
      const int64_t jj = grid.id(l, b, h), s = pl.state_index(l, b, h), n = a.st.lengths[s];
      const bool bad = !(n >= 0 && n <= a.capacity && decode_pages_ok(a.table, b, n));
      a.seg_begin[jj] = s * T;
      a.seg_len[jj] = bad ? 0 : n;
      a.bad[jj] = bad ? 1 : 0;
      const int64_t cnt = bad ? 0 : decode_compress_count(pl, a.st, l, s);
      if (pl.cfg.rebalance) total += cnt;
      else {
        a.counts[jj] = cnt;
        a.poff[jj] = jj;
      }
    }
  if (pl.cfg.rebalance) {
    a.counts[b] = total;
    a.poff[b] = b * L * Hs;
  }
  if (b == a.batch - 1) a.poff[a.problems()] = a.segments();
}

//! The gate: the first reason any stage reported. On a failure every selection row is emptied (the compaction
//! that follows moves nothing) and the reason goes to the state.
template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(256) decode_chain_gate_kernel(decode_chain_args a) {
  __shared__ int first, best;
  const int64_t S = a.segments(), P = a.problems();
  if (threadIdx.x == 0) {
    const unsigned bits = static_cast<unsigned>(a.words[decode_st_bits]);
    reason r = reason::none;
    if (bits & status_nonfinite) r = reason::nonfinite_input;
    else if (bits & status_negative) r = reason::negative_input;
    else if (bits) r = reason::out_of_range;
    first = static_cast<int>(r);
    best = INT_MAX;
  }
  __syncthreads();
  if (first == 0) {
    int found = INT_MAX;
    for (int64_t q = threadIdx.x; q < P; q += blockDim.x)
      if (a.solve_status[q] != 0 && a.solve_status[q] < found) found = a.solve_status[q];
    if (found != INT_MAX) atomicMin(&best, found);
    __syncthreads();
    if (threadIdx.x == 0) first = best != INT_MAX ? best : a.words[decode_st_select];
    __syncthreads();
  }
  if (first != 0) {
    for (int64_t x = threadIdx.x; x <= S; x += blockDim.x) a.sel_off[x] = 0;
    if (threadIdx.x == 0) {
      a.words[decode_st_chain] = first;
      decode_report(a.st.status, first);
    }
  }
}

//! New lengths (and, with rebalance, new fractions) of the compressed segments.
template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(256) decode_chain_finalize_kernel(decode_chain_args a) {
  const int64_t S = a.segments();
  const int32_t chain = a.words[decode_st_chain];
  if (chain != 0) return;
  const segment_grid grid = a.grid();
  for (int64_t jj = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; jj < S; jj += int64_t(gridDim.x) * blockDim.x) {
    if (a.bad[jj]) continue;
    const int64_t l = grid.layer_of(jj), b = grid.batch_of(jj), h = grid.head_of(jj);
    const int64_t s = a.plan.state_index(l, b, h);
    a.st.lengths[s] = static_cast<int32_t>(a.keep[jj]);
    if (a.plan.cfg.rebalance) {
      a.st.frac_num[s] = a.keep[jj];
      a.st.frac_den[s] = decode_fraction_den(a.st.seen[s], a.plan.cfg.horizon);
    }
  }
}

}  // namespace detail
PREFIXKV_NAMESPACE_END
