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

#include "error.hpp"
#include "views.hpp"

#include <initializer_list>

PREFIXKV_NAMESPACE_BEGIN

namespace detail {

//! True when the strided box (extents, strides) maps distinct coordinates to distinct offsets. The test is the
//! usual sufficient one: sorted by stride, each axis of extent > 1 must step over the whole span of the smaller
//! ones. Axes of extent <= 1 are ignored (their stride never matters). Strides must be >= 0.
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
  int64_t span = 1;  // elements covered by the axes seen so far
  for (int i = 0; i < m; ++i) {
    const int a = order[i];
    if (stride[a] < span) return false;
    span = stride[a] * (extent[a] - 1) + span;
  }
  return true;
}

inline bool aligned_to(const void* p, std::size_t a) noexcept { return reinterpret_cast<std::uintptr_t>(p) % a == 0; }

//! Largest power of two <= cap dividing every value.
inline int common_pow2(int64_t cap, std::initializer_list<int64_t> values) noexcept {
  int64_t v = cap;
  for (int64_t x : values) {
    if (x < 0) x = -x;
    while (v > 1 && x % v != 0) v >>= 1;
  }
  return static_cast<int>(v);
}

}  // namespace detail

//! Check a strided view: extents >= 0, strides >= 0, non-null data when non-empty, element alignment, and no two
//! coordinates on one element.
template <class T>
[[nodiscard]] inline cudaError_t validate(const kv_view<T>& v) noexcept {
  if (v.batch < 0 || v.heads < 0 || v.tokens < 0 || v.dim < 0)
    return detail::fail(reason::negative_extent, "kv_view: an extent is negative");
  if (v.stride_batch < 0 || v.stride_head < 0 || v.stride_token < 0 || v.stride_dim < 0)
    return detail::fail(reason::negative_stride, "kv_view: a stride is negative");
  if (v.size() == 0) return cudaSuccess;
  if (v.data == nullptr) return detail::fail(reason::null_pointer, "kv_view: data is null");
  if (!detail::aligned_to(v.data, alignof(T)))
    return detail::fail(reason::misaligned, "kv_view: data is not aligned to its element type");
  const int64_t ext[4] = {v.batch, v.heads, v.tokens, v.dim};
  const int64_t str[4] = {v.stride_batch, v.stride_head, v.stride_token, v.stride_dim};
  if (!detail::strides_disjoint(ext, str))
    return detail::fail(reason::overlapping_strides, "kv_view: strides make distinct coordinates overlap");
  return cudaSuccess;
}

//! Check a paged view's pool and block-table description (not the page ids themselves, which may live on the
//! device; kernels that read them bound-check each id and report `reason::out_of_range`).
template <class T>
[[nodiscard]] inline cudaError_t validate(const paged_kv_view<T>& v) noexcept {
  if (v.num_pages < 0 || v.page_size < 0 || v.heads < 0 || v.dim < 0 || v.batch < 0 || v.max_blocks < 0)
    return detail::fail(reason::negative_extent, "paged_kv_view: an extent is negative");
  if (v.stride_page < 0 || v.stride_slot < 0 || v.stride_head < 0 || v.stride_dim < 0 || v.block_table_stride < 0)
    return detail::fail(reason::negative_stride, "paged_kv_view: a stride is negative");
  if (v.page_size == 0) return detail::fail(reason::bad_parameter, "paged_kv_view: page_size must be positive");
  if (v.batch > 0 && v.max_blocks > 0 && v.block_table == nullptr)
    return detail::fail(reason::null_pointer, "paged_kv_view: block_table is null");
  if (v.batch > 1 && v.block_table_stride < v.max_blocks)
    return detail::fail(reason::overlapping_strides, "paged_kv_view: block_table rows overlap");
  if (v.num_pages * v.page_size * v.heads * v.dim == 0) return cudaSuccess;
  if (v.pages == nullptr) return detail::fail(reason::null_pointer, "paged_kv_view: pages is null");
  if (!detail::aligned_to(v.pages, alignof(T)))
    return detail::fail(reason::misaligned, "paged_kv_view: pages is not aligned to its element type");
  const int64_t ext[4] = {v.num_pages, v.page_size, v.heads, v.dim};
  const int64_t str[4] = {v.stride_page, v.stride_slot, v.stride_head, v.stride_dim};
  if (!detail::strides_disjoint(ext, str))
    return detail::fail(reason::overlapping_strides, "paged_kv_view: strides make distinct coordinates overlap");
  return cudaSuccess;
}

//! Check a segment description (its shape; the arrays themselves may live on the device).
[[nodiscard]] inline cudaError_t validate(const segments& s) noexcept {
  if (s.count < 0) return detail::fail(reason::negative_extent, "segments: count is negative");
  if (s.count == 0) return cudaSuccess;
  if (s.offsets == nullptr) {
    if (s.uniform_length < 0) return detail::fail(reason::negative_extent, "segments: uniform_length is negative");
    if (s.uniform_stride < 0) return detail::fail(reason::negative_stride, "segments: uniform_stride is negative");
    if (s.count > 1 && s.uniform_stride < s.uniform_length)
      return detail::fail(reason::overlapping_strides, "segments: uniform rows overlap (stride < length)");
  }
  return cudaSuccess;
}

//! Check ragged rows whose offsets/lengths live in host memory: non-negative lengths, non-negative begins.
[[nodiscard]] inline cudaError_t validate_host_contents(const segments& s) noexcept {
  PREFIXKV_TRY(validate(s));
  if (s.offsets == nullptr) return cudaSuccess;
  for (int64_t i = 0; i < s.count; ++i) {
    if (s.begin(i) < 0) return detail::fail(reason::out_of_range, "segments: a row begins before 0");
    if (s.length(i) < 0) return detail::fail(reason::negative_extent, "segments: a row length is negative");
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
