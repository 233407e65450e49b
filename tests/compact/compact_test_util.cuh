// Shared helpers for the compaction GPU tests: multi-layer caches in every layout (host image + device mirror at
// the same byte offsets), random selections, and a runner that compares the device entry points (three ways)
// with the host twins byte for byte.
#pragma once

#include <doctest/doctest.h>

#include <prefixkv/compact/compact.cuh>

#include "support/gpu_harness.cuh"
#include "support/test_random.hpp"

#include <algorithm>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

namespace compact_test {

using namespace prefixkv_test;

enum class layout { bhsd, bshd, strided, nhd, hnd };
inline const char* name(layout l) {
  switch (l) {
    case layout::bhsd: return "bhsd";
    case layout::bshd: return "bshd";
    case layout::strided: return "strided";
    case layout::nhd: return "paged-nhd";
    case layout::hnd: return "paged-hnd";
  }
  return "?";
}
inline bool is_paged(layout l) { return l == layout::nhd || l == layout::hnd; }
inline const layout all_layouts[] = {layout::bhsd, layout::bshd, layout::strided, layout::nhd, layout::hnd};

struct geometry {
  int64_t L = 2, B = 2, H = 2, T = 37, D = 64;
  int64_t page = 16;
  int scales = 0;         // 0 none, 1 per token (1 head), 2 per token and head
  int64_t misalign = 0;   // elements added to every base offset (breaks 16-byte alignment)
  int tables = 0;         // paged: 0 one block table for every layer, 1 a table per layer (a pool per layer, page ids
                          // repeat across layers), 2 a table per layer over one pool shared by the layers
};
inline const char* tables_name(int t) { return t == 0 ? "shared table" : (t == 1 ? "per-layer tables" : "per-layer tables, one pool"); }

//! A multi-layer cache: one host byte image, one device mirror, views at the same offsets in both.
template <class T>
struct cache {
  layout lay = layout::bhsd;
  geometry g;
  std::vector<unsigned char> host;
  device_buffer<unsigned char> dev;
  std::vector<int32_t> table;  // (B, max_blocks), or (L, B, max_blocks) with per-layer tables
  device_buffer<int32_t> dtable;
  std::vector<size_t> off[4];  // byte offset of (kind, layer)
  // views of the host image / device mirror
  std::vector<prefixkv::kv_view<T>> hs[2], ds[2];
  std::vector<prefixkv::kv_view<float>> hsc[2], dsc[2];
  std::vector<prefixkv::paged_kv_view<T>> hp[2], dp[2];
  std::vector<prefixkv::paged_kv_view<float>> hpc[2], dpc[2];
  int64_t num_pages = 0, max_blocks = 0;

  template <class E>
  prefixkv::kv_view<E> strided_view(E* base, int64_t heads, int64_t dim) const {
    const int64_t nb = g.B, nt = g.T;
    switch (lay) {
      case layout::bhsd: return prefixkv::make_kv_view_bhsd(base, nb, heads, nt, dim);
      case layout::bshd: return prefixkv::make_kv_view_bshd(base, nb, nt, heads, dim);
      default: {
        const int64_t sd = 2, sh = 2 * dim + 1, st = heads * sh + 3, sb = nt * st + 5;
        return prefixkv::make_kv_view(base, nb, heads, nt, dim, sb, sh, st, sd);
      }
    }
  }
  template <class E>
  int64_t strided_elems(int64_t heads, int64_t dim) const {
    auto v = strided_view<E>(nullptr, heads, dim);
    return (v.batch - 1) * v.stride_batch + (v.heads - 1) * v.stride_head + (v.tokens - 1) * v.stride_token +
           (v.dim - 1) * v.stride_dim + 1;
  }
  template <class E>
  prefixkv::paged_kv_view<E> paged_view(E* base, const int32_t* tbl, int64_t heads, int64_t dim) const {
    return prefixkv::make_paged_kv_view(base, lay == layout::nhd ? prefixkv::page_layout::nhd : prefixkv::page_layout::hnd,
                                        num_pages, g.page, heads, dim, tbl, g.B, max_blocks);
  }

  //! Layer l's block table (host or device copy).
  int64_t table_offset(int64_t l) const { return g.tables ? l * g.B * max_blocks : 0; }
  bool shared_pool() const { return is_paged(lay) && g.tables == 2; }

  cache(layout l, const geometry& geo, std::mt19937_64& rng, bool poisoned) : lay(l), g(geo) {
    const bool paged = is_paged(l);
    if (paged) {
      max_blocks = (g.T + g.page - 1) / g.page;
      const int64_t per = g.B * max_blocks;
      num_pages = (g.tables == 2 ? g.L * per : per) + 3;
      std::vector<int32_t> perm(num_pages);
      std::iota(perm.begin(), perm.end(), 0);
      if (g.tables == 1) {  // every layer its own shuffle of its own pool
        for (int64_t layer = 0; layer < g.L; ++layer) {
          std::shuffle(perm.begin(), perm.end(), rng);
          table.insert(table.end(), perm.begin(), perm.begin() + per);
        }
      } else {
        std::shuffle(perm.begin(), perm.end(), rng);
        table.assign(perm.begin(), perm.begin() + (g.tables == 2 ? g.L * per : per));
      }
      dtable = device_buffer<int32_t>(table);
    }
    const int64_t sh = g.scales == 2 ? g.H : 1;
    size_t at = 0;
    auto place = [&](int kind, int64_t elems, size_t esz) {
      at = (at + 15) / 16 * 16 + size_t(g.misalign) * esz;
      off[kind].push_back(at);
      at += size_t(elems) * esz;
    };
    for (int64_t layer = 0; layer < g.L; ++layer)
      for (int kind = 0; kind < (g.scales ? 4 : 2); ++kind) {
        const bool sc = kind >= 2;
        const int64_t heads = sc ? sh : g.H, dim = sc ? 1 : g.D;
        const size_t esz = sc ? sizeof(float) : sizeof(T);
        const int64_t elems = paged ? num_pages * g.page * heads * dim
                                    : (sc ? strided_elems<float>(heads, dim) : strided_elems<T>(heads, dim));
        if (layer > 0 && shared_pool())
          off[kind].push_back(off[kind][0]);  // every layer in the pool of layer 0
        else
          place(kind, elems, esz);
      }
    host.resize(at + 64);
    if (poisoned) std::fill(host.begin(), host.end(), poison_byte);
    else for (auto& x : host) x = static_cast<unsigned char>(rng());
    dev = device_buffer<unsigned char>(host.size());
    rebuild_views();
  }
  void rebuild_views() {
    const int64_t sh = g.scales == 2 ? g.H : 1;
    for (int side = 0; side < 2; ++side)
      for (int kind = 0; kind < 2; ++kind) {
        hs[kind].clear(); ds[kind].clear(); hsc[kind].clear(); dsc[kind].clear();
        hp[kind].clear(); dp[kind].clear(); hpc[kind].clear(); dpc[kind].clear();
      }
    for (int kind = 0; kind < 2; ++kind)
      for (int64_t layer = 0; layer < g.L; ++layer) {
        T* h = reinterpret_cast<T*>(host.data() + off[kind][layer]);
        T* d = reinterpret_cast<T*>(dev.get() + off[kind][layer]);
        if (is_paged(lay)) {
          hp[kind].push_back(paged_view(h, table.data() + table_offset(layer), g.H, g.D));
          dp[kind].push_back(paged_view(d, dtable.get() + table_offset(layer), g.H, g.D));
        } else {
          hs[kind].push_back(strided_view(h, g.H, g.D));
          ds[kind].push_back(strided_view(d, g.H, g.D));
        }
        if (!g.scales) continue;
        float* hc = reinterpret_cast<float*>(host.data() + off[2 + kind][layer]);
        float* dc = reinterpret_cast<float*>(dev.get() + off[2 + kind][layer]);
        if (is_paged(lay)) {
          hpc[kind].push_back(paged_view(hc, table.data() + table_offset(layer), sh, 1));
          dpc[kind].push_back(paged_view(dc, dtable.get() + table_offset(layer), sh, 1));
        } else {
          hsc[kind].push_back(strided_view(hc, sh, 1));
          dsc[kind].push_back(strided_view(dc, sh, 1));
        }
      }
  }
  void upload(const std::vector<unsigned char>& img) {
    PKV_CUDA_CHECK(cudaMemcpy(dev.get(), img.data(), img.size(), cudaMemcpyHostToDevice));
    PKV_CUDA_CHECK(cudaDeviceSynchronize());  // in place before work on a non-blocking stream reads it
  }
  std::vector<unsigned char> download() const { return dev.download(); }

  //! Calls f(kv_layers<T> or paged_kv_layers<T>) for the host image (on_host) or the device mirror.
  template <class F>
  void visit(bool on_host, F&& f) const {
    const int64_t L = g.L;
    if (is_paged(lay)) {
      const auto& p = on_host ? hp : dp;
      const auto& c = on_host ? hpc : dpc;
      prefixkv::paged_kv_layers<T> x{p[0].data(), p[1].data(), g.scales ? c[0].data() : nullptr,
                                     g.scales ? c[1].data() : nullptr, L};
      f(x);
    } else {
      const auto& p = on_host ? hs : ds;
      const auto& c = on_host ? hsc : dsc;
      prefixkv::kv_layers<T> x{p[0].data(), p[1].data(), g.scales ? c[0].data() : nullptr,
                               g.scales ? c[1].data() : nullptr, L};
      f(x);
    }
  }
};

//! Kept fractions: 0 none, 1 one token, 2 10%, 3 50%, 4 all, 5 ragged (random per segment).
inline int64_t kept_for(int frac, int64_t T, std::mt19937_64& rng) {
  switch (frac) {
    case 0: return 0;
    case 1: return std::min<int64_t>(1, T);
    case 2: return T / 10;
    case 3: return T / 2;
    case 4: return T;
    default: return int64_t(rng() % uint64_t(T + 1));
  }
}

struct host_selection {
  std::vector<int64_t> offsets;
  std::vector<int32_t> indices;
  device_buffer<int64_t> d_offsets;
  device_buffer<int32_t> d_indices;
  // (an empty index list still needs a valid pointer: the entry points reject null indices)
  prefixkv::selection host() const {
    static const int32_t none = 0;
    return {int64_t(offsets.size()) - 1, offsets.data(), indices.empty() ? &none : indices.data()};
  }
  prefixkv::selection dev() const { return {int64_t(offsets.size()) - 1, d_offsets.get(), d_indices.get()}; }
  void upload() {
    d_offsets = device_buffer<int64_t>(offsets);
    d_indices = device_buffer<int32_t>(indices.empty() ? std::vector<int32_t>{0} : indices);
  }
};

inline host_selection random_selection(std::mt19937_64& rng, int64_t S, int64_t T, int frac, bool shuffled) {
  host_selection s;
  s.offsets.push_back(0);
  std::vector<int32_t> all(T);
  for (int64_t seg = 0; seg < S; ++seg) {
    const int64_t k = kept_for(frac, T, rng);
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    std::vector<int32_t> pick(all.begin(), all.begin() + k);
    if (!shuffled) std::sort(pick.begin(), pick.end());
    s.indices.insert(s.indices.end(), pick.begin(), pick.end());
    s.offsets.push_back(int64_t(s.indices.size()));
  }
  s.upload();
  return s;
}

//! Small device outputs (and their host twins).
struct outputs {
  int64_t S = 0, L = 0, B = 0;
  bool pages = false;
  std::vector<int32_t> h_len, h_cu, h_pages;
  int32_t h_status = -1;
  device_buffer<int32_t> d_len, d_cu, d_pages, d_status;
  outputs(int64_t S_, int64_t L_, int64_t B_, bool paged) : S(S_), L(L_), B(B_), pages(paged) {
    const int64_t cu = L > 0 ? L * (S / L + 1) : 0;
    h_len.assign(S, -7);
    h_cu.assign(cu, -7);
    h_pages.assign(B, -7);
    d_len = device_buffer<int32_t>(std::max<int64_t>(S, 1));
    d_cu = device_buffer<int32_t>(std::max<int64_t>(cu, 1));
    d_pages = device_buffer<int32_t>(std::max<int64_t>(B, 1));
    d_status = device_buffer<int32_t>(1);
  }
  prefixkv::compact_outputs host() {
    return {h_len.data(), h_cu.data(), pages ? h_pages.data() : nullptr, &h_status};
  }
  prefixkv::compact_outputs dev() const {
    return {d_len.get(), d_cu.get(), pages ? d_pages.get() : nullptr, d_status.get()};
  }
  void poison() {
    d_len.poison();
    d_cu.poison();
    d_pages.poison();
    d_status.poison();
  }
  int32_t status() const { return d_status.download()[0]; }
  void check_equal() const {
    CHECK(status() == h_status);
    auto l = d_len.download();
    l.resize(h_len.size());
    CHECK(l == h_len);
    auto c = d_cu.download();
    c.resize(h_cu.size());
    CHECK(c == h_cu);
    if (pages) {
      auto p = d_pages.download();
      p.resize(h_pages.size());
      CHECK(p == h_pages);
    }
  }
};

//! First differing byte, for readable failures (-1 when equal).
inline int64_t first_diff(const std::vector<unsigned char>& a, const std::vector<unsigned char>& b) {
  if (a.size() != b.size()) return 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return int64_t(i);
  return -1;
}

struct case_cfg {
  layout src = layout::bhsd, dst = layout::bhsd;
  geometry g;
  int frac = 3;
  bool headwise = false;
  bool shuffled = false;
  int64_t dst_misalign = 0;
};

inline std::string describe(const case_cfg& c) {
  return std::string(name(c.src)) + " -> " + name(c.dst) + " L=" + std::to_string(c.g.L) + " B=" +
         std::to_string(c.g.B) + " H=" + std::to_string(c.g.H) + " T=" + std::to_string(c.g.T) +
         " D=" + std::to_string(c.g.D) + " page=" + std::to_string(c.g.page) + " frac=" + std::to_string(c.frac) +
         " headwise=" + std::to_string(c.headwise) + " scales=" + std::to_string(c.g.scales) +
         " misalign=" + std::to_string(c.g.misalign) + "/" + std::to_string(c.dst_misalign) +
         " shuffled=" + std::to_string(c.shuffled) + " " + tables_name(c.g.tables);
}

//! The device entry points under a launch policy: the public functions for the default policy, otherwise
//! detail::compact_dispatch<Policy> (same arguments).
using default_policy = prefixkv::compact_policy<>;
template <class Policy, class Src, class Dst>
cudaError_t gather_with(void* t, size_t& bytes, const Src& s, const Dst& d, const prefixkv::selection& sel,
                        const prefixkv::segment_grid& grid, const prefixkv::compact_outputs& out,
                        prefixkv::index_check chk, cudaStream_t st) {
  if constexpr (std::is_same_v<Policy, default_policy>)
    return prefixkv::gather_kept(t, bytes, s, d, sel, grid, out, chk, st);
  else
    return prefixkv::detail::compact_dispatch<Policy>(t, bytes, s, d, false, sel, grid, out, chk, st);
}
template <class Policy, class Cache>
cudaError_t in_place_with(void* t, size_t& bytes, const Cache& c, const prefixkv::selection& sel,
                          const prefixkv::segment_grid& grid, const prefixkv::compact_outputs& out,
                          prefixkv::index_check chk, cudaStream_t st) {
  if constexpr (std::is_same_v<Policy, default_policy>)
    return prefixkv::compact_in_place(t, bytes, c, sel, grid, out, chk, st);
  else
    return prefixkv::detail::compact_dispatch<Policy>(t, bytes, c, c, true, sel, grid, out, chk, st);
}

//! Out-of-place: device (three ways) vs host twin, whole destination image compared (poison outside the kept
//! rows must survive), source image unchanged, outputs equal.
template <class T, class Policy = default_policy>
void run_gather_case(const case_cfg& c, std::mt19937_64& rng) {
  const std::string ctx = "gather " + describe(c);
  INFO(ctx);
  cache<T> src(c.src, c.g, rng, false);
  geometry gd = c.g;
  gd.misalign = c.dst_misalign;
  cache<T> dst(c.dst, gd, rng, true);
  const prefixkv::segment_grid grid{c.g.L, c.g.B, c.headwise ? c.g.H : 1};
  host_selection sel = random_selection(rng, grid.count(), c.g.T, c.frac, c.shuffled);
  src.upload(src.host);
  // host twin
  outputs out(grid.count(), c.g.L, c.g.B, is_paged(c.dst));
  std::vector<unsigned char> expect = dst.host;
  {
    cache<T>& d = dst;
    cudaError_t e = cudaErrorUnknown;
    src.visit(true, [&](const auto& s) {
      d.visit(true, [&](const auto& dd) { e = prefixkv::gather_kept_host(s, dd, sel.host(), grid, out.host()); });
    });
    REQUIRE_MESSAGE(e == cudaSuccess, prefixkv::last_error().message);
    expect = dst.host;
    std::fill(dst.host.begin(), dst.host.end(), poison_byte);
  }
  const auto src_before = src.host;
  run_three_ways(
      [&](void* t, size_t& bytes, cudaStream_t st) {
        cudaError_t e = cudaErrorUnknown;
        src.visit(false, [&](const auto& s) {
          dst.visit(false, [&](const auto& dd) {
            e = gather_with<Policy>(t, bytes, s, dd, sel.dev(), grid, out.dev(), prefixkv::index_check::device, st);
          });
        });
        return e;
      },
      [&] {
        dst.upload(dst.host);
        out.poison();
      },
      [&](const char* mode) {
        const std::string md = mode;
        INFO(md);
        const auto got = dst.download();
        const int64_t at = first_diff(got, expect);
        CHECK_MESSAGE(at == -1, "destination differs at byte ", at);
        CHECK(first_diff(src.download(), src_before) == -1);
        out.check_equal();
      });
}

//! In place: device (three ways, reset restores the source) vs host twin on a copy of the image.
template <class T, class Policy = default_policy>
void run_inplace_case(const case_cfg& c, std::mt19937_64& rng) {
  const std::string ctx = "in place " + describe(c);
  INFO(ctx);
  cache<T> kv(c.src, c.g, rng, false);
  const prefixkv::segment_grid grid{c.g.L, c.g.B, c.headwise ? c.g.H : 1};
  host_selection sel = random_selection(rng, grid.count(), c.g.T, c.frac, false);
  const auto original = kv.host;
  outputs out(grid.count(), c.g.L, c.g.B, is_paged(c.src));
  cudaError_t e = cudaErrorUnknown;
  kv.visit(true, [&](const auto& x) { e = prefixkv::compact_in_place_host(x, sel.host(), grid, out.host()); });
  REQUIRE_MESSAGE(e == cudaSuccess, prefixkv::last_error().message);
  const auto expect = kv.host;
  run_three_ways(
      [&](void* t, size_t& bytes, cudaStream_t st) {
        cudaError_t err = cudaErrorUnknown;
        kv.visit(false, [&](const auto& x) {
          err = in_place_with<Policy>(t, bytes, x, sel.dev(), grid, out.dev(), prefixkv::index_check::device, st);
        });
        return err;
      },
      [&] {
        kv.upload(original);
        out.poison();
      },
      [&](const char* mode) {
        const std::string md = mode;
        INFO(md);
        const int64_t at = first_diff(kv.download(), expect);
        CHECK_MESSAGE(at == -1, "cache differs at byte ", at);
        out.check_equal();
      });
}

}  // namespace compact_test
