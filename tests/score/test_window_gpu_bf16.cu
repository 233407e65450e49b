// Window scorer, bf16 inputs (tensor-core path): GPU == host twin over GQA group sizes 1/2/4/8, head_dim
// 64/128/256, windows 1..128, ragged batches, per-kv-head rows of unequal length, sequence-major grids, strided Q/K,
// both head reductions, pooling, and with a caller LSE (which must give the same result as the in-kernel softmax);
// every accumulate kernel (wgmma with 4/2/1 K stages where built, mma.sync, the WMMA fallback).
#include "score_test_util.cuh"

using namespace score_test;

TEST_CASE("window scorer bf16: GPU == host twin across GQA groups, head dims and windows") {
  auto rng = make_rng(101);
  const int64_t dims[] = {64, 128, 256};
  const int64_t windows[] = {1, 16, 37, 64, 100, 128};
  int rep = 0;
  for (int64_t G : {1, 2, 4, 8})
    for (int64_t D : dims) {
      window_cfg c;
      c.G = G;
      c.D = D;
      c.w = windows[(rep * 5 + G) % 6];
      c.Hk = 1 + int64_t(rng() % 2);
      c.B = 1 + int64_t(rng() % 2);
      c.cap = c.w + 1 + int64_t(rng() % 200);
      c.strided = rep % 3 == 1;
      c.per_head = rep % 4 == 2 || rep % 4 == 3;
      c.seq_major = rep % 5 == 3;
      c.caller_lse = rep % 3 == 2;
      c.opt.group = rep % 2 ? pk::head_reduce::max : pk::head_reduce::mean;
      c.opt.heads = rep % 5 == 1 ? pk::head_reduce::max : pk::head_reduce::mean;
      c.opt.pool = pk::pool_kind(rep % 3);
      c.opt.pool_kernel = 1 + 2 * (rep % 4);
      run_window_case<pk::bf16>(rng, c);
      ++rep;
    }
}

TEST_CASE("window scorer bf16: caller LSE == in-kernel softmax; long rows over many tiles; size-1 rows") {
  auto rng = make_rng(102);
  for (bool lse : {false, true}) {
    window_cfg c;  // Llama-like group, many tiles per CTA
    c.Hk = 1;
    c.G = 4;
    c.D = 128;
    c.w = 8;
    c.cap = (quick_mode() ? 3000 : 40000) + int64_t(rng() % 1000);  // quick: still dozens of tiles
    c.caller_lse = lse;
    run_window_case<pk::bf16>(rng, c);
  }
  window_cfg one;  // one token, window 1
  one.w = 1;
  one.cap = 1;
  one.D = 64;
  one.B = 3;
  run_window_case<pk::bf16>(rng, one);
  one.caller_lse = true;
  one.per_head = true;
  one.Hk = 2;
  run_window_case<pk::bf16>(rng, one);
  window_cfg big;  // G = 8, w = 128, D = 256: several head chunks per kv head (combined in chunk order), both group modes
  big.G = 8;
  big.D = 256;
  big.w = 128;
  big.cap = 300;
  for (auto g : {pk::head_reduce::mean, pk::head_reduce::max}) {
    big.opt.group = g;
    run_window_case<pk::bf16>(rng, big);
  }
}

// D 64/128 with 16-byte K rows take a tensor-core accumulate kernel (wgmma in PREFIXKV_SM90A builds on a
// compute capability 9.0 device, else mma.sync); these shapes reach its plan variants: whole group with several K
// stages (G 4, w 64), whole group with fewer stages (G 8, w 64, D 128), head chunks combined by the finalize kernel
// (G 8, w 128, D 128), padded query steps (w 33, w 100), many key splits with ragged rows (per kv head too) whose
// causal tail straddles a split.
template <class Policy>
static void run_accumulate_shapes(std::mt19937_64& rng) {
  struct shape {
    int64_t G, D, w;
  };
  const shape shapes[] = {{4, 128, 64}, {8, 128, 64}, {8, 128, 128}, {4, 64, 64}, {2, 128, 33}, {8, 64, 100}};
  int rep = 0;
  for (const auto& sh : shapes) {
    window_cfg c;
    c.G = sh.G;
    c.D = sh.D;
    c.w = sh.w;
    c.Hk = 1 + int64_t(rng() % 2);
    c.B = 1 + int64_t(rng() % 2);
    c.cap = sh.w + (quick_mode() ? 300 : 2500) + int64_t(rng() % 700);
    c.strided = rep % 2 == 1;
    c.caller_lse = rep % 3 != 1;
    c.per_head = rep % 3 == 2;
    c.seq_major = rep % 2 == 0;
    c.opt.group = rep % 2 ? pk::head_reduce::max : pk::head_reduce::mean;
    c.opt.heads = rep % 4 == 1 ? pk::head_reduce::max : pk::head_reduce::mean;
    c.opt.pool = pk::pool_kind(rep % 3);
    c.opt.pool_kernel = 3;
    run_window_case<pk::bf16, Policy>(rng, c);
    ++rep;
  }
}

TEST_CASE("window scorer bf16: tensor-core accumulate kernel shapes (default kernel)") {
  auto rng = make_rng(105);
  run_accumulate_shapes<pk::detail::window_policy>(rng);
}

TEST_CASE("window scorer bf16: accumulate kernel selection and the other kernel configurations") {
  int dev = 0, major = 0, minor = 0;
  PKV_CUDA_CHECK(cudaGetDevice(&dev));
  PKV_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  PKV_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  pk::bf16* none = nullptr;
  auto q = pk::make_kv_view_bhsd<const pk::bf16>(none, 1, 32, 64, 128);
  auto k = pk::make_kv_view_bhsd<const pk::bf16>(none, 1, 8, 131072, 128);
  const auto shape = pk::detail::make_window_shape(&q, &k, 1);
  pk::detail::window_mma_plan pl;
  REQUIRE((pk::detail::plan_window_accumulate<pk::detail::window_policy, pk::bf16, false>(shape, pl)) == cudaSuccess);
  CHECK(pl.use);
#if defined(PREFIXKV_SM90A)
  const bool wgmma = major == 9 && minor == 0;
#else
  const bool wgmma = false;
#endif
  CHECK((pl.NJ == 0) == wgmma);  // the Llama-3-8B layer takes wgmma exactly when built for and run on sm_90a
  MESSAGE("accumulate kernel: ", std::string(pl.NJ == 0 ? "wgmma" : "mma.sync"), ", ", pl.warps, " warps, ", pl.stages,
          " stages, ", pl.splits, " splits");
  auto rng = make_rng(106);
  REQUIRE((pk::detail::plan_window_accumulate<policy_mma_sync, pk::bf16, false>(shape, pl)) == cudaSuccess);
  CHECK((pl.use && pl.NJ != 0));  // the mma.sync kernel
  run_accumulate_shapes<policy_mma_sync>(rng);
  if (wgmma) {
    REQUIRE((pk::detail::plan_window_accumulate<policy_wgmma_2stages, pk::bf16, false>(shape, pl)) == cudaSuccess);
    CHECK((pl.use && pl.NJ == 0 && pl.stages <= 2));
    run_accumulate_shapes<policy_wgmma_2stages>(rng);  // two K stages per warp (default: as many as fit, <= 4)
    REQUIRE((pk::detail::plan_window_accumulate<policy_wgmma_1stage, pk::bf16, false>(shape, pl)) == cudaSuccess);
    CHECK((pl.use && pl.NJ == 0 && pl.stages == 1));
    run_accumulate_shapes<policy_wgmma_1stage>(rng);  // one K stage per warp
  }
}

TEST_CASE("window scorer: NaN/Inf inputs raise the device status flag; read_status reports it") {
  auto rng = make_rng(103);
  const int64_t B = 2, Hk = 2, G = 2, D = 64, w = 8, cap = 150;
  auto qh = to_storage<pk::bf16>(random_vector<float>(rng, size_t(B * Hk * G * w * D)));
  auto kh = to_storage<pk::bf16>(random_vector<float>(rng, size_t(B * Hk * cap * D)));
  for (int which = 0; which < 6; ++which) {  // 4, 5: caller LSE, so only the accumulate (mma) kernel reads K
    auto q2 = qh;
    auto k2 = kh;
    std::vector<float> lse_h(size_t(B * Hk * G * w), 3.0f);
    if (which == 0) k2[size_t(((1 * Hk + 1) * cap + 140) * D + 5)] = pk::bf16::from_float(NAN);
    if (which == 1) q2[size_t(7)] = pk::bf16::from_float(INFINITY);
    if (which == 2) k2[size_t(3 * D)] = pk::bf16::from_float(-INFINITY);
    if (which == 3) lse_h[5] = NAN;
    if (which == 4) k2[size_t(((1 * Hk + 0) * cap + 77) * D + 63)] = pk::bf16::from_float(-INFINITY);
    if (which == 5) k2[size_t(((0 * Hk + 1) * cap + 149) * D + 17)] = pk::bf16::from_float(NAN);
    device_buffer<pk::bf16> dq(q2), dk(k2);
    device_buffer<float> dl(lse_h), out(size_t(B * cap));
    device_buffer<unsigned> status(1);
    auto q = pk::make_kv_view_bhsd<const pk::bf16>(dq.get(), B, Hk * G, w, D);
    auto k = pk::make_kv_view_bhsd<const pk::bf16>(dk.get(), B, Hk, cap, D);
    const pk::lse_view lse = which >= 3 ? pk::lse_view{dl.get(), Hk * G * w, w, 1} : pk::lse_view{};
    run_three_ways(
        [&](void* t, size_t& bytes, cudaStream_t s) {
          return pk::window_attention(t, bytes, q, k, lse, {}, pk::segment_grid{1, B, 1}, 0,
                                      pk::make_uniform_segments(B, cap), out.get(), status.get(), s);
        },
        [&] { PKV_CUDA_CHECK(cudaMemset(status.get(), 0, sizeof(unsigned))); },
        [&](const char* mode) {
          INFO("mode ", mode, " case ", which);
          unsigned bits = 0;
          CHECK(pk::read_status(status.get(), bits) == cudaErrorInvalidValue);
          CHECK(pk::last_error().why == pk::reason::nonfinite_input);
          CHECK((bits & pk::status_nonfinite) != 0u);
        });
  }
}

// A non-finite K element whose products with every query of the group are -inf (or NaN) instead of +inf: each
// probability of that key is 0 (or NaN), so a detector that only looked for non-finite sums would miss the -inf
// case. Runs every accumulate kernel (wgmma where available, mma.sync) over whole-group, head-chunk and 128-row
// blocks, both group reductions, keys in the first, a middle and the causal tile.
template <class Policy>
static void run_hidden_nonfinite_cases(std::mt19937_64& rng) {
  struct shape {
    int64_t G, D, w;
  };
  const shape shapes[] = {{4, 128, 64}, {8, 64, 128}, {2, 64, 8}};
  const int64_t B = 2, Hk = 2, cap = 300, d = 37;
  for (const auto& sh : shapes) {
    const int64_t Hq = Hk * sh.G;
    auto qf = random_vector<float>(rng, size_t(B * Hq * sh.w * sh.D));
    auto kf = random_vector<float>(rng, size_t(B * Hk * cap * sh.D));
    std::vector<float> lse_h(size_t(B * Hq * sh.w), 3.0f);
    device_buffer<float> dl(lse_h), out(size_t(B * cap));
    device_buffer<unsigned> status(1);
    const pk::lse_view lse{dl.get(), Hq * sh.w, sh.w, 1};
    // case: 0 control (finite K, the same Q), 1 K = -inf with q_d > 0, 2 K = +inf with q_d < 0 (both: every
    // product -inf), 3 K = +inf with q_d = 0 (NaN products), 4 K = NaN
    for (int which = 0; which < 5; ++which)
      for (int64_t key : {int64_t(0), int64_t(131), cap - 1})
        for (auto g : {pk::head_reduce::mean, pk::head_reduce::max}) {
          if (which == 0 && key != 0) continue;
          const int64_t b = 1, kh = 1;
          auto q2 = qf;
          auto k2 = kf;
          const float qd = which == 1 ? 0.5f : (which == 2 ? -0.5f : 0.0f);
          for (int64_t h = kh * sh.G; h < (kh + 1) * sh.G; ++h)
            for (int64_t i = 0; i < sh.w; ++i) q2[size_t(((b * Hq + h) * sh.w + i) * sh.D + d)] = qd;
          const float kv[] = {1.0f, -INFINITY, INFINITY, INFINITY, NAN};
          k2[size_t(((b * Hk + kh) * cap + key) * sh.D + d)] = kv[which];
          device_buffer<pk::bf16> dq(to_storage<pk::bf16>(q2)), dk(to_storage<pk::bf16>(k2));
          auto q = pk::make_kv_view_bhsd<const pk::bf16>(dq.get(), B, Hq, sh.w, sh.D);
          auto k = pk::make_kv_view_bhsd<const pk::bf16>(dk.get(), B, Hk, cap, sh.D);
          pk::window_options opt;
          opt.group = g;
          run_three_ways(
              [&](void* t, size_t& bytes, cudaStream_t s) {
                return call_window<Policy>(t, bytes, &q, &k, &lse, opt, pk::segment_grid{1, B, 1}, 0, 0,
                                           pk::make_uniform_segments(B, cap), out.get(), status.get(), s);
              },
              [&] { PKV_CUDA_CHECK(cudaMemset(status.get(), 0, sizeof(unsigned))); },
              [&](const char* mode) {
                INFO("mode ", mode, " G ", sh.G, " D ", sh.D, " w ", sh.w, " case ", which, " key ", key,
                     " max ", int(g == pk::head_reduce::max));
                const unsigned bits = status.download()[0];
                if (which == 0)
                  CHECK(bits == 0u);
                else
                  CHECK((bits & pk::status_nonfinite) != 0u);
              });
        }
  }
}

TEST_CASE("window scorer: NaN/Inf keys whose products are all -inf or NaN are flagged by every accumulate kernel") {
  auto rng = make_rng(107);
  run_hidden_nonfinite_cases<pk::detail::window_policy>(rng);  // default kernel
  run_hidden_nonfinite_cases<policy_mma_sync>(rng);
  run_hidden_nonfinite_cases<policy_wgmma_1stage>(rng);  // wgmma with one K stage (where the build has it)
}

TEST_CASE("window scorer: device row lengths outside [window, capacity] are flagged and zero-filled") {
  auto rng = make_rng(104);
  const int64_t D = 64, w = 4, cap = 100;
  auto qh = to_storage<pk::bf16>(random_vector<float>(rng, size_t(2 * 2 * w * D)));
  auto kh = to_storage<pk::bf16>(random_vector<float>(rng, size_t(2 * 1 * cap * D)));
  device_buffer<pk::bf16> dq(qh), dk(kh);
  std::vector<int64_t> cu = {0, 3, 3 + cap};  // sequence 0 shorter than the window; sequence 1 fine
  device_buffer<int64_t> dcu(cu);
  device_buffer<float> out(size_t(cu.back()));
  device_buffer<unsigned> status(1);
  auto q = pk::make_kv_view_bhsd<const pk::bf16>(dq.get(), 2, 2, w, D);
  auto k = pk::make_kv_view_bhsd<const pk::bf16>(dk.get(), 2, 1, cap, D);
  run_three_ways(
      [&](void* t, size_t& bytes, cudaStream_t s) {
        return pk::window_attention(t, bytes, q, k, {}, {}, pk::segment_grid{1, 2, 1}, 0,
                                    pk::make_offset_segments(2, dcu.get()), out.get(), status.get(), s);
      },
      [&] {
        out.poison();
        PKV_CUDA_CHECK(cudaMemset(status.get(), 0, sizeof(unsigned)));
      },
      [&](const char* mode) {
        INFO("mode ", mode);
        const auto got = out.download();
        CHECK(status.download()[0] == unsigned(pk::status_bad_length));
        for (int i = 0; i < 3; ++i) CHECK(got[i] == 0.0f);
        float sum = 0;
        for (int64_t i = 3; i < cu.back(); ++i) sum += got[i];
        CHECK(std::fabs(sum - float(w)) < 1e-3f);  // each of the w queries' probabilities sum to 1
        unsigned bits = 0;
        CHECK(pk::read_status(status.get(), bits) == cudaErrorInvalidValue);
        CHECK(pk::last_error().why == pk::reason::out_of_range);
      });
}

TEST_CASE("window scorer: per-head rows, one head's device length bad: only that head is flagged and zeroed") {
  auto rng = make_rng(108);
  const int64_t D = 64, w = 4, cap = 100, Hk = 2, G = 2;
  auto qh = to_storage<pk::bf16>(random_vector<float>(rng, size_t(Hk * G * w * D)));
  auto kh = to_storage<pk::bf16>(random_vector<float>(rng, size_t(Hk * cap * D)));
  device_buffer<pk::bf16> dq(qh), dk(kh);
  auto q = pk::make_kv_view_bhsd<const pk::bf16>(dq.get(), 1, Hk * G, w, D);
  auto k = pk::make_kv_view_bhsd<const pk::bf16>(dk.get(), 1, Hk, cap, D);
  const pk::segment_grid grid{1, 1, Hk};
  for (int64_t bad_n : {int64_t(2), cap + 50}) {  // head 1: shorter than the window, or longer than the capacity
    INFO("bad length ", bad_n);
    const std::vector<int64_t> begins = {0, 60}, lens = {57, bad_n};
    device_buffer<int64_t> db(begins), dl(lens);
    device_buffer<float> out(size_t(60 + bad_n + 5));
    device_buffer<unsigned> status(1);
    std::vector<float> expect(60 + 57);
    const std::vector<int64_t> ok_lens = {57, 57};
    REQUIRE(pk::window_attention_host(pk::make_kv_view_bhsd<const pk::bf16>(qh.data(), 1, Hk * G, w, D),
                                      pk::make_kv_view_bhsd<const pk::bf16>(kh.data(), 1, Hk, cap, D), {}, {}, grid, 0,
                                      pk::make_ragged_segments(2, begins.data(), ok_lens.data()), expect.data()) ==
            cudaSuccess);
    run_three_ways(
        [&](void* t, size_t& bytes, cudaStream_t s) {
          return pk::window_attention(t, bytes, q, k, {}, {}, grid, 0, pk::make_ragged_segments(2, db.get(), dl.get()),
                                      out.get(), status.get(), s);
        },
        [&] {
          out.poison();
          PKV_CUDA_CHECK(cudaMemset(status.get(), 0, sizeof(unsigned)));
        },
        [&](const char* mode) {
          INFO("mode ", mode);
          const auto got = out.download();
          CHECK(status.download()[0] == unsigned(pk::status_bad_length));
          for (int64_t t = 0; t < 57; ++t) CHECK(window_close(got[t], expect[t]));  // head 0 as usual
          const float kPoison = poison_value<float>();
          for (int64_t t = 57; t < 60; ++t) CHECK(std::memcmp(&got[t], &kPoison, 4) == 0);
          const int64_t zeros = std::min(bad_n, cap);  // a bad row: zeros over at most the capacity
          for (int64_t t = 0; t < zeros; ++t) CHECK(got[size_t(60 + t)] == 0.0f);
          for (size_t t = size_t(60 + zeros); t < got.size(); ++t) CHECK(std::memcmp(&got[t], &kPoison, 4) == 0);
        });
  }
}
