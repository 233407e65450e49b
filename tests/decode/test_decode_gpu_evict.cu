// Decode GPU tests, fixed-position and score policies: the CUDA backend equals the host backend byte for byte
// (cache image and state) after decode_init and after every step, in every cache layout, for layer and kv-head
// segments, both row orders, ragged activity, multi-token steps, rounds of evictions, and graph replays.
#include <doctest/doctest.h>

#include "decode_gpu_util.cuh"

using namespace decode_gpu_test;

namespace {

compact_test::geometry geo(int64_t L, int64_t B, int64_t H, int64_t T, int64_t D, int scales = 0, int64_t page = 16) {
  compact_test::geometry g;
  g.L = L;
  g.B = B;
  g.H = H;
  g.T = T;
  g.D = D;
  g.scales = scales;
  g.page = page;
  return g;
}

template <class T, class P>
void run_steps(gpu_case<T, P>& c, std::mt19937_64& rng, int steps, pk::decode_observe ob, bool ragged) {
  for (int i = 0; i < steps; ++i) {
    c.randomise(rng, i % 3 == 0, i % 11 == 5);
    c.set_active(rng, !ragged);
    const int32_t appended = i % 13 == 7 ? 3 : 1;
    c.step(ob, pk::decode_when::automatic, appended, ragged, i == 0 || i == steps - 1,
           (std::string("step ") + std::to_string(i)).c_str());
  }
}

}  // namespace

TEST_CASE("decode gpu: fixed_position equals the host backend in every layout") {
  auto rng = make_rng(201);
  const std::vector<double> prof = {0.5, 0.8, 0.3};
  for (layout l : compact_test::all_layouts)
    for (int variant = 0; variant < 3; ++variant) {
      CAPTURE(compact_test::name(l));
      CAPTURE(variant);
      pk::decode_config cfg;
      cfg.policy = pk::decode_policy::fixed_position;
      cfg.gran = variant == 2 ? pk::granularity::head : pk::granularity::layer;
      cfg.distance = variant == 1 ? 5 : -25;
      cfg.profile = variant == 0 ? prof.data() : nullptr;
      cfg.horizon = variant == 1 ? 60 : 0;
      gpu_case<pk::bf16, pk::bf16> c(l, geo(3, variant == 2 ? 1 : 3, 2, 150, variant == 1 ? 24 : 64, variant), cfg, rng);
      c.init(rng, 20, 60);
      run_steps(c, rng, 40, pk::decode_observe::none, variant != 0);
    }
}

TEST_CASE("decode gpu: score policy (reuse and preserve) equals the host backend") {
  auto rng = make_rng(202);
  for (layout l : compact_test::all_layouts)
    for (int variant = 0; variant < 4; ++variant) {
      CAPTURE(compact_test::name(l));
      CAPTURE(variant);
      pk::decode_config cfg;
      cfg.policy = pk::decode_policy::score;
      cfg.order = variant % 2 ? pk::decode_order::preserve : pk::decode_order::reuse;
      cfg.gran = variant >= 2 ? pk::granularity::head : pk::granularity::layer;
      cfg.protect = {3, variant == 3 ? 0 : 5};
      cfg.horizon = variant == 2 ? 90 : 0;  // evictions of several rows per step
      const auto ob = variant == 1 ? pk::decode_observe::add_scores
                                   : (variant == 3 ? pk::decode_observe::set_scores : pk::decode_observe::attention);
      gpu_case<pk::bf16, pk::bf16> c(l, geo(2, variant == 3 ? 1 : 3, 3, 133, variant == 2 ? 8 : 128, variant == 1 ? 2 : 0),
                                     cfg, rng, 2, variant == 0 ? 2 : 1);
      c.init(rng, 20, 60);
      run_steps(c, rng, 30, ob, variant != 3);
    }
}

TEST_CASE("decode gpu: float caches, f16 probabilities, odd rows") {
  auto rng = make_rng(203);
  for (layout l : {layout::strided, layout::nhd}) {
    CAPTURE(compact_test::name(l));
    pk::decode_config cfg;
    cfg.policy = pk::decode_policy::score;
    cfg.protect = {1, 2};
    gpu_case<float, pk::f16> c(l, geo(2, 2, 2, 77, 3, 1, 8), cfg, rng, 3);
    c.init(rng, 30, 70);
    run_steps(c, rng, 25, pk::decode_observe::attention, true);
  }
}

TEST_CASE("decode gpu: more than decode_round evictions in one step (rounds), both orders") {
  auto rng = make_rng(204);
  for (auto order : {pk::decode_order::reuse, pk::decode_order::preserve}) {
    pk::decode_config cfg;
    cfg.policy = pk::decode_policy::score;
    cfg.order = order;
    cfg.protect = {4, 16};
    gpu_case<pk::bf16, float> c(layout::bhsd, geo(2, 2, 1, 3000, 16), cfg, rng, 2);
    c.init(rng, 90, 99);  // ~1500 rows kept of ~750..3750 seen
    pk::decode_config d = c.plan.cfg;  // then the same state under a budget frozen low: > 1024 evictions at once
    d.horizon = 40;
    REQUIRE(pk::make_plan(d, c.plan) == cudaSuccess);
    run_steps(c, rng, 3, pk::decode_observe::attention, false);
    for (int64_t s = 0; s < c.plan.state_segments(); ++s) CHECK(c.hbuf.lengths[s] <= 40);
  }
}

TEST_CASE("decode gpu: one captured step replayed as a graph follows the host backend") {
  auto rng = make_rng(205);
  for (auto pol : {pk::decode_policy::fixed_position, pk::decode_policy::score}) {
    pk::decode_config cfg;
    cfg.policy = pol;
    cfg.protect = {2, 4};
    gpu_case<pk::bf16, pk::bf16> c(layout::hnd, geo(4, 3, 2, 120, 128), cfg, rng);
    c.init(rng, 25, 50);
    cudaStream_t stream = nullptr;
    PKV_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    c.cache.visit(false, [&](const auto& dc) {
      auto a = c.args(dc, false, pk::decode_observe::attention, pk::decode_when::skip, 1, true);
      PKV_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      size_t n = c.ws_bytes;
      const cudaError_t e = pk::decode_step(c.dws.get(), n, c.plan, c.dst, a, stream);
      PKV_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
      REQUIRE(e == cudaSuccess);
    });
    PKV_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int i = 0; i < 40; ++i) {
      c.randomise(rng, false, false);
      c.set_active(rng, false);
      PKV_CUDA_CHECK(cudaGraphLaunch(exec, stream));
      PKV_CUDA_CHECK(cudaStreamSynchronize(stream));
      c.cache.visit(true, [&](const auto& hc) {
        auto a = c.args(hc, true, pk::decode_observe::attention, pk::decode_when::skip, 1, true);
        REQUIRE(pk::decode_step_host(c.plan, c.hst, a) == cudaSuccess);
      });
      c.check_state("replay");
      c.check_cache("replay");
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
  }
}

TEST_CASE("decode gpu: bad device data is reported like the host backend") {
  auto rng = make_rng(206);
  pk::decode_config cfg;
  cfg.policy = pk::decode_policy::score;
  gpu_case<pk::bf16, pk::bf16> c(layout::bshd, geo(2, 2, 2, 64, 32), cfg, rng);
  c.init(rng, 40, 60);
  // the init reported its negative score (the status keeps the smallest reason): start this case from a clear status
  *c.hst.status = 0;
  PKV_CUDA_CHECK(cudaMemset(c.dst.status, 0, sizeof(int32_t)));
  // tokens that do not fit the cache: segments left unchanged, capacity_exceeded
  c.randomise(rng, false, false);
  c.step(pk::decode_observe::attention, pk::decode_when::automatic, 60, false, true, "overflow");
  CHECK(c.hbuf.status == int32_t(pk::reason::capacity_exceeded));
  // an observation shorter than the lengths: out_of_range (smaller reason, replaces it)
  for (auto& v : c.hpv) v.dim = 3;
  for (auto& v : c.dpv) v.dim = 3;
  c.step(pk::decode_observe::attention, pk::decode_when::automatic, 1, false, true, "short P");
  CHECK(c.hbuf.status == int32_t(pk::reason::out_of_range));
}

TEST_CASE("decode gpu: a long generation (2000 steps) of the score policy follows the host backend") {
  auto rng = make_rng(207);
  pk::decode_config cfg;
  cfg.policy = pk::decode_policy::score;
  cfg.protect = {4, 8};
  const int steps = prefixkv_test::rounds(2000, 300, 40);
  gpu_case<pk::bf16, pk::bf16> c(layout::nhd, geo(3, 2, 2, 1200, 64), cfg, rng);
  c.init(rng, 5, 12);
  for (int i = 0; i < steps; ++i) {
    c.randomise(rng, i % 7 == 0, false);
    c.set_active(rng, i % 3 != 0);
    c.step(pk::decode_observe::attention, pk::decode_when::automatic, 1, true, false, "long", i % 100 != 99);
  }
  c.check_state("end");
  c.check_cache("end");
}

TEST_CASE("decode gpu: a page id outside the pool leaves its segments unchanged, like the host backend") {
  auto rng = make_rng(208);
  for (auto pol : {pk::decode_policy::score, pk::decode_policy::amortised}) {
    pk::decode_config cfg;
    cfg.policy = pol;
    cfg.slack = 0;
    gpu_case<pk::bf16, pk::bf16> c(layout::nhd, geo(2, 3, 2, 96, 64), cfg, rng);
    c.init(rng, 30, 50);
    c.cache.table[1 * c.cache.max_blocks] = int32_t(c.cache.num_pages + 3);  // sequence 1, first block
    c.cache.dtable.upload(c.cache.table);
    c.randomise(rng, false, false);
    const std::vector<int32_t> before = c.hbuf.lengths;
    c.step(pk::decode_observe::attention, pk::decode_when::automatic, 1, false, true, "bad page");
    CHECK(c.hbuf.status == int32_t(pk::reason::out_of_range));
    for (int64_t l = 0; l < 2; ++l) CHECK(c.hbuf.lengths[c.plan.state_index(l, 1, 0)] == before[c.plan.state_index(l, 1, 0)]);
  }
}

TEST_CASE("decode gpu: init from per-sequence lengths, fewer sequences than max_batch, clamped inputs") {
  auto rng = make_rng(209);
  for (auto pol : {pk::decode_policy::fixed_position, pk::decode_policy::score, pk::decode_policy::amortised}) {
    pk::decode_config cfg;
    cfg.policy = pol;
    cfg.gran = pol == pk::decode_policy::score ? pk::granularity::head : pk::granularity::layer;
    gpu_case<pk::bf16, pk::bf16> c(layout::bshd, geo(2, 3, 2, 64, 32), cfg, rng);
    c.init_per_sequence(rng, 2);
    c.randomise(rng, false, false);
    // sequence 0 was clamped to max_tokens: its new token does not fit (reported, left unchanged)
    c.step(pk::decode_observe::attention, pk::decode_when::automatic, 1, false, true, "after init");
  }
}
