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

//! Compile-time launch policy of the compaction kernels. `gather_kept` and `compact_in_place` use
//! `compact_policy<>`; tests instantiate others through `detail::compact_dispatch<Policy>` to cover every code
//! path on the same inputs (the results are identical).
//! * `Pdl`: with `index_check::device`, the move kernel is launched with programmatic dependent launch after the
//!   check kernel (sm_90); false: a plain stream-ordered launch.
//! * `Fast`: jobs whose every kind moves packed rows of 16-byte words take `compact_fast_kernel`; false: the
//!   general kernel for every job.
//! * `MaxBlocks`: > 0 caps the move kernel's grid (every block then walks several lanes or chunks).
//! * `ChunkRows`: out of place, every lane is cut into chunks of about this many destination rows, one block each
//!   (256: 0.955-0.973 of memcpy at 32K/128K tokens on an H100, docs/performance.md).
template <bool Pdl = true, bool Fast = true, int64_t MaxBlocks = 0, int64_t ChunkRows = 256>
struct compact_policy {
  static constexpr bool pdl = Pdl;
  static constexpr bool fast = Fast;
  static constexpr int64_t max_blocks = MaxBlocks;
  static constexpr int64_t chunk_rows = ChunkRows;
};

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
PREFIXKV_KERNEL void __launch_bounds__(compact_threads) compact_check_kernel(compact_meta m, compact_tables tab,
                                                                             int32_t* block_status) {
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
  auto mark = [&](int64_t l, int64_t b, int64_t blk) {
    const int64_t page = tab.dst[l][b * m.dt.stride + blk];
    if (page < 0 || page >= m.dt.num_pages) {
      local = static_cast<int32_t>(reason::out_of_range);
      return;
    }
    const int32_t key = static_cast<int32_t>(m.owner_key(l, b, blk));
    int32_t* word = m.owner + m.owner_slot(l, page);
    // with one shared table all layers of a sequence mark the same (block, page) pairs: a plain read first keeps
    // the atomics (which serialise per address) down to about one per page
    if (*static_cast<volatile const int32_t*>(word) == key) return;
    const int32_t old = atomicCAS(word, -1, key);
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
    const int64_t b = m.grid.batch_of(s), l = m.grid.layer_of(s);
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
        const int64_t page = tab.src[l][b * m.st.stride + blk];
        if (page < 0 || page >= m.st.num_pages) {
          local = static_cast<int32_t>(reason::out_of_range);
          continue;
        }
        // in place the indices ascend (or not_ascending is reported): marking the first kept token of each
        // source block marks every touched block
        if (m.inplace && (prev < 0 || m.st.block_of(prev) != blk)) mark(l, b, blk);
      }
      if (m.paged_dst && p % m.dt.page_size == 0) mark(l, b, m.dt.block_of(p));
    }
  }
  if (local) compact_atomic_error(&err, local);
  __syncthreads();
  if (threadIdx.x == 0) block_status[blockIdx.x] = err;
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
//! Contig: both sides' rows are packed (no per-element stride math; the fast kernel's case). Accesses in flight
//! per thread: compact_unroll for 16-byte words, fewer for the narrow widths (odd rows, not bandwidth critical).
template <int W, bool InPlace, bool Contig = false>
__device__ __forceinline__ void compact_move_rows(const compact_meta& m, const compact_geom& sg,
                                                  const compact_geom& dg, const char* sbase, char* dbase,
                                                  const int32_t* stab, const int32_t* dtab, const int32_t* idx,
                                                  int64_t b, int64_t h, int64_t r0, int64_t r1,
                                                  compact_stage_smem& sm) {
  using word = typename compact_word<W>::type;
  constexpr int U = W == 16 ? compact_unroll : (W == 8 ? 4 : 2);
  const int S = blockDim.x;
  const int tid = threadIdx.x;
  const int32_t vpr = static_cast<int32_t>(sg.row_bytes / W);
  const int32_t dr = S / vpr, dc = S - dr * vpr;
  const compact_table st = m.st.with_table(stab);  // this layer's block tables
  const compact_table dt = m.dt.with_table(dtab);
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
          buf[u] = *reinterpret_cast<const word*>(sbase + sm.src[cur][rr] +
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
          *reinterpret_cast<word*>(dbase + sm.dst[cur][rr] +
                                   (Contig ? cc * W : dg.chunk(static_cast<int64_t>(cc) * W))) = buf[u];
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
                                                 const int32_t* stab, const int32_t* dtab, const int32_t* idx,
                                                 int64_t b, int64_t h, int64_t r0, int64_t r1,
                                                 compact_stage_smem& sm) {
  const compact_geom& sg = m.src[k];
  const compact_geom& dg = m.dst[k];
  switch (m.vec[k]) {
    case 16: compact_move_rows<16, InPlace>(m, sg, dg, s, d, stab, dtab, idx, b, h, r0, r1, sm); break;
    case 8: compact_move_rows<8, InPlace>(m, sg, dg, s, d, stab, dtab, idx, b, h, r0, r1, sm); break;
    case 4: compact_move_rows<4, InPlace>(m, sg, dg, s, d, stab, dtab, idx, b, h, r0, r1, sm); break;
    case 2: compact_move_rows<2, InPlace>(m, sg, dg, s, d, stab, dtab, idx, b, h, r0, r1, sm); break;
    default: compact_move_rows<1, InPlace>(m, sg, dg, s, d, stab, dtab, idx, b, h, r0, r1, sm); break;
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
//! docs/performance.md.)
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
    compact_dispatch<InPlace>(m, x.k, p.src[x.l][x.k], p.dst[x.l][x.k], p.tab.src[x.l], p.tab.dst[x.l],
                              m.sel.indices + x.off, x.b, x.h, x.r0, x.r1, sm);
  }
}

//! Fast move kernel: every kind moves 16-byte words between packed rows (the common case: fp16/bf16/fp8 rows of
//! >= 16 bytes, any token/head/page strides). Same staging and in-place proof as `compact_move_rows`, without the
//! width switch and per-element stride math. compact_unroll accesses in flight per thread, 2 blocks per SM, plain
//! loads and stores.
template <bool InPlace>
PREFIXKV_KERNEL void __launch_bounds__(compact_threads, 2) compact_fast_kernel(const compact_meta m,
                                                                               const compact_ptrs p) {
  if (!compact_prologue(m)) return;
  __shared__ compact_stage_smem sm;
  const int64_t total = m.lanes() * m.nchunk;
  for (int64_t w = blockIdx.x; w < total; w += gridDim.x) {
    const compact_work x = compact_work_of(m, w);
    if (x.r0 >= x.r1) continue;
    compact_move_rows<16, InPlace, true>(m, m.src[x.k], m.dst[x.k], p.src[x.l][x.k], p.dst[x.l][x.k],
                                         p.tab.src[x.l], p.tab.dst[x.l], m.sel.indices + x.off, x.b, x.h, x.r0,
                                         x.r1, sm);
  }
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

//! The launch of every policy: host checks (compact_plan), size query, check kernel, move kernel.
template <class Policy, class SrcCache, class DstCache>
cudaError_t compact_dispatch(void* d_temp, size_t& temp_bytes, const SrcCache& src, const DstCache& dst,
                             bool inplace, const selection& sel, const segment_grid& grid,
                             const compact_outputs& out, index_check check, cudaStream_t stream) {
  static_assert(Policy::chunk_rows > 0 && Policy::max_blocks >= 0, "compact_policy: chunk_rows > 0, max_blocks >= 0");
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
  workspace_layout<2> ws;
  ws.reserve<int32_t>(0, static_cast<size_t>(vblocks));
  ws.reserve<int32_t>(1, need_owner ? static_cast<size_t>(m.owner_words()) : 0);
  if (d_temp == nullptr) {
    temp_bytes = ws.bytes();
    return cudaSuccess;
  }
  PREFIXKV_TRY(ws.map(d_temp, temp_bytes));
  if (validate_on_device) {
    if (need_owner)
      PREFIXKV_TRY(check_runtime(cudaMemsetAsync(ws.get<int32_t>(1), 0xFF, ws.size_of(1), stream), "compact: memset"));
    m.owner = ws.get<int32_t>(1);
    compact_check_kernel<0><<<static_cast<unsigned>(vblocks), compact_threads, 0, stream>>>(m, ptrs.tab,
                                                                                           ws.get<int32_t>(0));
    PREFIXKV_TRY(check_launch(stream));
    m.vstatus = ws.get<int32_t>(0);
    m.vblocks = static_cast<int32_t>(vblocks);
  }
  bool fast = Policy::fast && m.kinds > 0;
  for (int k = 0; k < m.kinds; ++k)
    fast = fast && m.vec[k] == 16 && m.src[k].contiguous && m.dst[k].contiguous;
  void (*kernel)(compact_meta, compact_ptrs) =
      fast ? (inplace ? compact_fast_kernel<true> : compact_fast_kernel<false>)
           : (inplace ? compact_move_kernel<true> : compact_move_kernel<false>);
  // Grid shape. In place: one block per lane (its rows in ascending stages, nchunk == 1), at most 64 x SMs blocks.
  // Out of place: every lane cut into chunks of about Policy::chunk_rows destination rows, one short-lived block
  // each, consecutive blocks on consecutive chunks of one lane (a compact window of memory in flight, as in a plain
  // copy kernel); bounded so that lanes x nchunk fits the grid.
  const int64_t lanes = m.lanes();
  const bool short_blocks = !inplace && lanes > 0;
  if (short_blocks) {
    const int64_t want = (std::max<int64_t>(m.dst_capacity, 1) + Policy::chunk_rows - 1) / Policy::chunk_rows;
    m.nchunk = std::max<int64_t>(1, std::min<int64_t>(want, std::max<int64_t>(1, (int64_t(1) << 30) / lanes)));
  }
  const int64_t work = std::max<int64_t>(1, lanes * m.nchunk);
  const bool pdl = validate_on_device && Policy::pdl;
  // (every grid walks its work items grid-stride, so any cap is correct)
  int64_t cap = short_blocks ? std::min<int64_t>(work, INT32_MAX) : 64 * static_cast<int64_t>(sms);
  if (Policy::max_blocks > 0) cap = Policy::max_blocks;
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
//! const auto check = prefixkv::index_check::device;  // or trusted: the indices are known to be valid
//! PREFIXKV_TRY(prefixkv::gather_kept(nullptr, bytes, src, dst, sel, grid, out, check, stream));
//! // ... allocate bytes of d_temp (256-byte aligned) ...
//! PREFIXKV_TRY(prefixkv::gather_kept(d_temp, bytes, src, dst, sel, grid, out, check, stream));
//! \endcode
template <class Src, class Dst>
[[nodiscard]] cudaError_t gather_kept(void* d_temp, size_t& temp_bytes, const Src& src, const Dst& dst,
                                      const selection& sel, const segment_grid& grid,
                                      const compact_outputs& out = {}, index_check check = index_check::device,
                                      cudaStream_t stream = 0) {
  return detail::compact_dispatch<compact_policy<>>(d_temp, temp_bytes, src, dst, false, sel, grid, out, check,
                                                    stream);
}

//! In-place, order-preserving compaction of a strided (`kv_layers`) or paged (`paged_kv_layers`) cache; indices
//! strictly ascending. Paged: kept tokens packed into the first ceil(kept / page_size) pages of each sequence's
//! block table, `out.pages_in_use[b]` = pages still in use (the rest can be freed). Rows beyond the kept count
//! keep their old bytes.
//! \code
//! size_t bytes = 0;
//! PREFIXKV_TRY(prefixkv::compact_in_place(nullptr, bytes, cache, sel, grid, out, check, stream));
//! PREFIXKV_TRY(prefixkv::compact_in_place(d_temp, bytes, cache, sel, grid, out, check, stream));
//! \endcode
template <class Cache>
[[nodiscard]] cudaError_t compact_in_place(void* d_temp, size_t& temp_bytes, const Cache& cache,
                                           const selection& sel, const segment_grid& grid,
                                           const compact_outputs& out = {}, index_check check = index_check::device,
                                           cudaStream_t stream = 0) {
  return detail::compact_dispatch<compact_policy<>>(d_temp, temp_bytes, cache, cache, true, sel, grid, out, check,
                                                    stream);
}

PREFIXKV_NAMESPACE_END
