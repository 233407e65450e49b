// Decode GPU tests, amortised policy: the chain (budgets -> curves -> solve -> selection -> in-place compaction of
// the cache and of the running scores) equals the host backend byte for byte, with and without rebalancing, for
// layer and kv-head segments, in every layout; the two captured graphs (ordinary and compressing step) replayed
// by the host schedule follow the host backend.
#include <doctest/doctest.h>

#include "decode_gpu_util.cuh"

using namespace decode_gpu_test;

namespace {

compact_test::geometry geo(int64_t L, int64_t B, int64_t H, int64_t T, int64_t D, int scales = 0) {
  compact_test::geometry g;
  g.L = L;
  g.B = B;
  g.H = H;
  g.T = T;
  g.D = D;
  g.scales = scales;
  return g;
}

// Amortised compressions in layout compact_test::all_layouts[layout_index] (1-based li below picks the racecheck
// variant): no slack; slack with rebalancing; slack with kv-head segments.
void check_amortised(int layout_index) {
  auto rng = make_rng(301 + uint64_t(layout_index));
  const int li = layout_index + 1;
  const layout l = compact_test::all_layouts[layout_index];
  for (int variant = 0; variant < 3; ++variant) {
    if (prefixkv_test::tiny_mode() && variant != li % 3) continue;  // racecheck: each variant, layouts across them
    CAPTURE(compact_test::name(l));
    CAPTURE(variant);
    pk::decode_config cfg;
    cfg.policy = pk::decode_policy::amortised;
    cfg.slack = variant == 0 ? 0 : 4;
    cfg.rebalance = variant == 1;
    cfg.horizon = variant == 1 ? 100 : 0;  // sequences past the horizon: rebalanced fractions over the horizon
    cfg.gran = variant == 2 ? pk::granularity::head : pk::granularity::layer;
    cfg.protect = {2, variant == 2 ? 0 : 3};
    gpu_case<pk::bf16, pk::bf16> c(l, geo(3, variant == 2 ? 1 : 2, 2, 140, 64, variant == 2 ? 2 : 1), cfg, rng);
    c.init(rng, 25, 55);
    for (int i = 0, n = prefixkv_test::rounds(24, 24, 7); i < n; ++i) {
      c.randomise(rng, i % 4 == 1, i % 9 == 4);
      c.set_active(rng, i % 2 == 0);
      const auto ob = i % 5 == 3 ? pk::decode_observe::add_scores : pk::decode_observe::attention;
      c.step(ob, pk::decode_when::automatic, 1, true, i < 2 || i % 6 == 5, (std::string("step ") + std::to_string(i)).c_str());
    }
  }
}

}  // namespace

static_assert(sizeof(compact_test::all_layouts) / sizeof(layout) == 5, "one test case per layout below");
// One test case per layout (in all_layouts' order), so that the sanitizers (one process per test case) run them
// side by side.
TEST_CASE("decode gpu: amortised compressions equal the host backend (bhsd layout)") { check_amortised(0); }
TEST_CASE("decode gpu: amortised compressions equal the host backend (bshd layout)") { check_amortised(1); }
TEST_CASE("decode gpu: amortised compressions equal the host backend (strided layout)") { check_amortised(2); }
TEST_CASE("decode gpu: amortised compressions equal the host backend (nhd layout)") { check_amortised(3); }
TEST_CASE("decode gpu: amortised compressions equal the host backend (hnd layout)") { check_amortised(4); }

TEST_CASE("decode gpu: amortised graphs (skip / now) replayed by the host schedule") {
  auto rng = make_rng(302);
  pk::decode_config cfg;
  cfg.policy = pk::decode_policy::amortised;
  cfg.slack = 5;
  gpu_case<pk::bf16, pk::bf16> c(layout::bhsd, geo(4, 3, 2, 160, 128), cfg, rng);
  c.init(rng, 30, 50);
  cudaStream_t stream = nullptr;
  PKV_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraphExec_t exec[2] = {};
  cudaGraph_t graph[2] = {};
  c.cache.visit(false, [&](const auto& dc) {
    for (int g = 0; g < 2; ++g) {
      auto a = c.args(dc, false, pk::decode_observe::attention, g ? pk::decode_when::now : pk::decode_when::skip, 1, false);
      PKV_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      size_t n = c.ws_bytes;
      const cudaError_t e = pk::decode_step(c.dws.get(), n, c.plan, c.dst, a, stream);
      PKV_CUDA_CHECK(cudaStreamEndCapture(stream, &graph[g]));
      REQUIRE(e == cudaSuccess);
      PKV_CUDA_CHECK(cudaGraphInstantiate(&exec[g], graph[g], 0));
    }
  });
  int compressions = 0;
  for (int i = 0; i < 30; ++i) {
    c.randomise(rng, false, false);
    const bool now = pk::decode_schedule(c.plan, c.dst, 1);  // the runtime's pick
    compressions += now;
    PKV_CUDA_CHECK(cudaGraphLaunch(exec[now ? 1 : 0], stream));
    PKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    c.cache.visit(true, [&](const auto& hc) {
      auto a = c.args(hc, true, pk::decode_observe::attention, pk::decode_when::automatic, 1, false);
      REQUIRE(pk::decode_step_host(c.plan, c.hst, a) == cudaSuccess);
    });
    c.hbuf.pending = c.hst.pending;
    c.check_state("replay");
    c.check_cache("replay");
  }
  CHECK(compressions == 5);  // every slack + 1 = 6 steps
  for (int g = 0; g < 2; ++g) {
    cudaGraphExecDestroy(exec[g]);
    cudaGraphDestroy(graph[g]);
  }
  cudaStreamDestroy(stream);
}
