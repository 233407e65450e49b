//! \file prefixkv/score/score.cuh
//! CUDA scorers: the device versions of the host twins in score.hpp (same semantics, same arguments in the same
//! order, plus the CUB-style workspace first and an optional device status word and the stream last).
//!
//! * `accumulated_attention` / `accumulated_attention_layers` — the paper's scorer from materialised
//!   probabilities, read once at memory bandwidth (detail/attention.cuh), bit-identical to the twin: both add the
//!   queries in the chunked order defined in score.hpp.
//! * `window_attention` / `window_attention_layers` — observation-window attention from Q and K
//!   (FlashAttention-compatible), K strided or paged. The probability pass runs on tensor cores: wgmma
//!   (detail/window_wgmma.cuh, opt-in `PREFIXKV_SM90A` builds on compute capability 9.0) or mma.sync m16n8k16 +
//!   ldmatrix (detail/window_mma.cuh) for f16/bf16, head_dim 64 or 128 and 16-byte-aligned K rows; otherwise (and
//!   for the row-statistics pass of the in-kernel softmax) WMMA for f16/bf16 with head_dim % 16 == 0, exact fp32
//!   CUDA-core dot products for the rest. Softmax in two passes (row statistics, then probabilities) or one pass
//!   with a caller LSE. Probabilities live only in registers/shared memory; K is read per kv head (never expanded
//!   by the group).
//! * `key_norm` / `key_norm_layers` — minus (or reciprocal of) the key L2 norms, K strided or paged (16-byte
//!   loads when the rows allow them; detail/key_norm.cuh).
//!
//! The `*_layers` forms score every layer of the grid in one call with a number of kernel launches that does not
//! depend on the layer count (host arrays of per-layer views, at most `score_max_layers`; the pointers travel as
//! kernel parameters). Results are bitwise reproducible: the same input on the same device gives the same bits
//! (no floating-point atomics; partial results are combined in a fixed order).
//!
//! Error reporting without a sync: pass `unsigned* d_status` (device, zeroed by you once); kernels OR
//! `status_bits` into it (NaN/Inf inputs, device-side row lengths out of range, page ids outside the pool). Read
//! it whenever you sync anyway, or call `read_status` — the validating entry point, which syncs the stream and
//! turns the bits into an error code with a reason.
//!
//! \code
//! size_t bytes = 0;
//! auto q = prefixkv::make_kv_view_bhsd(d_q_window, B, 32, 64, 128);     // const bf16*, last 64 queries
//! auto k = prefixkv::make_kv_view_bhsd(d_k, B, 8, capacity, 128);       // const bf16*
//! prefixkv::segment_grid grid{layers, B, 1};
//! auto rows = prefixkv::make_offset_segments(grid.count(), d_row_offsets);  // device cu_seqlens per (layer, b)
//! PREFIXKV_TRY(prefixkv::window_attention(nullptr, bytes, q, k, prefixkv::lse_view{}, {}, grid, layer, rows,
//!                                         d_scores, d_status, stream));
//! // allocate bytes at d_temp (256-byte aligned), then
//! PREFIXKV_TRY(prefixkv::window_attention(d_temp, bytes, q, k, prefixkv::lse_view{}, {}, grid, layer, rows,
//!                                         d_scores, d_status, stream));
//! \endcode
#pragma once

#include "score.hpp"

#include "../core/launch.cuh"
#include "../core/workspace.hpp"
#include "../detail/memory.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

PREFIXKV_NAMESPACE_BEGIN

//! The validating entry point: waits for `stream`, reads the status word and returns `cudaSuccess` or
//! `cudaErrorInvalidValue` with the reason of the first set bit (nonfinite_input, out_of_range for row lengths and
//! page ids, negative_input, capacity_exceeded). This SYNCHRONISES; keep it out of hot paths and graphs.
//! `h_status` receives the bits.
[[nodiscard]] inline cudaError_t read_status(const unsigned* d_status, unsigned& h_status, cudaStream_t stream = 0) {
  h_status = 0;
  if (d_status == nullptr) return detail::fail(reason::null_pointer, "read_status: d_status is null");
  PREFIXKV_TRY(detail::check_runtime(cudaMemcpyAsync(&h_status, d_status, sizeof(unsigned), cudaMemcpyDeviceToHost, stream),
                                     "read_status: copy failed"));
  PREFIXKV_TRY(detail::check_runtime(cudaStreamSynchronize(stream), "read_status: stream failed"));
  if (h_status & status_nonfinite) return detail::fail(reason::nonfinite_input, "scorer: NaN or infinity in an input");
  if (h_status & status_bad_length)
    return detail::fail(reason::out_of_range, "scorer: a row length is outside [window, token capacity]");
  if (h_status & status_bad_page)
    return detail::fail(reason::out_of_range, "scorer: a block-table page id lies outside the page pool");
  if (h_status & status_negative) return detail::fail(reason::negative_input, "curve builder: a score is negative");
  if (h_status & status_capacity)
    return detail::fail(reason::capacity_exceeded, "curve builder: candidates exceed the capacity given");
  return cudaSuccess;
}

namespace detail {

PREFIXKV_DEVICE void flag(unsigned* status, unsigned bits) {
  if (status != nullptr && bits != 0u) atomicOr(status, bits);
}

//! Non-finite test on raw 32-bit words holding packed elements of type T.
template <class T>
PREFIXKV_DEVICE bool word_nonfinite(uint32_t w);
template <>
PREFIXKV_DEVICE bool word_nonfinite<float>(uint32_t w) {
  return (w & 0x7F800000u) == 0x7F800000u;
}
template <>
PREFIXKV_DEVICE bool word_nonfinite<f16>(uint32_t w) {
  return (w & 0x7C00u) == 0x7C00u || (w & 0x7C000000u) == 0x7C000000u;
}
template <>
PREFIXKV_DEVICE bool word_nonfinite<bf16>(uint32_t w) {
  return (w & 0x7F80u) == 0x7F80u || (w & 0x7F800000u) == 0x7F800000u;
}
PREFIXKV_DEVICE bool elem_nonfinite(float x) { return !isfinite(x); }
PREFIXKV_DEVICE bool elem_nonfinite(f16 x) { return (x.bits & 0x7C00u) == 0x7C00u; }
PREFIXKV_DEVICE bool elem_nonfinite(bf16 x) { return (x.bits & 0x7F80u) == 0x7F80u; }

template <class T>
struct wmma_elem;
template <>
struct wmma_elem<f16> {
  using type = __half;
};
template <>
struct wmma_elem<bf16> {
  using type = __nv_bfloat16;
};

// ------------------------------------------------------------------------------------------------------------
// Window scorer
// ------------------------------------------------------------------------------------------------------------
inline constexpr int win_tile = 64;     // tokens per tile
inline constexpr int win_warps = 8;     // warps per CTA
inline constexpr int win_sb_ld = 20;    // leading dim of a warp's 16x16 float scratch

//! Paged K addressing shared by the scorers: token t of sequence b lives in page table[b * table_stride +
//! t / page_size] at slot t % page_size (`shift` = log2(page_size) when a power of two). `table == nullptr`:
//! strided K.
struct k_pages {
  const int32_t* table = nullptr;
  int64_t table_stride = 0, page_size = 1, num_pages = 0, stride_page = 0;
  int32_t shift = -1;
};

//! The K geometry of a kernel as a `kv_view` (extents, strides; paged: stride_token = slot stride, tokens = the
//! token capacity, stride_batch unused) plus the page table (empty for strided K).
template <class T>
inline void k_geometry(const kv_view<const T>& k, kv_view<const T>& g, k_pages& pg) {
  g = k;
  pg = k_pages{};
}
template <class T>
inline void k_geometry(const paged_kv_view<const T>& k, kv_view<const T>& g, k_pages& pg) {
  g = make_kv_view<const T>(k.pages, k.batch, k.heads, k_capacity(k), k.dim, 0, k.stride_head, k.stride_slot,
                            k.stride_dim);
  pg.table = k.block_table;
  pg.table_stride = k.block_table_stride;
  pg.page_size = k.page_size;
  pg.num_pages = k.num_pages;
  pg.stride_page = k.stride_page;
  pg.shift = -1;
  for (int32_t s = 0; s < 62; ++s)
    if ((int64_t(1) << s) == k.page_size) pg.shift = s;
}
template <class T>
inline const T* k_data(const kv_view<const T>& k) {
  return k.data;
}
template <class T>
inline const T* k_data(const paged_kv_view<const T>& k) {
  return k.pages;
}

//! Start of row t of kv head kh of sequence b in the layer whose K data starts at `kb`; nullptr when K is paged
//! and the page id is outside [0, num_pages) (nothing is read then).
template <bool Paged, class T>
PREFIXKV_DEVICE const T* k_row_of(const kv_view<const T>& k, const k_pages& pg, const T* kb, int64_t b, int64_t kh,
                                  int64_t t) {
  if constexpr (!Paged) {
    return kb + b * k.stride_batch + kh * k.stride_head + t * k.stride_token;
  } else {
    const int64_t blk = pg.shift >= 0 ? (t >> pg.shift) : t / pg.page_size;
    const int64_t page = pg.table[b * pg.table_stride + blk];
    if (page < 0 || page >= pg.num_pages) return nullptr;
    return kb + page * pg.stride_page + (t - blk * pg.page_size) * k.stride_token + kh * k.stride_head;
  }
}

template <class T>
struct window_params {
  kv_view<const T> q;  // (batch, q_head, w, dim): extents and strides; layer z's data at q_of[z]
  kv_view<const T> k;  // (batch, kv_head, capacity, dim): extents and strides (see k_geometry); data at k_of[z]
  k_pages pg;          // paged K (table == nullptr: strided)
  lse_view lse;        // accumulate pass: LSE strides (natural log if lse_natural, else log2); data at lse_of[z]
  float2* stats;       // (layers, batch, q_head, w, splits) partial (max, sum) in log2 domain — stats pass
  float* kvrows;       // (layers, chunks, batch, kv_head, capacity) group-reduced rows, one per head chunk
  segments rows;
  segment_grid grid;
  int64_t layer;       // grid layer of blockIdx.z == 0
  unsigned* status;
  float scale_log2;    // scale * log2(e)
  float inv_G;         // 1 / G: the mean over a group's query heads multiplies (one division per call, on the host)
  int G, HC, chunks, WP, R, ldq, ldk, splits, tiles_per_split;
  int vec_q, vec_k;    // 16-byte vector loads allowed
  int lse_natural;
  head_reduce group;
  int stages;          // mma kernel: K stages per warp (1 or 2)
  int64_t split_keys;  // mma kernel: keys per CTA (multiple of 32)
  const T* q_of[score_max_layers];
  const T* k_of[score_max_layers];
  const float* lse_of[score_max_layers];
};
static_assert(sizeof(window_params<float>) <= 4000, "window scorer parameters must fit 4 KB of kernel parameters");

//! Length of the row that kv head kh of sequence b writes in layer z of the call.
template <class T>
PREFIXKV_DEVICE int64_t window_row_length(const window_params<T>& p, int64_t z, int64_t b, int64_t kh) {
  return p.rows.length(score_row(p.grid, p.layer + z, b, kh));
}
//! Head chunk `chunk`'s group-reduced row of (layer z, sequence b, kv head kh) in the workspace.
template <class T>
PREFIXKV_DEVICE float* window_kvrow(const window_params<T>& p, int64_t z, int chunk, int64_t b, int64_t kh) {
  return p.kvrows + (((z * p.chunks + chunk) * p.q.batch + b) * p.k.heads + kh) * p.k.tokens;
}
//! LSE of (b, q head h, window query i) in layer z.
template <class T>
PREFIXKV_DEVICE float window_lse_at(const window_params<T>& p, int64_t z, int64_t b, int64_t h, int64_t i) {
  return p.lse_of[z][b * p.lse.stride_batch + h * p.lse.stride_head + i * p.lse.stride_query];
}

template <class T>
struct window_smem {
  int ldq, ldk, R, HC;
  size_t q_off, k_off, sb_off, col_off, rowm_off, rowl_off, lse_off, total;
  __host__ __device__ window_smem(int R_, int HC_, int ldq_, int ldk_) : ldq(ldq_), ldk(ldk_), R(R_), HC(HC_) {
    auto up = [](size_t x) { return (x + 127) / 128 * 128; };
    q_off = 0;
    k_off = up(q_off + size_t(R) * ldq * sizeof(T));
    sb_off = up(k_off + size_t(win_tile) * ldk * sizeof(T));
    col_off = up(sb_off + size_t(win_warps) * 16 * win_sb_ld * sizeof(float));
    rowm_off = up(col_off + size_t(win_warps) * HC * win_tile * sizeof(float));
    rowl_off = up(rowm_off + size_t(R) * sizeof(float));
    lse_off = up(rowl_off + size_t(R) * sizeof(float));
    total = up(lse_off + size_t(R) * sizeof(float));
  }
};

//! Copy `nrows` rows of `dim` elements (row r at src_row(r)) into shared memory rows of `ld` elements; rows
//! beyond `valid` (or with a null source) are zero-filled. Returns true when a non-finite element was read.
template <class T, class RowPtr>
PREFIXKV_DEVICE bool load_rows(T* dst, int ld, int nrows, int dim, int64_t stride_dim, bool vec, RowPtr src_row) {
  bool bad = false;
  if (vec) {
    constexpr int per = 16 / sizeof(T);
    const int chunks = dim / per;
    for (int idx = threadIdx.x; idx < nrows * chunks; idx += blockDim.x) {
      const int r = idx / chunks, c = idx - r * chunks;
      const T* s = src_row(r);
      uint4 v = make_uint4(0, 0, 0, 0);
      if (s != nullptr) {
        v = *reinterpret_cast<const uint4*>(s + c * per);
        bad |= word_nonfinite<T>(v.x) | word_nonfinite<T>(v.y) | word_nonfinite<T>(v.z) | word_nonfinite<T>(v.w);
      }
      if constexpr (sizeof(T) == 2) {
        *reinterpret_cast<uint4*>(dst + size_t(r) * ld + c * per) = v;
      } else {
        float* d = reinterpret_cast<float*>(dst) + size_t(r) * ld + c * 4;
        d[0] = __uint_as_float(v.x);
        d[1] = __uint_as_float(v.y);
        d[2] = __uint_as_float(v.z);
        d[3] = __uint_as_float(v.w);
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < nrows * dim; idx += blockDim.x) {
      const int r = idx / dim, d = idx - r * dim;
      const T* s = src_row(r);
      T v{};
      if (s != nullptr) {
        v = s[d * stride_dim];
        bad |= elem_nonfinite(v);
      }
      dst[size_t(r) * ld + d] = v;
    }
  }
  return bad;
}

//! Merge (m2, l2) into (m, l): running max and sum of exp2(x - max).
PREFIXKV_DEVICE void merge_ml(float& m, float& l, float m2, float l2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;
  l = (m == -INFINITY ? 0.0f : l * exp2f(m - mn)) + (m2 == -INFINITY ? 0.0f : l2 * exp2f(m2 - mn));
  m = mn;
}

//! One CTA: (layer blockIdx.z, batch b, kv head kh, chunk of HC q heads) x a contiguous range of 64-token tiles.
template <class T, bool Stats, bool Mma, bool Paged>
PREFIXKV_KERNEL void __launch_bounds__(win_warps * 32, 2) window_kernel(window_params<T> p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const window_smem<T> L(p.R, p.HC, p.ldq, p.ldk);
  T* Qs = reinterpret_cast<T*>(smem_raw + L.q_off);
  T* Ks = reinterpret_cast<T*>(smem_raw + L.k_off);
  float* Sb = reinterpret_cast<float*>(smem_raw + L.sb_off);
  float* colpart = reinterpret_cast<float*>(smem_raw + L.col_off);
  float* rowm = reinterpret_cast<float*>(smem_raw + L.rowm_off);
  float* rowl = reinterpret_cast<float*>(smem_raw + L.rowl_off);
  float* lse2 = reinterpret_cast<float*>(smem_raw + L.lse_off);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t Hk = p.k.heads, Hq = p.q.heads;
  const int64_t by = blockIdx.y;
  const int chunk = int(by % p.chunks);
  const int64_t kh = (by / p.chunks) % Hk, b = by / (p.chunks * Hk), z = blockIdx.z;
  const int w = int(p.q.tokens), dim = int(p.q.dim);
  const T* const qb = p.q_of[z];
  const T* const kb = p.k_of[z];
  const int64_t n = window_row_length(p, z, b, kh);
  const bool bad_len = n < w || n > p.k.tokens;
  const int64_t ntiles = bad_len ? 0 : (n + win_tile - 1) / win_tile;
  const int64_t tile_begin = int64_t(blockIdx.x) * p.tiles_per_split;
  const int64_t tile_end = min(ntiles, tile_begin + p.tiles_per_split);
  if (bad_len && blockIdx.x == 0 && chunk == 0 && threadIdx.x == 0) flag(p.status, status_bad_length);
  const int h_first = chunk * p.HC;                       // first group member of this chunk
  const int hc = min(p.HC, p.G - h_first);                 // heads in this chunk
  const int64_t h0 = kh * p.G + h_first;                   // global q head of local head 0
  bool bad = false, bad_page = false;

  // Row state and LSE.
  for (int r = threadIdx.x; r < p.R; r += blockDim.x) {
    const int hl = r / p.WP, i = r - hl * p.WP;
    if (Stats) {
      rowm[r] = -INFINITY;
      rowl[r] = 0.0f;
    } else {
      float v = 0.0f;
      if (hl < hc && i < w && !bad_len && tile_begin < tile_end) {
        v = window_lse_at(p, z, b, h0 + hl, i);
        bad |= !isfinite(v);
        if (p.lse_natural) v *= 1.4426950408889634f;
      }
      lse2[r] = v;
    }
  }
  if (tile_begin < tile_end) {
    bad |= load_rows<T>(Qs, p.ldq, p.R, dim, p.q.stride_dim, p.vec_q != 0, [&](int r) -> const T* {
      const int hl = r / p.WP, i = r - hl * p.WP;
      return (hl < hc && i < w) ? qb + p.q.offset(b, h0 + hl, i, 0) : nullptr;
    });
  }
  const int strips = p.R / 16;
  const int strips_per_head = p.WP / 16;
  float* sb = Sb + warp * 16 * win_sb_ld;
  float* mycol = colpart + size_t(warp) * p.HC * win_tile;
  // Whether the WMMA accumulator layout is the one the direct (register) processing assumes — element e of lane
  // l at row l/4 + 8*((e/2)%2), column 2*(l%4) + e%2 + 8*(e/4) (the mma.m16n8k16 layout of sm_80/sm_90). Probed
  // once per CTA by loading a 16 x 16 matrix of known values; otherwise the scratch-memory path is used.
  bool frag_direct = false;
  if constexpr (Mma) {
    namespace wm = nvcuda::wmma;
    for (int e = lane; e < 256; e += 32) sb[(e / 16) * win_sb_ld + e % 16] = float(e);
    __syncwarp();
    wm::fragment<wm::accumulator, 16, 16, 16, float> probe;
    wm::load_matrix_sync(probe, sb, win_sb_ld, wm::mem_row_major);
    bool ok = probe.num_elements == 8;
    for (int e = 0; e < probe.num_elements && e < 8; ++e) {
      const int r = (lane >> 2) + 8 * ((e >> 1) & 1), c = (lane & 3) * 2 + (e & 1) + 8 * (e >> 2);
      ok &= probe.x[e] == float(r * 16 + c);
    }
    frag_direct = __all_sync(0xffffffffu, ok);
    __syncwarp();
  }

  // K tiles: with 16-byte rows that fit 4 vectors per thread, the next tile is prefetched into registers while
  // the current one is being used (hides the DRAM latency without a second shared-memory buffer).
  constexpr int kPer = 16 / int(sizeof(T));
  const int kchunks = dim / kPer;
  const bool prefetch = p.vec_k != 0 && win_tile * kchunks <= 4 * int(blockDim.x);
  uint4 pf[4];
  auto fetch = [&](int64_t tile) {
    const int64_t t0 = tile * win_tile;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int idx = int(threadIdx.x) + j * int(blockDim.x);
      const int r = idx / kchunks, c = idx - r * kchunks;
      pf[j] = make_uint4(0, 0, 0, 0);
      if (idx < win_tile * kchunks && t0 + r < n) {
        const T* row = k_row_of<Paged>(p.k, p.pg, kb, b, kh, t0 + r);
        if (row != nullptr)
          pf[j] = *reinterpret_cast<const uint4*>(row + c * kPer);
        else
          bad_page = true;
      }
    }
  };
  if (prefetch && tile_begin < tile_end) fetch(tile_begin);

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t t0 = tile * win_tile;
    __syncthreads();  // previous tile's Ks / colpart no longer in use
    if (prefetch) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int idx = int(threadIdx.x) + j * int(blockDim.x);
        if (idx >= win_tile * kchunks) continue;
        const int r = idx / kchunks, c = idx - r * kchunks;
        const uint4 v = pf[j];
        bad |= word_nonfinite<T>(v.x) | word_nonfinite<T>(v.y) | word_nonfinite<T>(v.z) | word_nonfinite<T>(v.w);
        if constexpr (sizeof(T) == 2) {
          *reinterpret_cast<uint4*>(Ks + size_t(r) * p.ldk + c * kPer) = v;
        } else {
          float* d = reinterpret_cast<float*>(Ks) + size_t(r) * p.ldk + c * 4;
          d[0] = __uint_as_float(v.x);
          d[1] = __uint_as_float(v.y);
          d[2] = __uint_as_float(v.z);
          d[3] = __uint_as_float(v.w);
        }
      }
      if (tile + 1 < tile_end) fetch(tile + 1);
    } else {
      bad |= load_rows<T>(Ks, p.ldk, win_tile, dim, p.k.stride_dim, p.vec_k != 0, [&](int r) -> const T* {
        if (t0 + r >= n) return nullptr;
        const T* row = k_row_of<Paged>(p.k, p.pg, kb, b, kh, t0 + r);
        bad_page |= row == nullptr;
        return row;
      });
    }
    if (!Stats)
      for (int x = lane; x < p.HC * win_tile; x += 32) mycol[x] = 0.0f;
    __syncthreads();

    // Strips are handled in pairs (s, s + win_warps) by the same warp so that every K fragment loaded from shared
    // memory feeds two MMAs. A strip s always belongs to warp s % win_warps (row statistics stay warp-private).
    for (int s = warp; s < strips; s += 2 * win_warps) {
      const int s2 = s + win_warps;
      const bool has1 = s / strips_per_head < hc;
      const bool has2 = s2 < strips && s2 / strips_per_head < hc;
      if (!has1 && !has2) continue;
      // The 16 x 16 block (strip st, column tile ct) of logits, in the warp's scratch `sb`, folded into the row
      // statistics (Stats) or the per-head column sums (accumulate).
      auto process = [&](int st, int ct) {
        __syncwarp();
        const int hl = st / strips_per_head, r0 = st * 16, i0 = r0 - hl * p.WP;
        const int64_t tb = t0 + ct * 16;
        if (Stats) {
          const int rr = lane >> 1, c0 = (lane & 1) * 8;
          const int i = i0 + rr;
          const int64_t last = n - w + i;  // last visible key
          float m = -INFINITY;
          float v[8];
#pragma unroll
          for (int c = 0; c < 8; ++c) {
            const int64_t t = tb + c0 + c;
            v[c] = (i < w && t <= last) ? sb[rr * win_sb_ld + c0 + c] * p.scale_log2 : -INFINITY;
            m = fmaxf(m, v[c]);
          }
          float l = 0.0f;
          if (m != -INFINITY) {
#pragma unroll
            for (int c = 0; c < 8; ++c) l += exp2f(v[c] - m);
          }
          const float m2 = __shfl_xor_sync(0xffffffffu, m, 1), l2 = __shfl_xor_sync(0xffffffffu, l, 1);
          merge_ml(m, l, m2, l2);
          if ((lane & 1) == 0 && i < w) {
            float M = rowm[r0 + rr], Ls = rowl[r0 + rr];
            merge_ml(M, Ls, m, l);
            rowm[r0 + rr] = M;
            rowl[r0 + rr] = Ls;
          }
        } else {
          const int c = lane & 15, rh = (lane >> 4) * 8;
          const int64_t t = tb + c;
          float acc = 0.0f;
#pragma unroll
          for (int rr = rh; rr < rh + 8; ++rr) {
            const int i = i0 + rr;
            if (i < w && t <= n - w + i) acc += exp2f(sb[rr * win_sb_ld + c] * p.scale_log2 - lse2[r0 + rr]);
          }
          acc += __shfl_xor_sync(0xffffffffu, acc, 16);
          if (lane < 16) mycol[hl * win_tile + ct * 16 + c] += acc;
        }
        __syncwarp();
      };
      if constexpr (Mma) {
        using E = typename wmma_elem<T>::type;
        namespace wm = nvcuda::wmma;
        wm::fragment<wm::accumulator, 16, 16, 16, float> acc[2][4];
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int ct = 0; ct < 4; ++ct) wm::fill_fragment(acc[j][ct], 0.0f);
        const E* qa = reinterpret_cast<const E*>(Qs) + size_t(s * 16) * p.ldq;
        const E* qb = reinterpret_cast<const E*>(Qs) + size_t((has2 ? s2 : s) * 16) * p.ldq;
        for (int kk = 0; kk < dim; kk += 16) {
          wm::fragment<wm::matrix_a, 16, 16, 16, E, wm::row_major> a0, a1;
          wm::load_matrix_sync(a0, qa + kk, p.ldq);
          if (has2) wm::load_matrix_sync(a1, qb + kk, p.ldq);
#pragma unroll
          for (int ct = 0; ct < 4; ++ct) {
            wm::fragment<wm::matrix_b, 16, 16, 16, E, wm::col_major> bf;
            wm::load_matrix_sync(bf, reinterpret_cast<const E*>(Ks) + size_t(ct * 16) * p.ldk + kk, p.ldk);
            wm::mma_sync(acc[0][ct], a0, bf, acc[0][ct]);
            if (has2) wm::mma_sync(acc[1][ct], a1, bf, acc[1][ct]);
          }
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int st = j == 0 ? s : s2;
          if (j == 0 ? !has1 : !has2) continue;
          const int hl = st / strips_per_head, r0 = st * 16, i0 = r0 - hl * p.WP;
          if (frag_direct) {
            // Straight from the accumulator registers (layout verified at kernel start): lane holds rows
            // rq, rq + 8 and columns cq, cq + 1, cq + 8, cq + 9 of each 16 x 16 block.
            const int rq = lane >> 2, cq = (lane & 3) * 2;
            const int ia = i0 + rq, ib = i0 + rq + 8;
            if (Stats) {
#pragma unroll
              for (int ct = 0; ct < 4; ++ct) {
                const int64_t tb = t0 + ct * 16 + cq;
                float va[4], vb[4];
                float ma = -INFINITY, mb = -INFINITY;
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                  const int64_t t = tb + (e & 1) + 8 * (e >> 1);
                  const float xa = acc[j][ct].x[(e & 1) + 4 * (e >> 1)] * p.scale_log2;
                  const float xb = acc[j][ct].x[2 + (e & 1) + 4 * (e >> 1)] * p.scale_log2;
                  va[e] = (ia < w && t <= n - w + ia) ? xa : -INFINITY;
                  vb[e] = (ib < w && t <= n - w + ib) ? xb : -INFINITY;
                  ma = fmaxf(ma, va[e]);
                  mb = fmaxf(mb, vb[e]);
                }
                float la = 0.0f, lb = 0.0f;
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                  if (ma != -INFINITY) la += exp2f(va[e] - ma);
                  if (mb != -INFINITY) lb += exp2f(vb[e] - mb);
                }
#pragma unroll
                for (int o = 1; o <= 2; o <<= 1) {
                  const float ma2 = __shfl_xor_sync(0xffffffffu, ma, o), la2 = __shfl_xor_sync(0xffffffffu, la, o);
                  const float mb2 = __shfl_xor_sync(0xffffffffu, mb, o), lb2 = __shfl_xor_sync(0xffffffffu, lb, o);
                  merge_ml(ma, la, ma2, la2);
                  merge_ml(mb, lb, mb2, lb2);
                }
                if ((lane & 3) == 0) {
                  if (ia < w) {
                    float M = rowm[r0 + rq], Ls = rowl[r0 + rq];
                    merge_ml(M, Ls, ma, la);
                    rowm[r0 + rq] = M;
                    rowl[r0 + rq] = Ls;
                  }
                  if (ib < w) {
                    float M = rowm[r0 + rq + 8], Ls = rowl[r0 + rq + 8];
                    merge_ml(M, Ls, mb, lb);
                    rowm[r0 + rq + 8] = M;
                    rowl[r0 + rq + 8] = Ls;
                  }
                }
              }
            } else {
              const float la = ia < w ? lse2[r0 + rq] : 0.0f, lb = ib < w ? lse2[r0 + rq + 8] : 0.0f;
              const bool full = t0 + win_tile - 1 <= n - w;  // every key of the tile visible to every query
#pragma unroll
              for (int ct = 0; ct < 4; ++ct) {
                const int64_t tb = t0 + ct * 16 + cq;
                float cs[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                  const int64_t t = tb + (e & 1) + 8 * (e >> 1);
                  const float xa = acc[j][ct].x[(e & 1) + 4 * (e >> 1)] * p.scale_log2 - la;
                  const float xb = acc[j][ct].x[2 + (e & 1) + 4 * (e >> 1)] * p.scale_log2 - lb;
                  const bool oka = ia < w && (full || t <= n - w + ia), okb = ib < w && (full || t <= n - w + ib);
                  cs[e] = (oka ? exp2f(xa) : 0.0f) + (okb ? exp2f(xb) : 0.0f);
                }
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                  cs[e] += __shfl_xor_sync(0xffffffffu, cs[e], 4);
                  cs[e] += __shfl_xor_sync(0xffffffffu, cs[e], 8);
                  cs[e] += __shfl_xor_sync(0xffffffffu, cs[e], 16);
                }
                if (lane < 4) {
                  float* dst = mycol + hl * win_tile + ct * 16 + cq;
                  dst[0] += cs[0];
                  dst[1] += cs[1];
                  dst[8] += cs[2];
                  dst[9] += cs[3];
                }
              }
            }
          } else {
#pragma unroll
            for (int ct = 0; ct < 4; ++ct) {
              __syncwarp();
              wm::store_matrix_sync(sb, acc[j][ct], win_sb_ld, wm::mem_row_major);
              process(st, ct);
            }
          }
        }
      } else {
        for (int j = 0; j < 2; ++j) {
          const int st = j == 0 ? s : s2;
          if (j == 0 ? !has1 : !has2) continue;
          const int r0 = st * 16;
          for (int ct = 0; ct < 4; ++ct) {
            const int c = lane & 15, rh = (lane >> 4) * 8;
            float d8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            const T* kr = Ks + size_t(ct * 16 + c) * p.ldk;
            for (int d = 0; d < dim; ++d) {
              const float kv = to_float(kr[d]);
#pragma unroll
              for (int rr = 0; rr < 8; ++rr) d8[rr] = fmaf(to_float(Qs[size_t(r0 + rh + rr) * p.ldq + d]), kv, d8[rr]);
            }
            __syncwarp();
#pragma unroll
            for (int rr = 0; rr < 8; ++rr) sb[(rh + rr) * win_sb_ld + c] = d8[rr];
            process(st, ct);
          }
        }
      }
    }

    if (!Stats) {
      __syncthreads();
      for (int c = threadIdx.x; c < win_tile; c += blockDim.x) {
        const int64_t t = t0 + c;
        if (t >= n) continue;
        float g = 0.0f;  // probabilities are >= 0, so 0 is neutral for max too
        for (int hl = 0; hl < hc; ++hl) {
          float a = 0.0f;
          for (int wp = 0; wp < win_warps; ++wp) a += colpart[(size_t(wp) * p.HC + hl) * win_tile + c];
          bad |= !isfinite(a);
          g = p.group == head_reduce::max ? fmaxf(g, a) : g + a;
        }
        if (p.group == head_reduce::mean) g *= p.inv_G;
        window_kvrow(p, z, chunk, b, kh)[t] = g;  // this head chunk's partial row (combined by window_finalize)
      }
    }
  }

  if (Stats) {
    __syncthreads();
    for (int r = threadIdx.x; r < p.R; r += blockDim.x) {
      const int hl = r / p.WP, i = r - hl * p.WP;
      if (hl < hc && i < w)
        p.stats[(((z * p.q.batch + b) * Hq + h0 + hl) * w + i) * p.splits + blockIdx.x] = make_float2(rowm[r], rowl[r]);
    }
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) flag(p.status, status_nonfinite);
  if (Paged && __syncthreads_or(bad_page) && threadIdx.x == 0) flag(p.status, status_bad_page);
}

}  // namespace detail
PREFIXKV_NAMESPACE_END

#include "detail/window_mma.cuh"
#include "detail/window_wgmma.cuh"

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

//! LSE (log2 domain) of every window query from the per-split statistics (merged in split order).
// Kernels in headers are templates (a dummy parameter) so that several translation units may include them.
template <int = 0>
PREFIXKV_KERNEL void window_merge_stats(const float2* stats, int64_t nrows, int splits, float* lse2) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < nrows; r += int64_t(gridDim.x) * blockDim.x) {
    float m = -INFINITY, l = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float2 v = stats[r * splits + s];
      merge_ml(m, l, v.x, v.y);
    }
    lse2[r] = m + log2f(l);  // l >= 1 whenever m is finite (the last window query sees >= 1 key)
  }
}

struct window_final_params {
  const float* kvrows;  // (layers, chunks, batch, kv_head, capacity): one partial row per head chunk
  int64_t B, Hk, capacity, w;
  int chunks;
  head_reduce group;
  segments rows;
  segment_grid grid;
  int64_t layer;
  pool_kind pool;
  int pool_kernel;
  head_reduce heads;
  float* scores;
};

//! Group-reduced value of key t of (layer z, sequence b, kv head kh): the head chunks' partial rows combined in
//! chunk order (sum for the mean, max for the max), so the result does not depend on the order CTAs ran in.
PREFIXKV_DEVICE float window_kv_value(const window_final_params& p, int64_t z, int64_t b, int64_t kh, int64_t t) {
  const int64_t chunk_stride = p.B * p.Hk * p.capacity;
  const float* r = p.kvrows + ((z * p.chunks * p.B + b) * p.Hk + kh) * p.capacity + t;
  float v = r[0];
  for (int c = 1; c < p.chunks; ++c) {
    const float x = r[c * chunk_stride];
    v = p.group == head_reduce::max ? fmaxf(v, x) : v + x;
  }
  return v;
}

//! Pooling along tokens + head reduction (layer rows) or per-kv-head output. Grid: (token blocks, batch x output
//! heads, layers). A row whose length is outside [w, capacity] is written as zeros (at most `capacity` of them).
template <int = 0>
PREFIXKV_KERNEL void window_finalize(window_final_params p) {
  const int64_t z = blockIdx.z, Ho = p.grid.heads == 1 ? 1 : p.Hk;
  const int64_t b = blockIdx.y / Ho, ho = blockIdx.y - b * Ho;
  const int64_t id = p.grid.id(p.layer + z, b, ho), n_row = p.rows.length(id);
  const bool bad_len = n_row < p.w || n_row > p.capacity;
  const int64_t n = n_row < p.capacity ? n_row : p.capacity;
  const int r = p.pool == pool_kind::none ? 0 : p.pool_kernel / 2;
  float* out = p.scores + p.rows.begin(id);
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < n; t += int64_t(gridDim.x) * blockDim.x) {
    float red = p.heads == head_reduce::max ? -INFINITY : 0.0f, v = 0.0f;
    for (int64_t kh = Ho == 1 ? 0 : ho; kh < (Ho == 1 ? p.Hk : ho + 1); ++kh) {
      v = 0.0f;
      if (!bad_len) {
        if (r == 0) {
          v = window_kv_value(p, z, b, kh, t);
        } else {
          const int64_t lo = t - r < 0 ? 0 : t - r, hi = t + r < n - 1 ? t + r : n - 1;
          v = p.pool == pool_kind::max ? -INFINITY : 0.0f;
          for (int64_t j = lo; j <= hi; ++j) {
            const float x = window_kv_value(p, z, b, kh, j);
            v = p.pool == pool_kind::max ? fmaxf(v, x) : v + x;
          }
          if (p.pool == pool_kind::avg) v /= float(p.pool_kernel);
        }
      }
      red = p.heads == head_reduce::max ? fmaxf(red, v) : red + v;
    }
    out[t] = Ho != 1 ? v : p.heads == head_reduce::max ? red : red / float(p.Hk);
  }
}

//! The window scorer's shape over all layers of a call.
struct window_shape {
  int64_t layers, batch, q_heads, kv_heads, w, dim, capacity;
  bool vec_q, vec_k;  // every layer's Q / K rows allow 16-byte loads
};

struct window_plan {
  int HC = 1, chunks = 1, WP = 16, R = 16, ldq = 0, ldk = 0, splits = 1, tiles_per_split = 1;
  bool mma = false, vec_q = false, vec_k = false;
  size_t smem = 0;
};

template <class T>
inline cudaError_t plan_window(const window_shape& s, window_plan& pl) {
  const int64_t G = s.q_heads / s.kv_heads, w = s.w, D = s.dim;
  pl.mma = sizeof(T) == 2 && D % 16 == 0;
  pl.WP = int((w + 15) / 16 * 16);
  if constexpr (sizeof(T) == 2) {
    pl.ldq = pl.ldk = int((D + 7) / 8 * 8 + 8);
  } else {
    pl.ldq = pl.ldk = int(D + 1);
  }
  pl.vec_q = s.vec_q;
  pl.vec_k = s.vec_k;
  const size_t budget_shared = 110 * 1024, budget_max = 227 * 1024;
  pl.HC = int(G);
  for (;;) {
    pl.R = pl.HC * pl.WP;
    pl.smem = window_smem<T>(pl.R, pl.HC, pl.ldq, pl.ldk).total;
    if (pl.smem <= budget_shared || pl.HC == 1) break;
    --pl.HC;
  }
  if (pl.smem > budget_max)
    return fail(reason::unsupported, "window scorer: window x head_dim too large for shared memory");
  pl.chunks = int((G + pl.HC - 1) / pl.HC);
  const int64_t tiles = (s.capacity + win_tile - 1) / win_tile;
  const int64_t ctas_per_split = s.layers * s.batch * s.kv_heads * pl.chunks;
  const int64_t target = int64_t(sm_count()) * (pl.smem <= budget_shared ? 2 : 1) * 2;
  int64_t splits = ctas_per_split > 0 ? (target + ctas_per_split - 1) / ctas_per_split : 1;
  splits = splits < 1 ? 1 : (splits > tiles ? tiles : splits);
  if (splits < 1) splits = 1;
  pl.tiles_per_split = int((tiles + splits - 1) / splits);
  if (pl.tiles_per_split < 1) pl.tiles_per_split = 1;
  pl.splits = int((tiles + pl.tiles_per_split - 1) / pl.tiles_per_split);
  if (pl.splits < 1) pl.splits = 1;
  return cudaSuccess;
}

//! Kernel configuration of the mma accumulate pass: NJ n8 query tiles per step, warps per CTA, most K stages
//! per warp. Measured on the H100 (bench/score/RESULTS.md): {4, 8, 2} 0.262 ms at 128K; {2, 12, 1} 0.280,
//! {2, 8, 2} 0.286, {4, 8, 1} 0.260, {1, 16, 1} 0.255 (not taken: within 3 %, validated in quick mode only).
struct window_mma_cfg {
  int NJ, warps, max_stages;
};
inline constexpr window_mma_cfg window_mma_config{4, 8, 2};

//! Compile-time choices of the window scorer's accumulate pass. The entry points use this one; tests and
//! benchmarks instantiate the dispatch (`window_attention_run`) with others to reach every kernel path on one
//! device (e.g. `wgmma = false` for the mma.sync kernel in a PREFIXKV_SM90A build).
struct window_policy {
  static constexpr bool wgmma = true;                        //!< the wgmma kernel where it applies (PREFIXKV_SM90A)
  static constexpr int wgmma_max_stages = wgmma_stages_max;  //!< most K stages per warp of the wgmma kernel (1-4)
};

//! Plan of the tensor-core accumulate kernel (window_mma.cuh); `use == false` falls back to window_kernel.
struct window_mma_plan {
  bool use = false;
  int NK = 2, NJ = 4, warps = 8, HC = 1, chunks = 1, WP = wmma_qstep, R = wmma_qstep, stages = 2, splits = 1;
  int64_t split_keys = wmma_keys;
  size_t smem = 0;
};

//! Raises the dynamic shared-memory limit of `Kernel` to the device maximum, once per kernel and device ordinal
//! (< 64; a thread-safe flag word per kernel: racing first calls both set the same attribute), and returns that
//! maximum in `optin`.
template <auto Kernel>
inline cudaError_t raise_smem_limit(int& optin) {
  static std::atomic<unsigned long long> configured{0};
  int dev = 0;
  PREFIXKV_TRY(check_runtime(cudaGetDevice(&dev), "window scorer: no current device"));
  PREFIXKV_TRY(check_runtime(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                             "window scorer: cannot query shared memory"));
  const unsigned long long bit = dev < 64 ? (1ull << dev) : 0ull;
  if ((configured.load(std::memory_order_acquire) & bit) == 0) {
    PREFIXKV_TRY(check_runtime(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin),
                               "window scorer: cannot reserve shared memory"));
    configured.fetch_or(bit, std::memory_order_acq_rel);
  }
  return cudaSuccess;
}

//! Keys per CTA for the tensor-core window kernels: split each (layer, batch, kv head, head chunk) unit's keys so
//! that waves x (rounds + prologue) is smallest (a round = one `tile`-key tile per one of `workers`
//! warps/warpgroups; `prologue` = a CTA's set-up time in rounds: the time of the slowest CTA in a grid of
//! equal-work CTAs); ties go to fewer CTAs; the search starts at one full wave. Returns the keys per split, a
//! multiple of `tile`.
inline int64_t window_split_keys(int64_t units, int64_t slots, int64_t cap, int64_t tile, int64_t workers,
                                 int64_t prologue = 0) {
  const int64_t max_splits = std::max<int64_t>(1, (cap + tile - 1) / tile);
  int64_t splits = std::min(max_splits, std::max<int64_t>(1, units > 0 ? slots / units : 1));
  int64_t best = -1;
  const int64_t first = splits;
  for (int64_t sp = first; sp <= std::min(max_splits, 4 * first); ++sp) {
    const int64_t tiles = ((cap + sp - 1) / sp + tile - 1) / tile;
    const int64_t rounds = (tiles + workers - 1) / workers;
    const int64_t waves = (units * sp + slots - 1) / slots;
    if (best < 0 || waves * (rounds + prologue) < best) {
      best = waves * (rounds + prologue);
      splits = sp;
    }
  }
  const int64_t sk = (cap + splits - 1) / splits;
  return (sk + tile - 1) / tile * tile;
}

template <class T, int NK, bool Paged>
inline cudaError_t plan_window_mma_nk(const window_shape& s, window_mma_plan& pl) {
  constexpr window_mma_cfg cfg = window_mma_config;
  int optin = 0;
  PREFIXKV_TRY((raise_smem_limit<window_mma_kernel<T, NK, cfg.NJ, cfg.warps, Paged>>(optin)));
  int dev = 0, major = 0;
  PREFIXKV_TRY(check_runtime(cudaGetDevice(&dev), "window scorer: no current device"));
  PREFIXKV_TRY(check_runtime(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev),
                             "window scorer: cannot query the device"));
  if (major < 8) return cudaSuccess;  // mma.sync bf16 needs sm_80+
  const int64_t G = s.q_heads / s.kv_heads, w = s.w, D = s.dim;
  const int64_t WP = (w + wmma_qstep - 1) / wmma_qstep * wmma_qstep;
  if (WP * G > (int64_t(1) << 20)) return cudaSuccess;
  pl.NK = NK;
  pl.NJ = cfg.NJ;
  pl.warps = cfg.warps;
  pl.WP = int(WP);
  auto smem_of = [&](int64_t HC, int stages) {
    return window_mma_smem(int(HC * WP), int(D), stages, int(sizeof(T)), cfg.warps).total;
  };
  bool found = false;
  for (int st = cfg.max_stages; st >= 1 && !found; --st)  // the whole group in one CTA first (one partial row)
    if (smem_of(G, st) <= size_t(optin)) {
      pl.HC = int(G);
      pl.stages = st;
      found = true;
    }
  for (int st = cfg.max_stages; st >= 1 && !found; --st)
    for (int64_t hc = G - 1; hc >= 1 && !found; --hc)
      if (smem_of(hc, st) <= size_t(optin)) {
        pl.HC = int(hc);
        pl.stages = st;
        found = true;
      }
  if (!found) return cudaSuccess;
  pl.R = int(pl.HC * WP);
  pl.smem = smem_of(pl.HC, pl.stages);
  pl.chunks = int((G + pl.HC - 1) / pl.HC);
  int per_sm = 0;
  PREFIXKV_TRY(check_runtime(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                                 &per_sm, window_mma_kernel<T, NK, cfg.NJ, cfg.warps, Paged>, cfg.warps * 32, pl.smem),
                             "window scorer: occupancy query failed"));
  if (per_sm < 1) return cudaSuccess;
  // Key splits per (layer, batch, kv head, chunk) unit (a round = one 32-key tile per warp)
  const int64_t cap = s.capacity > 0 ? s.capacity : 1;
  const int64_t sk = window_split_keys(s.layers * s.batch * s.kv_heads * pl.chunks, int64_t(sm_count()) * per_sm, cap,
                                       wmma_keys, cfg.warps);
  pl.split_keys = sk;
  pl.splits = int((cap + sk - 1) / sk);
  pl.use = true;
  return cudaSuccess;
}

template <class T, bool Paged>
inline cudaError_t plan_window_mma(const window_shape& s, window_mma_plan& pl) {
  pl = window_mma_plan{};
  if constexpr (sizeof(T) == 2) {
    if (!s.vec_k) return cudaSuccess;
    if (s.dim == 64) return plan_window_mma_nk<T, 1, Paged>(s, pl);
    if (s.dim == 128) return plan_window_mma_nk<T, 2, Paged>(s, pl);
  }
  return cudaSuccess;
}

template <class T, bool Paged>
inline cudaError_t launch_window_mma(const window_params<T>& p, const window_mma_plan& pl, int64_t layers,
                                     cudaStream_t stream) {
  const dim3 grid(unsigned(pl.splits), unsigned(p.q.batch * p.k.heads * pl.chunks), unsigned(layers));
  const unsigned threads = unsigned(pl.warps * 32);
  if constexpr (sizeof(T) == 2) {
    constexpr window_mma_cfg c = window_mma_config;
    if (pl.NK == 1)
      window_mma_kernel<T, 1, c.NJ, c.warps, Paged><<<grid, threads, pl.smem, stream>>>(p);
    else
      window_mma_kernel<T, 2, c.NJ, c.warps, Paged><<<grid, threads, pl.smem, stream>>>(p);
  }
  return check_launch(stream);
}

#if defined(PREFIXKV_SM90A)
//! Calls f(kernel) with the wgmma kernel instance for (NK, NP = R / 128).
template <class T, int NK, bool Paged, class F>
inline cudaError_t with_window_wgmma_kernel(int R, F&& f) {
  if (R == 128) return f(window_wgmma_kernel<T, NK, 1, Paged>);
  return f(window_wgmma_kernel<T, NK, 2, Paged>);
}

//! Plan of the wgmma kernel, stored in a window_mma_plan (NJ = 0 marks wgmma, `warps` = 4 x warpgroups). It takes a
//! CTA query block of R = 128 or 256 rows: the padded window WP (multiple of 64) must be 64, 128 or 256, and HC heads
//! with HC x WP = R (the whole group when G x WP is 128 or 256, else chunks of 256 / WP heads; a group of one head
//! with WP = 64 would waste half of every MMA and goes to mma.sync).
template <class Policy, class T, int NK, bool Paged>
inline cudaError_t plan_window_wgmma_nk(const window_shape& s, window_mma_plan& pl) {
  int dev = 0, major = 0, minor = 0;
  PREFIXKV_TRY(check_runtime(cudaGetDevice(&dev), "window scorer: no current device"));
  PREFIXKV_TRY(check_runtime(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev),
                             "window scorer: cannot query the device"));
  PREFIXKV_TRY(check_runtime(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev),
                             "window scorer: cannot query the device"));
  if (major != 9 || minor != 0) return cudaSuccess;  // sm_90a code runs on compute capability 9.0 only
  const int64_t G = s.q_heads / s.kv_heads, w = s.w, D = s.dim;
  const int64_t WP = (w + 63) / 64 * 64;
  if (WP != 64 && WP != 128 && WP != 256) return cudaSuccess;
  const int64_t HC = G * WP <= 256 ? G : 256 / WP, R = HC * WP;
  if (R != 128 && R != 256) return cudaSuccess;
  constexpr int WGS = wgmma_groups;
  int optin = 0;
  if (R == 128)
    PREFIXKV_TRY((raise_smem_limit<window_wgmma_kernel<T, NK, 1, Paged>>(optin)));
  else
    PREFIXKV_TRY((raise_smem_limit<window_wgmma_kernel<T, NK, 2, Paged>>(optin)));
  static_assert(Policy::wgmma_max_stages >= 1 && Policy::wgmma_max_stages <= wgmma_stages_max,
                "window policy: wgmma_max_stages must be 1-4");
  auto smem_of = [&](int st) { return window_wgmma_smem(int(R), int(D), st, int(sizeof(T)), WGS).total; };
  int st = Policy::wgmma_max_stages;
  while (st > 1 && smem_of(st) > size_t(optin)) --st;
  window_mma_plan out{};
  out.NK = NK;
  out.NJ = 0;
  out.warps = WGS * 4;
  out.WP = int(WP);
  out.HC = int(HC);
  out.stages = st;
  out.R = int(R);
  out.smem = smem_of(st);
  if (out.smem > size_t(optin)) return cudaSuccess;
  out.chunks = int((G + HC - 1) / HC);
  int per_sm = 0;
  PREFIXKV_TRY(check_runtime(with_window_wgmma_kernel<T, NK, Paged>(int(R), [&](auto* kernel) {
                               return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, WGS * 128, out.smem);
                             }),
                             "window scorer: occupancy query failed"));
  if (per_sm < 1) return cudaSuccess;
  // Key splits (a round = one 64-key tile per warpgroup)
  const int64_t cap = s.capacity > 0 ? s.capacity : 1;
  const int64_t sk = window_split_keys(s.layers * s.batch * s.kv_heads * out.chunks, int64_t(sm_count()) * per_sm,
                                       cap, wgmma_keys, WGS, wgmma_prologue_rounds);
  out.split_keys = sk;
  out.splits = int((cap + sk - 1) / sk);
  out.use = true;
  pl = out;
  return cudaSuccess;
}
#endif  // PREFIXKV_SM90A

//! Picks the accumulate kernel: wgmma (PREFIXKV_SM90A builds on compute capability 9.0, query blocks it takes,
//! `Policy::wgmma`), else mma.sync, else `use == false` (window_kernel).
template <class Policy, class T, bool Paged>
inline cudaError_t plan_window_accumulate(const window_shape& s, window_mma_plan& pl) {
  pl = window_mma_plan{};
  constexpr bool wgmma = Policy::wgmma;  // (unused in builds without PREFIXKV_SM90A)
  (void)wgmma;
#if defined(PREFIXKV_SM90A)
  if constexpr (sizeof(T) == 2 && wgmma) {
    if (s.vec_k) {
      if (s.dim == 64) PREFIXKV_TRY((plan_window_wgmma_nk<Policy, T, 1, Paged>(s, pl)));
      if (s.dim == 128) PREFIXKV_TRY((plan_window_wgmma_nk<Policy, T, 2, Paged>(s, pl)));
      if (pl.use) return cudaSuccess;
    }
  }
#endif
  return plan_window_mma<T, Paged>(s, pl);
}

template <class T, bool Paged>
inline cudaError_t launch_window_accumulate(const window_params<T>& p, const window_mma_plan& pl, int64_t layers,
                                            cudaStream_t stream) {
#if defined(PREFIXKV_SM90A)
  if constexpr (sizeof(T) == 2) {
    if (pl.NJ == 0) {
      const dim3 grid(unsigned(pl.splits), unsigned(p.q.batch * p.k.heads * pl.chunks), unsigned(layers));
      auto launch = [&](auto* kernel) {
        kernel<<<grid, unsigned(wgmma_groups * 128), pl.smem, stream>>>(p);
        return cudaSuccess;
      };
      if (pl.NK == 1)
        (void)with_window_wgmma_kernel<T, 1, Paged>(pl.R, launch);
      else
        (void)with_window_wgmma_kernel<T, 2, Paged>(pl.R, launch);
      return check_launch(stream);
    }
  }
#endif
  return launch_window_mma<T, Paged>(p, pl, layers, stream);
}

template <class T, bool Stats, bool Mma, bool Paged>
inline cudaError_t launch_window_kernel(const window_params<T>& p, const window_plan& pl, dim3 grid, cudaStream_t stream) {
  int optin = 0;
  PREFIXKV_TRY((raise_smem_limit<window_kernel<T, Stats, Mma, Paged>>(optin)));
  if (size_t(optin) < pl.smem)
    return fail(reason::unsupported, "window scorer: window x head_dim needs more shared memory than this GPU has");
  window_kernel<T, Stats, Mma, Paged><<<grid, win_warps * 32, pl.smem, stream>>>(p);
  return check_launch(stream);
}

template <class T, bool Stats, bool Paged>
inline cudaError_t launch_window_pass(const window_params<T>& p, const window_plan& pl, dim3 grid, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {
    if (pl.mma) return launch_window_kernel<T, Stats, true, Paged>(p, pl, grid, stream);
  }
  return launch_window_kernel<T, Stats, false, Paged>(p, pl, grid, stream);
}

//! The window scorer's shape over `layers` layers, with the 16-byte load conditions of every layer's Q and K.
template <class T, class KView>
inline window_shape make_window_shape(const kv_view<const T>* q, const KView* k, int64_t layers) {
  window_shape s{layers, q[0].batch, q[0].heads, k[0].heads, q[0].tokens, q[0].dim, k_capacity(k[0]), true, true};
  const bool dim_ok = s.dim % (16 / int64_t(sizeof(T))) == 0;
  for (int64_t l = 0; l < layers; ++l) {
    s.vec_q = s.vec_q && dim_ok && vector_bytes(q[l]) == 16;
    s.vec_k = s.vec_k && dim_ok && vector_bytes(k[l]) == 16;
  }
  return s;
}

//! The window scorer for `layers` layers starting at grid layer `layer` (q, k, lse: host arrays of `layers`
//! views; lse may be null). `Policy`: see window_policy. Launches: 2 with a caller LSE, 4 without, for any number of
//! layers.
template <class Policy, class T, class KView>
inline cudaError_t window_attention_run(void* d_temp, size_t& temp_bytes, const kv_view<const T>* q, const KView* k,
                                        const lse_view* lse, const window_options& opt, const segment_grid& grid,
                                        int64_t layer, int64_t layers, const segments& rows, float* scores,
                                        unsigned* d_status, cudaStream_t stream) {
  constexpr bool Paged = std::is_same<KView, paged_kv_view<const T>>::value;
  PREFIXKV_TRY(check_window_layers(q, k, lse, opt, grid, layer, layers, rows, scores, false));
  const window_shape sh = make_window_shape(q, k, layers);
  window_plan pl;
  PREFIXKV_TRY(plan_window<T>(sh, pl));
  const int64_t B = sh.batch, Hq = sh.q_heads, Hk = sh.kv_heads, w = sh.w, cap = sh.capacity, L = layers;
  const bool work = B > 0 && rows.count > 0;
  window_mma_plan mp;
  if (work) PREFIXKV_TRY((plan_window_accumulate<Policy, T, Paged>(sh, mp)));
  const int chunks = mp.use ? mp.chunks : pl.chunks;
  const bool own_lse = lse == nullptr || lse[0].data == nullptr;
  // Workspace: partial rows (layers, chunks, batch, kv_head, capacity), and for the in-kernel softmax the
  // per-split row statistics and the LSE of every window query.
  int64_t kv_floats = 0, nq = 0, nstats = 0, x = 0;
  constexpr int64_t max_elems = std::numeric_limits<int64_t>::max() / 16;
  if (!score_mul(L, chunks, x) || !score_mul(x, B, x) || !score_mul(x, Hk, x) || !score_mul(x, cap, kv_floats) ||
      !score_mul(L, B, x) || !score_mul(x, Hq, x) || !score_mul(x, w, nq) || !score_mul(nq, pl.splits, nstats) ||
      kv_floats > max_elems || nstats > max_elems)
    return fail(reason::unsupported, "window scorer: the workspace size overflows 64 bits");
  workspace_layout<3> ws;
  ws.reserve<float>(0, size_t(kv_floats));
  if (own_lse) {
    ws.reserve<float2>(1, size_t(nstats));
    ws.reserve<float>(2, size_t(nq));
  }
  if (d_temp == nullptr) {
    temp_bytes = ws.bytes();
    return cudaSuccess;
  }
  PREFIXKV_TRY(ws.map(d_temp, temp_bytes));
  if (!work) return cudaSuccess;
  if (B * Hk * pl.chunks > 65535 || (mp.use && B * Hk * mp.chunks > 65535) || B * Hk > 65535)
    return fail(reason::unsupported, "window scorer: batch x kv_heads too large for one launch");

  window_params<T> p{};
  p.q = q[0];
  k_geometry(k[0], p.k, p.pg);
  for (int64_t l = 0; l < L; ++l) {
    p.q_of[l] = q[l].data;
    p.k_of[l] = k_data(k[l]);
  }
  p.kvrows = ws.get<float>(0);
  p.rows = rows;
  p.grid = grid;
  p.layer = layer;
  p.status = d_status;
  p.scale_log2 = effective_scale(opt.scale, sh.dim) * 1.4426950408889634f;
  p.G = int(Hq / Hk);
  p.inv_G = 1.0f / float(p.G);
  p.HC = pl.HC;
  p.chunks = pl.chunks;
  p.WP = pl.WP;
  p.R = pl.R;
  p.ldq = pl.ldq;
  p.ldk = pl.ldk;
  p.splits = pl.splits;
  p.tiles_per_split = pl.tiles_per_split;
  p.vec_q = pl.vec_q;
  p.vec_k = pl.vec_k;
  p.group = opt.group;
  p.stats = ws.get<float2>(1);
  const dim3 g(unsigned(pl.splits), unsigned(B * Hk * pl.chunks), unsigned(L));
  if (own_lse) {
    PREFIXKV_TRY((launch_window_pass<T, true, Paged>(p, pl, g, stream)));
    window_merge_stats<><<<unsigned((nq + 255) / 256), 256, 0, stream>>>(p.stats, nq, pl.splits, ws.get<float>(2));
    PREFIXKV_TRY(check_launch(stream));
    p.lse = lse_view{nullptr, Hq * w, w, 1};
    for (int64_t l = 0; l < L; ++l) p.lse_of[l] = ws.get<float>(2) + l * B * Hq * w;
    p.lse_natural = 0;
  } else {
    p.lse = lse[0];
    p.lse.data = nullptr;
    for (int64_t l = 0; l < L; ++l) p.lse_of[l] = lse[l].data;
    p.lse_natural = 1;
  }
  if (mp.use) {
    window_params<T> pm = p;
    pm.HC = mp.HC;
    pm.chunks = mp.chunks;
    pm.WP = mp.WP;
    pm.R = mp.R;
    pm.stages = mp.stages;
    pm.split_keys = mp.split_keys;
    PREFIXKV_TRY((launch_window_accumulate<T, Paged>(pm, mp, L, stream)));
  } else {
    PREFIXKV_TRY((launch_window_pass<T, false, Paged>(p, pl, g, stream)));
  }

  window_final_params f;
  f.kvrows = p.kvrows;
  f.B = B;
  f.Hk = Hk;
  f.capacity = cap;
  f.w = w;
  f.chunks = chunks;
  f.group = opt.group;
  f.rows = rows;
  f.grid = grid;
  f.layer = layer;
  f.pool = opt.pool;
  f.pool_kernel = opt.pool_kernel;
  f.heads = opt.heads;
  f.scores = scores;
  const int64_t bx = (cap + 255) / 256;
  const int64_t by = B * (grid.heads == 1 ? 1 : Hk);
  const dim3 fgrid(unsigned(bx < 4096 ? (bx > 0 ? bx : 1) : 4096), unsigned(by), unsigned(L));
  window_finalize<><<<fgrid, 256, 0, stream>>>(f);
  return check_launch(stream);
}

}  // namespace detail

//! Observation-window attention scores of one layer (device). Same arguments and semantics as
//! `window_attention_host`; q, k, lse, rows' arrays and scores are device memory.
//! q: (batch, q_head, w, dim); k: (batch, kv_head, token capacity, dim); lse: (batch, q_head, w) natural-log
//! LSE or `lse_view{}`; scores: flat output addressed by `rows` (count grid.count()); d_status: optional
//! device word for `status_bits`.
//! Workspace: (batch x kv_head x capacity x c) floats, c = 1 unless a GQA group's Q rows exceed one CTA's shared
//! memory (then the number of head chunks), plus 12 bytes per window query and key split without an LSE.
template <class T>
[[nodiscard]] inline cudaError_t window_attention(void* d_temp, size_t& temp_bytes, kv_view<const T> q,
                                                  kv_view<const T> k, lse_view lse, window_options opt,
                                                  segment_grid grid, int64_t layer, segments rows, float* scores,
                                                  unsigned* d_status = nullptr, cudaStream_t stream = 0) {
  static_assert(detail::is_score_element<T>::value, PREFIXKV_SCORE_ELEMENT_MESSAGE);
  if constexpr (detail::is_score_element<T>::value)
    return detail::window_attention_run<detail::window_policy>(d_temp, temp_bytes, &q, &k, &lse, opt, grid, layer, 1,
                                                               rows, scores, d_status, stream);
  else
    return cudaErrorInvalidValue;
}

//! The same with K in a paged cache: k.pages and k.block_table are device memory; every page id a row needs is
//! checked on the device (outside [0, num_pages): `status_bad_page`, the key is read as zeros).
template <class T>
[[nodiscard]] inline cudaError_t window_attention(void* d_temp, size_t& temp_bytes, kv_view<const T> q,
                                                  paged_kv_view<const T> k, lse_view lse, window_options opt,
                                                  segment_grid grid, int64_t layer, segments rows, float* scores,
                                                  unsigned* d_status = nullptr, cudaStream_t stream = 0) {
  static_assert(detail::is_score_element<T>::value, PREFIXKV_SCORE_ELEMENT_MESSAGE);
  if constexpr (detail::is_score_element<T>::value)
    return detail::window_attention_run<detail::window_policy>(d_temp, temp_bytes, &q, &k, &lse, opt, grid, layer, 1,
                                                               rows, scores, d_status, stream);
  else
    return cudaErrorInvalidValue;
}

//! Observation-window attention scores of all `grid.layers` layers in one call (2 kernel launches with a caller
//! LSE, 4 without, for any number of layers <= score_max_layers). q, k (and lse unless null): host arrays of
//! grid.layers per-layer views of device memory with equal extents and strides. Workspace: the single-layer
//! workspace times the number of layers.
template <class T>
[[nodiscard]] inline cudaError_t window_attention_layers(void* d_temp, size_t& temp_bytes, const kv_view<const T>* q,
                                                         const kv_view<const T>* k, const lse_view* lse,
                                                         window_options opt, segment_grid grid, segments rows,
                                                         float* scores, unsigned* d_status = nullptr,
                                                         cudaStream_t stream = 0) {
  static_assert(detail::is_score_element<T>::value, PREFIXKV_SCORE_ELEMENT_MESSAGE);
  if constexpr (detail::is_score_element<T>::value)
    return detail::window_attention_run<detail::window_policy>(d_temp, temp_bytes, q, k, lse, opt, grid, 0,
                                                               grid.layers, rows, scores, d_status, stream);
  else
    return cudaErrorInvalidValue;
}

//! The same with K in a paged cache (one page pool per layer, one block table shared by the layers).
template <class T>
[[nodiscard]] inline cudaError_t window_attention_layers(void* d_temp, size_t& temp_bytes, const kv_view<const T>* q,
                                                         const paged_kv_view<const T>* k, const lse_view* lse,
                                                         window_options opt, segment_grid grid, segments rows,
                                                         float* scores, unsigned* d_status = nullptr,
                                                         cudaStream_t stream = 0) {
  static_assert(detail::is_score_element<T>::value, PREFIXKV_SCORE_ELEMENT_MESSAGE);
  if constexpr (detail::is_score_element<T>::value)
    return detail::window_attention_run<detail::window_policy>(d_temp, temp_bytes, q, k, lse, opt, grid, 0,
                                                               grid.layers, rows, scores, d_status, stream);
  else
    return cudaErrorInvalidValue;
}

// ------------------------------------------------------------------------------------------------------------
// Accumulated attention (the paper's scorer)
// ------------------------------------------------------------------------------------------------------------
namespace detail {
// Entry points that need no workspace (accumulated attention, key norm): the size query answers the minimum,
// the workspace is still checked, and `launch` stays false when there is nothing to do (a size query, no
// sequence, no row, or uniform rows of length 0).
inline cudaError_t no_workspace_begin(void* d_temp, size_t& temp_bytes, int64_t batch, const segments& rows,
                                      bool& launch) {
  launch = false;
  workspace_layout<1> ws;
  if (d_temp == nullptr) {
    temp_bytes = ws.bytes();
    return cudaSuccess;
  }
  PREFIXKV_TRY(ws.map(d_temp, temp_bytes));
  launch = batch > 0 && rows.count > 0 && !rows_all_empty(rows);
  return cudaSuccess;
}

}  // namespace detail
PREFIXKV_NAMESPACE_END

#include "detail/attention.cuh"

PREFIXKV_NAMESPACE_BEGIN

//! The paper's accumulated-attention scorer for one layer (device); bit-identical to `accumulated_attention_host`.
//! p: (batch, q_head, query, key) as a kv_view (heads = q heads, tokens = queries, dim = keys), any strides.
//! No workspace is needed (the size query returns the minimum, 256 bytes).
template <class T>
[[nodiscard]] inline cudaError_t accumulated_attention(void* d_temp, size_t& temp_bytes, kv_view<const T> p,
                                                       segment_grid grid, int64_t layer, segments rows, float* scores,
                                                       unsigned* d_status = nullptr, cudaStream_t stream = 0) {
  static_assert(detail::is_score_element<T>::value, PREFIXKV_SCORE_ELEMENT_MESSAGE);
  if constexpr (detail::is_score_element<T>::value)
    return detail::accumulated_attention_run<detail::attention_policy>(d_temp, temp_bytes, &p, grid, layer, 1, rows,
                                                                       scores, d_status, stream);
  else
    return cudaErrorInvalidValue;
}

//! The accumulated-attention scorer for all `grid.layers` layers in one launch; p: host array of grid.layers
//! per-layer views of device memory with equal extents and strides.
template <class T>
[[nodiscard]] inline cudaError_t accumulated_attention_layers(void* d_temp, size_t& temp_bytes,
                                                              const kv_view<const T>* p, segment_grid grid,
                                                              segments rows, float* scores,
                                                              unsigned* d_status = nullptr, cudaStream_t stream = 0) {
  static_assert(detail::is_score_element<T>::value, PREFIXKV_SCORE_ELEMENT_MESSAGE);
  if constexpr (detail::is_score_element<T>::value)
    return detail::accumulated_attention_run<detail::attention_policy>(d_temp, temp_bytes, p, grid, 0, grid.layers,
                                                                       rows, scores, d_status, stream);
  else
    return cudaErrorInvalidValue;
}

PREFIXKV_NAMESPACE_END

// ------------------------------------------------------------------------------------------------------------
// Key norm
// ------------------------------------------------------------------------------------------------------------
#include "detail/key_norm.cuh"

PREFIXKV_NAMESPACE_BEGIN

//! Key-norm scorer for one layer (device). k: (batch, kv_head, token capacity, dim). Values match `key_norm_host`
//! within fp32 rounding of the sum of squares (documented tolerance 1e-5 relative). No workspace is needed.
template <class T>
[[nodiscard]] inline cudaError_t key_norm(void* d_temp, size_t& temp_bytes, kv_view<const T> k, key_norm_options opt,
                                          segment_grid grid, int64_t layer, segments rows, float* scores,
                                          unsigned* d_status = nullptr, cudaStream_t stream = 0) {
  static_assert(detail::is_score_element<T>::value, PREFIXKV_SCORE_ELEMENT_MESSAGE);
  if constexpr (detail::is_score_element<T>::value)
    return detail::key_norm_run(d_temp, temp_bytes, &k, opt, grid, layer, 1, rows, scores, d_status, stream);
  else
    return cudaErrorInvalidValue;
}

//! The same with K in a paged cache (device pool and block table; page ids checked on the device:
//! `status_bad_page`, the token scores 0).
template <class T>
[[nodiscard]] inline cudaError_t key_norm(void* d_temp, size_t& temp_bytes, paged_kv_view<const T> k,
                                          key_norm_options opt, segment_grid grid, int64_t layer, segments rows,
                                          float* scores, unsigned* d_status = nullptr, cudaStream_t stream = 0) {
  static_assert(detail::is_score_element<T>::value, PREFIXKV_SCORE_ELEMENT_MESSAGE);
  if constexpr (detail::is_score_element<T>::value)
    return detail::key_norm_run(d_temp, temp_bytes, &k, opt, grid, layer, 1, rows, scores, d_status, stream);
  else
    return cudaErrorInvalidValue;
}

//! Key-norm scorer for all `grid.layers` layers in one launch; k: host array of grid.layers per-layer views of
//! device memory with equal extents and strides.
template <class T>
[[nodiscard]] inline cudaError_t key_norm_layers(void* d_temp, size_t& temp_bytes, const kv_view<const T>* k,
                                                 key_norm_options opt, segment_grid grid, segments rows,
                                                 float* scores, unsigned* d_status = nullptr,
                                                 cudaStream_t stream = 0) {
  static_assert(detail::is_score_element<T>::value, PREFIXKV_SCORE_ELEMENT_MESSAGE);
  if constexpr (detail::is_score_element<T>::value)
    return detail::key_norm_run(d_temp, temp_bytes, k, opt, grid, 0, grid.layers, rows, scores, d_status, stream);
  else
    return cudaErrorInvalidValue;
}

//! The same with K in a paged cache (one page pool per layer, one block table shared by the layers).
template <class T>
[[nodiscard]] inline cudaError_t key_norm_layers(void* d_temp, size_t& temp_bytes, const paged_kv_view<const T>* k,
                                                 key_norm_options opt, segment_grid grid, segments rows,
                                                 float* scores, unsigned* d_status = nullptr,
                                                 cudaStream_t stream = 0) {
  static_assert(detail::is_score_element<T>::value, PREFIXKV_SCORE_ELEMENT_MESSAGE);
  if constexpr (detail::is_score_element<T>::value)
    return detail::key_norm_run(d_temp, temp_bytes, k, opt, grid, 0, grid.layers, rows, scores, d_status, stream);
  else
    return cudaErrorInvalidValue;
}

PREFIXKV_NAMESPACE_END
