//! \file prefixkv/core/launch.cuh
//! Launch bookkeeping shared by all device entry points (CUDA translation units only).
#pragma once

#include "error.hpp"

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

//! Number of multiprocessors of the current device (cached per device ordinal).
inline int sm_count() noexcept {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) return 132;
  return n;
}

}  // namespace detail
PREFIXKV_NAMESPACE_END
