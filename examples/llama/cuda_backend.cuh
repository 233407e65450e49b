// prefixkv-llama: the CUDA backend (cuda_backend.cu) — batched_backend.hpp over device memory: the whole forward
// pass on the GPU (cuda_forward.cuh) over contiguous per-layer caches, and the device compressor
// (`prefixkv::compress`). Its logits and attention probabilities equal the host backend's bit for bit (math.hpp), so
// `--device cuda` keeps the same tokens and generates the same text as `--device cpu`.
//
// This header declares plain C++ functions only: the runtime (main.cpp, built by the C++ compiler) includes it when
// the build has CUDA (PREFIXKV_LLAMA_CUDA).
#pragma once

#include "backend.hpp"

#include <memory>
#include <string>

namespace prefixkv_llama {

//! The CUDA backend for model `m` on the current device; null with a one-line reason (no device, out of memory).
std::unique_ptr<backend> make_cuda_backend(const model& m, std::string& err);

}  // namespace prefixkv_llama
