// GPU test helpers: RAII device buffers, error checks, poisoning, and `run_three_ways`, which exercises a
// device entry point as (1) size query, (2) plain launch and (3) CUDA-graph stream capture + replay.
#pragma once

#include <doctest/doctest.h>

#include "test_random.hpp"

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#define PKV_CUDA_CHECK(expr)                                                  \
  do {                                                                        \
    const cudaError_t pkv_e_ = (expr);                                        \
    REQUIRE_MESSAGE(pkv_e_ == cudaSuccess, #expr, ": ", cudaGetErrorString(pkv_e_)); \
  } while (0)

namespace prefixkv_test {

//! Byte written into outputs before a run so that unwritten elements are detected.
inline constexpr unsigned char poison_byte = 0xA5;

template <class T>
class device_buffer {
 public:
  device_buffer() = default;
  explicit device_buffer(size_t n) : n_(n) {
    if (n) PKV_CUDA_CHECK(cudaMalloc(&p_, n * sizeof(T)));
  }
  explicit device_buffer(const std::vector<T>& h) : device_buffer(h.size()) { upload(h); }
  ~device_buffer() {
    if (p_) cudaFree(p_);
  }
  device_buffer(device_buffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  device_buffer& operator=(device_buffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;

  T* get() const { return p_; }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }
  //! upload / poison return with the bytes in place: cudaMemset runs on the legacy default stream and a pageable
  //! cudaMemcpy may return before its DMA lands, and neither orders work on a cudaStreamNonBlocking stream.
  static void settle() { PKV_CUDA_CHECK(cudaDeviceSynchronize()); }
  void upload(const std::vector<T>& h) {
    REQUIRE(h.size() <= n_);
    if (!h.empty()) PKV_CUDA_CHECK(cudaMemcpy(p_, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    settle();
  }
  std::vector<T> download() const {
    std::vector<T> h(n_);
    if (n_) PKV_CUDA_CHECK(cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  void poison(unsigned char b = poison_byte) {
    if (n_) PKV_CUDA_CHECK(cudaMemset(p_, b, bytes()));
    settle();
  }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

//! A host value whose bytes are all `poison_byte` (to compare downloaded outputs against).
template <class T>
T poison_value() {
  T v;
  std::memset(&v, poison_byte, sizeof(T));
  return v;
}

//! Run `op(void* d_temp, size_t& temp_bytes, cudaStream_t) -> cudaError_t` three ways:
//!  1. size query (d_temp == nullptr) — must succeed and must not touch outputs;
//!  2. `reset()`, plain launch on a fresh stream, sync, `check("plain")`;
//!  3. `reset()`, the same call captured into a CUDA graph, the graph launched, sync, `check("graph")` (left out
//!     under PREFIXKV_TEST_QUICK=2, racecheck: the graph runs the same kernels as the plain launch).
//! `reset` re-poisons the outputs (and restores in-place inputs); `check` compares with the host twin.
template <class Op, class Reset, class Check>
void run_three_ways(Op&& op, Reset&& reset, Check&& check) {
  cudaStream_t stream = nullptr;
  PKV_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  size_t temp_bytes = 0;
  reset();
  PKV_CUDA_CHECK(cudaDeviceSynchronize());
  PKV_CUDA_CHECK(op(nullptr, temp_bytes, stream));
  PKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  device_buffer<unsigned char> temp(temp_bytes);
  temp.poison();

  // 2. plain launch
  reset();
  PKV_CUDA_CHECK(cudaDeviceSynchronize());
  PKV_CUDA_CHECK(op(static_cast<void*>(temp.get()), temp_bytes, stream));
  PKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  PKV_CUDA_CHECK(cudaGetLastError());
  check("plain");
  if (tiny_mode()) {
    cudaStreamDestroy(stream);
    return;
  }

  // 3. graph capture
  reset();
  temp.poison();
  PKV_CUDA_CHECK(cudaDeviceSynchronize());
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  PKV_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  const cudaError_t captured = op(static_cast<void*>(temp.get()), temp_bytes, stream);
  PKV_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  PKV_CUDA_CHECK(captured);
  PKV_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  PKV_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  PKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  check("graph");
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

}  // namespace prefixkv_test
