// Entry point of every GPU test binary: runs doctest when a CUDA device is present, otherwise reports
// "skipped" to ctest (exit code 77, the SKIP_RETURN_CODE of every test labelled `gpu`).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

int main(int argc, char** argv) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    if (std::getenv("PREFIXKV_REQUIRE_GPU")) {  // set by scripts/gpu-check.sh: a GPU box must not skip
      std::printf("FAILED: PREFIXKV_REQUIRE_GPU is set but no CUDA device is usable (%s)\n",
                  e == cudaSuccess ? "0 devices" : cudaGetErrorString(e));
      return 1;
    }
    std::printf("SKIPPED: no CUDA device available (%s)\n", e == cudaSuccess ? "0 devices" : cudaGetErrorString(e));
    return 77;
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("device 0: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
