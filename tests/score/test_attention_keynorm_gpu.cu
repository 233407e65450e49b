// Accumulated attention (bit-identical to the host twin, fp32/f16/bf16, strided P) and key-norm (1e-5 relative)
// on the device.
#include "score_test_util.cuh"

#include <cstring>

using namespace score_test;

namespace {
template <class T>
void attention_case(std::mt19937_64& rng, bool per_head, bool transposed) {
  const int64_t B = 1 + rng() % 3, Hk = 1 + rng() % 3, G = int64_t(1) << (rng() % 4), Hq = Hk * G, Q = 1 + rng() % 17;
  const int64_t cap = 1 + rng() % 300, pad = 5;
  INFO("B ", B, " Hq ", Hq, " Q ", Q, " cap ", cap, " per_head ", per_head, " transposed ", transposed);
  // (B, Q, Hq, cap + pad) storage when transposed, else (B, Hq, Q, cap + pad)
  const auto ph = to_storage<T>(random_vector<float>(rng, size_t(B * Hq * Q * (cap + pad)), 0, 1));
  device_buffer<T> dp(ph);
  auto mk = [&](const T* base) {
    return transposed ? pk::make_kv_view<const T>(base, B, Hq, Q, cap, Q * Hq * (cap + pad), cap + pad, Hq * (cap + pad), 1)
                      : pk::make_kv_view<const T>(base, B, Hq, Q, cap, Hq * Q * (cap + pad), Q * (cap + pad), cap + pad, 1);
  };
  const pk::segment_grid grid{2, B, per_head ? Hk : 1};
  std::vector<int64_t> cu(grid.count() + 1, 0);
  // all heads of one (layer, b) share one length
  std::vector<int64_t> nb(B);
  for (auto& x : nb) x = int64_t(rng() % (cap + 1));
  for (int64_t id = 0; id < grid.count(); ++id) cu[id + 1] = cu[id] + nb[grid.batch_of(id)];
  device_buffer<int64_t> dcu(cu);
  const int64_t layer = 1;
  const float kPoison = poison_value<float>();
  std::vector<float> expect(size_t(cu.back() + 1), kPoison);
  REQUIRE(pk::accumulated_attention_host(mk(ph.data()), grid, layer, pk::make_offset_segments(grid.count(), cu.data()),
                                         expect.data()) == cudaSuccess);
  device_buffer<float> out(expect.size());
  device_buffer<unsigned> status(1);
  run_three_ways(
      [&](void* t, size_t& bytes, cudaStream_t s) {
        return pk::accumulated_attention(t, bytes, mk(dp.get()), grid, layer, pk::make_offset_segments(grid.count(), dcu.get()),
                                         out.get(), status.get(), s);
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

template <class T>
void key_norm_case(std::mt19937_64& rng, bool per_head, bool recip, bool strided) {
  const int64_t B = 1 + rng() % 3, Hk = 1 + rng() % 8, D = rng() % 2 ? 128 : 1 + rng() % 90, cap = 1 + rng() % 500;
  INFO("B ", B, " Hk ", Hk, " D ", D, " cap ", cap);
  const auto kh = to_storage<T>(random_vector<float>(rng, size_t(B * Hk * cap * (D + 3))));
  device_buffer<T> dk(kh);
  auto mk = [&](const T* base) {
    return strided ? pk::make_kv_view<const T>(base, B, Hk, cap, D, cap * Hk * (D + 3), D + 3, Hk * (D + 3), 1)
                   : pk::make_kv_view_bhsd<const T>(base, B, Hk, cap, D);
  };
  const pk::segment_grid grid{1, B, per_head ? Hk : 1};
  const auto rows = pk::make_uniform_segments(grid.count(), cap, cap + 2);
  const float kPoison = poison_value<float>();
  std::vector<float> expect(size_t(grid.count() * (cap + 2)), kPoison);
  REQUIRE(pk::key_norm_host(mk(kh.data()), pk::key_norm_options{recip}, grid, 0, rows, expect.data()) == cudaSuccess);
  device_buffer<float> out(expect.size());
  device_buffer<unsigned> status(1);
  run_three_ways(
      [&](void* t, size_t& bytes, cudaStream_t s) {
        return pk::key_norm(t, bytes, mk(dk.get()), pk::key_norm_options{recip}, grid, 0, rows, out.get(), status.get(), s);
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
      });
}
}  // namespace

TEST_CASE("accumulated attention: GPU bit-identical to the host twin (fp32, f16, bf16; strided P)") {
  auto rng = make_rng(301);
  for (int rep = 0; rep < 4; ++rep) {
    attention_case<float>(rng, rep & 1, rep & 2);
    attention_case<pk::f16>(rng, rep & 2, rep & 1);
    attention_case<pk::bf16>(rng, rep & 1, !(rep & 2));
  }
}

TEST_CASE("key-norm: GPU == host twin") {
  auto rng = make_rng(302);
  for (int rep = 0; rep < 4; ++rep) {
    key_norm_case<pk::bf16>(rng, rep & 1, rep & 2, rep & 1);
    key_norm_case<float>(rng, rep & 2, rep & 1, !(rep & 1));
    key_norm_case<pk::f16>(rng, false, false, rep & 2);
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
