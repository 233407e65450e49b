//! \file prefixkv/select/select.cuh
//! Device selection writer: per segment, the kept positions (protected + the first k_s ranked candidates) in
//! ascending order, as a `selection`. Same output as `write_selection_host` (select.hpp).
//!
//! Two launches, no temporary storage, no host sync (graph-capturable):
//! 1. one block scans the keep counts into `offsets` (S + 1) and clears `status`;
//! 2. one block per segment marks the kept positions in a shared-memory bitmap (256K positions per tile; longer
//!    segments loop over tiles), ORs in the protected ranges, and compacts the set bits in order with a block
//!    scan.
//!
//! \code
//! size_t bytes = 0;
//! prefixkv::write_selection(nullptr, bytes, d_curves, d_keep, d_offsets, d_indices, capacity, d_status, stream);
//! // ... allocate bytes ...
//! prefixkv::write_selection(d_temp, bytes, d_curves, d_keep, d_offsets, d_indices, capacity, d_status, stream);
//! prefixkv::selection sel{S, d_offsets, d_indices};
//! \endcode
#pragma once

#include "../core/launch.cuh"
#include "../core/workspace.hpp"
#include "../curve/curve.hpp"
#include "block_util.cuh"
#include "select.hpp"
#include "selection.hpp"

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

inline constexpr int select_scan_threads = 1024;
inline constexpr int select_threads = 256;
inline constexpr int select_words_per_thread = 32;
inline constexpr int64_t select_tile_words = int64_t(select_threads) * select_words_per_thread;  // 8192 words
inline constexpr int64_t select_tile = select_tile_words * 32;                                   // 262144 positions

__device__ inline void set_status(int32_t* status, reason why) {
  if (status) atomicCAS(reinterpret_cast<int*>(status), 0, static_cast<int>(why));
}

// keep counts clamped to [protected, tokens] -> offsets (S + 1)
// Kernels in headers are templates (a dummy parameter) so that several translation units may include them.
template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(select_scan_threads)
    selection_offsets_kernel(curve_set cv, const int64_t* keep, int64_t* offsets, int32_t* status) {
  __shared__ block_scratch sc;
  const int64_t S = cv.count;
  if (threadIdx.x == 0) {
    offsets[0] = 0;
    if (status) *status = 0;
  }
  __syncthreads();  // status cleared before anyone reports
  long long carry = 0;
  for (int64_t c0 = 0; c0 < S; c0 += select_scan_threads) {
    const int64_t s = c0 + threadIdx.x;
    long long k = 0;
    if (s < S) {
      const int64_t n = cv.tokens[s], c = cv.offsets[s + 1] - cv.offsets[s];
      const int64_t prot = n - c;
      k = keep[s];
      if (n < 0 || c != candidate_count(n, cv.protect) || k < prot || k > n) {
        // report, and keep the slot well-formed
        if (status) atomicCAS(reinterpret_cast<int*>(status), 0, static_cast<int>(reason::out_of_range));
        k = k < prot ? prot : (k > n ? n : k);
        if (k < 0) k = 0;
      }
    }
    long long total = 0;
    const long long ex = block_exclusive_sum(k, total, sc);
    if (s < S) offsets[s + 1] = carry + ex + k;
    carry += total;
  }
}

__device__ inline uint32_t mask_below(int64_t x, int64_t p0) {  // bits of positions p0 + b < x
  if (x <= p0) return 0u;
  if (x >= p0 + 32) return 0xFFFFFFFFu;
  return (1u << (x - p0)) - 1u;
}

template <int = 0>
PREFIXKV_KERNEL void __launch_bounds__(select_threads)
    selection_write_kernel(curve_set cv, const int64_t* offsets, int32_t* indices, int64_t capacity,
                           int32_t* status) {
  __shared__ uint32_t bitmap[select_tile_words];
  __shared__ block_scratch sc;
  const int tid = threadIdx.x;
  for (int64_t s = blockIdx.x; s < cv.count; s += gridDim.x) {
    const int64_t n = cv.tokens[s], o = cv.offsets[s], c = cv.offsets[s + 1] - o;
    const int64_t out0 = offsets[s], out1 = offsets[s + 1];
    if (n < 0 || c != candidate_count(n, cv.protect)) continue;  // reported by the offsets kernel
    if (out1 > capacity) {
      if (tid == 0) set_status(status, reason::capacity_exceeded);
      continue;
    }
    const int64_t k = (out1 - out0) - (n - c);  // kept candidates
    const int64_t sinks = cv.protect.sinks < n ? cv.protect.sinks : n;
    const int64_t rstart = n - cv.protect.recent > 0 ? n - cv.protect.recent : 0;
    int64_t written = 0;
    for (int64_t t0 = 0; t0 < n; t0 += select_tile) {
      const int64_t len = n - t0 < select_tile ? n - t0 : select_tile;
      const int64_t tile_words = (len + 31) / 32;
      const int64_t chunk = (tile_words + select_threads - 1) / select_threads;  // <= select_words_per_thread
      const int64_t w0 = int64_t(tid) * chunk;
      for (int64_t w = tid; w < tile_words; w += select_threads) bitmap[w] = 0u;
      __syncthreads();
      for (int64_t r = tid; r < k; r += select_threads) {
        const int64_t pos = cv.positions[o + r];
        if (pos < 0 || pos >= n || is_protected(pos, n, cv.protect)) {
          if (t0 == 0) set_status(status, reason::out_of_range);
          continue;
        }
        if (pos >= t0 && pos < t0 + len) {
          const int64_t b = pos - t0;
          atomicOr(&bitmap[b >> 5], 1u << (b & 31));
        }
      }
      __syncthreads();
      // each thread owns words [w0, w0 + chunk) of the tile
      uint32_t words[select_words_per_thread];
      long long mine = 0;
#pragma unroll
      for (int j = 0; j < select_words_per_thread; ++j) {
        const int64_t wi = w0 + j;
        uint32_t bits = 0u;
        if (j < chunk && wi < tile_words) {
          const int64_t p0 = t0 + wi * 32;
          bits = bitmap[wi];
          bits |= mask_below(sinks, p0) | ~mask_below(rstart, p0);
          bits &= mask_below(n, p0);
        }
        words[j] = bits;
        mine += __popc(bits);
      }
      long long tile_total = 0;
      int64_t dst = out0 + written + block_exclusive_sum(mine, tile_total, sc);
#pragma unroll
      for (int j = 0; j < select_words_per_thread; ++j) {
        uint32_t bits = words[j];
        const int64_t p0 = t0 + (w0 + j) * 32;
        while (bits) {
          const int b = __ffs(bits) - 1;
          bits &= bits - 1;
          if (dst < out1) indices[dst] = static_cast<int32_t>(p0 + b);
          ++dst;
        }
      }
      written += tile_total;
      __syncthreads();  // bitmap reuse
    }
    if (tid == 0 && written != out1 - out0) set_status(status, reason::out_of_range);
  }
}

}  // namespace detail

//! Device selection writer. All arrays are device pointers.
//! * `curves`: device curve_set (S segments), `positions` read for the first k_s ranks of each segment;
//! * `keep`: (S) tokens kept per segment, protected included (the solver's output);
//! * `offsets`: (S + 1) output, exclusive scan of keep;
//! * `indices`: (capacity) output, kept positions ascending per segment. `capacity` is a host-known upper bound
//!   of sum(keep) (e.g. the total token count);
//! * `status`: (1) optional output: 0, or the first problem found on the device (`reason::out_of_range` for a
//!   keep count outside [protected, tokens] (clamped) or a bad/repeated position (skipped),
//!   `reason::capacity_exceeded` for segments that do not fit `indices` (not written)).
[[nodiscard]] inline cudaError_t write_selection(void* d_temp, size_t& temp_bytes, const curve_set& curves,
                                                 const int64_t* keep, int64_t* offsets, int32_t* indices,
                                                 int64_t capacity, int32_t* status = nullptr,
                                                 cudaStream_t stream = 0) noexcept {
  PREFIXKV_TRY(validate(curves.protect));
  if (curves.count < 0 || capacity < 0)
    return detail::fail(reason::negative_extent, "write_selection: negative count or capacity");
  if (offsets == nullptr) return detail::fail(reason::null_pointer, "write_selection: offsets is null");
  if (curves.count > 0 && (curves.offsets == nullptr || curves.tokens == nullptr || keep == nullptr))
    return detail::fail(reason::null_pointer, "write_selection: curves or keep is null");
  if (curves.count > 0 && capacity > 0 && (indices == nullptr || curves.positions == nullptr))
    return detail::fail(reason::null_pointer, "write_selection: indices or positions is null");
  workspace_layout<1> ws;
  if (d_temp == nullptr) {
    temp_bytes = ws.bytes();
    return cudaSuccess;
  }
  PREFIXKV_TRY(ws.map(d_temp, temp_bytes));
  detail::selection_offsets_kernel<><<<1, detail::select_scan_threads, 0, stream>>>(curves, keep, offsets, status);
  PREFIXKV_TRY(detail::check_launch(stream));
  if (curves.count == 0) return cudaSuccess;
  const int64_t grid = curves.count < 65535 * 16 ? curves.count : 65535 * 16;
  detail::selection_write_kernel<><<<static_cast<unsigned>(grid), detail::select_threads, 0, stream>>>(
      curves, offsets, indices, capacity, status);
  return detail::check_launch(stream);
}

PREFIXKV_NAMESPACE_END
