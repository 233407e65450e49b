// In-place compaction (strided and paged): device == host twin, byte for byte; rows past the kept count keep
// their bytes (the whole image is compared).
#include "compact_test_util.cuh"

using namespace compact_test;

TEST_CASE("in place: strided and paged layouts x fractions x head_dim") {
  auto rng = make_rng(601);
  const int64_t dims[] = {64, 80, 128, 256};
  int n = 0;
  for (layout l : all_layouts)
    for (int frac = 0; frac < 6; ++frac) {
      case_cfg c;
      c.src = l;
      c.g.L = 2;
      c.g.B = 3;
      c.g.H = 2;
      c.g.T = 45;
      c.g.D = dims[n % 4];
      c.g.page = n % 2 ? 16 : 7;
      c.frac = frac;
      ++n;
      run_inplace_case<uint16_t>(c, rng);
    }
}

TEST_CASE("in place: odd rows, fp8/fp32, misaligned, page size 1") {
  auto rng = make_rng(602);
  for (int rep = 0; rep < 5; ++rep) {
    case_cfg c;
    c.src = all_layouts[rep];
    c.g.T = 31 + int64_t(rng() % 30);
    c.g.page = rep == 3 ? 1 : 4;
    c.g.misalign = rep % 2;
    c.frac = 5;
    c.g.D = 3;
    run_inplace_case<uint8_t>(c, rng);
    run_inplace_case<uint16_t>(c, rng);
    c.g.D = 256;
    run_inplace_case<uint8_t>(c, rng);
    c.g.D = 64;
    run_inplace_case<float>(c, rng);
  }
}

TEST_CASE("in place: head-wise lists and scales") {
  auto rng = make_rng(603);
  for (int rep = 0; rep < 10; ++rep) {
    case_cfg c;
    c.src = all_layouts[rep % 5];
    c.g.H = 1 + int64_t(rng() % 4);
    c.g.T = 48;
    c.g.D = 128;
    c.headwise = rep < 5;
    c.g.scales = c.headwise ? 2 : 1 + rep % 2;
    c.frac = 5;
    run_inplace_case<uint16_t>(c, rng);
  }
}

TEST_CASE("in place: many tiles per lane (ordering across tiles)") {
  auto rng = make_rng(604);
  for (layout l : {layout::bhsd, layout::strided, layout::nhd, layout::hnd}) {
    case_cfg c;
    c.src = l;
    c.g.L = 2;
    c.g.B = 2;
    c.g.H = 2;
    c.g.T = 1500;
    c.g.D = 128;
    c.frac = 3;
    run_inplace_case<uint16_t>(c, rng);
    c.g.T = 5000;
    c.g.D = 3;
    c.frac = 5;
    run_inplace_case<uint8_t>(c, rng);
  }
}

TEST_CASE("in place: shift-by-one and keep-the-tail patterns") {
  auto rng = make_rng(605);
  for (layout l : all_layouts) {
    geometry g;
    g.L = 2;
    g.B = 2;
    g.H = 2;
    g.T = 777;
    g.D = 128;
    cache<uint16_t> kv(l, g, rng, false);
    const prefixkv::segment_grid grid{g.L, g.B, 1};
    host_selection sel;
    sel.offsets.push_back(0);
    for (int64_t s = 0; s < grid.count(); ++s) {
      if (s % 2 == 0)
        for (int32_t t = 1; t < g.T; ++t) sel.indices.push_back(t);            // every row moves down by one
      else
        for (int32_t t = int32_t(g.T / 3); t < g.T; ++t) sel.indices.push_back(t);  // keep the tail
      sel.offsets.push_back(int64_t(sel.indices.size()));
    }
    sel.upload();
    const auto original = kv.host;
    cudaError_t e = cudaErrorUnknown;
    kv.visit(true, [&](const auto& x) { e = prefixkv::compact_in_place_host(x, sel.host(), grid); });
    REQUIRE(e == cudaSuccess);
    const auto expect = kv.host;
    CHECK(first_diff(expect, original) != -1);
    run_three_ways(
        [&](void* t, size_t& bytes, cudaStream_t st) {
          cudaError_t err = cudaErrorUnknown;
          kv.visit(false, [&](const auto& x) { err = prefixkv::compact_in_place(t, bytes, x, sel.dev(), grid, {}, st); });
          return err;
        },
        [&] { kv.upload(original); },
        [&](const char* mode) {
          const std::string md = std::string(name(l)) + " " + mode;
          INFO(md);
          CHECK(first_diff(kv.download(), expect) == -1);
        });
  }
}

// Launch variants of the move kernel (benchmark hook): programmatic dependent launch on/off, a tiny grid so that
// every block walks several lanes, the general and fast move kernels, persistent grids, short out-of-place blocks.
TEST_CASE("in place and gather: launch variants, several lanes per block") {
  auto rng = make_rng(606);
  auto& tune = prefixkv::detail::compact_tune();
  const auto saved = tune;
  for (int variant = 0; variant < 8; ++variant) {
    tune.pdl = variant % 2 == 0;
    tune.max_blocks = variant == 1 || variant == 2 ? 3 : 0;
    // move kernel: default pick, the general kernel, or a fast variant (persistent grid for variants >= 4)
    tune.kernel = variant % 3 == 0 ? -1 : (variant % 3 == 1 ? 0 : 1 + variant % prefixkv::detail::compact_fast_variants);
    tune.resident = variant >= 4 && variant != 6 ? 1 + variant % 4 : 0;
    tune.chunk_rows = variant == 3 || variant == 6 ? 32 : (variant == 0 ? -1 : 0);  // out of place: short blocks
    for (layout l : {layout::bhsd, layout::strided, layout::nhd, layout::hnd}) {
      case_cfg c;
      c.src = l;
      c.dst = variant % 2 ? layout::bshd : layout::bhsd;
      c.g.L = 2;
      c.g.B = 2;
      c.g.H = 3;
      c.g.T = 300 + int64_t(rng() % 100);
      c.g.D = variant % 4 < 2 ? 128 : 64;
      c.frac = 3 + variant % 3;
      INFO("variant " << variant);
      run_inplace_case<uint16_t>(c, rng);
      run_gather_case<uint16_t>(c, rng);
      c.g.D = 3;  // narrow path
      run_inplace_case<uint8_t>(c, rng);
    }
  }
  tune = saved;
}
