// The compressor on a sharded model, host backend: 1 to 8 ranks in threads (tensor parallel, pipeline parallel,
// both) equal the single-process compressor on the unsharded model — status, reason, every output array, and the
// bytes of every shard of the cache — for every scorer, allocation, granularity and cache kind; bad data anywhere
// stops every rank; bad sharding and bad arguments are rejected on every rank.
#include <doctest/doctest.h>

#include "dist/dist_test_model.hpp"

#include <cstring>
#include <string>

namespace {

using namespace dist_test;
using prefixkv_test::make_rng;

struct policy {
  pk::scorer_kind scorer = pk::scorer_kind::window;
  pk::granularity gran = pk::granularity::layer;
  pk::allocation alloc = pk::allocation::prefix;
  bool keep_tokens = false, in_place = true, lse = false;
  std::string name() const {
    return "scorer " + std::to_string(int(scorer)) + " gran " + std::to_string(int(gran)) + " alloc " +
           std::to_string(int(alloc)) + (keep_tokens ? " keep_tokens" : " evict") + (in_place ? " in place" : " gather") +
           (lse ? " lse" : "");
  }
};

//! What one call returned and wrote (outputs, and the cache storage).
struct result {
  cudaError_t e = cudaSuccess;
  pk::reason why = pk::reason::none;
  std::vector<int32_t> len, cu, pages, status;
  std::vector<float> thr;
  std::vector<unsigned char> k, v, dk, dv;  // raw bytes of the (shard of the) cache and destination
};

template <class T>
std::vector<unsigned char> bytes_of(const std::vector<T>& x) {
  std::vector<unsigned char> b(x.size() * sizeof(T));
  if (!x.empty()) std::memcpy(b.data(), x.data(), b.size());
  return b;
}

//! One compressor call on model m (the whole model with an empty shard, or a rank's shard).
template <class T>
result call(model<T>& m, const pk::compress_plan& plan, const policy& pol, const pk::compress_shard* shard,
            int64_t L_total, int64_t H_total) {
  result r;
  const int64_t B = m.s.B, Hs = pol.gran == pk::granularity::head ? H_total : 1;
  const int64_t P = pol.alloc == pk::allocation::prefix ? B : B * L_total;
  r.len.assign(size_t(L_total * B * Hs), -7);
  r.cu.assign(size_t(L_total * (B * Hs + 1)), -7);
  r.pages.assign(size_t(B), -7);
  r.thr.assign(size_t(P), -7.0f);
  r.status.assign(1, -7);
  pk::compress_outputs out{r.len.data(), r.cu.data(), m.s.page ? r.pages.data() : nullptr, r.thr.data(), r.status.data()};
  auto run = [&](auto cache, auto dst) {
    pk::compress_args<decltype(cache), T, decltype(dst)> a;
    a.cache = cache;
    a.dst = dst;
    a.lengths = m.lengths.data();
    a.lengths_per_segment = m.s.per_segment_lengths;
    a.attention = m.pv.data();
    a.queries = m.qv.data();
    a.lse = pol.lse ? m.lv.data() : nullptr;
    a.scores = m.scores.data();
    a.score_stride = m.score_stride;
    a.out = out;
    return shard ? pk::compress_host(plan, a, *shard) : pk::compress_host(plan, a);
  };
  r.e = m.s.page ? run(m.paged(), m.paged_dst()) : run(m.strided(), m.strided_dst());
  r.why = r.e == cudaSuccess ? pk::reason::none : pk::last_error().why;
  r.k = bytes_of(m.k);
  r.v = bytes_of(m.v);
  r.dk = bytes_of(m.dk);
  r.dv = bytes_of(m.dv);
  return r;
}

pk::compress_config config_of(const shape& s, const policy& pol, std::mt19937_64& rng, std::vector<double>& profile) {
  pk::compress_config c;
  c.layers = s.L;
  c.q_heads = s.H * s.G;
  c.kv_heads = s.H;
  c.head_dim = s.D;
  c.max_batch = s.B + int64_t(rng() % 2);
  c.max_tokens = s.T;
  c.max_window = s.W;
  c.max_pages = s.num_pages();
  c.page_size = s.page;
  c.scorer = pol.scorer;
  c.gran = pol.gran;
  c.alloc = pol.alloc;
  c.in_place = pol.in_place;
  c.protect = {int64_t(rng() % 4), int64_t(rng() % 3)};
  if (rng() % 3 == 0) c.min_keep = int64_t(rng() % 3);
  if (rng() % 3 == 0) c.max_keep = c.min_keep + 2 + int64_t(rng() % 10);
  c.window.group = rng() % 2 ? pk::head_reduce::mean : pk::head_reduce::max;
  c.window.heads = rng() % 2 ? pk::head_reduce::mean : pk::head_reduce::max;
  if (rng() % 3 == 0) {
    c.window.pool = rng() % 2 ? pk::pool_kind::max : pk::pool_kind::avg;
    c.window.pool_kernel = 3;
  }
  if (pol.alloc == pk::allocation::profile) {
    profile.resize(size_t(s.L));
    for (auto& f : profile) f = 0.1 + 0.8 * double(rng() % 100) / 100.0;
    c.profile = profile.data();
  }
  if (pol.keep_tokens) {
    c.budget = pk::budget_kind::keep_tokens;
    c.keep_tokens = s.L * (8 + int64_t(rng() % 10));
  } else {
    c.evict_ratio = 0.05 + 0.9 * double(rng() % 100) / 100.0;
  }
  return c;
}

//! The reference (unsharded) and every rank of a (tp, pp) sharding; checks every rank against the reference.
template <class T>
void check_sharded(const model<T>& full, const pk::compress_config& cfg, const policy& pol, int tp, int pp,
                   bool present1, std::mt19937_64& rng, const std::function<void(model<T>&, int, int)>& edit = {}) {
  pk::compress_plan plan;
  REQUIRE(pk::make_plan(cfg, plan) == cudaSuccess);
  const int64_t L = full.s.L, H = full.s.H, hc = H / tp;
  const std::vector<int64_t> stages = split_layers(L, pp, rng);
  // the shards, cut before anything runs (edits apply to a rank's copy and to the reference alike)
  model<T> ref = full;
  ref.views();
  std::vector<model<T>> shards;
  shards.reserve(size_t(tp * pp));
  for (int ip = 0; ip < pp; ++ip)
    for (int it = 0; it < tp; ++it)
      shards.push_back(make_shard(full, stages[size_t(ip)], stages[size_t(ip) + 1] - stages[size_t(ip)], it * hc, hc));
  if (edit) {
    edit(ref, -1, -1);
    for (int ip = 0; ip < pp; ++ip)
      for (int it = 0; it < tp; ++it) edit(shards[size_t(ip * tp + it)], it, ip);
  }
  const result want = call(ref, plan, pol, nullptr, L, H);
  std::vector<result> got(shards.size());
  run_ranks(tp, pp, present1, stages, [&](int it, int ip, const pk::compress_shard& sh) {
    got[size_t(ip * tp + it)] = call(shards[size_t(ip * tp + it)], plan, pol, &sh, L, H);
  });
  // the reference's shards, cut from its final state
  for (int ip = 0; ip < pp; ++ip)
    for (int it = 0; it < tp; ++it) {
      INFO("rank tp " << it << " pp " << ip << " of " << tp << " x " << pp << ", layers [" << stages[size_t(ip)] << ", "
                      << stages[size_t(ip) + 1] << "), " << pol.name());
      const result& g = got[size_t(ip * tp + it)];
      CHECK(g.e == want.e);
      CHECK(g.why == want.why);
      CHECK(g.status == want.status);
      CHECK(g.len == want.len);
      CHECK(g.cu == want.cu);
      CHECK(g.pages == want.pages);
      CHECK(std::memcmp(g.thr.data(), want.thr.data(), g.thr.size() * sizeof(float)) == 0);
      model<T> cut = make_shard(ref, stages[size_t(ip)], stages[size_t(ip) + 1] - stages[size_t(ip)], it * hc, hc);
      CHECK(g.k == bytes_of(cut.k));
      CHECK(g.v == bytes_of(cut.v));
      CHECK(g.dk == bytes_of(cut.dk));
      CHECK(g.dv == bytes_of(cut.dv));
    }
}

const std::pair<int, int> shardings[] = {{1, 1}, {2, 1}, {1, 2}, {4, 1}, {1, 4}, {2, 2}, {8, 1}, {1, 8}, {2, 4}, {4, 2}};

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

shape random_shape(std::mt19937_64& rng, int tp, int pp) {
  shape s;
  s.L = std::max<int64_t>(pp, 1 + int64_t(rng() % 6));
  s.H = tp * (1 + int64_t(rng() % 2));
  s.G = 1 + int64_t(rng() % 2);
  s.B = 1 + int64_t(rng() % 3);
  s.T = 12 + int64_t(rng() % 30);
  s.D = 4 + 4 * int64_t(rng() % 2);
  s.W = 1 + int64_t(rng() % 4);
  s.page = rng() % 3 == 0 ? 4 + 4 * int64_t(rng() % 2) : 0;
  s.per_segment_lengths = rng() % 3 == 0;
  return s;
}

}  // namespace

TEST_CASE("sharded compress_host == unsharded compress_host: TP, PP and TP x PP on 1 to 8 ranks") {
  auto rng = make_rng(0xD157);
  int runs = 0;
  for (const auto& [tp, pp] : shardings)
    for (int rep = 0; rep < 6; ++rep) {
      const shape s0 = random_shape(rng, tp, pp);
      const policy pol = random_policy(rng, tp);
      shape s = s0;
      s.Hs = pol.gran == pk::granularity::head ? s.H : 1;
      std::vector<double> profile;
      const pk::compress_config cfg = config_of(s, pol, rng, profile);
      const model<float> m = random_model<float>(s, rng);
      check_sharded(m, cfg, pol, tp, pp, rep % 2 == 0, rng);
      ++runs;
    }
  CHECK(runs == 60);
}

TEST_CASE("sharded compress_host: every scorer x granularity x allocation on a 2 x 2 grid") {
  auto rng = make_rng(0xD158);
  for (int sc = 0; sc < 5; ++sc)
    for (int gr = 0; gr < 2; ++gr)
      for (int al = 0; al < 4; ++al) {
        policy pol;
        pol.scorer = pk::scorer_kind(sc);
        pol.gran = pk::granularity(gr);
        pol.alloc = pk::allocation(al);
        const bool attention_layers = pol.scorer == pk::scorer_kind::attention && pol.gran == pk::granularity::layer;
        shape s = random_shape(rng, 2, 2);
        s.Hs = pol.gran == pk::granularity::head ? s.H : 1;
        std::vector<double> profile;
        const pk::compress_config cfg = config_of(s, pol, rng, profile);
        const model<float> m = random_model<float>(s, rng);
        if (attention_layers) {
          check_sharded(m, cfg, pol, 1, 2, false, rng);  // pipeline only: exact for every scorer
        } else {
          check_sharded(m, cfg, pol, 2, 2, false, rng);
        }
      }
}

TEST_CASE("sharded compress_host: bad data on one rank stops every rank with the unsharded reason") {
  auto rng = make_rng(0xD159);
  for (int rep = 0; rep < 12; ++rep) {
    const int tp = rep % 3 == 2 ? 1 : 2, pp = rep % 3 == 1 ? 1 : 2;
    policy pol = random_policy(rng, tp);
    shape s = random_shape(rng, tp, pp);
    s.per_segment_lengths = false;
    s.Hs = pol.gran == pk::granularity::head ? s.H : 1;
    std::vector<double> profile;
    pk::compress_config cfg = config_of(s, pol, rng, profile);
    const model<float> m = random_model<float>(s, rng);
    const int kind = rep % 4;
    INFO("fault " << kind << ", " << pol.name());
    if (kind == 0) {
      // NaN in the last layer's scorer input of kv head H - 1 (a pipeline stage / tensor rank other than 0)
      pol.scorer = pk::scorer_kind::scores;
      cfg.scorer = pol.scorer;
      check_sharded<float>(m, cfg, pol, tp, pp, false, rng, [&](model<float>& x, int it, int ip) {
        // the reference's last row (L - 1, B - 1, Hs - 1) is the last row of the last stage's last head shard
        // (of every tensor-parallel rank for layer rows, which are the same on all of them)
        if (it >= 0 && (ip != pp - 1 || (x.s.Hs > 1 && it != tp - 1))) return;
        const int64_t rows = x.s.L * x.s.B * x.s.Hs;
        x.scores[size_t((rows - 1) * x.score_stride + 1)] = std::nanf("");
      });
    } else if (kind == 1) {
      // a length past the capacity
      check_sharded<float>(m, cfg, pol, tp, pp, false, rng,
                           [&](model<float>& x, int, int) { x.lengths[0] = int32_t(x.s.T + 1); });
    } else if (kind == 2) {
      // an infeasible budget: keep fewer tokens than the protected ones
      cfg.alloc = pk::allocation::prefix;
      pol.alloc = cfg.alloc;
      cfg.budget = pk::budget_kind::keep_tokens;
      cfg.protect = {4, 1};
      cfg.keep_tokens = 1;
      check_sharded(m, cfg, pol, tp, pp, false, rng);
    } else {
      // a negative caller score in a middle layer
      pol.scorer = pk::scorer_kind::scores;
      cfg.scorer = pol.scorer;
      check_sharded<float>(m, cfg, pol, tp, pp, false, rng, [&](model<float>& x, int it, int ip) {
        // row (L - 1, 0, 0): the last stage, kv head 0's shard (every tensor-parallel rank for layer rows)
        if (ip < 0 || (ip == pp - 1 && (x.s.Hs == 1 || it == 0))) x.scores[size_t(x.score_stride * (x.s.B * x.s.Hs) * (x.s.L - 1) + 2)] = -1.0f;
      });
    }
  }
}

TEST_CASE("sharded compress_host: per-layer block tables (cache or destination) are refused, nothing moves") {
  auto rng = make_rng(0xD15E);
  policy pol;
  pol.scorer = pk::scorer_kind::recency;
  shape s;
  s.L = 2;
  s.page = 4;
  for (int in_place = 0; in_place < 2; ++in_place) {
    CAPTURE(in_place);
    pol.in_place = in_place != 0;
    std::vector<double> profile;
    const pk::compress_config cfg = config_of(s, pol, rng, profile);
    pk::compress_plan plan;
    REQUIRE(pk::make_plan(cfg, plan) == cudaSuccess);
    model<float> m = random_model<float>(s, rng);
    const std::vector<int32_t> own = m.table;  // layer 1's own copy of the table
    auto& views = in_place ? m.kp : m.dkp;
    auto& vviews = in_place ? m.vp : m.dvp;
    views[1].block_table = vviews[1].block_table = own.data();
    const pk::compress_shard sh;
    const std::vector<unsigned char> k0 = bytes_of(m.k), dk0 = bytes_of(m.dk);
    const result r = call(m, plan, pol, &sh, s.L, s.H);
    CHECK(r.e == cudaErrorInvalidValue);
    CHECK(r.why == pk::reason::unsupported);
    CHECK(r.k == k0);
    CHECK(r.dk == dk0);
  }
}

TEST_CASE("sharded compress_host: a page named twice stops every rank, nothing moves") {
  auto rng = make_rng(0xD15A);
  policy pol;
  pol.scorer = pk::scorer_kind::recency;
  shape s = random_shape(rng, 2, 2);
  s.page = 4;
  s.per_segment_lengths = false;
  std::vector<double> profile;
  const pk::compress_config cfg = config_of(s, pol, rng, profile);
  model<float> m = random_model<float>(s, rng);
  m.table[1] = m.table[0];  // sequence 0's first two blocks share a page
  m.views();
  check_sharded(m, cfg, pol, 2, 2, false, rng);
}

TEST_CASE("sharded compress_host: shards that do not tile the model, and bad arguments, fail on every rank") {
  auto rng = make_rng(0xD15B);
  policy pol;
  pol.scorer = pk::scorer_kind::key_norm;
  shape s;
  s.L = 4;
  s.H = 2;
  std::vector<double> profile;
  const pk::compress_config cfg = config_of(s, pol, rng, profile);
  pk::compress_plan plan;
  REQUIRE(pk::make_plan(cfg, plan) == cudaSuccess);
  const model<float> full = random_model<float>(s, rng);
  // two stages that both claim layers [0, 2): a gap at [2, 4) and an overlap
  {
    std::vector<model<float>> shards = {make_shard(full, 0, 2, 0, 2), make_shard(full, 0, 2, 0, 2)};
    std::vector<result> got(2);
    run_ranks(1, 2, false, {0, 2, 4}, [&](int, int ip, const pk::compress_shard& sh0) {
      pk::compress_shard sh = sh0;
      sh.layer_begin = 0;
      got[size_t(ip)] = call(shards[size_t(ip)], plan, pol, &sh, 4, 2);
    });
    for (const auto& g : got) {
      CHECK(g.e == cudaErrorInvalidValue);
      CHECK(g.why == pk::reason::shape_mismatch);
      CHECK(g.status[0] == -7);  // nothing written
    }
  }
  // rank 1 passes null lengths: rank 1 reports null_pointer, rank 0 learns that a rank rejected its arguments
  {
    std::vector<model<float>> shards = {make_shard(full, 0, 2, 0, 2), make_shard(full, 2, 2, 0, 2)};
    std::vector<int32_t>().swap(shards[1].lengths);  // a null lengths pointer
    std::vector<result> got(2);
    run_ranks(1, 2, false, {0, 2, 4}, [&](int, int ip, const pk::compress_shard& sh) {
      got[size_t(ip)] = call(shards[size_t(ip)], plan, pol, &sh, 4, 2);
    });
    CHECK(got[1].why == pk::reason::null_pointer);
    CHECK(got[0].e == cudaErrorInvalidValue);
    CHECK(got[0].why != pk::reason::none);
    CHECK(got[0].status[0] == -7);
    CHECK(bytes_of(shards[0].k) == got[0].k);
  }
  // host-visible rejections before any exchange
  {
    model<float> x = make_shard(full, 0, 4, 0, 2);
    pk::host_comm_group grp(3);
    pk::host_comm c0 = grp.rank(0);
    pk::compress_shard sh;
    sh.tp = pk::make_communicator(c0);  // 2 kv heads over 3 ranks
    auto r = call(x, plan, pol, &sh, 4, 2);
    CHECK(r.why == pk::reason::unsupported);
    sh = {};
    sh.layer_begin = 1;  // no pipeline communicator, but not every layer
    r = call(x, plan, pol, &sh, 4, 2);
    CHECK(r.why == pk::reason::shape_mismatch);
    sh.layer_begin = 4;
    r = call(x, plan, pol, &sh, 4, 2);
    CHECK(r.why == pk::reason::out_of_range);
    pk::compress_plan ap = plan;
    ap.cfg.scorer = pk::scorer_kind::attention;
    pk::host_comm_group g2(2);
    pk::host_comm c2 = g2.rank(0);
    sh = {};
    sh.tp = pk::make_communicator(c2);
    pol.scorer = pk::scorer_kind::attention;
    r = call(x, ap, pol, &sh, 4, 2);
    CHECK(r.why == pk::reason::unsupported);
    // a device communicator on the host backend
    pk::communicator dev = pk::make_communicator(c2);
    dev.memory = pk::comm_memory::device;
    sh.tp = dev;
    pol.scorer = pk::scorer_kind::key_norm;
    r = call(x, plan, pol, &sh, 4, 2);
    CHECK(r.why == pk::reason::bad_parameter);
  }
}

TEST_CASE("host_comm: all-gather and all-reduce are exact, in place, and a missing rank times out") {
  using namespace std::chrono_literals;
  for (int n : {1, 2, 3, 8}) {
    pk::host_comm_group grp(n, 10000ms);
    std::vector<std::vector<int64_t>> red(static_cast<size_t>(n)), gat(static_cast<size_t>(n));
    std::vector<int> errors(static_cast<size_t>(n), 0);
    std::vector<std::thread> th;
    for (int r = 0; r < n; ++r)
      th.emplace_back([&, r] {
        pk::host_comm c = grp.rank(r);
        pk::communicator h = pk::make_communicator(c);
        std::vector<int64_t> x = {r + 1, int64_t(1) << 40, -r};
        errors[size_t(r)] += h.all_reduce_sum(x.data(), x.data(), 3, nullptr) != cudaSuccess;
        red[size_t(r)] = x;
        std::vector<int64_t> g(size_t(2 * n), -1);
        g[size_t(2 * r)] = r;
        g[size_t(2 * r + 1)] = 10 * r;
        errors[size_t(r)] += h.all_gather(g.data() + 2 * r, g.data(), 2 * sizeof(int64_t), nullptr) != cudaSuccess;
        gat[size_t(r)] = g;
      });
    for (auto& t : th) t.join();
    for (int r = 0; r < n; ++r) {
      CHECK(errors[size_t(r)] == 0);
      CHECK(red[size_t(r)] == std::vector<int64_t>{int64_t(n) * (n + 1) / 2, int64_t(n) << 40, -int64_t(n) * (n - 1) / 2});
      for (int q = 0; q < n; ++q) {
        CHECK(gat[size_t(r)][size_t(2 * q)] == q);
        CHECK(gat[size_t(r)][size_t(2 * q + 1)] == 10 * q);
      }
    }
  }
  pk::host_comm_group grp(2, 200ms);
  pk::host_comm c = grp.rank(0);
  int64_t x = 1;
  CHECK(c.all_reduce_sum(&x, &x, 1, nullptr) == cudaErrorInvalidValue);
  CHECK(grp.broken());
  CHECK(c.all_gather(&x, &x, 0, nullptr) == cudaErrorInvalidValue);
}

TEST_CASE("compress_exchange: the bytes of one call, as docs/multigpu.md states them") {
  pk::host_comm_group g2(2);
  pk::host_comm c0 = g2.rank(0);
  pk::compress_config c;  // a Llama-3-8B-like cache: 32 layers, 8 kv heads, head_dim 128, 4 sequences of <= 4096
  c.layers = 32;
  c.kv_heads = 8;
  c.q_heads = 32;
  c.head_dim = 128;
  c.max_batch = 4;
  c.max_tokens = 4096;
  c.scorer = pk::scorer_kind::window;
  c.max_window = 32;
  struct expect {
    pk::granularity gran;
    bool tp, pp;
    int64_t head_rows, histogram, tally, records;
    int calls;
  };
  const expect cases[] = {
      {pk::granularity::layer, true, false, 8 << 20, 0, 0, 64, 2},          // TP 2: the head rows, the status
      {pk::granularity::layer, false, true, 0, 8192, 2080, 64, 6},          // PP 2
      {pk::granularity::layer, true, true, 4 << 20, 8192, 2080, 128, 8},    // TP 2 x PP 2
      {pk::granularity::head, true, false, 0, 8192, 16416, 64, 6},          // TP 2
      {pk::granularity::head, false, true, 0, 8192, 16416, 64, 6},          // PP 2
      {pk::granularity::head, true, true, 0, 16384, 32832, 128, 12},        // TP 2 x PP 2
  };
  for (const expect& x : cases) {
    c.gran = x.gran;
    pk::compress_plan plan;
    REQUIRE(pk::make_plan(c, plan) == cudaSuccess);
    pk::compress_shard sh;
    if (x.tp) sh.tp = pk::make_communicator(c0);
    if (x.pp) {
      sh.pp = pk::make_communicator(c0);
      sh.layer_count = 16;
    }
    pk::compress_traffic t;
    REQUIRE(pk::compress_exchange(plan, sh, 4, t) == cudaSuccess);
    INFO("gran " << int(x.gran) << " tp " << x.tp << " pp " << x.pp);
    CHECK(t.head_rows == x.head_rows);
    CHECK(t.histogram == x.histogram);
    CHECK(t.tally == x.tally);
    CHECK(t.records == x.records);
    CHECK(t.collectives == x.calls);
    CHECK(t.total() == x.head_rows + 4 * x.histogram + x.tally + x.records);
  }
  pk::compress_plan plan;
  REQUIRE(pk::make_plan(c, plan) == cudaSuccess);
  pk::compress_traffic t;
  CHECK(pk::compress_exchange(plan, pk::compress_shard{}, 5, t) == cudaErrorInvalidValue);  // batch > max_batch
}
