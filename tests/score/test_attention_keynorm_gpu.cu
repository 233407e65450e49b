// Accumulated attention (bit-identical to the host twin, fp32/f16/bf16, strided P) and key-norm (1e-5 relative)
// on the device: one layer and all layers per call, per-head rows of unequal length, sequence-major grids, paged K
// for the key norm (page ids checked on the device), bitwise-equal repeated runs.
#include "score_test_util.cuh"

#include <cstring>

using namespace score_test;

namespace {
// Accumulated attention over `layers` layers (0: one layer of a 2-layer grid through accumulated_attention, else all
// layers through accumulated_attention_layers), per-head rows of unequal length, keys past each row NaN.
template <class T>
void attention_case(std::mt19937_64& rng, bool per_head, bool transposed, int64_t layers, bool seq_major) {
  const int64_t B = 1 + rng() % 3, Hk = 1 + rng() % 3, G = int64_t(1) << (rng() % 4), Hq = Hk * G, Q = 1 + rng() % 17;
  const int64_t cap = 1 + rng() % 300, pad = 5;
  INFO("B ", B, " Hq ", Hq, " Q ", Q, " cap ", cap, " per_head ", per_head, " transposed ", transposed, " layers ", layers);
  const int64_t GL = layers > 0 ? layers : 2, SL = layers > 0 ? layers : 1, layer0 = layers > 0 ? 0 : 1;
  const pk::segment_grid grid{GL, B, per_head ? Hk : 1, seq_major};
  std::vector<int64_t> cu(grid.count() + 1, 0);
  for (int64_t id = 0; id < grid.count(); ++id) cu[id + 1] = cu[id] + int64_t(rng() % (cap + 1));
  auto len = [&](int64_t id) { return cu[id + 1] - cu[id]; };
  device_buffer<int64_t> dcu(cu);
  // (B, Q, Hq, cap + pad) storage when transposed, else (B, Hq, Q, cap + pad)
  auto mk = [&](const T* base) {
    return transposed ? pk::make_kv_view<const T>(base, B, Hq, Q, cap, Q * Hq * (cap + pad), cap + pad, Hq * (cap + pad), 1)
                      : pk::make_kv_view<const T>(base, B, Hq, Q, cap, Hq * Q * (cap + pad), Q * (cap + pad), cap + pad, 1);
  };
  std::vector<std::vector<T>> ph(SL);
  std::vector<device_buffer<T>> dp(SL);
  std::vector<pk::kv_view<const T>> hv(SL), gv(SL);
  const int64_t GG = Hq / grid.heads;
  for (int64_t s = 0; s < SL; ++s) {
    ph[s] = to_storage<T>(random_vector<float>(rng, size_t(B * Hq * Q * (cap + pad)), 0, 1));
    hv[s] = mk(ph[s].data());
    for (int64_t b = 0; b < B; ++b)  // keys past the rows: NaN
      for (int64_t oh = 0; oh < grid.heads; ++oh)
        for (int64_t g = 0; g < GG; ++g)
          for (int64_t qi = 0; qi < Q; ++qi)
            for (int64_t t = len(grid.id(layer0 + s, b, oh)); t < cap; ++t)
              ph[s][size_t(hv[s].offset(b, oh * GG + g, qi, t))] = from_float<T>(NAN);
    dp[s] = device_buffer<T>(ph[s]);
    gv[s] = mk(dp[s].get());
  }
  const float kPoison = poison_value<float>();
  std::vector<float> expect(size_t(cu.back() + 1), kPoison);
  const auto hrows = pk::make_offset_segments(grid.count(), cu.data());
  REQUIRE((layers > 0 ? pk::accumulated_attention_layers_host(hv.data(), grid, hrows, expect.data())
                      : pk::accumulated_attention_host(hv[0], grid, layer0, hrows, expect.data())) == cudaSuccess);
  device_buffer<float> out(expect.size());
  device_buffer<unsigned> status(1);
  run_three_ways(
      [&](void* t, size_t& bytes, cudaStream_t s) {
        const auto drows = pk::make_offset_segments(grid.count(), dcu.get());
        if (layers > 0) return pk::accumulated_attention_layers(t, bytes, gv.data(), grid, drows, out.get(), status.get(), s);
        return pk::accumulated_attention(t, bytes, gv[0], grid, layer0, drows, out.get(), status.get(), s);
      },
      [&] {
        out.poison();
        PKV_CUDA_CHECK(cudaMemset(status.get(), 0, 4));
      },
      [&](const char* mode) {
        INFO("mode ", mode);
        const auto got = out.download();
        CHECK(status.download()[0] == 0u);
        CHECK(std::memcmp(got.data(), expect.data(), got.size() * 4) == 0);  // bit-identical
      });
}

// Key norm: one layer or all layers, strided (16-byte vector loads or element loads) or paged, per-head rows of
// unequal length, keys past each row NaN.
template <class T>
void key_norm_case(std::mt19937_64& rng, bool per_head, bool recip, bool strided, int64_t layers, int64_t page_size,
                   bool seq_major) {
  const int64_t B = 1 + rng() % 3, Hk = 1 + rng() % 8, cap = 1 + rng() % 500;
  const int64_t D = rng() % 2 ? 128 : (rng() % 2 ? 8 * (1 + int64_t(rng() % 40)) : 1 + int64_t(rng() % 90));
  INFO("B ", B, " Hk ", Hk, " D ", D, " cap ", cap, " per_head ", per_head, " strided ", strided, " layers ", layers,
       " page ", page_size);
  const int64_t GL = layers > 0 ? layers : 2, SL = layers > 0 ? layers : 1, layer0 = layers > 0 ? 0 : int64_t(rng() % 2);
  const pk::segment_grid grid{GL, B, per_head ? Hk : 1, seq_major};
  std::vector<int64_t> begins(grid.count()), lens(grid.count());
  int64_t off = 0;
  for (int64_t id = 0; id < grid.count(); ++id) {
    begins[id] = off;
    lens[id] = rng() % 4 == 0 ? cap : int64_t(rng() % (cap + 1));
    off += lens[id] + 2;
  }
  auto n_of = [&](int64_t l, int64_t b, int64_t h) { return lens[grid.id(l, b, per_head ? h : 0)]; };
  auto mk = [&](const T* base) {
    return strided ? pk::make_kv_view<const T>(base, B, Hk, cap, D, cap * Hk * (D + 3), D + 3, Hk * (D + 3), 1)
                   : pk::make_kv_view_bhsd<const T>(base, B, Hk, cap, D);
  };
  std::vector<std::vector<T>> kh(SL);
  std::vector<device_buffer<T>> dk(SL), dpool(SL);
  std::vector<pk::kv_view<const T>> hv(SL), gv(SL);
  for (int64_t s = 0; s < SL; ++s) {
    kh[s] = to_storage<T>(random_vector<float>(rng, size_t(B * Hk * cap * (D + 3))));
    hv[s] = mk(kh[s].data());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hk; ++h)
        for (int64_t t = n_of(layer0 + s, b, h); t < cap; ++t)
          for (int64_t d = 0; d < D; ++d) kh[s][size_t(hv[s].offset(b, h, t, d))] = from_float<T>(NAN);
    dk[s] = device_buffer<T>(kh[s]);
    gv[s] = mk(dk[s].get());
  }
  std::vector<paged_copy<T>> pcs;
  std::vector<pk::paged_kv_view<const T>> hpv(SL), gpv(SL);
  device_buffer<int32_t> dtable;
  if (page_size > 0) {
    for (int64_t s = 0; s < SL; ++s) {
      auto value = [&](int64_t b, int64_t h, int64_t t, int64_t d) { return hv[s](b, h, t, d); };
      auto pc = make_paged_copy<T>(rng, B, Hk, cap, D, page_size, rng() & 1, value, from_float<T>(NAN));
      if (s > 0) {
        pc.table = pcs[0].table;
        pc.hnd = pcs[0].hnd;
        std::fill(pc.pool.begin(), pc.pool.end(), from_float<T>(NAN));
        const auto v = pc.host_view();
        for (int64_t b = 0; b < B; ++b)
          for (int64_t h = 0; h < Hk; ++h)
            for (int64_t t = 0; t < cap; ++t)
              for (int64_t d = 0; d < D; ++d) pc.pool[size_t(v.offset(b, h, t, d))] = value(b, h, t, d);
      }
      pcs.push_back(std::move(pc));
    }
    for (int64_t b = 0; b < B; ++b) {
      int64_t nmax = 0;
      for (int64_t s = 0; s < SL; ++s)
        for (int64_t h = 0; h < Hk; ++h) nmax = std::max(nmax, n_of(layer0 + s, b, h));
      pcs[0].break_blocks_from(b, (nmax + page_size - 1) / page_size, -1);
    }
    dtable = device_buffer<int32_t>(pcs[0].table);
    for (int64_t s = 0; s < SL; ++s) {
      dpool[s] = device_buffer<T>(pcs[s].pool);
      hpv[s] = pcs[s].view(pcs[s].pool.data(), pcs[0].table.data());
      gpv[s] = pcs[s].view(dpool[s].get(), dtable.get());
    }
  }
  device_buffer<int64_t> dbeg(begins), dlen(lens);
  const auto hrows = pk::make_ragged_segments(grid.count(), begins.data(), lens.data());
  const auto drows = pk::make_ragged_segments(grid.count(), dbeg.get(), dlen.get());
  const pk::key_norm_options opt{recip};
  const float kPoison = poison_value<float>();
  std::vector<float> expect(size_t(off), kPoison);
  cudaError_t e;
  if (page_size > 0)
    e = layers > 0 ? pk::key_norm_layers_host(hpv.data(), opt, grid, hrows, expect.data())
                   : pk::key_norm_host(hpv[0], opt, grid, layer0, hrows, expect.data());
  else
    e = layers > 0 ? pk::key_norm_layers_host(hv.data(), opt, grid, hrows, expect.data())
                   : pk::key_norm_host(hv[0], opt, grid, layer0, hrows, expect.data());
  REQUIRE(e == cudaSuccess);
  device_buffer<float> out(expect.size());
  device_buffer<unsigned> status(1);
  std::vector<float> first;
  run_three_ways(
      [&](void* t, size_t& bytes, cudaStream_t s) {
        if (page_size > 0)
          return layers > 0 ? pk::key_norm_layers(t, bytes, gpv.data(), opt, grid, drows, out.get(), status.get(), s)
                            : pk::key_norm(t, bytes, gpv[0], opt, grid, layer0, drows, out.get(), status.get(), s);
        return layers > 0 ? pk::key_norm_layers(t, bytes, gv.data(), opt, grid, drows, out.get(), status.get(), s)
                          : pk::key_norm(t, bytes, gv[0], opt, grid, layer0, drows, out.get(), status.get(), s);
      },
      [&] {
        out.poison();
        PKV_CUDA_CHECK(cudaMemset(status.get(), 0, 4));
      },
      [&](const char* mode) {
        INFO("mode ", mode);
        const auto got = out.download();
        CHECK(status.download()[0] == 0u);
        int bad = 0;
        for (size_t i = 0; i < got.size(); ++i) {
          const bool ok = std::memcmp(&expect[i], &kPoison, 4) == 0 ? std::memcmp(&got[i], &kPoison, 4) == 0
                                                                     : std::fabs(got[i] - expect[i]) <= 1e-5f * std::fabs(expect[i]) + 1e-7f;
          if (!ok && bad++ < 5) FAIL_CHECK("element ", i, ": gpu ", got[i], " host ", expect[i]);
        }
        CHECK(bad == 0);
        if (first.empty())
          first = got;
        else
          CHECK(std::memcmp(first.data(), got.data(), got.size() * 4) == 0);  // the same bits again
      });
}
}  // namespace

TEST_CASE("accumulated attention: GPU bit-identical to the host twin (fp32, f16, bf16; strided P; per-head rows)") {
  auto rng = make_rng(301);
  for (int rep = 0; rep < 4; ++rep) {
    attention_case<float>(rng, rep & 1, rep & 2, 0, rep == 3);
    attention_case<pk::f16>(rng, rep & 2, rep & 1, 0, rep == 1);
    attention_case<pk::bf16>(rng, rep & 1, !(rep & 2), 0, rep == 2);
  }
}

TEST_CASE("accumulated attention: all layers in one call") {
  auto rng = make_rng(303);
  for (int rep = 0; rep < 4; ++rep) {
    attention_case<pk::f16>(rng, rep & 1, rep & 2, 1 + int64_t(rng() % 6), rep & 1);
    attention_case<float>(rng, !(rep & 1), rep & 2, 1 + int64_t(rng() % 3), !(rep & 1));
  }
}

TEST_CASE("key-norm: GPU == host twin (vector and element loads, per-head rows)") {
  auto rng = make_rng(302);
  for (int rep = 0; rep < 4; ++rep) {
    key_norm_case<pk::bf16>(rng, rep & 1, rep & 2, rep & 1, 0, 0, rep == 2);
    key_norm_case<float>(rng, rep & 2, rep & 1, !(rep & 1), 0, 0, rep == 1);
    key_norm_case<pk::f16>(rng, rep & 1, false, rep & 2, 0, 0, rep == 3);
  }
}

TEST_CASE("key-norm: paged K and all layers in one call") {
  auto rng = make_rng(304);
  for (int rep = 0; rep < 4; ++rep) {
    const int64_t page = rep % 2 ? 16 : 1 + int64_t(rng() % 7);
    key_norm_case<pk::bf16>(rng, rep & 1, rep & 2, false, 0, page, rep == 1);
    key_norm_case<float>(rng, rep & 2, false, false, 1 + int64_t(rng() % 4), page, rep == 2);
    key_norm_case<pk::f16>(rng, !(rep & 1), rep & 1, rep & 2, 1 + int64_t(rng() % 5), 0, rep == 0);
    key_norm_case<pk::bf16>(rng, rep & 1, false, false, 1 + int64_t(rng() % 5), page, rep == 3);
  }
}

TEST_CASE("key-norm: a page id outside the pool is flagged (status_bad_page); that token scores 0") {
  auto rng = make_rng(305);
  const int64_t B = 2, Hk = 4, D = 128, cap = 200, ps = 16;
  const auto kf = to_storage<pk::bf16>(random_vector<float>(rng, size_t(B * Hk * cap * D)));
  const auto hk = pk::make_kv_view_bhsd<const pk::bf16>(kf.data(), B, Hk, cap, D);
  for (bool vec : {true, false}) {
    // element loads: the same values through a pool whose rows are 2-byte aligned only
    auto pc = make_paged_copy<pk::bf16>(rng, B, Hk, cap, D, ps, vec, [&](int64_t b, int64_t h, int64_t t, int64_t d) {
      return hk(b, h, t, d);
    }, pk::bf16::from_float(NAN));
    pc.table[size_t(1 * pc.max_blocks + 3)] = int32_t(pc.num_pages);  // sequence 1, tokens 48-63
    pc.pool.insert(pc.pool.begin(), pk::bf16::from_float(0.0f));      // shift by one element when !vec
    device_buffer<pk::bf16> dpool(pc.pool);
    device_buffer<int32_t> dtable(pc.table);
    auto k = pc.view(dpool.get() + 1, dtable.get());
    if (!vec) {  // pool start at +1 element: no 16-byte loads
      CHECK(pk::vector_bytes(k) < 16);
    } else {
      pc.pool.erase(pc.pool.begin());
      dpool = device_buffer<pk::bf16>(pc.pool);
      k = pc.view(dpool.get(), dtable.get());
      CHECK(pk::vector_bytes(k) == 16);
    }
    for (int64_t heads : {int64_t(1), Hk}) {
      const pk::segment_grid grid{1, B, heads};
      const auto rows = pk::make_uniform_segments(grid.count(), cap);
      device_buffer<float> out(size_t(grid.count() * cap));
      device_buffer<unsigned> status(1);
      run_three_ways(
          [&](void* t, size_t& bytes, cudaStream_t s) {
            return pk::key_norm(t, bytes, k, {}, grid, 0, rows, out.get(), status.get(), s);
          },
          [&] {
            out.poison();
            PKV_CUDA_CHECK(cudaMemset(status.get(), 0, 4));
          },
          [&](const char* mode) {
            INFO("mode ", mode, " vec ", vec, " heads ", heads);
            const auto got = out.download();
            CHECK(status.download()[0] == unsigned(pk::status_bad_page));
            for (int64_t h = 0; h < heads; ++h)
              for (int64_t t = 0; t < cap; ++t) {
                const float x = got[size_t(grid.id(0, 1, h) * cap + t)];
                if (t >= 48 && t < 64)
                  CHECK(x == 0.0f);
                else
                  CHECK(x < 0.0f);  // -||k||
              }
            unsigned bits = 0;
            CHECK(pk::read_status(status.get(), bits) == cudaErrorInvalidValue);
            CHECK(pk::last_error().why == pk::reason::out_of_range);
          });
    }
  }
}

TEST_CASE("accumulated attention and key-norm flag NaN/Inf and reject bad shapes") {
  std::vector<float> ph(2 * 4 * 3 * 16, 0.1f);
  ph[40] = NAN;
  device_buffer<float> dp(ph), out(64);
  device_buffer<unsigned> status(1);
  auto p = pk::make_kv_view_bhsd<const float>(dp.get(), 2, 4, 3, 16);
  run_three_ways(
      [&](void* t, size_t& bytes, cudaStream_t s) {
        return pk::accumulated_attention(t, bytes, p, pk::segment_grid{1, 2, 1}, 0, pk::make_uniform_segments(2, 16),
                                         out.get(), status.get(), s);
      },
      [&] { PKV_CUDA_CHECK(cudaMemset(status.get(), 0, 4)); },
      [&](const char*) {
        unsigned bits = 0;
        CHECK(pk::read_status(status.get(), bits) == cudaErrorInvalidValue);
        CHECK(pk::last_error().why == pk::reason::nonfinite_input);
      });
  auto k = pk::make_kv_view_bhsd<const float>(dp.get(), 2, 4, 3, 16);  // as keys: (B, H, tokens 3, dim 16)
  run_three_ways(
      [&](void* t, size_t& bytes, cudaStream_t s) {
        return pk::key_norm(t, bytes, k, {}, pk::segment_grid{1, 2, 4}, 0, pk::make_uniform_segments(8, 3), out.get(),
                            status.get(), s);
      },
      [&] { PKV_CUDA_CHECK(cudaMemset(status.get(), 0, 4)); },
      [&](const char*) { CHECK(status.download()[0] == unsigned(pk::status_nonfinite)); });
  size_t bytes = 0;
  CHECK(pk::accumulated_attention(nullptr, bytes, p, pk::segment_grid{1, 2, 3}, 0, pk::make_uniform_segments(6, 4), out.get()) ==
        cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::shape_mismatch);
  CHECK(pk::key_norm(nullptr, bytes, k, {}, pk::segment_grid{1, 2, 1}, 0, pk::make_uniform_segments(2, 4), out.get()) ==
        cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::out_of_range);  // 4 tokens > 3 cached
  CHECK(pk::key_norm(nullptr, bytes, k, {}, pk::segment_grid{1, 2, 1}, 0, pk::make_uniform_segments(2, 3), nullptr) ==
        cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::null_pointer);
}

TEST_CASE("accumulated attention and key-norm: a null output only where nothing can be written") {
  device_buffer<float> dp(2 * 4 * 3 * 16);
  PKV_CUDA_CHECK(cudaMemset(dp.get(), 0, dp.size() * sizeof(float)));
  auto p = pk::make_kv_view_bhsd<const float>(dp.get(), 2, 4, 3, 16);  // (batch, q_head, query, key)
  auto k = pk::make_kv_view_bhsd<const float>(dp.get(), 2, 4, 3, 16);  // (batch, kv_head, token, dim)
  const pk::segment_grid grid{1, 2, 1};
  device_buffer<unsigned char> tmp(256);
  size_t bytes = tmp.size();
  // uniform rows of length 0: nothing to write, nothing launched
  CHECK(pk::accumulated_attention(tmp.get(), bytes, p, grid, 0, pk::make_uniform_segments(2, 0), nullptr) == cudaSuccess);
  CHECK(pk::key_norm(tmp.get(), bytes, k, {}, grid, 0, pk::make_uniform_segments(2, 0), nullptr) == cudaSuccess);
  PKV_CUDA_CHECK(cudaDeviceSynchronize());
  // device-resident offsets cannot be read on the host: a null output is rejected even when every row is empty
  device_buffer<int64_t> cu(std::vector<int64_t>{0, 0, 0});
  CHECK(pk::accumulated_attention(tmp.get(), bytes, p, grid, 0, pk::make_offset_segments(2, cu.get()), nullptr) ==
        cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::null_pointer);
  CHECK(pk::key_norm(tmp.get(), bytes, k, {}, grid, 0, pk::make_offset_segments(2, cu.get()), nullptr) ==
        cudaErrorInvalidValue);
  CHECK(pk::last_error().why == pk::reason::null_pointer);
}
