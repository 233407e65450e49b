// Hostile sizes: checked arithmetic, views whose sizes overflow int64, the byte-box aliasing rule, workspaces
// whose size would wrap. Each case here was accepted (or crashed) before the overflow-safe validation.
#include <doctest/doctest.h>

#include <prefixkv/prefixkv.hpp>

#include <cstdint>
#include <limits>
#include <vector>

using prefixkv::reason;
namespace pd = prefixkv::detail;

namespace {
constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
constexpr int64_t kMin = std::numeric_limits<int64_t>::min();
}  // namespace

TEST_CASE("checked arithmetic: exact results or a reported overflow") {
  int64_t r = 0;
  CHECK(pd::checked_add(kMax - 1, 1, r));
  CHECK(r == kMax);
  CHECK_FALSE(pd::checked_add(kMax, 1, r));
  CHECK_FALSE(pd::checked_add(kMin, -1, r));
  CHECK(pd::checked_sub(0, kMax, r));
  CHECK_FALSE(pd::checked_sub(kMin, 1, r));
  CHECK(pd::checked_mul(int64_t(1) << 31, int64_t(1) << 31, r));
  CHECK(r == int64_t(1) << 62);
  CHECK_FALSE(pd::checked_mul(int64_t(1) << 32, int64_t(1) << 32, r));  // wraps to 0 unchecked
  CHECK_FALSE(pd::checked_mul(-1, kMin, r));
  CHECK(pd::checked_mul(0, kMax, r));
  CHECK(r == 0);
  const pd::checked_i64 ok = pd::checked_i64(3) * 4 + 5 - 2;
  CHECK(ok.ok());
  CHECK(ok.value() == 15);
  const pd::checked_i64 bad = pd::checked_i64(int64_t(1) << 62) * 4 - (int64_t(1) << 62);
  CHECK_FALSE(bad.ok());  // sticky: the later subtraction does not hide the overflow
  int64_t p = 0;
  const int64_t e1[4] = {1, int64_t(1) << 32, int64_t(1) << 32, 1};
  CHECK_FALSE(pd::checked_extent_product(e1, p));
  const int64_t e0[4] = {0, kMax, kMax, kMax};
  CHECK(pd::checked_extent_product(e0, p));
  CHECK(p == 0);
}

TEST_CASE("validate: sizes that overflow int64 are out_of_range, never accepted") {
  // (1, 2^32, 2^32, 1) null view: the element count wraps to 0 unchecked, which used to accept a null pointer
  auto v = prefixkv::make_kv_view<float>(nullptr, 1, int64_t(1) << 32, int64_t(1) << 32, 1, 0, int64_t(1) << 32, 1, 1);
  CHECK(prefixkv::validate(v) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::out_of_range);
  // tokens = 2^62 + 1 with stride 2: the span (2^63 + 1 elements) overflows
  std::vector<float> buf(16);
  auto s = prefixkv::make_kv_view(buf.data(), 1, 1, (int64_t(1) << 62) + 1, 1, 0, 0, 2, 1);
  CHECK(prefixkv::validate(s) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::out_of_range);
  // the span fits in elements but not in bytes
  auto b = prefixkv::make_kv_view(buf.data(), 1, 1, int64_t(1) << 61, 1, 0, 0, 1, 1);
  CHECK(prefixkv::validate(b) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::out_of_range);
  // a stride whose byte value overflows (on an axis of extent 1, where it is otherwise never used)
  auto st = prefixkv::make_kv_view(buf.data(), 1, 1, 4, 4, kMax / 2, 0, 4, 1);
  CHECK(prefixkv::validate(st) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::out_of_range);
  // a span that wraps the address space
  auto w = prefixkv::make_kv_view(reinterpret_cast<float*>(~uintptr_t(0) - 63), 1, 1, 64, 1, 0, 0, 1, 1);
  CHECK(prefixkv::validate(w) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::out_of_range);
  // still fine: large but representable, and empty views with large extents
  auto big = prefixkv::make_kv_view(buf.data(), 1, 1, int64_t(1) << 40, 1, 0, 0, 1, 1);
  CHECK(prefixkv::validate(big) == cudaSuccess);
  auto empty = prefixkv::make_kv_view<float>(nullptr, 0, int64_t(1) << 20, int64_t(1) << 20, 4, 0, 4, int64_t(1) << 22, 1);
  CHECK(prefixkv::validate(empty) == cudaSuccess);
  // an empty view whose other axes reach past int64 (loops over them would form such offsets)
  auto empty_far = prefixkv::make_kv_view<float>(nullptr, 1, 2, 4, 0, 0, kMax / 4, 1, 1);
  CHECK(prefixkv::validate(empty_far) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::out_of_range);

  // paged: pool bytes, block-table extent and max_blocks * page_size
  std::vector<int32_t> table(4, 0);
  auto pv = prefixkv::make_paged_kv_view(buf.data(), prefixkv::page_layout::nhd, 2, 2, 1, 2, table.data(), 2, 2);
  REQUIRE(prefixkv::validate(pv) == cudaSuccess);
  auto pp = pv;
  pp.num_pages = int64_t(1) << 62;
  pp.stride_page = 4;
  CHECK(prefixkv::validate(pp) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::out_of_range);
  pp = pv;
  pp.max_blocks = int64_t(1) << 62;
  pp.block_table_stride = int64_t(1) << 62;
  pp.page_size = 8;
  pp.stride_page = 16;
  CHECK(prefixkv::validate(pp) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::out_of_range);
  pp = pv;
  pp.batch = int64_t(1) << 40;
  pp.block_table_stride = int64_t(1) << 40;
  CHECK(prefixkv::validate(pp) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::out_of_range);
}

TEST_CASE("segments: row ends that overflow int64 are out_of_range") {
  auto u = prefixkv::make_uniform_segments(4, 2, int64_t(1) << 62);  // last row begins at 3 * 2^62
  CHECK(prefixkv::validate(u) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::out_of_range);
  CHECK(prefixkv::validate(prefixkv::make_uniform_segments(2, 2, int64_t(1) << 62)) == cudaSuccess);
  std::vector<int64_t> begins = {0, kMax - 2}, lens = {1, 5};  // begin + t overflows for t >= 3
  CHECK(prefixkv::validate_host_contents(prefixkv::make_ragged_segments(2, begins.data(), lens.data())) ==
        cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::out_of_range);
  std::vector<int64_t> cu = {0, 5, kMin};  // decreasing: a negative length, found without subtracting
  CHECK(prefixkv::validate_host_contents(prefixkv::make_offset_segments(2, cu.data())) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::negative_extent);
}

TEST_CASE("byte boxes: intersecting ranges are disjoint only when the strided test proves it") {
  alignas(16) static uint16_t buf[4096];
  const int64_t B = 2, S = 3, H = 2, D = 4;
  // [B, S, 2, H, D]: K and V interleaved per token
  auto k = prefixkv::make_kv_view(buf, B, H, S, D, S * 2 * H * D, D, 2 * H * D, 1);
  auto v = prefixkv::make_kv_view(buf + H * D, B, H, S, D, S * 2 * H * D, D, 2 * H * D, 1);
  auto box = [](const prefixkv::kv_view<uint16_t>& x) {
    const int64_t ext[4] = {x.batch, x.heads, x.tokens, x.dim};
    const int64_t str[4] = {x.stride_batch, x.stride_head, x.stride_token, x.stride_dim};
    return pd::make_byte_box(x.data, ext, str, 2);
  };
  CHECK(pd::byte_boxes_disjoint(box(k), box(v)));
  CHECK(pd::byte_boxes_disjoint(box(v), box(k)));
  CHECK_FALSE(pd::byte_boxes_disjoint(box(k), box(k)));  // the same memory
  auto v1 = v;
  v1.data = buf + H * D - 1;  // one element into K's rows
  CHECK_FALSE(pd::byte_boxes_disjoint(box(k), box(v1)));
  auto vb = v;
  vb.data = reinterpret_cast<uint16_t*>(reinterpret_cast<char*>(buf) + 1);  // one byte in: elements straddle
  CHECK_FALSE(pd::byte_boxes_disjoint(box(k), box(vb)));
  // separate ranges: disjoint whatever the strides
  auto far = prefixkv::make_kv_view_bhsd(buf + 2048, B, H, S, D);
  CHECK(pd::byte_boxes_disjoint(box(k), box(far)));
  // intersecting ranges with different strides: conservatively overlapping
  auto other = prefixkv::make_kv_view_bhsd(buf + H * D, 1, 1, 1, 2);
  CHECK_FALSE(pd::byte_boxes_disjoint(box(k), box(other)));
  // [L, B, S, 2, H, D] with L = 3: every (layer, kind) pair disjoint
  const int64_t L = 3;
  std::vector<prefixkv::kv_view<uint16_t>> all;
  for (int64_t l = 0; l < L; ++l)
    for (int kind = 0; kind < 2; ++kind)
      all.push_back(prefixkv::make_kv_view(buf + l * 2 * H * D + kind * H * D, B, H, S, D, S * L * 2 * H * D, D,
                                           L * 2 * H * D, 1));
  for (size_t i = 0; i < all.size(); ++i)
    for (size_t j = i + 1; j < all.size(); ++j) CHECK(pd::byte_boxes_disjoint(box(all[i]), box(all[j])));
}

TEST_CASE("workspace sizes saturate instead of wrapping") {
  prefixkv::workspace_layout<2> ws;
  ws.reserve<double>(0, SIZE_MAX / 4);  // SIZE_MAX / 4 * 8 wraps
  CHECK(ws.bytes() == SIZE_MAX);
  alignas(256) static unsigned char mem[512];
  CHECK(ws.map(mem, sizeof(mem)) == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == reason::workspace_too_small);
  prefixkv::workspace_layout<3> three;  // each piece fits, their sum does not
  for (int i = 0; i < 3; ++i) three.reserve_bytes(i, SIZE_MAX / 2 - 1000);
  CHECK(three.bytes() == SIZE_MAX);
  prefixkv::workspace_layout<1> fine;
  fine.reserve<float>(0, 10);
  CHECK(fine.bytes() == 256);
}
