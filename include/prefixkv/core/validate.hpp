//! \file prefixkv/core/validate.hpp
//! `can_implement`-style checks for views. Every entry point runs them before touching memory, so a bad view
//! yields `cudaErrorInvalidValue` with a distinct `prefixkv::reason` and leaves every buffer untouched.
//!
//! \code
//! auto k = prefixkv::make_kv_view_bhsd(d_keys, 1, 8, 4096, 128);
//! if (prefixkv::validate(k) != cudaSuccess) puts(prefixkv::last_error().message);
//! int vec = prefixkv::vector_bytes(k);   // 16 when every row start is 16-byte aligned
//! \endcode
#pragma once

#include "checked.hpp"
#include "error.hpp"
#include "views.hpp"

#include <initializer_list>

PREFIXKV_NAMESPACE_BEGIN

namespace detail {

//! True when the strided box (extents, strides) maps distinct coordinates to distinct offsets. The test is the
//! usual sufficient one: sorted by stride, each axis of extent > 1 must step over the whole span of the smaller
//! ones. Axes of extent <= 1 are ignored (their stride never matters). Strides must be >= 0. A span that would
//! overflow int64 counts as overlapping (conservative).
template <int N>
inline bool strides_disjoint(const int64_t (&extent)[N], const int64_t (&stride)[N]) noexcept {
  int order[N];
  int m = 0;
  for (int i = 0; i < N; ++i)
    if (extent[i] > 1) order[m++] = i;
  for (int i = 1; i < m; ++i)  // insertion sort by stride
    for (int j = i; j > 0 && stride[order[j]] < stride[order[j - 1]]; --j) {
      const int t = order[j];
      order[j] = order[j - 1];
      order[j - 1] = t;
    }
  checked_i64 span = 1;  // elements covered by the axes seen so far
  for (int i = 0; i < m; ++i) {
    const int a = order[i];
    if (stride[a] < span.value()) return false;
    span = checked_i64(stride[a]) * (extent[a] - 1) + span;
    if (!span.ok()) return false;
  }
  return true;
}

inline bool aligned_to(const void* p, std::size_t a) noexcept { return reinterpret_cast<std::uintptr_t>(p) % a == 0; }

//! Largest power of two <= cap dividing every value.
inline int common_pow2(int64_t cap, std::initializer_list<int64_t> values) noexcept {
  int64_t v = cap;
  for (int64_t x : values) {
    if (x < 0) x = x == INT64_MIN ? 0 : -x;  // (INT64_MIN is divisible by every power of two)
    while (v > 1 && x % v != 0) v >>= 1;
  }
  return static_cast<int>(v);
}

//! Shared size checks of a strided box of `elem`-byte elements at `base`: the element count, the addressed span
//! (also over the non-empty axes of an empty box) and every stride in bytes fit int64, and the span does not wrap
//! the address space. `what` prefixes nothing
//! (messages are static); it selects the message for views or page pools.
inline cudaError_t check_box_sizes(const void* base, const int64_t (&ext)[4], const int64_t (&str)[4], int64_t elem,
                                   bool pool) noexcept {
  int64_t count = 0, span = 0, bytes = 0, sb = 0;
  // reach: the largest offset of a coordinate within the non-empty axes, in bytes (an empty view's loops may still
  // form the offsets of its other axes)
  checked_i64 reach = 0;
  for (int i = 0; i < 4; ++i)
    if (ext[i] > 0) reach += (checked_i64(ext[i]) - 1) * str[i];
  reach = (reach + 1) * elem;
  if (!checked_extent_product(ext, count) || !checked_box_span(ext, str, span) || !checked_mul(span, elem, bytes) ||
      !reach.ok())
    return fail(reason::out_of_range, pool ? "paged_kv_view: the pool's element count or byte span overflows int64"
                                           : "kv_view: the element count or byte span overflows int64");
  for (int i = 0; i < 4; ++i)
    if (!checked_mul(str[i], elem, sb))
      return fail(reason::out_of_range, pool ? "paged_kv_view: a stride in bytes overflows int64"
                                             : "kv_view: a stride in bytes overflows int64");
  if (!address_range_fits(base, bytes))
    return fail(reason::out_of_range, pool ? "paged_kv_view: the pool's byte span wraps the address space"
                                           : "kv_view: the byte span wraps the address space");
  return cudaSuccess;
}

//! A strided box of bytes: `elem`-byte elements at `base + sum i_k * str[k]` (byte strides), i_k < ext[k].
//! `span` = bytes from `base` to one past the last byte (0 when empty). Built by `byte_box_of` from views that
//! passed `validate` (so nothing below overflows).
struct byte_box {
  std::uintptr_t base = 0;
  int64_t ext[4] = {0, 0, 0, 0};
  int64_t str[4] = {0, 0, 0, 0};
  int64_t elem = 1;
  int64_t span = 0;
};

inline byte_box make_byte_box(const void* base, const int64_t (&ext)[4], const int64_t (&str)[4], int64_t elem) noexcept {
  byte_box b;
  b.base = reinterpret_cast<std::uintptr_t>(base);
  b.elem = elem;
  for (int i = 0; i < 4; ++i) {
    b.ext[i] = ext[i];
    b.str[i] = str[i] * elem;
  }
  int64_t span = 0;
  b.span = checked_box_span(ext, str, span) ? span * elem : 0;
  return b;
}

//! True when two byte boxes provably share no byte. The rule (conservative; exact for the common layouts):
//! * an empty box, or byte ranges [base, base + span) that do not intersect: disjoint;
//! * boxes whose ranges intersect must have the same element size and the same byte stride on every axis that
//!   has extent > 1 in either box. Then both lie in the box B' with the larger extent of each axis, placed at
//!   each base; the pair is disjoint when B' plus two more axes (the bytes of an element: extent `elem`, stride
//!   1; the two bases: extent 2, stride |base_b - base_a|) passes `strides_disjoint`. This accepts K and V
//!   interleaved per token ([B, S, 2, H, D]: V = K + H*D elements), K/V pairs per page and layers interleaved
//!   the same way, and rejects two views on the same memory (distance 0) or any distance that lands inside
//!   the other box's elements;
//! * anything else whose ranges intersect counts as overlapping.
inline bool byte_boxes_disjoint(const byte_box& a, const byte_box& b) noexcept {
  if (a.span == 0 || b.span == 0) return true;
  // ranges [base, base + span): no wrap (validated), compare without forming base + span overflow
  if (a.base >= b.base ? a.base - b.base >= static_cast<std::uint64_t>(b.span)
                       : b.base - a.base >= static_cast<std::uint64_t>(a.span))
    return true;
  if (a.elem != b.elem) return false;
  int64_t ext[6], str[6];
  for (int i = 0; i < 4; ++i) {
    ext[i] = a.ext[i] > b.ext[i] ? a.ext[i] : b.ext[i];
    if (ext[i] > 1 && a.str[i] != b.str[i]) return false;
    str[i] = a.str[i];
  }
  ext[4] = a.elem;
  str[4] = 1;
  const std::uint64_t d = a.base >= b.base ? a.base - b.base : b.base - a.base;
  if (d > static_cast<std::uint64_t>(INT64_MAX)) return false;  // (cannot happen: the ranges intersect)
  ext[5] = 2;
  str[5] = static_cast<int64_t>(d);
  return strides_disjoint(ext, str);
}

}  // namespace detail

//! Check a strided view: extents >= 0, strides >= 0, non-null data when non-empty, element alignment, element
//! count, byte span and byte strides within int64 (`reason::out_of_range`), and no two coordinates on one element.
template <class T>
[[nodiscard]] inline cudaError_t validate(const kv_view<T>& v) noexcept {
  if (v.batch < 0 || v.heads < 0 || v.tokens < 0 || v.dim < 0)
    return detail::fail(reason::negative_extent, "kv_view: an extent is negative");
  if (v.stride_batch < 0 || v.stride_head < 0 || v.stride_token < 0 || v.stride_dim < 0)
    return detail::fail(reason::negative_stride, "kv_view: a stride is negative");
  const int64_t ext[4] = {v.batch, v.heads, v.tokens, v.dim};
  const int64_t str[4] = {v.stride_batch, v.stride_head, v.stride_token, v.stride_dim};
  PREFIXKV_TRY(detail::check_box_sizes(v.data, ext, str, static_cast<int64_t>(sizeof(T)), false));
  if (v.batch == 0 || v.heads == 0 || v.tokens == 0 || v.dim == 0) return cudaSuccess;
  if (v.data == nullptr) return detail::fail(reason::null_pointer, "kv_view: data is null");
  if (!detail::aligned_to(v.data, alignof(T)))
    return detail::fail(reason::misaligned, "kv_view: data is not aligned to its element type");
  if (!detail::strides_disjoint(ext, str))
    return detail::fail(reason::overlapping_strides, "kv_view: strides make distinct coordinates overlap");
  return cudaSuccess;
}

//! Check a paged view's pool and block-table description (not the page ids themselves, which may live on the
//! device; kernels that read them bound-check each id and report `reason::out_of_range`). Sizes derived from
//! the description (pool elements and bytes, block-table extent, token capacity max_blocks * page_size) must
//! fit int64 (`reason::out_of_range`).
template <class T>
[[nodiscard]] inline cudaError_t validate(const paged_kv_view<T>& v) noexcept {
  if (v.num_pages < 0 || v.page_size < 0 || v.heads < 0 || v.dim < 0 || v.batch < 0 || v.max_blocks < 0)
    return detail::fail(reason::negative_extent, "paged_kv_view: an extent is negative");
  if (v.stride_page < 0 || v.stride_slot < 0 || v.stride_head < 0 || v.stride_dim < 0 || v.block_table_stride < 0)
    return detail::fail(reason::negative_stride, "paged_kv_view: a stride is negative");
  if (v.page_size == 0) return detail::fail(reason::bad_parameter, "paged_kv_view: page_size must be positive");
  int64_t cap = 0;
  if (!detail::checked_mul(v.max_blocks, v.page_size, cap))
    return detail::fail(reason::out_of_range, "paged_kv_view: max_blocks * page_size overflows int64");
  if (v.batch > 0 && v.max_blocks > 0) {
    if (v.block_table == nullptr) return detail::fail(reason::null_pointer, "paged_kv_view: block_table is null");
    const detail::checked_i64 table = (detail::checked_i64(v.batch) - 1) * v.block_table_stride + v.max_blocks;
    if (!(table * 4).ok() || !detail::address_range_fits(v.block_table, (table * 4).value()))
      return detail::fail(reason::out_of_range, "paged_kv_view: the block table's extent overflows int64");
  }
  if (v.batch > 1 && v.block_table_stride < v.max_blocks)
    return detail::fail(reason::overlapping_strides, "paged_kv_view: block_table rows overlap");
  const int64_t ext[4] = {v.num_pages, v.page_size, v.heads, v.dim};
  const int64_t str[4] = {v.stride_page, v.stride_slot, v.stride_head, v.stride_dim};
  PREFIXKV_TRY(detail::check_box_sizes(v.pages, ext, str, static_cast<int64_t>(sizeof(T)), true));
  if (v.num_pages == 0 || v.heads == 0 || v.dim == 0) return cudaSuccess;
  if (v.pages == nullptr) return detail::fail(reason::null_pointer, "paged_kv_view: pages is null");
  if (!detail::aligned_to(v.pages, alignof(T)))
    return detail::fail(reason::misaligned, "paged_kv_view: pages is not aligned to its element type");
  if (!detail::strides_disjoint(ext, str))
    return detail::fail(reason::overlapping_strides, "paged_kv_view: strides make distinct coordinates overlap");
  return cudaSuccess;
}

//! Check a segment description (its shape; the arrays themselves may live on the device). Uniform rows: the end
//! of the last row, (count - 1) * uniform_stride + uniform_length, must fit int64 (`reason::out_of_range`).
[[nodiscard]] inline cudaError_t validate(const segments& s) noexcept {
  if (s.count < 0) return detail::fail(reason::negative_extent, "segments: count is negative");
  if (s.count == 0) return cudaSuccess;
  if (s.offsets == nullptr) {
    if (s.uniform_length < 0) return detail::fail(reason::negative_extent, "segments: uniform_length is negative");
    if (s.uniform_stride < 0) return detail::fail(reason::negative_stride, "segments: uniform_stride is negative");
    if (s.count > 1 && s.uniform_stride < s.uniform_length)
      return detail::fail(reason::overlapping_strides, "segments: uniform rows overlap (stride < length)");
    if (!((detail::checked_i64(s.count) - 1) * s.uniform_stride + s.uniform_length).ok())
      return detail::fail(reason::out_of_range, "segments: the end of the last uniform row overflows int64");
  }
  return cudaSuccess;
}

//! Check a segment grid: extents >= 0 (`reason::negative_extent`) and layers * batch * heads within int64
//! (`reason::out_of_range`), so that `count()` and `id()` never overflow.
[[nodiscard]] inline cudaError_t validate(const segment_grid& g) noexcept {
  if (g.layers < 0 || g.batch < 0 || g.heads < 0) return detail::fail(reason::negative_extent, "segment_grid: an extent is negative");
  if (!(detail::checked_i64(g.layers) * g.batch * g.heads).ok())
    return detail::fail(reason::out_of_range, "segment_grid: layers * batch * heads overflows int64");
  return cudaSuccess;
}

//! Check ragged rows whose offsets/lengths live in host memory: non-negative begins, non-negative lengths, and
//! every end (begin + length) within int64. cu_seqlens form: offsets non-decreasing and >= 0.
[[nodiscard]] inline cudaError_t validate_host_contents(const segments& s) noexcept {
  PREFIXKV_TRY(validate(s));
  if (s.offsets == nullptr) return cudaSuccess;
  for (int64_t i = 0; i < s.count; ++i) {
    if (s.offsets[i] < 0) return detail::fail(reason::out_of_range, "segments: a row begins before 0");
    if (s.lengths == nullptr) {  // cu_seqlens: compare, never subtract, before the next offset is known good
      if (s.offsets[i + 1] < s.offsets[i]) return detail::fail(reason::negative_extent, "segments: a row length is negative");
    } else {
      if (s.lengths[i] < 0) return detail::fail(reason::negative_extent, "segments: a row length is negative");
      int64_t end = 0;
      if (!detail::checked_add(s.offsets[i], s.lengths[i], end))
        return detail::fail(reason::out_of_range, "segments: a row's end (begin + length) overflows int64");
    }
  }
  return cudaSuccess;
}

//! Widest access (16, 8, 4, 2 or 1 bytes) that can move any row of `v` with aligned vector loads and stores:
//! the largest power of two dividing the base address, the row size in bytes and every stride in bytes.
//! Requires contiguous rows; returns 0 when `stride_dim` != 1 (elements must then be moved one by one).
template <class T>
inline int vector_bytes(const kv_view<T>& v) noexcept {
  if (!v.rows_contiguous()) return 0;
  const int64_t e = static_cast<int64_t>(sizeof(T));
  return detail::common_pow2(16, {static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(v.data) % 16), v.dim * e,
                                  v.stride_batch * e, v.stride_head * e, v.stride_token * e});
}
//! The same for a paged pool.
template <class T>
inline int vector_bytes(const paged_kv_view<T>& v) noexcept {
  if (!v.rows_contiguous()) return 0;
  const int64_t e = static_cast<int64_t>(sizeof(T));
  return detail::common_pow2(16, {static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(v.pages) % 16), v.dim * e,
                                  v.stride_page * e, v.stride_slot * e, v.stride_head * e});
}

PREFIXKV_NAMESPACE_END
