// Device compressor == host backend, f16 caches with f16 attention probabilities (the paper's path).
#include "compress/compress_gpu_util.cuh"

TEST_CASE("compress (f16 cache, f16 P): device == host backend on random models") {
  auto rng = prefixkv_test::make_rng(0xC0F16);
  const int n = prefixkv_test::rounds(80, 12, 1);
  for (int i = 0; i < n; ++i) compress_test::check_combo<prefixkv::f16, prefixkv::f16>(compress_test::random_combo(rng, true), rng);
}

TEST_CASE("compress: every scorer x granularity x allocation once (f16)") {
  auto rng = prefixkv_test::make_rng(0xC0A11);
  using namespace prefixkv;
  for (int sc = 0; sc < 5; ++sc)
    for (int gr = 0; gr < 2; ++gr)
      for (int al = 0; al < 4; ++al) {
        // racecheck (PREFIXKV_TEST_QUICK=2): every scorer once; granularities and allocations across them
        if (prefixkv_test::tiny_mode() && (gr != sc % 2 || al != sc % 4)) continue;
        compress_test::combo c = compress_test::random_combo(rng, true);
        c.scorer = scorer_kind(sc);
        c.gran = granularity(gr);
        c.alloc = allocation(al);
        if (c.scorer == scorer_kind::window || c.scorer == scorer_kind::key_norm)
          c.lay = compact_test::all_layouts[rng() % 3];
        compress_test::check_combo<f16, f16>(c, rng);
      }
}
