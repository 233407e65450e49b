//! \file prefixkv/core/views.hpp
//! Non-owning views of KV caches and of ragged score rows.
//!
//! All views are trivially copyable aggregates, passed to kernels by value. Extents and strides are `int64_t`,
//! strides count elements (not bytes), and every offset is computed in 64-bit arithmetic.
//!
//! * `kv_view<T>`        — a strided 4-D cache `(batch, head, token, dim)`: any order in memory ([B,H,S,D] as in
//!                          HF transformers, [B,S,H,D], K and V interleaved, padded rows ...).
//! * `paged_kv_view<T>`  — a paged cache: a pool of pages addressed through a per-sequence block table, with the
//!                          `NHD` (page, slot, head, dim) and `HND` (page, head, slot, dim) layouts of vLLM and
//!                          FlashInfer, or any other strides.
//! * `segments`          — ragged rows of per-token values (scores, curves, kept indices): row `s` occupies
//!                          `[begin(s), begin(s) + length(s))` of a flat buffer.
//!
//! \code
//! // HF-style cache of one layer: float16 keys [B=2, H=8, S=4096, D=128], contiguous.
//! auto k = prefixkv::make_kv_view_bhsd(d_keys, 2, 8, 4096, 128);
//! // The same cache stored [B, S, H, D]:
//! auto k2 = prefixkv::make_kv_view_bshd(d_keys, 2, 4096, 8, 128);
//! // K and V interleaved per token as [B, S, 2, H, D]: V starts H*D elements after K.
//! auto kk = prefixkv::make_kv_view(d_kv, 2, 8, 4096, 128, /*strides b,h,t,d*/ 4096 * 2 * 8 * 128, 128, 2 * 8 * 128, 1);
//! auto vv = prefixkv::make_kv_view(d_kv + 8 * 128, 2, 8, 4096, 128, 4096 * 2 * 8 * 128, 128, 2 * 8 * 128, 1);
//! \endcode
#pragma once

#include "config.hpp"

#if __has_include(<cuda/std/mdspan>)
#include <cuda/std/mdspan>
#define PREFIXKV_HAS_MDSPAN 1
#else
#define PREFIXKV_HAS_MDSPAN 0
#endif

PREFIXKV_NAMESPACE_BEGIN

// ---------------------------------------------------------------------------------------------------------------
// Strided 4-D view
// ---------------------------------------------------------------------------------------------------------------

//! A strided view of one KV tensor. Shape `(batch, head, token, dim)`; strides in elements, any order.
template <class T>
struct kv_view {
  using element_type = T;
  T* data = nullptr;
  int64_t batch = 0, heads = 0, tokens = 0, dim = 0;                          // extents
  int64_t stride_batch = 0, stride_head = 0, stride_token = 0, stride_dim = 1;  // in elements

  //! Element offset of (b, h, t, d) from `data`.
  PREFIXKV_HOST_DEVICE int64_t offset(int64_t b, int64_t h, int64_t t, int64_t d) const {
    return b * stride_batch + h * stride_head + t * stride_token + d * stride_dim;
  }
  PREFIXKV_HOST_DEVICE T& operator()(int64_t b, int64_t h, int64_t t, int64_t d) const {
    return data[offset(b, h, t, d)];
  }
  //! Pointer to element (b, h, t, 0): the start of one token's row of `dim` elements.
  PREFIXKV_HOST_DEVICE T* row(int64_t b, int64_t h, int64_t t) const { return data + offset(b, h, t, 0); }
  //! True when the `dim` elements of a row are adjacent in memory.
  PREFIXKV_HOST_DEVICE bool rows_contiguous() const { return stride_dim == 1 || dim <= 1; }
  PREFIXKV_HOST_DEVICE int64_t size() const { return batch * heads * tokens * dim; }
  PREFIXKV_HOST_DEVICE int64_t row_bytes() const { return dim * static_cast<int64_t>(sizeof(T)); }
  //! The same view with another token extent (e.g. the compacted length).
  PREFIXKV_HOST_DEVICE kv_view with_tokens(int64_t n) const {
    kv_view v = *this;
    v.tokens = n;
    return v;
  }
  //! Read-only version.
  PREFIXKV_HOST_DEVICE kv_view<const T> as_const() const {
    return {data, batch, heads, tokens, dim, stride_batch, stride_head, stride_token, stride_dim};
  }
};

//! A view with explicit strides (elements) in (batch, head, token, dim) order.
template <class T>
PREFIXKV_HOST_DEVICE kv_view<T> make_kv_view(T* data, int64_t batch, int64_t heads, int64_t tokens, int64_t dim,
                                             int64_t stride_batch, int64_t stride_head, int64_t stride_token,
                                             int64_t stride_dim = 1) {
  return {data, batch, heads, tokens, dim, stride_batch, stride_head, stride_token, stride_dim};
}

//! Contiguous [B, H, S, D] (Hugging Face transformers' layout). `token_capacity` >= tokens pads the S axis
//! (pre-allocated caches); it defaults to `tokens`.
template <class T>
PREFIXKV_HOST_DEVICE kv_view<T> make_kv_view_bhsd(T* data, int64_t batch, int64_t heads, int64_t tokens, int64_t dim,
                                                  int64_t token_capacity = -1) {
  const int64_t cap = token_capacity < 0 ? tokens : token_capacity;
  return {data, batch, heads, tokens, dim, heads * cap * dim, cap * dim, dim, 1};
}

//! Contiguous [B, S, H, D] (flash-attention's varlen-free layout). `token_capacity` pads the S axis.
template <class T>
PREFIXKV_HOST_DEVICE kv_view<T> make_kv_view_bshd(T* data, int64_t batch, int64_t tokens, int64_t heads, int64_t dim,
                                                  int64_t token_capacity = -1) {
  const int64_t cap = token_capacity < 0 ? tokens : token_capacity;
  return {data, batch, heads, tokens, dim, cap * heads * dim, dim, heads * dim, 1};
}

// ---------------------------------------------------------------------------------------------------------------
// Paged view
// ---------------------------------------------------------------------------------------------------------------

//! Page layouts with names. Any other layout can be described by strides directly.
enum class page_layout : int {
  nhd = 0,  //!< pages (page, slot, head, dim) — vLLM's flash backend, FlashInfer "NHD"
  hnd = 1,  //!< pages (page, head, slot, dim) — FlashInfer "HND"
};

//! A paged KV tensor. Token `t` of sequence `b` lives in page `block_table[b * block_table_stride + t / page_size]`
//! at slot `t % page_size`.
//!
//! pages:       (page, slot, head, dim) addressed through `stride_page, stride_slot, stride_head, stride_dim`
//! block_table: (batch, max_blocks) int32 page ids, row stride `block_table_stride`
template <class T>
struct paged_kv_view {
  using element_type = T;
  T* pages = nullptr;
  int64_t num_pages = 0, page_size = 0, heads = 0, dim = 0;                     // extents of the page pool
  int64_t stride_page = 0, stride_slot = 0, stride_head = 0, stride_dim = 1;    // in elements
  const int32_t* block_table = nullptr;                                         // (batch, max_blocks)
  int64_t batch = 0, max_blocks = 0, block_table_stride = 0;

  //! Page id holding token t of sequence b.
  PREFIXKV_HOST_DEVICE int64_t page_of(int64_t b, int64_t t) const {
    return block_table[b * block_table_stride + t / page_size];
  }
  //! Element offset of (page, slot, head, dim) in the pool.
  PREFIXKV_HOST_DEVICE int64_t pool_offset(int64_t page, int64_t slot, int64_t h, int64_t d) const {
    return page * stride_page + slot * stride_slot + h * stride_head + d * stride_dim;
  }
  //! Element offset of (b, h, t, d) from `pages`.
  PREFIXKV_HOST_DEVICE int64_t offset(int64_t b, int64_t h, int64_t t, int64_t d) const {
    return pool_offset(page_of(b, t), t % page_size, h, d);
  }
  PREFIXKV_HOST_DEVICE T& operator()(int64_t b, int64_t h, int64_t t, int64_t d) const {
    return pages[offset(b, h, t, d)];
  }
  PREFIXKV_HOST_DEVICE T* row(int64_t b, int64_t h, int64_t t) const { return pages + offset(b, h, t, 0); }
  PREFIXKV_HOST_DEVICE bool rows_contiguous() const { return stride_dim == 1 || dim <= 1; }
  PREFIXKV_HOST_DEVICE int64_t token_capacity() const { return max_blocks * page_size; }
  //! Read-only version.
  PREFIXKV_HOST_DEVICE paged_kv_view<const T> as_const() const {
    paged_kv_view<const T> v;
    v.pages = pages;
    v.num_pages = num_pages;
    v.page_size = page_size;
    v.heads = heads;
    v.dim = dim;
    v.stride_page = stride_page;
    v.stride_slot = stride_slot;
    v.stride_head = stride_head;
    v.stride_dim = stride_dim;
    v.block_table = block_table;
    v.batch = batch;
    v.max_blocks = max_blocks;
    v.block_table_stride = block_table_stride;
    return v;
  }
  //! The same view over the first `tokens` token positions of every sequence (a prefix of the block table).
  PREFIXKV_HOST_DEVICE paged_kv_view with_token_capacity(int64_t tokens) const {
    paged_kv_view v = *this;
    const int64_t blocks = page_size > 0 ? (tokens + page_size - 1) / page_size : 0;
    v.max_blocks = blocks < max_blocks ? blocks : max_blocks;
    return v;
  }
  PREFIXKV_HOST_DEVICE int64_t row_bytes() const { return dim * static_cast<int64_t>(sizeof(T)); }
};

//! A contiguous page pool in a named layout. `block_table` is (batch, max_blocks), row stride `max_blocks`
//! unless `block_table_stride` says otherwise.
template <class T>
PREFIXKV_HOST_DEVICE paged_kv_view<T> make_paged_kv_view(T* pages, page_layout layout, int64_t num_pages,
                                                         int64_t page_size, int64_t heads, int64_t dim,
                                                         const int32_t* block_table, int64_t batch,
                                                         int64_t max_blocks, int64_t block_table_stride = -1) {
  paged_kv_view<T> v;
  v.pages = pages;
  v.num_pages = num_pages;
  v.page_size = page_size;
  v.heads = heads;
  v.dim = dim;
  v.stride_page = page_size * heads * dim;
  v.stride_dim = 1;
  if (layout == page_layout::nhd) {
    v.stride_slot = heads * dim;
    v.stride_head = dim;
  } else {
    v.stride_head = page_size * dim;
    v.stride_slot = dim;
  }
  v.block_table = block_table;
  v.batch = batch;
  v.max_blocks = max_blocks;
  v.block_table_stride = block_table_stride < 0 ? max_blocks : block_table_stride;
  return v;
}

// ---------------------------------------------------------------------------------------------------------------
// Ragged segments
// ---------------------------------------------------------------------------------------------------------------

//! Ragged rows in one flat buffer. Row `s` is `[begin(s), begin(s) + length(s))`.
//!
//! Three forms:
//! * `offsets` (count + 1, cu_seqlens style) and `lengths == nullptr`: length(s) = offsets[s+1] - offsets[s];
//! * `offsets` (count) and `lengths` (count): begins and lengths, rows may have gaps (padded storage);
//! * `offsets == nullptr`: uniform rows, begin(s) = s * uniform_stride, length(s) = uniform_length.
//!
//! Segment ids for per-(layer, sequence[, kv-head]) rows follow `segment_grid`.
struct segments {
  int64_t count = 0;
  const int64_t* offsets = nullptr;  // (count + 1) or (count)
  const int64_t* lengths = nullptr;  // (count) or null
  int64_t uniform_length = 0;
  int64_t uniform_stride = 0;

  PREFIXKV_HOST_DEVICE int64_t begin(int64_t s) const { return offsets ? offsets[s] : s * uniform_stride; }
  PREFIXKV_HOST_DEVICE int64_t length(int64_t s) const {
    return offsets ? (lengths ? lengths[s] : offsets[s + 1] - offsets[s]) : uniform_length;
  }
  PREFIXKV_HOST_DEVICE int64_t end(int64_t s) const { return begin(s) + length(s); }
};

//! `count` rows of `length` values, row `s` starting at `s * stride` (stride defaults to length).
PREFIXKV_HOST_DEVICE segments make_uniform_segments(int64_t count, int64_t length, int64_t stride = -1) {
  segments s;
  s.count = count;
  s.uniform_length = length;
  s.uniform_stride = stride < 0 ? length : stride;
  return s;
}
//! cu_seqlens-style rows: `offsets` has count + 1 entries.
PREFIXKV_HOST_DEVICE segments make_offset_segments(int64_t count, const int64_t* offsets) {
  segments s;
  s.count = count;
  s.offsets = offsets;
  return s;
}
//! Rows given by begins and lengths (count entries each).
PREFIXKV_HOST_DEVICE segments make_ragged_segments(int64_t count, const int64_t* begins, const int64_t* lengths) {
  segments s;
  s.count = count;
  s.offsets = begins;
  s.lengths = lengths;
  return s;
}

//! Numbering of per-(layer, sequence, kv-head) segments: layer-major, then sequence, then head (the default), or
//! sequence-major (`sequence_major = true`: sequence, then layer, then head — every sequence's segments are then
//! contiguous, which is what a per-sequence solve needs). With `heads == 1` it numbers per-(layer, sequence)
//! segments. Every stage addresses segments through `id()` / `layer_of()` / `batch_of()` / `head_of()` only, so
//! both orders work everywhere.
//! `validate(grid)` (core/validate.hpp) checks that `count()` fits int64; call it before trusting a grid that came
//! from outside.
struct segment_grid {
  int64_t layers = 1, batch = 1, heads = 1;
  bool sequence_major = false;
  PREFIXKV_HOST_DEVICE int64_t count() const { return layers * batch * heads; }
  PREFIXKV_HOST_DEVICE int64_t id(int64_t layer, int64_t b, int64_t h = 0) const {
    return (sequence_major ? b * layers + layer : layer * batch + b) * heads + h;
  }
  PREFIXKV_HOST_DEVICE int64_t layer_of(int64_t id) const {
    return sequence_major ? (id / heads) % layers : id / (batch * heads);
  }
  PREFIXKV_HOST_DEVICE int64_t batch_of(int64_t id) const {
    return sequence_major ? id / (layers * heads) : (id / heads) % batch;
  }
  PREFIXKV_HOST_DEVICE int64_t head_of(int64_t id) const { return id % heads; }
};

// ---------------------------------------------------------------------------------------------------------------
// mdspan interop
// ---------------------------------------------------------------------------------------------------------------
#if PREFIXKV_HAS_MDSPAN
//! The mdspan type equivalent to `kv_view<T>`: extents (batch, head, token, dim), `layout_stride`.
template <class T>
using kv_mdspan = cuda::std::mdspan<T, cuda::std::dextents<int64_t, 4>, cuda::std::layout_stride>;

//! `kv_view` → `cuda::std::mdspan` (layout_stride). The view must be non-overlapping (see `validate`).
template <class T>
PREFIXKV_HOST_DEVICE kv_mdspan<T> to_mdspan(const kv_view<T>& v) {
  using ext = cuda::std::dextents<int64_t, 4>;
  cuda::std::array<int64_t, 4> strides{v.stride_batch, v.stride_head, v.stride_token, v.stride_dim};
  return kv_mdspan<T>(v.data, cuda::std::layout_stride::mapping<ext>(ext(v.batch, v.heads, v.tokens, v.dim), strides));
}

//! Any rank-4 `cuda::std::mdspan` whose extents mean (batch, head, token, dim) → `kv_view`.
template <class T, class Extents, class Layout, class Accessor>
PREFIXKV_HOST_DEVICE kv_view<T> make_kv_view(const cuda::std::mdspan<T, Extents, Layout, Accessor>& m) {
  static_assert(Extents::rank() == 4, "a KV view is (batch, head, token, dim)");
  return {m.data_handle(),
          static_cast<int64_t>(m.extent(0)), static_cast<int64_t>(m.extent(1)),
          static_cast<int64_t>(m.extent(2)), static_cast<int64_t>(m.extent(3)),
          static_cast<int64_t>(m.stride(0)), static_cast<int64_t>(m.stride(1)),
          static_cast<int64_t>(m.stride(2)), static_cast<int64_t>(m.stride(3))};
}
#endif

PREFIXKV_NAMESPACE_END
