// prefixkv_torch: the CUDA kernels of the ops (defined in the *.cu files of CUDA builds), declared for ops.cpp.
#pragma once

#include "pkv_common.h"

#ifdef PKV_TORCH_CUDA
namespace pkv_torch {

std::tuple<at::Tensor, at::Tensor, at::Tensor> compress_cuda(
    at::TensorList keys, at::TensorList values, const opt_tensor& lengths, at::TensorList attention,
    at::TensorList queries, at::TensorList lse, const opt_tensor& scores, int64_t layout, int64_t q_heads,
    int64_t scorer, int64_t gran, int64_t alloc, int64_t budget, double evict_ratio, int64_t keep_tokens,
    at::ArrayRef<double> profile, int64_t sinks, int64_t recent, int64_t min_keep, int64_t max_keep,
    double window_scale, int64_t window_group, int64_t window_pool, int64_t window_pool_kernel, int64_t window_heads);

// one per cache element type (compress_f32.cu, compress_f16.cu, compress_bf16.cu)
#define PKV_TORCH_DECLARE_COMPRESS(NAME)                                                                          \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> NAME(const compress_call& c, const compress_opts& o,            \
                                                      at::TensorList keys, at::TensorList values,                \
                                                      at::TensorList attention, at::TensorList queries,          \
                                                      at::TensorList lse);
PKV_TORCH_DECLARE_COMPRESS(compress_cuda_f32)
PKV_TORCH_DECLARE_COMPRESS(compress_cuda_f16)
PKV_TORCH_DECLARE_COMPRESS(compress_cuda_bf16)
#undef PKV_TORCH_DECLARE_COMPRESS

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> curves_cuda(
    const at::Tensor& scores, const opt_tensor& lengths, int64_t sinks, int64_t recent);

std::tuple<at::Tensor, at::Tensor, at::Tensor> solve_cuda(
    const at::Tensor& offsets, const at::Tensor& tokens, const at::Tensor& cumulative, int64_t sinks, int64_t recent,
    const opt_tensor& problem_offsets, int64_t budget, double evict_ratio, int64_t count, const opt_tensor& ratios,
    const opt_tensor& counts, int64_t min_keep, int64_t max_keep, const opt_tensor& lo, const opt_tensor& hi);

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_cuda(const at::Tensor& offsets, const at::Tensor& tokens,
                                                           const at::Tensor& positions, int64_t sinks, int64_t recent,
                                                           const at::Tensor& keep);

std::tuple<at::Tensor, at::Tensor> gather_inplace_cuda(at::TensorList keys, at::TensorList values,
                                                       const at::Tensor& sel_offsets, const at::Tensor& indices,
                                                       int64_t heads_grid, bool sequence_major, int64_t layout);

std::tuple<at::Tensor, at::Tensor> gather_cuda(at::TensorList keys, at::TensorList values,
                                               const at::Tensor& sel_offsets, const at::Tensor& indices,
                                               at::TensorList out_keys, at::TensorList out_values, int64_t heads_grid,
                                               bool sequence_major, int64_t layout);

}  // namespace pkv_torch
#endif
