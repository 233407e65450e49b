//! \file prefixkv/core/launch.cuh
//! Launch bookkeeping shared by all device entry points (CUDA translation units only).
#pragma once

#include "error.hpp"

#include <atomic>

#if !defined(__CUDACC__)
#error "prefixkv/core/launch.cuh needs a CUDA compiler; include prefixkv/prefixkv.hpp for the host-only API"
#endif

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

//! Call right after a kernel launch. Returns the launch error, if any. With `PREFIXKV_DEBUG_SYNC` defined it
//! also waits for the stream (unless the stream is capturing a graph) and returns any asynchronous error.
inline cudaError_t check_launch(cudaStream_t stream) noexcept {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return fail(reason::cuda_runtime, "kernel launch failed", e);
#if defined(PREFIXKV_DEBUG_SYNC)
  cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  e = cudaStreamIsCapturing(stream, &cap);
  if (e == cudaSuccess && cap == cudaStreamCaptureStatusNone) e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) return fail(reason::cuda_runtime, "kernel failed (PREFIXKV_DEBUG_SYNC)", e);
#else
  (void)stream;
#endif
  return cudaSuccess;
}

//! Wrap a CUDA runtime call's result in the error model.
inline cudaError_t check_runtime(cudaError_t e, const char* what) noexcept {
  return e == cudaSuccess ? e : fail(reason::cuda_runtime, what, e);
}

//! ceil(a / b) for positive b.
template <class I>
__host__ __device__ constexpr I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}

//! Devices whose multiprocessor count is cached (ordinals at or above it are queried on every call).
inline constexpr int sm_count_cache_devices = 64;

//! Number of multiprocessors of the current device, queried once per device ordinal and cached (thread-safe:
//! one atomic per ordinal; concurrent first calls may both query and store the same value). A failed query is
//! an error (`reason::cuda_runtime`, the runtime's code) and is not cached.
[[nodiscard]] inline cudaError_t sm_count(int& n) noexcept {
  static std::atomic<int> cache[sm_count_cache_devices];  // 0 = not known yet (zero-initialised: static storage)
  n = 0;
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return fail(reason::cuda_runtime, "sm_count: cudaGetDevice failed", e);
  const bool cached = dev >= 0 && dev < sm_count_cache_devices;
  if (cached) {
    n = cache[dev].load(std::memory_order_relaxed);
    if (n > 0) return cudaSuccess;
  }
  int v = 0;
  e = cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return fail(reason::cuda_runtime, "sm_count: cannot query the multiprocessor count", e);
  if (v <= 0) return fail(reason::cuda_runtime, "sm_count: the device reports no multiprocessors", cudaErrorUnknown);
  if (cached) cache[dev].store(v, std::memory_order_relaxed);
  n = v;
  return cudaSuccess;
}

//! The same as a plain number for grid sizing. When the query fails it records the error (`last_error()`) and
//! returns 1 (a valid grid size for every kernel, which walk their work grid-stride); the launch that follows
//! then reports the device problem itself. Prefer the checked overload in new code.
inline int sm_count() noexcept {
  int n = 0;
  return sm_count(n) == cudaSuccess ? n : 1;
}

}  // namespace detail
PREFIXKV_NAMESPACE_END
