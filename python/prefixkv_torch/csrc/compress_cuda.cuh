// prefixkv_torch: the compressor's CUDA kernel for one cache element type (instantiated by compress_*.cu, one
// translation unit per type so that they compile in parallel).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "pkv_common.h"

#include <prefixkv/compress/compress.cuh>

namespace pkv_torch {

//! Enqueue the whole chain on the current stream: no host synchronisation, the workspace from PyTorch's caching
//! allocator (so the call can be captured into a CUDA graph). Host-visible problems raise before anything is
//! enqueued; problems in device data end up in the status tensor.
template <class T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> compress_cuda_t(const compress_call& c, const compress_opts& o,
                                                               at::TensorList keys, at::TensorList values,
                                                               at::TensorList attention, at::TensorList queries,
                                                               at::TensorList lse) {
  const at::Device dev = keys[0].device();
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  auto outs = compress_outputs_like(c, dev);
  auto run = [&](auto ptag) {
    using P = decltype(ptag);
    compress_views<T, P> v(c, o, keys, values, attention, queries, lse);
    v.args.out.lengths = std::get<0>(outs).template data_ptr<int32_t>();
    v.args.out.status = std::get<1>(outs).template data_ptr<int32_t>();
    v.args.out.threshold = std::get<2>(outs).template data_ptr<float>();
    size_t bytes = 0;
    check(pk::compress(nullptr, bytes, c.plan, v.args), "compress_");
    const at::Tensor ws = at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)},
                                    at::TensorOptions().dtype(at::kByte).device(dev));
    check(pk::compress(ws.data_ptr(), bytes, c.plan, v.args, stream), "compress_");
  };
  if (c.p_type == at::kFloat)
    run(float{});
  else
    run(T{});
  return outs;
}

}  // namespace pkv_torch
