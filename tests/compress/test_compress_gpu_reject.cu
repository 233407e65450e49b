// Bad input stops the whole chain: the device reports the same reason as the host backend, nothing is moved (the
// cache and the destination stay byte-identical) and the output lengths describe the unchanged cache. Also: one
// layer at a time, repeated compression, and host-visible rejections.
#include "compress/compress_gpu_util.cuh"

#include <cmath>
#include <initializer_list>

namespace {

using namespace compress_test;
using namespace prefixkv;

enum class fault { nan_p, negative_score, nan_score, long_length, short_window, budget, bad_page, twice_page, nan_k };

const char* fault_name(fault f) {
  switch (f) {
    case fault::nan_p: return "NaN in P";
    case fault::negative_score: return "negative caller score";
    case fault::nan_score: return "NaN caller score";
    case fault::long_length: return "length past the capacity";
    case fault::short_window: return "sequence shorter than the window";
    case fault::budget: return "infeasible budget";
    case fault::bad_page: return "page id out of range";
    case fault::twice_page: return "page used twice";
    case fault::nan_k: return "NaN in K";
  }
  return "?";
}

reason expected(fault f) {
  switch (f) {
    case fault::nan_p: case fault::nan_score: case fault::nan_k: return reason::nonfinite_input;
    case fault::negative_score: return reason::negative_input;
    case fault::long_length: case fault::bad_page: return reason::out_of_range;
    case fault::short_window: return reason::bad_parameter;
    case fault::budget: return reason::infeasible_budget;
    case fault::twice_page: return reason::overlapping_buffers;
  }
  return reason::none;
}

void run_fault(fault f, std::mt19937_64& rng) {
  const std::string what = fault_name(f);
  CAPTURE(what);
  combo cb;
  cb.s.L = 3;
  cb.s.B = 2;
  cb.s.H = 2;
  cb.s.G = 2;
  cb.s.T = 48;
  cb.s.D = 16;
  cb.s.window = 12;
  cb.s.page = 8;
  cb.scorer = f == fault::nan_p ? scorer_kind::attention
              : f == fault::short_window ? scorer_kind::window
              : f == fault::nan_k ? scorer_kind::key_norm
              : f == fault::negative_score || f == fault::nan_score ? scorer_kind::scores
                                                                     : scorer_kind::attention;
  cb.lay = f == fault::bad_page || f == fault::twice_page ? layout::nhd : layout::bhsd;
  model<f16, float> m(cb.lay, cb.s, rng, 1, false);
  compress_config cfg = m.config(cb.scorer, granularity::layer, allocation::prefix, true, nullptr);
  if (f == fault::budget) {
    cfg.budget = budget_kind::keep_tokens;
    cfg.keep_tokens = 2;  // fewer than the protected tokens of three layers
  }
  if (f == fault::bad_page || f == fault::twice_page)  // full sequences: every block is touched
    for (auto& n : m.lengths) n = int32_t(cb.s.T);
  // the fault (host image and device mirror alike)
  switch (f) {
    case fault::nan_p: m.p[7] = std::nanf(""); break;
    case fault::negative_score: m.scores[3] = -0.5f; break;
    case fault::nan_score: m.scores[5] = std::nanf(""); break;
    case fault::long_length: m.lengths[1] = int32_t(cb.s.T + 1); break;
    case fault::short_window: m.lengths[0] = int32_t(cb.s.window - 1); break;
    case fault::nan_k: m.cache.hs[0][1](0, 1, 2, 3) = f16::from_float(std::nanf("")); break;
    case fault::bad_page: m.cache.table[1] = int32_t(m.cache.num_pages + 5); break;
    case fault::twice_page: m.cache.table[2] = m.cache.table[0]; break;
    default: break;
  }
  m.image = m.cache.host;
  m.cache.upload(m.image);
  m.dp.upload(m.p);
  m.dscores.upload(m.scores);
  m.dlengths.upload(m.lengths);
  if (compact_test::is_paged(cb.lay)) m.cache.dtable.upload(m.cache.table);
  compress_plan plan;
  REQUIRE(make_plan(cfg, plan) == cudaSuccess);
  const int64_t S = cb.s.L * cb.s.B;
  std::vector<int32_t> want_len(S);
  for (int64_t l = 0; l < cb.s.L; ++l)
    for (int64_t b = 0; b < cb.s.B; ++b) want_len[l * cb.s.B + b] = m.lengths[b];
  // host backend
  std::vector<int32_t> h_len(S, -7);
  int32_t h_status = -7;
  m.cache.visit(true, [&](const auto& hc) {
    m.with_args(true, hc, hc, false, false, [&](auto& a) {
      a.out.lengths = h_len.data();
      a.out.status = &h_status;
      CHECK(compress_host(plan, a) == cudaErrorInvalidValue);
      CHECK(last_error().why == expected(f));
    });
  });
  CHECK(h_status == int32_t(expected(f)));
  CHECK(h_len == want_len);
  CHECK(m.cache.host == m.image);
  // device
  device_buffer<int32_t> d_len(S), d_status(1);
  m.cache.visit(false, [&](const auto& dc) {
    m.with_args(false, dc, dc, false, false, [&](auto& a) {
      a.out.lengths = d_len.get();
      a.out.status = d_status.get();
      run_three_ways([&](void* t, size_t& n, cudaStream_t st) { return compress(t, n, plan, a, st); },
                     [&] {
                       m.cache.upload(m.image);
                       d_len.poison();
                       d_status.poison();
                     },
                     [&](const char* how) {
                       const std::string when = how;
                       CAPTURE(when);
                       CHECK(d_status.download()[0] == int32_t(expected(f)));
                       CHECK(d_len.download() == want_len);
                       CHECK(m.cache.download() == m.image);
                     });
    });
  });
}

}  // namespace

// Bad device data stops the chain with the host backend's reason, cache untouched. Three test cases, so that the
// sanitizers (one process per test case) run them side by side.
TEST_CASE("compress: bad scorer inputs (NaN in P or K, bad caller scores) stop the chain, cache untouched") {
  auto rng = prefixkv_test::make_rng(0xC0BAD);
  for (fault f : {fault::nan_p, fault::negative_score, fault::nan_score, fault::nan_k}) run_fault(f, rng);
}

TEST_CASE("compress: bad lengths and an infeasible budget stop the chain, cache untouched") {
  auto rng = prefixkv_test::make_rng(0xC0BAE);
  for (fault f : {fault::long_length, fault::short_window, fault::budget}) run_fault(f, rng);
}

TEST_CASE("compress: bad block tables (a page out of range, a page twice) stop the chain, cache untouched") {
  auto rng = prefixkv_test::make_rng(0xC0BAF);
  for (fault f : {fault::bad_page, fault::twice_page}) run_fault(f, rng);
}

TEST_CASE("compress: host-visible problems are rejected before anything is enqueued") {
  auto rng = prefixkv_test::make_rng(0xC0BA2);
  shape s;
  model<f16, float> m(layout::bhsd, s, rng, 1, false);
  compress_config cfg = m.config(scorer_kind::attention, granularity::layer, allocation::prefix, true, nullptr);
  compress_plan plan;
  REQUIRE(make_plan(cfg, plan) == cudaSuccess);
  size_t bytes = 0;
  m.cache.visit(false, [&](const auto& dc) {
    m.with_args(false, dc, dc, false, false, [&](auto& a) {
      PKV_CUDA_CHECK(compress(nullptr, bytes, plan, a));
      device_buffer<unsigned char> temp(bytes);
      // too small a workspace
      size_t small = bytes - 256;
      CHECK(compress(temp.get(), small, plan, a) == cudaErrorInvalidValue);
      CHECK(last_error().why == reason::workspace_too_small);
      // a plan for other head counts
      compress_plan other = plan;
      other.cfg.kv_heads = s.H + 1;
      CHECK(compress(temp.get(), bytes, other, a) == cudaErrorInvalidValue);
      CHECK(last_error().why == reason::shape_mismatch);
      // missing probabilities
      auto b = a;
      b.attention = nullptr;
      CHECK(compress(temp.get(), bytes, plan, b) == cudaErrorInvalidValue);
      CHECK(last_error().why == reason::null_pointer);
      // one layer at a time needs a per-layer budget
      CHECK(compress_layer(temp.get(), bytes, plan, a, 0) == cudaErrorInvalidValue);
      CHECK(last_error().why == reason::bad_parameter);
      PKV_CUDA_CHECK(cudaDeviceSynchronize());
      CHECK(m.cache.download() == m.image);
    });
  });
}

namespace {

// compress_layer on every layer, then the whole-model call, for each allocation in `allocs` and both granularities
// (racecheck, PREFIXKV_TEST_QUICK=2: uniform per layer and profile per head).
void check_compress_layer(std::initializer_list<allocation> allocs, uint64_t seed) {
  auto rng = prefixkv_test::make_rng(seed);
  for (allocation al : allocs)
    for (granularity gr : {granularity::layer, granularity::head}) {
      const bool tiny_pick = (al == allocation::uniform && gr == granularity::layer) ||
                             (al == allocation::profile && gr == granularity::head);
      if (prefixkv_test::tiny_mode() && !tiny_pick) continue;
      combo cb = random_combo(rng, false);
      cb.alloc = al;
      cb.gran = gr;
      cb.in_place = true;
      cb.scorer = scorer_kind::attention;
      cb.s.L = prefixkv_test::tiny_mode() ? 2 : 4;  // racecheck: two layers (one call per layer, then the whole)
      // sequences of >= 16 tokens: every layer's budget is feasible (3 protected tokens, up to 0.7 evicted), so the
      // whole-model call must succeed (a chain failure is checked in the bad-data cases above)
      cb.s.T = std::max<int64_t>(cb.s.T, 24);
      if (prefixkv_test::tiny_mode()) cb.s.T = std::min<int64_t>(cb.s.T, 48);
      cb.s.window = 16;
      CAPTURE(cb.name());
      const int64_t hg = gr == granularity::head ? cb.s.H : 1;
      model<bf16, float> m(cb.lay, cb.s, rng, hg, cb.per_segment);
      std::vector<double> profile = {0.1, 0.5, 0.3, 0.7};
      compress_config cfg = m.config(cb.scorer, gr, al, true, profile.data());
      compress_plan plan;
      REQUIRE(make_plan(cfg, plan) == cudaSuccess);
      const int64_t S = cb.s.L * cb.s.B * hg;
      std::vector<int32_t> whole(S, -7), h_len(S, -7);
      // whole-model host call
      m.cache.visit(true, [&](const auto& hc) {
        m.with_args(true, hc, hc, cb.per_segment, false, [&](auto& a) {
          a.out.lengths = whole.data();
          REQUIRE(compress_host(plan, a) == cudaSuccess);
        });
      });
      const std::vector<unsigned char> whole_image = m.cache.host;
      std::copy(m.image.begin(), m.image.end(), m.cache.host.begin());
      // layer by layer, host and device
      device_buffer<int32_t> d_len(S);
      d_len.poison();
      size_t bytes = 0;
      m.cache.visit(false, [&](const auto& dc) {
        m.with_args(false, dc, dc, cb.per_segment, false, [&](auto& a) {
          PKV_CUDA_CHECK(compress(nullptr, bytes, plan, a));
        });
      });
      device_buffer<unsigned char> temp(bytes);
      for (int64_t l = 0; l < cb.s.L; ++l) {
        m.cache.visit(true, [&](const auto& hc) {
          m.with_args(true, hc, hc, cb.per_segment, false, [&](auto& a) {
            a.out.lengths = h_len.data();
            REQUIRE(compress_layer_host(plan, a, l) == cudaSuccess);
          });
        });
        m.cache.visit(false, [&](const auto& dc) {
          m.with_args(false, dc, dc, cb.per_segment, false, [&](auto& a) {
            a.out.lengths = d_len.get();
            PKV_CUDA_CHECK(compress_layer(temp.get(), bytes, plan, a, l));
          });
        });
      }
      PKV_CUDA_CHECK(cudaDeviceSynchronize());
      CHECK(h_len == whole);
      CHECK(d_len.download() == whole);
      CHECK(m.cache.host == whole_image);
      CHECK(m.cache.download() == whole_image);
    }
}

}  // namespace

TEST_CASE("compress_layer: one layer at a time == the host backend and the whole-model call (uniform, pyramid)") {
  check_compress_layer({allocation::uniform, allocation::pyramid}, 0xC014);
}

TEST_CASE("compress_layer: one layer at a time == the host backend and the whole-model call (profile)") {
  check_compress_layer({allocation::profile}, 0xC015);
}

TEST_CASE("compress: compressing twice (lengths per segment from the first call) == the host backend") {
  auto rng = prefixkv_test::make_rng(0xC0772);
  for (granularity gr : {granularity::layer, granularity::head}) {
    if (prefixkv_test::tiny_mode() && gr == granularity::layer) continue;  // racecheck: the head path
    combo cb = random_combo(rng, false);
    cb.gran = gr;
    cb.in_place = true;
    cb.scorer = scorer_kind::recency;
    // both rounds must be feasible: evicting a quarter of what the first round kept needs more candidates than the
    // protected tokens (4 sinks + 1 recent) leave in short sequences, so sequences get 16 tokens or more
    cb.s.T = std::max<int64_t>(cb.s.T, 24);
    cb.s.window = 16;
    CAPTURE(cb.name());
    const int64_t hg = gr == granularity::head ? cb.s.H : 1;
    model<bf16, float> m(cb.lay, cb.s, rng, hg, false);
    compress_config cfg = m.config(cb.scorer, gr, allocation::prefix, true, nullptr);
    cfg.evict_ratio = 0.25;
    compress_plan plan;
    REQUIRE(make_plan(cfg, plan) == cudaSuccess);
    const int64_t S = cb.s.L * cb.s.B * hg;
    std::vector<int32_t> first(S), second(S);
    device_buffer<int32_t> d_first(S), d_second(S);
    size_t bytes = 0;
    m.cache.visit(false, [&](const auto& dc) {
      m.with_args(false, dc, dc, false, false, [&](auto& a) { PKV_CUDA_CHECK(compress(nullptr, bytes, plan, a)); });
    });
    device_buffer<unsigned char> temp(bytes);
    for (int round = 0; round < 2; ++round) {
      const bool per_seg = round == 1;
      m.cache.visit(true, [&](const auto& hc) {
        m.with_args(true, hc, hc, per_seg, false, [&](auto& a) {
          if (per_seg) a.lengths = first.data();
          a.out.lengths = per_seg ? second.data() : first.data();
          REQUIRE(compress_host(plan, a) == cudaSuccess);
        });
      });
      m.cache.visit(false, [&](const auto& dc) {
        m.with_args(false, dc, dc, per_seg, false, [&](auto& a) {
          if (per_seg) a.lengths = d_first.get();
          a.out.lengths = per_seg ? d_second.get() : d_first.get();
          PKV_CUDA_CHECK(compress(temp.get(), bytes, plan, a));
        });
      });
    }
    PKV_CUDA_CHECK(cudaDeviceSynchronize());
    CHECK(d_first.download() == first);
    CHECK(d_second.download() == second);
    CHECK(m.cache.download() == m.cache.host);
    int64_t sum1 = 0, sum2 = 0;
    for (int64_t i = 0; i < S; ++i) sum1 += first[i], sum2 += second[i];
    CHECK(sum2 <= sum1);
  }
}
