//! \file prefixkv/solve/solve.cuh
//! The exact global prefix solver on the device: one kernel launch for P independent problems, no host sync,
//! graph-capturable. Same semantics and bit-identical keep counts as `prefixkv::solve_host` (solve.hpp).
//!
//! Algorithm. On sm_90 the launch is a thread-block cluster launch (16 or 8 CTAs, from the device and P): a problem
//! whose candidates fit the cluster's shared memory (<= 1024 segments) is solved by one cluster (`cluster path`,
//! below: slices of the candidates bulk-loaded by all CTAs at once, an exact 4-pass radix selection whose
//! per-digit counts are binary searches in sorted runs, exchanged across the cluster through distributed shared
//! memory with mbarrier-signalled asynchronous stores).
//! Every other problem is solved by one block of 512 threads (grid-stride over problems):
//! 1. per-problem totals (tokens, candidates, bounds) and the budget -> R = candidates still to pick;
//! 2. sample-select fast path (problems of <= 512 segments, see `sample_select`): per level, m samples of every
//!    segment's window at one stride D; two radix selections (8-bit digits) over the samples in shared memory
//!    give keys L* / H* with count(L*) < R <= count(H*), which cut every window to about 3 strides; when all
//!    windows fit in shared memory they are gathered and v is one more radix selection there. 1-3 levels, one
//!    global round trip each, no per-probe binary searches;
//! 3. general path (large problems, or windows that stop shrinking because of massive exact ties): a sample of
//!    every row in shared memory, then 256-way rounds over the key space where count(t) = sum_s #eligible ranks
//!    with key <= t is a binary search per segment (sample, then the short global window between two samples);
//! 4. every segment keeps lo_s + #(eligible keys < v) + its share of the keys == v, shares handed out in
//!    segment order (a block scan), which is the (e, s, r) lexicographic tie break.
//! All paths compute the same v (the smallest key with count(v) >= R) and the same counts.
//!
//! \code
//! size_t bytes = 0;
//! auto budget = prefixkv::budget_evict_ratio(0.5);
//! prefixkv::solve(nullptr, bytes, d_curves, P, d_problem_offsets, budget, {}, d_keep, d_thr, d_status, stream);
//! cudaMallocAsync(&d_temp, bytes, stream);
//! prefixkv::solve(d_temp, bytes, d_curves, P, d_problem_offsets, budget, {}, d_keep, d_thr, d_status, stream);
//! \endcode
#pragma once

#include "../core/launch.cuh"
#include "../core/workspace.hpp"
#include "../select/block_util.cuh"
#include "solve.hpp"

#include <cooperative_groups.h>

#include <atomic>

PREFIXKV_NAMESPACE_BEGIN

//! Compile-time launch policy of the device solver. `prefixkv::solve` uses `solve_policy<>` (the cluster path
//! where a problem fits, sample-select for the others, the general path where sample-select cannot decide);
//! tests and benchmarks instantiate others through `detail::solve_dispatch<Policy>` to run every path on the
//! same inputs. Every policy gives the same answers.
//! * `Clusters`: problems that fit a thread-block cluster's shared memory take the cluster path (sm_90);
//!   false: every problem takes the block path.
//! * `SampleSelect`: the block path starts with sample-select; false: the general path alone.
//! * `ClusterSize`: 0 = chosen from the device and the problem count; 2, 4, 8 or 16 = that size where the
//!   device can co-schedule it.
//! * `KeyCap`: 0 = the device's shared-memory key budget per block and per CTA; >= 4096 = a smaller one (more
//!   sample-select levels; problems over ClusterSize x KeyCap candidates leave the cluster path).
template <bool Clusters = true, bool SampleSelect = true, int ClusterSize = 0, int KeyCap = 0>
struct solve_policy {
  static constexpr bool clusters = Clusters;
  static constexpr bool sample_select = SampleSelect;
  static constexpr int cluster_size = ClusterSize;
  static constexpr int key_cap = KeyCap;
};

namespace detail {

// 512 threads leave 128 registers per thread; at 1024 (64 registers) the kernel spilled ~750 bytes per thread
// to local memory and every path ran 3-5x slower (docs/performance.md, designs measured and not kept).
inline constexpr int solve_threads = 512;
static_assert(solve_threads % 256 == 0 && solve_threads <= 1024, "solve_threads: a multiple of 256, at most 1024");
inline constexpr int solve_probes = 256;                    // thresholds evaluated per round
inline constexpr int solve_parts = solve_threads / solve_probes;
inline constexpr int solve_seg_cap = 1024;                  // segment metadata cached in shared memory
inline constexpr int solve_batch = 4;                       // searches interleaved per thread
inline constexpr size_t solve_meta_bytes = solve_seg_cap * (sizeof(int64_t) + 6 * sizeof(int32_t));
inline constexpr int solve_min_keys = 4096;                 // shared-memory keys needed at the least
inline constexpr int solve_max_keys = 49152;

struct solve_smem_view {
  int64_t* off;    // (seg_cap) first flat rank of each segment
  int32_t* cnt;    // (seg_cap) candidates
  int32_t* lo;     // (seg_cap) clipped lower bound
  int32_t* hi;     // (seg_cap) clipped upper bound
  int32_t* wa;     // (seg_cap) window begin (fast path)
  int32_t* wb;     // (seg_cap) window end (fast path)
  int32_t* goff;   // (seg_cap) gathered-key offset of each window (fast path)
  uint32_t* keys;  // (key_cap) sampled or gathered keys
};

// Metadata of local segment i of the problem starting at segment s0.
struct seg_info {
  int64_t off;
  int32_t c, lo, hi;
};

__device__ inline seg_info load_seg(const curve_set& cv, const keep_bounds& bnd, int64_t s0, int64_t i, bool cached,
                                    const solve_smem_view& sm) {
  seg_info g;
  if (cached) {
    g.off = sm.off[i];
    g.c = sm.cnt[i];
    g.lo = sm.lo[i];
    g.hi = sm.hi[i];
  } else {
    const int64_t s = s0 + i;
    g.off = cv.offsets[s];
    const int64_t c = cv.offsets[s + 1] - g.off;
    int64_t lo, hi;
    segment_bounds(bnd, s, c, lo, hi);
    g.c = static_cast<int32_t>(c);
    g.lo = static_cast<int32_t>(lo);
    g.hi = static_cast<int32_t>(hi);
  }
  return g;
}

// Eligible ranks (in [lo, hi)) with key <= t, for `solve_batch` segments at once (interleaved for latency).
// Segments i = first + k * stride for k < batch with i < ns.
__device__ inline long long count_le_batch(const curve_set& cv, const keep_bounds& bnd, int64_t s0, int64_t ns,
                                           int64_t first, int64_t stride, int64_t t, bool cached, int m,
                                           const solve_smem_view& sm) {
  int64_t a[solve_batch], len[solve_batch], base[solve_batch];
  int32_t lo[solve_batch], hi[solve_batch];
  long long total = 0;
  if (t < 0) return 0;
#pragma unroll
  for (int k = 0; k < solve_batch; ++k) {
    const int64_t i = first + k * stride;
    len[k] = 0;
    a[k] = 0;
    lo[k] = hi[k] = 0;
    base[k] = 0;
    if (i < ns) {
      const seg_info g = load_seg(cv, bnd, s0, i, cached, sm);
      lo[k] = g.lo;
      hi[k] = g.hi;
      base[k] = g.off;
      if (g.hi > g.lo) {
        // window from the sample: samples q < m sit at ranks b_q = (q + 1) * c / (m + 1)
        int qa = 0, qn = m;
        const uint32_t* smp = sm.keys + i * m;
        while (qn > 0) {
          const int h = qn >> 1;
          if (static_cast<int64_t>(smp[qa + h]) <= t) {
            qa += h + 1;
            qn -= h + 1;
          } else {
            qn = h;
          }
        }
        const int64_t c = g.c;
        int64_t lower = qa > 0 ? (static_cast<int64_t>(qa) * c) / (m + 1) + 1 : 0;
        int64_t upper = qa < m ? (static_cast<int64_t>(qa + 1) * c) / (m + 1) : c;
        // only [lo, hi) matters
        if (lower < g.lo) lower = g.lo;
        if (upper > g.hi) upper = g.hi;
        if (upper < lower) upper = lower;
        a[k] = lower;
        len[k] = upper - lower;
      }
    }
  }
  bool more = true;
  while (more) {
    more = false;
#pragma unroll
    for (int k = 0; k < solve_batch; ++k) {
      if (len[k] > 0) {
        const int64_t h = len[k] >> 1;
        const int64_t r = a[k] + h;
        const float e = r == 0 ? 0.0f : __ldg(cv.cumulative + base[k] + r - 1);
        if (static_cast<int64_t>(order_key(e)) <= t) {
          a[k] = r + 1;
          len[k] -= h + 1;
        } else {
          len[k] = h;
        }
        more |= len[k] > 0;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < solve_batch; ++k) {
    if (first + k * stride < ns && hi[k] > lo[k]) {
      // a[k] = first rank in the window with key > t; ranks below the window are <= t (or below lo)
      int64_t ub = a[k];
      if (ub < lo[k]) ub = lo[k];
      if (ub > hi[k]) ub = hi[k];
      total += ub - lo[k];
    }
  }
  return total;
}

struct solve_shared {
  block_scratch sc;
  long long part[solve_parts][solve_probes];
  long long newL, newH;
  long long red[solve_threads / 32][6];  // per-warp partials of the prologue reduction
};

// One segment's share of a problem's validation reduction, red = {tokens, candidates, sum lo, sum hi, bad shape,
// bad bounds}; returns its candidate offset o, count c and kept-candidate bounds [lo, hi].
__device__ inline void segment_meta(const curve_set& cv, const keep_bounds& bnd, int64_t s, long long (&red)[6],
                                    int64_t& o, int64_t& c, int64_t& lo, int64_t& hi) {
  o = cv.offsets[s];
  c = cv.offsets[s + 1] - o;
  const int64_t n = cv.tokens[s];
  lo = 0;
  hi = 0;
  if (n < 0 || c != candidate_count(n, cv.protect)) red[4] = 1;
  if (!segment_bounds(bnd, s, c, lo, hi)) red[5] = 1;
  red[0] += n;
  red[1] += c;
  red[2] += lo;
  red[3] += hi;
}

// Block reduction of N values in one pass (2 barriers): the first NMAX values are maximised, the others summed;
// every thread gets all N results.
template <int NMAX = 0, int N>
__device__ inline void block_sums(long long (&v)[N], solve_shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) {
      const long long o = __shfl_xor_sync(0xFFFFFFFFu, v[j], d);
      v[j] = j < NMAX ? (o > v[j] ? o : v[j]) : v[j] + o;
    }
  __syncthreads();  // protect sh.red from a previous use
  if (lane == 0)
#pragma unroll
    for (int j = 0; j < N; ++j) sh.red[warp][j] = v[j];
  __syncthreads();
#pragma unroll
  for (int j = 0; j < N; ++j) {
    long long t = sh.red[0][j];
    for (int w = 1; w < solve_threads / 32; ++w) {
      const long long o = sh.red[w][j];
      t = j < NMAX ? (o > t ? o : t) : t + o;
    }
    v[j] = t;
  }
}

// Keys <= t in a sorted shared-memory window of w keys.
__device__ inline long long window_le(const uint32_t* k, int32_t w, long long t) {
  int a = 0, n = w;
  while (n > 0) {
    const int h = n >> 1;
    if (static_cast<long long>(k[a + h]) <= t) {
      a += h + 1;
      n -= h + 1;
    } else {
      n = h;
    }
  }
  return a;
}

//! One round of the 256-way search on [L, H): every thread has stored its partial count of keys <= tp(probe) in
//! sh.part[part][probe]. Add the parts up (plus `base`), find the first probe whose count reaches R and narrow
//! [L, H) to the interval that ends at it. `tp` is this thread's probe value (threads tid < solve_probes own
//! probe tid). Block-uniform: every thread returns the same new bounds.
__device__ inline void narrow_to_probe(solve_shared& sh, long long base, long long R, long long tp, long long& L,
                                       long long& H) {
  const int tid = static_cast<int>(threadIdx.x);
  __syncthreads();
  if (tid < solve_probes) {
    long long tot = base;
#pragma unroll
    for (int k = 0; k < solve_parts; ++k) tot += sh.part[k][tid];
    sh.part[0][tid] = tot;
  }
  __syncthreads();
  if (tid < solve_probes) {
    const long long tot = sh.part[0][tid];
    const bool prev_short = tid == 0 || sh.part[0][tid - 1] < R;
    if (tot >= R && prev_short) {
      sh.newH = tp;
      sh.newL = tid == 0 ? L : L + (tid * (H - L) + solve_probes - 1) / solve_probes;
    }
  }
  __syncthreads();
  L = sh.newL;
  H = sh.newH;
  __syncthreads();
}

//! Copy every segment's key window into shared memory, back to back: window i (ranks [wa[i], ...)) lands at
//! keys[goff[i] ...]; W keys in all. Each thread keeps `Unroll` independent global loads in flight.
template <int Unroll>
__device__ inline void gather_window_keys(const curve_set& cv, int64_t ns, long long W, const solve_smem_view& sm) {
  const int tid = static_cast<int>(threadIdx.x);
  for (long long b0 = tid; b0 < W; b0 += solve_threads * Unroll) {
    uint32_t kk[Unroll];
#pragma unroll
    for (int u = 0; u < Unroll; ++u) {
      const long long idx = b0 + u * solve_threads;
      kk[u] = 0;
      if (idx < W) {
        int lo = 0, n = static_cast<int>(ns);  // last window with goff <= idx
        while (n > 0) {
          const int h = n >> 1;
          if (sm.goff[lo + h] <= idx) {
            lo += h + 1;
            n -= h + 1;
          } else {
            n = h;
          }
        }
        const int i = lo - 1;
        kk[u] = entry_key(cv.cumulative + sm.off[i], sm.wa[i] + (idx - sm.goff[i]));
      }
    }
#pragma unroll
    for (int u = 0; u < Unroll; ++u)
      if (b0 + u * solve_threads < W) sm.keys[b0 + u * solve_threads] = kk[u];
  }
}

// ---- sample-select fast path ----------------------------------------------------------------------------------

inline constexpr int solve_sel_samples = 8192;   // shared-memory samples per narrowing level (at most)
inline constexpr int solve_sel_max_m = 512;      // samples per segment window (a power of two >= 32)
inline constexpr int solve_sel_min_m = 32;
inline constexpr int solve_sel_max_levels = 6;

// State of up to two concurrent radix selections (8-bit digits, 4 passes) over keys in shared memory.
struct solve_select_state {
  alignas(16) uint32_t hist[2][2][256];  // [selection][buffer][digit]
  uint32_t prefix[2];        // key bits decided so far
  uint32_t rem[2];           // 1-based rank still to find among keys matching the prefix
};

// k-th smallest (1-based, k[s] in [1, n]) of n keys in shared memory, for NS <= 2 ranks at once; every thread of
// the block calls it and gets the keys in out[]. Counting uses runs of equal digits along each warp's 32
// consecutive keys (keys are mostly sorted runs, so a run is counted with at most two shared atomics: -first
// lane at its start, +last lane + 1 at its end), no per-key atomics on a few hot bins. 1 + 2 * 4 barriers.
template <int NS>
__device__ inline void block_select(const uint32_t* keys, int n, const uint32_t (&k)[NS], uint32_t (&out)[NS],
                                    solve_select_state& st) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int x = tid; x < NS * 256; x += solve_threads) st.hist[x >> 8][0][x & 255] = 0;
  if (tid < NS) {
    st.prefix[tid] = 0;
    st.rem[tid] = k[tid];
  }
  __syncthreads();
#pragma unroll 1
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass, buf = pass & 1;
    const uint32_t hi_mask = pass == 0 ? 0u : (0xFFFFFFFFu << (shift + 8));
    uint32_t pre[NS];
#pragma unroll
    for (int s = 0; s < NS; ++s) pre[s] = st.prefix[s];
    for (int base = warp * 32; base < n; base += solve_threads) {
      const int idx = base + lane;
      const bool valid = idx < n;
      const uint32_t key = valid ? keys[idx] : 0u;
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        const uint32_t code = valid && ((key ^ pre[s]) & hi_mask) == 0 ? (key >> shift) & 255u : 0x100u;
        const uint32_t up = __shfl_up_sync(0xFFFFFFFFu, code, 1), dn = __shfl_down_sync(0xFFFFFFFFu, code, 1);
        if (code != 0x100u) {
          const bool start = lane == 0 || up != code, end = lane == 31 || dn != code;
          const uint32_t delta = (end ? uint32_t(lane + 1) : 0u) - (start ? uint32_t(lane) : 0u);
          if (delta != 0u) atomicAdd(&st.hist[s][buf][code], delta);
        }
      }
    }
    __syncthreads();
    if (warp < NS) {
      const int s = warp;
      uint32_t v[8];
      uint32_t run = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        v[j] = st.hist[s][buf][lane * 8 + j];
        run += v[j];
        st.hist[s][buf ^ 1][lane * 8 + j] = 0;  // the next pass's buffer
      }
      uint32_t incl = run;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const uint32_t o = __shfl_up_sync(0xFFFFFFFFu, incl, d);
        if (lane >= d) incl += o;
      }
      const uint32_t rem = st.rem[s];
      __syncwarp();  // every lane has read rem before one lane rewrites it
      uint32_t before = incl - run;
      if (before < rem && rem <= incl) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (before < rem && rem <= before + v[j]) {
            st.prefix[s] |= uint32_t(lane * 8 + j) << shift;
            st.rem[s] = rem - before;
          }
          before += v[j];
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int s = 0; s < NS; ++s) out[s] = st.prefix[s];
}

// Sample-select fast path (ns <= solve_threads: one thread per segment; ns * solve_sel_min_m <= key_cap).
// Windows [wa_i, wb_i) (initially [lo_i, hi_i)) with the invariant: for t in [L, H], count(t) = sum_i (wa_i - lo_i)
// + #(window keys <= t), count(L) < R <= count(H) (L, H implicit). One level: m samples per window at ranks
// wa_i + q * D (one stride D = ceil(max window / m) for all), invalid slots = 0xFFFFFFFF. With Q(t) = #samples
// <= t and R' = R - base: count(t) - base <= D * Q(t) and >= D * (Q(t) - active windows). So
// L* = (floor((R'-1)/D) + 1)-th smallest sample - 1 has count < R, and H* = (ceil(R'/D) + active)-th smallest
// sample has count >= R; the new windows run from just after the last sample <= L* to the first sample > H*
// (total about 3 * ns * D keys). Levels repeat until all windows fit `key_cap`; then the windows are gathered and
// v = the (R - base)-th smallest gathered key. Returns false (nothing decided) if windows stop shrinking.
__device__ inline bool sample_select(const curve_set& cv, int64_t ns, long long R, int key_cap,
                                     const solve_smem_view& sm, solve_shared& sh, solve_select_state& st,
                                     int64_t& v_out) {
  const int tid = threadIdx.x;
  const bool mine = tid < ns;  // one thread per segment (ns <= solve_threads)
  int32_t a = 0, b = 0;
  if (mine) {
    a = sm.lo[tid];
    b = sm.hi[tid];
  }
  const int samples_cap = key_cap < solve_sel_samples ? key_cap : solve_sel_samples;
  int lm = 5;  // log2(m)
  while ((2 << lm) <= solve_sel_max_m && (static_cast<long long>(ns) << (lm + 1)) <= samples_cap) ++lm;
  const int m = 1 << lm;
  long long prevW = 0x7FFFFFFFFFFFFFFFll;
  for (int level = 0;; ++level) {
    const int32_t w = b - a;
    // total window keys, widest window, non-empty windows, windows' offset from lo (one block reduction)
    long long red[4] = {w, w, w > 0 ? 1 : 0, mine ? a - sm.lo[tid] : 0};
    block_sums<1>(red, sh);
    const long long maxw = red[0], W = red[1], active = red[2];
    if (W <= key_cap) break;
    if (level >= solve_sel_max_levels || 2 * W > prevW) return false;
    prevW = W;
    const long long D = (maxw + m - 1) >> lm;
    if (mine) {
      sm.wa[tid] = a;
      sm.wb[tid] = b;
    }
    __syncthreads();
    const int total = static_cast<int>(ns) << lm;
    for (int b0 = tid; b0 < total; b0 += solve_threads * 8) {
      uint32_t kk[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int idx = b0 + u * solve_threads;
        kk[u] = 0xFFFFFFFFu;
        if (idx < total) {
          const int i = idx >> lm, q = idx & (m - 1);
          const int64_t A = sm.wa[i], r = static_cast<int64_t>(q) * D;
          if (r < sm.wb[i] - A) kk[u] = entry_key(cv.cumulative + sm.off[i], A + r);
        }
      }
#pragma unroll
      for (int u = 0; u < 8; ++u)
        if (b0 + u * solve_threads < total) sm.keys[b0 + u * solve_threads] = kk[u];
    }
    __syncthreads();
    const long long base = red[3];
    const long long Rp = R - base;  // >= 1 by the invariant
    const long long kL = (Rp - 1) / D + 1;
    const long long kH = (Rp + D - 1) / D + active;
    uint32_t ks[2], vs[2];
    ks[0] = static_cast<uint32_t>(kL);
    ks[1] = static_cast<uint32_t>(kH <= total ? kH : total);
    block_select<2>(sm.keys, total, ks, vs, st);
    const long long Ls = static_cast<long long>(vs[0]) - 1;
    const long long Hs = kH <= total ? static_cast<long long>(vs[1]) : 0x100000000ll;
    if (mine && b > a) {
      const uint32_t* smp = sm.keys + (static_cast<int64_t>(tid) << lm);
      const long long qa = window_le(smp, m, Ls), qb = window_le(smp, m, Hs);
      const long long na = qa > 0 ? a + (qa - 1) * D + 1 : a;
      long long nb = a + qb * D;
      if (nb > b) nb = b;
      a = static_cast<int32_t>(na);
      b = static_cast<int32_t>(nb < na ? na : nb);
    }
    __syncthreads();  // samples read before the next level overwrites them
  }
  if (mine) {
    sm.wa[tid] = a;
    sm.wb[tid] = b;
  }
  // gather the windows' keys
  long long W = 0;
  const long long g_mine = block_exclusive_sum(mine ? b - a : 0, W, sh.sc);  // (syncs: wa/wb visible)
  if (mine) sm.goff[tid] = static_cast<int32_t>(g_mine);
  __syncthreads();
  gather_window_keys<8>(cv, ns, W, sm);
  const long long base = block_sum(mine ? a - sm.lo[tid] : 0, sh.sc);  // (syncs: keys visible)
  uint32_t ks[1] = {static_cast<uint32_t>(R - base)}, vs[1];
  block_select<1>(sm.keys, static_cast<int>(W), ks, vs, st);
  v_out = static_cast<int64_t>(vs[0]);
  return true;
}


// One problem solved by one block (sample-select, general path where it cannot decide; `sample_select` false:
// the general path alone).
// Not inlined into solve_kernel (a template, like the kernels, so that several translation units may include it):
// inlined, the two paths together spilled registers in the cluster path's passes (~2 us at 32 x 4K); apart,
// neither spills (the kernel's parameters are __grid_constant__, so passing them by reference copies nothing).
template <int = 0>
__device__ __noinline__ void solve_block_problem(const curve_set& cv, int64_t p, const int64_t* poff,
                                                 const solve_budget& bud, const keep_bounds& bnd, int64_t* keep,
                                                 float* thr, int32_t* status, int key_cap, bool sample_select_on,
                                                 const solve_smem_view sm, solve_shared& sh, solve_select_state& sst) {
  const int tid = threadIdx.x;
  const int64_t S = cv.count;
  const int64_t s0 = poff ? poff[p] : 0, s1 = poff ? poff[p + 1] : S;
  if (s0 < 0 || s1 < s0 || s1 > S) {
    if (tid == 0) {
      if (status) status[p] = static_cast<int32_t>(reason::out_of_range);
      if (thr) thr[p] = 0.0f;
    }
    return;
  }
  const int64_t ns = s1 - s0;
  const bool cached = ns <= solve_seg_cap;

  // 1. totals and validity (one block reduction)
  long long red[6] = {0, 0, 0, 0, 0, 0};  // tokens, candidates, sum lo, sum hi, bad shape, bad bounds
  for (int64_t i = tid; i < ns; i += solve_threads) {
    int64_t o, c, lo, hi;
    segment_meta(cv, bnd, s0 + i, red, o, c, lo, hi);
    if (cached) {
      sm.off[i] = o;
      sm.cnt[i] = static_cast<int32_t>(c);
      sm.lo[i] = static_cast<int32_t>(lo);
      sm.hi[i] = static_cast<int32_t>(hi);
    }
  }
  block_sums(red, sh);
  problem_totals t;
  t.tokens = red[0];
  t.candidates = red[1];
  t.lo = red[2];
  t.hi = red[3];
  const long long shape_err = red[4], bounds_err = red[5];
  int64_t B = 0;
  reason why = shape_err ? reason::shape_mismatch
                         : (bounds_err ? reason::infeasible_bounds : problem_budget(bud, p, t, B));
  if (why != reason::none) {
    // Safe fallback: a rejected problem keeps every token.
    for (int64_t i = tid; i < ns; i += solve_threads) keep[s0 + i] = cv.tokens[s0 + i];
    if (tid == 0) {
      if (status) status[p] = static_cast<int32_t>(why);
      if (thr) thr[p] = 0.0f;
    }
    __syncthreads();
    return;
  }
  const int64_t R = B - t.lo;
  int64_t v = -1;
  bool gathered = false;
  if (R > 0 && sample_select_on && ns <= solve_threads && ns * solve_sel_min_m <= key_cap) {
    gathered = sample_select(cv, ns, R, key_cap, sm, sh, sst, v);
  }
  long long H0 = 0;  // largest eligible key (the general path searches [0, H0])
  if (R > 0 && !gathered) {
    long long maxkey = 0;
    for (int64_t i = tid; i < ns; i += solve_threads) {
      const seg_info g = load_seg(cv, bnd, s0, i, cached, sm);
      if (g.hi > g.lo) {
        const long long k = order_key(entry_value(cv.cumulative + g.off, g.hi - 1));
        maxkey = k > maxkey ? k : maxkey;
      }
    }
    H0 = block_max(maxkey, sh.sc);
  }
  const int m = static_cast<int>(ns > 0 && ns <= key_cap ? key_cap / ns : 0);
  if (R > 0 && !gathered) {
    // 2. samples
    for (int64_t idx = tid; idx < ns * m; idx += solve_threads) {
      const int64_t i = idx / m, q = idx % m;
      const seg_info g = load_seg(cv, bnd, s0, i, cached, sm);
      const int64_t b = ((q + 1) * g.c) / (m + 1);
      sm.keys[idx] = g.c > 0 ? order_key(entry_value(cv.cumulative + g.off, b)) : 0xFFFFFFFFu;
    }
    __syncthreads();
    // 3. 256-way search: count(L) < R <= count(H)
    long long L = -1, H = H0;
    const int probe = tid % solve_probes, part = tid / solve_probes;
    while (H - L > 1) {
      const long long W = H - L;
      const long long tp = L + ((probe + 1) * W + solve_probes - 1) / solve_probes;
      long long acc = 0;
      for (int64_t first = part; first < ns; first += int64_t(solve_parts) * solve_batch)
        acc += count_le_batch(cv, bnd, s0, ns, first, solve_parts, tp, cached, m, sm);
      sh.part[part][probe] = acc;
      narrow_to_probe(sh, 0, R, tp, L, H);
    }
    v = H;
  }
  // eligible ranks of local segment i with key <= t (t in [v - 1, v])
  auto seg_le = [&](int64_t i, long long t) -> long long {
    if (gathered) {
      const int32_t a = sm.wa[i], w = sm.wb[i] - a;
      return (a - sm.lo[i]) + window_le(sm.keys + sm.goff[i], w, t);
    }
    return count_le_batch(cv, bnd, s0, ns, i, ns, t, cached, m, sm);
  };
  // 4. per-segment keep counts, ties handed out in segment order
  long long rem_less = 0;
  {
    long long less_local = 0;
    for (int64_t i = tid; i < ns; i += solve_threads)
      if (R > 0) less_local += seg_le(i, v - 1);
    rem_less = block_sum(less_local, sh.sc);
  }
  const long long rem = R - rem_less;  // picks among keys == v
  long long carry = 0;
  for (int64_t c0 = 0; c0 < ns; c0 += solve_threads) {
    const int64_t i = c0 + tid;
    long long less = 0, eq = 0;
    int64_t lo = 0, c = 0;
    if (i < ns) {
      const seg_info g = load_seg(cv, bnd, s0, i, cached, sm);
      lo = g.lo;
      c = g.c;
      if (R > 0) {
        less = seg_le(i, v - 1);
        eq = seg_le(i, v) - less;
      }
    }
    long long chunk_total = 0;
    const long long before = carry + block_exclusive_sum(eq, chunk_total, sh.sc);
    carry += chunk_total;
    if (i < ns) {
      long long take = rem - before;
      take = take < 0 ? 0 : (take > eq ? eq : take);
      keep[s0 + i] = (cv.tokens[s0 + i] - c) + lo + less + take;
    }
  }
  if (tid == 0) {
    if (status) status[p] = 0;
    if (thr) thr[p] = R > 0 ? key_value(static_cast<uint32_t>(v)) : 0.0f;
  }
  __syncthreads();
}

// ---- cluster path ---------------------------------------------------------------------------------------------
// One thread-block cluster per problem whose candidates fit the cluster's shared memory (csize * ckey_cap keys,
// at most solve_seg_cap segments). CTA r copies the contiguous slice [r*T/cs, (r+1)*T/cs) of the problem's flat
// candidate array once (a bulk copy, see Load; all CTAs in parallel, so the cold load is spread over cs SMs). The
// slice is a concatenation of sorted runs (one per segment it touches, cut to the eligible ranks [lo, hi)). v is
// found by a radix selection over the union with 8-bit digits, 4 passes: the count of eligible keys below each of
// the 255 digit boundaries prefix + d * 2^shift is a binary search per run (no histogram atomics: runs are
// sorted), the per-CTA counts are pushed to every CTA through distributed shared memory and summed there, and
// every CTA picks the same digit. Then per run #keys < v and #keys == v go to CTA 0 (remote atomics per segment),
// which hands out the keys == v in segment order (the (e, s, r) tie break) and writes the keep counts.
//
// Keys. The passes first run on the raw bits of the entry values: for floats without the sign bit (every curve
// built from scores) they are ordered like the floats. Pass 0's boundary 128 << 24 = 0x80000000 counts the keys
// without the sign bit; if that is not every key (a negative value or -0 in a hand-made curve), every CTA sees it
// in the same totals, converts its keys to ordered keys (order_key) and runs pass 0 again.
//
// Exchange. A cluster barrier costs ~0.7 us on an H100 (bench_solve's BM_floor), about as much as a whole pass's
// searches, so the passes do without: each CTA's 1 KB of counts goes to every CTA with st.async stores that
// complete bytes on the receiver's mbarrier, and a CTA reads its gather buffer as soon as its own mbarrier says
// that every taking-part CTA's KB has arrived. Two buffers (and two mbarriers) alternate by pass: a CTA pushes
// into a buffer of pass k + 2 only after its own pass k + 1 completed, i.e. after every CTA pushed pass k + 1,
// which each did after reading its pass k buffer. The first push of a problem waits for the split cluster barrier
// begun once the problem is accepted (every CTA is running, its mbarriers initialised; every CTA is done with the
// previous problem). A problem that fits 8 CTAs takes only 8 of a 16-CTA cluster (half the exchange traffic); the
// other 8 just join the problem's two cluster barriers. The final per-segment sums still end with a cluster
// barrier (an mbarrier hand-off measured slower).
//
// Load. The slice's 16-byte aligned middle is one bulk copy (TMA) completing on the CTA's mbarrier `mload`:
// measured ~0.9 us sooner than 4-byte cp.async copies, which load only the at most 3 + 3 words around it.

inline constexpr int solve_cluster_max = 16;

// 4-byte asynchronous copy global -> shared (no registers held while the load is in flight).
__device__ inline void cp_async4(void* smem, const void* gmem) {
  const unsigned sa = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(sa), "l"(gmem) : "memory");
}

struct solve_cluster_shared {
  alignas(16) uint32_t gather[2][solve_cluster_max][256];  // [buffer][rank][d]: #keys < boundary d in CTA rank, pushed by that CTA
  alignas(8) unsigned long long mbar[2];  // per gather buffer: completes when every CTA's counts are in it
  unsigned long long mload;     // the slice's bulk copy has landed
  uint32_t cnt[257];            // cluster totals of the current pass (at most csize * key_cap)
  int16_t rseg[solve_seg_cap];  // run -> local segment
  int32_t acc[solve_seg_cap];   // (CTA 0) per segment: eligible keys < v
  int32_t eqa[solve_seg_cap];   // (CTA 0) per segment: eligible keys == v
  uint32_t prefix;
  long long c_low, c_high;
};
// bytes of dynamic shared memory in front of the keys
inline constexpr size_t solve_cluster_bytes = (sizeof(solve_cluster_shared) + 15) / 16 * 16;

// #keys < t1 in the sorted run k1[0, n1) and #keys < t2 in k2[0, n2): two binary searches interleaved (their
// shared-memory latencies overlap).
__device__ inline void run_lower2(const uint32_t* k1, int n1, uint32_t t1, const uint32_t* k2, int n2, uint32_t t2,
                                  int& a1, int& a2) {
  a1 = 0;
  a2 = 0;
  while (n1 > 0 || n2 > 0) {
    const int h1 = n1 >> 1, h2 = n2 >> 1;
    const bool r1 = n1 > 0 && k1[a1 + h1] < t1;
    const bool r2 = n2 > 0 && k2[a2 + h2] < t2;
    a1 = r1 ? a1 + h1 + 1 : a1;
    n1 = r1 ? n1 - h1 - 1 : h1;
    a2 = r2 ? a2 + h2 + 1 : a2;
    n2 = r2 ? n2 - h2 - 1 : h2;
  }
}

// barrier.cluster in two halves (every thread of the cluster arrives; wait returns when all have arrived)
__device__ inline void cluster_arrive_relaxed() { asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory"); }
__device__ inline void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }

// mbarriers of the exchange (sm_90): 32-bit shared-window addresses, as PTX takes them.
__device__ inline uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ inline void mbar_init(uint32_t bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(arrivals) : "memory");
}
__device__ inline void mbar_inval(uint32_t bar) { asm volatile("mbarrier.inval.shared::cta.b64 [%0];" ::"r"(bar) : "memory"); }
// the initialisations visible to the cluster's other CTAs (before the cluster barrier that publishes them)
__device__ inline void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
// this CTA's one arrival of the phase, announcing `bytes` still to come from st.async stores
__device__ inline void mbar_expect(uint32_t bar, uint32_t bytes) {
  asm volatile("{\n\t.reg .b64 st;\n\tmbarrier.arrive.expect_tx.release.cta.shared::cta.b64 st, [%0], %1;\n\t}" ::"r"(bar),
               "r"(bytes)
               : "memory");
}
// wait until the phase of the given parity has completed (acquire at cluster scope: the st.async data is visible)
__device__ inline void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// bulk copy (TMA) of `bytes` (a multiple of 16, both addresses 16-byte aligned) global -> this CTA's shared
// memory, completing the bytes on the local mbarrier `bar`
__device__ inline void bulk_load(void* smem, const void* gmem, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_addr(smem)),
               "l"(gmem), "r"(bytes), "r"(bar)
               : "memory");
}
// 16 bytes into CTA `rank`'s shared memory at the address of `local` there, completing 16 bytes on that CTA's
// mbarrier at the address of `local_bar` there
__device__ inline void st_async16(const void* local, const void* local_bar, int rank, uint4 v) {
  uint32_t ra, rb;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(ra) : "r"(smem_addr(local)), "r"(rank));
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(rb) : "r"(smem_addr(local_bar)), "r"(rank));
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];" ::"r"(ra),
               "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(rb)
               : "memory");
}

// Does problem p go to the cluster path? Uniform over the cluster (every CTA reads the same values).
__device__ inline bool solve_cluster_fits(const curve_set& cv, int64_t P, const int64_t* poff, int64_t p, int csize,
                                          int key_cap, int64_t& s0, int64_t& s1) {
  const int64_t S = cv.count;
  s0 = poff ? poff[p] : 0;
  s1 = poff ? poff[p + 1] : S;
  if (s0 < 0 || s1 < s0 || s1 > S || s1 - s0 > solve_seg_cap) return false;
  if (s1 == s0) return true;
  const int64_t T = cv.offsets[s1] - cv.offsets[s0];
  return T >= 0 && T <= static_cast<int64_t>(csize) * key_cap;
}

// `ph` holds the parity of the next phase of this CTA's mbarriers over the launch: bit b for mbar[b], bit 2 for
// mload. `ckey_cap`: keys per CTA.
template <class Cluster>
__device__ inline void solve_cluster_problem(const Cluster& cluster, const curve_set& cv, int64_t p, int64_t s0,
                                             int64_t s1, const solve_budget& bud, const keep_bounds& bnd,
                                             int64_t* keep, float* thr, int32_t* status, const solve_smem_view& sm_in,
                                             solve_shared& sh, solve_select_state& sst, solve_cluster_shared& cs,
                                             int ckey_cap, uint32_t& ph) {
  // partial counts per digit and thread group (the radix-select state is free here: 4 x 256 words)
  constexpr int nparts = solve_threads / 256;
  static_assert(nparts <= 4, "solve_select_state holds 4 x 256 partial counts");
  uint32_t(*part)[256] = &sst.hist[0][0];
  const int tid = threadIdx.x;
  const int rank = static_cast<int>(cluster.block_rank()), csize = static_cast<int>(cluster.num_blocks());
  const int64_t ns = s1 - s0;
  const int64_t base = ns > 0 ? cv.offsets[s0] : 0;
  const int64_t T = ns > 0 ? cv.offsets[s1] - base : 0;
  // CTAs that take part: a problem that fits 8 CTAs uses 8 of a 16-CTA cluster (the exchange is then half the
  // traffic: ~1.3 us less for 32 x 4K); the others only join the cluster barriers
  const int active = csize > 8 && T <= 8 * static_cast<int64_t>(ckey_cap) ? 8 : csize;
  const int64_t a = base + (rank < active ? (rank * T) / active : T);
  const int64_t b = base + (rank < active ? ((rank + 1) * T) / active : T);
  const int n_mine = static_cast<int>(b - a);
  // The whole slice goes straight to shared memory, issued before the metadata reduction so that the cold loads
  // overlap it (flat index j holds the entry value cum[j - 1]; segment starts are fixed up below). In bounds
  // whenever the curve offsets are valid (the precondition). keys[x] <- cum[a - 1 + x]: the 16-byte aligned
  // middle of the slice is one bulk copy (the keys start 0-3 words into their region so that its destination is
  // aligned too), the at most 3 + 3 words around it 4-byte asynchronous copies.
  int h0 = n_mine, h1 = n_mine;  // [h0, h1): the bulk copy's keys
  solve_smem_view sm = sm_in;
  if (n_mine > 0) {
    const int64_t g = a - 1;  // global index of keys[0] (-1: the problem's first entry value, 0)
    int lead = static_cast<int>((4 - ((reinterpret_cast<uintptr_t>(cv.cumulative + (g < 0 ? 0 : g)) >> 2) & 3)) & 3);
    if (g < 0) lead += 1;  // keys[0] is not copied
    if (lead < n_mine && n_mine - lead >= 4) {
      h0 = lead;
      h1 = lead + (n_mine - lead) / 4 * 4;
      sm.keys += (4 - (h0 & 3)) & 3;  // keys + h0 16-byte aligned
    }
  }
  if (h1 > h0 && tid == 0) {
    const uint32_t bar = smem_addr(&cs.mload);
    const uint32_t bytes = static_cast<uint32_t>(h1 - h0) * sizeof(uint32_t);
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // earlier generic accesses before the copy's writes
    mbar_expect(bar, bytes);
    bulk_load(sm.keys + h0, cv.cumulative + (a - 1 + h0), bytes, bar);
  }
  for (int x = tid; x < n_mine; x += solve_threads) {
    if (x >= h0 && x < h1) {
      x = h1 - 1 - (h1 - 1 - x) % solve_threads;  // skip to the last x of this thread's stride inside [h0, h1)
      continue;
    }
    if (a + x > 0)
      cp_async4(sm.keys + x, cv.cumulative + a + x - 1);
    else
      sm.keys[x] = 0u;  // the bits of 0.0f
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
  const bool bulk_used = h1 > h0;
  const uint32_t load_parity = (ph >> 2) & 1u;
  if (bulk_used) ph ^= 4u;
  // metadata and validation (every CTA redundantly: no cluster exchange needed)
  long long red[6] = {0, 0, 0, 0, 0, 0};  // tokens, candidates, sum lo, sum hi, bad shape, bad bounds
  for (int64_t i = tid; i < ns; i += solve_threads) {
    int64_t o, c, lo, hi;
    segment_meta(cv, bnd, s0 + i, red, o, c, lo, hi);
    sm.off[i] = o;
    sm.cnt[i] = static_cast<int32_t>(c);
    sm.lo[i] = static_cast<int32_t>(lo);
    sm.hi[i] = static_cast<int32_t>(hi);
    if (rank == 0) cs.acc[i] = cs.eqa[i] = 0;
  }
  block_sums(red, sh);
  problem_totals t;
  t.tokens = red[0];
  t.candidates = red[1];
  t.lo = red[2];
  t.hi = red[3];
  int64_t B = 0;
  const reason why = red[4] ? reason::shape_mismatch : (red[5] ? reason::infeasible_bounds : problem_budget(bud, p, t, B));
  if (why != reason::none || B == t.lo) {
    // rejected: keep every token; nothing to pick: keep lo. No cluster exchange (CTA 0's acc is untouched).
    for (int64_t i = tid + static_cast<int64_t>(rank) * solve_threads; i < ns;
         i += static_cast<int64_t>(solve_threads) * csize)
      keep[s0 + i] = why != reason::none ? cv.tokens[s0 + i] : cv.tokens[s0 + i] - sm.cnt[i] + sm.lo[i];
    if (rank == 0 && tid == 0) {
      if (status) status[p] = static_cast<int32_t>(why);
      if (thr) thr[p] = 0.0f;
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    if (bulk_used) mbar_wait(smem_addr(&cs.mload), load_parity);
    __syncthreads();
    return;
  }
  const long long R = B - t.lo;         // >= 1
  const long long total = t.hi - t.lo;  // eligible keys of the problem
  // Every CTA of the cluster must be running (and its mbarriers initialised) before anyone writes into its shared
  // memory: arrive here (relaxed; the initialisation was fenced), wait just before the first push below, so the
  // barrier overlaps the key preparation. (compute-sanitizer racecheck flagged the first pushes as writes into "a
  // block that might not have entered yet" before this barrier existed.)
  cluster_arrive_relaxed();
  // segment starts (entry value 0) and this CTA's runs: eligible ranks of segment i within [a, b). The first
  // barrier of block_exclusive_sum orders every thread's copies before the fix-ups.
  asm volatile("cp.async.wait_all;" ::: "memory");
  if (bulk_used) mbar_wait(smem_addr(&cs.mload), load_parity);
  long long carry = 0;
  for (int64_t c0 = 0; c0 < ns; c0 += solve_threads) {
    const int64_t i = c0 + tid;
    int64_t ra = 0, rb = 0, o = 0;
    bool start = false;
    if (i < ns) {
      o = sm.off[i];
      start = sm.cnt[i] > 0 && o >= a && o < b;
      ra = o + sm.lo[i];
      rb = o + sm.hi[i];
      ra = ra < a ? a : ra;
      rb = rb > b ? b : rb;
    }
    const bool run = rb > ra;
    long long tot = 0;
    const long long k = carry + block_exclusive_sum(run ? 1 : 0, tot, sh.sc);
    if (start) sm.keys[o - a] = 0u;  // the bits of 0.0f
    if (run) {
      sm.wa[k] = static_cast<int32_t>(ra - a);
      sm.wb[k] = static_cast<int32_t>(rb - ra);
      cs.rseg[k] = static_cast<int16_t>(i);
    }
    carry += tot;
  }
  const int nruns = static_cast<int>(carry);
  __syncthreads();  // keys fixed up, runs visible
  // radix selection over the cluster's keys: C(d) = #eligible keys < prefix + d * 2^shift
  uint32_t prefix = 0;
  long long c_low = 0, c_high = total;  // C(0), C(256)
  bool raw = true;                      // keys are raw float bits (until a key with the sign bit shows up)
  bool first = true;                    // the problem's first push waits for the cluster barrier begun above
  const int d = tid & 255, half = tid >> 8;
  int xp = 0;                           // exchanges of this problem: gather buffer xp & 1
  if (rank >= active) cluster_wait();   // not taking part: the cluster barriers only (begun above, final below)
#pragma unroll 1
  for (int pass = 0; pass < 4 && rank < active; ++pass) {
    const int shift = 24 - 8 * pass, buf = xp & 1;
    const uint32_t bar = smem_addr(&cs.mbar[buf]);
    if (tid == 0) mbar_expect(bar, static_cast<uint32_t>(active) * 256u * sizeof(uint32_t));
    uint32_t n = 0;
    if (d > 0) {
      const uint32_t bound = prefix + (static_cast<uint32_t>(d) << shift);
      for (int k = half; k < nruns; k += 2 * nparts) {
        const int k2 = k + nparts;
        int x1, x2;
        run_lower2(sm.keys + sm.wa[k], sm.wb[k], bound, sm.keys + (k2 < nruns ? sm.wa[k2] : 0),
                   k2 < nruns ? sm.wb[k2] : 0, bound, x1, x2);
        n += x1 + x2;
      }
    }
    part[half][d] = n;
    __syncthreads();
    {
      // 16-byte pushes: thread t sends digits 4q..4q+3 (q = t % 64) to ranks t / 64, t / 64 + 8, ...
      const int q = tid & 63;
      uint4 sum = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
      for (int h = 0; h < nparts; ++h) {
        const uint4 x = reinterpret_cast<const uint4*>(part[h])[q];
        sum.x += x.x;
        sum.y += x.y;
        sum.z += x.z;
        sum.w += x.w;
      }
      // the first push: every CTA has started (the arrive above)
      if (first) cluster_wait();
      first = false;
      for (int r = tid >> 6; r < active; r += solve_threads / 64)
        st_async16(&cs.gather[buf][rank][4 * q], &cs.mbar[buf], r, sum);
    }
    mbar_wait(bar, (ph >> buf) & 1u);  // every taking-part CTA's counts are in this CTA's buffer
    ph ^= 1u << buf;
    ++xp;
    if (tid < 256 && tid > 0) {
      uint32_t sum = 0;
#pragma unroll
      for (int r = 0; r < solve_cluster_max; ++r)
        if (r < active) sum += cs.gather[buf][r][tid];
      cs.cnt[tid] = sum;
    }
    if (tid == 0) {
      cs.cnt[0] = static_cast<uint32_t>(c_low);
      cs.cnt[256] = static_cast<uint32_t>(c_high);
    }
    __syncthreads();
    if (pass == 0 && raw && static_cast<long long>(cs.cnt[128]) != total) {
      // a key with the sign bit (C(0x80000000) counts the others): ordered keys, pass 0 again. Uniform: every CTA
      // sees the same totals.
      raw = false;
      for (int x = tid; x < n_mine; x += solve_threads) sm.keys[x] = order_key(__uint_as_float(sm.keys[x]));
      __syncthreads();
      pass = -1;
      continue;
    }
    if (tid < 256) {
      const long long lo_c = cs.cnt[tid], hi_c = cs.cnt[tid + 1];  // (uint32: at most csize * key_cap keys)
      if (lo_c < R && R <= hi_c) {
        cs.prefix = prefix + (static_cast<uint32_t>(tid) << shift);
        cs.c_low = lo_c;
        cs.c_high = hi_c;
      }
    }
    __syncthreads();
    prefix = cs.prefix;
    c_low = cs.c_low;
    c_high = cs.c_high;
  }
  const uint32_t v = prefix;  // count(< v) = c_low < R <= count(<= v)
  // per run: #keys < v and == v (at most two runs per thread: nruns <= solve_seg_cap = 2 * solve_threads), summed
  // per segment in CTA 0's shared memory (remote atomics, no return value: they do not stall)
  static_assert(solve_seg_cap <= 2 * solve_threads, "two runs per thread at most");
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int k = tid + h * solve_threads;
    if (k < nruns) {
      const uint32_t* kk = sm.keys + sm.wa[k];
      int less = 0, le = 0;
      run_lower2(kk, sm.wb[k], v, kk, v == 0xFFFFFFFFu ? 0 : sm.wb[k], v + 1, less, le);
      const int eq = (v == 0xFFFFFFFFu ? sm.wb[k] : le) - less;
      const int i = cs.rseg[k];
      if (less != 0) atomicAdd(cluster.map_shared_rank(&cs.acc[i], 0), less);
      if (eq != 0) atomicAdd(cluster.map_shared_rank(&cs.eqa[i], 0), eq);
    }
  }
  // per-segment sums complete in CTA 0; after this barrier no CTA touches another's memory. (An mbarrier
  // hand-off to CTA 0 instead measured 0.3 us slower, and racecheck cannot see it order CTA 0's exit.)
  cluster.sync();
  if (rank == 0) {
    // CTA 0: keys == v handed out in segment order (the (e, s, r) tie break), keep counts
    const long long rem = R - c_low;
    long long carry2 = 0;
    for (int64_t c0 = 0; c0 < ns; c0 += solve_threads) {
      const int64_t i = c0 + tid;
      const long long eq = i < ns ? cs.eqa[i] : 0;
      long long tot = 0;
      const long long before = carry2 + block_exclusive_sum(eq, tot, sh.sc);
      carry2 += tot;
      if (i < ns) {
        long long take = rem - before;
        take = take < 0 ? 0 : (take > eq ? eq : take);
        keep[s0 + i] = cv.tokens[s0 + i] - sm.cnt[i] + sm.lo[i] + cs.acc[i] + take;
      }
    }
    if (tid == 0) {
      if (status) status[p] = 0;
      // raw bits of a float without the sign bit are its value; ordered keys go back through key_value
      if (thr) thr[p] = raw ? __uint_as_float(v) : key_value(v);
    }
  }
  __syncthreads();
}

// Kernels in headers are templates (a dummy parameter) so that several translation units may include them.
template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(solve_threads, 1)
    solve_kernel(const __grid_constant__ curve_set cv, int64_t P, const int64_t* poff,
                 const __grid_constant__ solve_budget bud, const __grid_constant__ keep_bounds bnd, int64_t* keep,
                 float* thr, int32_t* status, int key_cap, bool sample_select_on, int csize, int ckey_cap) {
  extern __shared__ __align__(16) unsigned char solve_dyn_smem[];
  __shared__ solve_shared sh;
  __shared__ solve_select_state sst;
  // segment metadata in static shared arrays (constant addresses: no registers held for them)
  __shared__ int64_t s_off[solve_seg_cap];
  __shared__ int32_t s_cnt[solve_seg_cap], s_lo[solve_seg_cap], s_hi[solve_seg_cap], s_wa[solve_seg_cap],
      s_wb[solve_seg_cap], s_goff[solve_seg_cap];
  solve_smem_view sm;
  sm.off = s_off;
  sm.cnt = s_cnt;
  sm.lo = s_lo;
  sm.hi = s_hi;
  sm.wa = s_wa;
  sm.wb = s_wb;
  sm.goff = s_goff;
  // dynamic shared memory: the block path's keys (key_cap); in the cluster path the cluster state, then its keys
  // (ckey_cap). A CTA runs its cluster problems first; no other CTA touches its memory after the last of them.
  solve_cluster_shared& cs = *reinterpret_cast<solve_cluster_shared*>(solve_dyn_smem);
  sm.keys = reinterpret_cast<uint32_t*>(solve_dyn_smem);
  solve_smem_view smc = sm;
  smc.keys = reinterpret_cast<uint32_t*>(solve_dyn_smem + solve_cluster_bytes);
  if (threadIdx.x < 5) {
    // warm the translations (and first lines) of the arrays every problem touches, so that the cold misses of
    // the dependent loads below overlap
    const int x = threadIdx.x;
    const void* q = x == 0 ? static_cast<const void*>(poff)
                    : x == 1 ? static_cast<const void*>(cv.offsets)
                    : x == 2 ? static_cast<const void*>(cv.tokens)
                    : x == 3 ? static_cast<const void*>(cv.cumulative)
                             : static_cast<const void*>(keep);
    if (q) asm volatile("prefetch.global.L2 [%0];" ::"l"(q));
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (csize > 1) {
    // cluster launch: every cluster takes the problems that fit it (all its CTAs together), then every CTA takes
    // the problems that do not fit, one per CTA (so large problems keep one SM each, as without clusters)
    const auto cluster = cooperative_groups::this_cluster();
    const int64_t nclusters = gridDim.x / csize, cid = blockIdx.x / csize;
    if (cid < P) {
      if (threadIdx.x == 0) {
        mbar_init(smem_addr(&cs.mbar[0]), 1);
        mbar_init(smem_addr(&cs.mbar[1]), 1);
        mbar_init(smem_addr(&cs.mload), 1);
        mbar_init_fence();  // published to the other CTAs by the cluster barrier before a problem's first push
      }
      __syncthreads();
      uint32_t ph = 0;
      for (int64_t p = cid; p < P; p += nclusters) {
        int64_t s0, s1;
        if (solve_cluster_fits(cv, P, poff, p, csize, ckey_cap, s0, s1))
          solve_cluster_problem(cluster, cv, p, s0, s1, bud, bnd, keep, thr, status, smc, sh, sst, cs, ckey_cap, ph);
      }
      // every phase has completed (each CTA waited for its own); the memory may become block-path keys
      if (threadIdx.x == 0) {
        mbar_inval(smem_addr(&cs.mbar[0]));
        mbar_inval(smem_addr(&cs.mbar[1]));
        mbar_inval(smem_addr(&cs.mload));
      }
      __syncthreads();
    }
  }
#else
  // built for an architecture without clusters: every problem takes the block path, whatever the launch
  csize = 1;
  (void)smc;
  (void)cs;
#endif
  for (int64_t p = blockIdx.x; p < P; p += gridDim.x) {
    int64_t s0, s1;
    if (csize > 1 && solve_cluster_fits(cv, P, poff, p, csize, ckey_cap, s0, s1)) continue;
    solve_block_problem<>(cv, p, poff, bud, bnd, keep, thr, status, key_cap, sample_select_on, sm, sh, sst);
  }
}

}  // namespace detail

namespace detail {

// Launch configuration of solve_kernel: `grid` CTAs of solve_threads, `smem` dynamic shared memory, and a cluster
// dimension of `csize` CTAs (`attr` receives it) when csize > 1.
inline cudaLaunchConfig_t solve_launch_config(cudaLaunchAttribute (&attr)[1], int64_t grid, int csize, size_t smem,
                                              cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(csize);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.gridDim = dim3(static_cast<unsigned>(grid));
  cfg.blockDim = dim3(solve_threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = csize > 1 ? 1 : 0;
  return cfg;
}

// Per-device launch facts, computed on the first call on that device (the attributes are set once): the
// shared-memory key budget per block and the largest usable cluster sizes. Keeping these host queries out of the
// per-call path matters: the solve is a ~10-40 us launch and every host call before it is on the timed path.
struct solve_device_facts {
  int key_cap = 0;
  int active[5] = {0, 0, 0, 0, 0};  // co-resident clusters of 1 (unused), 2, 4, 8, 16 CTAs
};

inline cudaError_t solve_facts(solve_device_facts& out) noexcept {
  constexpr int max_dev = 64;
  static std::atomic<int> ready[max_dev] = {};
  static solve_device_facts facts[max_dev];
  int dev = 0;
  PREFIXKV_TRY(check_runtime(cudaGetDevice(&dev), "solve: cudaGetDevice failed"));
  if (dev >= 0 && dev < max_dev && ready[dev].load(std::memory_order_acquire) == 2) {
    out = facts[dev];
    return cudaSuccess;
  }
  solve_device_facts f;
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) optin = 96 * 1024;
  cudaFuncAttributes fa{};
  if (cudaFuncGetAttributes(&fa, solve_kernel<>) != cudaSuccess) fa.sharedSizeBytes = 24 * 1024 + solve_meta_bytes;
  const long long avail = static_cast<long long>(optin) - static_cast<long long>(fa.sharedSizeBytes) - 1024;
  long long keys = avail / 4 / 32 * 32;
  if (keys > solve_max_keys) keys = solve_max_keys;
  if (keys < solve_min_keys) keys = solve_min_keys;
  f.key_cap = static_cast<int>(keys);
  const size_t smem = static_cast<size_t>(f.key_cap) * sizeof(uint32_t);
  PREFIXKV_TRY(check_runtime(
      cudaFuncSetAttribute(solve_kernel<>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
      "solve: cudaFuncSetAttribute failed"));
  int cc_major = 0;
  (void)cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, dev);
  if (cc_major >= 9) {
    // cluster sizes above 8 are "non-portable"; without the attribute (or where unsupported) they are skipped
    const bool big = cudaFuncSetAttribute(solve_kernel<>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) ==
                     cudaSuccess;
    for (int lg = 1; lg <= 4; ++lg) {
      const int c = 1 << lg;
      if (c > 8 && !big) break;
      cudaLaunchAttribute attr[1];
      const cudaLaunchConfig_t cfg = solve_launch_config(attr, c, c, smem, 0);
      int n = 0;
      if (cudaOccupancyMaxActiveClusters(&n, solve_kernel<>, &cfg) != cudaSuccess) n = 0;
      f.active[lg] = n;
    }
    (void)cudaGetLastError();  // a refused query leaves no sticky error behind
  }
  int idle = 0;  // 0 = not cached, 1 = being stored by one thread, 2 = cached (others just use their own copy)
  if (dev >= 0 && dev < max_dev && ready[dev].compare_exchange_strong(idle, 1, std::memory_order_acq_rel)) {
    facts[dev] = f;
    ready[dev].store(2, std::memory_order_release);
  }
  out = f;
  return cudaSuccess;
}

// Cluster size for P problems: the largest one (16, 8, 4, 2) with which every problem gets its own co-resident
// cluster; with more problems than that, 4 (or the largest usable); 1 = no cluster launch.
inline int solve_cluster_size(const solve_device_facts& f, int64_t P) noexcept {
  for (int lg = 4; lg >= 1; --lg)
    if (f.active[lg] > 0 && P <= f.active[lg]) return 1 << lg;
  for (int lg = 2; lg >= 1; --lg)
    if (f.active[lg] > 0) return 1 << lg;
  return 1;
}

// Shared-memory keys per block (tests, benches).
inline int solve_key_cap() noexcept {
  solve_device_facts f;
  return solve_facts(f) == cudaSuccess ? f.key_cap : solve_min_keys;
}

// The launch of every policy: host checks, size query, device facts, one cluster (or plain) launch.
template <class Policy>
[[nodiscard]] cudaError_t solve_dispatch(void* d_temp, size_t& temp_bytes, const curve_set& curves,
                                         int64_t num_problems, const int64_t* problem_offsets,
                                         const solve_budget& budget, const keep_bounds& bounds, int64_t* keep,
                                         float* threshold, int32_t* status, cudaStream_t stream) noexcept {
  static_assert(Policy::key_cap == 0 || Policy::key_cap >= solve_min_keys, "solve_policy: key_cap 0 or >= 4096");
  static_assert(Policy::cluster_size == 0 || Policy::cluster_size == 2 || Policy::cluster_size == 4 ||
                    Policy::cluster_size == 8 || Policy::cluster_size == 16,
                "solve_policy: cluster_size 0, 2, 4, 8 or 16");
  PREFIXKV_TRY(validate(curves.protect));
  if (curves.count < 0 || num_problems < 0) return fail(reason::negative_extent, "solve: negative segment or problem count");
  if (problem_offsets == nullptr && num_problems != 1)
    return fail(reason::bad_parameter, "solve: problem_offsets may be null only with num_problems == 1");
  if (curves.count > 0 && (curves.offsets == nullptr || curves.tokens == nullptr || curves.cumulative == nullptr ||
                           keep == nullptr))
    return fail(reason::null_pointer, "solve: curves.offsets, tokens, cumulative or keep is null");
  if (budget.kind != budget_kind::evict_ratio && budget.kind != budget_kind::keep_tokens &&
      budget.kind != budget_kind::keep_candidates)
    return fail(reason::bad_parameter, "solve: unknown budget kind");
  if (budget.kind == budget_kind::evict_ratio && budget.ratios == nullptr && !(budget.ratio >= 0.0 && budget.ratio < 1.0))
    return fail(reason::bad_parameter, solve_message(reason::bad_parameter));
  if (bounds.lo == nullptr && bounds.hi == nullptr && (bounds.min_keep < 0 || bounds.max_keep < bounds.min_keep))
    return fail(reason::infeasible_bounds, solve_message(reason::infeasible_bounds));
  workspace_layout<1> ws;
  if (d_temp == nullptr) {
    temp_bytes = ws.bytes();
    return cudaSuccess;
  }
  PREFIXKV_TRY(ws.map(d_temp, temp_bytes));
  if (num_problems == 0) return cudaSuccess;
  solve_device_facts f;
  PREFIXKV_TRY(solve_facts(f));
  int key_cap = f.key_cap;
  if (Policy::key_cap > 0 && Policy::key_cap < key_cap) key_cap = Policy::key_cap / 32 * 32;
  const size_t smem = static_cast<size_t>(f.key_cap) * sizeof(uint32_t);
  // cluster path: keys per CTA after the cluster state (same dynamic shared memory), limited like key_cap
  int ckey_cap = f.key_cap - static_cast<int>(solve_cluster_bytes / sizeof(uint32_t)) - 4;  // (- 4: bulk alignment)
  if (Policy::key_cap > 0 && Policy::key_cap < ckey_cap) ckey_cap = Policy::key_cap / 32 * 32;
  int csize = 1;
  if (Policy::clusters && ckey_cap >= solve_min_keys) {
    csize = solve_cluster_size(f, num_problems);
    if (Policy::cluster_size > 1) {
      int lg = 1;
      while ((2 << lg) <= Policy::cluster_size && lg < 4) ++lg;
      csize = f.active[lg] > 0 ? (1 << lg) : csize;
    }
  }
  const int64_t max_grid = 65535 * 16;
  int64_t grid = num_problems < max_grid ? num_problems : max_grid;
  if (csize > 1) {
    const int64_t clusters = num_problems < max_grid / csize ? num_problems : max_grid / csize;
    grid = clusters * csize;
  }
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = solve_launch_config(attr, grid, csize, smem, stream);
  const cudaError_t e = cudaLaunchKernelEx(&cfg, solve_kernel<>, curves, num_problems, problem_offsets, budget,
                                           bounds, keep, threshold, status, key_cap, Policy::sample_select, csize,
                                           ckey_cap);
  if (e != cudaSuccess) return fail(reason::cuda_runtime, "kernel launch failed", e);
  return check_launch(stream);
}

}  // namespace detail

//! Device solver. All array arguments are device pointers.
//! * `curves`: device curve_set (S segments); preconditions as for `solve_host` (rows non-decreasing and finite
//!   — not re-checked on the device).
//! * `problem_offsets`: (P + 1) device segment offsets of the problems, or null for one problem of all segments
//!   (then `num_problems` must be 1).
//! * `budget` / `bounds`: uniform values or per-problem / per-segment device arrays.
//! * `keep`: (S) output, tokens kept per segment (protected included).
//! * `threshold`: (P) optional output, entry value of the last pick (0 when none).
//! * `status`: (P) optional output, 0 or the `prefixkv::reason` that rejected the problem (bad ratio,
//!   infeasible budget or bounds, inconsistent curve shape, bad problem offsets). A rejected problem keeps
//!   every token (keep[s] = n_s) and has threshold 0; with bad problem offsets its segments are not written.
//! * Array pointers must be valid whenever `curves.count > 0`, also when no segment has a candidate (pass a
//!   one-element buffer rather than null): the host cannot see the device offsets to tell.
//! Host-checkable arguments are validated before anything is enqueued. The solve is one kernel launch
//! (`cudaLaunchKernelEx`, with a cluster dimension on devices that support it; graph-capturable), no temporary
//! storage is used (the size query returns the minimal 256 bytes), no host synchronisation. Device facts (shared
//! memory budget, usable cluster sizes) are queried once per device and cached.
[[nodiscard]] inline cudaError_t solve(void* d_temp, size_t& temp_bytes, const curve_set& curves,
                                       int64_t num_problems, const int64_t* problem_offsets,
                                       const solve_budget& budget, const keep_bounds& bounds, int64_t* keep,
                                       float* threshold = nullptr, int32_t* status = nullptr,
                                       cudaStream_t stream = 0) noexcept {
  return detail::solve_dispatch<solve_policy<>>(d_temp, temp_bytes, curves, num_problems, problem_offsets, budget,
                                                bounds, keep, threshold, status, stream);
}

PREFIXKV_NAMESPACE_END
