// A device-memory communicator for tests: N ranks as N host threads on ONE GPU, each with its own stream. Every
// collective meets at a host barrier (at enqueue time) to swap buffer pointers and events, then copies with
// cudaMemcpyAsync on the caller's stream after waiting for the other ranks' "ready" events; a rank continues only
// once every other rank finished reading its buffer. All-reduce = all-gather into a scratch buffer + a sum in rank
// order. Stream-ordered like NCCL, so the distributed compressor's device path runs with several ranks on a
// single GPU (NCCL refuses two ranks on one device). Not capturable into a CUDA graph (cross-thread events).
#pragma once

#include <prefixkv/dist/communicator.hpp>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cuda_runtime.h>
#include <mutex>
#include <vector>

namespace dist_test {

template <int = 0>
__global__ void sim_sum_kernel(const int64_t* parts, int64_t count, int ranks, int64_t* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    unsigned long long s = 0;
    for (int r = 0; r < ranks; ++r) s += static_cast<unsigned long long>(parts[r * count + i]);
    out[i] = static_cast<int64_t>(s);
  }
}

class device_sim_group {
 public:
  //! `scratch_words`: the largest all-reduce (int64 words) any rank will ask for.
  device_sim_group(int ranks, size_t scratch_words) : n_(ranks), send_(size_t(ranks)), ready_(size_t(ranks)), done_(size_t(ranks)), scratch_(size_t(ranks)), words_(scratch_words) {
    for (int r = 0; r < n_; ++r) {
      cudaEventCreateWithFlags(&ready_[size_t(r)], cudaEventDisableTiming);
      cudaEventCreateWithFlags(&done_[size_t(r)], cudaEventDisableTiming);
      cudaMalloc(&scratch_[size_t(r)], words_ * size_t(n_) * sizeof(int64_t) + 16);
    }
  }
  ~device_sim_group() {
    for (int r = 0; r < n_; ++r) {
      cudaEventDestroy(ready_[size_t(r)]);
      cudaEventDestroy(done_[size_t(r)]);
      cudaFree(scratch_[size_t(r)]);
    }
  }
  device_sim_group(const device_sim_group&) = delete;
  device_sim_group& operator=(const device_sim_group&) = delete;
  int size() const { return n_; }

  cudaError_t all_gather(int r, const void* send, void* recv, size_t bytes, cudaStream_t stream) {
    cudaError_t e = cudaEventRecord(ready_[size_t(r)], stream);
    send_[size_t(r)] = send;
    if (!barrier()) return cudaErrorTimeout;
    for (int q = 0; q < n_ && e == cudaSuccess; ++q) {
      e = cudaStreamWaitEvent(stream, ready_[size_t(q)], 0);
      char* dst = static_cast<char*>(recv) + size_t(q) * bytes;
      if (e == cudaSuccess && bytes > 0 && send_[size_t(q)] != dst)
        e = cudaMemcpyAsync(dst, send_[size_t(q)], bytes, cudaMemcpyDeviceToDevice, stream);
    }
    if (e == cudaSuccess) e = cudaEventRecord(done_[size_t(r)], stream);
    if (!barrier()) return cudaErrorTimeout;
    for (int q = 0; q < n_ && e == cudaSuccess; ++q)
      if (q != r) e = cudaStreamWaitEvent(stream, done_[size_t(q)], 0);  // q has read this rank's buffer
    return e;
  }
  cudaError_t all_reduce_sum(int r, const int64_t* send, int64_t* recv, size_t count, cudaStream_t stream) {
    if (count > words_) return cudaErrorInvalidValue;
    int64_t* parts = scratch_[size_t(r)];
    cudaError_t e = all_gather(r, send, parts, count * sizeof(int64_t), stream);
    if (e != cudaSuccess || count == 0) return e;
    const unsigned blocks = unsigned(std::min<size_t>((count + 255) / 256, 1024));
    sim_sum_kernel<<<blocks, 256, 0, stream>>>(parts, int64_t(count), n_, recv);
    return cudaGetLastError();
  }

 private:
  //! False when a rank did not arrive within a minute (a rank left the protocol): the group is broken from then on,
  //! so a failing test reports instead of hanging.
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
    if (!cv_.wait_for(g, std::chrono::seconds(60), [&] { return generation_ != gen || broken_; })) broken_ = true;
    if (broken_ && generation_ == gen) {
      cv_.notify_all();
      return false;
    }
    return true;
  }
  int n_;
  std::vector<const void*> send_;
  std::vector<cudaEvent_t> ready_, done_;
  std::vector<int64_t*> scratch_;
  size_t words_;
  std::mutex m_;
  std::condition_variable cv_;
  int arrived_ = 0;
  unsigned long long generation_ = 0;
  bool broken_ = false;
};

//! Rank r of a device_sim_group (meets the communicator concept; device memory).
class device_sim_comm {
 public:
  static constexpr prefixkv::comm_memory memory = prefixkv::comm_memory::device;
  device_sim_comm() = default;
  device_sim_comm(device_sim_group* g, int r) : g_(g), r_(r) {}
  int rank() const { return r_; }
  int size() const { return g_->size(); }
  cudaError_t all_gather(const void* send, void* recv, size_t bytes, cudaStream_t stream) {
    return g_->all_gather(r_, send, recv, bytes, stream);
  }
  cudaError_t all_reduce_sum(const int64_t* send, int64_t* recv, size_t count, cudaStream_t stream) {
    return g_->all_reduce_sum(r_, send, recv, count, stream);
  }

 private:
  device_sim_group* g_ = nullptr;
  int r_ = 0;
};

}  // namespace dist_test
