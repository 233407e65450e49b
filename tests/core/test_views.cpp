#include <doctest/doctest.h>

#include <prefixkv/prefixkv.hpp>

#include <numeric>
#include <set>
#include <type_traits>
#include <vector>

using prefixkv::reason;

static_assert(std::is_trivially_copyable_v<prefixkv::kv_view<float>>);
static_assert(std::is_trivially_copyable_v<prefixkv::paged_kv_view<float>>);
static_assert(std::is_trivially_copyable_v<prefixkv::segments>);
static_assert(std::is_trivially_copyable_v<prefixkv::segment_grid>);

TEST_CASE("kv_view offsets for BHSD, BSHD, padded and interleaved layouts") {
  std::vector<float> buf(2 * 3 * 5 * 4 * 2);
  auto bhsd = prefixkv::make_kv_view_bhsd(buf.data(), 2, 3, 5, 4);
  CHECK(bhsd.offset(1, 2, 3, 1) == ((1 * 3 + 2) * 5 + 3) * 4 + 1);
  auto bshd = prefixkv::make_kv_view_bshd(buf.data(), 2, 5, 3, 4);
  CHECK(bshd.offset(1, 2, 3, 1) == ((1 * 5 + 3) * 3 + 2) * 4 + 1);
  auto padded = prefixkv::make_kv_view_bhsd(buf.data(), 2, 3, 5, 4, /*capacity*/ 8);
  CHECK(padded.offset(0, 1, 0, 0) == 8 * 4);
  // [B, S, 2, H, D]: K then V per token.
  auto k = prefixkv::make_kv_view(buf.data(), 2, 3, 5, 4, 5 * 2 * 3 * 4, 4, 2 * 3 * 4, 1);
  auto v = prefixkv::make_kv_view(buf.data() + 3 * 4, 2, 3, 5, 4, 5 * 2 * 3 * 4, 4, 2 * 3 * 4, 1);
  std::set<int64_t> seen;
  for (auto* view : {&k, &v})
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t h = 0; h < 3; ++h)
        for (int64_t t = 0; t < 5; ++t)
          for (int64_t d = 0; d < 4; ++d) seen.insert((view->data - buf.data()) + view->offset(b, h, t, d));
  CHECK(seen.size() == buf.size());  // K and V together tile the buffer exactly
  CHECK(*seen.rbegin() == static_cast<int64_t>(buf.size()) - 1);
  for (auto* view : {&bhsd, &bshd, &padded, &k, &v}) CHECK(prefixkv::validate(*view) == cudaSuccess);
  CHECK(bhsd.with_tokens(2).tokens == 2);
}

TEST_CASE("kv_view validation: each bad input has its own reason") {
  std::vector<float> buf(64);
  auto ok = prefixkv::make_kv_view_bhsd(buf.data(), 1, 2, 4, 8);
  REQUIRE(prefixkv::validate(ok) == cudaSuccess);

  auto neg = ok;
  neg.tokens = -1;
  CHECK(prefixkv::validate(neg) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::negative_extent);

  auto negs = ok;
  negs.stride_token = -8;
  CHECK(prefixkv::validate(negs) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::negative_stride);

  auto null = ok;
  null.data = nullptr;
  CHECK(prefixkv::validate(null) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::null_pointer);
  null.tokens = 0;  // an empty view may be null
  CHECK(prefixkv::validate(null) == cudaSuccess);

  auto overlap = ok;
  overlap.stride_token = 4;  // rows of 8 elements 4 apart
  CHECK(prefixkv::validate(overlap) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::overlapping_strides);
  auto same = ok;
  same.stride_head = same.stride_token;  // head and token axes alias
  CHECK(prefixkv::validate(same) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::overlapping_strides);
  auto broadcast = ok;
  broadcast.heads = 1;
  broadcast.stride_head = 0;  // a size-1 axis may have any stride
  CHECK(prefixkv::validate(broadcast) == cudaSuccess);

  auto mis = prefixkv::make_kv_view_bhsd(reinterpret_cast<float*>(reinterpret_cast<char*>(buf.data()) + 2), 1, 1, 1, 4);
  CHECK(prefixkv::validate(mis) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::misaligned);
}

TEST_CASE("vector_bytes picks the widest aligned access") {
  alignas(16) static uint16_t buf[4096];
  CHECK(prefixkv::vector_bytes(prefixkv::make_kv_view_bhsd(buf, 1, 2, 4, 64)) == 16);  // 128-byte rows
  CHECK(prefixkv::vector_bytes(prefixkv::make_kv_view_bhsd(buf, 1, 2, 4, 6)) == 4);    // 12-byte rows
  CHECK(prefixkv::vector_bytes(prefixkv::make_kv_view_bhsd(buf + 1, 1, 2, 4, 64)) == 2);
  CHECK(prefixkv::vector_bytes(prefixkv::make_kv_view_bhsd(buf, 1, 1, 1, 3)) == 2);
  auto strided = prefixkv::make_kv_view(buf, 1, 1, 4, 4, 0, 0, 8, 2);
  CHECK(prefixkv::vector_bytes(strided) == 0);
}

TEST_CASE("paged views: NHD and HND offsets through a block table, and validation") {
  const int64_t pages = 6, ps = 4, H = 2, D = 3;
  std::vector<float> pool(pages * ps * H * D);
  std::vector<int32_t> table = {5, 2, 0, /*seq 1*/ 1, 3, 4};
  auto nhd = prefixkv::make_paged_kv_view(pool.data(), prefixkv::page_layout::nhd, pages, ps, H, D, table.data(), 2, 3);
  auto hnd = prefixkv::make_paged_kv_view(pool.data(), prefixkv::page_layout::hnd, pages, ps, H, D, table.data(), 2, 3);
  // token 6 of sequence 0 -> page table[0][1] = 2, slot 2
  CHECK(nhd.offset(0, 1, 6, 2) == ((2 * ps + 2) * H + 1) * D + 2);
  CHECK(hnd.offset(0, 1, 6, 2) == ((2 * H + 1) * ps + 2) * D + 2);
  CHECK(nhd.offset(1, 0, 9, 0) == ((4 * ps + 1) * H + 0) * D);
  CHECK(nhd.token_capacity() == 12);
  CHECK(prefixkv::validate(nhd) == cudaSuccess);
  CHECK(prefixkv::validate(hnd) == cudaSuccess);

  auto bad = nhd;
  bad.page_size = 0;
  CHECK(prefixkv::validate(bad) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::bad_parameter);
  bad = nhd;
  bad.block_table = nullptr;
  CHECK(prefixkv::validate(bad) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::null_pointer);
  bad = nhd;
  bad.block_table_stride = 2;
  CHECK(prefixkv::validate(bad) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::overlapping_strides);
  bad = nhd;
  bad.stride_slot = D;  // slots collide with heads
  CHECK(prefixkv::validate(bad) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::overlapping_strides);
  bad = nhd;
  bad.num_pages = -2;
  CHECK(prefixkv::validate(bad) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::negative_extent);
  bad = nhd;
  bad.stride_head = -1;
  CHECK(prefixkv::validate(bad) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::negative_stride);
  bad = nhd;
  bad.pages = nullptr;
  CHECK(prefixkv::validate(bad) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::null_pointer);
}

TEST_CASE("segments: uniform, cu_seqlens and begin/length forms; grid numbering") {
  auto u = prefixkv::make_uniform_segments(3, 5, 8);
  CHECK(u.begin(2) == 16);
  CHECK(u.length(2) == 5);
  CHECK(u.end(1) == 13);
  std::vector<int64_t> cu = {0, 3, 3, 10};
  auto o = prefixkv::make_offset_segments(3, cu.data());
  CHECK(o.length(0) == 3);
  CHECK(o.length(1) == 0);
  CHECK(o.begin(2) == 3);
  CHECK(o.end(2) == 10);
  std::vector<int64_t> begins = {10, 0}, lens = {4, 7};
  auto r = prefixkv::make_ragged_segments(2, begins.data(), lens.data());
  CHECK(r.begin(0) == 10);
  CHECK(r.length(1) == 7);
  CHECK(prefixkv::validate_host_contents(r) == cudaSuccess);

  auto bad = u;
  bad.count = -1;
  CHECK(prefixkv::validate(bad) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::negative_extent);
  bad = u;
  bad.uniform_stride = 2;
  CHECK(prefixkv::validate(bad) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::overlapping_strides);
  bad = u;
  bad.uniform_stride = -8;
  CHECK(prefixkv::validate(bad) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::negative_stride);
  std::vector<int64_t> nb = {-1, 0}, nl = {1, -3};
  CHECK(prefixkv::validate_host_contents(prefixkv::make_ragged_segments(1, nb.data(), nl.data())) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::out_of_range);
  nb[0] = 0;
  CHECK(prefixkv::validate_host_contents(prefixkv::make_ragged_segments(2, nb.data(), nl.data())) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::negative_extent);

  prefixkv::segment_grid g{4, 3, 2};
  CHECK(g.count() == 24);
  for (int64_t id = 0; id < g.count(); ++id) CHECK(g.id(g.layer_of(id), g.batch_of(id), g.head_of(id)) == id);
}

#if PREFIXKV_HAS_MDSPAN
TEST_CASE("kv_view <-> cuda::std::mdspan round trip") {
  std::vector<float> buf(2 * 3 * 4 * 5);
  std::iota(buf.begin(), buf.end(), 0.f);
  auto v = prefixkv::make_kv_view_bshd(buf.data(), 2, 4, 3, 5);
  auto m = prefixkv::to_mdspan(v);
  CHECK(m.extent(1) == 3);
  CHECK(m(1, 2, 3, 4) == v(1, 2, 3, 4));
  auto back = prefixkv::make_kv_view(m);
  CHECK(back.stride_token == v.stride_token);
  CHECK(back.offset(1, 1, 1, 1) == v.offset(1, 1, 1, 1));
}
#endif
