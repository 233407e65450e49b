//! \file prefixkv/select/select.hpp
//! Host twin of the selection writer: from the curves and the solver's keep counts, the kept positions of every
//! segment (protected + the first k_s ranked candidates), ascending, as a `selection` (offsets (S+1) + indices).
//! The device version is `prefixkv::write_selection` in `prefixkv/select/select.cuh`.
//!
//! \code
//! std::vector<int64_t> keep(S);      // from solve_host
//! std::vector<int64_t> offsets(S + 1);
//! std::vector<int32_t> indices(total_tokens);   // any upper bound of sum(keep)
//! auto e = prefixkv::write_selection_host(curves.view(), keep.data(), offsets.data(), indices.data(),
//!                                         int64_t(indices.size()));
//! prefixkv::selection sel{S, offsets.data(), indices.data()};
//! \endcode
#pragma once

#include "../core/checked.hpp"
#include "../core/error.hpp"
#include "../curve/curve.hpp"
#include "selection.hpp"

#include <climits>
#include <vector>

PREFIXKV_NAMESPACE_BEGIN

namespace detail {

//! Every check of `write_selection_host` but the per-position ones; `total` receives sum(keep). Reads only the
//! curve shape and `keep`; allocates nothing.
inline cudaError_t write_selection_host_shape(const curve_set& curves, const int64_t* keep, int64_t& total) noexcept {
  const int64_t S = curves.count;
  PREFIXKV_TRY(validate(curves.protect));
  if (S < 0) return fail(reason::negative_extent, "write_selection: negative segment count");
  if (S > 0 && (curves.offsets == nullptr || curves.tokens == nullptr || keep == nullptr))
    return fail(reason::null_pointer, "write_selection: curves or keep is null");
  if (S > 0 && curves.offsets[0] != 0) return fail(reason::out_of_range, "write_selection: curves.offsets[0] must be 0");
  checked_i64 sum = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = curves.tokens[s];
    if (n < 0 || curves.offsets[s + 1] < curves.offsets[s])  // compare before subtracting
      return fail(reason::shape_mismatch, "write_selection: candidate count disagrees with tokens and protect policy");
    const int64_t c = curves.offsets[s + 1] - curves.offsets[s];
    if (c != candidate_count(n, curves.protect))
      return fail(reason::shape_mismatch, "write_selection: candidate count disagrees with tokens and protect policy");
    if (n > INT32_MAX) return fail(reason::out_of_range, "write_selection: a segment is longer than int32 indices allow");
    if (keep[s] < n - c || keep[s] > n)
      return fail(reason::out_of_range, "write_selection: a keep count is outside [protected, tokens]");
    if (keep[s] > n - c && curves.positions == nullptr) return fail(reason::null_pointer, "write_selection: positions is null");
    sum += keep[s];
  }
  if (!sum.ok()) return fail(reason::capacity_exceeded, "write_selection: sum(keep) overflows int64");
  total = sum.value();
  return cudaSuccess;
}

inline cudaError_t write_selection_host_impl(const curve_set& curves, const int64_t* keep, int64_t* offsets,
                                             int32_t* indices, int64_t capacity) {
  const int64_t S = curves.count;
  if (capacity < 0) return fail(reason::negative_extent, "write_selection: negative capacity");
  if (offsets == nullptr) return fail(reason::null_pointer, "write_selection: offsets is null");
  int64_t total = 0;
  PREFIXKV_TRY(write_selection_host_shape(curves, keep, total));
  if (total > capacity) return fail(reason::capacity_exceeded, "write_selection: sum(keep) exceeds the index capacity");
  if (total > 0 && indices == nullptr) return fail(reason::null_pointer, "write_selection: indices is null");
  // Validate the kept candidate positions: in range, not protected, distinct (a flag per token of the segment,
  // only for segments that keep a candidate).
  std::vector<unsigned char> flag;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = curves.tokens[s], k = keep[s] - protected_count(n, curves.protect);
    if (k <= 0) continue;
    flag.assign(static_cast<size_t>(n), 0);
    for (int64_t r = 0; r < k; ++r) {
      const int64_t t = curves.positions[curves.offsets[s] + r];
      if (t < 0 || t >= n) return fail(reason::out_of_range, "write_selection: a candidate position is outside its segment");
      if (is_protected(t, n, curves.protect) || flag[t])
        return fail(reason::out_of_range, "write_selection: a candidate position is protected or repeated");
      flag[t] = 1;
    }
  }
  offsets[0] = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = curves.tokens[s], k = keep[s] - protected_count(n, curves.protect);
    int64_t o = offsets[s];
    if (k <= 0) {  // protected tokens only: [0, min(sinks, n)) and [max(n - recent, that), n)
      const int64_t a = curves.protect.sinks < n ? curves.protect.sinks : n;
      const int64_t b = n - curves.protect.recent > a ? n - curves.protect.recent : a;
      for (int64_t t = 0; t < a; ++t) indices[o++] = static_cast<int32_t>(t);
      for (int64_t t = b; t < n; ++t) indices[o++] = static_cast<int32_t>(t);
      offsets[s + 1] = o;
      continue;
    }
    flag.assign(static_cast<size_t>(n), 0);
    for (int64_t r = 0; r < k; ++r) flag[curves.positions[curves.offsets[s] + r]] = 1;
    for (int64_t t = 0; t < n; ++t)
      if (flag[t] || is_protected(t, n, curves.protect)) indices[o++] = static_cast<int32_t>(t);
    offsets[s + 1] = o;
  }
  return cudaSuccess;
}
}  // namespace detail

//! Host selection writer.
//! * `curves`: host curve_set (S segments; `positions` read for the first k_s ranks of each segment)
//! * `keep`: (S) tokens kept per segment, protected included (the solver's output), in [protected_s, n_s]
//! * `offsets`: (S + 1) output, exclusive scan of keep (cu_seqlens style)
//! * `indices`: (capacity) output, kept positions ascending within each segment; sum(keep) must be <= capacity
//! Everything is validated (positions in range, not protected, distinct) before anything is written.
[[nodiscard]] inline cudaError_t write_selection_host(const curve_set& curves, const int64_t* keep, int64_t* offsets,
                                                      int32_t* indices, int64_t capacity) noexcept {
  try {
    return detail::write_selection_host_impl(curves, keep, offsets, indices, capacity);
  } catch (...) {
    return detail::fail(reason::capacity_exceeded, "write_selection: out of host memory", cudaErrorMemoryAllocation);
  }
}

//! Owning host selection (for the CLI and tests).
struct selection_buffers {
  std::vector<int64_t> offsets;
  std::vector<int32_t> indices;
  selection view() const {
    selection s;
    s.count = offsets.empty() ? 0 : static_cast<int64_t>(offsets.size()) - 1;
    s.offsets = offsets.data();
    // an empty index list still gets a valid pointer (the compaction entry points refuse a null one)
    static const int32_t no_indices = 0;
    s.indices = indices.empty() ? &no_indices : indices.data();
    return s;
  }
};

//! Convenience: write into owning vectors sized exactly. The inputs are validated before anything is allocated
//! (a keep count outside [protected, tokens] is `cudaErrorInvalidValue`, whatever its size); `out` is replaced
//! only on success; running out of host memory returns `cudaErrorMemoryAllocation` (`reason::capacity_exceeded`).
[[nodiscard]] inline cudaError_t write_selection_host(const curve_set& curves, const int64_t* keep,
                                                      selection_buffers& out) noexcept {
  int64_t total = 0;
  PREFIXKV_TRY(detail::write_selection_host_shape(curves, keep, total));
  try {
    selection_buffers b;
    b.offsets.resize(static_cast<size_t>(curves.count) + 1);
    b.indices.resize(static_cast<size_t>(total));
    PREFIXKV_TRY(write_selection_host(curves, keep, b.offsets.data(), b.indices.data(), total));
    out = std::move(b);
    return cudaSuccess;
  } catch (...) {
    return detail::fail(reason::capacity_exceeded, "write_selection: out of host memory", cudaErrorMemoryAllocation);
  }
}

PREFIXKV_NAMESPACE_END
