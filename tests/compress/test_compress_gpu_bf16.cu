// Device compressor == host backend, bf16 caches with fp32 attention probabilities (the long-context case).
#include "compress/compress_gpu_util.cuh"

TEST_CASE("compress (bf16 cache, fp32 P): device == host backend on random models") {
  auto rng = prefixkv_test::make_rng(0xC0B16);
  const int n = prefixkv_test::rounds(80, 12, 1);
  for (int i = 0; i < n; ++i) compress_test::check_combo<prefixkv::bf16, float>(compress_test::random_combo(rng, true), rng);
}
