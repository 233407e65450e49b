// Window scorer: all layers in one call (window_attention_layers) == host twin over 1-4 layers, per-head rows of
// unequal length, sequence-major grids; and bitwise reproducibility of every kernel path (wgmma, mma.sync, WMMA and
// fp32 fallbacks; caller LSE or in-kernel softmax; head groups split over several CTAs) over repeated runs.
#include "score_test_util.cuh"

using namespace score_test;

TEST_CASE("window scorer: all layers in one call == host twin (bf16, f16, fp32)") {
  auto rng = make_rng(501);
  for (int rep = 0; rep < 6; ++rep) {
    window_cfg c;
    c.layers = 1 + int64_t(rng() % 4);
    c.G = int64_t(1) << (rep % 4);
    c.D = rep % 3 == 2 ? 64 : 128;
    c.w = 1 + int64_t(rng() % 100);
    c.cap = c.w + (quick_mode() ? 100 : 300) + int64_t(rng() % 200);
    c.Hk = 1 + int64_t(rng() % 2);
    c.B = 1 + int64_t(rng() % 2);
    c.strided = rep % 3 == 1;
    c.caller_lse = rep % 2 == 0;
    c.per_head = rep % 3 != 0;
    c.seq_major = rep % 2 == 1;
    c.opt.group = rep % 4 == 1 ? pk::head_reduce::max : pk::head_reduce::mean;
    c.opt.heads = rep % 5 == 2 ? pk::head_reduce::max : pk::head_reduce::mean;
    c.opt.pool = pk::pool_kind(rep % 3);
    c.opt.pool_kernel = 5;
    run_window_case<pk::bf16>(rng, c);
    if (rep % 2 == 0) run_window_case<pk::bf16, policy_mma_sync>(rng, c);
    c.w = 1 + int64_t(rng() % 40);
    c.cap = c.w + int64_t(rng() % 200);
    run_window_case<pk::f16>(rng, c);
    c.D = 24;
    run_window_case<float>(rng, c);
  }
}

// Head groups split over several CTAs (head chunks >= 3, so a floating-point combination in arrival order would
// show), many key splits, both group reductions, with and without a caller LSE, one layer and three layers.
template <class T, class Policy>
static void repeat_case(std::mt19937_64& rng, int64_t G, int64_t D, int64_t w, int64_t layers) {
  for (bool lse : {false, true})
    for (auto g : {pk::head_reduce::mean, pk::head_reduce::max}) {
      window_cfg c;
      c.G = G;
      c.D = D;
      c.w = w;
      c.Hk = 1;
      c.B = 2;
      c.cap = w + (quick_mode() ? 150 : 350) + int64_t(rng() % 100);
      c.caller_lse = lse;
      c.layers = layers;
      c.per_head = layers > 0;
      c.opt.group = g;
      c.repeats = 3;
      run_window_case<T, Policy>(rng, c);
    }
}

TEST_CASE("window scorer: the same input on the same device gives the same bits, on every kernel path") {
  auto rng = make_rng(502);
  // G 16, w 128, D 128: wgmma (8 head chunks) or mma.sync (4 head chunks)
  repeat_case<pk::bf16, pk::detail::window_policy>(rng, 16, 128, 128, 0);
  repeat_case<pk::bf16, policy_mma_sync>(rng, 16, 128, 128, 0);
  repeat_case<pk::bf16, policy_wgmma_1stage>(rng, 16, 64, 64, 3);
  repeat_case<pk::f16, pk::detail::window_policy>(rng, 4, 64, 64, 3);
  // D 256: the WMMA fallback (8 head chunks for G 8, w 128); fp32: the CUDA-core fallback (3 head chunks)
  repeat_case<pk::bf16, pk::detail::window_policy>(rng, 8, 256, 128, 0);
  repeat_case<float, pk::detail::window_policy>(rng, 8, 64, 128, 0);
}
