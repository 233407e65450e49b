// The compressor's CUDA backend on a sharded model, on ONE GPU: the ranks run as threads, each on its own stream,
// with a stream-ordered device communicator (tests/dist/device_sim_comm.cuh). Every rank's outputs and cache shard
// equal the unsharded device compressor's (and, for the bit-identical scorers, the host backend's); the window
// scorer, whose device rounding follows the size of each call, gives identical outputs on every rank.
#include "dist/device_sim_comm.cuh"
#include "dist/dist_gpu_util.cuh"

#include <memory>
#include <thread>

namespace {

using namespace dist_test;
using prefixkv_test::make_rng;

//! Runs the device compressor on every rank of a tp x pp sharding of `full` (threads, one stream each); returns the
//! results in rank order (pipeline-major).
template <class T>
std::vector<result> run_sharded(const model<T>& full, const pk::compress_plan& plan, const policy& pol, int tp,
                                int pp, const std::vector<int64_t>& stages, int64_t problems,
                                const std::function<void(model<T>&, int, int)>& edit = {}) {
  const int64_t L = full.s.L, hc = full.s.H / tp, Hs = pol.gran == pk::granularity::head ? full.s.H : 1;
  const int n = tp * pp;
  std::vector<std::unique_ptr<device_sim_group>> tpg, ppg;
  const size_t words = size_t(2 * L * full.s.B * Hs + problems + full.s.B * L * 256 + 64);
  for (int i = 0; i < pp; ++i) tpg.emplace_back(new device_sim_group(tp, words));
  for (int i = 0; i < tp; ++i) ppg.emplace_back(new device_sim_group(pp, words));
  std::vector<device_sim_comm> tpc(static_cast<size_t>(n)), ppc(static_cast<size_t>(n));
  std::vector<pk::compress_shard> shards(static_cast<size_t>(n));
  std::vector<std::unique_ptr<device_model<T>>> dev(static_cast<size_t>(n));
  std::vector<device_buffer<unsigned char>> temp(static_cast<size_t>(n));
  std::vector<size_t> bytes(static_cast<size_t>(n), 0);
  std::vector<cudaStream_t> streams(static_cast<size_t>(n));
  std::vector<cudaError_t> err(static_cast<size_t>(n), cudaSuccess);
  std::vector<pk::error_info> info(static_cast<size_t>(n));
  for (int ip = 0; ip < pp; ++ip)
    for (int it = 0; it < tp; ++it) {
      const size_t r = size_t(ip * tp + it);
      model<T> m = make_shard(full, stages[size_t(ip)], stages[size_t(ip) + 1] - stages[size_t(ip)], it * hc, hc);
      if (edit) edit(m, it, ip);
      dev[r].reset(new device_model<T>(m, L, Hs, problems));
      dev[r]->poison();
      device_sim_group* tg = tpg[static_cast<size_t>(ip)].get();
      device_sim_group* pg = ppg[static_cast<size_t>(it)].get();
      tpc[r] = device_sim_comm{tg, it};
      ppc[r] = device_sim_comm{pg, ip};
      if (tp > 1) shards[r].tp = pk::make_communicator(tpc[r]);
      if (pp > 1) shards[r].pp = pk::make_communicator(ppc[r]);
      shards[r].layer_begin = stages[size_t(ip)];
      shards[r].layer_count = stages[size_t(ip) + 1] - stages[size_t(ip)];
      REQUIRE(dev[r]->with_args(pol, [&](auto& a) { return pk::compress(nullptr, bytes[r], plan, a, shards[r]); }) ==
              cudaSuccess);
      temp[r] = device_buffer<unsigned char>(bytes[r]);
      PKV_CUDA_CHECK(cudaStreamCreateWithFlags(&streams[r], cudaStreamNonBlocking));
    }
  PKV_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r)
    threads.emplace_back([&, r] {
      const size_t x = size_t(r);
      err[x] = dev[x]->with_args(pol, [&](auto& a) {
        return pk::compress(temp[x].get(), bytes[x], plan, a, shards[x], streams[x]);
      });
      if (err[x] != cudaSuccess) info[x] = pk::last_error();
      const cudaError_t se = cudaStreamSynchronize(streams[x]);
      if (err[x] == cudaSuccess) err[x] = se;
    });
  for (auto& t : threads) t.join();
  std::vector<result> out;
  for (int r = 0; r < n; ++r) {
    INFO("rank " << r << ": " << (err[size_t(r)] == cudaSuccess ? "ok" : info[size_t(r)].message));
    CHECK(err[size_t(r)] == cudaSuccess);
    out.push_back(dev[size_t(r)]->download(err[size_t(r)]));
    PKV_CUDA_CHECK(cudaStreamDestroy(streams[size_t(r)]));
  }
  return out;
}

template <class T>
void check_case(std::mt19937_64& rng, int tp, int pp, const policy& pol, shape s, bool fault = false) {
  s.Hs = pol.gran == pk::granularity::head ? s.H : 1;
  std::vector<double> profile;
  const pk::compress_config cfg = make_config(s, pol, rng, profile);
  pk::compress_plan plan;
  REQUIRE(pk::make_plan(cfg, plan) == cudaSuccess);
  model<T> full = random_model<T>(s, rng);
  const int64_t problems = pol.alloc == pk::allocation::prefix ? s.B : s.B * s.L;
  const std::vector<int64_t> stages = split_layers(s.L, pp, rng);
  // a fault in the whole model (the shards are cut from it): a length past the capacity, or a NaN in the last
  // caller score row
  if (fault) {
    if (pol.scorer == pk::scorer_kind::scores)
      full.scores[size_t(full.score_stride * (s.L * s.B * s.Hs - 1) + 1)] = std::nanf("");
    else
      full.lengths[0] = int32_t(s.T + 1);
  }
  device_model<T> whole(full, s.L, s.Hs, problems);
  const result ref = run_unsharded(whole, plan, pol);
  REQUIRE(ref.e == cudaSuccess);
  const std::vector<result> got = run_sharded(full, plan, pol, tp, pp, stages, problems);
  // the reference's shard of its compressed cache
  model<T> after = full;
  const size_t per = full.layer_elems();
  auto unpack = [&](const std::vector<unsigned char>& b, std::vector<T>& x) {
    REQUIRE(b.size() == per * size_t(s.L) * sizeof(T));
    std::memcpy(x.data(), b.data(), b.size());
  };
  unpack(ref.k, after.k);
  unpack(ref.v, after.v);
  unpack(ref.dk, after.dk);
  unpack(ref.dv, after.dv);
  const int64_t hc = s.H / tp;
  for (int ip = 0; ip < pp; ++ip)
    for (int it = 0; it < tp; ++it) {
      const result& g = got[size_t(ip * tp + it)];
      INFO(pol.name() << ", rank tp " << it << " pp " << ip << " of " << tp << " x " << pp << (fault ? ", fault" : ""));
      CHECK(g.same_outputs(got[0]));  // every rank writes the same outputs
      if (pol.shard_invariant_on_device() || fault) {
        CHECK(g.same_outputs(ref));
        const model<T> cut = make_shard(after, stages[size_t(ip)], stages[size_t(ip) + 1] - stages[size_t(ip)], it * hc, hc);
        CHECK(g.k == raw_bytes(cut.k));
        CHECK(g.v == raw_bytes(cut.v));
        CHECK(g.dk == raw_bytes(cut.dk));
        CHECK(g.dv == raw_bytes(cut.dv));
      } else {
        CHECK(g.status == ref.status);
      }
    }
  // the bit-identical scorers: the unsharded device compressor equals the host backend too
  if (pol.scorer == pk::scorer_kind::attention || pol.scorer == pk::scorer_kind::recency ||
      pol.scorer == pk::scorer_kind::scores) {
    const result h = run_host(full, plan, pol, problems);
    CHECK(h.status == ref.status);
    CHECK(h.len == ref.len);
    CHECK(h.k == ref.k);
  }
}

const std::pair<int, int> shardings[] = {{2, 1}, {1, 2}, {2, 2}, {4, 1}, {1, 4}};

// Under PREFIXKV_TEST_QUICK=2 (racecheck) TP, PP and TP x PP once each.
std::vector<std::pair<int, int>> shardings_to_run() {
  std::vector<std::pair<int, int>> v(std::begin(shardings), std::end(shardings));
  if (prefixkv_test::tiny_mode()) v.resize(3);
  return v;
}

policy random_policy(std::mt19937_64& rng, int tp) {
  policy pol;
  const pk::scorer_kind scorers[] = {pk::scorer_kind::attention, pk::scorer_kind::window, pk::scorer_kind::key_norm,
                                     pk::scorer_kind::recency, pk::scorer_kind::scores};
  pol.scorer = scorers[rng() % 5];
  pol.gran = rng() % 2 ? pk::granularity::head : pk::granularity::layer;
  if (pol.scorer == pk::scorer_kind::attention && tp > 1) pol.gran = pk::granularity::head;
  const pk::allocation allocs[] = {pk::allocation::prefix, pk::allocation::prefix, pk::allocation::uniform,
                                   pk::allocation::pyramid, pk::allocation::profile};
  pol.alloc = allocs[rng() % 5];
  pol.keep_tokens = pol.alloc != pk::allocation::profile && rng() % 4 == 0;
  pol.in_place = rng() % 4 != 0;
  pol.lse = rng() % 2 == 0;
  return pol;
}

shape random_shape(std::mt19937_64& rng, int tp, int pp, int64_t D) {
  shape s;
  s.L = std::max<int64_t>(pp, 1 + int64_t(rng() % 6));
  s.H = tp * (1 + int64_t(rng() % 2));
  s.G = 1 + int64_t(rng() % 3);
  s.B = 1 + int64_t(rng() % 3);
  s.T = 16 + int64_t(rng() % 90);
  s.D = D;
  s.W = 1 + int64_t(rng() % 8);
  s.page = rng() % 3 == 0 ? 16 : 0;
  s.per_segment_lengths = rng() % 3 == 0;
  return s;
}

}  // namespace

TEST_CASE("sharded compress (CUDA, ranks as threads on one GPU) == unsharded compress: float") {
  auto rng = make_rng(0xD1C0);
  const int reps = prefixkv_test::quick_mode() ? 1 : 3;
  for (const auto& [tp, pp] : shardings_to_run())
    for (int rep = 0; rep < reps; ++rep) check_case<float>(rng, tp, pp, random_policy(rng, tp), random_shape(rng, tp, pp, 16));
}

TEST_CASE("sharded compress (CUDA, ranks as threads on one GPU) == unsharded compress: bf16, head_dim 128") {
  auto rng = make_rng(0xD1C1);
  const int reps = prefixkv_test::quick_mode() ? 1 : 2;
  for (const auto& [tp, pp] : shardings_to_run())
    for (int rep = 0; rep < reps; ++rep)
      check_case<pk::bf16>(rng, tp, pp, random_policy(rng, tp), random_shape(rng, tp, pp, 128));
}

namespace {

// Scorer `sc` with both granularities on 2 x 2 ranks (racecheck, PREFIXKV_TEST_QUICK=2: one granularity per scorer,
// both across the scorers).
void check_scorer_2x2(int sc) {
  auto rng = make_rng(0xD1C2 + uint64_t(sc));
  for (int gr = 0; gr < 2; ++gr) {
    if (prefixkv_test::tiny_mode() && gr != sc % 2) continue;  // racecheck: every scorer once, both granularities
    policy pol;
    pol.scorer = pk::scorer_kind(sc);
    pol.gran = pk::granularity(gr);
    pol.alloc = gr ? pk::allocation::uniform : pk::allocation::prefix;
    const bool attention_layers = pol.scorer == pk::scorer_kind::attention && pol.gran == pk::granularity::layer;
    const int tp = attention_layers ? 1 : 2;
    check_case<pk::bf16>(rng, tp, 2, pol, random_shape(rng, tp, 2, 64));
  }
}

}  // namespace

// One test case per scorer, so that the sanitizers (one process per test case) run them side by side.
TEST_CASE("sharded compress (CUDA) on 2 x 2 ranks, both granularities: caller scores") { check_scorer_2x2(0); }
TEST_CASE("sharded compress (CUDA) on 2 x 2 ranks, both granularities: attention") { check_scorer_2x2(1); }
TEST_CASE("sharded compress (CUDA) on 2 x 2 ranks, both granularities: window") { check_scorer_2x2(2); }
TEST_CASE("sharded compress (CUDA) on 2 x 2 ranks, both granularities: key norms") { check_scorer_2x2(3); }
TEST_CASE("sharded compress (CUDA) on 2 x 2 ranks, both granularities: recency") { check_scorer_2x2(4); }

TEST_CASE("sharded compress (CUDA): bad data anywhere stops every rank with the unsharded status") {
  auto rng = make_rng(0xD1C3);
  for (int rep = 0; rep < 4; ++rep) {
    if (prefixkv_test::tiny_mode() && (rep == 1 || rep == 2)) continue;  // racecheck: both scorers, both granularities
    policy pol;
    pol.scorer = rep % 2 ? pk::scorer_kind::scores : pk::scorer_kind::key_norm;
    pol.gran = rep < 2 ? pk::granularity::layer : pk::granularity::head;
    shape s = random_shape(rng, 2, 2, 16);
    s.per_segment_lengths = false;
    check_case<float>(rng, 2, 2, pol, s, true);
  }
}
