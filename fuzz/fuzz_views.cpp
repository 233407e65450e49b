// libFuzzer harness: view, paged-view and segment validation on hostile descriptions, and the byte-box aliasing
// rule. Properties: validate() never accepts a description whose element count, span or byte strides overflow
// int64; an accepted view maps distinct coordinates to distinct elements inside its span (walked exactly for small
// views); an accepted segment list has no row end past int64; an accepted grid's count() is exact;
// byte_boxes_disjoint() never calls two boxes that
// share a byte disjoint (checked with a byte map).
#include <prefixkv/core/validate.hpp>

#include "fuzz_common.hpp"

namespace pk = prefixkv;
using fuzz::wide;

namespace {

alignas(64) unsigned char g_arena[4096];

// Exact span in elements (1 + sum (ext - 1) * stride) of a non-empty box, or -1 when it does not fit int64.
__int128 exact_span(const int64_t (&e)[4], const int64_t (&s)[4]) {
  for (int i = 0; i < 4; ++i)
    if (e[i] == 0) return 0;
  __int128 last = 0;
  for (int i = 0; i < 4; ++i) {
    last += (wide(e[i]) - 1) * wide(s[i]);
    if (!fuzz::fits_i64(last)) return -1;
  }
  return last + 1;
}

// Walk every coordinate of an accepted, small box: inside [0, span), each element named once.
void walk(const int64_t (&e)[4], const int64_t (&s)[4], __int128 span) {
  if (span <= 0 || span > 4096) return;
  __int128 count = 1;
  for (int i = 0; i < 4; ++i) count *= e[i];
  if (count > 4096) return;
  std::vector<unsigned char> seen(static_cast<size_t>(span), 0);
  for (int64_t a = 0; a < e[0]; ++a)
    for (int64_t b = 0; b < e[1]; ++b)
      for (int64_t c = 0; c < e[2]; ++c)
        for (int64_t d = 0; d < e[3]; ++d) {
          const int64_t off = a * s[0] + b * s[1] + c * s[2] + d * s[3];
          FUZZ_ASSERT(off >= 0 && off < span);
          FUZZ_ASSERT(!seen[static_cast<size_t>(off)]);
          seen[static_cast<size_t>(off)] = 1;
        }
}

template <class T>
pk::kv_view<T> make_view(FuzzedDataProvider& in) {
  pk::kv_view<T> v;
  const int64_t at = in.ConsumeIntegralInRange<int64_t>(0, 4096 / sizeof(T) - 1);
  v.data = in.ConsumeIntegralInRange<int>(0, 15) == 0 ? nullptr : reinterpret_cast<T*>(g_arena) + at;
  v.batch = fuzz::size_or_hostile(in, 0, 4);
  v.heads = fuzz::size_or_hostile(in, 0, 4);
  v.tokens = fuzz::size_or_hostile(in, 0, 8);
  v.dim = fuzz::size_or_hostile(in, 0, 8);
  v.stride_batch = fuzz::size_or_hostile(in, 0, 512);
  v.stride_head = fuzz::size_or_hostile(in, 0, 128);
  v.stride_token = fuzz::size_or_hostile(in, 0, 64);
  v.stride_dim = fuzz::size_or_hostile(in, 0, 3);
  return v;
}

void check_view(FuzzedDataProvider& in) {
  const auto v = make_view<uint16_t>(in);
  const int64_t e[4] = {v.batch, v.heads, v.tokens, v.dim};
  const int64_t s[4] = {v.stride_batch, v.stride_head, v.stride_token, v.stride_dim};
  const cudaError_t r = pk::validate(v);
  if (r != cudaSuccess) {
    FUZZ_ASSERT(r == cudaErrorInvalidValue && pk::last_error().why != pk::reason::none);
    return;
  }
  for (int i = 0; i < 4; ++i) FUZZ_ASSERT(e[i] >= 0 && s[i] >= 0 && fuzz::fits_i64(wide(s[i]) * 2));
  const __int128 span = exact_span(e, s);
  FUZZ_ASSERT(span >= 0 && fuzz::fits_i64(span * 2));
  if (span > 0) {
    FUZZ_ASSERT(v.data != nullptr);
    walk(e, s, span);
  }
}

void check_paged(FuzzedDataProvider& in) {
  pk::paged_kv_view<float> v;
  v.pages = in.ConsumeBool() ? reinterpret_cast<float*>(g_arena) : nullptr;
  v.num_pages = fuzz::size_or_hostile(in, 0, 6);
  v.page_size = fuzz::size_or_hostile(in, 0, 4);
  v.heads = fuzz::size_or_hostile(in, 0, 3);
  v.dim = fuzz::size_or_hostile(in, 0, 4);
  v.stride_page = fuzz::size_or_hostile(in, 0, 64);
  v.stride_slot = fuzz::size_or_hostile(in, 0, 16);
  v.stride_head = fuzz::size_or_hostile(in, 0, 8);
  v.stride_dim = fuzz::size_or_hostile(in, 0, 2);
  static const int32_t table[64] = {};
  v.block_table = in.ConsumeBool() ? table : nullptr;
  v.batch = fuzz::size_or_hostile(in, 0, 4);
  v.max_blocks = fuzz::size_or_hostile(in, 0, 4);
  v.block_table_stride = fuzz::size_or_hostile(in, 0, 8);
  const cudaError_t r = pk::validate(v);
  if (r != cudaSuccess) {
    FUZZ_ASSERT(r == cudaErrorInvalidValue);
    return;
  }
  FUZZ_ASSERT(v.page_size > 0 && fuzz::fits_i64(wide(v.max_blocks) * wide(v.page_size)));
  if (v.batch > 0 && v.max_blocks > 0) {
    FUZZ_ASSERT(v.block_table != nullptr);
    FUZZ_ASSERT(fuzz::fits_i64((wide(v.batch) - 1) * wide(v.block_table_stride) + v.max_blocks));
    if (v.batch > 1) FUZZ_ASSERT(v.block_table_stride >= v.max_blocks);
  }
  const int64_t e[4] = {v.num_pages, v.page_size, v.heads, v.dim};
  const int64_t s[4] = {v.stride_page, v.stride_slot, v.stride_head, v.stride_dim};
  const __int128 span = exact_span(e, s);
  FUZZ_ASSERT(span >= 0 && fuzz::fits_i64(span * 4));
  if (span > 0) {
    FUZZ_ASSERT(v.pages != nullptr);
    walk(e, s, span);
  }
}

void check_segments(FuzzedDataProvider& in) {
  const int form = in.ConsumeIntegralInRange<int>(0, 2);
  int64_t offs[9], lens[8];
  const int64_t n = in.ConsumeIntegralInRange<int64_t>(0, 8);
  for (auto& x : offs) x = fuzz::size_or_hostile(in, 0, 40);
  for (auto& x : lens) x = fuzz::size_or_hostile(in, 0, 10);
  pk::segments s;
  if (form == 0) {
    s = pk::make_uniform_segments(fuzz::size_or_hostile(in, 0, 8), 0);
    s.uniform_length = fuzz::size_or_hostile(in, 0, 10);
    s.uniform_stride = fuzz::size_or_hostile(in, 0, 12);
  } else if (form == 1) {
    s = pk::make_offset_segments(n, offs);
  } else {
    s = pk::make_ragged_segments(n, offs, lens);
  }
  const auto before_o = fuzz::bytes_of(offs, 9);
  const auto before_l = fuzz::bytes_of(lens, 8);
  const cudaError_t r = pk::validate_host_contents(s);
  FUZZ_ASSERT(fuzz::same_bytes(offs, 9, before_o) && fuzz::same_bytes(lens, 8, before_l));
  if (r != cudaSuccess) return;
  FUZZ_ASSERT(s.count >= 0);
  if (form == 0) {
    if (s.count > 0) {
      FUZZ_ASSERT(s.uniform_length >= 0 && s.uniform_stride >= 0);
      FUZZ_ASSERT(fuzz::fits_i64((wide(s.count) - 1) * wide(s.uniform_stride) + wide(s.uniform_length)));
      if (s.count > 1) FUZZ_ASSERT(s.uniform_stride >= s.uniform_length);
    }
    return;
  }
  for (int64_t i = 0; i < s.count; ++i) {
    FUZZ_ASSERT(s.begin(i) >= 0);
    if (form == 1) FUZZ_ASSERT(offs[i + 1] >= offs[i]);
    FUZZ_ASSERT(s.length(i) >= 0);
    FUZZ_ASSERT(fuzz::fits_i64(wide(s.begin(i)) + wide(s.length(i))));
  }
}

// Two accepted views inside the arena: if the rule calls them disjoint, no byte may be shared.
void check_boxes(FuzzedDataProvider& in) {
  pk::kv_view<uint16_t> a = make_view<uint16_t>(in);
  pk::kv_view<uint16_t> b = a;  // often the same geometry (the interleaved case), at another offset
  if (in.ConsumeBool()) {
    b = make_view<uint16_t>(in);
  } else {
    b.data = reinterpret_cast<uint16_t*>(g_arena) + in.ConsumeIntegralInRange<int64_t>(0, 2047);
    if (in.ConsumeBool()) b.dim = fuzz::size_or_hostile(in, 0, 8);
  }
  if (a.data == nullptr || b.data == nullptr) return;
  if (pk::validate(a) != cudaSuccess || pk::validate(b) != cudaSuccess) return;
  auto box = [](const pk::kv_view<uint16_t>& v) {
    const int64_t e[4] = {v.batch, v.heads, v.tokens, v.dim};
    const int64_t s[4] = {v.stride_batch, v.stride_head, v.stride_token, v.stride_dim};
    return pk::detail::make_byte_box(v.data, e, s, 2);
  };
  const pk::detail::byte_box ba = box(a), bb = box(b);
  const bool disjoint = pk::detail::byte_boxes_disjoint(ba, bb);
  FUZZ_ASSERT(disjoint == pk::detail::byte_boxes_disjoint(bb, ba));  // symmetric
  if (!disjoint) return;
  // byte map over the arena (only when both views fit in it and are small enough to walk)
  auto fits = [](const pk::kv_view<uint16_t>& v, const pk::detail::byte_box& x) {
    const auto off = reinterpret_cast<const unsigned char*>(v.data) - g_arena;
    return x.span > 0 && x.span <= 8192 && off >= 0 && off + x.span <= static_cast<int64_t>(sizeof(g_arena)) &&
           wide(v.batch) * v.heads * v.tokens * v.dim <= 4096;
  };
  if (!fits(a, ba) || !fits(b, bb)) return;
  std::vector<unsigned char> owner(sizeof(g_arena), 0);
  auto mark = [&](const pk::kv_view<uint16_t>& v, unsigned char tag) {
    for (int64_t i = 0; i < v.batch; ++i)
      for (int64_t j = 0; j < v.heads; ++j)
        for (int64_t t = 0; t < v.tokens; ++t)
          for (int64_t d = 0; d < v.dim; ++d) {
            const auto at = reinterpret_cast<const unsigned char*>(v.data + v.offset(i, j, t, d)) - g_arena;
            for (int k = 0; k < 2; ++k) {
              FUZZ_ASSERT(owner[static_cast<size_t>(at + k)] != 1 || tag == 1);  // b never lands on a's bytes
              owner[static_cast<size_t>(at + k)] = tag;
            }
          }
  };
  mark(a, 1);
  mark(b, 2);
}

void check_grid(FuzzedDataProvider& in) {
  pk::segment_grid g{fuzz::size_or_hostile(in, 0, 80), fuzz::size_or_hostile(in, 0, 8), fuzz::size_or_hostile(in, 0, 8)};
  if (pk::validate(g) != cudaSuccess) return;
  FUZZ_ASSERT(g.layers >= 0 && g.batch >= 0 && g.heads >= 0);
  const __int128 n = wide(g.layers) * g.batch * g.heads;
  FUZZ_ASSERT(fuzz::fits_i64(n) && g.count() == static_cast<int64_t>(n));
  if (n > 0) FUZZ_ASSERT(g.id(g.layers - 1, g.batch - 1, g.heads - 1) == static_cast<int64_t>(n) - 1);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  switch (in.ConsumeIntegralInRange<int>(0, 4)) {
    case 0: check_view(in); break;
    case 1: check_paged(in); break;
    case 2: check_segments(in); break;
    case 3: check_grid(in); break;
    default: check_boxes(in); break;
  }
  return 0;
}
