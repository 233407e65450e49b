//! \file prefixkv/core/error.hpp
//! The error model.
//!
//! * Every entry point returns `cudaError_t` and is `[[nodiscard]]`; headers never throw.
//! * When an entry point rejects its arguments it returns `cudaErrorInvalidValue` and records *why* in a
//!   per-thread slot: `prefixkv::last_error()` gives a machine-readable `prefixkv::reason` and a readable
//!   message. The slot is overwritten by the next rejection on the same thread and cleared by
//!   `prefixkv::clear_last_error()`; successful calls leave it alone.
//! * Errors from the CUDA runtime (launch failures, ...) are returned as they are; their reason is
//!   `reason::cuda_runtime`.
//! * Define `PREFIXKV_DEBUG_SYNC` to make every launch synchronise its stream and report asynchronous errors
//!   at the call that caused them (skipped while the stream is being captured into a graph).
//!
//! \code
//! size_t bytes = 0;
//! cudaError_t e = prefixkv::some_entry_point(nullptr, bytes, ...);
//! if (e == cudaErrorInvalidValue)
//!   std::fprintf(stderr, "prefixkv: %s\n", prefixkv::last_error().message);
//! \endcode
#pragma once

#include "config.hpp"

PREFIXKV_NAMESPACE_BEGIN

//! Why an entry point rejected its arguments. Values are stable: append, never renumber.
enum class reason : int {
  none = 0,
  null_pointer = 1,         //!< a pointer that must be valid is null
  negative_extent = 2,      //!< an extent (batch, heads, tokens, dim, count) is negative
  negative_stride = 3,      //!< a stride is negative
  overlapping_strides = 4,  //!< two distinct coordinates of one view address the same element
  misaligned = 5,           //!< a pointer or stride breaks the alignment the operation needs
  shape_mismatch = 6,       //!< two arguments disagree on an extent
  out_of_range = 7,         //!< an index, page id or offset falls outside its container
  not_ascending = 8,        //!< an index list that must be strictly ascending is not
  nonfinite_input = 9,      //!< NaN or infinity in an input
  negative_input = 10,      //!< a negative score where scores must be >= 0
  infeasible_budget = 11,   //!< the requested budget cannot be met
  infeasible_bounds = 12,   //!< per-segment bounds contradict each other or the budget
  bad_parameter = 13,       //!< a scalar parameter is outside its domain (ratio, window, page size ...)
  overlapping_buffers = 14, //!< source and destination overlap where they must not
  workspace_too_small = 15, //!< temp_bytes is smaller than the size query returned
  capacity_exceeded = 16,   //!< the output would not fit its destination
  unsupported = 17,         //!< a valid request this build cannot serve (e.g. no CUDA compiler)
  cuda_runtime = 18,        //!< the CUDA runtime reported an error
  bad_file = 19,            //!< malformed or unreadable input file (CLI, .npy, JSON)
};

//! A readable name for a reason, e.g. "null_pointer".
inline const char* to_string(reason r) noexcept {
  switch (r) {
    case reason::none: return "none";
    case reason::null_pointer: return "null_pointer";
    case reason::negative_extent: return "negative_extent";
    case reason::negative_stride: return "negative_stride";
    case reason::overlapping_strides: return "overlapping_strides";
    case reason::misaligned: return "misaligned";
    case reason::shape_mismatch: return "shape_mismatch";
    case reason::out_of_range: return "out_of_range";
    case reason::not_ascending: return "not_ascending";
    case reason::nonfinite_input: return "nonfinite_input";
    case reason::negative_input: return "negative_input";
    case reason::infeasible_budget: return "infeasible_budget";
    case reason::infeasible_bounds: return "infeasible_bounds";
    case reason::bad_parameter: return "bad_parameter";
    case reason::overlapping_buffers: return "overlapping_buffers";
    case reason::workspace_too_small: return "workspace_too_small";
    case reason::capacity_exceeded: return "capacity_exceeded";
    case reason::unsupported: return "unsupported";
    case reason::cuda_runtime: return "cuda_runtime";
    case reason::bad_file: return "bad_file";
  }
  return "unknown";
}

//! What the last rejected call on this thread said. `message` points to a string literal (static storage).
struct error_info {
  cudaError_t code = cudaSuccess;
  reason why = reason::none;
  const char* message = "";
};

namespace detail {
inline error_info& thread_error_slot() noexcept {
  static thread_local error_info slot{};
  return slot;
}
}  // namespace detail

//! The reason recorded by the last rejected prefixkv call on this thread.
inline error_info last_error() noexcept { return detail::thread_error_slot(); }

//! Forget the recorded reason.
inline void clear_last_error() noexcept { detail::thread_error_slot() = error_info{}; }

namespace detail {
//! Record a rejection and return its code (`cudaErrorInvalidValue` unless told otherwise).
inline cudaError_t fail(reason why, const char* message, cudaError_t code = cudaErrorInvalidValue) noexcept {
  error_info& slot = thread_error_slot();
  slot.code = code;
  slot.why = why;
  slot.message = message;
  return code;
}
}  // namespace detail

//! Return early from the enclosing function when `expr` yields an error.
#define PREFIXKV_TRY(expr)                 \
  do {                                     \
    const cudaError_t prefixkv_e_ = (expr); \
    if (prefixkv_e_ != cudaSuccess) return prefixkv_e_; \
  } while (0)

PREFIXKV_NAMESPACE_END
