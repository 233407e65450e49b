//! \file prefixkv/curve/curve.cuh
//! Device curve builder: the CUDA version of `build_curves_host` (curve.hpp), producing a `curve_set` whose
//! arrays are all device pointers, directly consumable by the device solver — no host sync anywhere.
//!
//! Pipeline (one stream, 6 launches + CUB's): candidate counts and `tokens` per segment; (S+1) offsets by a
//! device scan; a capacity guard; gather of the candidate scores (protected positions skipped, positions
//! pre-filled ascending, -0 canonicalised to +0, NaN/Inf/negative flagged); CUB's stable segmented sort,
//! descending by score (so ties keep ascending positions: the host rule), in calls of at most 256 segments
//! (CUB's DeviceSegmentedSort syncs the host when given more than its partitioning threshold of 300-500
//! segments at once); then one block per segment reduces the mass and scans the normalised inclusive prefix sum
//! in double precision.
//!
//! Agreement with the host twin: positions and sorted scores are identical (same total order: score
//! descending, position ascending); cumulative values differ by at most 1 float ulp (both accumulate in
//! double; only the summation order differs), and the last value of every non-empty curve is exactly 1.
//!
//! \code
//! // scores: device, rows: device cu_seqlens over S = layers * batch segments; capacity >= total candidates
//! prefixkv::curve_device_out out{d_offsets /*S+1*/, d_tokens /*S*/, d_positions, d_cumulative, d_sorted};
//! prefixkv::curve_set curves;
//! size_t bytes = 0;
//! PREFIXKV_TRY(prefixkv::build_curves(nullptr, bytes, d_scores, rows, {}, capacity, out, curves, d_status, s));
//! PREFIXKV_TRY(prefixkv::build_curves(d_temp, bytes, d_scores, rows, {}, capacity, out, curves, d_status, s));
//! // `curves` now points at device memory: hand it to the device solver on the same stream.
//! \endcode
#pragma once

#include "curve.hpp"

#include "../core/launch.cuh"
#include "../core/workspace.hpp"
#include "../score/score.hpp"  // status_bits

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_scan.cuh>
#include <cub/device/device_segmented_sort.cuh>

PREFIXKV_NAMESPACE_BEGIN

//! Caller-owned device outputs of `build_curves`.
struct curve_device_out {
  int64_t* offsets = nullptr;      //!< (S + 1) candidate offsets
  int64_t* tokens = nullptr;       //!< (S) tokens per segment
  int32_t* positions = nullptr;    //!< (capacity) token position of each rank
  float* cumulative = nullptr;     //!< (capacity) normalised inclusive prefix sums
  float* sorted_scores = nullptr;  //!< (capacity) ranked scores, or null (then kept in the workspace)
};

namespace detail {

inline constexpr int64_t curve_sort_chunk = 256;  // segments per CUB call (below its host-sync threshold)

template <int = 0>
PREFIXKV_KERNEL void curve_counts_kernel(segments rows, protect_policy protect, int64_t* offsets, int64_t* tokens,
                                         unsigned* status) {
  for (int64_t s = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; s < rows.count; s += int64_t(gridDim.x) * blockDim.x) {
    int64_t n = rows.length(s);
    if (n < 0 || rows.begin(s) < 0) {
      if (status) atomicOr(status, status_bad_length);
      n = 0;
    }
    tokens[s] = n;
    offsets[s + 1] = candidate_count(n, protect);
    if (s == 0) offsets[0] = 0;
  }
}

//! Empty every curve (and flag) when the candidates exceed the capacity, so nothing downstream overruns.
template <int = 0>
PREFIXKV_KERNEL void curve_capacity_guard(int64_t* offsets, int64_t S, int64_t capacity, unsigned* status) {
  if (offsets[S] <= capacity) return;
  __syncthreads();
  for (int64_t s = threadIdx.x; s <= S; s += blockDim.x) offsets[s] = 0;
  if (threadIdx.x == 0 && status) atomicOr(status, status_capacity);
}

template <int = 0>
PREFIXKV_KERNEL void curve_gather_kernel(const float* scores, segments rows, protect_policy protect,
                                         const int64_t* offsets, const int64_t* tokens, float* keys, int32_t* vals,
                                         unsigned* status) {
  unsigned bad = 0;
  for (int64_t s = blockIdx.y; s < rows.count; s += gridDim.y) {
    const int64_t n = tokens[s], c = offsets[s + 1] - offsets[s];
    const bool write = c == candidate_count(n, protect);  // false after the capacity guard emptied the curves
    const float* row = scores + rows.begin(s);
    const int64_t base = offsets[s], first = protect.sinks;
    for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < n; t += int64_t(gridDim.x) * blockDim.x) {
      float x = row[t];
      if (!isfinite(x)) bad |= status_nonfinite;
      if (x < 0.0f) bad |= status_negative;
      x = x == 0.0f ? 0.0f : x;  // -0 -> +0 (the host compares -0 == +0)
      const int64_t j = t - first;
      if (write && j >= 0 && j < c) {
        keys[base + j] = x;
        vals[base + j] = static_cast<int32_t>(t);
      }
    }
  }
  if (bad && status) atomicOr(status, bad);
}

template <int Threads, int Items>
PREFIXKV_KERNEL void __launch_bounds__(Threads) curve_cumulative_kernel(const int64_t* offsets, int64_t S,
                                                                        const float* sorted, float* cumulative) {
  using reduce_t = cub::BlockReduce<double, Threads>;
  using scan_t = cub::BlockScan<double, Threads>;
  __shared__ union {
    typename reduce_t::TempStorage reduce;
    typename scan_t::TempStorage scan;
  } tmp;
  __shared__ double mass_s;
  for (int64_t s = blockIdx.x; s < S; s += gridDim.x) {
    const int64_t base = offsets[s], c = offsets[s + 1] - base;
    if (c <= 0) continue;
    double part = 0.0;
    for (int64_t i = threadIdx.x; i < c; i += Threads) part += sorted[base + i];
    const double mass = reduce_t(tmp.reduce).Sum(part);
    if (threadIdx.x == 0) mass_s = mass;
    __syncthreads();
    const double M = mass_s;
    double carry = 0.0;
    for (int64_t start = 0; start < c; start += int64_t(Threads) * Items) {
      double v[Items];
      double tsum = 0.0;
      const int64_t i0 = start + int64_t(threadIdx.x) * Items;
#pragma unroll
      for (int k = 0; k < Items; ++k) {
        v[k] = i0 + k < c ? double(sorted[base + i0 + k]) : 0.0;
        tsum += v[k];
      }
      double excl, total;
      scan_t(tmp.scan).ExclusiveSum(tsum, excl, total);
      double run = carry + excl;
#pragma unroll
      for (int k = 0; k < Items; ++k) {
        run += v[k];
        const int64_t r = i0 + k;
        if (r < c) cumulative[base + r] = static_cast<float>(M > 0.0 ? run / M : double(r + 1) / double(c));
      }
      carry += total;
      __syncthreads();
    }
  }
}

}  // namespace detail

//! Device curve builder. Same semantics as `build_curves_host`, outputs in caller memory `out`, and `set`
//! receives a `curve_set` of device pointers (`count`, `offsets`, `tokens`, `positions`, `cumulative`,
//! `sorted_scores`, `protect`) — valid once the stream reaches this point; nothing is read back.
//! scores: device flat scores addressed by `rows` (device or uniform segments, S = rows.count);
//! capacity: host-known upper bound of the total candidates (e.g. total tokens) sizing positions/cumulative and
//! the workspace. Bad scores (NaN/Inf/negative) and an exceeded capacity are reported through `d_status`.
[[nodiscard]] inline cudaError_t build_curves(void* d_temp, size_t& temp_bytes, const float* scores, segments rows,
                                              protect_policy protect, int64_t capacity, curve_device_out out,
                                              curve_set& set, unsigned* d_status = nullptr, cudaStream_t stream = 0) {
  PREFIXKV_TRY(validate(rows));
  PREFIXKV_TRY(validate(protect));
  if (capacity < 0) return detail::fail(reason::negative_extent, "build_curves: capacity is negative");
  const int64_t S = rows.count;
  if (S > 0 && (out.offsets == nullptr || out.tokens == nullptr))
    return detail::fail(reason::null_pointer, "build_curves: out.offsets / out.tokens is null");
  if (S > 0 && capacity > 0 && (out.positions == nullptr || out.cumulative == nullptr || scores == nullptr))
    return detail::fail(reason::null_pointer, "build_curves: scores / out.positions / out.cumulative is null");
  if (protect.sinks > INT32_MAX) return detail::fail(reason::bad_parameter, "build_curves: sinks too large");
  if (rows.offsets == nullptr && S > 0) {
    if (rows.uniform_length > INT32_MAX) return detail::fail(reason::out_of_range, "build_curves: rows longer than int32 positions");
    if (candidate_count(rows.uniform_length, protect) * S > capacity)
      return detail::fail(reason::capacity_exceeded, "build_curves: candidates exceed the capacity given");
  }
  const int64_t chunk = S < detail::curve_sort_chunk ? S : detail::curve_sort_chunk;
  const int64_t last = S > 0 ? S - (S - 1) / detail::curve_sort_chunk * detail::curve_sort_chunk : 0;
  size_t sort_bytes = 0, sort_bytes_last = 0, scan_bytes = 0;
  const int64_t cap = capacity > 0 ? capacity : 1;
  PREFIXKV_TRY(detail::check_runtime(
      cub::DeviceSegmentedSort::StableSortPairsDescending(nullptr, sort_bytes, static_cast<const float*>(nullptr),
                                                          static_cast<float*>(nullptr), static_cast<const int32_t*>(nullptr),
                                                          static_cast<int32_t*>(nullptr), cap, chunk > 0 ? chunk : 1,
                                                          static_cast<const int64_t*>(nullptr),
                                                          static_cast<const int64_t*>(nullptr), stream),
      "build_curves: sort size query failed"));
  if (last > 0 && last != chunk)
    PREFIXKV_TRY(detail::check_runtime(
        cub::DeviceSegmentedSort::StableSortPairsDescending(nullptr, sort_bytes_last, static_cast<const float*>(nullptr),
                                                            static_cast<float*>(nullptr), static_cast<const int32_t*>(nullptr),
                                                            static_cast<int32_t*>(nullptr), cap, last,
                                                            static_cast<const int64_t*>(nullptr),
                                                            static_cast<const int64_t*>(nullptr), stream),
        "build_curves: sort size query failed"));
  PREFIXKV_TRY(detail::check_runtime(cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, static_cast<int64_t*>(nullptr),
                                                                   static_cast<int64_t*>(nullptr), S > 0 ? S : 1, stream),
                                     "build_curves: scan size query failed"));
  workspace_layout<5> ws;
  ws.reserve<float>(0, size_t(cap));
  ws.reserve<int32_t>(1, size_t(cap));
  if (out.sorted_scores == nullptr) ws.reserve<float>(2, size_t(cap));
  ws.reserve_bytes(3, sort_bytes > sort_bytes_last ? sort_bytes : sort_bytes_last);
  ws.reserve_bytes(4, scan_bytes);
  if (d_temp == nullptr) {
    temp_bytes = ws.bytes();
    return cudaSuccess;
  }
  PREFIXKV_TRY(ws.map(d_temp, temp_bytes));
  float* keys_in = ws.get<float>(0);
  int32_t* vals_in = ws.get<int32_t>(1);
  float* keys_out = out.sorted_scores ? out.sorted_scores : ws.get<float>(2);
  set = curve_set{};
  set.count = S;
  set.offsets = out.offsets;
  set.tokens = out.tokens;
  set.positions = out.positions;
  set.cumulative = out.cumulative;
  set.sorted_scores = keys_out;
  set.protect = protect;
  if (S == 0) return cudaSuccess;

  const int64_t blocks_s = (S + 255) / 256;
  detail::curve_counts_kernel<><<<unsigned(blocks_s < 1024 ? blocks_s : 1024), 256, 0, stream>>>(rows, protect, out.offsets,
                                                                                             out.tokens, d_status);
  PREFIXKV_TRY(detail::check_launch(stream));
  size_t sb = scan_bytes;
  PREFIXKV_TRY(detail::check_runtime(cub::DeviceScan::InclusiveSum(ws.get<void>(4), sb, out.offsets + 1, out.offsets + 1, S, stream),
                                     "build_curves: scan failed"));
  detail::curve_capacity_guard<><<<1, 256, 0, stream>>>(out.offsets, S, capacity, d_status);
  PREFIXKV_TRY(detail::check_launch(stream));
  if (capacity == 0) return cudaSuccess;
  const int64_t per_seg = (capacity / S + 1023) / 1024;
  const dim3 gg(unsigned(per_seg < 1 ? 1 : (per_seg > 256 ? 256 : per_seg)), unsigned(S < 65535 ? S : 65535));
  detail::curve_gather_kernel<><<<gg, 256, 0, stream>>>(scores, rows, protect, out.offsets, out.tokens, keys_in, vals_in,
                                                      d_status);
  PREFIXKV_TRY(detail::check_launch(stream));
  for (int64_t c0 = 0; c0 < S; c0 += detail::curve_sort_chunk) {
    const int64_t ns = S - c0 < detail::curve_sort_chunk ? S - c0 : detail::curve_sort_chunk;
    size_t bytes = ws.size_of(3);
    PREFIXKV_TRY(detail::check_runtime(
        cub::DeviceSegmentedSort::StableSortPairsDescending(ws.get<void>(3), bytes, keys_in, keys_out, vals_in,
                                                            out.positions, capacity, ns, out.offsets + c0,
                                                            out.offsets + c0 + 1, stream),
        "build_curves: segmented sort failed"));
  }
  const int64_t cb = S < 4096 ? S : 4096;
  detail::curve_cumulative_kernel<256, 4><<<unsigned(cb), 256, 0, stream>>>(out.offsets, S, keys_out, out.cumulative);
  return detail::check_launch(stream);
}

//! Workspace-free helper for tests and benchmarks: the CUB sort alone, as `build_curves` calls it (the baseline
//! the curve benchmark compares against).
[[nodiscard]] inline cudaError_t segmented_sort_only(void* d_temp, size_t& temp_bytes, const float* keys_in,
                                                     float* keys_out, const int32_t* vals_in, int32_t* vals_out,
                                                     int64_t capacity, const int64_t* offsets, int64_t S,
                                                     cudaStream_t stream = 0) {
  const int64_t chunk = S < detail::curve_sort_chunk ? S : detail::curve_sort_chunk;
  if (d_temp == nullptr)
    return cub::DeviceSegmentedSort::StableSortPairsDescending(nullptr, temp_bytes, keys_in, keys_out, vals_in,
                                                               vals_out, capacity, chunk > 0 ? chunk : 1, offsets,
                                                               offsets + 1, stream);
  for (int64_t c0 = 0; c0 < S; c0 += detail::curve_sort_chunk) {
    const int64_t ns = S - c0 < detail::curve_sort_chunk ? S - c0 : detail::curve_sort_chunk;
    size_t bytes = temp_bytes;
    PREFIXKV_TRY(cub::DeviceSegmentedSort::StableSortPairsDescending(d_temp, bytes, keys_in, keys_out, vals_in,
                                                                     vals_out, capacity, ns, offsets + c0,
                                                                     offsets + c0 + 1, stream));
  }
  return cudaSuccess;
}

PREFIXKV_NAMESPACE_END
