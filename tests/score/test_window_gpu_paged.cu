// Window scorer with K in a paged cache (NHD / HND, page sizes 1 to 16, random page order, invalid ids past the
// rows): GPU == host twin and == the strided path on the same logical K, bit for bit when both take the same
// kernels; one layer and all layers; every accumulate kernel; page ids outside the pool flagged on the device.
#include "score_test_util.cuh"

using namespace score_test;

TEST_CASE("window scorer, paged K: GPU == host twin == strided path (bf16, every accumulate kernel)") {
  auto rng = make_rng(401);
  struct shape {
    int64_t G, D, w, page;
    bool hnd, lse, per_head;
  };
  const shape shapes[] = {{4, 128, 64, 16, false, true, false},  {8, 128, 128, 16, true, true, true},
                          {2, 64, 33, 3, true, false, true},     {1, 64, 1, 1, false, true, false},
                          {8, 256, 128, 7, false, false, false}, {4, 40, 9, 5, true, true, true}};
  int rep = 0;
  for (const auto& sh : shapes) {
    window_cfg c;
    c.G = sh.G;
    c.D = sh.D;
    c.w = sh.w;
    c.page_size = sh.page;
    c.hnd = sh.hnd;
    c.caller_lse = sh.lse;
    c.per_head = sh.per_head;
    c.seq_major = rep % 2 == 1;
    c.Hk = 1 + int64_t(rng() % 2);
    c.B = 1 + int64_t(rng() % 2);
    c.cap = sh.w + (sh.D == 256 || quick_mode() ? 150 : 1200) + int64_t(rng() % 300);
    c.opt.group = rep % 2 ? pk::head_reduce::max : pk::head_reduce::mean;
    c.opt.pool = pk::pool_kind(rep % 3);
    c.opt.pool_kernel = 3;
    run_window_case<pk::bf16>(rng, c);
    if (sh.D == 64 || sh.D == 128) run_window_case<pk::bf16, policy_mma_sync>(rng, c);
    ++rep;
  }
}

TEST_CASE("window scorer, paged K: f16 and fp32; all layers in one call") {
  auto rng = make_rng(402);
  for (int rep = 0; rep < 4; ++rep) {
    window_cfg c;
    c.G = int64_t(1) << (rep % 4);
    c.D = rep % 2 ? 128 : 64;
    c.w = 1 + int64_t(rng() % 70);
    c.cap = c.w + int64_t(rng() % 300);
    c.Hk = 2;
    c.B = 2;
    c.page_size = rep % 2 ? 16 : 2;
    c.hnd = rep & 2;
    c.caller_lse = rep % 2 == 0;
    c.per_head = rep % 3 == 0;
    run_window_case<pk::f16>(rng, c);
    c.D = 20 + rep;
    c.w = 1 + int64_t(rng() % 30);
    c.cap = c.w + int64_t(rng() % 100);
    run_window_case<float>(rng, c);
  }
  for (int rep = 0; rep < 3; ++rep) {
    window_cfg c;  // all layers of a grid through one call, paged
    c.layers = 1 + int64_t(rng() % 5);
    c.G = 4;
    c.D = 128;
    c.w = 16 + int64_t(rng() % 60);
    c.cap = c.w + (quick_mode() ? 100 : 700) + int64_t(rng() % 200);
    c.Hk = 2;
    c.B = 2;
    c.page_size = 16;
    c.hnd = rep == 1;
    c.caller_lse = rep != 2;
    c.per_head = rep == 0;
    c.seq_major = rep == 2;
    run_window_case<pk::bf16>(rng, c);
  }
}

TEST_CASE("window scorer, paged K: a page id outside the pool is flagged (status_bad_page), nothing read from it") {
  auto rng = make_rng(403);
  const int64_t B = 2, Hk = 2, G = 4, D = 128, w = 16, cap = 320, ps = 16;
  const auto qf = to_storage<pk::bf16>(random_vector<float>(rng, size_t(B * Hk * G * w * D)));
  const auto kf = to_storage<pk::bf16>(random_vector<float>(rng, size_t(B * Hk * cap * D)));
  const auto hk = pk::make_kv_view_bhsd<const pk::bf16>(kf.data(), B, Hk, cap, D);
  auto pc = make_paged_copy<pk::bf16>(rng, B, Hk, cap, D, ps, false,
                                      [&](int64_t b, int64_t h, int64_t t, int64_t d) { return hk(b, h, t, d); },
                                      pk::bf16::from_float(NAN));
  device_buffer<pk::bf16> dq(qf), dpool(pc.pool);
  std::vector<float> lse_h(size_t(B * Hk * G * w), 6.0f);
  device_buffer<float> dlse(lse_h), out(size_t(B * cap));
  device_buffer<unsigned> status(1);
  const auto q = pk::make_kv_view_bhsd<const pk::bf16>(dq.get(), B, Hk * G, w, D);
  const pk::segment_grid grid{1, B, 1};
  const auto rows = pk::make_uniform_segments(B, cap);
  for (int which = 0; which < 3; ++which)
    for (bool lse : {false, true}) {
      auto table = pc.table;
      // 0: the first block of sequence 1; 1: a middle block of sequence 0 (-1); 2: the block holding the window
      if (which == 0) table[size_t(1 * pc.max_blocks + 0)] = int32_t(pc.num_pages);
      if (which == 1) table[size_t(0 * pc.max_blocks + 7)] = -1;
      if (which == 2) table[size_t(1 * pc.max_blocks + pc.max_blocks - 1)] = int32_t(pc.num_pages + 1000);
      device_buffer<int32_t> dtable(table);
      const auto k = pc.view(dpool.get(), dtable.get());
      const pk::lse_view l = lse ? pk::lse_view{dlse.get(), Hk * G * w, w, 1} : pk::lse_view{};
      run_three_ways(
          [&](void* t, size_t& bytes, cudaStream_t s) {
            return pk::window_attention(t, bytes, q, k, l, {}, grid, 0, rows, out.get(), status.get(), s);
          },
          [&] { PKV_CUDA_CHECK(cudaMemset(status.get(), 0, sizeof(unsigned))); },
          [&](const char* mode) {
            INFO("mode ", mode, " case ", which, " lse ", lse);
            unsigned bits = 0;
            CHECK(pk::read_status(status.get(), bits) == cudaErrorInvalidValue);
            CHECK(pk::last_error().why == pk::reason::out_of_range);
            CHECK((bits & pk::status_bad_page) != 0u);
            CHECK((bits & pk::status_nonfinite) == 0u);  // the zero-filled key is finite; the NaN pages are not read
          });
    }
}
