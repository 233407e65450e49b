// Window scorer, f16 (tensor cores) and fp32 / odd head dims (CUDA-core path), plus device-side argument
// validation (rejected before any write).
#include "score_test_util.cuh"

using namespace score_test;

TEST_CASE("window scorer f16 and fp32: GPU == host twin") {
  auto rng = make_rng(201);
  int rep = 0;
  for (int64_t G : {1, 2, 4, 8}) {
    window_cfg c;
    c.G = G;
    c.D = rep % 2 ? 128 : 64;
    c.w = 1 + int64_t(rng() % 128);
    c.cap = c.w + int64_t(rng() % 150);
    c.Hk = 1 + int64_t(rng() % 2);
    c.B = 1 + int64_t(rng() % 2);
    c.strided = rep % 2 == 0;
    c.caller_lse = rep == 2;
    c.opt.group = rep % 2 ? pk::head_reduce::max : pk::head_reduce::mean;
    c.opt.pool = pk::pool_kind(rep % 3);
    c.opt.pool_kernel = 5;
    c.opt.scale = rep == 3 ? 0.1f : 0.0f;
    run_window_case<pk::f16>(rng, c);
    c.w = 1 + int64_t(rng() % 64);
    c.cap = c.w + int64_t(rng() % 100);
    c.per_head = rep % 2 == 1;
    run_window_case<float>(rng, c);
    ++rep;
  }
  window_cfg odd;  // head_dim not a multiple of 16: CUDA-core path for 16-bit inputs, scalar loads
  odd.D = 40;
  odd.G = 2;
  odd.w = 9;
  odd.cap = 133;
  run_window_case<pk::bf16>(rng, odd);
  odd.D = 20;
  odd.strided = true;
  run_window_case<float>(rng, odd);
}

TEST_CASE("window scorer f16: mma accumulate kernel at Llama-like shapes") {
  auto rng = make_rng(202);
  for (int rep = 0; rep < 3; ++rep) {
    window_cfg c;
    c.G = rep == 2 ? 8 : 4;
    c.D = rep == 1 ? 64 : 128;
    c.w = rep == 0 ? 64 : 1 + int64_t(rng() % 128);
    c.Hk = 2;
    c.B = 2;
    c.cap = c.w + (quick_mode() ? 300 : 2000) + int64_t(rng() % 500);
    c.caller_lse = rep != 1;
    c.strided = rep == 2;
    c.opt.group = rep == 1 ? pk::head_reduce::max : pk::head_reduce::mean;
    run_window_case<pk::f16>(rng, c);
  }
}

TEST_CASE("window scorer (device) rejects bad arguments before writing") {
  const int64_t D = 64;
  device_buffer<pk::bf16> dq(size_t(2 * 8 * 4 * D + 8)), dk(size_t(2 * 2 * 32 * D));
  device_buffer<float> out(64);
  out.poison();
  auto q = pk::make_kv_view_bhsd<const pk::bf16>(dq.get(), 2, 8, 4, D);
  auto k = pk::make_kv_view_bhsd<const pk::bf16>(dk.get(), 2, 2, 32, D);
  const pk::segment_grid grid{1, 2, 1};
  const auto rows = pk::make_uniform_segments(2, 32);
  size_t bytes = 0;
  auto expect = [&](cudaError_t e, pk::reason r) {
    CHECK(e == cudaErrorInvalidValue);
    CHECK(pk::last_error().why == r);
  };
  expect(pk::window_attention(nullptr, bytes, pk::make_kv_view_bhsd<const pk::bf16>(dq.get(), 2, 5, 4, D), k, {}, {}, grid,
                              0, rows, out.get()),
         pk::reason::shape_mismatch);
  expect(pk::window_attention(nullptr, bytes, pk::make_kv_view_bhsd<const pk::bf16>(dq.get(), 2, 8, 4, 32), k, {}, {}, grid,
                              0, rows, out.get()),
         pk::reason::shape_mismatch);
  expect(pk::window_attention(nullptr, bytes, pk::make_kv_view_bhsd<const pk::bf16>(dq.get(), 2, 8, 33, D / 2),
                              pk::make_kv_view_bhsd<const pk::bf16>(dk.get(), 2, 2, 32, D / 2), {}, {}, grid, 0, rows, out.get()),
         pk::reason::bad_parameter);
  expect(pk::window_attention(nullptr, bytes,
                              pk::make_kv_view_bhsd<const pk::bf16>(
                                  reinterpret_cast<const pk::bf16*>(reinterpret_cast<const char*>(dq.get()) + 1), 2, 8, 4, D),
                              k, {}, {}, grid, 0, rows, out.get()),
         pk::reason::misaligned);
  pk::window_options o;
  o.pool = pk::pool_kind::max;
  o.pool_kernel = 2;
  expect(pk::window_attention(nullptr, bytes, q, k, {}, o, grid, 0, rows, out.get()), pk::reason::bad_parameter);
  expect(pk::window_attention(nullptr, bytes, q, k, {}, {}, grid, 0, pk::make_uniform_segments(2, 2), out.get()),
         pk::reason::bad_parameter);  // window (4) > row length (2)
  expect(pk::window_attention(nullptr, bytes, q, k, {}, {}, grid, 0, rows, nullptr), pk::reason::null_pointer);
  // a real call with a workspace that is too small is rejected too, and nothing is written
  device_buffer<unsigned char> tiny(256);
  bytes = 256;
  expect(pk::window_attention(tiny.get(), bytes, q, k, {}, {}, grid, 0, rows, out.get()), pk::reason::workspace_too_small);
  PKV_CUDA_CHECK(cudaDeviceSynchronize());
  const float kPoison = poison_value<float>();
  for (float x : out.download()) CHECK(std::memcmp(&x, &kPoison, 4) == 0);
}
