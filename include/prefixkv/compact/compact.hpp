//! \file prefixkv/compact/compact.hpp
//! Compaction of KV caches: move the kept rows of a `selection` (see select/selection.hpp) to the front of each
//! (layer, sequence, kv-head) row list — out of place (any layout to any layout) or in place — for all layers,
//! K and V (and optional quantisation scales) together.
//!
//! This header holds the public types, the host-side `can_implement` checks shared with the device entry points
//! and the host twins (`gather_kept_host`, `compact_in_place_host`). It compiles with any C++17 compiler. The
//! device entry points (`gather_kept`, `compact_in_place`) live in compact/compact.cuh.
//!
//! Semantics (host twin and device are byte-identical):
//! * Segment `s` of `sel` (numbered by `grid`: layer-major, then sequence, then kv-head when `grid.heads > 1`)
//!   keeps `k_s = sel.kept(s)` tokens whose source positions are `sel.row(s)[0 .. k_s)`.
//! * For every layer l, sequence b, kv-head h and tensor kind (K, V, K-scale, V-scale), row `j < k_s` of the
//!   destination becomes row `sel.row(s)[j]` of the source, s = grid.id(l, b) (shared lists, `grid.heads == 1`)
//!   or grid.id(l, b, h) (head-wise lists). Rows move as bytes; the element type only matters for strides.
//! * Nothing else in the destination is written: rows `>= k_s` keep their bytes (in place: their old contents).
//! * Paged destinations: row j of sequence b goes to logical token j of b's block table, i.e. the kept tokens
//!   fill the first ceil(k_s / page_size) pages; `pages_in_use[b]` = max over its segments of that number.
//!
//! \code
//! std::vector<prefixkv::kv_view<bf16>> k(L), v(L);            // per-layer views, [B, H, S, D] each
//! prefixkv::kv_layers<bf16> cache{k.data(), v.data(), nullptr, nullptr, L};
//! prefixkv::segment_grid grid{L, B, 1};                        // per-(layer, sequence) kept lists
//! prefixkv::compact_outputs out{h_lengths, h_cu, nullptr, nullptr};
//! if (prefixkv::compact_in_place_host(cache, sel, grid, out) != cudaSuccess) puts(prefixkv::last_error().message);
//! \endcode
#pragma once

#include "../core/checked.hpp"
#include "../core/error.hpp"
#include "../core/validate.hpp"
#include "../core/views.hpp"
#include "../select/selection.hpp"

#include <algorithm>
#include <climits>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

PREFIXKV_NAMESPACE_BEGIN

//! Largest number of layers one call moves (their pointers travel as kernel parameters).
inline constexpr int64_t compact_max_layers = 128;

//! All layers of a strided cache. Every array has `layers` entries in host memory (read during the call only);
//! all layers of one kind share extents and strides and differ only in their data pointer.
//! `S` is the scale element type (e.g. float); scales are views with `heads` == the K heads (per token and
//! head) or 1 (per token, shared by the heads), `dim` = scale elements per row.
template <class T, class S = float>
struct kv_layers {
  using element_type = T;
  using scale_type = S;
  const kv_view<T>* k = nullptr;        //!< (layers) K, each (batch, head, token, dim)
  const kv_view<T>* v = nullptr;        //!< (layers) V, each (batch, head, token, dim), or null (K-only caches)
  const kv_view<S>* k_scale = nullptr;  //!< (layers) K scales, each (batch, head or 1, token, n), or null
  const kv_view<S>* v_scale = nullptr;  //!< (layers) V scales, each (batch, head or 1, token, n), or null
  int64_t layers = 0;
};

//! All layers of a paged cache. The layers share page geometry (page size, strides, pool extent) and block-table
//! geometry (batch, max_blocks, row stride); their pages pointers differ (one pool per layer) or not (one pool shared
//! by the layers). Block tables: one shared by every layer (as in vLLM), or one per layer (each layer's own
//! `block_table` pointer: layers whose lengths differ after compression each keep and free their own pages). The
//! kinds (K, V, scales) of one layer always share that layer's table. Page ownership (a page twice where the
//! compaction writes, `reason::overlapping_buffers`) is checked per layer when every layer has its own pool, and
//! across layers when a pool is shared by several layers with per-layer tables (page ids are then one id space).
template <class T, class S = float>
struct paged_kv_layers {
  using element_type = T;
  using scale_type = S;
  const paged_kv_view<T>* k = nullptr;        //!< (layers) K pools (page, slot, head, dim) + block table
  const paged_kv_view<T>* v = nullptr;        //!< (layers) V pools, or null
  const paged_kv_view<S>* k_scale = nullptr;  //!< (layers) K scale pools (page, slot, head or 1, n), or null
  const paged_kv_view<S>* v_scale = nullptr;  //!< (layers) V scale pools, or null
  int64_t layers = 0;
};

//! Optional outputs (device memory for the device entry points, host memory for the host twins). Written only
//! when the call succeeds (device: when the device-side checks pass), except `status`.
struct compact_outputs {
  int32_t* lengths = nullptr;       //!< (S) kept tokens per segment (the new lengths)
  int32_t* cu_seqlens = nullptr;    //!< (layers, S / layers + 1) per-layer cu_seqlens of the compacted cache
  int32_t* pages_in_use = nullptr;  //!< (batch) pages per sequence still in use (paged destinations only)
  int32_t* status = nullptr;        //!< (1) 0, or the `reason` found by the device-side checks of the indices
};

//! How the device entry points treat the contents of device-resident inputs (offsets, indices, page ids).
enum class index_check : int {
  device = 0,   //!< a small check kernel runs first; the move kernel writes nothing when it found an error
  trusted = 1,  //!< skip it (inputs produced by prefixkv's own solver); invalid inputs are undefined behaviour
};

namespace detail {

inline constexpr int compact_kinds = 4;  // K, V, K-scale, V-scale

//! Byte geometry of one tensor kind (shared by all layers).
struct compact_geom {
  int64_t heads = 0, tokens = 0;                       // tokens: extent of a strided view (unused when paged)
  int64_t row_bytes = 0, elem_bytes = 0, s_dim = 0;    // s_dim: bytes between elements (non-contiguous rows)
  int64_t s_batch = 0, s_head = 0, s_token = 0;        // bytes; paged: s_batch = page stride, s_token = slot
  int32_t vec = 16;                                    // widest aligned access for this side
  bool contiguous = true;
  //! Byte offset, within a row, of byte `x` of the row's packed contents (x a multiple of the access width).
  PREFIXKV_HOST_DEVICE int64_t chunk(int64_t x) const {
    return contiguous ? x : (x / elem_bytes) * s_dim + x % elem_bytes;
  }
};

//! Row addressing of one side: strided, or through block tables (layer 0's in `table`; every layer's in
//! `compact_tables`, the same pointer for all layers when they share one table).
struct compact_table {
  const int32_t* table = nullptr;  // (batch, max_blocks), row stride `stride`: layer 0's table
  int64_t stride = 0, page_size = 1, num_pages = 0, max_blocks = 0;
  int32_t shift = -1;  // log2(page_size) when a power of two
  bool paged = false;
  PREFIXKV_HOST_DEVICE int64_t block_of(int64_t t) const { return shift >= 0 ? (t >> shift) : t / page_size; }
  PREFIXKV_HOST_DEVICE int64_t row(const compact_geom& g, int64_t b, int64_t h, int64_t t) const {
    if (!paged) return b * g.s_batch + h * g.s_head + t * g.s_token;
    const int64_t blk = block_of(t);
    const int64_t page = table[b * stride + blk];
    return page * g.s_batch + (t - blk * page_size) * g.s_token + h * g.s_head;
  }
  //! The same addressing through another layer's table.
  PREFIXKV_HOST_DEVICE compact_table with_table(const int32_t* t) const {
    compact_table c = *this;
    c.table = t;
    return c;
  }
};

//! How the check marks page ownership of a paged destination (or a paged cache compacted in place).
enum class compact_owner_mode : int32_t {
  shared_table = 0,  //!< one table for every layer: one owner word per page, key (sequence, block)
  per_layer = 1,     //!< per-layer tables, every layer its own pool: owner words per (layer, page), key (sequence, block)
  across_layers = 2, //!< per-layer tables, a pool shared by layers: one owner word per page, key (layer, sequence, block)
};

//! Everything the kernels need except the per-layer pointers.
struct compact_meta {
  compact_geom src[compact_kinds], dst[compact_kinds];
  compact_table st, dt;
  int32_t vec[compact_kinds] = {};          // access width per kind (min of both sides)
  int64_t lane_prefix[compact_kinds + 1] = {};  // lanes of kind k within one (layer, sequence): [prefix[k], prefix[k+1])
  int32_t kinds = 0;
  int64_t layers = 0, batch = 0;
  int64_t src_tokens = 0;    // valid source positions [0, src_tokens)
  int64_t dst_capacity = 0;  // rows per destination (layer, sequence, head)
  segment_grid grid;
  selection sel;
  bool inplace = false;
  bool paged_dst = false;
  int64_t nchunk = 1;  // work items per lane (move kernel)
  int64_t vchunk = 1;  // work items per segment (check kernel)
  compact_outputs out;
  const int32_t* vstatus = nullptr;  // per-block results of the check kernel (null: trusted)
  int32_t vblocks = 0;
  int32_t* owner = nullptr;          // (owner_words) page -> (b * max_blocks + block), duplicate detection
  compact_owner_mode owner_mode = compact_owner_mode::shared_table;
  PREFIXKV_HOST_DEVICE int64_t lanes_per_lb() const { return lane_prefix[kinds]; }
  //! Owner words the check needs (paged destinations): one per page, per layer and page in `per_layer` mode.
  PREFIXKV_HOST_DEVICE int64_t owner_words() const {
    return owner_mode == compact_owner_mode::per_layer ? layers * dt.num_pages : dt.num_pages;
  }
  //! Owner word and key of (layer l, sequence b, block blk) holding page `page`.
  PREFIXKV_HOST_DEVICE int64_t owner_slot(int64_t l, int64_t page) const {
    return owner_mode == compact_owner_mode::per_layer ? l * dt.num_pages + page : page;
  }
  PREFIXKV_HOST_DEVICE int64_t owner_key(int64_t l, int64_t b, int64_t blk) const {
    return (owner_mode == compact_owner_mode::across_layers ? l * batch + b : b) * dt.max_blocks + blk;
  }
  PREFIXKV_HOST_DEVICE int64_t lanes() const { return layers * batch * lane_prefix[kinds]; }
};

//! Per-layer block tables of both sides (paged sides; the same pointer in every entry when the layers share one).
struct compact_tables {
  const int32_t* src[compact_max_layers];
  const int32_t* dst[compact_max_layers];
};

//! Per-layer base pointers, (layer, kind), and the per-layer block tables.
struct compact_ptrs {
  char* src[compact_max_layers][compact_kinds];
  char* dst[compact_max_layers][compact_kinds];
  compact_tables tab;
};

inline bool compact_pow2_shift(int64_t x, int32_t& shift) {
  shift = -1;
  if (x <= 0 || (x & (x - 1)) != 0) return false;
  int32_t s = 0;
  while ((int64_t(1) << s) < x) ++s;
  shift = s;
  return true;
}

//! Host-side description of one side (one cache) before it becomes part of a `compact_meta`. Fixed-size (no
//! allocation): at most `compact_max_layers` layers of `compact_kinds` kinds.
struct compact_side {
  compact_geom g[compact_kinds];
  bool present[compact_kinds] = {};
  compact_table t;
  const int32_t* tables[compact_max_layers] = {};  // paged: every layer's block table (kind K)
  bool shared_table = true;                         // paged: every layer has the same table
  int64_t batch = 0, tokens = 0;  // tokens: strided extent, or max_blocks * page_size
  int64_t layers = 0;
  // the memory of every (layer, kind): the kind's byte box (base 0) placed at ptr[kind][layer]
  byte_box box[compact_kinds];
  char* ptr[compact_kinds][compact_max_layers] = {};
  byte_box box_at(int kind, int64_t layer) const noexcept {
    byte_box b = box[kind];
    b.base = reinterpret_cast<std::uintptr_t>(ptr[kind][layer]);
    return b;
  }
};

//! Fill the byte geometry of one tensor kind and record every layer's pointer.
//! `ext`/`str` (elements) are in (outer, head, token-or-slot, dim) order: (batch, head, token, dim) for strided
//! views, (page, head, slot, dim) for paged pools. `data_of(view)` gives a layer's base pointer. The views passed
//! `validate`, so every byte stride and span below fits int64.
template <class View, class DataOf>
void compact_fill_geom(compact_side& side, int kind, size_t elem_size, int64_t heads, int64_t tokens, int64_t dim,
                       bool contiguous, const int64_t (&ext)[4], const int64_t (&str)[4], const View* views,
                       int64_t layers, DataOf data_of) noexcept {
  const int64_t e = static_cast<int64_t>(elem_size);
  compact_geom& g = side.g[kind];
  g.heads = heads;
  g.tokens = tokens;
  g.row_bytes = dim * e;
  g.contiguous = contiguous;
  g.elem_bytes = g.contiguous ? g.row_bytes : e;
  g.s_batch = str[0] * e;
  g.s_head = str[1] * e;
  g.s_token = str[2] * e;
  g.s_dim = str[3] * e;
  int64_t vec = common_pow2(16, {g.contiguous ? g.row_bytes : e, ext[0] > 1 ? g.s_batch : 0,
                                 ext[1] > 1 ? g.s_head : 0, ext[2] > 1 ? g.s_token : 0, g.contiguous ? 0 : g.s_dim});
  side.box[kind] = make_byte_box(nullptr, ext, str, e);
  side.layers = layers;
  for (int64_t l = 0; l < layers; ++l) {
    char* p = reinterpret_cast<char*>(const_cast<void*>(static_cast<const void*>(data_of(views[l]))));
    side.ptr[kind][l] = p;
    vec = common_pow2(vec, {static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(p) % 16)});
  }
  g.vec = static_cast<int32_t>(vec);
  side.present[kind] = true;
}

//! One (layer, kind) tensor of one side, for the aliasing checks: its first byte and who it is.
struct compact_piece {
  std::uintptr_t lo = 0;
  int32_t side = 0, code = 0;  // side: 0 = read only (out-of-place source), 1 = written; code = kind * 128 + layer
};

//! Aliasing checks with the byte-box rule of `byte_boxes_disjoint` (core/validate.hpp). In place (`dst` null):
//! every pair of (layer, kind) tensors of the cache must be disjoint. Out of place: every destination pair, and
//! every (source, destination) pair (sources may share memory among themselves: they are only read). One exception:
//! layers with their own block tables may share one pool of a kind (the same pages pointer); their pages are one id
//! space then, and the content check finds a page owned by two layers (`compact_owner_mode::across_layers`).
//! Sort and sweep over the byte ranges, so tensors in separate allocations cost O(n log n); only pairs whose
//! ranges intersect run the strided test. No allocation (at most 2 x 128 x 4 pieces, 16 KiB on the stack).
inline cudaError_t compact_check_aliasing(const compact_side& src, const compact_side* dst) noexcept {
  static_assert(compact_max_layers == 128, "compact_piece::code packs the layer in 7 bits");
  compact_piece pieces[2 * compact_kinds * compact_max_layers];
  int64_t n = 0;
  const compact_side* sides[2] = {&src, dst};
  for (int sd = 0; sd < 2; ++sd) {
    if (sides[sd] == nullptr) continue;
    const compact_side& c = *sides[sd];
    for (int k = 0; k < compact_kinds; ++k) {
      if (!c.present[k] || c.box[k].span == 0) continue;
      for (int64_t l = 0; l < c.layers; ++l) {
        compact_piece& p = pieces[n++];
        p.lo = reinterpret_cast<std::uintptr_t>(c.ptr[k][l]);
        p.side = dst ? sd : 1;  // in place the cache is written
        p.code = static_cast<int32_t>(k * compact_max_layers + l);
      }
    }
  }
  auto box_of = [&](const compact_piece& p) {
    return sides[dst ? p.side : 0]->box_at(p.code / compact_max_layers, p.code % compact_max_layers);
  };
  std::sort(pieces, pieces + n, [](const compact_piece& a, const compact_piece& b) { return a.lo < b.lo; });
  for (int64_t i = 0; i < n; ++i) {
    const byte_box a = box_of(pieces[i]);
    const std::uintptr_t a_end = a.base + static_cast<std::uintptr_t>(a.span);  // no wrap: validated
    for (int64_t j = i + 1; j < n && pieces[j].lo < a_end; ++j) {
      if (pieces[i].side == 0 && pieces[j].side == 0) continue;  // two sources
      if (pieces[i].side == pieces[j].side && pieces[i].lo == pieces[j].lo &&
          pieces[i].code / compact_max_layers == pieces[j].code / compact_max_layers) {
        const compact_side& c = *sides[dst ? pieces[i].side : 0];
        if (c.t.paged && !c.shared_table) continue;  // one pool of this kind, per-layer tables: pages checked
      }
      if (byte_boxes_disjoint(a, box_of(pieces[j]))) continue;
      if (pieces[i].side != pieces[j].side)
        return fail(reason::overlapping_buffers, "compact: source and destination memory overlap");
      return fail(reason::overlapping_buffers,
                  dst ? "compact: two destination tensors (layers or K/V/scales) share memory"
                      : "compact: two tensors of the cache (layers or K/V/scales) share memory; in-place compaction "
                        "would corrupt them");
    }
  }
  return cudaSuccess;
}

template <class T>
cudaError_t compact_describe(const kv_view<T>* views, int64_t layers, int kind, compact_side& side) {
  const kv_view<T>& v0 = views[0];
  for (int64_t l = 0; l < layers; ++l) {
    const kv_view<T>& v = views[l];
    PREFIXKV_TRY(validate(v));
    if (v.batch != v0.batch || v.heads != v0.heads || v.tokens != v0.tokens || v.dim != v0.dim ||
        v.stride_batch != v0.stride_batch || v.stride_head != v0.stride_head || v.stride_token != v0.stride_token ||
        v.stride_dim != v0.stride_dim)
      return fail(reason::shape_mismatch, "compact: the layers of one tensor kind differ in extents or strides");
  }
  compact_fill_geom(side, kind, sizeof(T), v0.heads, v0.tokens, v0.dim, v0.rows_contiguous(),
                    {v0.batch, v0.heads, v0.tokens, v0.dim},
                    {v0.stride_batch, v0.stride_head, v0.stride_token, v0.stride_dim}, views, layers,
                    [](const kv_view<T>& v) { return v.data; });
  if (kind == 0) {
    side.batch = v0.batch;
    side.tokens = v0.tokens;
  } else if (v0.batch != side.batch || v0.tokens != side.tokens) {
    return fail(reason::shape_mismatch, "compact: K, V and scales disagree on batch or tokens");
  }
  return cudaSuccess;
}

template <class T>
cudaError_t compact_describe(const paged_kv_view<T>* views, int64_t layers, int kind, compact_side& side) {
  const paged_kv_view<T>& v0 = views[0];
  for (int64_t l = 0; l < layers; ++l) {
    const paged_kv_view<T>& v = views[l];
    PREFIXKV_TRY(validate(v));
    if (v.num_pages != v0.num_pages || v.page_size != v0.page_size || v.heads != v0.heads || v.dim != v0.dim ||
        v.stride_page != v0.stride_page || v.stride_slot != v0.stride_slot || v.stride_head != v0.stride_head ||
        v.stride_dim != v0.stride_dim || v.batch != v0.batch || v.max_blocks != v0.max_blocks ||
        v.block_table_stride != v0.block_table_stride)
      return fail(reason::shape_mismatch,
                  "compact: the layers of one paged tensor kind differ in page or block-table geometry");
    if (kind == 0) {
      side.tables[l] = v.block_table;
      if (v.block_table != v0.block_table) side.shared_table = false;
    } else if (v.block_table != side.tables[l]) {
      return fail(reason::shape_mismatch, "compact: K, V and scales of a paged layer must share that layer's block table");
    }
  }
  compact_fill_geom(side, kind, sizeof(T), v0.heads, v0.max_blocks * v0.page_size, v0.dim, v0.rows_contiguous(),
                    {v0.num_pages, v0.heads, v0.page_size, v0.dim},
                    {v0.stride_page, v0.stride_head, v0.stride_slot, v0.stride_dim}, views, layers,
                    [](const paged_kv_view<T>& v) { return v.pages; });
  compact_table t;
  t.paged = true;
  t.table = v0.block_table;
  t.stride = v0.block_table_stride;
  t.page_size = v0.page_size;
  // page ids are int32: pages past 2^31 can never be named, so the range checks (and the device's page-owner
  // table, sized by this) need at most 2^31 pages
  t.num_pages = v0.num_pages < (int64_t(1) << 31) ? v0.num_pages : (int64_t(1) << 31);
  t.max_blocks = v0.max_blocks;
  compact_pow2_shift(v0.page_size, t.shift);
  if (kind == 0) {
    side.t = t;
    side.batch = v0.batch;
    side.tokens = v0.max_blocks * v0.page_size;
  } else if (t.stride != side.t.stride || t.page_size != side.t.page_size || t.num_pages != side.t.num_pages ||
             t.max_blocks != side.t.max_blocks || v0.batch != side.batch) {
    return fail(reason::shape_mismatch, "compact: K, V and scales of a paged cache must share one block-table geometry");
  }
  if (v0.batch > 0 && v0.max_blocks > 0 && v0.batch * v0.max_blocks >= (int64_t(1) << 31))
    return fail(reason::bad_parameter, "compact: batch * max_blocks must be < 2^31");
  return cudaSuccess;
}

template <class Cache>
cudaError_t compact_describe_cache(const Cache& c, compact_side& side) {
  if (c.layers < 0) return fail(reason::negative_extent, "compact: layers is negative");
  if (c.layers > compact_max_layers) return fail(reason::unsupported, "compact: more than compact_max_layers layers");
  if (c.layers == 0) return cudaSuccess;
  if (c.k == nullptr) return fail(reason::null_pointer, "compact: the K view array is null");
  PREFIXKV_TRY(compact_describe(c.k, c.layers, 0, side));
  if (c.v) PREFIXKV_TRY(compact_describe(c.v, c.layers, 1, side));
  if (c.k_scale) PREFIXKV_TRY(compact_describe(c.k_scale, c.layers, 2, side));
  if (c.v_scale) PREFIXKV_TRY(compact_describe(c.v_scale, c.layers, 3, side));
  if (c.v && side.g[1].heads != side.g[0].heads)
    return fail(reason::shape_mismatch, "compact: K and V have different head counts");
  for (int k = 2; k < compact_kinds; ++k)
    if (side.present[k] && side.g[k].heads != side.g[0].heads && side.g[k].heads != 1)
      return fail(reason::shape_mismatch, "compact: scales must have the K head count or 1 head");
  if (side.t.paged && !side.shared_table) {
    const int64_t keys = c.layers * side.batch;  // across-layer keys: (layer, sequence, block)
    if (keys > 0 && side.t.max_blocks > 0 && keys > (int64_t(1) << 31) / side.t.max_blocks)
      return fail(reason::bad_parameter, "compact: layers * batch * max_blocks must be < 2^31 with per-layer tables");
  }
  return cudaSuccess;
}

//! The optional outputs are written, and the selection offsets and the block tables (every layer's) read, while
//! the tensors move: the outputs may not share memory with any tensor, with each other, with the selection offsets
//! or the tables; the offsets and the tables may not share memory with a written tensor (byte ranges from their
//! known extents: S + 1 offsets, a table's (batch - 1) * stride + max_blocks entries). The selection's indices are
//! not checked (their extent is known only from device-resident offsets). Output values are int32: a per-layer kept
//! total that could exceed INT32_MAX is refused. Sort and sweep over the byte ranges (O(n log n), no allocation:
//! at most 5 + 2 x 128 tables + 2 x 128 x 4 tensors, 31 KiB on the stack).
inline cudaError_t compact_check_io(const compact_side& src, const compact_side& written, const selection& sel,
                                    const compact_outputs& out) noexcept {
  const int64_t S = sel.count, L = written.layers;
  enum : int32_t { io_out = 0, io_meta = 1, io_written = 2, io_read = 3 };  // what a range is
  struct range {
    std::uintptr_t lo, n;
    int32_t what;
  };
  range r[5 + 2 * compact_max_layers + 2 * compact_kinds * compact_max_layers];
  int64_t nr = 0;
  auto add = [&](const void* p, int64_t bytes, int32_t what) {
    if (p != nullptr && bytes > 0)
      r[nr++] = {reinterpret_cast<std::uintptr_t>(p), static_cast<std::uintptr_t>(bytes), what};
  };
  auto table_bytes = [](const compact_side& c) -> int64_t {  // validated: fits int64
    return c.t.paged && c.batch > 0 && c.t.max_blocks > 0 ? ((c.batch - 1) * c.t.stride + c.t.max_blocks) * 4 : 0;
  };
  const int64_t spl = L > 0 ? S / L : 0;
  // S, L and batch are bounded by validated views and the grid check, so these byte counts fit int64
  add(out.lengths, S * 4, io_out);
  add(out.cu_seqlens, L * (spl + 1) * 4, io_out);
  add(out.pages_in_use, written.batch * 4, io_out);
  add(out.status, 4, io_out);
  add(sel.offsets, (S + 1) * 8, io_meta);
  const bool two = &src != &written;
  for (int side = 0; side < (two ? 2 : 1); ++side) {
    const compact_side& c = side == 0 ? written : src;
    if (c.t.paged)
      for (int64_t l = 0; l < L; ++l)
        if (l == 0 || c.tables[l] != c.tables[l - 1]) add(c.tables[l], table_bytes(c), io_meta);
    // outputs against every tensor (the device may write them while sources are still read), the read-only
    // metadata against the written tensors
    for (int k = 0; k < compact_kinds; ++k)
      if (c.present[k] && c.box[k].span > 0)
        for (int64_t l = 0; l < L; ++l) add(c.ptr[k][l], c.box[k].span, side == 0 ? io_written : io_read);
  }
  std::sort(r, r + nr, [](const range& a, const range& b) {
    return a.lo != b.lo ? a.lo < b.lo : a.n != b.n ? a.n < b.n : a.what < b.what;
  });
  // tensors at the same place (a pool shared by layers) count once
  nr = std::unique(r, r + nr, [](const range& a, const range& b) {
         return a.what >= io_written && a.lo == b.lo && a.n == b.n && a.what == b.what;
       }) - r;
  for (int64_t i = 0; i < nr; ++i)
    for (int64_t j = i + 1; j < nr && r[j].lo - r[i].lo < r[i].n; ++j) {  // sorted: r[j].lo >= r[i].lo
      const int32_t a = std::min(r[i].what, r[j].what), b = std::max(r[i].what, r[j].what);
      if (a == io_out)
        return fail(reason::overlapping_buffers,
                    b >= io_written ? "compact: an output array overlaps a tensor of the cache"
                                    : "compact: an output array overlaps another output, the selection offsets or a "
                                      "block table");
      if (a == io_meta && b == io_written)
        return fail(reason::overlapping_buffers,
                    "compact: the selection offsets or a block table lie in memory the call writes");
    }
  if ((out.lengths || out.cu_seqlens) && L > 0 &&
      (written.tokens > INT32_MAX || !(checked_i64(spl) * written.tokens).ok() ||
       (out.cu_seqlens && spl * written.tokens > INT32_MAX)))
    return fail(reason::out_of_range, "compact: kept counts could exceed the int32 range of lengths / cu_seqlens");
  return cudaSuccess;
}

//! Ownership check mode of a paged side (see `compact_owner_mode`): per layer when no two layers share a pool of
//! any kind, across layers otherwise.
inline compact_owner_mode compact_owner_of(const compact_side& side) noexcept {
  if (!side.t.paged || side.shared_table) return compact_owner_mode::shared_table;
  std::uintptr_t p[compact_max_layers];
  for (int k = 0; k < compact_kinds; ++k) {
    if (!side.present[k]) continue;
    for (int64_t l = 0; l < side.layers; ++l) p[l] = reinterpret_cast<std::uintptr_t>(side.ptr[k][l]);
    std::sort(p, p + side.layers);
    if (std::adjacent_find(p, p + side.layers) != p + side.layers) return compact_owner_mode::across_layers;
  }
  return compact_owner_mode::per_layer;
}

//! The host half of `can_implement`: shapes, strides, grid, selection shape, overlap. Fills `m` and the pointer
//! table. Touches no memory but the views' descriptions (no device-resident contents).
template <class SrcCache, class DstCache>
cudaError_t compact_plan(const SrcCache& src, const DstCache& dst, bool inplace, const selection& sel,
                         const segment_grid& grid, const compact_outputs& out, compact_meta& m, compact_ptrs* ptrs) {
  using src_t = typename std::remove_pointer_t<decltype(src.k)>::element_type;
  using dst_t = typename std::remove_pointer_t<decltype(dst.k)>::element_type;
  using src_s = typename std::remove_pointer_t<decltype(src.k_scale)>::element_type;
  using dst_s = typename std::remove_pointer_t<decltype(dst.k_scale)>::element_type;
  static_assert(sizeof(src_t) == sizeof(dst_t) && sizeof(src_s) == sizeof(dst_s),
                "compact: source and destination element sizes differ");
  if (src.layers != dst.layers) return fail(reason::shape_mismatch, "compact: source and destination layer counts differ");
  m = compact_meta{};
  compact_side s, d;
  PREFIXKV_TRY(compact_describe_cache(src, s));
  if (!inplace) PREFIXKV_TRY(compact_describe_cache(dst, d));
  const compact_side& dd = inplace ? s : d;
  if (grid.layers < 0 || grid.batch < 0 || grid.heads < 1)
    return fail(reason::negative_extent, "compact: segment_grid extents must be >= 0 (heads >= 1)");
  if (grid.layers != src.layers) return fail(reason::shape_mismatch, "compact: grid.layers != cache layers");
  if (src.layers > 0 && grid.batch != s.batch) return fail(reason::shape_mismatch, "compact: grid.batch != cache batch");
  if (src.layers > 0 && grid.heads != 1 && grid.heads != s.g[0].heads)
    return fail(reason::shape_mismatch, "compact: grid.heads must be 1 (shared lists) or the kv-head count");
  if (!(checked_i64(grid.layers) * grid.batch * grid.heads).ok())
    return fail(reason::out_of_range, "compact: segment_grid count (layers * batch * heads) overflows int64");
  if (sel.count != grid.count()) return fail(reason::shape_mismatch, "compact: selection.count != grid.count()");
  if (sel.count > 0 && sel.offsets == nullptr) return fail(reason::null_pointer, "compact: selection.offsets is null");
  if (sel.count > 0 && sel.indices == nullptr) return fail(reason::null_pointer, "compact: selection.indices is null");
  if (grid.heads > 1)
    for (int k = 2; k < compact_kinds; ++k)
      if (s.present[k] && s.g[k].heads != grid.heads)
        return fail(reason::shape_mismatch, "compact: head-wise lists need per-head scales");
  if (!inplace && src.layers > 0) {
    if (d.batch != s.batch) return fail(reason::shape_mismatch, "compact: source and destination batch differ");
    for (int k = 0; k < compact_kinds; ++k) {
      if (s.present[k] != d.present[k])
        return fail(reason::shape_mismatch, "compact: source and destination carry different tensor kinds");
      if (s.present[k] && (s.g[k].heads != d.g[k].heads || s.g[k].row_bytes != d.g[k].row_bytes))
        return fail(reason::shape_mismatch, "compact: source and destination rows differ (heads or row bytes)");
    }
  }
  if (src.layers > 0) PREFIXKV_TRY(compact_check_aliasing(s, inplace ? nullptr : &d));
  if (src.layers > 0) PREFIXKV_TRY(compact_check_io(s, inplace ? s : d, sel, out));
  if (out.pages_in_use && !dd.t.paged)
    return fail(reason::bad_parameter, "compact: pages_in_use needs a paged destination");
  // Fill the plan.
  int32_t kinds = 0;
  int64_t prefix = 0;
  for (int k = 0; k < compact_kinds; ++k) {
    if (!s.present[k]) continue;
    m.src[kinds] = s.g[k];
    m.dst[kinds] = dd.g[k];
    const int64_t w = std::min<int64_t>(s.g[k].vec, dd.g[k].vec);
    // the access width must also divide the element size for strided rows
    m.vec[kinds] = static_cast<int32_t>(common_pow2(w, {s.g[k].elem_bytes, dd.g[k].elem_bytes}));
    m.lane_prefix[kinds] = prefix;
    prefix += s.g[k].heads;
    if (ptrs)
      for (int64_t l = 0; l < src.layers; ++l) {
        ptrs->src[l][kinds] = s.ptr[k][l];
        ptrs->dst[l][kinds] = dd.ptr[k][l];
      }
    ++kinds;
  }
  if (ptrs)
    for (int64_t l = 0; l < src.layers; ++l) {
      ptrs->tab.src[l] = s.t.paged ? s.tables[l] : nullptr;
      ptrs->tab.dst[l] = dd.t.paged ? dd.tables[l] : nullptr;
    }
  m.lane_prefix[kinds] = prefix;
  m.kinds = kinds;
  m.st = s.t;
  m.dt = dd.t;
  m.layers = src.layers;
  m.batch = src.layers > 0 ? s.batch : 0;
  m.src_tokens = s.tokens;
  m.dst_capacity = dd.tokens;
  m.grid = grid;
  m.sel = sel;
  m.inplace = inplace;
  m.paged_dst = dd.t.paged;
  m.owner_mode = compact_owner_of(dd);
  m.out = out;
  return cudaSuccess;
}

inline void compact_mark_error(int32_t& err, reason r) {
  if (err == 0) err = static_cast<int32_t>(r);
}

//! Host version of the device-side content checks (the selection must be in host memory, as must block tables).
//! Range, order and capacity problems are found in one pass; pages named twice are found afterwards by sorting
//! the (owner slot, owner key) pairs met (slot: the page, or (layer, page) in `per_layer` mode; key: see
//! `compact_meta::owner_key`), so the scratch grows with the selection, never with the page pool.
inline reason compact_check_host(const compact_meta& m, const compact_tables& tab) {
  const int64_t S = m.sel.count;
  if (S == 0) return reason::none;
  struct owner_pair {
    int64_t slot, key;
  };
  std::vector<owner_pair> owners;
  auto mark = [&](int64_t l, int64_t b, int64_t blk) -> reason {
    const int64_t page = tab.dst[l][b * m.dt.stride + blk];
    if (page < 0 || page >= m.dt.num_pages) return reason::out_of_range;
    const int64_t slot = m.owner_slot(l, page), key = m.owner_key(l, b, blk);
    if (owners.empty() || owners.back().slot != slot || owners.back().key != key) owners.push_back({slot, key});
    return reason::none;
  };
  if (m.sel.offsets[0] != 0) return reason::out_of_range;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t off = m.sel.offsets[s], end = m.sel.offsets[s + 1];
    if (end < off) return reason::out_of_range;
    const int64_t kept = end - off;  // (off >= 0 by induction from offsets[0] == 0)
    if (kept > m.dst_capacity) return reason::capacity_exceeded;
    const int64_t b = m.grid.batch_of(s), l = m.grid.layer_of(s);
    for (int64_t p = 0; p < kept; ++p) {
      const int64_t t = m.sel.indices[off + p];
      if (t < 0 || t >= m.src_tokens) return reason::out_of_range;
      if (m.inplace && p > 0 && m.sel.indices[off + p - 1] >= t) return reason::not_ascending;
      if (m.st.paged) {
        const int64_t blk = m.st.block_of(t);
        const int64_t page = tab.src[l][b * m.st.stride + blk];
        if (page < 0 || page >= m.st.num_pages) return reason::out_of_range;
        if (m.inplace) {
          const reason r = mark(l, b, blk);
          if (r != reason::none) return r;
        }
      }
      if (m.paged_dst && p % m.dt.page_size == 0) {
        const reason r = mark(l, b, m.dt.block_of(p));
        if (r != reason::none) return r;
      }
    }
  }
  std::sort(owners.begin(), owners.end(), [](const owner_pair& x, const owner_pair& y) {
    return x.slot != y.slot ? x.slot < y.slot : x.key < y.key;
  });
  for (size_t i = 1; i < owners.size(); ++i)
    if (owners[i].slot == owners[i - 1].slot && owners[i].key != owners[i - 1].key) return reason::overlapping_buffers;
  return reason::none;
}

//! Writes lengths / cu_seqlens / pages_in_use (host memory) from a host selection.
inline void compact_outputs_host(const compact_meta& m) {
  const int64_t S = m.sel.count;
  if (m.out.lengths)
    for (int64_t s = 0; s < S; ++s) m.out.lengths[s] = static_cast<int32_t>(m.sel.kept(s));
  if (m.out.cu_seqlens && m.layers > 0) {
    const int64_t spl = S / m.layers;
    for (int64_t l = 0; l < m.layers; ++l)
      for (int64_t j = 0; j <= spl; ++j)
        m.out.cu_seqlens[l * (spl + 1) + j] =
            static_cast<int32_t>(m.sel.offsets[l * spl + j] - m.sel.offsets[l * spl]);
  }
  if (m.out.pages_in_use)
    for (int64_t b = 0; b < m.batch; ++b) {
      int64_t mx = 0;
      for (int64_t l = 0; l < m.layers; ++l)
        for (int64_t h = 0; h < m.grid.heads; ++h) {
          const int64_t k = m.sel.kept(m.grid.id(l, b, h));
          mx = std::max(mx, (k + m.dt.page_size - 1) / m.dt.page_size);
        }
      m.out.pages_in_use[b] = static_cast<int32_t>(mx);
    }
}

//! The move itself, sequentially: lanes in order, rows ascending, element chunks via memmove (so an in-place row
//! that stays where it is, or moves down, is copied exactly as the device does).
inline void compact_move_host(const compact_meta& m, const compact_ptrs& p) {
  for (int64_t l = 0; l < m.layers; ++l) {
    const compact_table st = m.st.with_table(p.tab.src[l]), dt = m.dt.with_table(p.tab.dst[l]);
    for (int64_t b = 0; b < m.batch; ++b)
      for (int32_t k = 0; k < m.kinds; ++k) {
        const compact_geom& sg = m.src[k];
        const compact_geom& dg = m.dst[k];
        if (sg.row_bytes == 0) continue;  // nothing to move (and the views may be empty with any pointer)
        const int64_t unit = sg.contiguous && dg.contiguous ? sg.row_bytes : std::min(sg.elem_bytes, dg.elem_bytes);
        for (int64_t h = 0; h < sg.heads; ++h) {
          const int64_t seg = m.grid.heads == 1 ? m.grid.id(l, b) : m.grid.id(l, b, h);
          const int64_t off = m.sel.offsets[seg], kept = m.sel.kept(seg);
          for (int64_t j = 0; j < kept; ++j) {
            const int64_t t = m.sel.indices[off + j];
            const char* sr = p.src[l][k] + st.row(sg, b, h, t);
            char* dr = p.dst[l][k] + dt.row(dg, b, h, j);
            for (int64_t x = 0; unit > 0 && x < sg.row_bytes; x += unit)
              std::memmove(dr + dg.chunk(x), sr + sg.chunk(x), static_cast<size_t>(unit));
          }
        }
      }
  }
}

template <class SrcCache, class DstCache>
cudaError_t compact_host_run(const SrcCache& src, const DstCache& dst, bool inplace, const selection& sel,
                             const segment_grid& grid, const compact_outputs& out) noexcept {
  try {
    compact_meta m;
    std::unique_ptr<compact_ptrs> ptrs(new compact_ptrs);
    PREFIXKV_TRY(compact_plan(src, dst, inplace, sel, grid, out, m, ptrs.get()));
    const reason r = compact_check_host(m, ptrs->tab);
    if (out.status) *out.status = static_cast<int32_t>(r);
    switch (r) {
      case reason::none: break;
      case reason::out_of_range: return fail(r, "compact: an offset, index or page id is out of range");
      case reason::not_ascending: return fail(r, "compact: in-place compaction needs strictly ascending indices");
      case reason::capacity_exceeded: return fail(r, "compact: a segment keeps more tokens than the destination holds");
      case reason::overlapping_buffers: return fail(r, "compact: a page appears twice in the destination block table");
      default: return fail(r, "compact: invalid selection");
    }
    compact_move_host(m, *ptrs);
    compact_outputs_host(m);
    return cudaSuccess;
  } catch (...) {
    return fail(reason::capacity_exceeded, "compact: out of host memory", cudaErrorMemoryAllocation);
  }
}

}  // namespace detail

//! Host twin of `gather_kept`: copies the kept rows of `src` to the front of `dst` (both host memory).
//! `Src`/`Dst` are `kv_layers<T, S>` or `paged_kv_layers<T, S>` (any combination, same row sizes).
//! Rejects (cudaErrorInvalidValue, nothing written) bad shapes, overlapping source and destination, offsets,
//! indices or page ids out of range (`reason::out_of_range`), kept > destination capacity
//! (`reason::capacity_exceeded`), a page used twice in a paged destination (`reason::overlapping_buffers`).
//! \code
//! prefixkv::kv_layers<uint16_t> src{k.data(), v.data(), nullptr, nullptr, L}, dst{k2.data(), v2.data(), nullptr, nullptr, L};
//! PREFIXKV_TRY(prefixkv::gather_kept_host(src, dst, sel, prefixkv::segment_grid{L, B, 1}, {}));
//! \endcode
template <class Src, class Dst>
[[nodiscard]] cudaError_t gather_kept_host(const Src& src, const Dst& dst, const selection& sel,
                                           const segment_grid& grid, const compact_outputs& out = {}) noexcept {
  return detail::compact_host_run(src, dst, false, sel, grid, out);
}

//! Host twin of `compact_in_place`: order-preserving compaction of `cache` in its own memory. Indices must be
//! strictly ascending (`reason::not_ascending` otherwise). Paged caches: kept tokens are packed into the first
//! ceil(kept / page_size) pages of each sequence's block table; `out.pages_in_use` receives the page counts.
//! Pages of the touched block-table prefix must be distinct (`reason::overlapping_buffers`).
//! \code
//! prefixkv::paged_kv_layers<uint16_t> cache{k.data(), v.data(), nullptr, nullptr, L};
//! PREFIXKV_TRY(prefixkv::compact_in_place_host(cache, sel, grid, {nullptr, nullptr, pages_in_use}));
//! \endcode
template <class Cache>
[[nodiscard]] cudaError_t compact_in_place_host(const Cache& cache, const selection& sel, const segment_grid& grid,
                                                const compact_outputs& out = {}) noexcept {
  return detail::compact_host_run(cache, cache, true, sel, grid, out);
}

PREFIXKV_NAMESPACE_END
