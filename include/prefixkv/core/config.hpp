//! \file prefixkv/core/config.hpp
//! Compiler portability: the versioned namespace, `PREFIXKV_HOST_DEVICE`, kernel attributes and the CUDA
//! runtime types. Everything in prefixkv includes this first.
//!
//! Host-only builds (g++ with no CUDA toolkit on the include path) get a minimal stand-in for `cudaError_t`
//! and `cudaStream_t` with the same names and numeric values as the CUDA runtime's, so that the solver, the
//! views, the host twins and the CLI compile with any C++17 compiler.
#pragma once

#include <cstddef>
#include <cstdint>

#define PREFIXKV_VERSION_MAJOR 0
#define PREFIXKV_VERSION_MINOR 1
#define PREFIXKV_VERSION_PATCH 0
//! Encoded as MAJOR * 10000 + MINOR * 100 + PATCH.
#define PREFIXKV_VERSION (PREFIXKV_VERSION_MAJOR * 10000 + PREFIXKV_VERSION_MINOR * 100 + PREFIXKV_VERSION_PATCH)

//! All public names live in `prefixkv::v0_1` (inline), so two versions of the headers can coexist in one
//! program without ODR clashes while users keep writing `prefixkv::name`.
#define PREFIXKV_NAMESPACE_BEGIN \
  namespace prefixkv {           \
  inline namespace v0_1 {
#define PREFIXKV_NAMESPACE_END \
  }                            \
  }

#if defined(__CUDACC__)
#define PREFIXKV_HOST_DEVICE __host__ __device__ inline
#define PREFIXKV_DEVICE __device__ inline
#define PREFIXKV_HAS_NVCC 1
#else
#define PREFIXKV_HOST_DEVICE inline
#define PREFIXKV_HAS_NVCC 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define PREFIXKV_HIDDEN __attribute__((visibility("hidden")))
#else
#define PREFIXKV_HIDDEN
#endif

//! Every prefixkv kernel is declared with this: a `__global__` with hidden visibility, so that two shared
//! libraries built against different prefixkv versions never resolve each other's kernels.
#define PREFIXKV_KERNEL __global__ PREFIXKV_HIDDEN

#if __has_include(<cuda_runtime_api.h>)
#include <cuda_runtime_api.h>
#define PREFIXKV_HAS_CUDART 1
#else
#define PREFIXKV_HAS_CUDART 0
// Stand-in for the CUDA runtime's error and stream types in toolkit-free host builds. Same type names and
// values as <driver_types.h>, so a program mixing such a translation unit with CUDA ones sees one type.
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInitializationError = 3,
  cudaErrorNotSupported = 801,
  cudaErrorUnknown = 999
};
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;
#endif
