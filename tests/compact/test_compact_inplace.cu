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
          kv.visit(false, [&](const auto& x) {
            err = prefixkv::compact_in_place(t, bytes, x, sel.dev(), grid, {}, prefixkv::index_check::device, st);
          });
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

// Launch policies of the move kernel (compact_policy): programmatic dependent launch on/off, the fast and the
// general move kernels on the same packed rows, a grid of 3 blocks (every block walks several lanes / chunks),
// out-of-place chunks of 256, 32 and 1 rows.
namespace {
template <class Policy>
void run_policy_variant(int variant, std::mt19937_64& rng) {
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
    run_inplace_case<uint16_t, Policy>(c, rng);
    run_gather_case<uint16_t, Policy>(c, rng);
    c.g.D = 3;  // narrow path
    run_inplace_case<uint8_t, Policy>(c, rng);
  }
}
}  // namespace

TEST_CASE("in place and gather: launch policies, several lanes per block") {
  auto rng = make_rng(606);
  using prefixkv::compact_policy;
  //                            Pdl    Fast   MaxBlocks ChunkRows
  run_policy_variant<compact_policy<>>(0, rng);
  run_policy_variant<compact_policy<false, false, 3, 256>>(1, rng);
  run_policy_variant<compact_policy<true, true, 3, 32>>(2, rng);
  run_policy_variant<compact_policy<false, true, 0, 32>>(3, rng);
  run_policy_variant<compact_policy<true, false, 0, 32>>(4, rng);
  run_policy_variant<compact_policy<false, true, 0, 256>>(5, rng);
  run_policy_variant<compact_policy<true, true, 0, 1>>(6, rng);
  run_policy_variant<compact_policy<false, false, 0, 256>>(7, rng);
}
// ---- kept-list patterns mixed per call, checked on the device and trusted --------------------------------------

namespace {

//! Kept-list patterns, mixed across the segments of one call (ragged by construction).
//! 0 random subset, 1 every row moves down by one, 2 keep the tail (kept rows far ahead of their destination),
//! 3 only the last token, 4 none, 5 all, 6 long runs of consecutive rows with gaps, 7 only the first token.
inline host_selection pattern_selection(std::mt19937_64& rng, int64_t S, int64_t T, int first_pattern) {
  host_selection sel;
  sel.offsets.push_back(0);
  for (int64_t s = 0; s < S; ++s) {
    const int pat = int((first_pattern + s) % 8);
    std::vector<int32_t> v;
    switch (pat) {
      case 0:
        for (int32_t t = 0; t < T; ++t)
          if (rng() % 3 != 0) v.push_back(t);
        break;
      case 1:
        for (int32_t t = 1; t < T; ++t) v.push_back(t);
        break;
      case 2: {
        const int64_t k = 1 + int64_t(rng() % uint64_t(T));
        for (int64_t t = T - k; t < T; ++t) v.push_back(int32_t(t));
        break;
      }
      case 3: v.push_back(int32_t(T - 1)); break;
      case 4: break;
      case 5:
        for (int32_t t = 0; t < T; ++t) v.push_back(t);
        break;
      case 6: {
        int32_t t = int32_t(rng() % 5);
        while (t < T) {
          const int32_t run = 1 + int32_t(rng() % 97), gap = 1 + int32_t(rng() % 41);
          for (int32_t i = 0; i < run && t < T; ++i) v.push_back(t++);
          t += gap;
        }
        break;
      }
      default: v.push_back(0); break;
    }
    sel.indices.insert(sel.indices.end(), v.begin(), v.end());
    sel.offsets.push_back(int64_t(sel.indices.size()));
  }
  sel.upload();
  return sel;
}

//! Device (three ways, or `reps` plain launches) vs host twin for one explicit selection, whole image compared.
template <class T, class Policy = default_policy>
void run_inplace_pattern(layout l, const geometry& g, bool headwise, int first_pattern, std::mt19937_64& rng,
                         int reps = 0, prefixkv::index_check chk = prefixkv::index_check::device) {
  cache<T> kv(l, g, rng, false);
  const prefixkv::segment_grid grid{g.L, g.B, headwise ? g.H : 1};
  host_selection sel = pattern_selection(rng, grid.count(), g.T, first_pattern);
  const auto original = kv.host;
  outputs out(grid.count(), g.L, g.B, is_paged(l));
  cudaError_t e = cudaErrorUnknown;
  kv.visit(true, [&](const auto& x) { e = prefixkv::compact_in_place_host(x, sel.host(), grid, out.host()); });
  REQUIRE_MESSAGE(e == cudaSuccess, prefixkv::last_error().message);
  const auto expect = kv.host;
  auto op = [&](void* t, size_t& bytes, cudaStream_t st) {
    cudaError_t err = cudaErrorUnknown;
    kv.visit(false, [&](const auto& x) {
      err = in_place_with<Policy>(t, bytes, x, sel.dev(), grid, out.dev(), chk, st);
    });
    return err;
  };
  auto reset = [&] {
    kv.upload(original);
    out.poison();
  };
  auto check = [&](const char* mode) {
    INFO(mode);
    const int64_t at = first_diff(kv.download(), expect);
    CHECK_MESSAGE(at == -1, "cache differs at byte ", at);
    out.check_equal();
  };
  if (reps == 0) {
    run_three_ways(op, reset, check);
    return;
  }
  size_t bytes = 0;
  PKV_CUDA_CHECK(op(nullptr, bytes, nullptr));
  device_buffer<unsigned char> temp(bytes);
  for (int r = 0; r < reps; ++r) {
    temp.poison();  // stale workspace contents from the previous run must not matter
    reset();
    PKV_CUDA_CHECK(cudaDeviceSynchronize());
    PKV_CUDA_CHECK(op(temp.get(), bytes, nullptr));
    PKV_CUDA_CHECK(cudaDeviceSynchronize());
    INFO("rep " << r);
    check("repeat");
  }
}

}  // namespace

// Eight kept patterns mixed per call (0 / 1 / all kept, shift-by-one, keep the tail, only the last token, long runs
// with gaps, random), every strided and paged layout, 16-byte, narrow (3-byte rows + scales) and misaligned rows,
// shared and head-wise lists, with and without programmatic dependent launch, checked on the device and trusted.
namespace {
template <class Policy>
void run_pattern_variant(int v, std::mt19937_64& rng) {
  const auto chk = v % 4 < 2 ? prefixkv::index_check::device : prefixkv::index_check::trusted;
  for (layout l : {layout::bhsd, layout::bshd, layout::strided, layout::nhd, layout::hnd}) {
    INFO("variant " << v << " layout " << name(l));
    geometry g;
    g.L = 2;
    g.B = 3;
    g.H = 2;
    g.T = 60 + int64_t(rng() % 90);
    g.D = 128;
    g.page = v % 2 ? 16 : 5;
    run_inplace_pattern<uint16_t, Policy>(l, g, false, v, rng, 0, chk);
    g.D = 64;
    run_inplace_pattern<uint16_t, Policy>(l, g, true, v + 1, rng, 0, chk);
    g.D = 256;
    run_inplace_pattern<uint8_t, Policy>(l, g, v % 2 == 0, v + 2, rng, 0, chk);
    g.D = 3;  // narrow path, odd rows (general kernel)
    g.scales = 1 + v % 2;
    run_inplace_pattern<uint8_t, Policy>(l, g, g.scales == 2, v + 3, rng, 0, chk);
    g.scales = 0;
    g.D = 64;
    g.misalign = 1;
    run_inplace_pattern<float, Policy>(l, g, true, v + 5, rng, 0, chk);
  }
}
}  // namespace

TEST_CASE("in place: kept patterns, device-checked and trusted") {
  auto rng = make_rng(607);
  for (int v = 0; v < 8; ++v) {
    if (v % 2 == 0)
      run_pattern_variant<default_policy>(v, rng);
    else
      run_pattern_variant<prefixkv::compact_policy<false>>(v, rng);  // without programmatic dependent launch
  }
}

// Large lanes (thousands of rows, many tiles per block), repeated with a poisoned workspace, compared byte for byte
// with the host twin every time: contiguous and paged, device-checked and trusted.
TEST_CASE("in place: large lanes, repeated") {
  auto rng = make_rng(608);
  const bool quick = quick_mode();
  for (int v = 0; v < 2; ++v)
    for (layout l : {layout::bhsd, layout::nhd}) {
      INFO("variant " << v << " layout " << name(l));
      geometry g;
      g.L = 2;
      g.B = 2;
      g.H = 8;
      g.T = quick ? 1000 : 6000 + int64_t(rng() % 500);
      g.D = 128;
      g.page = 16;
      run_inplace_pattern<uint16_t>(l, g, false, v, rng, quick ? 2 : 3,
                                    v == 1 ? prefixkv::index_check::trusted : prefixkv::index_check::device);
    }
}

// Per-layer block tables (layers whose lengths differ after compression keep and free their own pages): a pool per
// layer with page ids repeating across layers, and one pool shared by the layers; in place and gather (paged ->
// paged, paged -> strided, strided -> paged), shared and head-wise lists, scales, page sizes 1 / 5 / 16.
TEST_CASE("in place and gather: per-layer block tables, a pool per layer or one shared pool") {
  auto rng = make_rng(609);
  const bool quick = quick_mode();
  int n = 0;
  for (int tables = 1; tables <= 2; ++tables)
    for (layout l : {layout::nhd, layout::hnd})
      for (int rep = 0; rep < (quick ? 2 : 4); ++rep, ++n) {
        case_cfg c;
        c.src = l;
        c.g.tables = tables;
        c.g.L = 1 + int64_t(rng() % 4);
        c.g.B = 1 + int64_t(rng() % 3);
        c.g.H = 1 + int64_t(rng() % 3);
        c.g.T = 1 + int64_t(rng() % 90);
        c.g.D = n % 3 == 0 ? 3 : 64;
        const int64_t pages[] = {1, 5, 16};
        c.g.page = pages[rng() % 3];
        c.frac = int(rng() % 6);
        c.headwise = rng() % 2 == 0;
        c.g.scales = c.headwise ? 2 * int(rng() % 2) : int(rng() % 3);
        if (c.g.D == 3) {
          run_inplace_case<uint8_t>(c, rng);
        } else {
          run_inplace_case<uint16_t>(c, rng);
          run_inplace_case<uint16_t, prefixkv::compact_policy<false, false, 3, 32>>(c, rng);
        }
        c.dst = rep % 2 ? l : layout::bshd;
        run_gather_case<uint16_t>(c, rng);
        c.src = layout::bhsd;  // strided -> paged with per-layer tables
        c.dst = l;
        run_gather_case<uint16_t>(c, rng);
        c.src = l;
      }
}
