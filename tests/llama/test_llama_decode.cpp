// prefixkv-llama's decode-time upkeep on the real model (models/stories260K), in process on the host backend:
// 230-token greedy generations after a short prompt, for every policy and budget, with the cache lengths checked
// against budgets computed here (not by the library) after every step, the cached rows checked against the rows
// written when their token arrived (K, V and the original position move together), and the kept tokens against
// each policy's definition where it is positional. Without upkeep or with nothing to evict, the logits are
// bit-identical to those of a run without upkeep. Skipped (77) when the model is missing.
#include <doctest/doctest.h>

#include "llama/runtime.hpp"
#include "llama/tokenizer.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#ifndef PKV_LLAMA_MODEL_DIR
#error "PKV_LLAMA_MODEL_DIR must name the model directory"
#endif

using namespace prefixkv_llama;

namespace {

const std::string model_dir = PKV_LLAMA_MODEL_DIR;
const char* prompt_text = "Once upon a time, there was a little boy named Tim. Tim had a red ball.";
constexpr int gen_steps = 230;

struct loaded {
  model m;
  tokenizer tk;
  loaded() {
    std::string err;
    if (!std::ifstream(model_dir + "/stories260K.bin").good()) {
      std::printf("SKIPPED: no model at %s\n", model_dir.c_str());
      std::exit(77);
    }
    REQUIRE(load_checkpoint(model_dir + "/stories260K.bin", m, err));
    REQUIRE(tk.load(model_dir + "/tok512.bin", m.cfg.vocab_size, err));
  }
};
const loaded& the_model() {
  static const loaded l;
  return l;
}

//! The paper's budget rule, transcribed: the largest n with float64 n - N * keep < 1 (product and difference
//! rounded once each).
int64_t paper_budget(int64_t N, double keep) {
  volatile double c = double(N) * keep;
  int64_t n = 0;
  while (true) {
    volatile double d = double(n + 1) - c;
    if (!(d < 1.0)) return n;
    ++n;
  }
}

//! One (layer, kv head) as the test follows it.
struct seg_track {
  int64_t n0 = 0;                  // rows when decoding started
  int64_t num = 0, den = 0;        // its budget fraction (rebalance: reset at every compression)
  int64_t p = 0;                   // fixed policies: the evicted row
  std::vector<int> start;          // positions of the rows when decoding started
  std::vector<int> window;         // fixed policies: the tokens that went through rows [p, ...), in order
};

struct run_case {
  std::string method = "prefixkv";  // the prefill compression
  double ratio = 0.5;
  std::string budget = "cap:64", policy = "score";
  int64_t recent = -1;  // the upkeep's protected recent window (-1: the compressor's)
};

class tracker {
 public:
  tracker(cpu_backend& be, const decode_options& o, int T) : be_(be), o_(o), c_(be.cfg()) {
    const int L = c_.n_layers, H = c_.n_kv_heads;
    const auto len = be.lengths();
    seg_.resize(size_t(L) * H);
    rows_.resize(size_t(L) * H);
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < H; ++h) {
        seg_track& s = seg_[size_t(l) * H + h];
        s.n0 = len[size_t(l) * H + h];
        s.num = s.n0;
        s.den = T;
        s.start = be.positions(l, h);
        if (o.policy == prefixkv::decode_policy::fixed_position) {
          s.p = o.distance > 0 ? o.distance : (s.n0 + o.distance >= 1 ? s.n0 + o.distance : s.n0 / 2);
          for (int64_t r = std::min<int64_t>(s.p, s.n0); r < s.n0; ++r) s.window.push_back(s.start[size_t(r)]);
        }
        for (int64_t r = 0; r < s.n0; ++r) remember(l, h, r);
      }
  }

  //! Budget of a segment before its floor after N tokens (computed here, not by the library).
  int64_t budget(int l, const seg_track& s, int64_t N) const {
    if (o_.budget == decode_budget_kind::profile) return paper_budget(N, 1.0 - o_.profile[size_t(l)]);
    const int64_t Ne = o_.budget == decode_budget_kind::cap && N > o_.cap ? o_.cap : N;
    return (Ne * s.num + s.den - 1) / s.den;
  }
  int64_t floor_of(const seg_track& s, int64_t n) const {
    if (o_.policy == prefixkv::decode_policy::fixed_position) return std::min(n, s.p);
    return std::min<int64_t>(n, o_.protect.sinks + o_.protect.recent);
  }
  int64_t target(int l, const seg_track& s, int64_t n, int64_t N) const {
    return std::min(n, std::max(budget(l, s, N), floor_of(s, n)));
  }

  //! After step k (1-based) that fed the token at position `pos`: lengths and rows.
  void check_step(int k, int pos, const std::vector<int32_t>& before) {
    k_seen_ = k;
    const int L = c_.n_layers, H = c_.n_kv_heads;
    const auto len = be_.lengths();
    const int64_t N = pos + 1;
    const bool amortised = o_.policy == prefixkv::decode_policy::amortised;
    const bool compressed = amortised && k % (o_.slack + 1) == 0;
    const bool layer_gran = o_.gran == prefixkv::granularity::layer;
    if (o_.rebalance && compressed) {  // one total per sequence: the sum of the budgets; fractions reset
      int64_t want = 0, got = 0;
      for (int l = 0; l < L; ++l)
        for (int h = 0; h < (layer_gran ? 1 : H); ++h) {
          const seg_track& s = seg_[size_t(l) * H + h];
          want += target(l, s, before[size_t(l) * H + h] + 1, N);
          got += len[size_t(l) * H + h];
        }
      CHECK(got == want);
      for (int l = 0; l < L; ++l)
        for (int h = 0; h < H; ++h) {
          seg_track& s = seg_[size_t(l) * H + h];
          s.num = len[size_t(l) * H + h];
          s.den = o_.budget == decode_budget_kind::cap && N > o_.cap ? o_.cap : N;
        }
    }
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < H; ++h) {
        CAPTURE(l);
        CAPTURE(h);
        const size_t i = size_t(l) * H + h;
        seg_track& s = seg_[i];
        const int64_t n = before[i] + 1;
        if (layer_gran) CHECK(len[i] == len[size_t(l) * H]);
        if (!o_.rebalance || !compressed) {
          const int64_t want = amortised && !compressed ? n : target(l, s, n, N);
          CHECK(len[i] == want);
        }
        // the newest token is the last row (unless a fixed policy's window is empty); every row is one written
        // earlier, moved whole
        const std::vector<int> ps = be_.positions(l, h);
        REQUIRE(int64_t(ps.size()) == len[i]);
        const bool fixed = o_.policy == prefixkv::decode_policy::fixed_position;
        if (!fixed || len[i] > s.p) {
          REQUIRE(!ps.empty());
          CHECK(ps.back() == pos);
          remember(l, h, int64_t(ps.size()) - 1);
        }
        std::set<int> distinct(ps.begin(), ps.end());
        CHECK(distinct.size() == ps.size());
        const int hs = c_.head_size();
        bool same_rows = true;
        for (size_t r = 0; r < ps.size(); ++r) {
          auto it = rows_[i].find(ps[r]);
          REQUIRE(it != rows_[i].end());
          const float* kr = be_.keys(l) + (size_t(h) * be_.capacity() + r) * hs;
          const float* vr = be_.values(l) + (size_t(h) * be_.capacity() + r) * hs;
          same_rows = same_rows && std::memcmp(kr, it->second.data(), sizeof(float) * hs) == 0 &&
                      std::memcmp(vr, it->second.data() + hs, sizeof(float) * hs) == 0;
        }
        CHECK(same_rows);
        // what each policy keeps
        if (fixed) {
          s.window.push_back(pos);
          const int64_t p = std::min<int64_t>(s.p, int64_t(ps.size()));
          CHECK(std::equal(ps.begin(), ps.begin() + p, s.start.begin()));  // the fixed prefix stays
          const size_t w = ps.size() - size_t(p);                           // then the newest tokens
          CHECK(std::equal(ps.begin() + p, ps.end(), s.window.end() - w));
        } else {
          const int64_t k = std::min<int64_t>(o_.protect.sinks, int64_t(ps.size()));
          CHECK(std::equal(ps.begin(), ps.begin() + k, s.start.begin()));  // the sinks stay
          const int64_t r = o_.protect.recent;  // the last `recent` rows: the newest tokens, in order
          if (k_seen_ >= r && int64_t(ps.size()) >= k + r)
            for (int64_t j = 0; j < r; ++j) CHECK(ps[ps.size() - size_t(r - j)] == pos - (r - 1 - j));
        }
        if (!(o_.policy == prefixkv::decode_policy::score && o_.order == prefixkv::decode_order::reuse))
          CHECK(std::is_sorted(ps.begin(), ps.end()));  // token order kept
        max_rows_ = std::max<int64_t>(max_rows_, len[i]);
        if (len[i] < n) ++evictions_;
      }
  }
  int64_t max_rows() const { return max_rows_; }
  int64_t evictions() const { return evictions_; }

 private:
  void remember(int l, int h, int64_t r) {
    const int hs = c_.head_size();
    const int pos = be_.positions(l, h)[size_t(r)];
    std::vector<float> kv(size_t(2 * hs));
    std::memcpy(kv.data(), be_.keys(l) + (size_t(h) * be_.capacity() + r) * hs, sizeof(float) * hs);
    std::memcpy(kv.data() + hs, be_.values(l) + (size_t(h) * be_.capacity() + r) * hs, sizeof(float) * hs);
    auto& m = rows_[size_t(l) * c_.n_kv_heads + h];
    REQUIRE(m.count(pos) == 0);
    m[pos] = std::move(kv);
  }
  cpu_backend& be_;
  decode_options o_;
  const config& c_;
  std::vector<seg_track> seg_;
  std::vector<std::map<int, std::vector<float>>> rows_;  // (layer, kv head): position -> K row, V row
  int64_t max_rows_ = 0, evictions_ = 0, k_seen_ = 0;
};

policy prefill_policy(const run_case& rc) {
  policy p;
  REQUIRE(parse_method(rc.method, p.method));
  p.scorer = scorer_name::window;
  p.evict_ratio = rc.ratio;
  if (p.method == method_kind::profile) p.profile = {0.5, 0.4, 0.3, 0.2, 0.1};
  return p;
}

decode_options options_of(const run_case& rc, const policy& p) {
  decode_options o;
  std::string err;
  REQUIRE(parse_decode_budget(rc.budget, o, err));
  REQUIRE(parse_decode_policy(rc.policy, o, err));
  o.profile = {0.6, 0.2, 0.5, 0.3, 0.7};
  o.protect = prefixkv::protect_policy{p.sinks, rc.recent >= 0 ? rc.recent : p.recent};
  o.gran = compresses(p) && per_head(p.method) ? prefixkv::granularity::head : prefixkv::granularity::layer;
  return o;
}

//! Prefill + compress + upkeep, then `gen_steps` greedy tokens with the checks after every step.
void run_checked(const run_case& rc) {
  INFO("method ", rc.method, " ratio ", rc.ratio, " budget ", rc.budget, " policy ", rc.policy, " recent ", rc.recent);
  const loaded& L = the_model();
  cpu_backend be(L.m);
  const std::vector<int> prompt = L.tk.encode(prompt_text, true, true);
  const int T = int(prompt.size());
  const policy p = prefill_policy(rc);
  const decode_options o = options_of(rc, p);
  std::vector<float> logits;
  std::string err;
  REQUIRE(prefill_and_compress(be, prompt, p, logits, err));
  REQUIRE(be.begin_decode(o, err));
  tracker tr(be, o, T);
  for (int k = 1; k <= gen_steps; ++k) {
    const auto before = be.lengths();
    const int pos = T + k - 1;
    REQUIRE(be.step(argmax(logits), pos, logits, err));
    CAPTURE(k);
    tr.check_step(k, pos, before);
  }
  CHECK(tr.evictions() > 0);
  if (o.budget == decode_budget_kind::cap && o.policy != prefixkv::decode_policy::amortised)
    CHECK(tr.max_rows() <= std::max<int64_t>(o.cap, T));  // fractions <= 1: a cap of at most C rows
}

//! Logits of `steps` greedy tokens after the prompt (fed tokens are the argmax of the previous logits).
std::vector<std::vector<float>> logits_of(const run_case& rc, bool upkeep, int steps) {
  const loaded& L = the_model();
  cpu_backend be(L.m);
  const std::vector<int> prompt = L.tk.encode(prompt_text, true, true);
  const policy p = prefill_policy(rc);
  std::vector<float> logits;
  std::string err;
  REQUIRE(prefill_and_compress(be, prompt, p, logits, err));
  if (upkeep) REQUIRE(be.begin_decode(options_of(rc, p), err));
  std::vector<std::vector<float>> out{logits};
  for (int k = 0; k < steps; ++k) {
    REQUIRE(be.step(argmax(logits), int(prompt.size()) + k, logits, err));
    out.push_back(logits);
  }
  return out;
}

const char* all_policies[] = {"fixed", "fixed:4", "score", "score-ordered", "amortised:0", "amortised:16",
                              "rebalance:16"};

}  // namespace

TEST_CASE("decode upkeep, cap: the lengths follow the budget at every step of a 230-token generation") {
  for (const char* pol : all_policies) {
    run_case rc;
    rc.policy = pol;
    rc.budget = "cap:64";
    run_checked(rc);  // layer-adaptive prefill (prefixkv, window scorer, ratio 0.5), then a cap
    rc.method = "full";
    rc.ratio = 0.0;
    rc.budget = "cap:40";
    run_checked(rc);  // no prefill compression: 40 rows per layer
    rc.recent = 16;     // a protected recent window
    run_checked(rc);
  }
}

TEST_CASE("decode upkeep, prefill fractions and profile budgets, layer and kv-head segments") {
  for (const char* pol : all_policies) {
    run_case rc;
    rc.policy = pol;
    rc.method = "prefixkv-head";
    rc.budget = "prefill";
    rc.ratio = 0.6;
    run_checked(rc);
    rc.budget = "cap:50";
    run_checked(rc);
    if (std::string(pol).rfind("rebalance", 0) == 0) continue;  // rebalance needs fractions from the prefill
    rc.method = "profile";
    rc.ratio = 0.5;
    rc.budget = "profile";
    run_checked(rc);
  }
}

TEST_CASE("decode upkeep with nothing to evict: logits bit-identical to no upkeep") {
  for (const char* pol : all_policies) {
    INFO("policy ", pol);
    run_case rc;
    rc.policy = pol;
    rc.method = "prefixkv";
    rc.ratio = 0.0;  // nothing compressed: every budget is every token
    rc.budget = "prefill";
    const auto base = logits_of(rc, false, 60);
    CHECK(logits_of(rc, true, 60) == base);
    rc.budget = "cap:512";  // a cap the context never reaches
    CHECK(logits_of(rc, true, 60) == base);
  }
  run_case rc;  // with compression, upkeep changes what the later tokens see
  rc.policy = "score";
  rc.budget = "cap:40";
  CHECK(logits_of(rc, true, 60) != logits_of(rc, false, 60));
}

TEST_CASE("decode upkeep: restore stops it, bad starts are refused") {
  const loaded& L = the_model();
  cpu_backend be(L.m);
  const std::vector<int> prompt = L.tk.encode(prompt_text, true, true);
  run_case rc;
  rc.method = "prefixkv-head";
  const policy p = prefill_policy(rc);
  std::vector<float> logits;
  std::string err;
  REQUIRE(prefill_and_compress(be, prompt, p, logits, err));
  decode_options o = options_of(rc, p);
  o.gran = prefixkv::granularity::layer;  // head-compressed caches have one length per kv head
  CHECK_FALSE(be.begin_decode(o, err));
  CHECK(err.find("granularity") != std::string::npos);
  o = options_of(rc, p);
  o.budget = decode_budget_kind::profile;
  o.profile = {0.5};
  CHECK_FALSE(be.begin_decode(o, err));
  CHECK(err.find("profile") != std::string::npos);
  o = options_of(rc, p);
  REQUIRE(be.begin_decode(o, err));
  be.save(0);
  const int T = int(prompt.size());
  for (int k = 0; k < 40; ++k) REQUIRE(be.step(argmax(logits), T + k, logits, err));
  const auto capped = be.lengths();
  be.restore(0);
  CHECK_FALSE(be.upkeep().active());
  const auto start = be.lengths();
  for (int k = 0; k < 40; ++k) REQUIRE(be.step(argmax(logits), T + k, logits, err));
  const auto grown = be.lengths();
  for (size_t i = 0; i < grown.size(); ++i) {
    CHECK(grown[i] == start[i] + 40);
    CHECK(capped[i] < grown[i]);
  }
  REQUIRE(be.begin_decode(o, err));  // starts again from the grown caches
  CHECK(be.upkeep().seen() == T + 40);
}
