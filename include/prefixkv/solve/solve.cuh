//! \file prefixkv/solve/solve.cuh
//! The exact global prefix solver on the device: one kernel launch for P independent problems, no host sync,
//! graph-capturable. Same semantics and bit-identical keep counts as `prefixkv::solve_host` (solve.hpp).
//!
//! Algorithm (one block of 512 threads per problem, grid-stride over problems):
//! 1. per-problem totals (tokens, candidates, bounds) and the budget -> R = candidates still to pick;
//! 2. sample-select fast path (problems of <= 512 segments, see `sample_select`): per level, m samples of every
//!    segment's window at one stride D; two radix selections (8-bit digits) over the samples in shared memory
//!    give keys L* / H* with count(L*) < R <= count(H*), which cut every window to about 3 strides; when all
//!    windows fit in shared memory they are gathered and v is one more radix selection there. 1-3 levels, one
//!    global round trip each, no per-probe binary searches;
//! 3. (path 2, kept for comparison) the earlier narrowing path: 128-way searches on sample bounds of count(t);
//! 4. general path (large problems, or windows that stop shrinking because of massive exact ties): a sample of
//!    every row in shared memory, then 256-way rounds over the key space where count(t) = sum_s #eligible ranks
//!    with key <= t is a binary search per segment (sample, then the short global window between two samples);
//! 5. every segment keeps lo_s + #(eligible keys < v) + its share of the keys == v, shares handed out in
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

//! Path `prefixkv::solve` takes: 1 = sample-select (default), 2 = earlier narrowing path, 0 = general path only
//! (all answers are identical).
#ifndef PREFIXKV_SOLVE_FAST_PATH
#define PREFIXKV_SOLVE_FAST_PATH 1
#endif

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

// Phase timestamps (clock64 of thread 0, problem 0) for bench/solve's trace build only; no-ops otherwise.
#if defined(PREFIXKV_SOLVE_TRACE)
__device__ long long solve_trace[16];
#define PKV_SOLVE_MARK(i)                                                               \
  do {                                                                                  \
    if (threadIdx.x == 0 && blockIdx.x == 0 && (i) < 16) solve_trace[(i)] = clock64(); \
  } while (0)
#else
#define PKV_SOLVE_MARK(i) \
  do {                    \
  } while (0)
#endif

// 512 threads leave 128 registers per thread; at 1024 (64 registers) the kernel spilled ~750 bytes per thread
// to local memory and every path ran 3-5x slower (see bench/solve/RESULTS.md).
#ifndef PREFIXKV_SOLVE_THREADS
#define PREFIXKV_SOLVE_THREADS 512
#endif
inline constexpr int solve_threads = PREFIXKV_SOLVE_THREADS;
static_assert(solve_threads % 256 == 0 && solve_threads <= 1024, "solve_threads: a multiple of 256, at most 1024");
inline constexpr int solve_probes = 256;                    // thresholds evaluated per round
inline constexpr int solve_parts = solve_threads / solve_probes;
inline constexpr int solve_seg_cap = 1024;                  // segment metadata cached in shared memory
inline constexpr int solve_batch = 4;                       // searches interleaved per thread
inline constexpr int solve_level_samples = 256;             // samples per segment window per narrowing level
inline constexpr int solve_max_levels = 4;
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
  long long cL[2], cH[2];
  long long red[solve_threads / 32][6];  // per-warp partials of the prologue reduction
};

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

// Bound on the rank ub(t) = #{r : key_r <= t} of a segment from m samples of its window [A, A + w): sample q
// sits at rank A + (q + 1) * w / (m + 1). Returns the lower bound (ranks below it are <= t) or the upper bound
// (ranks from it on are > t).
__device__ inline int32_t sample_bound(const uint32_t* smp, int m, int32_t A, int32_t w, long long t, bool upper) {
  if (w <= 0) return A;
  int qa = 0, qn = m;
  while (qn > 0) {
    const int h = qn >> 1;
    if (static_cast<long long>(smp[qa + h]) <= t) {
      qa += h + 1;
      qn -= h + 1;
    } else {
      qn = h;
    }
  }
  if (upper) return qa < m ? A + static_cast<int32_t>((static_cast<int64_t>(qa + 1) * w) / (m + 1)) : A + w;
  return qa > 0 ? A + static_cast<int32_t>((static_cast<int64_t>(qa) * w) / (m + 1)) + 1 : A;
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

// Earlier fast path, path 2 (ns <= solve_threads, metadata cached): narrow every segment's eligible range
// [lo, hi) to a window
// [wa, wb) that must contain the answer, using only shared-memory samples (each level loads m keys per window
// and runs two 128-way searches on sample bounds), until all windows fit `key_cap` keys; then gather the
// windows' keys into shared memory and finish the exact 256-way search there. Invariant for t in [L, H]:
// count(t) = sum_i (wa_i - lo_i) + #(window_i keys <= t), and count(L) < R <= count(H).
// Returns false (nothing decided) when the windows stop shrinking; the caller then runs the general path.
__device__ inline bool narrow_and_gather(const curve_set& cv, int64_t ns, long long R, long long H0, int key_cap,
                                         const solve_smem_view& sm, solve_shared& sh, int64_t& v_out) {
  const int tid = threadIdx.x;
  const int probe = tid % solve_probes, part = tid / solve_probes;
  const int half = probe / 128, j = probe % 128;
  for (int64_t i = tid; i < ns; i += solve_threads) {
    sm.wa[i] = sm.lo[i];
    sm.wb[i] = sm.hi[i];
  }
  long long L = -1, H = H0;
  long long prevW = 0x7FFFFFFFFFFFFFFFll;
  for (int level = 0;; ++level) {
    long long wl = 0;
    for (int64_t i = tid; i < ns; i += solve_threads) wl += sm.wb[i] - sm.wa[i];
    const long long W = block_sum(wl, sh.sc);  // (syncs: windows visible)
    if (W <= key_cap) break;
    if (level >= solve_max_levels || 2 * W > prevW) return false;
    prevW = W;
    int m = static_cast<int>(key_cap / ns);
    if (m > solve_level_samples) m = solve_level_samples;
    const int total = static_cast<int>(ns) * m;
    for (int b0 = tid; b0 < total; b0 += solve_threads * 4) {
      uint32_t kk[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int idx = b0 + u * solve_threads;
        kk[u] = 0;
        if (idx < total) {
          const int i = idx / m, q = idx % m;
          const int32_t A = sm.wa[i], w = sm.wb[i] - A;
          if (w > 0) kk[u] = entry_key(cv.cumulative + sm.off[i], A + (static_cast<int64_t>(q + 1) * w) / (m + 1));
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (b0 + u * solve_threads < total) sm.keys[b0 + u * solve_threads] = kk[u];
    }
    if (tid == 0) {
      sh.cL[0] = sh.cL[1] = L;
      sh.cH[0] = sh.cH[1] = H;
    }
    __syncthreads();
    // half 0: L* = largest t with count_hi(t) < R; half 1: H* = smallest t with count_lo(t) >= R (or t == H)
    for (;;) {
      const long long Lc = sh.cL[half], Wd = sh.cH[half] - Lc;
      const bool more = sh.cH[0] - sh.cL[0] > 1 || sh.cH[1] - sh.cL[1] > 1;
      __syncthreads();
      if (!more) break;
      const long long tp = Wd > 1 ? Lc + ((j + 1) * Wd + 127) / 128 : Lc + Wd;
      long long acc = 0;
      for (int64_t i = part; i < ns; i += solve_parts)
        acc += sample_bound(sm.keys + i * m, m, sm.wa[i], sm.wb[i] - sm.wa[i], tp, half == 0) - sm.lo[i];
      sh.part[part][probe] = acc;
      __syncthreads();
      if (tid < solve_probes) {
        long long tot = 0;
#pragma unroll
        for (int k = 0; k < solve_parts; ++k) tot += sh.part[k][tid];
        sh.part[0][tid] = tot;
      }
      __syncthreads();
      if (tid < solve_probes && Wd > 1) {
        const bool hit = sh.part[0][tid] >= R || (half == 1 && tp == H);
        bool prev_hit = false;
        long long tprev = Lc;
        if (j > 0) {
          tprev = Lc + (j * Wd + 127) / 128;
          prev_hit = sh.part[0][tid - 1] >= R || (half == 1 && tprev == H);
        }
        if (hit && !prev_hit) {
          sh.cH[half] = tp;
          sh.cL[half] = tprev;
        }
      }
      __syncthreads();
    }
    const long long Ls = sh.cL[0], Hs = sh.cH[1];
    // new windows from the sample bounds at L* and H*
    int32_t na = 0, nb = 0;
    if (tid < ns) {
      const int32_t A = sm.wa[tid], w = sm.wb[tid] - A;
      na = sample_bound(sm.keys + tid * m, m, A, w, Ls, false);
      nb = sample_bound(sm.keys + tid * m, m, A, w, Hs, true);
    }
    __syncthreads();
    if (tid < ns) {
      sm.wa[tid] = na;
      sm.wb[tid] = nb;
    }
    L = Ls;
    H = Hs;
    // the next block_sum synchronises
  }
  // gather the windows' keys
  const int32_t w_mine = tid < ns ? sm.wb[tid] - sm.wa[tid] : 0;
  long long W = 0;
  const long long g_mine = block_exclusive_sum(w_mine, W, sh.sc);
  if (tid < ns) sm.goff[tid] = static_cast<int32_t>(g_mine);
  __syncthreads();
  gather_window_keys<4>(cv, ns, W, sm);
  const long long base = block_sum(tid < ns ? sm.wa[tid] - sm.lo[tid] : 0, sh.sc);  // (syncs: keys visible)
  // exact 256-way search in shared memory
  while (H - L > 1) {
    const long long Wd = H - L;
    const long long tp = L + ((probe + 1) * Wd + solve_probes - 1) / solve_probes;
    long long acc = 0;
    for (int64_t i = part; i < ns; i += solve_parts) acc += window_le(sm.keys + sm.goff[i], sm.wb[i] - sm.wa[i], tp);
    sh.part[part][probe] = acc;
    narrow_to_probe(sh, base, R, tp, L, H);
  }
  v_out = H;
  return true;
}

// ---- sample-select fast path ----------------------------------------------------------------------------------

inline constexpr int solve_sel_samples = 8192;   // shared-memory samples per narrowing level (at most)
inline constexpr int solve_sel_max_m = 512;      // samples per segment window (a power of two >= 32)
inline constexpr int solve_sel_min_m = 32;
inline constexpr int solve_sel_max_levels = 6;

// State of up to two concurrent radix selections (8-bit digits, 4 passes) over keys in shared memory.
struct solve_select_state {
  uint32_t hist[2][2][256];  // [selection][buffer][digit]
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
    PKV_SOLVE_MARK(2 + 2 * level);
    const long long base = red[3];
    const long long Rp = R - base;  // >= 1 by the invariant
    const long long kL = (Rp - 1) / D + 1;
    const long long kH = (Rp + D - 1) / D + active;
    uint32_t ks[2], vs[2];
    ks[0] = static_cast<uint32_t>(kL);
    ks[1] = static_cast<uint32_t>(kH <= total ? kH : total);
    block_select<2>(sm.keys, total, ks, vs, st);
    PKV_SOLVE_MARK(3 + 2 * level);
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
  PKV_SOLVE_MARK(8);
  uint32_t ks[1] = {static_cast<uint32_t>(R - base)}, vs[1];
  block_select<1>(sm.keys, static_cast<int>(W), ks, vs, st);
  PKV_SOLVE_MARK(9);
  v_out = static_cast<int64_t>(vs[0]);
  return true;
}

// Kernels in headers are templates (a dummy parameter) so that several translation units may include them.
template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(solve_threads, 1)
    solve_kernel(curve_set cv, int64_t P, const int64_t* poff, solve_budget bud, keep_bounds bnd, int64_t* keep,
                 float* thr, int32_t* status, int key_cap, int path) {
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
  sm.keys = reinterpret_cast<uint32_t*>(solve_dyn_smem);
  const int tid = threadIdx.x;
  const int64_t S = cv.count;

  for (int64_t p = blockIdx.x; p < P; p += gridDim.x) {
    const int64_t s0 = poff ? poff[p] : 0, s1 = poff ? poff[p + 1] : S;
    if (s0 < 0 || s1 < s0 || s1 > S) {
      if (tid == 0) {
        if (status) status[p] = static_cast<int32_t>(reason::out_of_range);
        if (thr) thr[p] = 0.0f;
      }
      continue;
    }
    const int64_t ns = s1 - s0;
    const bool cached = ns <= solve_seg_cap;

    PKV_SOLVE_MARK(0);
    // 1. totals and validity (one block reduction)
    long long red[6] = {0, 0, 0, 0, 0, 0};  // tokens, candidates, sum lo, sum hi, bad shape, bad bounds
    for (int64_t i = tid; i < ns; i += solve_threads) {
      const int64_t s = s0 + i;
      const int64_t o = cv.offsets[s], c = cv.offsets[s + 1] - o, n = cv.tokens[s];
      int64_t lo = 0, hi = 0;
      if (n < 0 || c != candidate_count(n, cv.protect)) red[4] = 1;
      if (!segment_bounds(bnd, s, c, lo, hi)) red[5] = 1;
      red[0] += n;
      red[1] += c;
      red[2] += lo;
      red[3] += hi;
      if (cached) {
        sm.off[i] = o;
        sm.cnt[i] = static_cast<int32_t>(c);
        sm.lo[i] = static_cast<int32_t>(lo);
        sm.hi[i] = static_cast<int32_t>(hi);
      }
    }
    block_sums(red, sh);
    PKV_SOLVE_MARK(1);
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
      continue;
    }
    const int64_t R = B - t.lo;
    int64_t v = -1;
    bool gathered = false;
    if (R > 0 && path == 1 && ns <= solve_threads && ns * solve_sel_min_m <= key_cap) {
      gathered = sample_select(cv, ns, R, key_cap, sm, sh, sst, v);
    }
    long long H0 = 0;  // largest eligible key (the general and legacy paths search [0, H0])
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
    if (R > 0 && !gathered && path == 2 && ns <= solve_threads) {
      gathered = narrow_and_gather(cv, ns, R, H0, key_cap, sm, sh, v);
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
    PKV_SOLVE_MARK(10);
    __syncthreads();
  }
}

}  // namespace detail

namespace detail {

// Shared-memory keys per block: what the device's opt-in limit leaves after the static and metadata parts.
inline int solve_key_cap() noexcept {
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    optin = 96 * 1024;
  cudaFuncAttributes fa{};
  if (cudaFuncGetAttributes(&fa, solve_kernel<>) != cudaSuccess) fa.sharedSizeBytes = 16 * 1024 + solve_meta_bytes;
  const long long avail = static_cast<long long>(optin) - static_cast<long long>(fa.sharedSizeBytes) - 1024;
  long long keys = avail / 4 / 32 * 32;
  if (keys > solve_max_keys) keys = solve_max_keys;
  if (keys < solve_min_keys) keys = solve_min_keys;
  return static_cast<int>(keys);
}

// `path`: 1 = sample-select fast path (default), 2 = the earlier shared-memory narrowing path, 0 = general path
// only (tests cover every path on the same inputs; the answers are identical). Problems a fast path cannot take
// (more than solve_seg_cap segments, windows that stop shrinking) fall back to the general path.
[[nodiscard]] inline cudaError_t solve_impl(void* d_temp, size_t& temp_bytes, const curve_set& curves,
                                            int64_t num_problems, const int64_t* problem_offsets,
                                            const solve_budget& budget, const keep_bounds& bounds, int64_t* keep,
                                            float* threshold, int32_t* status, cudaStream_t stream,
                                            int path, int key_cap_limit = 0) noexcept {
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
  int key_cap = solve_key_cap();
  if (key_cap_limit >= solve_min_keys && key_cap_limit < key_cap) key_cap = key_cap_limit / 32 * 32;  // tests
  const size_t smem = static_cast<size_t>(key_cap) * sizeof(uint32_t);
  PREFIXKV_TRY(check_runtime(
      cudaFuncSetAttribute(solve_kernel<>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
      "solve: cudaFuncSetAttribute failed"));
  const int64_t grid = num_problems < 65535 * 16 ? num_problems : 65535 * 16;
  solve_kernel<><<<static_cast<unsigned>(grid), solve_threads, smem, stream>>>(
      curves, num_problems, problem_offsets, budget, bounds, keep, threshold, status, key_cap, path);
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
//! Host-checkable arguments are validated before anything is enqueued. The solve is one kernel launch, no
//! temporary storage is used (the size query returns the minimal 256 bytes), no host synchronisation.
[[nodiscard]] inline cudaError_t solve(void* d_temp, size_t& temp_bytes, const curve_set& curves,
                                       int64_t num_problems, const int64_t* problem_offsets,
                                       const solve_budget& budget, const keep_bounds& bounds, int64_t* keep,
                                       float* threshold = nullptr, int32_t* status = nullptr,
                                       cudaStream_t stream = 0) noexcept {
  return detail::solve_impl(d_temp, temp_bytes, curves, num_problems, problem_offsets, budget, bounds, keep,
                            threshold, status, stream, PREFIXKV_SOLVE_FAST_PATH);
}

PREFIXKV_NAMESPACE_END
