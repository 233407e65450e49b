// Bad inputs: rejected with distinct reasons, caches byte-identical afterwards. Host-visible problems are
// refused before anything is enqueued; device-resident ones (indices, offsets, page ids) by the check kernel,
// which makes the move kernel write nothing and reports the reason through `out.status`.
#include "compact_test_util.cuh"

using namespace compact_test;
using prefixkv::reason;

namespace {

geometry small() {
  geometry g;
  g.L = 2;
  g.B = 2;
  g.H = 2;
  g.T = 40;
  g.D = 64;
  g.page = 8;
  return g;
}

// Device path (three ways) and host twin must both refuse with `why`; nothing may change.
template <class T>
void expect_device_reject(cache<T>& src, cache<T>* dst, host_selection& sel, const prefixkv::segment_grid& grid,
                          reason why) {
  const std::string why_s = std::string("expected reason ") + prefixkv::to_string(why);
  INFO(why_s);
  const auto src_before = src.host;
  const auto dst_before = dst ? dst->host : std::vector<unsigned char>{};
  outputs out(grid.count(), grid.layers, grid.batch, dst ? is_paged(dst->lay) : is_paged(src.lay));
  // host twin
  cudaError_t e = cudaSuccess;
  if (dst)
    src.visit(true, [&](const auto& s) {
      dst->visit(true, [&](const auto& d) { e = prefixkv::gather_kept_host(s, d, sel.host(), grid, out.host()); });
    });
  else
    src.visit(true, [&](const auto& s) { e = prefixkv::compact_in_place_host(s, sel.host(), grid, out.host()); });
  CHECK(e == cudaErrorInvalidValue);
  CHECK(prefixkv::last_error().why == why);
  CHECK(out.h_status == int32_t(why));
  CHECK(first_diff(src.host, src_before) == -1);
  if (dst) CHECK(first_diff(dst->host, dst_before) == -1);
  // device
  run_three_ways(
      [&](void* t, size_t& bytes, cudaStream_t st) {
        cudaError_t err = cudaErrorUnknown;
        if (dst)
          src.visit(false, [&](const auto& s) {
            dst->visit(false, [&](const auto& d) {
              const auto chk = prefixkv::index_check::device;
              err = prefixkv::gather_kept(t, bytes, s, d, sel.dev(), grid, out.dev(), chk, st);
            });
          });
        else
          src.visit(false, [&](const auto& s) {
            const auto chk = prefixkv::index_check::device;
            err = prefixkv::compact_in_place(t, bytes, s, sel.dev(), grid, out.dev(), chk, st);
          });
        return err;
      },
      [&] {
        src.upload(src_before);
        if (dst) dst->upload(dst_before);
        out.poison();
      },
      [&](const char* mode) {
        const std::string md = mode;
        INFO(md);
        CHECK(out.status() == int32_t(why));
        CHECK(first_diff(src.download(), src_before) == -1);
        if (dst) CHECK(first_diff(dst->download(), dst_before) == -1);
        const auto len = out.d_len.download();
        CHECK(std::all_of(len.begin(), len.end(), [](int32_t v) { return v == poison_value<int32_t>(); }));
      });
}

}  // namespace

TEST_CASE("device-side checks: indices, offsets, capacity, page ids, duplicate pages") {
  auto rng = make_rng(701);
  const geometry g = small();
  const prefixkv::segment_grid grid{g.L, g.B, 1};
  for (layout sl : {layout::bhsd, layout::nhd}) {
    const std::string lay_s = std::string("layout ") + name(sl);
    INFO(lay_s);
    cache<uint16_t> src(sl, g, rng, false);
    cache<uint16_t> dst(layout::bshd, g, rng, true);
    src.upload(src.host);
    dst.upload(dst.host);
    {  // index out of range (gather)
      host_selection sel = random_selection(rng, grid.count(), g.T, 3, false);
      sel.indices[sel.offsets[3] - 1] = int32_t(g.T);
      sel.upload();
      expect_device_reject(src, &dst, sel, grid, reason::out_of_range);
    }
    {  // negative index (in place)
      host_selection sel = random_selection(rng, grid.count(), g.T, 3, false);
      sel.indices[sel.offsets[1]] = -1;
      sel.upload();
      expect_device_reject<uint16_t>(src, nullptr, sel, grid, reason::out_of_range);
    }
    {  // not ascending (in place)
      host_selection sel = random_selection(rng, grid.count(), g.T, 3, false);
      std::swap(sel.indices[sel.offsets[2]], sel.indices[sel.offsets[2] + 1]);
      sel.upload();
      expect_device_reject<uint16_t>(src, nullptr, sel, grid, reason::not_ascending);
    }
    {  // duplicate index (in place)
      host_selection sel = random_selection(rng, grid.count(), g.T, 3, false);
      sel.indices[sel.offsets[2] + 1] = sel.indices[sel.offsets[2]];
      sel.upload();
      expect_device_reject<uint16_t>(src, nullptr, sel, grid, reason::not_ascending);
    }
    {  // decreasing offsets (gather, so that no other check can fire first)
      host_selection sel = random_selection(rng, grid.count(), g.T, 2, false);
      sel.offsets[2] = sel.offsets[1] - 1;
      sel.upload();
      expect_device_reject(src, &dst, sel, grid, reason::out_of_range);
    }
    {  // kept > destination capacity
      geometry gs = g;
      gs.T = 10;
      cache<uint16_t> tiny(layout::bhsd, gs, rng, true);
      tiny.upload(tiny.host);
      host_selection sel = random_selection(rng, grid.count(), g.T, 3, false);  // 20 kept > 10
      expect_device_reject(src, &tiny, sel, grid, reason::capacity_exceeded);
    }
  }
  {  // page id out of range (paged source)
    cache<uint16_t> src(layout::hnd, g, rng, false);
    cache<uint16_t> dst(layout::bhsd, g, rng, true);
    src.table[1] = int32_t(src.num_pages);
    src.dtable.upload(src.table);
    src.upload(src.host);
    dst.upload(dst.host);
    host_selection sel = random_selection(rng, grid.count(), g.T, 4, false);
    expect_device_reject(src, &dst, sel, grid, reason::out_of_range);
  }
  {  // page used twice (paged in place)
    cache<uint16_t> kv(layout::nhd, g, rng, false);
    kv.table[kv.max_blocks + 1] = kv.table[0];  // sequence 1 block 1 aliases sequence 0 block 0
    kv.dtable.upload(kv.table);
    kv.upload(kv.host);
    host_selection sel = random_selection(rng, grid.count(), g.T, 4, false);
    expect_device_reject<uint16_t>(kv, nullptr, sel, grid, reason::overlapping_buffers);
  }
  {  // page used twice (paged destination)
    cache<uint16_t> src(layout::bhsd, g, rng, false);
    cache<uint16_t> dst(layout::hnd, g, rng, true);
    dst.table[2] = dst.table[1];
    dst.dtable.upload(dst.table);
    src.upload(src.host);
    dst.upload(dst.host);
    host_selection sel = random_selection(rng, grid.count(), g.T, 4, false);
    expect_device_reject(src, &dst, sel, grid, reason::overlapping_buffers);
  }
}

TEST_CASE("host-side checks: refused before anything is enqueued") {
  auto rng = make_rng(702);
  const geometry g = small();
  const prefixkv::segment_grid grid{g.L, g.B, 1};
  cache<uint16_t> src(layout::bhsd, g, rng, false);
  cache<uint16_t> dst(layout::bshd, g, rng, true);
  src.upload(src.host);
  dst.upload(dst.host);
  host_selection sel = random_selection(rng, grid.count(), g.T, 3, false);
  const auto sb = src.download(), db = dst.download();
  auto expect = [&](cudaError_t e, reason why) {
    const std::string why_s = std::string("expected reason ") + prefixkv::to_string(why);
  INFO(why_s);
    CHECK(e == cudaErrorInvalidValue);
    CHECK(prefixkv::last_error().why == why);
  };
  size_t bytes = 1 << 20;
  device_buffer<unsigned char> temp(bytes);
  auto s = [&] { return prefixkv::kv_layers<uint16_t>{src.ds[0].data(), src.ds[1].data(), nullptr, nullptr, g.L}; };
  auto d = [&] { return prefixkv::kv_layers<uint16_t>{dst.ds[0].data(), dst.ds[1].data(), nullptr, nullptr, g.L}; };

  // source and destination overlap (gather onto itself)
  expect(prefixkv::gather_kept(temp.get(), bytes, s(), s(), sel.dev(), grid), reason::overlapping_buffers);
  // selection count does not match the grid
  expect(prefixkv::gather_kept(temp.get(), bytes, s(), d(), sel.dev(), prefixkv::segment_grid{g.L, g.B, 2}),
         reason::shape_mismatch);
  // grid heads neither 1 nor H
  expect(prefixkv::compact_in_place(temp.get(), bytes, s(), sel.dev(), prefixkv::segment_grid{g.L, g.B, 3}),
         reason::shape_mismatch);
  // layers of one kind differ
  {
    auto bad = src.ds[0];
    bad[1].stride_batch += 8;
    prefixkv::kv_layers<uint16_t> x{bad.data(), src.ds[1].data(), nullptr, nullptr, g.L};
    expect(prefixkv::compact_in_place(temp.get(), bytes, x, sel.dev(), grid), reason::shape_mismatch);
  }
  // negative stride
  {
    auto bad = src.ds[0];
    for (auto& v : bad) v.stride_head = -v.stride_head;
    prefixkv::kv_layers<uint16_t> x{bad.data(), src.ds[1].data(), nullptr, nullptr, g.L};
    expect(prefixkv::compact_in_place(temp.get(), bytes, x, sel.dev(), grid), reason::negative_stride);
  }
  // overlapping strides in a view
  {
    auto bad = src.ds[0];
    for (auto& v : bad) v.stride_token = 1;
    prefixkv::kv_layers<uint16_t> x{bad.data(), src.ds[1].data(), nullptr, nullptr, g.L};
    expect(prefixkv::compact_in_place(temp.get(), bytes, x, sel.dev(), grid), reason::overlapping_strides);
  }
  // destination rows of another size
  {
    geometry g2 = g;
    g2.D = 32;
    cache<uint16_t> other(layout::bhsd, g2, rng, true);
    prefixkv::kv_layers<uint16_t> x{other.ds[0].data(), other.ds[1].data(), nullptr, nullptr, g.L};
    expect(prefixkv::gather_kept(temp.get(), bytes, s(), x, sel.dev(), grid), reason::shape_mismatch);
  }
  // head-wise lists with per-token (shared) scales
  {
    geometry g3 = g;
    g3.scales = 1;
    cache<uint16_t> sc(layout::bhsd, g3, rng, false);
    host_selection hw = random_selection(rng, g.L * g.B * g.H, g.T, 3, false);
    sc.visit(false, [&](const auto& x) {
      expect(prefixkv::compact_in_place(temp.get(), bytes, x, hw.dev(), prefixkv::segment_grid{g.L, g.B, g.H}),
             reason::shape_mismatch);
    });
  }
  // null indices
  {
    prefixkv::selection nul = sel.dev();
    nul.indices = nullptr;
    expect(prefixkv::compact_in_place(temp.get(), bytes, s(), nul, grid), reason::null_pointer);
  }
  // workspace smaller than the size query
  {
    size_t need = 0;
    REQUIRE(prefixkv::compact_in_place(nullptr, need, s(), sel.dev(), grid) == cudaSuccess);
    size_t small_bytes = need - 1;
    expect(prefixkv::compact_in_place(temp.get(), small_bytes, s(), sel.dev(), grid), reason::workspace_too_small);
  }
  // too many layers
  {
    std::vector<prefixkv::kv_view<uint16_t>> many(prefixkv::compact_max_layers + 1, src.ds[0][0]);
    prefixkv::kv_layers<uint16_t> x{many.data(), nullptr, nullptr, nullptr, int64_t(many.size())};
    expect(prefixkv::compact_in_place(temp.get(), bytes, x, sel.dev(), grid), reason::unsupported);
  }
  // pages_in_use requested for a strided destination
  {
    device_buffer<int32_t> pages(4);
    prefixkv::compact_outputs o{};
    o.pages_in_use = pages.get();
    expect(prefixkv::gather_kept(temp.get(), bytes, s(), d(), sel.dev(), grid, o), reason::bad_parameter);
  }
  PKV_CUDA_CHECK(cudaDeviceSynchronize());
  CHECK(first_diff(src.download(), sb) == -1);
  CHECK(first_diff(dst.download(), db) == -1);
}

namespace {

// One buffer [L, B, T, 2, H, D] (K and V interleaved per token, layers back to back) on host and device, and the
// per-(layer, kind) views of it, with an optional extra element offset for V (to make V overlap K's elements).
struct interleaved {
  int64_t L = 2, B = 2, H = 2, T = 24, D = 8;
  std::vector<unsigned char> host;
  device_buffer<unsigned char> dev;
  int64_t per_layer() const { return B * T * 2 * H * D; }
  explicit interleaved(std::mt19937_64& rng) {
    host.resize(size_t(L * per_layer()) * 2 + 64);
    for (auto& x : host) x = static_cast<unsigned char>(rng());
    dev = device_buffer<unsigned char>(host);
  }
  prefixkv::kv_view<uint16_t> view(bool on_device, int64_t layer, int kind, int64_t shift = 0) const {
    uint16_t* base = reinterpret_cast<uint16_t*>(on_device ? dev.get() : const_cast<unsigned char*>(host.data()));
    return prefixkv::make_kv_view(base + layer * per_layer() + kind * H * D + shift, B, H, T, D, T * 2 * H * D, D,
                                  2 * H * D, 1);
  }
};

}  // namespace

TEST_CASE("aliasing: tensors of one cache sharing memory are refused in place (host twin and device); K/V "
          "interleaved per token is accepted") {
  auto rng = make_rng(704);
  interleaved buf(rng);
  const prefixkv::segment_grid grid{buf.L, buf.B, 1};
  host_selection sel = random_selection(rng, grid.count(), buf.T, 5, false);
  size_t bytes = 1 << 16;
  device_buffer<unsigned char> temp(bytes);
  // the accepted layout: device (three ways) == host twin, byte for byte
  {
    auto host_img = buf.host;
    std::vector<prefixkv::kv_view<uint16_t>> hk, hv, dk, dv;
    for (int64_t l = 0; l < buf.L; ++l) {
      hk.push_back(buf.view(false, l, 0));
      hv.push_back(buf.view(false, l, 1));
      dk.push_back(buf.view(true, l, 0));
      dv.push_back(buf.view(true, l, 1));
    }
    REQUIRE(prefixkv::compact_in_place_host(prefixkv::kv_layers<uint16_t>{hk.data(), hv.data(), nullptr, nullptr, buf.L},
                                            sel.host(), grid) == cudaSuccess);
    const auto want = buf.host;
    buf.host = host_img;
    // spot check of the twin against the definition: row j of (l, b, h) now holds source row sel[j], K and V
    auto at = [&](const std::vector<unsigned char>& image, const prefixkv::kv_view<uint16_t>& v, int64_t b, int64_t h,
                  int64_t t, int64_t d) {
      const int64_t e = (v.data - reinterpret_cast<uint16_t*>(buf.host.data())) + v.offset(b, h, t, d);
      uint16_t x = 0;
      std::memcpy(&x, image.data() + e * 2, 2);
      return x;
    };
    for (int64_t l = 0; l < buf.L; ++l)
      for (int64_t b = 0; b < buf.B; ++b) {
        const int64_t s = grid.id(l, b);
        for (int64_t j = 0; j < sel.offsets[s + 1] - sel.offsets[s]; ++j)
          for (int kind = 0; kind < 2; ++kind) {
            const auto v = buf.view(false, l, kind);
            const int64_t t = sel.indices[sel.offsets[s] + j];
            CHECK(at(want, v, b, 1, j, 3) == at(host_img, v, b, 1, t, 3));
          }
      }
    const prefixkv::kv_layers<uint16_t> cache{dk.data(), dv.data(), nullptr, nullptr, buf.L};
    run_three_ways([&](void* t, size_t& n, cudaStream_t st) { return prefixkv::compact_in_place(t, n, cache, sel.dev(), grid, {}, prefixkv::index_check::device, st); },
                   [&] { buf.dev.upload(host_img); },
                   [&](const char* mode) {
                     INFO(mode);
                     CHECK(first_diff(buf.dev.download(), want) == -1);
                   });
    buf.dev.upload(host_img);
  }
  // refused layouts: (K, V) on the same memory; V one element into K's rows; layer 1 on layer 0; a K scale on V
  struct bad_case {
    const char* what;
    int64_t v_shift;
    bool same_kv, same_layers, scale_on_v;
  };
  for (const bad_case& c : {bad_case{"K and V identical", 0, true, false, false},
                            bad_case{"V shifted into K's elements", -(buf.H * buf.D) + 1, false, false, false},
                            bad_case{"layer 1 on layer 0", 0, false, true, false},
                            bad_case{"K scales on V", 0, false, false, true}}) {
    INFO(c.what);
    for (bool dev : {false, true}) {
      std::vector<prefixkv::kv_view<uint16_t>> k, v;
      std::vector<prefixkv::kv_view<uint16_t>> sc;  // scale views of the same element size as K here
      for (int64_t l = 0; l < buf.L; ++l) {
        const int64_t ll = c.same_layers ? 0 : l;
        k.push_back(buf.view(dev, ll, 0));
        v.push_back(c.same_kv ? buf.view(dev, ll, 0) : buf.view(dev, ll, 1, c.v_shift));
        auto s = buf.view(dev, ll, 1);
        s.dim = 1;
        sc.push_back(s);
      }
      const prefixkv::kv_layers<uint16_t, uint16_t> cache{k.data(), v.data(), c.scale_on_v ? sc.data() : nullptr, nullptr,
                                                          buf.L};
      const auto before = buf.host;
      if (!dev) {
        CHECK(prefixkv::compact_in_place_host(cache, sel.host(), grid) == cudaErrorInvalidValue);
      } else {
        CHECK(prefixkv::compact_in_place(temp.get(), bytes, cache, sel.dev(), grid) == cudaErrorInvalidValue);
        size_t q = 0;  // the size query refuses too
        CHECK(prefixkv::compact_in_place(nullptr, q, cache, sel.dev(), grid) == cudaErrorInvalidValue);
      }
      CHECK(prefixkv::last_error().why == reason::overlapping_buffers);
      CHECK(first_diff(buf.host, before) == -1);
    }
    PKV_CUDA_CHECK(cudaDeviceSynchronize());
    CHECK(first_diff(buf.dev.download(), buf.host) == -1);
  }
}

TEST_CASE("aliasing: paged K and V pools on the same memory are refused; K/V interleaved per page accepted") {
  auto rng = make_rng(705);
  const int64_t L = 1, B = 2, H = 2, D = 8, P = 4, blocks = 3, pages = B * blocks + 1, T = blocks * P;
  // pool [pages, 2, P, H, D]: K then V inside every page
  std::vector<unsigned char> img(size_t(pages * 2 * P * H * D) * 2);
  for (auto& x : img) x = static_cast<unsigned char>(rng());
  device_buffer<unsigned char> dimg(img);
  std::vector<int32_t> table = {3, 0, 5, 1, 6, 2};
  device_buffer<int32_t> dtable(table);
  auto pool = [&](bool dev, int kind, bool same) {
    uint16_t* base = reinterpret_cast<uint16_t*>(dev ? dimg.get() : img.data());
    prefixkv::paged_kv_view<uint16_t> v;
    v.pages = base + (same ? 0 : kind * P * H * D);
    v.num_pages = pages;
    v.page_size = P;
    v.heads = H;
    v.dim = D;
    v.stride_page = 2 * P * H * D;
    v.stride_slot = H * D;
    v.stride_head = D;
    v.stride_dim = 1;
    v.block_table = dev ? dtable.get() : table.data();
    v.batch = B;
    v.max_blocks = blocks;
    v.block_table_stride = blocks;
    return v;
  };
  const prefixkv::segment_grid grid{L, B, 1};
  host_selection sel = random_selection(rng, grid.count(), T, 5, false);
  size_t bytes = 0;
  for (bool same : {false, true}) {
    const std::string what = same ? "K and V pools identical" : "K/V interleaved per page";
    INFO(what);
    const auto before = img;
    auto hk = pool(false, 0, same), hv = pool(false, 1, same), dk = pool(true, 0, same), dv = pool(true, 1, same);
    const prefixkv::paged_kv_layers<uint16_t> hc{&hk, &hv, nullptr, nullptr, L}, dc{&dk, &dv, nullptr, nullptr, L};
    const cudaError_t eh = prefixkv::compact_in_place_host(hc, sel.host(), grid);
    const cudaError_t ed = prefixkv::compact_in_place(nullptr, bytes, dc, sel.dev(), grid);
    if (same) {
      CHECK(eh == cudaErrorInvalidValue);
      CHECK(ed == cudaErrorInvalidValue);
      CHECK(prefixkv::last_error().why == reason::overlapping_buffers);
      CHECK(first_diff(img, before) == -1);
    } else {
      CHECK(eh == cudaSuccess);
      REQUIRE(ed == cudaSuccess);
      const auto want = img;
      run_three_ways([&](void* t, size_t& n, cudaStream_t st) { return prefixkv::compact_in_place(t, n, dc, sel.dev(), grid, {}, prefixkv::index_check::device, st); },
                     [&] { dimg.upload(before); },
                     [&](const char* mode) {
                       INFO(mode);
                       CHECK(first_diff(dimg.download(), want) == -1);
                     });
      img = before;
    }
  }
}

TEST_CASE("per-layer block tables: a page twice in one layer is refused; across layers only when they share a pool") {
  auto rng = make_rng(709);
  geometry g = small();
  g.L = 3;
  const prefixkv::segment_grid grid{g.L, g.B, 1};
  for (int tables = 1; tables <= 2; ++tables) {
    INFO(tables_name(tables));
    {  // twice in layer 1's table (in place)
      geometry gg = g;
      gg.tables = tables;
      cache<uint16_t> kv(layout::nhd, gg, rng, false);
      const int64_t t1 = kv.table_offset(1);
      kv.table[t1 + kv.max_blocks + 1] = kv.table[t1];
      kv.dtable.upload(kv.table);
      kv.upload(kv.host);
      host_selection sel = random_selection(rng, grid.count(), g.T, 4, false);
      expect_device_reject<uint16_t>(kv, nullptr, sel, grid, reason::overlapping_buffers);
    }
    {  // layer 2 uses a page of layer 0 (paged destination): legal with a pool per layer, refused with one pool
      geometry gg = g;
      gg.tables = tables;
      cache<uint16_t> src(layout::bhsd, g, rng, false);
      cache<uint16_t> dst(layout::hnd, gg, rng, true);
      // swap layer 0's page into entry 1 of layer 2 (layer 2's own table stays free of duplicates)
      const int32_t v = dst.table[dst.table_offset(0) + 1];
      int32_t* t2 = dst.table.data() + dst.table_offset(2);
      for (int64_t j = 0; j < g.B * dst.max_blocks; ++j)
        if (t2[j] == v) t2[j] = t2[1];
      t2[1] = v;
      dst.dtable.upload(dst.table);
      src.upload(src.host);
      dst.upload(dst.host);
      host_selection sel = random_selection(rng, grid.count(), g.T, 4, false);
      if (tables == 2) {
        expect_device_reject(src, &dst, sel, grid, reason::overlapping_buffers);
      } else {
        // accepted: device == host twin
        const auto before = dst.host;
        outputs out(grid.count(), g.L, g.B, true);
        cudaError_t e = cudaErrorUnknown;
        src.visit(true, [&](const auto& s) {
          dst.visit(true, [&](const auto& d) { e = prefixkv::gather_kept_host(s, d, sel.host(), grid, out.host()); });
        });
        REQUIRE_MESSAGE(e == cudaSuccess, prefixkv::last_error().message);
        const auto expect = dst.host;
        run_three_ways(
            [&](void* t, size_t& bytes, cudaStream_t st) {
              cudaError_t err = cudaErrorUnknown;
              src.visit(false, [&](const auto& s) {
                dst.visit(false, [&](const auto& d) {
                  err = prefixkv::gather_kept(t, bytes, s, d, sel.dev(), grid, out.dev(), prefixkv::index_check::device, st);
                });
              });
              return err;
            },
            [&] {
              dst.upload(before);
              out.poison();
            },
            [&](const char* mode) {
              INFO(mode);
              CHECK(first_diff(dst.download(), expect) == -1);
              out.check_equal();
            });
      }
    }
  }
}
