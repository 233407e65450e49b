// Accumulated attention at long query axes (the paper's LLaVA-1.5 shape: 32 q heads, ~700 queries and keys; 1500
// queries), bit-identical to the host twin: every load width (16-, 8-, 4-byte vectors with the element tail tile,
// element loads for odd, misaligned or strided keys), several rounds of query chunks, worker lanes 32/16/8 (test
// policies of the dispatch), layer and per-head rows, ragged batches, several layers in one call, device-side row
// lengths past the key extent, and NaN/Inf in any element read (finite sums that overflow are not flagged).
#include "score_test_util.cuh"

#include <cstdio>
#include <cstring>
#include <string>

using namespace score_test;

namespace {

template <int Lanes, int Workers>
struct attn_policy : pk::detail::attention_policy {
  static constexpr int lanes = Lanes;
  static constexpr int max_workers = Workers;
};

struct attn_cfg {
  int64_t layers = 1;          // views in one accumulated_attention_layers call; 0: accumulated_attention, layer 1 of 2
  int64_t B = 1, Hq = 32, heads_out = 1;  // heads_out: 1 = layer rows, else the kv-head count (G = Hq / heads_out)
  int64_t Q = 700, K = 700;    // queries, key extent
  int64_t pad = 0;             // stored keys per row past K (NaN)
  int storage = 0;             // 0: (B, Hq, Q, K + pad); 1: (B, Q, Hq, K + pad); 2: (B, Hq, K + pad, Q), keys strided
  bool misalign = false;       // layers >= 1 start one element late (element loads for every layer)
  bool seq_major = false;
  int lengths = 0;             // 0: every row K keys; 1: random in [0, K]; 2: random in [K - 40, K]
  bool bad_row = false;        // one device-side row length past K: status_bad_length, that row zeros over K keys
};

std::string describe(const attn_cfg& c) {
  char s[256];
  std::snprintf(s, sizeof s,
                "layers %lld B %lld Hq %lld out %lld Q %lld K %lld pad %lld storage %d mis %d seq %d len %d bad %d",
                (long long)c.layers, (long long)c.B, (long long)c.Hq, (long long)c.heads_out, (long long)c.Q,
                (long long)c.K, (long long)c.pad, c.storage, int(c.misalign), int(c.seq_major), c.lengths,
                int(c.bad_row));
  return s;
}

// Probabilities in [0, 1) from the generator's bits (fast enough for tens of millions of elements).
template <class T>
std::vector<T> random_probs(std::mt19937_64& rng, size_t n) {
  std::vector<T> v(n);
  for (auto& x : v) x = from_float<T>(float(rng() >> 40) * 5.9604644775390625e-8f);
  return v;
}

template <class T>
pk::kv_view<const T> p_view(const T* base, const attn_cfg& c) {
  const int64_t KS = c.K + c.pad;
  if (c.storage == 1) return pk::make_kv_view<const T>(base, c.B, c.Hq, c.Q, c.K, c.Q * c.Hq * KS, KS, c.Hq * KS, 1);
  if (c.storage == 2) return pk::make_kv_view<const T>(base, c.B, c.Hq, c.Q, c.K, c.Hq * KS * c.Q, KS * c.Q, 1, c.Q);
  return pk::make_kv_view<const T>(base, c.B, c.Hq, c.Q, c.K, c.Hq * c.Q * KS, c.Q * KS, KS, 1);
}

void expect_same(const std::vector<float>& got, const std::vector<float>& want) {
  REQUIRE(got.size() == want.size());
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], 4) != 0 && bad++ < 5)
      FAIL_CHECK("element ", i, ": gpu ", got[i], " host ", want[i]);
  CHECK(bad == 0);
}

template <class T, class Policy = pk::detail::attention_policy>
void attention_big_case(std::mt19937_64& rng, attn_cfg c) {
  if (quick_mode()) c.Q = std::min<int64_t>(c.Q, 70);  // sanitizer runs: fewer queries, every path kept
  INFO(describe(c));
  const int64_t GL = c.layers > 0 ? c.layers : 2, SL = c.layers > 0 ? c.layers : 1, layer0 = c.layers > 0 ? 0 : 1;
  const pk::segment_grid grid{GL, c.B, c.heads_out, c.seq_major};
  const int64_t G = c.Hq / c.heads_out, KS = c.K + c.pad;
  const int64_t bad_id =
      c.bad_row ? grid.id(layer0 + int64_t(rng() % SL), int64_t(rng() % c.B), int64_t(rng() % c.heads_out)) : -1;
  std::vector<int64_t> begins(size_t(grid.count())), lens(size_t(grid.count()));
  int64_t off = 0;
  for (int64_t id = 0; id < grid.count(); ++id) {
    lens[id] = c.lengths == 0 || id == bad_id ? c.K
               : c.lengths == 1               ? int64_t(rng() % (c.K + 1))
                                              : std::max<int64_t>(0, c.K - int64_t(rng() % 41));
    begins[id] = off;
    off += lens[id] + 3;  // gaps stay poisoned
  }
  // The bad row: the host twin scores it at K keys (then the expectation is K zeros); the device reads a length
  // past K (its row has K + 3 floats of room, only K may be written).
  std::vector<int64_t> dlens = lens;
  if (bad_id >= 0) dlens[bad_id] = c.K + 1 + int64_t(rng() % 4);
  const size_t elems = size_t(c.B * c.Hq * c.Q * KS) + 1;
  std::vector<std::vector<T>> ph(static_cast<size_t>(SL));
  std::vector<device_buffer<T>> dp(static_cast<size_t>(SL));
  std::vector<pk::kv_view<const T>> hv(static_cast<size_t>(SL)), gv(static_cast<size_t>(SL));
  for (int64_t s = 0; s < SL; ++s) {
    const size_t lead = c.misalign && s > 0 ? 1 : 0;
    ph[s] = random_probs<T>(rng, elems);
    hv[s] = p_view<T>(ph[s].data() + lead, c);
    const T nan = from_float<T>(NAN);
    for (int64_t b = 0; b < c.B; ++b)  // keys past each row and the padding: NaN (never read)
      for (int64_t oh = 0; oh < c.heads_out; ++oh) {
        const int64_t n = lens[size_t(grid.id(layer0 + s, b, oh))];
        for (int64_t g = 0; g < G; ++g)
          for (int64_t qi = 0; qi < c.Q; ++qi)
            for (int64_t t = n; t < KS; ++t)
              ph[s][lead + size_t(hv[s].offset(b, oh * G + g, qi, 0) + t * hv[s].stride_dim)] = nan;
      }
    dp[s] = device_buffer<T>(ph[s]);
    gv[s] = p_view<T>(dp[s].get() + lead, c);
  }
  const float kPoison = poison_value<float>();
  std::vector<float> expect(size_t(off), kPoison);
  const auto hrows = pk::make_ragged_segments(grid.count(), begins.data(), lens.data());
  REQUIRE((c.layers > 0 ? pk::accumulated_attention_layers_host(hv.data(), grid, hrows, expect.data())
                        : pk::accumulated_attention_host(hv[0], grid, layer0, hrows, expect.data())) == cudaSuccess);
  if (bad_id >= 0)
    for (int64_t t = 0; t < c.K; ++t) expect[size_t(begins[bad_id] + t)] = 0.0f;
  device_buffer<int64_t> dbeg(begins), dlen(dlens);
  device_buffer<float> out(expect.size());
  device_buffer<unsigned> status(1);
  run_three_ways(
      [&](void* t, size_t& bytes, cudaStream_t s) {
        const auto drows = pk::make_ragged_segments(grid.count(), dbeg.get(), dlen.get());
        return pk::detail::accumulated_attention_run<Policy>(t, bytes, gv.data(), grid, layer0, SL, drows, out.get(),
                                                             status.get(), s);
      },
      [&] {
        out.poison();
        PKV_CUDA_CHECK(cudaMemset(status.get(), 0, 4));
      },
      [&](const char* mode) {
        INFO("mode ", mode);
        CHECK(status.download()[0] == (c.bad_row ? unsigned(pk::status_bad_length) : 0u));
        expect_same(out.download(), expect);
      });
}

// One element read set to `bad` (NaN, +inf, -inf) at (b, h, q, t): the device flags status_nonfinite, the host twin
// rejects. `bad` finite: no flag, and the scores (possibly +inf from an overflowing sum) equal the host's bits.
template <class T>
void attention_nonfinite_case(int64_t K, int64_t n, int64_t h, int64_t q, int64_t t, float bad, float bad2 = 0.0f) {
  const int64_t B = 1, Hq = 4, Q = 70;
  INFO("K ", K, " n ", n, " h ", h, " q ", q, " t ", t, " value ", bad);
  std::vector<T> ph(size_t(B * Hq * Q * K), from_float<T>(0.25f));
  auto hv = pk::make_kv_view_bhsd<const T>(ph.data(), B, Hq, Q, K);
  ph[size_t(hv.offset(0, h, q, t))] = from_float<T>(bad);
  if (bad2 != 0.0f) ph[size_t(hv.offset(0, (h + 1) % Hq, Q - 1 - q, t))] = from_float<T>(bad2);
  const pk::segment_grid grid{1, B, 1};
  const auto rows = pk::make_uniform_segments(1, n);
  std::vector<float> expect(size_t(n), poison_value<float>());
  const cudaError_t host = pk::accumulated_attention_host(hv, grid, 0, rows, expect.data());
  const bool finite = std::isfinite(bad) && std::isfinite(bad2);
  CHECK(host == (finite ? cudaSuccess : cudaErrorInvalidValue));
  device_buffer<T> dp(ph);
  device_buffer<float> out(static_cast<size_t>(n));
  device_buffer<unsigned> status(1);
  const auto gv = pk::make_kv_view_bhsd<const T>(dp.get(), B, Hq, Q, K);
  run_three_ways(
      [&](void* tmp, size_t& bytes, cudaStream_t s) {
        return pk::accumulated_attention(tmp, bytes, gv, grid, 0, rows, out.get(), status.get(), s);
      },
      [&] {
        out.poison();
        PKV_CUDA_CHECK(cudaMemset(status.get(), 0, 4));
      },
      [&](const char* mode) {
        INFO("mode ", mode);
        CHECK(status.download()[0] == (finite ? 0u : unsigned(pk::status_nonfinite)));
        if (finite) expect_same(out.download(), expect);
      });
}
}  // namespace

TEST_CASE("accumulated attention: LLaVA-1.5 shape (32 q heads, 700 queries x 700 keys), all layers in one call") {
  auto rng = make_rng(311);
  attn_cfg c;  // f16, 1400-byte key rows: 8-byte vectors
  c.layers = 2;
  attention_big_case<pk::f16>(rng, c);
  c.lengths = 2;  // ragged rows: the element tail tile
  c.seq_major = true;
  attention_big_case<pk::f16>(rng, c);
  c.K = 704;  // 16-byte vectors, 32 kv heads' rows (G = 1)
  c.heads_out = 32;
  c.lengths = 1;
  attention_big_case<pk::bf16>(rng, c);
}

TEST_CASE("accumulated attention: 1500 queries, odd and misaligned keys (element loads), one layer") {
  auto rng = make_rng(312);
  attn_cfg c;
  c.layers = 0;
  c.B = 2;
  c.Hq = 8;
  c.Q = 1500;
  c.K = 1501;
  c.lengths = 1;
  attention_big_case<pk::f16>(rng, c);
  c.K = 1024;  // aligned rows, but layers >= 1 misaligned: element loads everywhere
  c.layers = 2;
  c.misalign = true;
  c.heads_out = 2;
  attention_big_case<pk::bf16>(rng, c);
}

TEST_CASE("accumulated attention: every load width, fp32 / f16 / bf16, strided P, per-head rows") {
  auto rng = make_rng(313);
  for (int rep = 0; rep < 2; ++rep) {
    attn_cfg c;
    c.layers = 1 + rep;
    c.B = 2;
    c.Hq = 4;
    c.Q = 333 + rep * 64;
    c.seq_major = rep == 1;
    c.lengths = 2;
    c.heads_out = rep == 0 ? 4 : 2;
    for (int64_t K : {int64_t(704), int64_t(702), int64_t(703)}) {  // fp32: 16-, 8-byte vectors, elements
      c.K = K;
      attention_big_case<float>(rng, c);
    }
    for (int64_t K : {int64_t(1024), int64_t(1020), int64_t(1022), int64_t(1021)}) {  // 16, 8, 4 bytes, elements
      c.K = K;
      attention_big_case<pk::f16>(rng, c);
      attention_big_case<pk::bf16>(rng, c);
    }
    c.K = 500;
    c.pad = 4;  // (B, Q, H, 504): 16-byte rows
    c.storage = 1;
    c.Hq = 6;
    c.heads_out = rep == 0 ? 3 : 1;
    c.lengths = 1;
    attention_big_case<pk::f16>(rng, c);
    c.storage = 2;  // keys strided (key stride = Q)
    c.pad = 3;
    c.Q = 64;
    attention_big_case<pk::bf16>(rng, c);
    attention_big_case<float>(rng, c);
  }
}

TEST_CASE("accumulated attention: several layers, batch, zero queries, and rows past the key extent") {
  auto rng = make_rng(314);
  attn_cfg c;
  c.layers = 7;
  c.B = 3;
  c.Hq = 8;
  c.heads_out = 4;
  c.Q = 150;
  c.K = 296;
  c.lengths = 1;
  attention_big_case<pk::f16>(rng, c);
  c.bad_row = true;
  attention_big_case<pk::f16>(rng, c);
  c.K = 297;
  attention_big_case<float>(rng, c);
  c.bad_row = false;
  c.Q = 0;  // no queries: every score is 0
  attention_big_case<pk::bf16>(rng, c);
}

TEST_CASE("accumulated attention: the launch shape does not change a bit (lanes 32/16/8, few workers, many rounds)") {
  auto rng = make_rng(315);
  attn_cfg c;
  c.layers = 2;
  c.B = 2;
  c.Hq = 6;
  c.heads_out = 2;
  c.Q = 230;
  c.K = 300;
  c.lengths = 2;
  attention_big_case<pk::f16, attn_policy<32, 2>>(rng, c);
  attention_big_case<pk::f16, attn_policy<16, 3>>(rng, c);
  attention_big_case<pk::f16, attn_policy<8, 1>>(rng, c);
  attention_big_case<pk::f16, attn_policy<8, 0>>(rng, c);
  attention_big_case<pk::f16, attn_policy<32, 0>>(rng, c);
  c.K = 301;
  attention_big_case<float, attn_policy<16, 5>>(rng, c);
  attention_big_case<pk::bf16, attn_policy<32, 1>>(rng, c);
}

TEST_CASE("accumulated attention: NaN/Inf in any element read is flagged; finite sums that overflow are not") {
  for (float bad : {NAN, INFINITY, -INFINITY}) {
    // f16 / bf16 rows of 208 keys (16-byte vectors), 203 scored: vector tiles and the element tail tile
    for (int64_t t : {int64_t(0), int64_t(5), int64_t(199), int64_t(202)}) {
      attention_nonfinite_case<pk::f16>(208, 203, 3, 69, t, bad);
      attention_nonfinite_case<pk::bf16>(208, 203, 1, 31, t, bad);
      attention_nonfinite_case<float>(208, 203, 2, 32, t, bad);
    }
    attention_nonfinite_case<pk::f16>(207, 207, 0, 0, 206, bad);  // element loads
    attention_nonfinite_case<float>(207, 150, 3, 40, 149, bad);
  }
  // fp32 / bf16: finite elements whose sums overflow to +-inf (the running sum, or a chunk sum: queries 34 and 35
  // share a chunk) are no NaN/Inf input; the infinite scores equal the host's bits
  attention_nonfinite_case<float>(208, 203, 0, 3, 7, 3.0e38f, 3.0e38f);
  attention_nonfinite_case<pk::bf16>(208, 203, 0, 3, 201, 3.0e38f, 3.0e38f);
  attention_nonfinite_case<float>(207, 207, 0, 34, 100, -3.0e38f, -3.0e38f);
  attention_nonfinite_case<pk::bf16>(208, 203, 2, 34, 100, 3.0e38f, 3.0e38f);
}
