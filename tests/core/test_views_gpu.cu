// Device reads through every view kind must match host reads of the same views.
#include <doctest/doctest.h>

#include <prefixkv/prefixkv.cuh>

#include "support/gpu_harness.cuh"
#include "support/test_random.hpp"

#include <algorithm>
#include <thread>
#include <vector>

using namespace prefixkv_test;

namespace {

// out[(b, h, t, d) packed] = view(b, h, t, d)
template <class View>
__global__ void read_view(View v, int64_t B, int64_t H, int64_t S, int64_t D, float* out) {
  const int64_t n = B * H * S * D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = i % D, t = (i / D) % S, h = (i / (D * S)) % H, b = i / (D * S * H);
    out[i] = static_cast<float>(v(b, h, t, d));
  }
}

template <class View>
std::vector<float> host_read(const View& v, int64_t B, int64_t H, int64_t S, int64_t D) {
  std::vector<float> out(B * H * S * D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < S; ++t)
        for (int64_t d = 0; d < D; ++d) out[((b * H + h) * S + t) * D + d] = static_cast<float>(v(b, h, t, d));
  return out;
}

// A CUB-style wrapper, so the three-way harness (size query, plain, graph capture) is exercised too.
template <class View>
cudaError_t read_entry(void* d_temp, size_t& temp_bytes, View v, int64_t B, int64_t H, int64_t S, int64_t D,
                       float* out, cudaStream_t stream) {
  if (d_temp == nullptr) {
    temp_bytes = 256;
    return cudaSuccess;
  }
  read_view<<<7, 96, 0, stream>>>(v, B, H, S, D, out);
  return prefixkv::detail::check_launch(stream);
}

template <class View>
void compare(View dev_view, View host_view, int64_t B, int64_t H, int64_t S, int64_t D) {
  const auto expect = host_read(host_view, B, H, S, D);
  device_buffer<float> out(expect.size());
  run_three_ways(
      [&](void* t, size_t& bytes, cudaStream_t s) { return read_entry(t, bytes, dev_view, B, H, S, D, out.get(), s); },
      [&] { out.poison(); },
      [&](const char* mode) {
        INFO("mode ", mode);
        CHECK(out.download() == expect);
      });
}

}  // namespace

TEST_CASE("strided views read the same on device and host") {
  auto rng = make_rng(1);
  for (int rep = 0; rep < 3; ++rep) {
    const int64_t B = 1 + rng() % 3, H = 1 + rng() % 5, S = 1 + rng() % 37, D = 1 + rng() % 33;
    const int64_t pad = rng() % 5;
    // Non-contiguous: padded tokens, [B, S, H, D] order and a strided dim.
    const int64_t sd = 1 + rng() % 2;
    const int64_t sh = D * sd, st = H * sh + pad, sb = S * st + pad;
    std::vector<float> h = random_vector<float>(rng, sb * B + 8);
    device_buffer<float> d(h);
    auto hv = prefixkv::make_kv_view(h.data(), B, H, S, D, sb, sh, st, sd);
    auto dv = prefixkv::make_kv_view(d.get(), B, H, S, D, sb, sh, st, sd);
    REQUIRE(prefixkv::validate(hv) == cudaSuccess);
    compare(dv.as_const(), hv.as_const(), B, H, S, D);
  }
}

TEST_CASE("paged views (NHD and HND) read the same on device and host") {
  auto rng = make_rng(2);
  for (auto layout : {prefixkv::page_layout::nhd, prefixkv::page_layout::hnd}) {
    const int64_t B = 3, H = 1 + rng() % 4, D = 1 + rng() % 20, ps = 1 + rng() % 16, blocks = 4;
    const int64_t pages = B * blocks + 3;
    std::vector<int32_t> table(B * blocks);
    std::vector<int32_t> perm(pages);
    for (int64_t i = 0; i < pages; ++i) perm[i] = int32_t(i);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (size_t i = 0; i < table.size(); ++i) table[i] = perm[i];
    std::vector<float> pool = random_vector<float>(rng, pages * ps * H * D);
    device_buffer<float> dpool(pool);
    device_buffer<int32_t> dtable(table);
    auto hv = prefixkv::make_paged_kv_view(pool.data(), layout, pages, ps, H, D, table.data(), B, blocks);
    auto dv = prefixkv::make_paged_kv_view(dpool.get(), layout, pages, ps, H, D, dtable.get(), B, blocks);
    REQUIRE(prefixkv::validate(hv) == cudaSuccess);
    compare(dv, hv, B, H, blocks * ps, D);
  }
}

namespace {
__global__ void read_segments(prefixkv::segments s, const float* flat, float* out, int64_t width) {
  const int64_t seg = blockIdx.x;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x)
    out[seg * width + i] = i < s.length(seg) ? flat[s.begin(seg) + i] : -1.f;
}
}  // namespace

TEST_CASE("segments read the same on device and host (cu_seqlens and ragged forms)") {
  auto rng = make_rng(3);
  const int64_t count = 1 + rng() % 40, width = 70;
  std::vector<int64_t> cu(count + 1, 0);
  for (int64_t i = 0; i < count; ++i) cu[i + 1] = cu[i] + int64_t(rng() % width);
  std::vector<float> flat = random_vector<float>(rng, cu.back() + 1);
  device_buffer<float> dflat(flat);
  device_buffer<int64_t> dcu(cu);
  device_buffer<float> out(count * width);
  out.poison();
  read_segments<<<unsigned(count), 64>>>(prefixkv::make_offset_segments(count, dcu.get()), dflat.get(), out.get(), width);
  PKV_CUDA_CHECK(cudaDeviceSynchronize());
  const auto got = out.download();
  const auto hs = prefixkv::make_offset_segments(count, cu.data());
  for (int64_t s = 0; s < count; ++s)
    for (int64_t i = 0; i < width; ++i)
      CHECK(got[s * width + i] == (i < hs.length(s) ? flat[hs.begin(s) + i] : -1.f));
}

TEST_CASE("sm_count: the device's multiprocessor count, cached per device, the same from every thread") {
  int dev = 0, want = 0;
  PKV_CUDA_CHECK(cudaGetDevice(&dev));
  PKV_CUDA_CHECK(cudaDeviceGetAttribute(&want, cudaDevAttrMultiProcessorCount, dev));
  int n = -1;
  CHECK(prefixkv::detail::sm_count(n) == cudaSuccess);
  CHECK(n == want);
  CHECK(prefixkv::detail::sm_count() == want);
  // concurrent first calls on other threads (the cache is per device, lock-free)
  std::vector<int> got(8, -1);
  std::vector<std::thread> th;
  for (size_t i = 0; i < got.size(); ++i)
    th.emplace_back([&got, i] {
      int v = -1;
      if (cudaSetDevice(0) == cudaSuccess && prefixkv::detail::sm_count(v) == cudaSuccess) got[i] = v;
    });
  for (auto& t : th) t.join();
  int dev0 = 0;
  PKV_CUDA_CHECK(cudaDeviceGetAttribute(&dev0, cudaDevAttrMultiProcessorCount, 0));
  for (int v : got) CHECK(v == dev0);
}
