//! \file prefixkv/select/selection.hpp
//! The kept-token selection: the contract between the solver (which decides how many tokens each segment keeps
//! and which) and the compaction kernels (which move the kept rows).
//!
//! For S segments, segment s keeps `offsets[s+1] - offsets[s]` tokens, whose positions (0-based token indices
//! within the segment, protected tokens included) are `indices[offsets[s] .. offsets[s+1])`, strictly
//! ascending. `offsets` is cu_seqlens-style (S + 1 entries, offsets[0] == 0), so after compaction it is also
//! the varlen-attention offset array of the compacted cache.
#pragma once

#include "../core/views.hpp"

PREFIXKV_NAMESPACE_BEGIN

//! Non-owning view of a selection (host or device memory).
struct selection {
  int64_t count = 0;                //!< segments S
  const int64_t* offsets = nullptr; //!< (S + 1) kept offsets
  const int32_t* indices = nullptr; //!< (offsets[S]) kept positions, ascending within each segment

  PREFIXKV_HOST_DEVICE int64_t kept(int64_t s) const { return offsets[s + 1] - offsets[s]; }
  PREFIXKV_HOST_DEVICE const int32_t* row(int64_t s) const { return indices + offsets[s]; }
  //! The kept-index rows as `segments` (for code written against the generic ragged-row view).
  PREFIXKV_HOST_DEVICE segments as_segments() const { return make_offset_segments(count, offsets); }
};

PREFIXKV_NAMESPACE_END
