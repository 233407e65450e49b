// Host twins of the compaction kernels, checked against hand-computed results (g++ only, no CUDA).
#include <doctest/doctest.h>

#include <prefixkv/compact/compact.hpp>

#include <algorithm>
#include <cstdint>
#include <vector>

using prefixkv::reason;

namespace {
// value of (layer, kind, b, h, t, d) for recognisable rows
uint8_t val(int64_t kind, int64_t b, int64_t h, int64_t t, int64_t d) {
  return static_cast<uint8_t>(kind * 100 + b * 50 + h * 20 + t * 2 + d);
}
}  // namespace

TEST_CASE("in place, strided [B,H,S,D]: kept rows move to the front, the tail keeps its bytes") {
  const int64_t B = 2, H = 2, T = 8, D = 2;
  std::vector<uint8_t> k(B * H * T * D), v(k.size());
  auto kv = prefixkv::make_kv_view_bhsd(k.data(), B, H, T, D);
  auto vv = prefixkv::make_kv_view_bhsd(v.data(), B, H, T, D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t d = 0; d < D; ++d) {
          kv(b, h, t, d) = val(0, b, h, t, d);
          vv(b, h, t, d) = val(1, b, h, t, d);
        }
  std::vector<int64_t> off{0, 3, 3};  // sequence 0 keeps {1, 4, 6}, sequence 1 keeps nothing
  std::vector<int32_t> idx{1, 4, 6};
  prefixkv::selection sel{2, off.data(), idx.data()};
  prefixkv::kv_layers<uint8_t> cache{&kv, &vv, nullptr, nullptr, 1};
  std::vector<int32_t> len(2, -1), cu(3, -1);
  int32_t status = -1;
  REQUIRE(prefixkv::compact_in_place_host(cache, sel, prefixkv::segment_grid{1, B, 1},
                                          {len.data(), cu.data(), nullptr, &status}) == cudaSuccess);
  CHECK(status == 0);
  CHECK(len == std::vector<int32_t>{3, 0});
  CHECK(cu == std::vector<int32_t>{0, 3, 3});
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d) {
      const int64_t want[T] = {1, 4, 6, 3, 4, 5, 6, 7};  // tail rows unchanged
      for (int64_t t = 0; t < T; ++t) {
        CHECK(kv(0, h, t, d) == val(0, 0, h, want[t], d));
        CHECK(vv(0, h, t, d) == val(1, 0, h, want[t], d));
        CHECK(kv(1, h, t, d) == val(0, 1, h, t, d));  // sequence 1 untouched
      }
    }
}

TEST_CASE("gather, head-wise lists, strided -> paged NHD: pages in use and block-table placement") {
  const int64_t B = 1, H = 2, T = 6, D = 3, P = 2, blocks = 3, pages = 4;
  std::vector<uint8_t> k(B * H * T * D);
  auto kv = prefixkv::make_kv_view_bshd(k.data(), B, T, H, D);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t d = 0; d < D; ++d) kv(0, h, t, d) = val(0, 0, h, t, d);
  std::vector<uint8_t> pool(pages * P * H * D, 0xEE);
  std::vector<int32_t> table{3, 0, 2};
  auto pv = prefixkv::make_paged_kv_view(pool.data(), prefixkv::page_layout::nhd, pages, P, H, D, table.data(), B, blocks);
  std::vector<int64_t> off{0, 3, 4};  // head 0 keeps {0, 2, 5}; head 1 keeps {4}
  std::vector<int32_t> idx{0, 2, 5, 4};
  prefixkv::selection sel{2, off.data(), idx.data()};
  prefixkv::kv_layers<uint8_t> src{&kv, nullptr, nullptr, nullptr, 1};
  prefixkv::paged_kv_layers<uint8_t> dst{&pv, nullptr, nullptr, nullptr, 1};
  int32_t used = -1;
  REQUIRE(prefixkv::gather_kept_host(src, dst, sel, prefixkv::segment_grid{1, 1, H}, {nullptr, nullptr, &used, nullptr}) ==
          cudaSuccess);
  CHECK(used == 2);  // ceil(3 / 2)
  for (int64_t d = 0; d < D; ++d) {
    CHECK(pool[pv.pool_offset(3, 0, 0, d)] == val(0, 0, 0, 0, d));
    CHECK(pool[pv.pool_offset(3, 1, 0, d)] == val(0, 0, 0, 2, d));
    CHECK(pool[pv.pool_offset(0, 0, 0, d)] == val(0, 0, 0, 5, d));
    CHECK(pool[pv.pool_offset(3, 0, 1, d)] == val(0, 0, 1, 4, d));
    CHECK(pool[pv.pool_offset(0, 1, 0, d)] == 0xEE);  // beyond the kept rows: untouched
    CHECK(pool[pv.pool_offset(3, 1, 1, d)] == 0xEE);
    CHECK(pool[pv.pool_offset(1, 0, 0, d)] == 0xEE);  // page outside the table
  }
}

TEST_CASE("host twins reject bad selections with distinct reasons, caches untouched") {
  const int64_t B = 1, H = 1, T = 8, D = 4;
  std::vector<uint8_t> k(B * H * T * D), small(B * H * 2 * D, 0x11);
  for (size_t i = 0; i < k.size(); ++i) k[i] = uint8_t(i);
  const auto before = k;
  auto kv = prefixkv::make_kv_view_bhsd(k.data(), B, H, T, D);
  auto sv = prefixkv::make_kv_view_bhsd(small.data(), B, H, 2, D);
  prefixkv::kv_layers<uint8_t> cache{&kv, nullptr, nullptr, nullptr, 1};
  prefixkv::kv_layers<uint8_t> tiny{&sv, nullptr, nullptr, nullptr, 1};
  const prefixkv::segment_grid grid{1, 1, 1};
  std::vector<int64_t> off{0, 3};
  auto run = [&](std::vector<int32_t> idx) {
    prefixkv::selection sel{1, off.data(), idx.data()};
    return prefixkv::compact_in_place_host(cache, sel, grid);
  };
  CHECK(run({0, 3, 8}) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::out_of_range);
  CHECK(run({0, 5, 3}) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::not_ascending);
  CHECK(run({2, 2, 3}) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::not_ascending);
  std::vector<int32_t> idx{5, 1, 3};  // unordered is fine for a gather, but 3 rows do not fit in 2
  prefixkv::selection sel{1, off.data(), idx.data()};
  CHECK(prefixkv::gather_kept_host(cache, tiny, sel, grid) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::capacity_exceeded);
  CHECK(prefixkv::gather_kept_host(cache, cache, sel, grid) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::overlapping_buffers);
  CHECK(k == before);
  CHECK(std::all_of(small.begin(), small.end(), [](uint8_t x) { return x == 0x11; }));
  off = {0, 2};
  CHECK(prefixkv::gather_kept_host(cache, tiny, sel, grid) == cudaSuccess);
  CHECK(small[0] == 5 * D);
  CHECK(small[D] == 1 * D);
}

TEST_CASE("aliasing: tensors sharing memory are refused, K/V interleaved per token or per page is accepted") {
  const int64_t B = 2, H = 2, T = 6, D = 3, L = 2;
  const int64_t per_layer = B * T * 2 * H * D;
  std::vector<uint8_t> buf(L * per_layer + 16);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = uint8_t(i * 7 + 1);
  // [L, B, T, 2, H, D]: K and V interleaved per token, layers back to back
  auto view = [&](int64_t l, int kind, int64_t shift = 0) {
    return prefixkv::make_kv_view(buf.data() + l * per_layer + kind * H * D + shift, B, H, T, D, T * 2 * H * D, D,
                                  2 * H * D, 1);
  };
  const prefixkv::segment_grid grid{L, B, 1};
  std::vector<int64_t> off{0, 2, 3, 5, 6};
  std::vector<int32_t> idx{1, 4, 5, 0, 2, 3};
  const prefixkv::selection sel{4, off.data(), idx.data()};
  const auto before = buf;
  auto expect_refused = [&](const prefixkv::kv_view<uint8_t>* k, const prefixkv::kv_view<uint8_t>* v,
                            const prefixkv::kv_view<uint8_t>* ks) {
    const prefixkv::kv_layers<uint8_t, uint8_t> cache{k, v, ks, nullptr, L};
    CHECK(prefixkv::compact_in_place_host(cache, sel, grid) == cudaErrorInvalidValue);
    CHECK(prefixkv::last_error().why == reason::overlapping_buffers);
    CHECK(buf == before);
  };
  std::vector<prefixkv::kv_view<uint8_t>> k{view(0, 0), view(1, 0)}, v{view(0, 1), view(1, 1)};
  expect_refused(k.data(), k.data(), nullptr);  // V on K's memory
  std::vector<prefixkv::kv_view<uint8_t>> k00{view(0, 0), view(0, 0)}, v00{view(0, 1), view(0, 1)};
  expect_refused(k00.data(), v00.data(), nullptr);  // layer 1 on layer 0
  std::vector<prefixkv::kv_view<uint8_t>> vs{view(0, 1, -1), view(1, 1, -1)};
  expect_refused(k.data(), vs.data(), nullptr);  // V one element into K's rows
  std::vector<prefixkv::kv_view<uint8_t>> sc{view(0, 0).with_tokens(T), view(1, 0)};
  for (auto& s : sc) s.dim = 1;
  expect_refused(k.data(), v.data(), sc.data());  // K scales laid over K
  // accepted: the interleaved cache, compacted exactly as two separate tensors would be
  const prefixkv::kv_layers<uint8_t> cache{k.data(), v.data(), nullptr, nullptr, L};
  std::vector<int32_t> len(4, -1);
  REQUIRE(prefixkv::compact_in_place_host(cache, sel, grid, {len.data(), nullptr, nullptr, nullptr}) == cudaSuccess);
  CHECK(len == std::vector<int32_t>{2, 1, 2, 1});
  auto at = [&](const std::vector<uint8_t>& img, const prefixkv::kv_view<uint8_t>& x, int64_t b, int64_t h, int64_t t,
                int64_t d) { return img[static_cast<size_t>((x.data - buf.data()) + x.offset(b, h, t, d))]; };
  for (int64_t l = 0; l < L; ++l)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t s = grid.id(l, b);
      for (int64_t j = 0; j < off[s + 1] - off[s]; ++j)
        for (int kind = 0; kind < 2; ++kind)
          for (int64_t h = 0; h < H; ++h)
            for (int64_t d = 0; d < D; ++d)
              CHECK(at(buf, view(l, kind), b, h, j, d) == at(before, view(l, kind), b, h, idx[off[s] + j], d));
    }
  // an output array inside the cache, a gather whose destinations alias each other
  const auto after = buf;
  int32_t* inside = reinterpret_cast<int32_t*>(buf.data() + 4 * ((per_layer / 2) / 4));
  CHECK(prefixkv::compact_in_place_host(cache, sel, grid, {inside, nullptr, nullptr, nullptr}) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::overlapping_buffers);
  CHECK(buf == after);
  std::vector<uint8_t> out(2 * B * H * T * D, 0);
  auto o0 = prefixkv::make_kv_view_bhsd(out.data(), B, H, T, D);
  std::vector<prefixkv::kv_view<uint8_t>> ok{o0, o0}, ov{prefixkv::make_kv_view_bhsd(out.data() + B * H * T * D, B, H, T, D),
                                                         prefixkv::make_kv_view_bhsd(out.data() + B * H * T * D, B, H, T, D)};
  const prefixkv::kv_layers<uint8_t> dst{ok.data(), ov.data(), nullptr, nullptr, L};
  CHECK(prefixkv::gather_kept_host(cache, dst, sel, grid) == cudaErrorInvalidValue);  // both layers into one buffer
  CHECK(prefixkv::last_error().why == reason::overlapping_buffers);
  CHECK(std::all_of(out.begin(), out.end(), [](uint8_t x) { return x == 0; }));
}

TEST_CASE("aliasing, paged: K/V per page accepted, one pool for both refused, a block table inside the pool refused") {
  const int64_t B = 1, H = 1, D = 2, P = 2, blocks = 3, pages = 4;
  std::vector<uint8_t> pool(pages * 2 * P * H * D + 8);
  for (size_t i = 0; i < pool.size(); ++i) pool[i] = uint8_t(i);
  std::vector<int32_t> table{2, 0, 3};
  auto pv = [&](int kind, bool same, const int32_t* tbl) {
    auto v = prefixkv::make_paged_kv_view(pool.data() + (same ? 0 : kind * P * H * D), prefixkv::page_layout::nhd, pages,
                                          P, H, D, tbl, B, blocks);
    v.stride_page = 2 * P * H * D;  // [pages, 2, P, H, D]
    return v;
  };
  std::vector<int64_t> off{0, 3};
  std::vector<int32_t> idx{1, 3, 4};
  const prefixkv::selection sel{1, off.data(), idx.data()};
  const prefixkv::segment_grid grid{1, B, 1};
  const auto before = pool;
  {
    auto k = pv(0, true, table.data()), v = pv(1, true, table.data());
    CHECK(prefixkv::compact_in_place_host(prefixkv::paged_kv_layers<uint8_t>{&k, &v, nullptr, nullptr, 1}, sel, grid) ==
          cudaErrorInvalidValue);
    CHECK(prefixkv::last_error().why == reason::overlapping_buffers);
    CHECK(pool == before);
  }
  {  // the block table stored inside the pool it indexes
    int32_t* in_pool = reinterpret_cast<int32_t*>(pool.data() + 4);
    auto k = pv(0, false, in_pool), v = pv(1, false, in_pool);
    const auto b2 = pool;
    CHECK(prefixkv::compact_in_place_host(prefixkv::paged_kv_layers<uint8_t>{&k, &v, nullptr, nullptr, 1}, sel, grid) ==
          cudaErrorInvalidValue);
    CHECK(prefixkv::last_error().why == reason::overlapping_buffers);
    CHECK(pool == b2);
  }
  pool = before;
  auto k = pv(0, false, table.data()), v = pv(1, false, table.data());
  REQUIRE(prefixkv::compact_in_place_host(prefixkv::paged_kv_layers<uint8_t>{&k, &v, nullptr, nullptr, 1}, sel, grid) ==
          cudaSuccess);
  for (int kind = 0; kind < 2; ++kind) {
    const auto& x = kind ? v : k;
    for (int64_t j = 0; j < 3; ++j)
      for (int64_t d = 0; d < D; ++d) {
        const int64_t t = idx[j];
        const size_t got = static_cast<size_t>((x.pages - pool.data()) + x.offset(0, 0, j, d));
        const size_t want = static_cast<size_t>((x.pages - pool.data()) + x.offset(0, 0, t, d));
        CHECK(pool[got] == before[want]);
      }
  }
}

TEST_CASE("in place, per-layer block tables: each layer packs into its own pages; ownership per layer or per pool") {
  // two layers, one sequence, page size 2, 3 blocks; layer 0 keeps {1, 2, 5}, layer 1 keeps {4}
  const int64_t L = 2, H = 1, D = 2, P = 2, blocks = 3;
  std::vector<int64_t> off{0, 3, 4};
  std::vector<int32_t> idx{1, 2, 5, 4};
  const prefixkv::selection sel{2, off.data(), idx.data()};
  const prefixkv::segment_grid grid{L, 1, 1};
  for (int shared_pool = 0; shared_pool < 2; ++shared_pool) {
    CAPTURE(shared_pool);
    const int64_t pages = shared_pool ? 7 : 4;
    // per-layer tables; with one pool the layers use disjoint pages, with a pool per layer they reuse page ids
    std::vector<int32_t> tables = shared_pool ? std::vector<int32_t>{3, 0, 5, 6, 1, 2} : std::vector<int32_t>{3, 0, 2, 3, 1, 0};
    std::vector<uint8_t> pool(size_t((shared_pool ? 1 : L) * pages * P * H * D), 0xEE);
    std::vector<prefixkv::paged_kv_view<uint8_t>> k;
    for (int64_t l = 0; l < L; ++l)
      k.push_back(prefixkv::make_paged_kv_view(pool.data() + (shared_pool ? 0 : l * pages * P * H * D),
                                               prefixkv::page_layout::nhd, pages, P, H, D, tables.data() + l * blocks,
                                               1, blocks));
    for (int64_t l = 0; l < L; ++l)
      for (int64_t t = 0; t < blocks * P; ++t)
        for (int64_t d = 0; d < D; ++d) k[l](0, 0, t, d) = val(l, 0, 0, t, d);
    prefixkv::paged_kv_layers<uint8_t> cache{k.data(), nullptr, nullptr, nullptr, L};
    std::vector<int32_t> len(2, -1);
    int32_t used = -1;
    REQUIRE(prefixkv::compact_in_place_host(cache, sel, grid, {len.data(), nullptr, &used, nullptr}) == cudaSuccess);
    CHECK(len == std::vector<int32_t>{3, 1});
    CHECK(used == 2);  // the most over the layers
    const int64_t want0[] = {1, 2, 5};
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t j = 0; j < 3; ++j) CHECK(k[0](0, 0, j, d) == val(0, 0, 0, want0[j], d));
      CHECK(k[0](0, 0, 3, d) == val(0, 0, 0, 3, d));  // beyond the kept rows: old bytes
      CHECK(k[1](0, 0, 0, d) == val(1, 0, 0, 4, d));
      CHECK(k[1](0, 0, 1, d) == val(1, 0, 0, 1, d));
    }
    // ownership: a page twice in one layer's touched blocks is refused, whatever the pool
    const auto before = pool;
    auto refuse = [&](std::vector<int32_t> t, reason why) {
      std::vector<prefixkv::paged_kv_view<uint8_t>> kk = k;
      for (int64_t l = 0; l < L; ++l) kk[l].block_table = t.data() + l * blocks;
      prefixkv::paged_kv_layers<uint8_t> c2{kk.data(), nullptr, nullptr, nullptr, L};
      int32_t status = -1;
      const cudaError_t e = prefixkv::compact_in_place_host(c2, sel, grid, {nullptr, nullptr, nullptr, &status});
      if (why == reason::none) {
        CHECK(e == cudaSuccess);
        pool = before;
        return;
      }
      CHECK(e == cudaErrorInvalidValue);
      CHECK(prefixkv::last_error().why == why);
      CHECK(status == int32_t(why));
      CHECK(pool == before);
    };
    refuse(shared_pool ? std::vector<int32_t>{3, 3, 5, 6, 1, 2} : std::vector<int32_t>{3, 3, 2, 3, 1, 0},
           reason::overlapping_buffers);
    // the same page id in both layers: another page with a pool per layer, the same page with one pool
    refuse(shared_pool ? std::vector<int32_t>{3, 0, 5, 3, 1, 2} : std::vector<int32_t>{3, 0, 2, 3, 1, 2},
           shared_pool ? reason::overlapping_buffers : reason::none);
    refuse(std::vector<int32_t>{3, 0, int32_t(pages), 3, 1, 2}, reason::out_of_range);
  }
}

TEST_CASE("per-layer block tables: K and V of a layer must share its table; table geometry must match") {
  const int64_t L = 2, H = 1, D = 2, P = 2, blocks = 2, pages = 4;
  std::vector<uint8_t> pk(size_t(L * pages * P * H * D)), pv(pk.size());
  std::vector<int32_t> t0{0, 1}, t1{2, 3}, t2{2, 3};
  auto view = [&](std::vector<uint8_t>& pool, int64_t l, const std::vector<int32_t>& t, int64_t mb) {
    return prefixkv::make_paged_kv_view(pool.data() + l * pages * P * H * D, prefixkv::page_layout::nhd, pages, P, H,
                                        D, t.data(), 1, mb);
  };
  std::vector<int64_t> off{0, 1, 2};
  std::vector<int32_t> idx{0, 1};
  const prefixkv::selection sel{2, off.data(), idx.data()};
  const prefixkv::segment_grid grid{L, 1, 1};
  std::vector<prefixkv::paged_kv_view<uint8_t>> k{view(pk, 0, t0, blocks), view(pk, 1, t1, blocks)};
  std::vector<prefixkv::paged_kv_view<uint8_t>> v{view(pv, 0, t0, blocks), view(pv, 1, t2, blocks)};
  prefixkv::paged_kv_layers<uint8_t> c{k.data(), v.data(), nullptr, nullptr, L};
  CHECK(prefixkv::compact_in_place_host(c, sel, grid) == cudaErrorInvalidValue);  // V of layer 1: another table
  CHECK(prefixkv::last_error().why == reason::shape_mismatch);
  v[1] = view(pv, 1, t1, blocks);
  CHECK(prefixkv::compact_in_place_host(c, sel, grid) == cudaSuccess);
  k[1] = view(pk, 1, t1, blocks - 1);  // another max_blocks
  CHECK(prefixkv::compact_in_place_host(c, sel, grid) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::shape_mismatch);
}

TEST_CASE("aliasing, per-layer block tables: one pool of a kind shared by the layers is accepted; with one table, "
          "for K and V, or a layer's table inside the pool it is refused; outputs on any layer's table refused") {
  const int64_t L = 2, H = 1, D = 2, P = 2, blocks = 2, pages = 6;
  std::vector<uint8_t> kp(size_t(pages * P * H * D)), vp(kp.size()), big(size_t(2 * pages * P * H * D + 64));
  std::vector<int32_t> t0{0, 1}, t1{2, 3};
  std::vector<int64_t> off{0, 2, 3};
  std::vector<int32_t> idx{0, 2, 1};
  const prefixkv::selection sel{2, off.data(), idx.data()};
  const prefixkv::segment_grid grid{L, 1, 1};
  auto view = [&](uint8_t* pool, const int32_t* t) {
    return prefixkv::make_paged_kv_view(pool, prefixkv::page_layout::nhd, pages, P, H, D, t, 1, blocks);
  };
  auto run = [&](std::vector<prefixkv::paged_kv_view<uint8_t>>& k, std::vector<prefixkv::paged_kv_view<uint8_t>>* v,
                 const prefixkv::compact_outputs& out = {}) {
    return prefixkv::compact_in_place_host(
        prefixkv::paged_kv_layers<uint8_t>{k.data(), v ? v->data() : nullptr, nullptr, nullptr, L}, sel, grid, out);
  };
  auto refused = [&](cudaError_t e) {
    CHECK(e == cudaErrorInvalidValue);
    CHECK(prefixkv::last_error().why == reason::overlapping_buffers);
  };
  std::vector<prefixkv::paged_kv_view<uint8_t>> k{view(kp.data(), t0.data()), view(kp.data(), t1.data())};
  std::vector<prefixkv::paged_kv_view<uint8_t>> v{view(vp.data(), t0.data()), view(vp.data(), t1.data())};
  CHECK(run(k, &v) == cudaSuccess);  // per-layer tables, one K pool and one V pool shared by the layers
  {                                  // the same pool with one table shared by the layers: the layers alias
    std::vector<prefixkv::paged_kv_view<uint8_t>> k1{view(kp.data(), t0.data()), view(kp.data(), t0.data())};
    refused(run(k1, nullptr));
  }
  {  // K and V of the layers in one pool: refused whatever the tables
    std::vector<prefixkv::paged_kv_view<uint8_t>> v1{view(kp.data(), t0.data()), view(kp.data(), t1.data())};
    refused(run(k, &v1));
  }
  {  // layer 1's pool overlaps layer 0's without being the same pool
    std::vector<prefixkv::paged_kv_view<uint8_t>> k1{view(big.data(), t0.data()), view(big.data() + 2, t1.data())};
    refused(run(k1, nullptr));
  }
  {  // layer 1's table stored inside the pool: refused (layer 0's table is elsewhere)
    int32_t* in_pool = reinterpret_cast<int32_t*>(big.data() + 8);
    in_pool[0] = 2;
    in_pool[1] = 3;
    std::vector<prefixkv::paged_kv_view<uint8_t>> k1{view(big.data() + 16, t0.data()), view(big.data() + 16, in_pool)};
    k1[0].num_pages = k1[1].num_pages = pages - 1;
    CHECK(run(k1, nullptr) == cudaSuccess);  // the pools start after the table
    k1[0].pages = k1[1].pages = big.data();
    refused(run(k1, nullptr));
  }
  {  // an output array on layer 1's table
    std::vector<int32_t> t1b{2, 3, 0};
    std::vector<prefixkv::paged_kv_view<uint8_t>> k1{view(kp.data(), t0.data()), view(kp.data(), t1b.data())};
    CHECK(run(k1, nullptr, {nullptr, nullptr, nullptr, t1b.data() + 2}) == cudaSuccess);
    refused(run(k1, nullptr, {nullptr, nullptr, nullptr, t1b.data() + 1}));
    CHECK(t1b == std::vector<int32_t>{2, 3, 0});
  }
}
