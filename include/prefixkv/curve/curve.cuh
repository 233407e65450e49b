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
//! Bad scores: the host twin rejects NaN, infinite and negative scores (`reason::nonfinite_input`,
//! `reason::negative_input`; -0.0 counts as 0). The device builder reads every score of every row (protected
//! ones included), ORs `status_nonfinite` / `status_negative` into `d_status` (`read_status` turns them into those
//! reasons) and then empties every curve of the call (all offsets 0, as for an exceeded capacity): no ranking is
//! ever produced from such scores, and a device solver fed the empty curves reports `reason::shape_mismatch`
//! and keeps every token.
//!
//! Agreement with the host twin: bit-identical. Positions and sorted scores follow the same total order (score
//! descending, position ascending), and the prefix sums are added in double in the order `curve_prefix_host`
//! (curve.hpp) defines, so cumulative values are the same floats; the last value of every non-empty curve is 1.
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

#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <cub/device/device_segmented_sort.cuh>

#include <type_traits>

PREFIXKV_NAMESPACE_BEGIN

//! Caller-owned device outputs of `build_curves`.
struct curve_device_out {
  int64_t* offsets = nullptr;      //!< (S + 1) candidate offsets
  int64_t* tokens = nullptr;       //!< (S) tokens per segment
  int32_t* positions = nullptr;    //!< (capacity) token position of each rank
  float* cumulative = nullptr;     //!< (capacity) normalised inclusive prefix sums
  float* sorted_scores = nullptr;  //!< (capacity) ranked scores, or null (then kept in the workspace)
};

//! Which CUB sort ranks the candidates (`build_curves`). All give identical curves; they differ in speed only
//! (bench/curve/RESULTS.md has the measurements behind `automatic`).
enum class curve_sort {
  automatic,  //!< `block` when every segment provably fits one block, else `radix`
  block,      //!< one thread block per segment: load, cub::BlockRadixSort and the prefix sum fused in one kernel;
              //!< only when the host can prove every segment has <= `curve_block_capacity` candidates (uniform
              //!< rows that short, or a capacity that small)
  radix,      //!< one cub::DeviceRadixSort over (segment, score) composite 64-bit keys: cost grows with the total
              //!< number of candidates only, whatever the segment lengths
  segmented,  //!< cub::DeviceSegmentedSort, in calls of at most 256 segments
};

//! Options of `build_curves`.
struct curve_options {
  curve_sort method = curve_sort::automatic;  //!< which sort ranks the candidates (all give the same curves)
  //! A host-known upper bound of every row's length (tokens), or -1. Rows longer than it are flagged
  //! (`status_bad_length`) and treated as empty; in exchange, `automatic` can prove that every segment fits one
  //! block and take the one-kernel `block` path for ragged device rows too.
  int64_t max_row = -1;
};

//! Most candidates one segment may have for `curve_sort::block`.
inline constexpr int64_t curve_block_capacity = 4096;

namespace detail {

inline constexpr int curve_block_threads = 512;
inline constexpr int curve_block_items = 8;
static_assert(int64_t(curve_block_threads) * curve_block_items == curve_block_capacity, "block sort geometry");

inline constexpr int64_t curve_sort_chunk = 256;  // segments per CUB call (below its host-sync threshold)

//! Internal flag words of one call (workspace): [0] the bad-score bits met, [1] blocks finished (last-block
//! detection). Reset by the first kernel of every call.
inline constexpr int curve_flag_words = 2;
inline constexpr unsigned curve_reject_bits = status_negative | status_nonfinite;

template <int = 0>
PREFIXKV_KERNEL void curve_counts_kernel(segments rows, protect_policy protect, int64_t* offsets, int64_t* tokens,
                                         unsigned* status, unsigned* flags, int64_t max_row) {
  if (blockIdx.x == 0 && threadIdx.x < curve_flag_words) flags[threadIdx.x] = 0u;
  for (int64_t s = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; s < rows.count; s += int64_t(gridDim.x) * blockDim.x) {
    int64_t n = rows.length(s);
    const int64_t b0 = rows.begin(s);
    if (n < 0 || n > INT32_MAX || b0 < 0 || b0 > INT64_MAX - n ||  // (positions are int32; begin + n fits int64)
        (max_row >= 0 && n > max_row)) {                           // (the caller's bound, relied on by `block`)
      if (status) atomicOr(status, status_bad_length);
      n = 0;
    }
    tokens[s] = n;
    // uniform rows: the offsets are known in closed form (no scan launch needed)
    offsets[s + 1] = rows.offsets == nullptr ? (s + 1) * candidate_count(n, protect) : candidate_count(n, protect);
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

//! OR bad-score bits into the internal flags and the caller's status word.
__device__ inline void curve_report(unsigned* flags, unsigned* status, unsigned bad) {
  if (bad == 0u) return;
  atomicOr(flags, bad);
  if (status) atomicOr(status, bad);
}

//! Called once by every block of the last kernel that reads `offsets` (all threads, after the block's work):
//! the last block to finish empties every curve (offsets all 0) when any score was negative, NaN or infinite,
//! so a caller that skips the status word still gets no ranking (the solver then reports shape_mismatch and
//! keeps every token) — the device form of the host twin's rejection.
template <int = 0>
__device__ void curve_finish_block(int64_t* offsets, int64_t S, unsigned* flags) {
  __shared__ bool last;
  __threadfence();  // every thread: its flag bits and outputs are ordered before the block's count
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned done = atomicAdd(&flags[1], 1u);
    last = done == gridDim.x * gridDim.y - 1u;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const unsigned bad = atomicOr(&flags[0], 0u);  // (an atomic read: coherent with the other blocks' ORs)
  if (bad & curve_reject_bits)
    for (int64_t s = threadIdx.x; s <= S; s += blockDim.x) offsets[s] = 0;
}

//! `curve_sort::radix` key: segment in the high bits, then the 31 magnitude bits of the score inverted, so one
//! ascending radix sort orders by segment, then score descending; ties keep input (= position) order.
__device__ inline uint64_t curve_composite_key(int64_t segment, float score) {
  const uint32_t bits = __float_as_uint(score);
  return (uint64_t(segment) << 31) | uint64_t(0x7FFFFFFFu - (bits & 0x7FFFFFFFu));
}

__device__ inline float curve_key_score(uint64_t key) {
  return __uint_as_float(0x7FFFFFFFu - uint32_t(key & 0x7FFFFFFFu));
}

//! Gather of the candidates (positions pre-filled ascending, -0 canonicalised to +0, NaN/Inf/negative flagged).
//! Key = the score (`curve_sort::segmented`, Key = float) or the composite (segment, score) key
//! (`curve_sort::radix`, Key = uint64_t; the unused tail [total, capacity) then gets the largest key so it stays
//! behind every real candidate).
template <class Key>
PREFIXKV_KERNEL void curve_gather_kernel(const float* scores, segments rows, protect_policy protect,
                                         const int64_t* offsets, const int64_t* tokens, int64_t capacity, Key* keys,
                                         int32_t* vals, unsigned* status, unsigned* flags) {
  constexpr bool composite = std::is_same<Key, uint64_t>::value;
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
        if constexpr (composite) keys[base + j] = curve_composite_key(s, x);
        else keys[base + j] = x;
        vals[base + j] = static_cast<int32_t>(t);
      }
    }
  }
  if constexpr (composite) {
    const int64_t total = offsets[rows.count];
    const int64_t nthreads = int64_t(gridDim.x) * gridDim.y * blockDim.x;
    const int64_t tid = (int64_t(blockIdx.y) * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
    for (int64_t i = total + tid; i < capacity; i += nthreads) keys[i] = ~uint64_t(0);
  }
  curve_report(flags, status, bad);
}

//! Chunk sums of a tile -> (in `part`) each chunk's exclusive prefix inside its group (warp), and (in `gtot`) each
//! group's total: one lane per warp sums left to right, as `curve_prefix_host` does.
template <int Threads>
__device__ inline void curve_group_scan(double* part, double* gtot) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncwarp();
  if (lane == 0) {
    double run = 0.0;
    for (int j = 0; j < 32; ++j) {
      const double x = part[warp * 32 + j];
      part[warp * 32 + j] = run;
      run += x;
    }
    gtot[warp] = run;
  }
}

//! Normalised inclusive prefix sums of ranked rows, summed in the order `curve_prefix_host` defines (bit-identical
//! to the host twin): one block per segment, tiles of Threads x curve_chunk ranks, one warp per group.
template <int Threads, class Ranked>
PREFIXKV_KERNEL void __launch_bounds__(Threads) curve_cumulative_kernel(int64_t* offsets, int64_t S,
                                                                        Ranked sorted, float* cumulative,
                                                                        unsigned* flags) {
  constexpr int K = static_cast<int>(curve_chunk), W = Threads / 32;
  static_assert(curve_group == 32 && Threads % 32 == 0, "one warp per group of 32 chunks");
  __shared__ double part[Threads];
  __shared__ double gtot[W];
  __shared__ double mass_s;
  const int warp = threadIdx.x >> 5;
  for (int64_t s = blockIdx.x; s < S; s += gridDim.x) {
    const int64_t base = offsets[s], c = offsets[s + 1] - base;
    if (c <= 0) continue;
    // pass 1: the mass
    double mass = 0.0;  // thread 0
    for (int64_t start = 0; start < c; start += int64_t(Threads) * K) {
      const int64_t i0 = start + int64_t(threadIdx.x) * K;
      double p = 0.0;
#pragma unroll
      for (int k = 0; k < K; ++k)
        if (i0 + k < c) p += double(sorted(base + i0 + k));
      part[threadIdx.x] = p;
      curve_group_scan<Threads>(part, gtot);
      __syncthreads();
      if (threadIdx.x == 0)
        for (int w = 0; w < W; ++w) mass += gtot[w];
      __syncthreads();
    }
    if (threadIdx.x == 0) mass_s = mass;
    __syncthreads();
    const double M = mass_s;
    // pass 2: prefix = G + (C + p)
    double G = 0.0;  // thread 0
    for (int64_t start = 0; start < c; start += int64_t(Threads) * K) {
      const int64_t i0 = start + int64_t(threadIdx.x) * K;
      float v[K];
      double p = 0.0;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        v[k] = 0.0f;
        if (i0 + k < c) {
          v[k] = sorted(base + i0 + k);
          sorted.emit(base + i0 + k, v[k]);
          p += double(v[k]);
        }
      }
      part[threadIdx.x] = p;
      curve_group_scan<Threads>(part, gtot);
      __syncthreads();
      if (threadIdx.x == 0)
        for (int w = 0; w < W; ++w) {
          const double t = gtot[w];
          gtot[w] = G;
          G += t;
        }
      __syncthreads();
      const double Gw = gtot[warp], C = part[threadIdx.x];
      double run = 0.0;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t r = i0 + k;
        if (r < c) {
          run += double(v[k]);
          const double pre = Gw + (C + run);
          cumulative[base + r] = static_cast<float>(M > 0.0 ? pre / M : double(r + 1) / double(c));
        }
      }
      __syncthreads();
    }
  }
  curve_finish_block(offsets, S, flags);
}

//! Scan a row's protected positions (not loaded by the candidate paths) for NaN/Inf/negative scores.
template <int = 0>
__device__ unsigned curve_check_protected(const float* row, int64_t n, protect_policy protect) {
  unsigned bad = 0;
  const int64_t first = protect.sinks < n ? protect.sinks : n;
  const int64_t tail = n - protect.recent > first ? n - protect.recent : first;
  for (int64_t t = threadIdx.x; t < first + (n - tail); t += blockDim.x) {
    const float x = row[t < first ? t : tail + (t - first)];
    if (!isfinite(x)) bad |= status_nonfinite;
    if (x < 0.0f) bad |= status_negative;
  }
  return bad;
}

//! Scan a whole row (a row whose curve the capacity guard emptied: none of its scores is loaded otherwise).
template <int = 0>
__device__ unsigned curve_check_row(const float* row, int64_t n) {
  unsigned bad = 0;
  for (int64_t t = threadIdx.x; t < n; t += blockDim.x) {
    const float x = row[t];
    if (!isfinite(x)) bad |= status_nonfinite;
    if (x < 0.0f) bad |= status_negative;
  }
  return bad;
}

//! `curve_sort::block`: one block per segment (<= Threads * Items candidates): load the candidates of the row,
//! sort (score descending; BlockRadixSort is stable, so equal scores keep ascending positions), and write
//! positions, sorted scores and the normalised inclusive prefix sum (double) — one kernel for the whole curve.
template <int Threads, int Items>
PREFIXKV_KERNEL void __launch_bounds__(Threads) curve_block_kernel(const float* scores, segments rows,
                                                                   protect_policy protect, int64_t* offsets,
                                                                   const int64_t* tokens, int32_t* positions,
                                                                   float* sorted_out, float* cumulative,
                                                                   unsigned* status, unsigned* flags) {
  using sort_t = cub::BlockRadixSort<unsigned, Threads, Items, int32_t>;
  static_assert(Items == curve_chunk && Threads % 32 == 0, "thread t holds chunk t, warp w group w");
  __shared__ typename sort_t::TempStorage tmp_sort;
  __shared__ double part[Threads];
  __shared__ double gtot[Threads / 32];
  __shared__ double mass_s;
  unsigned bad = 0;
  for (int64_t s = blockIdx.x; s < rows.count; s += gridDim.x) {
    const int64_t n = tokens[s], base = offsets[s], c = offsets[s + 1] - base;
    const float* row = scores + rows.begin(s);
    if (c != candidate_count(n, protect)) {  // emptied by the capacity guard: still check its scores
      bad |= curve_check_row(row, n);
      continue;
    }
    bad |= curve_check_protected(row, n, protect);
    if (c <= 0) continue;
    unsigned key[Items];
    int32_t val[Items];
    const int64_t i0 = int64_t(threadIdx.x) * Items;
#pragma unroll
    for (int k = 0; k < Items; ++k) {
      const int64_t j = i0 + k;
      key[k] = 0u;  // padding sorts last (stable: after the real zeros, which come first in the input)
      val[k] = 0;
      if (j < c) {
        float x = row[protect.sinks + j];
        if (!isfinite(x)) bad |= status_nonfinite;
        if (x < 0.0f) bad |= status_negative;
        x = x == 0.0f ? 0.0f : x;  // -0 -> +0
        key[k] = __float_as_uint(x);
        val[k] = static_cast<int32_t>(protect.sinks + j);
      }
    }
    __syncthreads();  // tmp is reused across segments
    sort_t(tmp_sort).SortDescending(key, val);
    __syncthreads();
    // prefix sums in the order curve_prefix_host defines: thread t holds chunk t, warp w is group w
    double p = 0.0;
#pragma unroll
    for (int k = 0; k < Items; ++k)
      if (i0 + k < c) p += double(__uint_as_float(key[k]));
    part[threadIdx.x] = p;
    curve_group_scan<Threads>(part, gtot);
    __syncthreads();
    if (threadIdx.x == 0) {
      double G = 0.0;
      for (int w = 0; w < Threads / 32; ++w) {
        const double t = gtot[w];
        gtot[w] = G;
        G += t;
      }
      mass_s = G;
    }
    __syncthreads();
    const double mass = mass_s, Gw = gtot[threadIdx.x >> 5], C = part[threadIdx.x];
    double run = 0.0;
#pragma unroll
    for (int k = 0; k < Items; ++k) {
      const int64_t r = i0 + k;
      if (r < c) {
        const float x = __uint_as_float(key[k]);
        run += double(x);
        positions[base + r] = val[k];
        sorted_out[base + r] = x;
        const double pre = Gw + (C + run);
        cumulative[base + r] = static_cast<float>(mass > 0.0 ? pre / mass : double(r + 1) / double(c));
      }
    }
    __syncthreads();  // part / gtot / mass_s are reused by the next segment
  }
  curve_report(flags, status, bad);
  curve_finish_block(offsets, rows.count, flags);
}

//! Where the cumulative kernel reads ranked scores from: a float array, or sorted composite keys (+ the values
//! array to copy into the caller's positions when the sort left them elsewhere).
struct curve_ranked_floats {
  const float* sorted;
  __device__ float operator()(int64_t i) const { return sorted[i]; }
  __device__ void emit(int64_t, float) const {}
};
struct curve_ranked_keys {
  const uint64_t* keys;
  const int32_t* vals;
  int32_t* positions;
  float* sorted_out;
  __device__ float operator()(int64_t i) const { return curve_key_score(keys[i]); }
  __device__ void emit(int64_t i, float x) const {
    sorted_out[i] = x;
    if (vals != positions) positions[i] = vals[i];
  }
};

}  // namespace detail

//! Device curve builder. Same semantics as `build_curves_host`, outputs in caller memory `out`, and `set`
//! receives a `curve_set` of device pointers (`count`, `offsets`, `tokens`, `positions`, `cumulative`,
//! `sorted_scores`, `protect`) — valid once the stream reaches this point; nothing is read back.
//! scores: device flat scores addressed by `rows` (device or uniform segments, S = rows.count);
//! capacity: host-known upper bound of the total candidates (e.g. total tokens) sizing positions/cumulative and
//! the workspace. Bad scores (NaN/Inf/negative) and an exceeded capacity are reported through `d_status`, and
//! then every curve of the call is empty (offsets all 0).
//! opt: which CUB sort ranks the candidates (`curve_sort`; every method gives the same curves; `block` is refused
//! with `cudaErrorInvalidValue` unless the host can prove every segment fits one block) and an optional bound on
//! the row lengths (see `curve_options`).
[[nodiscard]] inline cudaError_t build_curves(void* d_temp, size_t& temp_bytes, const float* scores, segments rows,
                                              protect_policy protect, int64_t capacity, curve_device_out out,
                                              curve_set& set, curve_options opt, unsigned* d_status = nullptr,
                                              cudaStream_t stream = 0) noexcept {
  curve_sort method = opt.method;
  PREFIXKV_TRY(validate(rows));
  PREFIXKV_TRY(validate(protect));
  if (capacity < 0) return detail::fail(reason::negative_extent, "build_curves: capacity is negative");
  const int64_t S = rows.count;
  if (S > 0 && (out.offsets == nullptr || out.tokens == nullptr))
    return detail::fail(reason::null_pointer, "build_curves: out.offsets / out.tokens is null");
  if (S > 0 && capacity > 0 && (out.positions == nullptr || out.cumulative == nullptr || scores == nullptr))
    return detail::fail(reason::null_pointer, "build_curves: scores / out.positions / out.cumulative is null");
  if (protect.sinks > INT32_MAX) return detail::fail(reason::bad_parameter, "build_curves: sinks too large");
  const bool uniform = rows.offsets == nullptr;
  if (uniform && S > 0) {
    if (rows.uniform_length > INT32_MAX) return detail::fail(reason::out_of_range, "build_curves: rows longer than int32 positions");
    if (candidate_count(rows.uniform_length, protect) * S > capacity)
      return detail::fail(reason::capacity_exceeded, "build_curves: candidates exceed the capacity given");
  }
  // Which sort: `block` needs a host-side proof that no segment exceeds one block; the composite radix key needs
  // the segment id to fit beside the 31 score bits.
  if (opt.max_row > INT32_MAX) return detail::fail(reason::out_of_range, "build_curves: max_row beyond int32 positions");
  const bool block_ok = capacity <= curve_block_capacity ||
                        (uniform && candidate_count(rows.uniform_length, protect) <= curve_block_capacity) ||
                        (opt.max_row >= 0 && candidate_count(opt.max_row, protect) <= curve_block_capacity);
  int seg_bits = 0;
  while (seg_bits < 63 && (int64_t(1) << seg_bits) < S) ++seg_bits;
  const bool radix_ok = seg_bits <= 33;
  if (method == curve_sort::automatic) method = block_ok ? curve_sort::block : (radix_ok ? curve_sort::radix : curve_sort::segmented);
  if (method == curve_sort::block && !block_ok)
    return detail::fail(reason::bad_parameter, "build_curves: curve_sort::block needs every segment to fit one block");
  if (method == curve_sort::radix && !radix_ok)
    return detail::fail(reason::bad_parameter, "build_curves: too many segments for curve_sort::radix");
  const int64_t cap = capacity > 0 ? capacity : 1;
  size_t sort_bytes = 0, scan_bytes = 0;
  if (method == curve_sort::segmented) {
    const int64_t chunk = S < detail::curve_sort_chunk ? S : detail::curve_sort_chunk;
    const int64_t last = S > 0 ? S - (S - 1) / detail::curve_sort_chunk * detail::curve_sort_chunk : 0;
    for (int64_t ns : {chunk, last}) {
      size_t b = 0;
      if (ns <= 0) continue;
      PREFIXKV_TRY(detail::check_runtime(
          cub::DeviceSegmentedSort::StableSortPairsDescending(nullptr, b, static_cast<const float*>(nullptr),
                                                              static_cast<float*>(nullptr), static_cast<const int32_t*>(nullptr),
                                                              static_cast<int32_t*>(nullptr), cap, ns,
                                                              static_cast<const int64_t*>(nullptr),
                                                              static_cast<const int64_t*>(nullptr), stream),
          "build_curves: sort size query failed"));
      sort_bytes = b > sort_bytes ? b : sort_bytes;
    }
  } else if (method == curve_sort::radix) {
    cub::DoubleBuffer<uint64_t> k(nullptr, nullptr);
    cub::DoubleBuffer<int32_t> v(nullptr, nullptr);
    PREFIXKV_TRY(detail::check_runtime(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, k, v, cap, 0, 31 + seg_bits, stream),
                                       "build_curves: sort size query failed"));
  }
  if (!uniform)
    PREFIXKV_TRY(detail::check_runtime(cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, static_cast<int64_t*>(nullptr),
                                                                     static_cast<int64_t*>(nullptr), S > 0 ? S : 1, stream),
                                       "build_curves: scan size query failed"));
  // Workspace: segmented: keys/values in (+ sorted scores when the caller keeps none); radix: two 64-bit key
  // buffers and one value buffer (the caller's positions are the other); block: sorted scores only.
  workspace_layout<7> ws;
  if (method == curve_sort::segmented) {
    ws.reserve<float>(0, size_t(cap));
    ws.reserve<int32_t>(1, size_t(cap));
  } else if (method == curve_sort::radix) {
    ws.reserve<uint64_t>(5, size_t(cap) * 2);
    ws.reserve<int32_t>(1, size_t(cap));
  }
  if (out.sorted_scores == nullptr) ws.reserve<float>(2, size_t(cap));
  ws.reserve_bytes(3, sort_bytes);
  ws.reserve_bytes(4, scan_bytes);
  ws.reserve<unsigned>(6, detail::curve_flag_words);
  if (d_temp == nullptr) {
    temp_bytes = ws.bytes();
    return cudaSuccess;
  }
  PREFIXKV_TRY(ws.map(d_temp, temp_bytes));
  float* sorted_out = out.sorted_scores ? out.sorted_scores : ws.get<float>(2);
  set = curve_set{};
  set.count = S;
  set.offsets = out.offsets;
  set.tokens = out.tokens;
  set.positions = out.positions;
  set.cumulative = out.cumulative;
  set.sorted_scores = sorted_out;
  set.protect = protect;
  if (S == 0) return cudaSuccess;

  // 1. tokens and candidate offsets (closed form for uniform rows; a device scan otherwise)
  const int64_t blocks_s = (S + 255) / 256;
  unsigned* flags = ws.get<unsigned>(6);
  detail::curve_counts_kernel<><<<unsigned(blocks_s < 1024 ? blocks_s : 1024), 256, 0, stream>>>(rows, protect, out.offsets,
                                                                                             out.tokens, d_status, flags,
                                                                                             opt.max_row);
  PREFIXKV_TRY(detail::check_launch(stream));
  if (!uniform) {
    size_t sb = scan_bytes;
    PREFIXKV_TRY(detail::check_runtime(cub::DeviceScan::InclusiveSum(ws.get<void>(4), sb, out.offsets + 1, out.offsets + 1, S, stream),
                                       "build_curves: scan failed"));
    detail::curve_capacity_guard<><<<1, 256, 0, stream>>>(out.offsets, S, capacity, d_status);
    PREFIXKV_TRY(detail::check_launch(stream));
  }
  if (capacity == 0) {
    // no candidates (every curve is empty already): still check the scores, all of them protected, so that bad
    // scores are flagged exactly as the host twin rejects them
    if (scores == nullptr) return cudaSuccess;
    const dim3 g0(1, unsigned(S < 65535 ? S : 65535));
    detail::curve_gather_kernel<float><<<g0, 256, 0, stream>>>(scores, rows, protect, out.offsets, out.tokens, 0,
                                                               static_cast<float*>(nullptr), static_cast<int32_t*>(nullptr),
                                                               d_status, flags);
    return detail::check_launch(stream);
  }

  const int64_t cb = S < 4096 ? S : 4096;
  if (method == curve_sort::block) {  // 2. everything else in one kernel
    detail::curve_block_kernel<detail::curve_block_threads, detail::curve_block_items>
        <<<unsigned(S < 65535 ? S : 65535), detail::curve_block_threads, 0, stream>>>(
            scores, rows, protect, out.offsets, out.tokens, out.positions, sorted_out, out.cumulative, d_status, flags);
    return detail::check_launch(stream);
  }
  // 2. gather the candidates, 3. sort, 4. normalised prefix sums
  const int64_t per_seg = (capacity / S + 1023) / 1024;
  const dim3 gg(unsigned(per_seg < 1 ? 1 : (per_seg > 256 ? 256 : per_seg)), unsigned(S < 65535 ? S : 65535));
  if (method == curve_sort::radix) {
    uint64_t* keys = ws.get<uint64_t>(5);
    cub::DoubleBuffer<uint64_t> k(keys, keys + cap);
    cub::DoubleBuffer<int32_t> v(ws.get<int32_t>(1), out.positions);
    detail::curve_gather_kernel<uint64_t><<<gg, 256, 0, stream>>>(scores, rows, protect, out.offsets, out.tokens, capacity,
                                                                  k.Current(), v.Current(), d_status, flags);
    PREFIXKV_TRY(detail::check_launch(stream));
    size_t bytes = ws.size_of(3);
    PREFIXKV_TRY(detail::check_runtime(cub::DeviceRadixSort::SortPairs(ws.get<void>(3), bytes, k, v, capacity, 0, 31 + seg_bits, stream),
                                       "build_curves: radix sort failed"));
    const detail::curve_ranked_keys ranked{k.Current(), v.Current(), out.positions, sorted_out};
    detail::curve_cumulative_kernel<256><<<unsigned(cb), 256, 0, stream>>>(out.offsets, S, ranked, out.cumulative, flags);
    return detail::check_launch(stream);
  }
  float* keys_in = ws.get<float>(0);
  int32_t* vals_in = ws.get<int32_t>(1);
  detail::curve_gather_kernel<float><<<gg, 256, 0, stream>>>(scores, rows, protect, out.offsets, out.tokens, capacity,
                                                           keys_in, vals_in, d_status, flags);
  PREFIXKV_TRY(detail::check_launch(stream));
  for (int64_t c0 = 0; c0 < S; c0 += detail::curve_sort_chunk) {
    const int64_t ns = S - c0 < detail::curve_sort_chunk ? S - c0 : detail::curve_sort_chunk;
    size_t bytes = ws.size_of(3);
    PREFIXKV_TRY(detail::check_runtime(
        cub::DeviceSegmentedSort::StableSortPairsDescending(ws.get<void>(3), bytes, keys_in, sorted_out, vals_in,
                                                            out.positions, capacity, ns, out.offsets + c0,
                                                            out.offsets + c0 + 1, stream),
        "build_curves: segmented sort failed"));
  }
  detail::curve_cumulative_kernel<256><<<unsigned(cb), 256, 0, stream>>>(out.offsets, S, detail::curve_ranked_floats{sorted_out},
                                                                          out.cumulative, flags);
  return detail::check_launch(stream);
}

//! `build_curves` with the default options (automatic sort, no row bound).
[[nodiscard]] inline cudaError_t build_curves(void* d_temp, size_t& temp_bytes, const float* scores, segments rows,
                                              protect_policy protect, int64_t capacity, curve_device_out out,
                                              curve_set& set, unsigned* d_status = nullptr,
                                              cudaStream_t stream = 0) noexcept {
  return build_curves(d_temp, temp_bytes, scores, rows, protect, capacity, out, set, curve_options{}, d_status, stream);
}

PREFIXKV_NAMESPACE_END
