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

//! Device-side content checks. One status word per block (no memset needed): 0 or a `reason`.
//! (A template only so that the header can be included by several translation units.)
template <int Unused = 0>
PREFIXKV_KERNEL void __launch_bounds__(compact_threads) compact_check_kernel(compact_meta m, int32_t* block_status) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // let the move kernel (launched with programmatic stream serialization) get scheduled early; it still waits
  // for this whole grid to finish and flush (griddepcontrol.wait) before it reads a status word or writes
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  __shared__ int32_t err;
  if (threadIdx.x == 0) err = 0;
  __syncthreads();
  int32_t local = 0;
  const int64_t S = m.sel.count;
  auto mark = [&](int64_t b, int64_t blk) {
    const int64_t page = m.dt.table[b * m.dt.stride + blk];
    if (page < 0 || page >= m.dt.num_pages) {
      local = static_cast<int32_t>(reason::out_of_range);
      return;
    }
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
  __syncthreads();
  if (threadIdx.x == 0) block_status[blockIdx.x] = err;
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
      if (InPlace) __syncthreads();
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

//! Where a ticket's chunk is: chunk c (kept ranks [c R, c R + rows)) of lane `lane`, whose kept indices start at
//! sel.indices[ibase]; its stores wait for chunks w0 .. w1 of the lane (none when w0 > w1).
struct compact_chunk {
  int64_t ibase;
  int32_t lane, c, rows, w0, w1, unused;
};

//! Workspace of compact_ticket_kernel, laid out on the host and initialised on the device by the two set-up kernels
//! before every move (so stale workspace contents never matter).
struct compact_ticket_ws {
  int64_t* group_start = nullptr;   // (groups + 1) exclusive prefix of the lane groups' chunk counts: ticket space
  int32_t* lane_chunks = nullptr;   // (lanes) chunks per lane
  int32_t* first_reader = nullptr;  // (segments, nch + 1) P(c): the first kept rank whose index is >= c x rows
  uint32_t* loaded = nullptr;       // (lanes, nch) non-zero once every row of chunk c of the lane has been loaded
  compact_chunk* list = nullptr;    // (lanes x nch bound) the chunk of every ticket, in ticket order
  unsigned long long* ticket = nullptr;
  int64_t rows = 0, nch = 0;        // rows per chunk (<= compact_threads); bound on chunks per lane
  int64_t groups = 0;               // lane groups: `group` consecutive lanes each (the last one may be short)
  int32_t group = 1;                // lanes per group, <= 32 (one warp lists a group's chunks)
  int32_t dbg = 0;
};

//! Lane index -> (layer, sequence, kind, head) and its segment (the order of compact_work_of).
struct compact_lane {
  int64_t l, b, h, seg;
  int k;
};
__device__ __forceinline__ compact_lane compact_lane_of(const compact_meta& m, int64_t lane) {
  compact_lane x;
  const int64_t lpl = m.lanes_per_lb();
  const int64_t lb = lane / lpl, rr = lane - lb * lpl;
  x.l = lb / m.batch;
  x.b = lb - x.l * m.batch;
  int k = 0;
  while (k + 1 < m.kinds && rr >= m.lane_prefix[k + 1]) ++k;
  x.k = k;
  x.h = rr - m.lane_prefix[k];
  x.seg = m.grid.heads == 1 ? m.grid.id(x.l, x.b) : m.grid.id(x.l, x.b, x.h);
  return x;
}

//! Kept rows of a segment, clamped to [0, nch x rows] (contents the check kernel would reject stay in bounds).
__device__ __forceinline__ int64_t compact_ticket_kept(const compact_meta& m, const compact_ticket_ws& w, int64_t seg) {
  const int64_t kept = m.sel.offsets[seg + 1] - m.sel.offsets[seg];
  return kept < 0 ? 0 : min(kept, w.nch * w.rows);
}
__device__ __forceinline__ int64_t compact_ticket_group_chunks(const compact_meta& m, const compact_ticket_ws& w,
                                                               int64_t g, bool write) {
  int64_t n = 0;
  for (int64_t lane = g * w.group; lane < min(m.lanes(), (g + 1) * w.group); ++lane) {
    const int64_t c = (compact_ticket_kept(m, w, compact_lane_of(m, lane).seg) + w.rows - 1) / w.rows;
    if (write) w.lane_chunks[lane] = static_cast<int32_t>(c);
    n += c;
  }
  return n;
}

//! Set-up of the ticket kernel, part 1: the ticket space (block 0: chunks per lane, exclusive prefix of the groups'
//! chunk counts, the counter set to 0), zeroed `loaded` flags, and for every segment and chunk c the first kept
//! rank P(c) whose index is >= c x rows, so that the ranks reading destination rows [c R, c R + R) are
//! [P(c), P(c + 1)). Rank p covers the chunks c with idx[p - 1] < c R <= idx[p] (idx[-1] = -1, idx[n] = nch R),
//! one writer per entry. Launched with programmatic dependent launch: it waits for the previous grid (the check
//! kernel) and does nothing when a check failed, like the kernels after it.
template <int Unused = 0>
PREFIXKV_KERNEL void __launch_bounds__(compact_threads) compact_ticket_prep_kernel(compact_meta m, compact_ticket_ws w) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  const int tid = int(threadIdx.x);
  if (m.vstatus) {
    int32_t e = 0;
    for (int i = tid; i < m.vblocks; i += blockDim.x) e |= m.vstatus[i];
    if (__syncthreads_or(e != 0)) return;
  }
  const int64_t lanes = m.lanes(), R = w.rows, nch = w.nch, G = w.groups;
  if (blockIdx.x == 0) {
    __shared__ int64_t part[compact_threads];
    const int64_t per = (G + blockDim.x - 1) / blockDim.x;
    const int64_t a = min(G, tid * per), e = min(G, a + per);
    int64_t sum = 0;
    for (int64_t g = a; g < e; ++g) sum += compact_ticket_group_chunks(m, w, g, false);
    part[tid] = sum;
    __syncthreads();
    if (tid == 0) {
      int64_t run = 0;
      for (int i = 0; i < int(blockDim.x); ++i) {
        const int64_t x = part[i];
        part[i] = run;
        run += x;
      }
      w.group_start[G] = run;
      *w.ticket = 0ull;
    }
    __syncthreads();
    int64_t run = part[tid];
    for (int64_t g = a; g < e; ++g) {
      w.group_start[g] = run;
      run += compact_ticket_group_chunks(m, w, g, true);
    }
  }
  const int64_t nthreads = int64_t(gridDim.x) * blockDim.x, gtid = int64_t(blockIdx.x) * blockDim.x + tid;
  for (int64_t i = gtid; i < lanes * nch; i += nthreads) w.loaded[i] = 0u;
  constexpr int64_t piece = 1024;
  const int64_t pieces = (nch * R) / piece + 1;  // ranks 0 .. n, n <= nch R
  for (int64_t it = blockIdx.x; it < m.sel.count * pieces; it += gridDim.x) {
    const int64_t s = it / pieces, q = it - s * pieces;
    const int64_t off = m.sel.offsets[s];
    const int64_t n = compact_ticket_kept(m, w, s);
    int32_t* P = w.first_reader + s * (nch + 1);
    for (int64_t p = q * piece + tid; p <= min(n, q * piece + piece - 1); p += blockDim.x) {
      const int64_t lo = p > 0 ? min(nch * R, max(int64_t(-1), int64_t(m.sel.indices[off + p - 1]))) : -1;
      const int64_t hi = p < n ? min(nch * R, max(int64_t(-1), int64_t(m.sel.indices[off + p]))) : nch * R;
      for (int64_t c = (lo + R) / R; c <= min(nch, hi / R); ++c) P[c] = static_cast<int32_t>(p);
    }
  }
}

//! Set-up, part 2: the chunk of every ticket (compact_chunk), one warp per (group, chunk index c). Ticket order:
//! lane groups one after the other; inside a group chunk-major over its lanes (chunk 0 of every lane, then chunk 1
//! of every lane that has one, ...), so that the chunks in flight lie in few memory regions (about 2 x group) while
//! the readers of a chunk's destination rows hold tickets about group x c x (1 - kept fraction) lower. With n_i
//! chunks in lane i of the group, chunk c of lane j gets ticket group_start + sum_i min(n_i, c) + #{i < j : n_i > c}.
template <int Unused = 0>
PREFIXKV_KERNEL void __launch_bounds__(compact_threads) compact_ticket_list_kernel(compact_meta m, compact_ticket_ws w) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  if (m.vstatus) {
    int32_t e = 0;
    for (int i = int(threadIdx.x); i < m.vblocks; i += blockDim.x) e |= m.vstatus[i];
    if (__syncthreads_or(e != 0)) return;
  }
  const int ln = int(threadIdx.x & 31);
  const int64_t R = w.rows, nch = w.nch, warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t it = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; it < w.groups * nch; it += warps) {
    const int64_t g = it / nch, c = it - g * nch;
    const int64_t lane = g * w.group + ln;
    const bool in = ln < w.group && lane < m.lanes();
    const int64_t n = in ? w.lane_chunks[lane] : 0;
    const unsigned active = __ballot_sync(~0u, n > c);
    if (active == 0u) continue;  // (warp-uniform)
    int64_t before = min(n, c);  // tickets of the group's chunks < c
    for (int o = 16; o > 0; o >>= 1) before += __shfl_xor_sync(~0u, before, o);
    if (n > c) {
      const compact_lane x = compact_lane_of(m, lane);
      const int64_t kept = compact_ticket_kept(m, w, x.seg);
      const int32_t* P = w.first_reader + x.seg * (nch + 1);
      const int64_t p0 = P[c], p1 = P[c + 1];
      compact_chunk k;
      k.ibase = m.sel.offsets[x.seg] + c * R;
      k.lane = static_cast<int32_t>(lane);
      k.c = static_cast<int32_t>(c);
      k.rows = static_cast<int32_t>(min(R, kept - c * R));
      // chunks holding the readers [P(c), P(c + 1)) of the destination rows, before c (at most two; clamped so that
      // contents the check kernel would reject never wait on a chunk that does not come first)
      k.w0 = static_cast<int32_t>(min(c, max(int64_t(0), p0 / R)));
      k.w1 = static_cast<int32_t>(p1 > p0 ? min(c - 1, (p1 - 1) / R) : -1);
      k.unused = 0;
      w.list[w.group_start[g] + before + __popc(active & ((1u << ln) - 1u))] = k;
    }
  }
}

__device__ __forceinline__ uint32_t compact_relaxed_load(const uint32_t* f) {
  uint32_t v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(f) : "memory");
  return v;
}
__device__ __forceinline__ void compact_relaxed_store(uint32_t* f, uint32_t v) {
  asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(f), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t compact_acquire_load(const uint32_t* f) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(f) : "memory");
  return v;
}
__device__ __forceinline__ void compact_release_store(uint32_t* f, uint32_t v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(f), "r"(v) : "memory");
}

//! A chunk as the ticket kernel's threads use it (shared memory): compact_chunk plus its lane's coordinates.
struct compact_job {
  int64_t lane, b, h, ibase;  // lane < 0: no chunk
  int32_t c, rows, vpr, l, k, w0, w1;
};

//! Threads of the ticket kernel: 8 data warps (256 threads, one row each for the set-up) and one control warp.
inline constexpr int compact_ticket_threads = compact_threads + 32;

//! In place with balanced work (fast case: every kind moves packed rows in 16-byte words).
//!
//! Why: a plain copy by long-lived blocks with a fixed share each (the one-block-per-lane structure) reaches only
//! ~0.93-0.95 of memcpy, the same blocks taking tiles from a ticket counter 0.99-1.00 (bench_compact BM_copy
//! variants 5 and 18): the SMs do not get equal bandwidth, and a fixed share ends on the slowest one. Tickets
//! handed out over groups of 8-32 lanes keep 0.96-0.99 (variants 21-25), over all 512 lanes 0.96 (19).
//!
//! Work: lanes cut into chunks of R kept ranks (R x words per row <= 256 x U: one round of loads), in the ticket
//! order of compact_ticket_list_kernel. Every chunk passes through a software pipeline so that no dependent look-up
//! is on the path of the data: in the iteration that moves chunk J_i, the control warp loads the list entry of
//! J_{i+3} (its ticket was taken an iteration earlier), and every data thread looks up the pages of its row of
//! J_{i+1} and loads its kept index of J_{i+2}. Row offsets live in a triple buffer in shared memory, chunk
//! descriptors in a ring of four.
//!
//! Per chunk: (1) every data thread loads its words and waits for them (a shared-memory store consumes them, so
//! the loads are complete, not just issued); barrier. (2) The control warp publishes the chunk's `loaded` flag
//! (release store), then makes sure the flags of its predecessors are set (acquire loads, issued at the top of the
//! iteration; it spins only if one is not); barrier. (3) Every data thread stores its words.
//!
//! Race freedom (idx strictly ascending, so idx[p] >= p; chunk c writes rows [c R, c R + R) and reads rows
//! idx[c R ...] >= c R):
//! * Rows chunk c writes are read only by ranks p with idx[p] in [c R, c R + R): p in [P(c), P(c + 1)), and
//!   p <= idx[p] < c R + R, so in chunks <= c. Chunk c itself loads before its first barrier and stores after its
//!   second one. An earlier reader chunk c' (c' in [w0, w1]) completed its loads before its first barrier, its
//!   control warp then released its flag, and chunk c's control warp acquired that flag before chunk c's second
//!   barrier: the load happens before the store.
//! * Rows chunk c reads are written only by chunks c'' >= c (c'' R + R > idx[p] >= c R): the same argument.
//! * Different lanes never alias (as for the other kernels). Stores of different chunks are disjoint.
//! No deadlock, and no assumption on block scheduling: a chunk waits only for chunks with lower tickets; a block
//! publishes its current chunk before it waits; the lowest unpublished ticket is therefore the current chunk of its
//! block and all its predecessors are published (tickets held for later chunks are behind the block's current one).
template <int Unused = 0>
PREFIXKV_KERNEL void __maxnreg__(112)
    compact_ticket_kernel(const compact_meta m, const compact_ptrs p, const compact_ticket_ws w) {
  if (!compact_prologue(m)) return;
  constexpr int U = compact_unroll, S = compact_threads;
  __shared__ int64_t soff[3][S], doff[3][S];
  __shared__ compact_job job[4];
  __shared__ uint32_t sink[S / 32];
  const int tid = int(threadIdx.x);
  const bool data = tid < S;
  const int ln = tid & 31;
  const int64_t R = w.rows, nch = w.nch;
  const compact_table& st = m.st;
  const compact_table& dt = m.dt;
  // control lane 0: ticket whose list entry is loaded next (a), ticket in flight (b); the ticket space
  int64_t tk_a = 0, tk_b = 0, total = 0;
  uint32_t early = 1;                  // control lanes 0, 1: a predecessor flag read at the top of the iteration
  int32_t t_cur = 0, sp = 0, dp = 0;  // data threads: kept index and pages of this thread's row of J_{i+1}
  if (tid == S) {
    tk_a = static_cast<int64_t>(atomicAdd(w.ticket, 1ull));
    tk_b = static_cast<int64_t>(atomicAdd(w.ticket, 1ull));
    total = w.group_start[w.groups];
  }
  if (tid < 4) job[tid].lane = -1;
  __syncthreads();
  for (int64_t i = -3;; ++i) {
    const int s0 = int((i + 4) & 3), s1 = int((i + 5) & 3), s2 = int((i + 6) & 3), s3 = int((i + 7) & 3);
    const int o0 = int((i + 3) % 3), o1 = int((i + 4) % 3);
    const compact_job J = job[s0];
    if (i >= 0 && J.lane < 0) break;  // tickets of a block increase: no later chunk either
    uint4 buf[U];
    uint32_t acc = 0;
    int32_t rr = 0, cc = 0, dr = 0, dc = 0, items = 0;
    if (data) {
      // (top) loads of J_i; pages of J_{i+1}; kept indices of J_{i+2}
      if (J.lane >= 0) {
        const char* sb = p.src[J.l][J.k];
        items = J.rows * J.vpr;
        dr = S / J.vpr;
        dc = S - dr * J.vpr;
        rr = tid / J.vpr;
        cc = tid - rr * J.vpr;
        int32_t r = rr, q = cc;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (u * S + tid < items) buf[u] = compact_load<uint4>(sb + soff[o0][r] + q * 16);
          r += dr;
          q += dc;
          if (q >= J.vpr) {
            q -= J.vpr;
            ++r;
          }
        }
      }
      const compact_job& J1 = job[s1];
      if (J1.lane >= 0 && tid < J1.rows) {
        sp = st.paged ? st.table[J1.b * st.stride + st.block_of(t_cur)] : 0;
        dp = dt.paged ? dt.table[J1.b * dt.stride + dt.block_of(int64_t(J1.c) * R + tid)] : 0;
      }
      const compact_job& J2 = job[s2];
      int32_t t_nxt = 0;
      if (J2.lane >= 0 && tid < J2.rows) t_nxt = m.sel.indices[J2.ibase + tid];
      // the loads of J_i are complete (consumed), not just issued, before the barrier
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (u * S + tid < items) acc |= buf[u].x ^ buf[u].w;
      if (J.lane >= 0) sink[tid >> 5] = acc;
      // row offsets of J_{i+1}
      if (J1.lane >= 0 && tid < J1.rows) {
        const compact_geom& sg = m.src[J1.k];
        const compact_geom& dg = m.dst[J1.k];
        const int64_t j = int64_t(J1.c) * R + tid, t = t_cur;
        soff[o1][tid] = st.paged ? sp * sg.s_batch + (t - st.block_of(t) * st.page_size) * sg.s_token + J1.h * sg.s_head
                                 : J1.b * sg.s_batch + J1.h * sg.s_head + t * sg.s_token;
        doff[o1][tid] = dt.paged ? dp * dg.s_batch + (j - dt.block_of(j) * dt.page_size) * dg.s_token + J1.h * dg.s_head
                                 : J1.b * dg.s_batch + J1.h * dg.s_head + j * dg.s_token;
      }
      t_cur = t_nxt;
    }
    compact_chunk nk;
    if (!data) {
      // (top) the list entry of ticket tk_a (J_{i+3}); the predecessor flags of J_i
      if (ln == 0 && tk_a < total) nk = w.list[tk_a];
      if (J.lane >= 0 && ln < 2 && J.w0 + ln <= J.w1) {
        const uint32_t* f = w.loaded + J.lane * nch + J.w0 + ln;
        early = (w.dbg & 1) ? compact_relaxed_load(f) : compact_acquire_load(f);
      }
    }
    __syncthreads();  // (1) every data thread's loads of J_i are complete; offsets of J_{i+1} written
    if (!data) {
      if (ln == 0) {  // J_{i+3} into the slot of J_{i-1}, whose last readers are past this barrier
        compact_job& x = job[s3];
        if (tk_a < total) {
          const compact_lane y = compact_lane_of(m, nk.lane);
          x.lane = nk.lane;
          x.b = y.b;
          x.h = y.h;
          x.ibase = nk.ibase;
          x.c = nk.c;
          x.rows = nk.rows;
          x.vpr = static_cast<int32_t>(m.src[y.k].row_bytes / 16);
          x.l = static_cast<int32_t>(y.l);
          x.k = y.k;
          x.w0 = nk.w0;
          x.w1 = nk.w1;
        } else {
          x.lane = -1;
        }
      }
      if (J.lane >= 0 && !(w.dbg & 2)) {
        // release: the block's loads of J_i (complete, and ordered before this by the barrier) before the flag
        if (ln == 0) {
          uint32_t* f = w.loaded + J.lane * nch + J.c;
          if (w.dbg & 1) compact_relaxed_store(f, 1u);
          else compact_release_store(f, 1u);
        }
        if (ln < 2 && J.w0 + ln <= J.w1 && early == 0u) {  // acquire: the predecessor's loads before the stores
          const uint32_t* f = w.loaded + J.lane * nch + J.w0 + ln;
          unsigned ns = 32;
          while (((w.dbg & 1) ? compact_relaxed_load(f) : compact_acquire_load(f)) == 0u) {
            __nanosleep(ns);
            ns = ns < 1024 ? 2 * ns : ns;
          }
        }
      }
      early = 1;
    }
    __syncthreads();  // (2) the predecessors' loads of J_i's destination rows happened; job[s3] visible
    if (data && J.lane >= 0) {
      char* db = p.dst[J.l][J.k];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (u * S + tid < items) compact_store<uint4>(db + doff[o0][rr] + cc * 16, buf[u]);
        rr += dr;
        cc += dc;
        if (cc >= J.vpr) {
          cc -= J.vpr;
          ++rr;
        }
      }
    }
    if (tid == S) {  // the next ticket, an iteration before its list entry is loaded
      tk_a = tk_b;
      tk_b = static_cast<int64_t>(atomicAdd(w.ticket, 1ull));
    }
  }
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
  int inplace_ticket = 1;  // in place, fast case, default kernel pick: compact_ticket_kernel (0: one block per lane)
  int64_t ticket_rows = 0; // > 0: cap the ticket kernel's rows per chunk (tests: many chunks, many waits)
  int ticket_group = 0;    // > 0: lanes per ticket group (1..32); 0: by chunks per lane
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
  // check kernel: (segment, chunk of kept indices) work items, enough of them to fill the machine
  m.vchunk = std::max<int64_t>(1, std::min<int64_t>((4 * sms + sel.count - 1) / std::max<int64_t>(sel.count, 1),
                                                    (m.src_tokens + 1023) / 1024));
  const int64_t vblocks =
      validate_on_device ? std::max<int64_t>(1, std::min<int64_t>(sel.count * m.vchunk, 2 * sms)) : 0;
  const bool need_owner = validate_on_device && m.paged_dst && m.dt.num_pages > 0;
  const int64_t lanes = m.lanes();
  bool fast = m.kinds > 0;
  int64_t max_vpr = 1;
  for (int k = 0; k < m.kinds; ++k) {
    fast = fast && m.vec[k] == 16 && m.src[k].contiguous && m.dst[k].contiguous;
    max_vpr = std::max<int64_t>(max_vpr, m.src[k].row_bytes / 16);
  }
  // in place, fast case: persistent blocks taking chunks from a ticket counter (compact_ticket_kernel), unless a
  // tuning hook asks for another kernel
  const auto& tune = compact_tune();
  const bool ticket = inplace && fast && lanes > 0 && lanes <= INT32_MAX &&
                      max_vpr <= int64_t(compact_threads) * compact_unroll &&
                      tune.kernel < 0 && tune.inplace_ticket != 0 && tune.resident <= 0;
  compact_ticket_ws tw;
  const int64_t ticket_blocks = tune.max_blocks > 0 ? tune.max_blocks : 2 * static_cast<int64_t>(sms);
  if (ticket) {
    tw.rows = std::min<int64_t>(compact_threads, int64_t(compact_threads) * compact_unroll / max_vpr);
    if (tune.ticket_rows > 0) tw.rows = std::min<int64_t>(tw.rows, tune.ticket_rows);
    tw.nch = std::max<int64_t>(1, (std::min(m.src_tokens, m.dst_capacity) + tw.rows - 1) / tw.rows);
    // lanes per group: enough that a lane's readers are far behind in ticket order (group x chunks per lane >=
    // 16 x grid), few enough that the chunks in flight stay in few memory regions (bench_compact BM_copy 21-25)
    int g = 8;
    while (g < 32 && g * tw.nch < 16 * ticket_blocks) g *= 2;
    tw.group = tune.ticket_group > 0 ? std::min(32, tune.ticket_group) : g;
    tw.groups = (lanes + tw.group - 1) / tw.group;
    if (const char* d = std::getenv("PREFIXKV_DBG")) tw.dbg = std::atoi(d);
  }
  workspace_layout<8> ws;
  ws.reserve<int32_t>(0, static_cast<size_t>(vblocks));
  ws.reserve<int32_t>(1, need_owner ? static_cast<size_t>(m.dt.num_pages) : 0);
  if (ticket) {
    ws.reserve<int64_t>(2, static_cast<size_t>(tw.groups + 1));
    ws.reserve<int32_t>(3, static_cast<size_t>(sel.count * (tw.nch + 1)));
    ws.reserve<uint32_t>(4, static_cast<size_t>(lanes * tw.nch));
    ws.reserve<unsigned long long>(5, 1);
    ws.reserve<int32_t>(6, static_cast<size_t>(lanes));
    ws.reserve<compact_chunk>(7, static_cast<size_t>(lanes * tw.nch));
  }
  if (d_temp == nullptr) {
    temp_bytes = ws.bytes();
    return cudaSuccess;
  }
  PREFIXKV_TRY(ws.map(d_temp, temp_bytes));
  // grid shape: in place one block per lane (its rows in ascending tiles); out of place lanes are split in
  // chunks of kept rows (by default short chunks of compact_default_chunk_rows rows, one block each, below)
  if (!inplace && lanes > 0) {
    const int64_t want = 16 * static_cast<int64_t>(sms);
    const int64_t by_rows = std::max<int64_t>(1, m.src_tokens / 128);
    m.nchunk = std::max<int64_t>(1, std::min<int64_t>((want + lanes - 1) / lanes, by_rows));
  }
  if (validate_on_device) {
    if (need_owner)
      PREFIXKV_TRY(check_runtime(cudaMemsetAsync(ws.get<int32_t>(1), 0xFF, ws.size_of(1), stream), "compact: memset"));
    m.owner = ws.get<int32_t>(1);
    compact_check_kernel<0><<<static_cast<unsigned>(vblocks), compact_threads, 0, stream>>>(m, ws.get<int32_t>(0));
    PREFIXKV_TRY(check_launch(stream));
    m.vstatus = ws.get<int32_t>(0);
    m.vblocks = static_cast<int32_t>(vblocks);
  }
  if (ticket) {
    tw.group_start = ws.get<int64_t>(2);
    tw.first_reader = ws.get<int32_t>(3);
    tw.loaded = ws.get<uint32_t>(4);
    tw.ticket = ws.get<unsigned long long>(5);
    tw.lane_chunks = ws.get<int32_t>(6);
    tw.list = ws.get<compact_chunk>(7);
    const int64_t pieces = (tw.nch * tw.rows) / 1024 + 1;
    const int64_t prep_blocks = std::max<int64_t>(
        1, std::min<int64_t>(4 * static_cast<int64_t>(sms),
                             std::max<int64_t>(sel.count * pieces, (lanes * tw.nch + 4095) / 4096)));
    PREFIXKV_TRY(check_runtime(compact_launch_kernel(compact_ticket_prep_kernel<0>, static_cast<unsigned>(prep_blocks),
                                                     compact_threads, 0, stream, tune.pdl, m, tw),
                               "compact: launch"));
    PREFIXKV_TRY(check_launch(stream));
    const int64_t list_blocks =
        std::max<int64_t>(1, std::min<int64_t>(16 * static_cast<int64_t>(sms), (tw.groups * tw.nch + 7) / 8));
    PREFIXKV_TRY(check_runtime(compact_launch_kernel(compact_ticket_list_kernel<0>, static_cast<unsigned>(list_blocks),
                                                     compact_threads, 0, stream, tune.pdl, m, tw),
                               "compact: launch"));
    PREFIXKV_TRY(check_launch(stream));
    PREFIXKV_TRY(check_runtime(compact_launch_kernel(compact_ticket_kernel<0>, static_cast<unsigned>(ticket_blocks),
                                                     compact_ticket_threads, 0, stream, tune.pdl, m, ptrs, tw),
                               "compact: launch"));
    return check_launch(stream);
  }
  const int variant = !fast ? 0 : (tune.kernel >= 0 ? tune.kernel : compact_default_variant);
  void (*kernel)(compact_meta, compact_ptrs) = inplace ? compact_move_kernel<true> : compact_move_kernel<false>;
  int per_sm = 2;
  if (variant > 0) compact_fast_pick(variant, inplace, kernel, per_sm);
  const int64_t resident = static_cast<int64_t>(per_sm) * sms;
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
  const bool pdl = validate_on_device && compact_tune().pdl;
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
