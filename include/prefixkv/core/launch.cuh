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

//! Attributes of a device that launch planning reads on every call.
struct device_info {
  int ordinal = 0, major = 0, minor = 0, sms = 0, smem_optin = 0;  // smem_optin: dynamic shared memory per block
};

//! Device ordinals whose `device_info` (and per-kernel planning results) are cached.
inline constexpr int cached_devices = 64;

//! The current device's attributes, queried once per ordinal (< cached_devices) and then served from a cache, so that
//! a call's host-side planning does not spend microseconds on attribute queries while the GPU waits. A slot is
//! claimed by one thread (compare-and-swap), filled and published with release / acquire; a thread that finds it
//! being filled queries for itself.
inline cudaError_t current_device_info(device_info& out) noexcept {
  struct slot {
    std::atomic<int> state{0};  // 0 empty, 1 being filled, 2 ready
    device_info info;
  };
  static slot cache[cached_devices];
  int dev = 0;
  PREFIXKV_TRY(check_runtime(cudaGetDevice(&dev), "no current CUDA device"));
  slot* s = dev >= 0 && dev < cached_devices ? &cache[dev] : nullptr;
  if (s != nullptr && s->state.load(std::memory_order_acquire) == 2) {
    out = s->info;
    return cudaSuccess;
  }
  device_info d;
  d.ordinal = dev;
  PREFIXKV_TRY(check_runtime(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev),
                             "cannot query the device"));
  PREFIXKV_TRY(check_runtime(cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, dev),
                             "cannot query the device"));
  PREFIXKV_TRY(check_runtime(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev),
                             "cannot query the device"));
  PREFIXKV_TRY(check_runtime(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                             "cannot query the device"));
  int empty = 0;
  if (s != nullptr && s->state.compare_exchange_strong(empty, 1, std::memory_order_acq_rel)) {
    s->info = d;
    s->state.store(2, std::memory_order_release);
  }
  out = d;
  return cudaSuccess;
}

//! Number of multiprocessors of the current device (cached per device ordinal; 132 when it cannot be queried).
inline int sm_count() noexcept {
  device_info d;
  if (current_device_info(d) != cudaSuccess || d.sms <= 0) return 132;
  return d.sms;
}

}  // namespace detail
PREFIXKV_NAMESPACE_END
