// prefixkv-llama: the CUDA backend (see cuda_backend.cuh): `batched_backend` (batched_backend.hpp) over device memory,
// the forward pass as kernels (cuda_forward.cuh) on one stream, and the device compressor (`prefixkv::compress`).
#include "batched_backend.hpp"
#include "cuda_backend.cuh"
#include "cuda_forward.cuh"

#include <prefixkv/compress/compress.cuh>

namespace prefixkv_llama {
namespace {

//! The device layer below `batched_backend`: every copy and launch on one stream.
class cuda_ops {
 public:
  static constexpr const char* name = "cuda";
  template <class T>
  using array = gpu::dev_array<T>;

  cuda_ops() = default;
  cuda_ops(const cuda_ops&) = delete;
  cuda_ops& operator=(const cuda_ops&) = delete;
  ~cuda_ops() {
    if (st_) cudaStreamDestroy(st_);
  }

  bool init(const model& m, std::string& err) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0)
      return err = std::string("--device cuda: no CUDA device is usable (") +
                   (e == cudaSuccess ? "0 devices" : cudaGetErrorString(e)) + ")",
             false;
    PKL_CUDA_TRY(cudaStreamCreateWithFlags(&st_, cudaStreamNonBlocking), err);
    return store_.upload(m, err);
  }
  const model_ref& mr() const { return store_.m; }
  // (host buffers are pageable: a host-to-device copy has read them when it returns, a device-to-host copy has
  // written them once `sync` returns)
  bool h2d(void* dst, const void* src, size_t bytes, std::string& err) {
    PKL_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, st_), err);
    return true;
  }
  bool d2h(void* dst, const void* src, size_t bytes, std::string& err) {
    PKL_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, st_), err);
    return true;
  }
  bool d2d(void* dst, const void* src, size_t bytes, std::string& err) {
    PKL_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, st_), err);
    return true;
  }
  bool zero(void* dst, size_t bytes, std::string& err) {
    PKL_CUDA_TRY(cudaMemsetAsync(dst, 0, bytes, st_), err);
    return true;
  }
  bool sync(std::string& err) {
    PKL_CUDA_TRY(cudaStreamSynchronize(st_), err);
    return true;
  }
  template <class Cache>
  bool forward(const Cache& c, batch_args a, const int* rows, int k, std::vector<float>& logits, std::string& err) {
    if (!gpu::forward(store_.m, c, a, fb_, rows, k, st_, err)) return false;
    logits.resize(size_t(k) * store_.m.vocab);
    return d2h(logits.data(), fb_.logits.p, sizeof(float) * logits.size(), err) && sync(err);
  }
  template <class Args>
  cudaError_t compress(void* ws, size_t& bytes, const prefixkv::compress_plan& plan, const Args& args) {
    return prefixkv::compress(ws, bytes, plan, args, st_);
  }

 private:
  cudaStream_t st_ = nullptr;
  gpu::dev_model_store store_;
  gpu::forward_buffers fb_;
};

}  // namespace

std::unique_ptr<backend> make_cuda_backend(const model& m, std::string& err) {
  auto b = std::make_unique<batched_backend<cuda_ops>>(m);
  if (!b->init(err)) return nullptr;
  return b;
}

}  // namespace prefixkv_llama
