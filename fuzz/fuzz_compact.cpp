// libFuzzer harness: gather_kept_host and compact_in_place_host, strided and paged, K/V/scales, on caches placed
// anywhere in one small arena (so tensors may alias: same memory, interleaved per token or per page, shifted by an
// element or a byte), with hostile geometry, block tables (out-of-range and repeated pages), selections (decreasing
// offsets, out-of-range, unordered and repeated indices) and output arrays (sometimes inside the arena).
// Properties: no crash, no sanitizer report, no exception; on rejection the arena and the outputs are
// byte-identical (only `status` may receive the reason); on success the arena equals the definition computed from
// a snapshot (row j of every destination (layer, sequence, head, kind) = source row sel[j] as it was before the
// call, every other byte unchanged) and the outputs are right. An accepted call whose tensors alias shows up as a
// difference from the snapshot definition.
#include <prefixkv/compact/compact.hpp>

#include "fuzz_common.hpp"

#include <algorithm>

namespace pk = prefixkv;
using fuzz::wide;

namespace {

constexpr int64_t kArena = 2048;
alignas(64) unsigned char g_arena[kArena + 64];

struct geom {
  int64_t heads = 1, dim = 1;
  int64_t str[4] = {0, 0, 0, 1};  // strided: b, h, t, d; paged: page, slot, head, dim
  int64_t elem = 2;
};

struct layout_in {
  bool paged = false;
  int64_t L = 1, B = 1, H = 1, T = 1, D = 1;
  int64_t pages = 0, page = 1, max_blocks = 0, table_stride = 0;
  std::vector<int32_t> table;
  bool scales = false;
  int64_t scale_heads = 1, scale_dim = 1;
  geom g[4];
  std::vector<int64_t> base[4];  // byte offset in the arena of (kind, layer)
  bool kinds[4] = {true, false, false, false};
};

// Strides of one kind: a named layout or fuzz-chosen small strides.
void pick_strides(FuzzedDataProvider& in, const layout_in& c, geom& g, int64_t kinds_together, int64_t slot) {
  const int64_t H = g.heads, D = g.dim, T = c.paged ? c.page : c.T;
  switch (in.ConsumeIntegralInRange<int>(0, 4)) {
    // (paged strides are kept in (page, head, slot, dim) order, like the strided (batch, head, token, dim))
    case 0:  // [B, H, T, D] / NHD pages (page, slot, head, dim)
      if (c.paged) { g.str[0] = T * H * D; g.str[1] = D; g.str[2] = H * D; g.str[3] = 1; }
      else { g.str[0] = H * T * D; g.str[1] = T * D; g.str[2] = D; g.str[3] = 1; }
      break;
    case 1:  // [B, T, H, D] / HND pages (page, head, slot, dim)
      if (c.paged) { g.str[0] = T * H * D; g.str[1] = T * D; g.str[2] = D; g.str[3] = 1; }
      else { g.str[0] = T * H * D; g.str[1] = D; g.str[2] = H * D; g.str[3] = 1; }
      break;
    case 2:  // interleaved: [B, T, kinds, H, D] / pages (page, kinds, slot, head, dim); `slot` chooses the place
      if (c.paged) { g.str[0] = kinds_together * T * H * D; g.str[1] = D; g.str[2] = H * D; g.str[3] = 1; }
      else { g.str[0] = T * kinds_together * H * D; g.str[1] = D; g.str[2] = kinds_together * H * D; g.str[3] = 1; }
      (void)slot;
      break;
    default:  // anything small (overlapping strides included: validation must refuse those)
      for (auto& s : g.str) s = in.ConsumeIntegralInRange<int64_t>(0, 40);
      if (in.ConsumeIntegralInRange<int>(0, 31) == 0) g.str[in.ConsumeIntegralInRange<int>(0, 3)] = fuzz::hostile_int(in);
      break;
  }
}

template <class V>
V* at(int64_t byte) {
  return reinterpret_cast<V*>(g_arena + byte);
}

// Byte span of a kind (elements * elem), or -1 when hostile (the library must refuse such a view).
int64_t span_bytes(const layout_in& c, const geom& g) {
  const int64_t ext[4] = {c.paged ? c.pages : c.B, g.heads, c.paged ? c.page : c.T, g.dim};
  const int64_t* str = g.str;
  for (int i = 0; i < 4; ++i)
    if (ext[i] == 0) return 0;
  __int128 last = 0;
  for (int i = 0; i < 4; ++i) {
    if (str[i] < 0) return -1;
    last += (wide(ext[i]) - 1) * str[i];
  }
  const __int128 b = (last + 1) * g.elem;
  return b > kArena * 4 ? -1 : static_cast<int64_t>(b);
}

// Element byte offset of (b, h, t, d) in a kind's tensor (paged through the table), -1 when t has no page.
int64_t elem_at(const layout_in& c, const geom& g, int64_t b, int64_t h, int64_t t, int64_t d) {
  if (!c.paged) return (b * g.str[0] + h * g.str[1] + t * g.str[2] + d * g.str[3]) * g.elem;
  const int64_t page = c.table[static_cast<size_t>(b * c.table_stride + t / c.page)];
  // paged strides are stored as (page, head, slot, dim)
  return (page * g.str[0] + h * g.str[1] + (t % c.page) * g.str[2] + d * g.str[3]) * g.elem;
}

layout_in make_cache(FuzzedDataProvider& in, bool paged, int64_t L, int64_t B, int64_t H, int64_t D, bool scales,
                     int64_t scale_heads) {
  layout_in c;
  c.paged = paged;
  c.L = L;
  c.B = B;
  c.H = H;
  c.D = D;
  c.T = in.ConsumeIntegralInRange<int64_t>(0, 9);
  if (paged) {
    c.page = in.ConsumeIntegralInRange<int64_t>(1, 4);
    c.max_blocks = in.ConsumeIntegralInRange<int64_t>(0, 3);
    c.pages = in.ConsumeIntegralInRange<int64_t>(0, 7);
    c.table_stride = c.max_blocks + in.ConsumeIntegralInRange<int64_t>(0, 1);
    c.table.assign(static_cast<size_t>(std::max<int64_t>(1, B * c.table_stride)), 0);
    // mostly a permutation of distinct pages, sometimes out of range or repeated
    for (size_t i = 0; i < c.table.size(); ++i) c.table[i] = static_cast<int32_t>(i % std::max<int64_t>(1, c.pages));
    for (size_t i = c.table.size(); i > 1; --i) std::swap(c.table[i - 1], c.table[in.ConsumeIntegralInRange<size_t>(0, i - 1)]);
    if (in.ConsumeIntegralInRange<int>(0, 7) == 0)
      c.table[in.ConsumeIntegralInRange<size_t>(0, c.table.size() - 1)] = static_cast<int32_t>(in.ConsumeIntegralInRange<int>(-1, 8));
    c.T = c.max_blocks * c.page;
  }
  c.scales = scales;
  c.scale_heads = scale_heads;
  c.scale_dim = scales ? in.ConsumeIntegralInRange<int64_t>(0, 2) : 1;
  const bool v = in.ConsumeIntegralInRange<int>(0, 4) != 0;
  c.kinds[0] = true;
  c.kinds[1] = v;
  c.kinds[2] = scales;
  c.kinds[3] = scales && v;
  const int64_t together = 1 + (v ? 1 : 0);
  for (int k = 0; k < 4; ++k) {
    if (!c.kinds[k]) continue;
    geom& g = c.g[k];
    g.heads = k < 2 ? H : scale_heads;
    g.dim = k < 2 ? D : c.scale_dim;
    g.elem = k < 2 ? 2 : 4;
    pick_strides(in, c, g, k < 2 ? together : 1, k & 1);
    // placement: layers back to back after a fuzz-chosen start, or every layer at a fuzz-chosen offset; the V of an
    // interleaved layout often sits one K row (H * D elements) after K
    const int64_t sp = std::max<int64_t>(0, span_bytes(c, g));
    int64_t cursor = in.ConsumeIntegralInRange<int64_t>(0, kArena / 2) / g.elem * g.elem;
    for (int64_t l = 0; l < L; ++l) {
      int64_t off;
      const int mode = in.ConsumeIntegralInRange<int>(0, 5);
      if (mode <= 2) {
        off = cursor;
        cursor += sp;
      } else if (mode == 3 && k == 1 && !c.base[0].empty()) {
        off = c.base[0][static_cast<size_t>(l)] + H * D * g.elem;  // interleaved V
      } else if (mode == 4 && k >= 1 && !c.base[0].empty()) {
        off = c.base[0][static_cast<size_t>(l)] + in.ConsumeIntegralInRange<int64_t>(-3, 3) * (in.ConsumeBool() ? g.elem : 1);
      } else {
        off = in.ConsumeIntegralInRange<int64_t>(0, kArena);
      }
      c.base[k].push_back(std::max<int64_t>(0, off));
    }
  }
  return c;
}

// The per-layer views of one cache (paged or strided), scales as float.
struct views {
  std::vector<pk::kv_view<uint16_t>> k, v;
  std::vector<pk::kv_view<float>> ks, vs;
  std::vector<pk::paged_kv_view<uint16_t>> pk_, pv;
  std::vector<pk::paged_kv_view<float>> pks, pvs;
};

views make_views(const layout_in& c) {
  views w;
  for (int k = 0; k < 4; ++k) {
    if (!c.kinds[k]) continue;
    const geom& g = c.g[k];
    for (int64_t l = 0; l < c.L; ++l) {
      const int64_t b = c.base[k][static_cast<size_t>(l)];
      if (!c.paged) {
        if (k < 2) {
          auto vw = pk::make_kv_view(at<uint16_t>(b), c.B, g.heads, c.T, g.dim, g.str[0], g.str[1], g.str[2], g.str[3]);
          (k == 0 ? w.k : w.v).push_back(vw);
        } else {
          auto vw = pk::make_kv_view(at<float>(b), c.B, g.heads, c.T, g.dim, g.str[0], g.str[1], g.str[2], g.str[3]);
          (k == 2 ? w.ks : w.vs).push_back(vw);
        }
      } else {
        auto fill = [&](auto& pv) {
          pv.num_pages = c.pages;
          pv.page_size = c.page;
          pv.heads = g.heads;
          pv.dim = g.dim;
          pv.stride_page = g.str[0];
          pv.stride_head = g.str[1];
          pv.stride_slot = g.str[2];
          pv.stride_dim = g.str[3];
          pv.block_table = c.table.data();
          pv.batch = c.B;
          pv.max_blocks = c.max_blocks;
          pv.block_table_stride = c.table_stride;
        };
        if (k < 2) {
          pk::paged_kv_view<uint16_t> pv;
          pv.pages = at<uint16_t>(b);
          fill(pv);
          (k == 0 ? w.pk_ : w.pv).push_back(pv);
        } else {
          pk::paged_kv_view<float> pv;
          pv.pages = at<float>(b);
          fill(pv);
          (k == 2 ? w.pks : w.pvs).push_back(pv);
        }
      }
    }
  }
  return w;
}

template <class F>
cudaError_t with_cache(const layout_in& c, const views& w, F&& f) {
  if (!c.paged) {
    const pk::kv_layers<uint16_t, float> x{w.k.data(), c.kinds[1] ? w.v.data() : nullptr,
                                           c.kinds[2] ? w.ks.data() : nullptr, c.kinds[3] ? w.vs.data() : nullptr, c.L};
    return f(x);
  }
  const pk::paged_kv_layers<uint16_t, float> x{w.pk_.data(), c.kinds[1] ? w.pv.data() : nullptr,
                                               c.kinds[2] ? w.pks.data() : nullptr, c.kinds[3] ? w.pvs.data() : nullptr, c.L};
  return f(x);
}

// A view that the library would accept must lie in the arena (a caller precondition).
bool inside_arena(const layout_in& c) {
  for (int k = 0; k < 4; ++k) {
    if (!c.kinds[k]) continue;
    const int64_t sp = span_bytes(c, c.g[k]);
    for (int64_t b : c.base[k])
      if (sp < 0 || b + sp > kArena + 64) return false;
  }
  return true;
}

// FUZZ_STATS=1: print how often each outcome occurred (to check that the harness reaches the accepted paths).
struct stats {
  long ok[2][2] = {}, rejected[32] = {};
  bool on = std::getenv("FUZZ_STATS") != nullptr;
  ~stats() {
    if (!on) return;
    std::fprintf(stderr, "accepted: gather %ld / %ld (strided / paged src), in place %ld / %ld\n", ok[0][0], ok[0][1],
                 ok[1][0], ok[1][1]);
    for (int r = 0; r < 32; ++r)
      if (rejected[r]) std::fprintf(stderr, "rejected %s: %ld\n", pk::to_string(static_cast<pk::reason>(r)), rejected[r]);
  }
} g_stats;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const bool inplace = in.ConsumeBool();
  const int64_t L = in.ConsumeIntegralInRange<int64_t>(0, 3), B = in.ConsumeIntegralInRange<int64_t>(0, 2);
  const int64_t H = in.ConsumeIntegralInRange<int64_t>(1, 3), D = in.ConsumeIntegralInRange<int64_t>(0, 4);
  const bool scales = in.ConsumeIntegralInRange<int>(0, 3) == 0;
  const bool headwise = in.ConsumeIntegralInRange<int>(0, 3) == 0;
  const int64_t scale_heads = headwise || in.ConsumeBool() ? H : 1;
  const layout_in src = make_cache(in, in.ConsumeBool(), L, B, H, D, scales, scale_heads);
  layout_in dst = inplace ? src : make_cache(in, in.ConsumeBool(), L, B, H, D, scales, scale_heads);
  if (!inplace) {  // the same tensor kinds on both sides (other combinations are shape errors, also fine to try)
    for (int k = 0; k < 4; ++k)
      if (in.ConsumeIntegralInRange<int>(0, 15) != 0) dst.kinds[k] = src.kinds[k];
    dst.scale_dim = src.scale_dim;
    for (int k = 2; k < 4; ++k) dst.g[k].dim = src.g[k].dim;
    for (int k = 0; k < 4; ++k)
      if (dst.kinds[k] && dst.base[k].empty()) dst.kinds[k] = false;
  }
  if (!inside_arena(src) || !inside_arena(dst)) return 0;
  for (int i = 0; i < kArena + 64; ++i) g_arena[i] = static_cast<unsigned char>(i * 7 + 3);
  const views sv = make_views(src), dv = inplace ? sv : make_views(dst);

  // selection
  const pk::segment_grid grid{L, B, headwise ? H : 1};
  const int64_t S = L * B * grid.heads;
  std::vector<int64_t> offsets(static_cast<size_t>(S) + 1, 0);
  std::vector<int32_t> indices;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t k = in.ConsumeIntegralInRange<int64_t>(0, std::max<int64_t>(src.T, 0) + 1);
    std::vector<int32_t> all;
    for (int64_t t = 0; t < src.T; ++t) all.push_back(static_cast<int32_t>(t));
    for (size_t i = all.size(); i > 1; --i) std::swap(all[i - 1], all[in.ConsumeIntegralInRange<size_t>(0, i - 1)]);
    std::vector<int32_t> pick(all.begin(), all.begin() + std::min<int64_t>(k, static_cast<int64_t>(all.size())));
    if (inplace || in.ConsumeBool()) std::sort(pick.begin(), pick.end());
    indices.insert(indices.end(), pick.begin(), pick.end());
    offsets[s + 1] = static_cast<int64_t>(indices.size());
  }
  const int edits = in.ConsumeIntegralInRange<int>(0, 2);
  for (int i = 0; i < edits; ++i) {
    if (!indices.empty() && in.ConsumeBool())
      indices[in.ConsumeIntegralInRange<size_t>(0, indices.size() - 1)] =
          static_cast<int32_t>(in.ConsumeIntegralInRange<int64_t>(-1, src.T + 1));
    else if (S > 0)  // offsets stay within the index array (its length is a caller precondition)
      offsets[in.ConsumeIntegralInRange<size_t>(0, static_cast<size_t>(S))] =
          in.ConsumeIntegralInRange<int64_t>(-2, static_cast<int64_t>(indices.size()));
  }
  indices.push_back(0);  // never an empty array
  const pk::selection sel{S, offsets.data(), indices.data()};

  // outputs: separate arrays, sometimes one inside the arena (must then be refused if it meets a written tensor)
  const int64_t spl = L > 0 ? S / L : 0;
  std::vector<int32_t> lengths(static_cast<size_t>(S) + 1, -7), cu(static_cast<size_t>(L * (spl + 1)) + 1, -7),
      pages(static_cast<size_t>(B) + 1, -7), status(2, -7);
  pk::compact_outputs out{};
  if (in.ConsumeBool()) out.lengths = lengths.data();
  if (in.ConsumeBool()) out.cu_seqlens = cu.data();
  if (in.ConsumeBool() && (inplace ? src.paged : dst.paged)) out.pages_in_use = pages.data();
  if (in.ConsumeBool()) out.status = status.data();
  if (in.ConsumeIntegralInRange<int>(0, 15) == 0)  // S entries inside the arena
    out.lengths = at<int32_t>(in.ConsumeIntegralInRange<int64_t>(0, (kArena + 64) / 4 - std::max<int64_t>(S, 1)) * 4);

  std::vector<unsigned char> snap(g_arena, g_arena + kArena + 64);
  const auto lb = lengths, cb = cu, pb = pages;
  cudaError_t e = cudaErrorUnknown;
  if (inplace) {
    e = with_cache(src, sv, [&](const auto& x) { return pk::compact_in_place_host(x, sel, grid, out); });
  } else {
    e = with_cache(src, sv, [&](const auto& s) {
      return with_cache(dst, dv, [&](const auto& d) { return pk::gather_kept_host(s, d, sel, grid, out); });
    });
  }
  if (e == cudaSuccess) ++g_stats.ok[inplace][src.paged];
  else ++g_stats.rejected[static_cast<int>(pk::last_error().why) & 31];
  if (e != cudaSuccess) {
    FUZZ_ASSERT(e == cudaErrorInvalidValue);
    FUZZ_ASSERT(std::memcmp(snap.data(), g_arena, snap.size()) == 0);
    FUZZ_ASSERT(lengths == lb && cu == cb && pages == pb);
    FUZZ_ASSERT(status[0] == -7 || status[0] == static_cast<int32_t>(pk::last_error().why));
    FUZZ_ASSERT(status[1] == -7);
    return 0;
  }
  // the definition, from the snapshot
  std::vector<unsigned char> want = snap;
  const layout_in& dd = inplace ? src : dst;
  for (int64_t l = 0; l < L; ++l)
    for (int64_t b = 0; b < B; ++b)
      for (int k = 0; k < 4; ++k) {
        if (!src.kinds[k]) continue;
        const geom& sg = src.g[k];
        const geom& dg = dd.g[k];
        for (int64_t h = 0; h < sg.heads; ++h) {
          const int64_t s = grid.heads == 1 ? grid.id(l, b) : grid.id(l, b, h);
          const int64_t kept = offsets[s + 1] - offsets[s];
          FUZZ_ASSERT(kept >= 0 && kept <= dd.T);
          for (int64_t j = 0; j < kept; ++j) {
            const int64_t t = indices[static_cast<size_t>(offsets[s] + j)];
            FUZZ_ASSERT(t >= 0 && t < src.T);
            if (inplace && j > 0) FUZZ_ASSERT(indices[static_cast<size_t>(offsets[s] + j - 1)] < t);
            for (int64_t d = 0; d < sg.dim; ++d) {
              const int64_t from = src.base[k][static_cast<size_t>(l)] + elem_at(src, sg, b, h, t, d);
              const int64_t to = dd.base[k][static_cast<size_t>(l)] + elem_at(dd, dg, b, h, j, d);
              FUZZ_ASSERT(from >= 0 && from + sg.elem <= kArena + 64 && to >= 0 && to + dg.elem <= kArena + 64);
              std::memcpy(want.data() + to, snap.data() + from, static_cast<size_t>(sg.elem));
            }
          }
        }
      }
  if (out.lengths && out.lengths != lengths.data())  // an output inside the arena that meets no tensor
    for (int64_t s = 0; s < S; ++s) {
      const int32_t v = static_cast<int32_t>(offsets[s + 1] - offsets[s]);
      std::memcpy(want.data() + (reinterpret_cast<unsigned char*>(out.lengths + s) - g_arena), &v, 4);
    }
  FUZZ_ASSERT(std::memcmp(want.data(), g_arena, want.size()) == 0);
  if (out.status) FUZZ_ASSERT(status[0] == 0);
  if (out.lengths == lengths.data())
    for (int64_t s = 0; s < S; ++s) FUZZ_ASSERT(lengths[s] == offsets[s + 1] - offsets[s]);
  if (out.cu_seqlens)
    for (int64_t l = 0; l < L; ++l)
      for (int64_t j = 0; j <= spl; ++j)
        FUZZ_ASSERT(cu[static_cast<size_t>(l * (spl + 1) + j)] == offsets[l * spl + j] - offsets[l * spl]);
  if (out.pages_in_use)
    for (int64_t b = 0; b < B; ++b) {
      int64_t mx = 0;
      for (int64_t l = 0; l < L; ++l)
        for (int64_t h = 0; h < grid.heads; ++h) {
          const int64_t s = grid.id(l, b, h);
          mx = std::max(mx, (offsets[s + 1] - offsets[s] + dd.page - 1) / dd.page);
        }
      FUZZ_ASSERT(pages[b] == mx);
    }
  return 0;
}
