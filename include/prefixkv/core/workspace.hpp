//! \file prefixkv/core/workspace.hpp
//! Two-phase temporary storage, the CUB way.
//!
//! Every device entry point takes `(void* d_temp, size_t& temp_bytes, ...)`. Called with `d_temp == nullptr`
//! it only writes the bytes it needs into `temp_bytes` and returns. Called again with a buffer of at least that
//! size, it carves the buffer into 256-byte aligned pieces and runs. prefixkv never allocates behind your back.
//!
//! `workspace_layout<N>` does the carving for an entry point that needs N scratch arrays:
//! \code
//! prefixkv::workspace_layout<2> ws;
//! ws.reserve<float>(0, n);            // piece 0: n floats
//! ws.reserve<int>(1, m);              // piece 1: m ints
//! if (d_temp == nullptr) { temp_bytes = ws.bytes(); return cudaSuccess; }
//! PREFIXKV_TRY(ws.map(d_temp, temp_bytes));
//! float* a = ws.get<float>(0);
//! int* b = ws.get<int>(1);
//! \endcode
#pragma once

#include "error.hpp"

#include <cstdint>

PREFIXKV_NAMESPACE_BEGIN

//! Alignment of every piece carved out of a workspace (and the alignment callers should give `d_temp`).
inline constexpr std::size_t workspace_alignment = 256;

//! Largest piece a layout accounts exactly (larger requests saturate).
inline constexpr std::size_t workspace_max_bytes = SIZE_MAX / 2;

//! Round `bytes` up to a multiple of `workspace_alignment`.
PREFIXKV_HOST_DEVICE constexpr std::size_t workspace_round_up(std::size_t bytes) {
  return (bytes + workspace_alignment - 1) / workspace_alignment * workspace_alignment;
}

//! A fixed number of scratch pieces laid out back to back, each 256-byte aligned.
template <int N>
class workspace_layout {
  static_assert(N > 0, "a workspace needs at least one piece");

 public:
  //! Ask for `count` objects of type T in piece `i` (replaces an earlier request for the same piece).
  //! A request whose byte count overflows `size_t` saturates (see `bytes()`).
  template <class T>
  void reserve(int i, std::size_t count) noexcept {
    sizes_[i] = count > workspace_max_bytes / sizeof(T) ? workspace_max_bytes : count * sizeof(T);
  }
  //! Ask for raw bytes in piece `i`.
  void reserve_bytes(int i, std::size_t bytes) noexcept { sizes_[i] = bytes > workspace_max_bytes ? workspace_max_bytes : bytes; }

  //! Bytes the whole layout needs, padding included. Never 0 (so a size query never asks for an empty buffer).
  //! When the pieces add up to more than `size_t` can count (sizes derived from absurd extents), the result
  //! saturates at SIZE_MAX: no allocation can satisfy it and `map` refuses every buffer (workspace_too_small),
  //! so a wrapped, too small size is never reported.
  std::size_t bytes() const noexcept {
    std::size_t total = 0;
    for (int i = 0; i < N; ++i) {
      if (sizes_[i] >= workspace_max_bytes) return SIZE_MAX;
      const std::size_t r = workspace_round_up(sizes_[i]);
      if (r > SIZE_MAX - total) return SIZE_MAX;
      total += r;
    }
    return total == 0 ? workspace_alignment : total;
  }

  //! Bind the pieces to a caller buffer. Fails with `reason::workspace_too_small` or `reason::misaligned`.
  cudaError_t map(void* d_temp, std::size_t temp_bytes) noexcept {
    if (d_temp == nullptr) return detail::fail(reason::null_pointer, "workspace: d_temp is null");
    if (reinterpret_cast<std::uintptr_t>(d_temp) % workspace_alignment != 0)
      return detail::fail(reason::misaligned, "workspace: d_temp must be 256-byte aligned");
    const std::size_t need = bytes();
    if (need == SIZE_MAX || temp_bytes < need)
      return detail::fail(reason::workspace_too_small, "workspace: temp_bytes is smaller than the size query returned");
    char* p = static_cast<char*>(d_temp);
    for (int i = 0; i < N; ++i) {
      ptrs_[i] = sizes_[i] ? p : nullptr;
      p += workspace_round_up(sizes_[i]);
    }
    return cudaSuccess;
  }

  //! Piece `i` as a typed pointer (null for an empty piece). Valid after a successful `map`.
  template <class T>
  T* get(int i) const noexcept {
    return static_cast<T*>(ptrs_[i]);
  }
  std::size_t size_of(int i) const noexcept { return sizes_[i]; }

 private:
  std::size_t sizes_[N] = {};
  void* ptrs_[N] = {};
};

PREFIXKV_NAMESPACE_END
