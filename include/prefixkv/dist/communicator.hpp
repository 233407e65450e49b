//! \file prefixkv/dist/communicator.hpp
//! What the distributed compressor (`prefixkv/dist/compress_dist.hpp`) needs from a communication library: two
//! collectives over a group of ranks, and an in-process host implementation that runs N ranks as N threads (tests,
//! CPU runtimes). The NCCL adapter is `prefixkv/dist/nccl.hpp`.
//!
//! The communicator concept. A type `C` is a communicator when, for `C& c`:
//! * `C::memory` is a `comm_memory` constant: where the buffers of its collectives live (host memory for the host
//!   backend `compress_host`, device memory for the CUDA backend `compress`);
//! * `c.rank()` and `c.size()` return this rank's index in [0, size) and the number of ranks (int);
//! * `c.all_gather(send, recv, bytes, stream)` copies the `bytes` bytes at `send` of every rank r into
//!   `recv + r * bytes` of every rank (recv holds size() * bytes); `send == recv + rank() * bytes` (in place) must
//!   work;
//! * `c.all_reduce_sum(send, recv, count, stream)` writes into `recv` of every rank the element-wise sum over the
//!   ranks of the `count` int64 values at `send` (in place, send == recv, must work). Integer sums are exact and
//!   associative, so every rank receives the same values whatever the reduction tree;
//! * both return `cudaError_t` (cudaSuccess, or an error recorded with `detail::fail`), are called by every rank of
//!   the group in the same order with the same sizes, and for device memory are ordered on `stream` (no host
//!   synchronisation: NCCL's behaviour); host implementations ignore `stream`.
//! That is all the exact solve needs: no floating-point reduction is ever done by the communicator (a float sum's
//! result depends on the association, so it could differ from the single-GPU result; see docs/multigpu.md).
//!
//! `communicator` erases the type: a trivially copyable handle (a pointer to the object and two function
//! pointers), made with `make_communicator(c)`; the object must outlive every call that uses the handle. An empty
//! handle (the default) stands for "no parallelism on this axis": one rank, nothing exchanged.
//! \code
//! prefixkv::host_comm_group group(4);                        // 4 ranks in one process
//! // in the thread of rank r:
//! prefixkv::host_comm c = group.rank(r);
//! prefixkv::communicator h = prefixkv::make_communicator(c);  // what compress_shard takes
//! \endcode
#pragma once

#include "../core/error.hpp"

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

PREFIXKV_NAMESPACE_BEGIN

//! Where the buffers of a communicator's collectives live.
enum class comm_memory : int {
  host = 0,    //!< host memory; the calls complete before they return
  device = 1,  //!< device memory; the calls are ordered on the stream they are given
};

//! A communicator, type-erased (see the file comment for the concept it erases). Trivially copyable.
struct communicator {
  void* self = nullptr;  //!< the communicator object; null: an empty handle (one rank, no exchange)
  int rank = 0;          //!< this rank's index in the group
  int size = 1;          //!< ranks in the group
  comm_memory memory = comm_memory::host;
  cudaError_t (*all_gather_fn)(void* self, const void* send, void* recv, size_t bytes, cudaStream_t stream) = nullptr;
  cudaError_t (*all_reduce_sum_fn)(void* self, const int64_t* send, int64_t* recv, size_t count,
                                   cudaStream_t stream) = nullptr;

  //! Whether this handle names a group (collectives are called, even for a group of one rank).
  bool present() const noexcept { return self != nullptr; }
  //! Ranks of the axis: the group's size, 1 for an empty handle.
  int ranks() const noexcept { return self ? size : 1; }
  //! This rank's index on the axis: 0 for an empty handle.
  int index() const noexcept { return self ? rank : 0; }
  [[nodiscard]] cudaError_t all_gather(const void* send, void* recv, size_t bytes, cudaStream_t stream) const {
    return all_gather_fn(self, send, recv, bytes, stream);
  }
  [[nodiscard]] cudaError_t all_reduce_sum(const int64_t* send, int64_t* recv, size_t count,
                                           cudaStream_t stream) const {
    return all_reduce_sum_fn(self, send, recv, count, stream);
  }
};

//! A handle on `c` (any type meeting the concept). `c` must outlive every call made through the handle.
template <class C>
communicator make_communicator(C& c) {
  communicator h;
  h.self = &c;
  h.rank = c.rank();
  h.size = c.size();
  h.memory = C::memory;
  h.all_gather_fn = [](void* s, const void* send, void* recv, size_t bytes, cudaStream_t stream) -> cudaError_t {
    return static_cast<C*>(s)->all_gather(send, recv, bytes, stream);
  };
  h.all_reduce_sum_fn = [](void* s, const int64_t* send, int64_t* recv, size_t count,
                           cudaStream_t stream) -> cudaError_t {
    return static_cast<C*>(s)->all_reduce_sum(send, recv, count, stream);
  };
  return h;
}

namespace detail {
//! Checks a handle before use: an empty handle is fine; a present one needs both functions, 1 <= size and
//! 0 <= rank < size, and the memory kind the backend moves.
inline cudaError_t check_communicator(const communicator& c, comm_memory memory, const char* which_message) {
  if (!c.present()) return cudaSuccess;
  if (c.all_gather_fn == nullptr || c.all_reduce_sum_fn == nullptr || c.size < 1 || c.rank < 0 || c.rank >= c.size)
    return fail(reason::bad_parameter, which_message);
  if (c.memory != memory)
    return fail(reason::bad_parameter,
                memory == comm_memory::device
                    ? "compress: the CUDA backend needs a communicator of device memory (e.g. NCCL)"
                    : "compress: the host backend needs a communicator of host memory (e.g. host_comm)");
  return cudaSuccess;
}
}  // namespace detail

class host_comm;

//! N ranks in one process, one thread per rank (tests, CPU runtimes). Collectives meet at a barrier: every rank
//! publishes its buffer, then each one copies (all-gather) or sums in rank order (all-reduce) from all of them, so
//! the results are deterministic. With a timeout, a rank that waits longer than that for the others fails its
//! collective (`reason::bad_parameter`) and the group is broken from then on: every later collective fails at once
//! (so a test whose ranks disagree fails instead of hanging).
class host_comm_group {
 public:
  explicit host_comm_group(int ranks, std::chrono::milliseconds timeout = std::chrono::milliseconds(0))
      : n_(ranks < 1 ? 1 : ranks), timeout_(timeout), slots_(static_cast<size_t>(n_), nullptr) {}
  host_comm_group(const host_comm_group&) = delete;
  host_comm_group& operator=(const host_comm_group&) = delete;
  int size() const noexcept { return n_; }
  //! The communicator of rank r (a small handle on this group; the group must outlive it).
  host_comm rank(int r);
  bool broken() const {
    std::lock_guard<std::mutex> g(m_);
    return broken_;
  }

 private:
  friend class host_comm;
  //! Wait until every rank arrived. False when the group is (or becomes) broken.
  bool barrier() {
    std::unique_lock<std::mutex> g(m_);
    if (broken_) return false;
    const unsigned long long gen = generation_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return true;
    }
    auto done = [&] { return generation_ != gen || broken_; };
    if (timeout_.count() > 0) {
      if (!cv_.wait_for(g, timeout_, done)) {
        broken_ = true;
        cv_.notify_all();
        return false;
      }
    } else {
      cv_.wait(g, done);
    }
    return !broken_ || generation_ != gen;
  }
  cudaError_t broken_error() const {
    return detail::fail(reason::bad_parameter,
                        "host_comm: a rank did not join the collective in time (the group is broken)");
  }
  cudaError_t all_gather(int r, const void* send, void* recv, size_t bytes) {
    slots_[static_cast<size_t>(r)] = send;
    if (!barrier()) return broken_error();
    char* out = static_cast<char*>(recv);
    for (int q = 0; q < n_; ++q) {
      const void* src = slots_[static_cast<size_t>(q)];
      char* dst = out + static_cast<size_t>(q) * bytes;
      if (src != dst && bytes > 0) std::memcpy(dst, src, bytes);
    }
    if (!barrier()) return broken_error();  // nobody reuses its send buffer before every rank read it
    return cudaSuccess;
  }
  cudaError_t all_reduce_sum(int r, const int64_t* send, int64_t* recv, size_t count) {
    std::vector<int64_t> sum;
    try {
      sum.assign(count, 0);
    } catch (...) {
      return detail::fail(reason::capacity_exceeded, "host_comm: out of host memory", cudaErrorMemoryAllocation);
    }
    slots_[static_cast<size_t>(r)] = send;
    if (!barrier()) return broken_error();
    for (int q = 0; q < n_; ++q) {
      const int64_t* x = static_cast<const int64_t*>(slots_[static_cast<size_t>(q)]);
      for (size_t i = 0; i < count; ++i)
        sum[i] = static_cast<int64_t>(static_cast<uint64_t>(sum[i]) + static_cast<uint64_t>(x[i]));  // wraps, never UB
    }
    if (!barrier()) return broken_error();  // every rank has read every send buffer (recv may alias it)
    if (count > 0) std::memcpy(recv, sum.data(), count * sizeof(int64_t));
    return cudaSuccess;
  }

  int n_;
  std::chrono::milliseconds timeout_;
  std::vector<const void*> slots_;
  mutable std::mutex m_;
  std::condition_variable cv_;
  int arrived_ = 0;
  unsigned long long generation_ = 0;
  bool broken_ = false;
};

//! Rank r of a `host_comm_group` (meets the communicator concept; host memory).
class host_comm {
 public:
  static constexpr comm_memory memory = comm_memory::host;
  host_comm() = default;
  host_comm(host_comm_group* g, int r) : g_(g), r_(r) {}
  int rank() const noexcept { return r_; }
  int size() const noexcept { return g_ ? g_->size() : 1; }
  cudaError_t all_gather(const void* send, void* recv, size_t bytes, cudaStream_t) {
    return g_->all_gather(r_, send, recv, bytes);
  }
  cudaError_t all_reduce_sum(const int64_t* send, int64_t* recv, size_t count, cudaStream_t) {
    return g_->all_reduce_sum(r_, send, recv, count);
  }

 private:
  host_comm_group* g_ = nullptr;
  int r_ = 0;
};

inline host_comm host_comm_group::rank(int r) { return host_comm(this, r); }

PREFIXKV_NAMESPACE_END
