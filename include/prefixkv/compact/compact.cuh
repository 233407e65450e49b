//! \file prefixkv/compact/compact.cuh
//! Device compaction of KV caches: `gather_kept` (out of place, any layout to any layout) and `compact_in_place`
//! (strided or paged, order preserving), all layers, K, V and optional scales in one launch.
//! Semantics, types and host twins: compact/compact.hpp. Design notes and numbers: docs/compaction.md.
//!
//! Validation contract
//! * Everything known on the host (view extents and strides, layer/kind consistency, grid vs selection shape,
//!   source/destination overlap in out-of-place mode, workspace size) is checked before anything is enqueued;
//!   failures return `cudaErrorInvalidValue` with a `prefixkv::reason` and enqueue nothing.
//! * The contents of device-resident inputs (offsets, kept indices, page ids) are checked on the device, without a
//!   host sync: with `index_check::device` (default) a check kernel runs first and writes one status word per
//!   block into the workspace; every block of the move kernel reads those words at its start and returns
//!   without writing anything when one is non-zero. `out.status` then receives the `reason` (0 when valid), so
//!   the caller can read it whenever it synchronises anyway. The call itself returns cudaSuccess.
//!   Everything is stream-ordered and capturable in a CUDA graph. On sm_90 the move kernel is launched with
//!   programmatic dependent launch: its blocks may be scheduled while the check kernel finishes, but each one
//!   executes `griddepcontrol.wait` (full completion and memory flush of the check grid) before it reads a
//!   status word or writes anything.
//!
//! In-place safety (no second buffer): see `detail::compact_move_rows`.
#pragma once

#include "../core/launch.cuh"
#include "../core/workspace.hpp"
#include "compact.hpp"

#include <cstdint>

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

inline constexpr int compact_threads = 256;
inline constexpr int compact_unroll = 8;  // accesses in flight per thread

template <int W>
struct compact_word;
template <>
struct compact_word<16> {
  using type = uint4;
};
template <>
struct compact_word<8> {
  using type = uint2;
};
template <>
struct compact_word<4> {
  using type = uint32_t;
};
template <>
struct compact_word<2> {
  using type = uint16_t;
};
template <>
struct compact_word<1> {
  using type = uint8_t;
};

__device__ __forceinline__ void compact_atomic_error(int32_t* slot, int32_t r) { atomicCAS(slot, 0, r); }

//! Workspace of the in-place ticket kernel (`compact_ticket_kernel`), initialised on the device by the check kernel
//! before every move, so stale contents never matter. Chunks are `compact_threads` kept ranks (one stage).
struct compact_ticket_ws {
  unsigned long long* ticket = nullptr;  // (1) ticket counter, zeroed by the check kernel
  int32_t* block_kept = nullptr;         // (check blocks) the largest kept count each check block saw
  int32_t* first_reader = nullptr;       // (segments, nch + 1) P(c): first kept rank whose index is >= c x R
  uint32_t* loaded = nullptr;            // (lanes, nch) non-zero once every load of chunk c of the lane is complete
  int64_t nch = 0;                       // bound on chunks per lane: ceil(source tokens / R)
  int64_t c0 = 0;                        // leading chunks of every lane handed out chunk-major over all lanes
  int64_t group = 1;                     // the remaining chunks: lanes in groups of `group`, chunk-major inside
  int32_t nblocks = 0;                   // words in block_kept
  int32_t dbg = 0;                       // measurement only: bit 0 = no waits (racy)
};
inline constexpr int64_t compact_ticket_rows = 256;  // R (== compact_threads: one row per thread for the offsets)

//! Device-side content checks. One status word per block (no memset needed): 0 or a `reason`.
//! (A template only so that the header can be included by several translation units.)
template <int Unused = 0>
PREFIXKV_KERNEL void __launch_bounds__(compact_threads) compact_check_kernel(compact_meta m, int32_t* block_status,
                                                                             compact_ticket_ws tw) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // let the move kernel (launched with programmatic stream serialization) get scheduled early; it still waits
  // for this whole grid to finish and flush (griddepcontrol.wait) before it reads a status word or writes
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  __shared__ int32_t err, kmax;
  if (threadIdx.x == 0) {
    err = 0;
    kmax = 0;
  }
  __syncthreads();
  int32_t local = 0, lkmax = 0;
  const int64_t S = m.sel.count;
  // ticket kernel set-up: counter, zeroed `loaded` flags (its first-reader table is written below, per rank)
  const bool prep = tw.loaded != nullptr;
  constexpr int64_t R = compact_ticket_rows;
  if (prep) {
    if (blockIdx.x == 0 && threadIdx.x == 0) *tw.ticket = 0ull;
    const int64_t nflags = m.lanes() * tw.nch;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nflags; i += int64_t(gridDim.x) * blockDim.x)
      tw.loaded[i] = 0u;
  }
  auto mark = [&](int64_t b, int64_t blk) {
    const int64_t page = m.dt.table[b * m.dt.stride + blk];
    if (page < 0 || page >= m.dt.num_pages) {
      local = static_cast<int32_t>(reason::out_of_range);
      return;
    }
    if (m.owner == nullptr) return;  // set-up only (trusted indices, ticket kernel): no ownership check
    const int32_t key = static_cast<int32_t>(b * m.dt.max_blocks + blk);
    // all layers of a sequence mark the same (block, page) pairs: a plain read first keeps the atomics (which
    // serialise per address) down to about one per page
    if (*static_cast<volatile const int32_t*>(m.owner + page) == key) return;
    const int32_t old = atomicCAS(m.owner + page, -1, key);
    if (old != -1 && old != key) local = static_cast<int32_t>(reason::overlapping_buffers);
  };
  if (blockIdx.x == 0 && threadIdx.x == 0 && S > 0 && m.sel.offsets[0] != 0)
    local = static_cast<int32_t>(reason::out_of_range);
  const int64_t vchunk = m.vchunk > 0 ? m.vchunk : 1;
  for (int64_t w = blockIdx.x; w < S * vchunk; w += gridDim.x) {
    const int64_t s = w / vchunk, chunk = w - s * vchunk;
    const int64_t off = m.sel.offsets[s], end = m.sel.offsets[s + 1];
    if (end < off) {
      local = static_cast<int32_t>(reason::out_of_range);
      continue;
    }
    const int64_t kept = end - off;
    if (kept > m.dst_capacity) {
      local = static_cast<int32_t>(reason::capacity_exceeded);
      continue;
    }
    lkmax = max(lkmax, static_cast<int32_t>(kept));
    const int64_t b = m.grid.batch_of(s);
    const int64_t per = (kept + vchunk - 1) / vchunk;
    const int64_t p_end = min(kept, (chunk + 1) * per);
    for (int64_t p = chunk * per + threadIdx.x; p < p_end; p += blockDim.x) {
      const int64_t t = m.sel.indices[off + p];
      if (t < 0 || t >= m.src_tokens) {
        local = static_cast<int32_t>(reason::out_of_range);
        continue;
      }
      const int64_t prev = m.inplace && p > 0 ? m.sel.indices[off + p - 1] : -1;
      if (prev >= t) local = static_cast<int32_t>(reason::not_ascending);
      if (prep) {
        // P(c) = p for every chunk boundary c R in (idx[p - 1], idx[p]] (and, for the last rank, every boundary
        // after idx[p]): one writer per entry when the indices ascend; clamped to the table otherwise
        int32_t* P = tw.first_reader + s * (tw.nch + 1);
        const int64_t c_lo = prev < 0 ? 0 : prev / R + 1;
        const int64_t c_hi = min(tw.nch, t / R);
        for (int64_t c = c_lo; c <= c_hi; ++c) P[c] = static_cast<int32_t>(p);
        if (p == kept - 1)
          for (int64_t c = max(c_lo, t / R + 1); c <= tw.nch; ++c) P[c] = static_cast<int32_t>(kept);
      }
      if (m.st.paged) {
        const int64_t blk = m.st.block_of(t);
        const int64_t page = m.st.table[b * m.st.stride + blk];
        if (page < 0 || page >= m.st.num_pages) {
          local = static_cast<int32_t>(reason::out_of_range);
          continue;
        }
        // in place the indices ascend (or not_ascending is reported): marking the first kept token of each
        // source block marks every touched block
        if (m.inplace && (prev < 0 || m.st.block_of(prev) != blk)) mark(b, blk);
      }
      if (m.paged_dst && p % m.dt.page_size == 0) mark(b, m.dt.block_of(p));
    }
  }
  if (local) compact_atomic_error(&err, local);
  if (prep && lkmax > 0) atomicMax(&kmax, lkmax);
  __syncthreads();
  if (threadIdx.x == 0) {
    block_status[blockIdx.x] = err;
    if (prep) tw.block_kept[blockIdx.x] = kmax;
  }
}

//! Cache hints of the data accesses (bit 0: streaming loads `ld.global.cs`, bit 1: streaming stores
//! `st.global.cs`; a clear bit = plain access).
//! Plain accesses are the default: measured 0.01-0.02 of memcpy faster than streaming ones, for this kernel and for
//! a plain copy kernel alike (bench/compact/RESULTS.md).
inline constexpr int compact_hint_cs = 3;
inline constexpr int compact_hint_plain = 0;
template <class V, int Hint = compact_hint_plain>
__device__ __forceinline__ V compact_load(const void* p) {
  if constexpr ((Hint & 1) != 0) return __ldcs(reinterpret_cast<const V*>(p));
  else return *reinterpret_cast<const V*>(p);
}
template <class V, int Hint = compact_hint_plain>
__device__ __forceinline__ void compact_store(void* p, const V& v) {
  if constexpr ((Hint & 2) != 0) __stcs(reinterpret_cast<V*>(p), v);
  else *reinterpret_cast<V*>(p) = v;
}

//! Row offsets of one stage (one row per thread), double-buffered in shared memory.
struct compact_stage_smem {
  int64_t src[2][compact_threads];
  int64_t dst[2][compact_threads];
  int32_t past[2];  // in place: the stage's first source row lies past its last destination row (no round barriers)
};

//! Moves rows [r0, r1) of one lane (layer l, sequence b, kind k, head h) using W-byte accesses.
//!
//! Rows go in stages of blockDim rows. The byte offsets of a stage's source and destination rows (kept index and
//! block-table lookups) are computed one stage ahead into shared memory, and the kept indices two stages ahead, so
//! the dependent index -> page -> data loads never sit on the critical path of the copy.
//! Within a stage the work is flattened to items (row r, chunk c), item index i = r * vpr + c (vpr = row bytes /
//! W), processed in rounds of N = blockDim * U consecutive items: every thread first LOADS its U items of the
//! round into registers, then (in place) the block meets at __syncthreads, then every thread STORES them.
//!
//! Why in-place is race-free (dst row j = kept position, src row idx[j], idx strictly ascending, so idx[j] >= j):
//! the store of item (j, c) overwrites bytes [c*W, c*W+W) of row j. The only item that reads those bytes is
//! (p, c) with idx[p] == j (different (layer, sequence, head, kind) lanes never alias: views are validated
//! non-overlapping, paged pages distinct, and scales with 1 head are their own lane). Since idx[p] >= p, p <= j,
//! so the reader's item index p*vpr + c <= j*vpr + c: it belongs to the same round (loaded before the barrier
//! that precedes the store) or to an earlier round of the same block (loaded before that round's barrier, which
//! this thread passed before). Conversely a load of a later round (p', c) reads row idx[p'] with p'*vpr + c >
//! j*vpr + c, i.e. p' > j, so idx[p'] > j for every row j stored earlier: loads never see a store of the current
//! or an earlier round by any thread, and one barrier per round suffices. A lane is handled by exactly one block
//! (nchunk == 1 in place). If p == j (row stays put) load and store hit the same bytes with the same value.
//! The barrier of a round is skipped when the stage's first source row idx[rs] lies past its last destination
//! row (rs + rows - 1): then every source row of the stage does (idx ascends), no load of the stage can read a row
//! the stage stores, whichever rounds the warps are in; the stage-end barrier still separates stages. Far enough
//! into a lane with kept fraction f < 1 (idx[p] ~ p / f) this holds for almost every stage.
//! Template knobs: U accesses in flight per thread (0: by width), Hint (cache hints, see compact_load), Contig
//! (both sides' rows are packed: no per-element stride math; the fast kernel's case).
template <int W, bool InPlace, int U0 = 0, int Hint = compact_hint_plain, bool Contig = false>
__device__ __forceinline__ void compact_move_rows(const compact_meta& m, const compact_geom& sg,
                                                  const compact_geom& dg, const char* sbase, char* dbase,
                                                  const int32_t* idx, int64_t b, int64_t h, int64_t r0, int64_t r1,
                                                  compact_stage_smem& sm) {
  using word = typename compact_word<W>::type;
  // narrow paths: odd rows, not bandwidth critical
  constexpr int U = U0 > 0 ? U0 : (W == 16 ? compact_unroll : (W == 8 ? 4 : 2));
  const int S = blockDim.x;
  const int tid = threadIdx.x;
  const int32_t vpr = static_cast<int32_t>(sg.row_bytes / W);
  const int32_t dr = S / vpr, dc = S - dr * vpr;
  const compact_table& st = m.st;
  const compact_table& dt = m.dt;
  auto src_page = [&](int64_t t) -> int64_t { return st.paged ? st.table[b * st.stride + st.block_of(t)] : 0; };
  auto dst_page = [&](int64_t j) -> int64_t { return dt.paged ? dt.table[b * dt.stride + dt.block_of(j)] : 0; };
  auto src_off = [&](int64_t t, int64_t page) -> int64_t {
    return st.paged ? page * sg.s_batch + (t - st.block_of(t) * st.page_size) * sg.s_token + h * sg.s_head
                    : b * sg.s_batch + h * sg.s_head + t * sg.s_token;
  };
  auto dst_off = [&](int64_t j, int64_t page) -> int64_t {
    return dt.paged ? page * dg.s_batch + (j - dt.block_of(j) * dt.page_size) * dg.s_token + h * dg.s_head
                    : b * dg.s_batch + h * dg.s_head + j * dg.s_token;
  };
  const int64_t stages = (r1 - r0 + S - 1) / S;
  {
    const int64_t row = r0 + tid;
    if (row < r1) {
      const int64_t t = idx[row];
      sm.src[0][tid] = src_off(t, src_page(t));
      sm.dst[0][tid] = dst_off(row, dst_page(row));
      if (InPlace && tid == 0) sm.past[0] = t >= min(r1, r0 + S);
    }
  }
  int64_t t_next = 0;  // kept index of this thread's row in the next stage
  if (r0 + S + tid < r1) t_next = idx[r0 + S + tid];
  __syncthreads();
  for (int64_t stg = 0; stg < stages; ++stg) {
    const int cur = static_cast<int>(stg & 1);
    const int64_t rs = r0 + stg * S;
    const int32_t rows = static_cast<int32_t>(min(static_cast<int64_t>(S), r1 - rs));
    // prefetch: pages of the next stage, kept indices of the one after
    const int64_t row_a = rs + S + tid;
    const bool has_a = row_a < r1;
    int64_t sp_a = 0, dp_a = 0, t_b = 0;
    if (has_a) {
      sp_a = src_page(t_next);
      dp_a = dst_page(row_a);
    }
    if (row_a + S < r1) t_b = idx[row_a + S];
    // data
    const int32_t items = rows * vpr;
    int32_t rr = tid / vpr, cc = tid - (tid / vpr) * vpr;
    for (int32_t q0 = 0; q0 < items; q0 += S * U) {
      word buf[U];
      const int32_t rr0 = rr, cc0 = cc;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (q0 + u * S + tid < items)
          buf[u] = compact_load<word, Hint>(sbase + sm.src[cur][rr] +
                                            (Contig ? cc * W : sg.chunk(static_cast<int64_t>(cc) * W)));
        rr += dr;
        cc += dc;
        if (cc >= vpr) {
          cc -= vpr;
          ++rr;
        }
      }
      if (InPlace && !sm.past[cur]) __syncthreads();
      rr = rr0;
      cc = cc0;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (q0 + u * S + tid < items)
          compact_store<word, Hint>(dbase + sm.dst[cur][rr] + (Contig ? cc * W : dg.chunk(static_cast<int64_t>(cc) * W)),
                                    buf[u]);
        rr += dr;
        cc += dc;
        if (cc >= vpr) {
          cc -= vpr;
          ++rr;
        }
      }
    }
    if (has_a) {
      sm.src[cur ^ 1][tid] = src_off(t_next, sp_a);
      sm.dst[cur ^ 1][tid] = dst_off(row_a, dp_a);
      if (InPlace && tid == 0) sm.past[cur ^ 1] = t_next >= min(r1, row_a + S);
    }
    t_next = t_b;
    __syncthreads();
  }
}

template <bool InPlace>
__device__ __forceinline__ void compact_dispatch(const compact_meta& m, int k, const char* s, char* d,
                                                 const int32_t* idx, int64_t b, int64_t h, int64_t r0, int64_t r1,
                                                 compact_stage_smem& sm) {
  const compact_geom& sg = m.src[k];
  const compact_geom& dg = m.dst[k];
  switch (m.vec[k]) {
    case 16: compact_move_rows<16, InPlace>(m, sg, dg, s, d, idx, b, h, r0, r1, sm); break;
    case 8: compact_move_rows<8, InPlace>(m, sg, dg, s, d, idx, b, h, r0, r1, sm); break;
    case 4: compact_move_rows<4, InPlace>(m, sg, dg, s, d, idx, b, h, r0, r1, sm); break;
    case 2: compact_move_rows<2, InPlace>(m, sg, dg, s, d, idx, b, h, r0, r1, sm); break;
    default: compact_move_rows<1, InPlace>(m, sg, dg, s, d, idx, b, h, r0, r1, sm); break;
  }
}

//! Block 0 writes the small outputs (lengths, cu_seqlens, pages_in_use).
__device__ inline void compact_write_outputs(const compact_meta& m) {
  const int64_t S = m.sel.count;
  if (m.out.lengths)
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) m.out.lengths[s] = static_cast<int32_t>(m.sel.kept(s));
  if (m.out.cu_seqlens && m.layers > 0) {
    const int64_t spl = S / m.layers;
    for (int64_t i = threadIdx.x; i < m.layers * (spl + 1); i += blockDim.x) {
      const int64_t l = i / (spl + 1), j = i - l * (spl + 1);
      m.out.cu_seqlens[i] = static_cast<int32_t>(m.sel.offsets[l * spl + j] - m.sel.offsets[l * spl]);
    }
  }
  if (m.out.pages_in_use)
    for (int64_t b = threadIdx.x; b < m.batch; b += blockDim.x) {
      int64_t mx = 0;
      for (int64_t l = 0; l < m.layers; ++l)
        for (int64_t h = 0; h < m.grid.heads; ++h) {
          const int64_t k = m.sel.kept(m.grid.id(l, b, h));
          mx = max(mx, (k + m.dt.page_size - 1) / m.dt.page_size);
        }
      m.out.pages_in_use[b] = static_cast<int32_t>(mx);
    }
}

//! Start of every move kernel: waits for the check kernel (programmatic dependent launch), honours its status
//! words (returns false, after block 0 wrote `out.status`, when a check failed), writes the small outputs.
__device__ inline bool compact_prologue(const compact_meta& m) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");  // no-op without a programmatic dependency
#endif
  __shared__ int32_t first;
  if (m.vstatus) {
    int32_t e = 0;
    for (int i = threadIdx.x; i < m.vblocks; i += blockDim.x)
      if (m.vstatus[i]) e = m.vstatus[i];
    if (__syncthreads_or(e != 0)) {
      if (blockIdx.x == 0 && m.out.status) {
        if (threadIdx.x == 0) first = 0;
        __syncthreads();
        if (e) atomicCAS(&first, 0, e);
        __syncthreads();
        if (threadIdx.x == 0) *m.out.status = first;
      }
      return false;
    }
  }
  if (blockIdx.x == 0) {
    if (m.out.status && threadIdx.x == 0) *m.out.status = 0;
    compact_write_outputs(m);
  }
  return true;
}

//! Lane decomposition shared by the move kernels: work item w -> (layer, sequence, kind, head, rows [r0, r1)).
struct compact_work {
  int64_t l, b, h, r0, r1, off;
  int k;
};
__device__ __forceinline__ compact_work compact_work_of(const compact_meta& m, int64_t w) {
  compact_work x;
  const int64_t lpl = m.lanes_per_lb();
  const int64_t lane = w / m.nchunk, chunk = w - lane * m.nchunk;
  const int64_t lb = lane / lpl, rr = lane - lb * lpl;
  x.l = lb / m.batch;
  x.b = lb - x.l * m.batch;
  int k = 0;
  while (k + 1 < m.kinds && rr >= m.lane_prefix[k + 1]) ++k;
  x.k = k;
  x.h = rr - m.lane_prefix[k];
  const int64_t seg = m.grid.heads == 1 ? m.grid.id(x.l, x.b) : m.grid.id(x.l, x.b, x.h);
  x.off = m.sel.offsets[seg];
  const int64_t kept = m.sel.offsets[seg + 1] - x.off;
  const int64_t per = (kept + m.nchunk - 1) / m.nchunk;
  x.r0 = chunk * per;
  x.r1 = min(kept, x.r0 + per);
  return x;
}

//! The general kernel (any access width, strided rows); `compact_fast_kernel` serves packed 16-byte rows.
//! 128 registers, 2 blocks per SM. (Measured: capping at 80 registers for 3 blocks/SM spills and loses 0.06-0.14
//! of memcpy; a cp.async.bulk shared-memory pipeline with one warp per block reached only 0.83-0.85. See
//! bench/compact/RESULTS.md.)
template <bool InPlace>
PREFIXKV_KERNEL void __launch_bounds__(compact_threads, 2) compact_move_kernel(const compact_meta m,
                                                                               const compact_ptrs p) {
  // 1. honour the check kernel: no block writes anything when a check failed
  if (!compact_prologue(m)) return;
  // 2. lanes (layer, sequence, kind, head) x chunks of kept rows
  __shared__ compact_stage_smem sm;
  const int64_t total = m.lanes() * m.nchunk;
  for (int64_t w = blockIdx.x; w < total; w += gridDim.x) {
    const compact_work x = compact_work_of(m, w);
    if (x.r0 >= x.r1) continue;
    compact_dispatch<InPlace>(m, x.k, p.src[x.l][x.k], p.dst[x.l][x.k], m.sel.indices + x.off, x.b, x.h, x.r0, x.r1,
                              sm);
  }
}

//! Fast move kernel: every kind moves 16-byte words between packed rows (the common case: fp16/bf16/fp8 rows of
//! >= 16 bytes, any token/head/page strides). Same staging and in-place proof as `compact_move_rows`, without the
//! width switch and per-element stride math. U accesses in flight per thread, MinBlocks blocks per SM.
template <bool InPlace, int U, int MinBlocks, int Hint>
PREFIXKV_KERNEL void __launch_bounds__(compact_threads, MinBlocks) compact_fast_kernel(const compact_meta m,
                                                                                       const compact_ptrs p) {
  if (!compact_prologue(m)) return;
  __shared__ compact_stage_smem sm;
  const int64_t total = m.lanes() * m.nchunk;
  for (int64_t w = blockIdx.x; w < total; w += gridDim.x) {
    const compact_work x = compact_work_of(m, w);
    if (x.r0 >= x.r1) continue;
    compact_move_rows<16, InPlace, U, Hint, true>(m, m.src[x.k], m.dst[x.k], p.src[x.l][x.k], p.dst[x.l][x.k],
                                                  m.sel.indices + x.off, x.b, x.h, x.r0, x.r1, sm);
  }
}

// ---- in place, balanced: persistent blocks taking chunks of lanes from a ticket counter -------------------------

__device__ __forceinline__ uint32_t compact_acquire_load(const uint32_t* f) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(f) : "memory");
  return v;
}
__device__ __forceinline__ void compact_release_store(uint32_t* f, uint32_t v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(f), "r"(v) : "memory");
}

//! A chunk as the ticket kernel's threads see it (shared memory ring).
struct compact_tdesc {
  int64_t ibase;           // sel.indices offset of the chunk's first kept rank
  int64_t b, h;            // sequence, head
  int32_t lane, c, rows;   // rows: kept ranks in the chunk (0: empty ticket; -1: no more tickets)
  int32_t l, k, vpr;       // layer, kind, 16-byte words per row
  int32_t w0, w1;          // chunks of the lane whose loads must be complete before this chunk stores (w0 > w1: none)
};

//! Ticket -> (lane, chunk) in the ticket kernel's order: the first c0 chunks of every lane chunk-major over all lanes
//! (a lane's first chunks have their readers close behind them: chunk c's destination rows are read by ranks around
//! f x c, f the kept fraction, so only one chunk of each lane should be in flight), then the lanes in groups of
//! `group`, chunk-major inside a group (few memory regions in flight, readers far behind).
__device__ __forceinline__ void compact_ticket_decode(const compact_ticket_ws& w, int64_t lanes, int64_t nchd, int64_t t,
                                                      int64_t& lane, int64_t& c) {
  const int64_t c0 = min(w.c0, nchd), t1 = lanes * c0;
  if (t < t1) {
    c = t / lanes;
    lane = t - c * lanes;
    return;
  }
  const int64_t u = t - t1, n2 = nchd - c0, per_group = w.group * n2;
  const int64_t g = u / per_group, r = u - g * per_group;
  const int64_t gg = min(w.group, lanes - g * w.group);
  const int64_t cc = r / gg;
  c = c0 + cc;
  lane = g * w.group + (r - cc * gg);
}

//! In place with balanced work (fast case: every kind moves packed rows in 16-byte words).
//!
//! Why: one long-lived block per lane is a fixed share of the work per block; the SMs do not get equal bandwidth,
//! and the share that lands on the slowest one decides (a plain copy with that structure: 0.93-0.95 of memcpy; the
//! same copy handed out from a ticket counter: 0.97-1.00; bench_compact BM_copy variants 5, 18-25).
//!
//! Work: lanes cut into chunks of R = 256 kept ranks (one stage of `compact_move_rows`), taken from a ticket
//! counter by 2 x SMs persistent blocks in the order of compact_ticket_decode. The set-up of a chunk is pipelined
//! across tickets: in the iteration that moves chunk J_i, thread 0 takes the ticket of J_{i+5}, decodes J_{i+4}
//! (loads of its segment offsets and first-reader entries) and completes the descriptor of J_{i+3}; every thread
//! looks up the pages of its row of J_{i+1} and loads its kept index of J_{i+2}; the row offsets of J_{i+1} are
//! written into the other half of a shared-memory double buffer. The data path is the per-lane mover's: rounds of
//! 8 16-byte loads per thread, a barrier, the stores.
//!
//! Ordering (idx strictly ascending, so idx[p] >= p): chunk c stores rows [c R, c R + rows), which only ranks
//! [P(c), P(c + 1)) read, all in chunks <= c. Inside the chunk the rounds give the per-lane argument (loads of a
//! round before the barrier, stores after; later rounds never read a row stored earlier). For a reader chunk
//! c' < c: thread 0 of c's block acquire-loads c''s `loaded` flag before c's first store barrier (spinning only if it
//! is not set yet). The flag is released by thread 0 of c''s block in the iteration after c' (or after its last
//! iteration): every thread of that block stored c''s data, so every load of c' has completed, before the
//! iteration's end barrier. Rows a chunk reads are stored only by chunks >= c (idx[p] >= p), which wait for it
//! in the same way. Lanes never alias (as for the other kernels).
//! Progress, with no assumption on block scheduling: a chunk waits only for chunks of the same lane with lower
//! chunk indices, hence lower tickets; a block releases its previous chunk before it waits for anything, and
//! takes tickets in increasing order. So the lowest ticket whose flag is unset belongs to a block that is not
//! waiting for anything unreleased. Chunks with rows wait only for full chunks (empty ones are never waited for).
template <int Unused = 0>
PREFIXKV_KERNEL void __launch_bounds__(compact_threads, 2)
    compact_ticket_kernel(const compact_meta m, const compact_ptrs p, const compact_ticket_ws w) {
  if (!compact_prologue(m)) return;
  constexpr int U = compact_unroll, S = compact_threads;
  constexpr int64_t R = compact_ticket_rows;
  __shared__ int64_t soff[2][S], doff[2][S];
  __shared__ compact_tdesc ring[8];
  __shared__ int64_t nchd_s;
  __shared__ int32_t past[2];       // J_i's first source row lies past its last destination row: no round barriers
  __shared__ int32_t must_wait[2];  // a predecessor flag of J_i was unset when read an iteration ahead
  const int tid = int(threadIdx.x);
  constexpr int CT = 0;  // the control lane (a ninth warp for it measured 0.06 of memcpy slower: 112 registers spill)
  const bool data = tid < S;
  const int64_t lanes = m.lanes(), nch = w.nch;
  const compact_table& st = m.st;
  const compact_table& dt = m.dt;
  // chunks of the longest segment (the check blocks' words), hence the ticket space lanes x nchd
  if (tid < 32) {
    int32_t mk = 0;
    for (int i = tid; i < w.nblocks; i += 32) mk = max(mk, w.block_kept[i]);
    for (int o = 16; o > 0; o >>= 1) mk = max(mk, __shfl_xor_sync(~0u, mk, o));
    if (tid == 0) nchd_s = min(nch, (int64_t(mk) + R - 1) / R);
  }
  __syncthreads();
  const int64_t nchd = nchd_s, total = lanes * nchd;
  // thread 0's pipeline: ticket in flight (J_{i+5}), decoded ticket with its loads in flight (J_{i+4})
  struct pending {
    int64_t off0, off1;
    int32_t lane, c, p0, p1;  // lane < 0: no more tickets
  };
  auto start = [&](int64_t t, pending& x) {  // decode, issue the loads
    x.lane = -1;
    if (t >= total) return;
    int64_t lane, c;
    compact_ticket_decode(w, lanes, nchd, t, lane, c);
    const int64_t lpl = m.lanes_per_lb();
    const int64_t lb = lane / lpl, rr = lane - lb * lpl;
    const int64_t l = lb / m.batch, b = lb - l * m.batch;
    int k = 0;
    while (k + 1 < m.kinds && rr >= m.lane_prefix[k + 1]) ++k;
    const int64_t h = rr - m.lane_prefix[k];
    const int64_t seg = m.grid.heads == 1 ? m.grid.id(l, b) : m.grid.id(l, b, h);
    x.lane = static_cast<int32_t>(lane);
    x.c = static_cast<int32_t>(c);
    x.off0 = m.sel.offsets[seg];
    x.off1 = m.sel.offsets[seg + 1];
    const int32_t* P = w.first_reader + seg * (nch + 1);
    x.p0 = P[c];
    x.p1 = P[c + 1];
  };
  auto finish = [&](const pending& x, compact_tdesc& d) {  // the loads have arrived: the descriptor
    if (x.lane < 0) {
      d.rows = -1;
      return;
    }
    const int64_t lpl = m.lanes_per_lb();
    const int64_t lb = x.lane / lpl, rr = x.lane - lb * lpl;
    const int64_t l = lb / m.batch;
    int k = 0;
    while (k + 1 < m.kinds && rr >= m.lane_prefix[k + 1]) ++k;
    d.b = lb - l * m.batch;
    d.h = rr - m.lane_prefix[k];
    d.l = static_cast<int32_t>(l);
    d.k = k;
    d.vpr = static_cast<int32_t>(m.src[k].row_bytes / 16);
    d.lane = x.lane;
    d.c = x.c;
    const int64_t kept = min(max(x.off1 - x.off0, int64_t(0)), nch * R);
    d.rows = static_cast<int32_t>(min(R, max(int64_t(0), kept - int64_t(x.c) * R)));
    d.ibase = x.off0 + int64_t(x.c) * R;
    // chunks holding the readers [P(c), P(c + 1)) of the destination rows, below c (clamped: whatever the
    // table holds, a chunk only ever waits for lower chunks of its lane, which are full)
    d.w0 = static_cast<int32_t>(max(int64_t(0), int64_t(x.p0) / R));
    d.w1 = x.p1 > x.p0 ? static_cast<int32_t>(min(int64_t(x.c) - 1, (int64_t(x.p1) - 1) / R)) : -1;
  };
  __shared__ pending pb;  // control lane: the chunk whose loads were issued an iteration ago, to finish
  unsigned long long tk_next = 0;
  if (tid == CT) {
    unsigned long long t[5];
#pragma unroll
    for (int j = 0; j < 5; ++j) t[j] = atomicAdd(w.ticket, 1ull);
    pending x[3];
#pragma unroll
    for (int j = 0; j < 3; ++j) start(static_cast<int64_t>(t[j]), x[j]);
#pragma unroll
    for (int j = 0; j < 3; ++j) finish(x[j], ring[j]);
    start(static_cast<int64_t>(t[3]), pb);
    tk_next = t[4];
  }
  __syncthreads();
  // J_0's offsets; the kept index of this thread's row of J_1
  int32_t t_cur = 0;
  {
    const compact_tdesc& J0 = ring[0];
    if (J0.rows > 0 && tid < J0.rows) {
      const compact_geom& sg = m.src[J0.k];
      const compact_geom& dg = m.dst[J0.k];
      const int64_t t = m.sel.indices[J0.ibase + tid], j = int64_t(J0.c) * R + tid;
      soff[0][tid] = st.paged ? st.row(sg, J0.b, J0.h, t) : J0.b * sg.s_batch + J0.h * sg.s_head + t * sg.s_token;
      doff[0][tid] = dt.paged ? dt.row(dg, J0.b, J0.h, j) : J0.b * dg.s_batch + J0.h * dg.s_head + j * dg.s_token;
      if (tid == 0) past[0] = t >= j + J0.rows;
    }
    if (tid == CT) must_wait[0] = J0.rows > 0 && J0.w0 <= J0.w1;
    const compact_tdesc& J1 = ring[1];
    if (J1.rows > 0 && tid < J1.rows) t_cur = m.sel.indices[J1.ibase + tid];
  }
  __syncthreads();
  uint32_t* release = nullptr;  // control lane: the flag of the previous chunk, released in this iteration
  for (int64_t i = 0;; ++i) {
    const int cur = static_cast<int>(i & 1);
    const compact_tdesc& J = ring[i & 7];  // (slot i & 7 is rewritten at iteration i + 5)
    if (J.rows < 0) break;  // a block's tickets increase: no later chunk either
    // set-up of later chunks: pages of J_{i+1}, kept indices of J_{i+2}
    const compact_tdesc& J1 = ring[(i + 1) & 7];
    const compact_tdesc& J2 = ring[(i + 2) & 7];
    const bool has1 = J1.rows > 0 && tid < J1.rows;
    int32_t sp = 0, dp = 0, t_nxt = 0;
    if (has1) {
      if (st.paged) sp = st.table[J1.b * st.stride + st.block_of(t_cur)];
      if (dt.paged) dp = dt.table[J1.b * dt.stride + dt.block_of(int64_t(J1.c) * R + tid)];
    }
    if (J2.rows > 0 && tid < J2.rows) t_nxt = m.sel.indices[J2.ibase + tid];
    pending pn{};
    // the control lane, once per iteration: J_{i+4} (decode the ticket taken an iteration
    // ago, issue its loads), the ticket of J_{i+5}; release the previous chunk (its loads were consumed by its
    // stores before the last end barrier); read J_{i+1}'s predecessor flags (acquire; J_i itself is ordered by the
    // end barrier), so that J_{i+1} stores without waiting when they are all set
    auto control = [&]() {
      start(static_cast<int64_t>(tk_next), pn);
      tk_next = atomicAdd(w.ticket, 1ull);
      if (release) compact_release_store(release, 1u);
      release = nullptr;
      int32_t unset = 0;
      if (J1.rows > 0 && !(w.dbg & 1))
        for (int32_t c2 = J1.w0; c2 <= J1.w1; ++c2)
          if (!(J1.lane == J.lane && c2 == J.c) && compact_acquire_load(w.loaded + int64_t(J1.lane) * nch + c2) == 0u)
            unset = 1;
      must_wait[cur ^ 1] = unset;
    };
    if (must_wait[cur]) {
      // a predecessor was not released an iteration ago: release the previous chunk first (so that no two blocks
      // wait for each other), then wait, then a barrier before any store
      if (tid == CT) {
        if (release) compact_release_store(release, 1u);
        release = nullptr;
        for (int32_t c2 = J.w0; c2 <= J.w1; ++c2) {
          const uint32_t* f = w.loaded + int64_t(J.lane) * nch + c2;
          unsigned ns = 32;
          while (compact_acquire_load(f) == 0u) {
            __nanosleep(ns);
            ns = ns < 1024 ? 2 * ns : ns;
          }
        }
      }
      __syncthreads();
    }
    if (J.rows > 0) {
      const char* sb = p.src[J.l][J.k];
      char* db = p.dst[J.l][J.k];
      const int32_t vpr = J.vpr, items = J.rows * vpr;
      const int32_t dr = S / vpr, dc = S - dr * vpr;
      int32_t rr = tid / vpr, cc = tid - (tid / vpr) * vpr;
      for (int32_t q0 = 0; q0 < items; q0 += S * U) {
        uint4 buf[U];
        const int32_t rr0 = rr, cc0 = cc;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (data && q0 + u * S + tid < items) buf[u] = compact_load<uint4>(sb + soff[cur][rr] + cc * 16);
          rr += dr;
          cc += dc;
          if (cc >= vpr) {
            cc -= vpr;
            ++rr;
          }
        }
        if (q0 == 0 && tid == CT) control();
        if (!past[cur]) __syncthreads();
        rr = rr0;
        cc = cc0;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (data && q0 + u * S + tid < items) compact_store<uint4>(db + doff[cur][rr] + cc * 16, buf[u]);
          rr += dr;
          cc += dc;
          if (cc >= vpr) {
            cc -= vpr;
            ++rr;
          }
        }
      }
    } else if (tid == CT) {
      control();
    }
    if (tid == CT) {
      if (J.rows > 0) release = w.loaded + int64_t(J.lane) * nch + J.c;
      // J_{i+3}: its loads were issued an iteration ago
      finish(pb, ring[(i + 3) & 7]);
      pb = pn;
    }
    // row offsets of J_{i+1}
    if (has1) {
      const compact_geom& sg = m.src[J1.k];
      const compact_geom& dg = m.dst[J1.k];
      const int64_t j = int64_t(J1.c) * R + tid, t = t_cur;
      if (tid == 0) past[cur ^ 1] = t >= j + J1.rows;
      soff[cur ^ 1][tid] = st.paged ? sp * sg.s_batch + (t - st.block_of(t) * st.page_size) * sg.s_token + J1.h * sg.s_head
                                    : J1.b * sg.s_batch + J1.h * sg.s_head + t * sg.s_token;
      doff[cur ^ 1][tid] = dt.paged ? dp * dg.s_batch + (j - dt.block_of(j) * dt.page_size) * dg.s_token + J1.h * dg.s_head
                                    : J1.b * dg.s_batch + J1.h * dg.s_head + j * dg.s_token;
    }
    t_cur = t_nxt;
    __syncthreads();
  }
  if (tid == CT && release) compact_release_store(release, 1u);
}

//! Benchmark/test hook (not API): launch variants of the move kernel, compared in one process by bench_compact.
struct compact_tuning {
  bool pdl = true;         // programmatic dependent launch of the move kernel after the check kernel
  int64_t max_blocks = 0;  // > 0: cap the move kernel's grid (tests: several lanes per block)
  int kernel = -1;         // -1: default choice; 0: general kernel; 1..: fast kernel variants (compact_fast_pick)
  int resident = 0;        // > 0: persistent grid of (blocks per SM of the variant) x SMs, out of place split into
                           //      about `resident` x grid equal chunks
  int64_t chunk_rows = -1; // out of place: lanes cut into chunks of about this many destination rows, one block
                           //      each, grid uncapped (0: the ~16 x SMs work items split; -1: default)
  int ticket = -1;         // in place, fast case: -1 default, 0 one block per lane, 1 compact_ticket_kernel
  int64_t ticket_c0 = -1;  // ticket kernel: leading chunks handed out over all lanes (-1: default)
  int64_t ticket_group = 0;// ticket kernel: lanes per group after them (0: default)
  int ticket_dbg = 0;      // ticket kernel, measurement only: 1 = no waits (racy)
};
inline compact_tuning& compact_tune() {
  static compact_tuning t;
  return t;
}

//! Launches `kernel` with programmatic stream serialization (overlaps its launch with the check kernel's tail).
template <class... Params, class... Args>
cudaError_t compact_launch_kernel(void (*kernel)(Params...), unsigned blocks, unsigned threads, size_t smem,
                                  cudaStream_t stream, bool pdl, const Args&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

//! Fast kernel variants (bench_compact compares them in one process): variant -> kernel, blocks per SM.
//! 1: streaming (.cs) loads and stores; 2 (default): plain accesses, 0.01-0.02 of memcpy faster. Dropped after
//! device run 6 (bench/compact/RESULTS.md): 16 accesses in flight (spills at 128 registers, -0.03..-0.04),
//! 4 blocks/SM with 8 or 4 accesses (64 registers, spills, -0.01..-0.23).
inline constexpr int compact_default_variant = 2;
inline constexpr int compact_fast_variants = 2;
//! Out of place: chunks of about this many destination rows, one short-lived block each (device runs 7-8:
//! 0.955-0.973 of memcpy at 32K/128K tokens vs 0.92-0.93 for ~16 x SMs long chunks; 128 and 512 rows mixed).
inline constexpr int64_t compact_default_chunk_rows = 256;
//! In place (16-byte rows): the ticket kernel, its leading chunks over all lanes, then groups of lanes.
inline constexpr bool compact_default_ticket = true;
inline constexpr int64_t compact_default_ticket_c0 = 16;
inline constexpr int64_t compact_default_ticket_group = 16;
inline void compact_fast_pick(int variant, bool inplace, void (*&kernel)(compact_meta, compact_ptrs), int& per_sm) {
  per_sm = 2;
  if (variant == 1)
    kernel = inplace ? compact_fast_kernel<true, 8, 2, compact_hint_cs> : compact_fast_kernel<false, 8, 2, compact_hint_cs>;
  else
    kernel = inplace ? compact_fast_kernel<true, 8, 2, compact_hint_plain>
                     : compact_fast_kernel<false, 8, 2, compact_hint_plain>;
}

template <class SrcCache, class DstCache>
cudaError_t compact_launch(void* d_temp, size_t& temp_bytes, const SrcCache& src, const DstCache& dst, bool inplace,
                           const selection& sel, const segment_grid& grid, const compact_outputs& out,
                           cudaStream_t stream, index_check check) {
  compact_meta m;
  compact_ptrs ptrs;
  PREFIXKV_TRY(compact_plan(src, dst, inplace, sel, grid, out, m, &ptrs));
  if (check != index_check::device && check != index_check::trusted)
    return fail(reason::bad_parameter, "compact: unknown index_check");
  const int sms = sm_count();
  const bool validate_on_device = check == index_check::device;
  bool fast = m.kinds > 0;
  for (int k = 0; k < m.kinds; ++k)
    fast = fast && m.vec[k] == 16 && m.src[k].contiguous && m.dst[k].contiguous;
  const int variant = !fast ? 0 : (compact_tune().kernel >= 0 ? compact_tune().kernel : compact_default_variant);
  const int64_t lanes = m.lanes();
  // in place, 16-byte rows: the ticket kernel (its set-up is done by the check kernel, also with trusted indices)
  const bool ticket = inplace && variant > 0 && lanes > 0 &&
                      (compact_tune().ticket >= 0 ? compact_tune().ticket == 1 : compact_default_ticket);
  const bool run_check = validate_on_device || ticket;
  // check kernel: (segment, chunk of kept indices) work items, enough of them to fill the machine
  m.vchunk = std::max<int64_t>(1, std::min<int64_t>((4 * sms + sel.count - 1) / std::max<int64_t>(sel.count, 1),
                                                    (m.src_tokens + 1023) / 1024));
  const int64_t vblocks = run_check ? std::max<int64_t>(1, std::min<int64_t>(sel.count * m.vchunk, 2 * sms)) : 0;
  const bool need_owner = validate_on_device && m.paged_dst && m.dt.num_pages > 0;
  compact_ticket_ws tw;
  if (ticket) {
    tw.nch = std::max<int64_t>(1, (m.src_tokens + compact_ticket_rows - 1) / compact_ticket_rows);
    tw.c0 = compact_tune().ticket_c0 >= 0 ? compact_tune().ticket_c0 : compact_default_ticket_c0;
    tw.group = compact_tune().ticket_group > 0 ? compact_tune().ticket_group : compact_default_ticket_group;
    tw.nblocks = static_cast<int32_t>(vblocks);
    tw.dbg = compact_tune().ticket_dbg;
  }
  workspace_layout<6> ws;
  ws.reserve<int32_t>(0, static_cast<size_t>(vblocks));
  ws.reserve<int32_t>(1, need_owner ? static_cast<size_t>(m.dt.num_pages) : 0);
  ws.reserve<unsigned long long>(2, ticket ? 1 : 0);
  ws.reserve<int32_t>(3, ticket ? static_cast<size_t>(vblocks) : 0);
  ws.reserve<int32_t>(4, ticket ? static_cast<size_t>(sel.count * (tw.nch + 1)) : 0);
  ws.reserve<uint32_t>(5, ticket ? static_cast<size_t>(lanes * tw.nch) : 0);
  if (d_temp == nullptr) {
    temp_bytes = ws.bytes();
    return cudaSuccess;
  }
  PREFIXKV_TRY(ws.map(d_temp, temp_bytes));
  if (ticket) {
    tw.ticket = ws.get<unsigned long long>(2);
    tw.block_kept = ws.get<int32_t>(3);
    tw.first_reader = ws.get<int32_t>(4);
    tw.loaded = ws.get<uint32_t>(5);
  }
  // grid shape: in place one block per lane (its rows in ascending tiles) or the ticket kernel's 2 x SMs; out of
  // place lanes are split in chunks of kept rows (by default short chunks of compact_default_chunk_rows rows, one
  // block each, below)
  if (!inplace && lanes > 0) {
    const int64_t want = 16 * static_cast<int64_t>(sms);
    const int64_t by_rows = std::max<int64_t>(1, m.src_tokens / 128);
    m.nchunk = std::max<int64_t>(1, std::min<int64_t>((want + lanes - 1) / lanes, by_rows));
  }
  if (run_check) {
    if (need_owner)
      PREFIXKV_TRY(check_runtime(cudaMemsetAsync(ws.get<int32_t>(1), 0xFF, ws.size_of(1), stream), "compact: memset"));
    m.owner = ws.get<int32_t>(1);
    compact_check_kernel<0><<<static_cast<unsigned>(vblocks), compact_threads, 0, stream>>>(m, ws.get<int32_t>(0), tw);
    PREFIXKV_TRY(check_launch(stream));
    if (validate_on_device) {
      m.vstatus = ws.get<int32_t>(0);
      m.vblocks = static_cast<int32_t>(vblocks);
    }
  }
  void (*kernel)(compact_meta, compact_ptrs) = inplace ? compact_move_kernel<true> : compact_move_kernel<false>;
  int per_sm = 2;
  if (variant > 0) compact_fast_pick(variant, inplace, kernel, per_sm);
  const int64_t resident = static_cast<int64_t>(per_sm) * sms;
  const bool pdl = run_check && compact_tune().pdl;
  if (ticket) {
    int64_t blocks = std::min<int64_t>(resident, lanes * tw.nch);
    if (compact_tune().max_blocks > 0) blocks = std::min<int64_t>(blocks, compact_tune().max_blocks);
    PREFIXKV_TRY(check_runtime(compact_launch_kernel(compact_ticket_kernel<0>, static_cast<unsigned>(blocks),
                                                     compact_threads, 0, stream, pdl, m, ptrs, tw),
                               "compact: launch"));
    return check_launch(stream);
  }
  if (compact_tune().resident > 0 && !inplace && lanes > 0) {
    const int64_t by_rows = std::max<int64_t>(1, m.src_tokens / 128);
    m.nchunk = std::max<int64_t>(1, std::min<int64_t>((compact_tune().resident * resident + lanes - 1) / lanes, by_rows));
  }
  const int64_t chunk_rows = compact_tune().chunk_rows >= 0 ? compact_tune().chunk_rows : compact_default_chunk_rows;
  const bool short_blocks = !inplace && lanes > 0 && chunk_rows > 0 && compact_tune().resident <= 0;
  if (short_blocks) {
    // many short-lived blocks, consecutive ones on consecutive row chunks of one lane (a compact window of memory
    // in flight, as in a plain copy kernel); bounded so that lanes x nchunk fits the grid
    const int64_t want = (std::max<int64_t>(m.dst_capacity, 1) + chunk_rows - 1) / chunk_rows;
    m.nchunk = std::max<int64_t>(1, std::min<int64_t>(want, std::max<int64_t>(1, (int64_t(1) << 30) / lanes)));
  }
  const int64_t work = std::max<int64_t>(1, lanes * m.nchunk);
  // (every grid walks its work items grid-stride, so any cap is correct)
  int64_t cap = compact_tune().resident > 0 ? resident
                                            : (short_blocks ? std::min<int64_t>(work, INT32_MAX) : 64 * static_cast<int64_t>(sms));
  if (compact_tune().max_blocks > 0) cap = compact_tune().max_blocks;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(work, cap));
  PREFIXKV_TRY(check_runtime(compact_launch_kernel(kernel, blocks, compact_threads, 0, stream, pdl, m, ptrs),
                             "compact: launch"));
  return check_launch(stream);
}

}  // namespace detail

//! Out-of-place gather of the kept rows, all layers and kinds (K, V, scales) in one launch.
//! `src`, `dst`: `kv_layers<T, S>` or `paged_kv_layers<T, S>` (host arrays of per-layer views, device data);
//! `sel`: device selection with `grid.count()` segments (grid.heads == 1: lists shared by the kv-heads;
//! == kv-heads: head-wise lists); `out`: optional device outputs. Source and destination must not overlap.
//! Row j of every destination (layer, sequence, head) receives source row sel.row(s)[j]; nothing else is written.
//! Index order is free (ascending not required). See compact.cuh's header for the validation contract.
//! \code
//! size_t bytes = 0;
//! PREFIXKV_TRY(prefixkv::gather_kept(nullptr, bytes, src, dst, sel, grid, out, stream));
//! // ... allocate bytes of d_temp (256-byte aligned) ...
//! PREFIXKV_TRY(prefixkv::gather_kept(d_temp, bytes, src, dst, sel, grid, out, stream));
//! \endcode
template <class Src, class Dst>
[[nodiscard]] cudaError_t gather_kept(void* d_temp, size_t& temp_bytes, const Src& src, const Dst& dst,
                                      const selection& sel, const segment_grid& grid,
                                      const compact_outputs& out = {}, cudaStream_t stream = 0,
                                      index_check check = index_check::device) {
  return detail::compact_launch(d_temp, temp_bytes, src, dst, false, sel, grid, out, stream, check);
}

//! In-place, order-preserving compaction of a strided (`kv_layers`) or paged (`paged_kv_layers`) cache; indices
//! strictly ascending. Paged: kept tokens packed into the first ceil(kept / page_size) pages of each sequence's
//! block table, `out.pages_in_use[b]` = pages still in use (the rest can be freed). Rows beyond the kept count
//! keep their old bytes.
//! \code
//! size_t bytes = 0;
//! PREFIXKV_TRY(prefixkv::compact_in_place(nullptr, bytes, cache, sel, grid, out, stream));
//! PREFIXKV_TRY(prefixkv::compact_in_place(d_temp, bytes, cache, sel, grid, out, stream));
//! \endcode
template <class Cache>
[[nodiscard]] cudaError_t compact_in_place(void* d_temp, size_t& temp_bytes, const Cache& cache,
                                           const selection& sel, const segment_grid& grid,
                                           const compact_outputs& out = {}, cudaStream_t stream = 0,
                                           index_check check = index_check::device) {
  return detail::compact_launch(d_temp, temp_bytes, cache, cache, true, sel, grid, out, stream, check);
}

PREFIXKV_NAMESPACE_END
