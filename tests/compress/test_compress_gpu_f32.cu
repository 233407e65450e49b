// Device compressor == host backend, fp32 caches (the CUDA-core scorer paths).
#include "compress/compress_gpu_util.cuh"

TEST_CASE("compress (fp32 cache): device == host backend on random models") {
  auto rng = prefixkv_test::make_rng(0xC0F32);
  const int n = prefixkv_test::rounds(40, 8, 2);
  for (int i = 0; i < n; ++i) compress_test::check_combo<float, float>(compress_test::random_combo(rng, true), rng);
}

// Per-layer block tables (every layer packs its kept tokens into its own pages and frees the rest on its own): a pool
// per layer and one pool shared by the layers, in place and out of place, every scorer that works without reading K
// through a table, both granularities, every allocation.
TEST_CASE("compress: per-layer block tables, device == host backend") {
  auto rng = prefixkv_test::make_rng(0xC0B7);
  using namespace prefixkv;
  const int n = prefixkv_test::rounds(40, 8, 2);
  const scorer_kind scorers[] = {scorer_kind::scores, scorer_kind::attention, scorer_kind::recency};
  for (int i = 0; i < n; ++i) {
    compress_test::combo c = compress_test::random_combo(rng, false);
    c.scorer = scorers[i % 3];
    c.lay = i % 2 ? compact_test::layout::nhd : compact_test::layout::hnd;
    c.s.tables = 1 + (i / 2) % 2;
    if (!c.in_place && i % 4 == 0) c.dst_lay = compact_test::layout::nhd;  // per-layer tables on both sides
    compress_test::check_combo<float, float>(c, rng);
  }
}

TEST_CASE("compress: the window and key-norm scorers refuse per-layer block tables before anything is enqueued") {
  auto rng = prefixkv_test::make_rng(0xC0B8);
  using namespace prefixkv;
  compress_test::shape s;
  s.tables = 2;
  compress_test::model<float, float> m(compact_test::layout::nhd, s, rng, 1, false);
  for (auto sc : {scorer_kind::window, scorer_kind::key_norm}) {
    compress_plan plan;
    REQUIRE(make_plan(m.config(sc, granularity::layer, allocation::prefix, true, nullptr), plan) == cudaSuccess);
    size_t bytes = 0;
    m.cache.visit(false, [&](const auto& dc) {
      m.with_args(false, dc, dc, false, false, [&](auto& a) {
        REQUIRE(compress(nullptr, bytes, plan, a) == cudaSuccess);
        prefixkv_test::device_buffer<unsigned char> tmp(bytes);
        CHECK(compress(tmp.get(), bytes, plan, a) == cudaErrorInvalidValue);
        CHECK(last_error().why == reason::unsupported);
      });
    });
    PKV_CUDA_CHECK(cudaDeviceSynchronize());
    CHECK(m.cache.download() == m.image);
  }
}
