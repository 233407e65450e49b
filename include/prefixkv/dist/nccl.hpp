//! \file prefixkv/dist/nccl.hpp
//! The NCCL adapter of the communicator concept (`prefixkv/dist/communicator.hpp`): the caller's `ncclComm_t`,
//! collectives on the caller's stream (device memory), no host synchronisation, capturable in a CUDA graph as NCCL
//! itself is. Plain host code: any C++17 compiler with `nccl.h` and the CUDA runtime headers on the include path;
//! link with libnccl.
//!
//! This header is optional: nothing else in prefixkv includes it, and without `nccl.h` it defines
//! `PREFIXKV_HAS_NCCL` as 0 and nothing else, so including it never breaks a build.
//! \code
//! ncclComm_t comm;                                   // the caller's: ncclCommInitRank, ncclCommSplit, ...
//! prefixkv::nccl_comm tp;
//! PREFIXKV_TRY(prefixkv::make_nccl_comm(comm, tp));  // reads rank and size once
//! prefixkv::compress_shard shard;
//! shard.tp = prefixkv::make_communicator(tp);         // tp must outlive the calls
//! \endcode
//! Keep NVLink SHARP off where the buffers are not registered for it (`NCCL_NVLS_ENABLE=0` in the environment):
//! the compressor's messages are a few kilobytes, where multicast brings nothing (docs/multigpu.md).
#pragma once

#include "communicator.hpp"

#if __has_include(<nccl.h>) && PREFIXKV_HAS_CUDART
#include <nccl.h>
#define PREFIXKV_HAS_NCCL 1
#else
#define PREFIXKV_HAS_NCCL 0
#endif

#if PREFIXKV_HAS_NCCL

PREFIXKV_NAMESPACE_BEGIN

//! A communicator over an NCCL communicator (device memory, stream-ordered). The `ncclComm_t` stays the caller's:
//! this object neither creates nor destroys it. `last_result` keeps the last NCCL result that was not ncclSuccess
//! (the returned cudaError_t is cudaErrorUnknown then, reason `cuda_runtime`).
class nccl_comm {
 public:
  static constexpr comm_memory memory = comm_memory::device;
  nccl_comm() = default;
  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }
  ncclComm_t get() const noexcept { return comm_; }
  ncclResult_t last_result = ncclSuccess;

  cudaError_t all_gather(const void* send, void* recv, size_t bytes, cudaStream_t stream) {
    return check(ncclAllGather(send, recv, bytes, ncclUint8, comm_, stream), "nccl: ncclAllGather failed");
  }
  cudaError_t all_reduce_sum(const int64_t* send, int64_t* recv, size_t count, cudaStream_t stream) {
    return check(ncclAllReduce(send, recv, count, ncclInt64, ncclSum, comm_, stream), "nccl: ncclAllReduce failed");
  }

 private:
  friend cudaError_t make_nccl_comm(ncclComm_t, nccl_comm&) noexcept;
  cudaError_t check(ncclResult_t r, const char* message) {
    if (r == ncclSuccess) return cudaSuccess;
    last_result = r;
    return detail::fail(reason::cuda_runtime, message, cudaErrorUnknown);
  }
  ncclComm_t comm_ = nullptr;
  int rank_ = 0, size_ = 1;
};

//! Wrap `comm` (reads its rank and size). On error `out` is left as it was.
[[nodiscard]] inline cudaError_t make_nccl_comm(ncclComm_t comm, nccl_comm& out) noexcept {
  if (comm == nullptr) return detail::fail(reason::null_pointer, "nccl: the ncclComm_t is null");
  nccl_comm c;
  if (ncclCommUserRank(comm, &c.rank_) != ncclSuccess || ncclCommCount(comm, &c.size_) != ncclSuccess)
    return detail::fail(reason::cuda_runtime, "nccl: cannot read the communicator's rank and size", cudaErrorUnknown);
  c.comm_ = comm;
  out = c;
  return cudaSuccess;
}

PREFIXKV_NAMESPACE_END

#endif  // PREFIXKV_HAS_NCCL
