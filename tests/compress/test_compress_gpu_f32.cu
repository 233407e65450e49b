// Device compressor == host backend, fp32 caches (the CUDA-core scorer paths).
#include "compress/compress_gpu_util.cuh"

TEST_CASE("compress (fp32 cache): device == host backend on random models") {
  auto rng = prefixkv_test::make_rng(0xC0F32);
  const int n = prefixkv_test::quick_mode() ? 8 : 40;
  for (int i = 0; i < n; ++i) compress_test::check_combo<float, float>(compress_test::random_combo(rng, true), rng);
}
