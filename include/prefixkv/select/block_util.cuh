//! \file prefixkv/select/block_util.cuh
//! Small block-wide integer reductions and scans used by the solver and the selection writer (detail).
//! Integer arithmetic only, so results are deterministic whatever the thread schedule.
#pragma once

#include "../core/config.hpp"

#if !defined(__CUDACC__)
#error "prefixkv/select/block_util.cuh needs a CUDA compiler"
#endif

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

//! Scratch for the helpers below: one slot per warp (up to 32 warps) plus one.
struct block_scratch {
  long long warp[33];
};

__device__ inline long long warp_inclusive_sum(long long v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const long long o = __shfl_up_sync(0xFFFFFFFFu, v, d);
    if (lane >= d) v += o;
  }
  return v;
}

//! Exclusive prefix sum of `v` over the block (blockDim.x a multiple of 32, <= 1024); `total` gets the block
//! sum. Contains __syncthreads: every thread of the block must call it.
__device__ inline long long block_exclusive_sum(long long v, long long& total, block_scratch& sc) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const long long inc = warp_inclusive_sum(v);
  __syncthreads();  // protect sc from a previous use
  if (lane == 31) sc.warp[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    const long long w = lane < nwarps ? sc.warp[lane] : 0;
    const long long wi = warp_inclusive_sum(w);
    if (lane < nwarps) sc.warp[lane] = wi - w;
    if (lane == 31) sc.warp[32] = wi;
  }
  __syncthreads();
  total = sc.warp[32];
  return sc.warp[warp] + inc - v;
}

//! Block sum (all threads get it).
__device__ inline long long block_sum(long long v, block_scratch& sc) {
  long long total;
  (void)block_exclusive_sum(v, total, sc);
  return total;
}

//! Block maximum of non-negative values (all threads get it).
__device__ inline long long block_max(long long v, block_scratch& sc) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) {
    const long long o = __shfl_xor_sync(0xFFFFFFFFu, v, d);
    v = o > v ? o : v;
  }
  __syncthreads();
  if (lane == 0) sc.warp[warp] = v;
  __syncthreads();
  if (warp == 0) {
    long long w = lane < nwarps ? sc.warp[lane] : -1;
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) {
      const long long o = __shfl_xor_sync(0xFFFFFFFFu, w, d);
      w = o > w ? o : w;
    }
    if (lane == 0) sc.warp[32] = w;
  }
  __syncthreads();
  return sc.warp[32];
}

}  // namespace detail
PREFIXKV_NAMESPACE_END
