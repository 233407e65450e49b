// Hostile sizes against every host stage: validation runs before any allocation, so a rejected call allocates
// (almost) nothing; nothing throws; allocation failure is an error return. A replaced global operator new records
// the largest single request made during each call.
#include <doctest/doctest.h>

#include <prefixkv/prefixkv.hpp>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <new>
#include <string>
#include <vector>

namespace {
std::atomic<size_t> g_largest{0};
void note(size_t n) {
  size_t cur = g_largest.load();
  while (n > cur && !g_largest.compare_exchange_weak(cur, n)) {
  }
}
}  // namespace

void* operator new(size_t n) {
  note(n);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](size_t n) { return operator new(n); }
void* operator new(size_t n, const std::nothrow_t&) noexcept {
  note(n);
  return std::malloc(n ? n : 1);
}
void* operator new[](size_t n, const std::nothrow_t&) noexcept {
  note(n);
  return std::malloc(n ? n : 1);
}
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }

using prefixkv::reason;
namespace pk = prefixkv;

namespace {
constexpr size_t kSmall = size_t(1) << 20;  // what a rejected call may allocate at most (1 MiB)

// Run f with the allocation tracker reset; returns the largest single allocation it requested.
template <class F>
size_t largest_during(F&& f) {
  g_largest = 0;
  f();
  return g_largest.load();
}
}  // namespace

TEST_CASE("curves: no exception for absurd segment counts; out is replaced only on success") {
  pk::curve_buffers c;
  std::vector<float> x = {1, 2, 3};
  REQUIRE(pk::build_curves_host(x.data(), pk::make_uniform_segments(1, 3), pk::protect_policy{0, 0}, c) == cudaSuccess);
  // 2^62 empty rows: S + 1 offsets cannot exist (this threw std::length_error)
  cudaError_t e = cudaSuccess;
  largest_during([&] { e = pk::build_curves_host(x.data(), pk::make_uniform_segments(int64_t(1) << 62, 0), {}, c); });
  CHECK(e == cudaErrorMemoryAllocation);
  CHECK(pk::last_error().why == reason::capacity_exceeded);
  CHECK(c.offsets.size() == 2);  // untouched
  // a negative score is rejected before anything is allocated
  x[1] = -5;
  const size_t big = largest_during([&] { e = pk::build_curves_host(x.data(), pk::make_uniform_segments(1, 3), {}, c); });
  CHECK(e == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == reason::negative_input);
  CHECK(big == 0);
}

TEST_CASE("solve: token sums that overflow int64 are rejected (they wrapped to 0 and 'succeeded')") {
  // four segments of 2^62 tokens, all protected (no candidates)
  const int64_t n = int64_t(1) << 62;
  std::vector<int64_t> offsets(5, 0), tokens(4, n);
  pk::curve_set cs;
  cs.count = 4;
  cs.offsets = offsets.data();
  cs.tokens = tokens.data();
  cs.protect = pk::protect_policy{n, 0};
  std::vector<int64_t> keep(4, -1);
  CHECK(pk::solve_host(cs, 1, nullptr, pk::budget_evict_ratio(0.5), {}, keep.data()) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == reason::capacity_exceeded);
  CHECK(keep == std::vector<int64_t>(4, -1));
  std::vector<int64_t> kv;
  CHECK(pk::solve_host(cs, pk::budget_keep_tokens(0), {}, kv) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == reason::capacity_exceeded);
  // four segments of 2^60 are fine
  tokens.assign(4, n / 4);
  CHECK(pk::solve_host(cs, 1, nullptr, pk::budget_keep_tokens(n), {}, keep.data()) == cudaSuccess);
  CHECK(keep[0] == n / 4);
  // decreasing offsets whose difference would overflow
  std::vector<int64_t> bad = {0, std::numeric_limits<int64_t>::min() + 1};
  std::vector<int64_t> one = {1};
  pk::curve_set b2;
  b2.count = 1;
  b2.offsets = bad.data();
  b2.tokens = one.data();
  b2.protect = pk::protect_policy{0, 0};
  CHECK(pk::solve_host(b2, 1, nullptr, pk::budget_evict_ratio(0.0), {}, keep.data()) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == reason::shape_mismatch);
}

TEST_CASE("select: an impossible keep count is invalid, not an allocation (validated before allocating)") {
  std::vector<float> x = {9, 1, 5, 3, 7, 2, 8};
  pk::curve_buffers c;
  REQUIRE(pk::build_curves_host(x.data(), pk::make_uniform_segments(1, 7), pk::protect_policy{1, 1}, c) == cudaSuccess);
  pk::selection_buffers sel;
  for (int64_t keep : {int64_t(1) << 29, int64_t(1) << 40, int64_t(-3)}) {
    INFO("keep ", keep);
    cudaError_t e = cudaSuccess;
    const size_t big = largest_during([&] { e = pk::write_selection_host(c.view(), &keep, sel); });
    CHECK(e == cudaErrorInvalidValue);  // keep = 2^40 was reported as cudaErrorMemoryAllocation
    CHECK(pk::last_error().why == reason::out_of_range);
    CHECK(big < kSmall);  // keep = 2^29 allocated 2.1 GB first
  }
  // segments whose positions do not fit the int32 indices (the sum of their keep counts would overflow as well)
  const int64_t n = int64_t(1) << 62;
  std::vector<int64_t> offsets(5, 0), tokens(4, n), keep(4, n);
  pk::curve_set cs;
  cs.count = 4;
  cs.offsets = offsets.data();
  cs.tokens = tokens.data();
  cs.protect = pk::protect_policy{n, 0};
  CHECK(pk::write_selection_host(cs, keep.data(), sel) == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == reason::out_of_range);
}

TEST_CASE("compaction: a paged pool of 2^45 pages costs nothing extra (std::bad_alloc before); null huge views") {
  const int64_t B = 1, H = 1, D = 4, P = 2, blocks = 3;
  std::vector<uint8_t> pool(8 * P * H * D);
  for (size_t i = 0; i < pool.size(); ++i) pool[i] = uint8_t(i);
  std::vector<int32_t> table = {5, 1, 2};
  auto pv = pk::make_paged_kv_view(pool.data(), pk::page_layout::nhd, int64_t(1) << 45, P, H, D, table.data(), B, blocks);
  pk::paged_kv_layers<uint8_t> cache{&pv, nullptr, nullptr, nullptr, 1};
  std::vector<int64_t> off = {0, 3};
  std::vector<int32_t> idx = {1, 2, 5};
  const pk::selection sel{1, off.data(), idx.data()};
  cudaError_t e = cudaErrorUnknown;
  // (no output arrays: the claimed 2^48-byte pool may well cover them, which the aliasing check would refuse)
  size_t big = largest_during([&] { e = pk::compact_in_place_host(cache, sel, pk::segment_grid{1, B, 1}); });
  INFO(std::string(pk::last_error().message));
  CHECK(e == cudaSuccess);
  CHECK(big < kSmall);
  // the kept tokens 1, 2, 5 now fill logical positions 0..2 (pages 5 and 1)
  CHECK(pool[pv.pool_offset(5, 0, 0, 0)] == uint8_t(5 * P * D + 1 * D));
  CHECK(pool[pv.pool_offset(5, 1, 0, 0)] == uint8_t(1 * P * D + 0 * D));
  CHECK(pool[pv.pool_offset(1, 0, 0, 0)] == uint8_t(2 * P * D + 1 * D));
  std::vector<uint8_t> out(64);
  auto dst_view = pk::make_kv_view_bhsd(out.data(), 1, 1, 16, 4);
  const pk::kv_layers<uint8_t> dst{&dst_view, nullptr, nullptr, nullptr, 1};
  big = largest_during([&] { e = pk::gather_kept_host(cache, dst, sel, pk::segment_grid{1, B, 1}); });
  CHECK(big < kSmall);  // accepted, or refused because the claimed pool covers `out`; never an exception
  CHECK((e == cudaSuccess || pk::last_error().why == reason::overlapping_buffers));
  // (1, 2^32, 2^32, 1) null view: the element count wrapped to 0, validation passed and the move segfaulted
  auto nv = pk::make_kv_view<uint8_t>(nullptr, 1, int64_t(1) << 32, int64_t(1) << 32, 1, 0, int64_t(1) << 32, 1, 1);
  const pk::kv_layers<uint8_t> nc{&nv, nullptr, nullptr, nullptr, 1};
  std::vector<int64_t> off2(int64_t(1) + 1, 0);
  CHECK(pk::compact_in_place_host(nc, pk::selection{1, off2.data(), idx.data()}, pk::segment_grid{1, 1, 1}) ==
        cudaErrorInvalidValue);
  CHECK(pk::last_error().why == reason::out_of_range);
}

TEST_CASE("compaction, per-layer block tables: pools of 2^45 pages cost nothing extra (one pool shared by the "
          "layers; a pool per layer, the layers interleaved per page)") {
  const int64_t L = 2, B = 1, H = 1, D = 4, P = 2, blocks = 3, row = H * D;
  // one arena: the selection and the tables first, the pools last (a claimed pool covers only what lies above it)
  std::vector<int64_t> arena(512);
  char* base = reinterpret_cast<char*>(arena.data());
  int64_t* off = reinterpret_cast<int64_t*>(base);                 // (L + 1)
  int32_t* idx = reinterpret_cast<int32_t*>(base + 64);            // 5 kept tokens
  int32_t* tab = reinterpret_cast<int32_t*>(base + 128);           // (L, blocks)
  uint8_t* pool = reinterpret_cast<uint8_t*>(base + 1024);         // 2 x 8 pages
  const int64_t off_v[] = {0, 3, 5};
  const int32_t idx_v[] = {1, 2, 5, 0, 3};  // layer 0 keeps {1, 2, 5}, layer 1 keeps {0, 3}
  std::copy(off_v, off_v + 3, off);
  std::copy(idx_v, idx_v + 5, idx);
  const pk::selection sel{L, off, idx};
  const pk::segment_grid grid{L, B, 1};
  for (int interleaved = 0; interleaved < 2; ++interleaved) {
    CAPTURE(interleaved);
    // one pool: disjoint pages; interleaved pools (page ids per layer): the same ids in both layers
    const int32_t tab_v[] = {5, 1, 2, interleaved ? 5 : 3, interleaved ? 1 : 4, 6};
    std::copy(tab_v, tab_v + 6, tab);
    for (int64_t i = 0; i < 2 * 8 * P * row; ++i) pool[i] = uint8_t(i);
    std::vector<pk::paged_kv_view<uint8_t>> k;
    for (int64_t l = 0; l < L; ++l) {
      auto v = pk::make_paged_kv_view(pool + (interleaved ? l * P * row : 0), pk::page_layout::nhd, int64_t(1) << 45,
                                      P, H, D, tab + l * blocks, B, blocks);
      if (interleaved) v.stride_page = 2 * P * row;
      k.push_back(v);
    }
    std::vector<std::vector<uint8_t>> want(L);
    for (int64_t l = 0; l < L; ++l)
      for (int64_t j = 0; j < off_v[l + 1] - off_v[l]; ++j)
        for (int64_t d = 0; d < D; ++d) want[size_t(l)].push_back(k[size_t(l)](0, 0, idx_v[off_v[l] + j], d));
    const pk::paged_kv_layers<uint8_t> cache{k.data(), nullptr, nullptr, nullptr, L};
    cudaError_t e = cudaErrorUnknown;
    size_t big = largest_during([&] { e = pk::compact_in_place_host(cache, sel, grid); });
    INFO(std::string(pk::last_error().message));
    REQUIRE(e == cudaSuccess);
    CHECK(big < kSmall);
    for (int64_t l = 0; l < L; ++l)
      for (int64_t j = 0; j < off_v[l + 1] - off_v[l]; ++j)
        for (int64_t d = 0; d < D; ++d) CHECK(k[size_t(l)](0, 0, j, d) == want[size_t(l)][size_t(j * D + d)]);
    // one page in both layers' touched blocks: refused with one pool, legal with a pool per layer
    tab[blocks] = tab[0];
    const std::vector<uint8_t> before(pool, pool + 2 * 8 * P * row);
    big = largest_during([&] { e = pk::compact_in_place_host(cache, sel, grid); });
    CHECK(big < kSmall);
    if (interleaved) {
      CHECK(e == cudaSuccess);
    } else {
      CHECK(e == cudaErrorInvalidValue);
      CHECK(pk::last_error().why == reason::overlapping_buffers);
      CHECK(std::equal(before.begin(), before.end(), pool));
    }
  }
}

TEST_CASE("readers: an endless or lying file costs what it holds, not what it claims") {
  // a .npy header announcing 2^40 float64 values over a 128-byte file
  std::string d = "{'descr': '<f8', 'fortran_order': False, 'shape': (1099511627776,), }";
  while ((10 + d.size() + 1) % 64) d += ' ';
  d += '\n';
  {
    std::FILE* f = std::fopen("hostile_big.npy", "wb");
    REQUIRE(f);
    const unsigned char head[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, static_cast<unsigned char>(d.size() & 0xFF),
                                    static_cast<unsigned char>(d.size() >> 8)};
    std::fwrite(head, 1, 10, f);
    std::fwrite(d.data(), 1, d.size(), f);
    std::fclose(f);
  }
  pk::npy_array a;
  cudaError_t e = cudaSuccess;
  size_t big = largest_during([&] { e = pk::npy_load("hostile_big.npy", a); });
  CHECK(e == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == reason::capacity_exceeded);  // more than the 1 GiB read limit
  CHECK(big < kSmall);
  big = largest_during([&] { e = pk::npy_load("hostile_big.npy", a, size_t(1) << 50); });
  CHECK(e == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == reason::bad_file);  // the payload is not there
  CHECK(big <= (size_t(1) << 21));                  // read in chunks as it arrives
  // endless streams: refused at the first bytes (or at the limit)
  big = largest_during([&] { e = pk::npy_load("/dev/zero", a); });
  CHECK(e == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == reason::bad_file);
  CHECK(big < kSmall);
  std::vector<double> prof;
  big = largest_during([&] { e = pk::profile_load("/dev/zero", prof); });
  CHECK(e == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == reason::bad_file);
  CHECK(big < kSmall);
  std::vector<unsigned char> bytes;
  e = pk::read_file_bytes("/dev/zero", bytes, 1 << 20);
  CHECK(e == cudaErrorInvalidValue);
  CHECK(pk::last_error().why == reason::capacity_exceeded);
}
