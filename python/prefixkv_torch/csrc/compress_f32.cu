// prefixkv_torch: the compressor on CUDA for float32 caches.
#include "compress_cuda.cuh"
#include "pkv_ops.h"

namespace pkv_torch {
std::tuple<at::Tensor, at::Tensor, at::Tensor> compress_cuda_f32(const compress_call& c, const compress_opts& o,
                                                               at::TensorList keys, at::TensorList values,
                                                               at::TensorList attention, at::TensorList queries,
                                                               at::TensorList lse) {
  return compress_cuda_t<float>(c, o, keys, values, attention, queries, lse);
}
}  // namespace pkv_torch
