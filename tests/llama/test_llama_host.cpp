// prefixkv-llama's runtime on synthetic inputs (no model file needed): the checkpoint and tokenizer loaders
// (good files and every kind of malformed one), the llama2.c encoder, ROUGE-L, sampling, the method -> compressor
// mapping, and — the core of the runtime — decoding on compressed caches: after every method the backend's logits
// must equal those of an independent reference forward pass that attends only over the tokens the compressor
// kept in each (layer, kv head), at the original RoPE positions.
#include <doctest/doctest.h>

#include "llama/runtime.hpp"
#include "llama/tokenizer.hpp"

#include "support/test_random.hpp"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <vector>

using namespace prefixkv_llama;
using namespace prefixkv_test;

namespace {

// ---- files ---------------------------------------------------------------------------------------------------
void write_bytes(const std::string& path, const std::vector<unsigned char>& b) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
}
template <class T>
void put(std::vector<unsigned char>& b, T x) {
  unsigned char tmp[sizeof(T)];
  std::memcpy(tmp, &x, sizeof(T));
  b.insert(b.end(), tmp, tmp + sizeof(T));
}

struct tiny_shape {
  int dim = 16, hidden = 24, layers = 3, heads = 4, kv_heads = 2, vocab = 300, seq_len = 64;
  bool shared = true;
};

//! A checkpoint with random weights (small, so that attention is neither flat nor one-hot).
std::vector<unsigned char> checkpoint_bytes(const tiny_shape& s, std::mt19937_64& rng) {
  std::vector<unsigned char> b;
  const int32_t h[7] = {s.dim, s.hidden, s.layers, s.heads, s.kv_heads, s.shared ? s.vocab : -s.vocab, s.seq_len};
  for (int32_t x : h) put(b, x);
  config c;
  c.dim = s.dim, c.hidden_dim = s.hidden, c.n_layers = s.layers, c.n_heads = s.heads, c.n_kv_heads = s.kv_heads;
  c.vocab_size = s.vocab, c.seq_len = s.seq_len, c.shared_classifier = s.shared;
  int64_t n = 0;
  REQUIRE(checkpoint_floats(c, n));
  std::uniform_real_distribution<float> d(-0.5f, 0.5f);
  for (int64_t i = 0; i < n; ++i) put(b, d(rng));
  return b;
}

//! A tokenizer: 0 <unk>, 1 BOS, 2 EOS, 3..258 byte fallback, then the pieces below, then filler tokens.
struct piece_def {
  const char* text;
  float score;
};
const piece_def tiny_pieces[] = {
    {" ", -10.f}, {"a", -1.f},  {"b", -1.f},   {"c", -1.f},    {"ab", -3.f}, {"bc", -2.f},
    {" a", -4.f}, {"abc", -5.f}, {" abc", -6.f}, {"\xc3\xa9", -1.f},  // "é"
};
std::vector<unsigned char> tokenizer_bytes(int vocab) {
  std::vector<unsigned char> b;
  put(b, int32_t(8));
  auto tok = [&](const std::string& s, float score) {
    put(b, score);
    put(b, int32_t(s.size()));
    b.insert(b.end(), s.begin(), s.end());
  };
  tok("<unk>", 0.f);
  tok("\n<s>\n", 0.f);
  tok("\n</s>\n", 0.f);
  for (int i = 0; i < 256; ++i) {
    char buf[8];
    std::snprintf(buf, sizeof(buf), "<0x%02X>", i);
    tok(buf, 0.f);
  }
  int id = 259;
  for (const auto& p : tiny_pieces) tok(p.text, p.score), ++id;
  for (; id < vocab; ++id) tok("zz" + std::to_string(id), -100.f);
  return b;
}

int piece_id(const char* text) {
  int id = 259;
  for (const auto& p : tiny_pieces) {
    if (std::strcmp(p.text, text) == 0) return id;
    ++id;
  }
  return -1;
}

// ---- an independent reference forward pass over masked caches (double accumulation) -------------------------
struct reference {
  const model& m;
  // history[l][h][pos] = post-RoPE K/V of that position; alive[l][h][pos] = still in that cache
  std::vector<std::vector<std::vector<std::vector<double>>>> K, V;
  std::vector<std::vector<std::vector<char>>> alive;
  explicit reference(const model& mm) : m(mm) {
    const config& c = m.cfg;
    K.assign(c.n_layers, std::vector<std::vector<std::vector<double>>>(c.n_kv_heads));
    V = K;
    alive.assign(c.n_layers, std::vector<std::vector<char>>(c.n_kv_heads));
  }
  static void matvec(std::vector<double>& o, const float* w, const std::vector<double>& x, int n, int d) {
    o.assign(d, 0.0);
    for (int i = 0; i < d; ++i)
      for (int j = 0; j < n; ++j) o[i] += double(w[size_t(i) * n + j]) * x[j];
  }
  static std::vector<double> rms(const std::vector<double>& x, const float* w) {
    double ss = 0;
    for (double v : x) ss += v * v;
    ss = 1.0 / std::sqrt(ss / double(x.size()) + 1e-5);
    std::vector<double> o(x.size());
    for (size_t i = 0; i < x.size(); ++i) o[i] = double(w[i]) * ss * x[i];
    return o;
  }
  void rope(std::vector<double>& v, int pos) const {
    const int hs = m.cfg.head_size();
    for (size_t i = 0; i < v.size(); i += 2) {
      const double freq = 1.0 / std::pow(10000.0, double(i % hs) / double(hs));
      const double a = v[i], b = v[i + 1], c = std::cos(pos * freq), s = std::sin(pos * freq);
      v[i] = a * c - b * s;
      v[i + 1] = a * s + b * c;
    }
  }
  std::vector<double> forward(int token, int pos) {
    const config& c = m.cfg;
    const weights& w = m.w;
    const int D = c.dim, KV = c.kv_dim(), hs = c.head_size(), H = c.hidden_dim;
    std::vector<double> x(D), q, k, v, o(D), h1, h3, t;
    for (int i = 0; i < D; ++i) x[i] = w.emb[size_t(token) * D + i];
    for (int l = 0; l < c.n_layers; ++l) {
      const auto xb = rms(x, w.rms_att + size_t(l) * D);
      matvec(q, w.wq + size_t(l) * D * D, xb, D, D);
      matvec(k, w.wk + size_t(l) * KV * D, xb, D, KV);
      matvec(v, w.wv + size_t(l) * KV * D, xb, D, KV);
      rope(q, pos);
      rope(k, pos);
      for (int g = 0; g < c.n_kv_heads; ++g) {
        auto& kh = K[l][g];
        if (int(kh.size()) <= pos) kh.resize(pos + 1), V[l][g].resize(pos + 1), alive[l][g].resize(pos + 1, 0);
        kh[pos].assign(k.begin() + g * hs, k.begin() + (g + 1) * hs);
        V[l][g][pos].assign(v.begin() + g * hs, v.begin() + (g + 1) * hs);
        alive[l][g][pos] = 1;
      }
      for (int hq = 0; hq < c.n_heads; ++hq) {
        const int g = hq / c.group();
        std::vector<double> s;
        std::vector<int> at;
        for (size_t p = 0; p < K[l][g].size(); ++p)
          if (alive[l][g][p]) {
            double dot = 0;
            for (int i = 0; i < hs; ++i) dot += q[hq * hs + i] * K[l][g][p][i];
            s.push_back(dot / std::sqrt(double(hs)));
            at.push_back(int(p));
          }
        double mx = -1e300, sum = 0;
        for (double e : s) mx = std::max(mx, e);
        for (double& e : s) sum += (e = std::exp(e - mx));
        for (int i = 0; i < hs; ++i) {
          double acc = 0;
          for (size_t j = 0; j < s.size(); ++j) acc += s[j] / sum * V[l][g][at[j]][i];
          o[hq * hs + i] = acc;
        }
      }
      matvec(t, w.wo + size_t(l) * D * D, o, D, D);
      for (int i = 0; i < D; ++i) x[i] += t[i];
      const auto xf = rms(x, w.rms_ffn + size_t(l) * D);
      matvec(h1, w.w1 + size_t(l) * H * D, xf, D, H);
      matvec(h3, w.w3 + size_t(l) * H * D, xf, D, H);
      for (int i = 0; i < H; ++i) h1[i] = h1[i] / (1.0 + std::exp(-h1[i])) * h3[i];
      matvec(t, w.w2 + size_t(l) * D * H, h1, H, D);
      for (int i = 0; i < D; ++i) x[i] += t[i];
    }
    std::vector<double> logits;
    matvec(logits, w.wcls, rms(x, w.rms_final), D, c.vocab_size);
    return logits;
  }
};

void check_close(const std::vector<float>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(double(a[i]) - b[i]) / (1.0 + std::fabs(b[i])));
  CHECK(worst < 2e-4);
}

struct tiny_files {
  std::string ckpt = "llama_tiny.bin", tok = "llama_tiny_tok.bin";
  tiny_shape shape;
  std::vector<unsigned char> ckpt_bytes, tok_bytes;
  explicit tiny_files(uint64_t salt, tiny_shape s = {}) : shape(s) {
    auto rng = make_rng(salt);
    ckpt_bytes = checkpoint_bytes(shape, rng);
    tok_bytes = tokenizer_bytes(shape.vocab);
    write_bytes(ckpt, ckpt_bytes);
    write_bytes(tok, tok_bytes);
  }
};

}  // namespace

TEST_CASE("checkpoint loader: a good file loads, every malformed one is rejected with a reason") {
  for (bool shared : {true, false}) {
    tiny_shape s;
    s.shared = shared;
    tiny_files f(1, s);
    model m;
    std::string err;
    REQUIRE(load_checkpoint(f.ckpt, m, err));
    CHECK(m.cfg.dim == 16);
    CHECK(m.cfg.n_kv_heads == 2);
    CHECK(m.cfg.shared_classifier == shared);
    CHECK((m.w.wcls == m.w.emb) == shared);
    // truncated, one float too many, one byte too many
    auto bad = [&](std::vector<unsigned char> b, const char* what) {
      INFO(what);
      write_bytes("llama_bad.bin", b);
      model m2;
      std::string e;
      CHECK_FALSE(load_checkpoint("llama_bad.bin", m2, e));
      CHECK(!e.empty());
      CHECK(e.find('\n') == std::string::npos);
    };
    auto b = f.ckpt_bytes;
    bad(std::vector<unsigned char>(b.begin(), b.end() - 4), "one float short");
    bad(std::vector<unsigned char>(b.begin(), b.begin() + 20), "short header");
    auto plus = b;
    put(plus, 0.f);
    bad(plus, "one float more");
    plus = b;
    plus.push_back(0);
    bad(plus, "one byte more");
    auto field = [&](int i, int32_t v) {
      auto x = b;
      std::memcpy(x.data() + 4 * i, &v, 4);
      return x;
    };
    bad(field(0, 0), "dim 0");
    bad(field(0, -16), "negative dim");
    bad(field(0, 15), "dim not a multiple of heads");
    bad(field(3, 3), "heads not a multiple of kv heads");
    bad(field(4, 0), "kv heads 0");
    bad(field(5, 0), "vocab 0");
    bad(field(5, INT32_MIN), "vocab INT32_MIN");
    bad(field(6, 0), "seq_len 0");
    bad(field(1, INT32_MAX), "hidden huge");
    bad(field(2, 1000), "layers beyond the file");
    bad(field(0, 12), "odd head size (12 / 4 = 3)");
    auto nan = b;
    const float q = std::nanf("");
    std::memcpy(nan.data() + 28 + 4 * 100, &q, 4);
    bad(nan, "NaN weight");
  }
  model m;
  std::string err;
  CHECK_FALSE(load_checkpoint("no/such/file.bin", m, err));
  CHECK(err.find("cannot open") != std::string::npos);
}

TEST_CASE("tokenizer loader: malformed files are rejected") {
  tiny_files f(2);
  tokenizer tk;
  std::string err;
  REQUIRE(tk.load(f.tok, 300, err));
  auto bad = [&](const std::vector<unsigned char>& b, int vocab, const char* what) {
    INFO(what);
    write_bytes("llama_bad_tok.bin", b);
    tokenizer t;
    std::string e;
    CHECK_FALSE(t.load("llama_bad_tok.bin", vocab, e));
    CHECK(!e.empty());
    CHECK(e.find('\n') == std::string::npos);
  };
  const auto& b = f.tok_bytes;
  bad(b, 301, "fewer tokens than the model's vocabulary");
  bad(b, 299, "bytes after the last token");
  bad(std::vector<unsigned char>(b.begin(), b.end() - 1), 300, "truncated last token");
  bad(std::vector<unsigned char>(b.begin(), b.begin() + 2), 300, "truncated header");
  auto x = b;
  int32_t v = 0;
  std::memcpy(x.data(), &v, 4);
  bad(x, 300, "max_token_length 0");
  x = b;
  v = 1000;  // first token's length
  std::memcpy(x.data() + 8, &v, 4);
  bad(x, 300, "a length above max_token_length");
  x = b;
  v = -1;
  std::memcpy(x.data() + 8, &v, 4);
  bad(x, 300, "a negative length");
  x = b;
  const float inf = INFINITY;
  std::memcpy(x.data() + 4, &inf, 4);
  bad(x, 300, "an infinite score");
  bad(b, 200, "a vocabulary too small for byte fallback");
  CHECK_FALSE(tk.load("no/such/tok.bin", 300, err));
}

TEST_CASE("encoder: BOS, dummy space, code points, byte fallback, merges by score (leftmost on ties)") {
  tiny_files f(3);
  tokenizer tk;
  std::string err;
  REQUIRE(tk.load(f.tok, 300, err));
  const int sp = piece_id(" "), a = piece_id("a"), b = piece_id("b"), c = piece_id("c");
  const int bc = piece_id("bc"), sabc = piece_id(" abc"), e_acute = piece_id("\xc3\xa9");
  // "abc": "ab" (-3) vs "bc" (-2) -> "bc", then "abc"
  CHECK(tk.encode("abc", false, false) == std::vector<int>{piece_id("abc")});
  // " abc": " a" (-4), "ab" (-3), "bc" (-2) -> "bc"; then " a" (-4) beats "abc" (-5); then " a" + "bc" = " abc"
  CHECK(tk.encode("abc", true, true) == std::vector<int>{1, sabc});
  // without " abc" in the way: "cab" -> "c" "ab"
  CHECK(tk.encode("cab", false, false) == std::vector<int>{c, piece_id("ab")});
  CHECK(tk.encode("", true, true) == std::vector<int>{1});
  CHECK(tk.encode("", false, false).empty());
  CHECK(tk.encode("bb", false, false) == std::vector<int>{b, b});
  CHECK(tk.encode("z", false, false) == std::vector<int>{3 + 'z'});
  CHECK(tk.encode("\xc3\xa9", false, false) == std::vector<int>{e_acute});
  CHECK(tk.encode("\xc3\xbc", false, false) == std::vector<int>{3 + 0xc3, 3 + 0xbc});  // "ü": no token
  CHECK(tk.encode("\xff" "a", false, false) == std::vector<int>{3 + 0xff, a});          // invalid UTF-8 byte
  // ties: "a" "b" "a" "b" -> both "ab" pairs score -3; the leftmost merges first, then the second one
  CHECK(tk.encode("abab", false, false) == std::vector<int>{piece_id("ab"), piece_id("ab")});
  (void)sp, (void)bc;
  // decoding: byte tokens become bytes, a leading space is dropped right after BOS only
  CHECK(tk.piece(1, piece_id(" a")) == "a");
  CHECK(tk.piece(5, piece_id(" a")) == " a");
  CHECK(tk.piece(5, 3 + 'z') == "z");
  CHECK(tk.decode(1, tk.encode("abc z\xc3\xbc", false, true)) == "abc z\xc3\xbc");
}

TEST_CASE("ROUGE-L F1 over tokens") {
  CHECK(rouge_l_f1({1, 2, 3}, {1, 2, 3}) == 1.0);
  CHECK(rouge_l_f1({1, 2, 3}, {4, 5}) == 0.0);
  CHECK(rouge_l_f1({}, {1}) == 0.0);
  CHECK(rouge_l_f1({1, 2, 3, 4}, {1, 3, 4, 5}) == doctest::Approx(0.75));
  // LCS 2 of |cand| 2 and |ref| 4: P = 1, R = 0.5, F1 = 2/3
  CHECK(rouge_l_f1({7, 9}, {7, 8, 9, 10}) == doctest::Approx(2.0 / 3.0));
  CHECK(rouge_l_f1({7, 8, 9, 10}, {7, 9}) == doctest::Approx(2.0 / 3.0));
}

TEST_CASE("sampling: greedy at temperature 0, reproducible with a seed, follows the distribution") {
  std::vector<float> logits{0.f, 2.f, 1.f, 2.f};
  rng r(7);
  CHECK(sample(logits, 0.0, r) == 1);  // lowest index among the maxima
  std::vector<int> a, b;
  rng r1(42), r2(42);
  for (int i = 0; i < 50; ++i) a.push_back(sample(logits, 1.0, r1)), b.push_back(sample(logits, 1.0, r2));
  CHECK(a == b);
  std::vector<int> counts(4, 0);
  rng r3(3);
  for (int i = 0; i < 20000; ++i) ++counts[sample(logits, 1.0, r3)];
  const double z = 1 + 2 * std::exp(2.0) + std::exp(1.0);
  CHECK(counts[0] / 20000.0 == doctest::Approx(1 / z).epsilon(0.1));
  CHECK(counts[2] / 20000.0 == doctest::Approx(std::exp(1.0) / z).epsilon(0.05));
  CHECK(nll({0.f, 0.f}, 1) == doctest::Approx(std::log(2.0)));
}

TEST_CASE("methods map onto the compressor: same scorer, protection and budget; allocation and granularity differ") {
  config c;
  c.dim = 16, c.hidden_dim = 24, c.n_layers = 3, c.n_heads = 4, c.n_kv_heads = 2, c.vocab_size = 300, c.seq_len = 64;
  namespace pk = prefixkv;
  struct row {
    method_kind m;
    pk::allocation a;
    pk::granularity g;
  };
  const row rows[] = {{method_kind::uniform, pk::allocation::uniform, pk::granularity::layer},
                      {method_kind::pyramid, pk::allocation::pyramid, pk::granularity::layer},
                      {method_kind::adakv, pk::allocation::uniform, pk::granularity::head},
                      {method_kind::prefixkv, pk::allocation::prefix, pk::granularity::layer},
                      {method_kind::prefixkv_head, pk::allocation::prefix, pk::granularity::head},
                      {method_kind::profile, pk::allocation::profile, pk::granularity::layer}};
  for (const row& r : rows)
    for (scorer_name s : {scorer_name::attention, scorer_name::window, scorer_name::keynorm}) {
      policy p;
      p.method = r.m;
      p.scorer = s;
      p.evict_ratio = 0.3;
      p.sinks = 2;
      p.recent = 3;
      p.profile = std::vector<double>{0.1, 0.2, 0.3};
      const auto k = make_compress_config(p, c);
      CHECK(k.alloc == r.a);
      CHECK(k.gran == r.g);
      CHECK(k.scorer == (s == scorer_name::attention ? pk::scorer_kind::attention
                         : s == scorer_name::window  ? pk::scorer_kind::window
                                                     : pk::scorer_kind::key_norm));
      CHECK(k.evict_ratio == 0.3);
      CHECK(k.protect.sinks == 2);
      CHECK(k.protect.recent == 3);
      pk::compress_plan plan;
      std::string err;
      CHECK(make_policy_plan(p, c, plan, err));
    }
  policy p;
  p.method = method_kind::streaming;
  const auto k = make_compress_config(p, c);
  CHECK(k.scorer == pk::scorer_kind::recency);
  CHECK(k.alloc == pk::allocation::uniform);
  CHECK(k.gran == pk::granularity::layer);
  policy full;
  full.method = method_kind::full;
  CHECK_FALSE(compresses(full));
  p.method = method_kind::profile;
  p.profile = std::vector<double>(1, 0.5);
  pk::compress_plan plan;
  std::string err;
  CHECK_FALSE(make_policy_plan(p, c, plan, err));  // 1 fraction for 3 layers
}

TEST_CASE("decoding on compressed caches equals a reference that attends only over the kept tokens") {
  tiny_files f(4);
  model m;
  std::string err;
  REQUIRE(load_checkpoint(f.ckpt, m, err));
  const config& c = m.cfg;
  auto rng = make_rng(5);
  std::uniform_int_distribution<int> tok(3, c.vocab_size - 1);
  const int T = 37, steps = 8, hs = c.head_size();
  std::vector<int> prompt{1};
  while (int(prompt.size()) < T) prompt.push_back(tok(rng));
  // calibration-free profile for the `profile` method
  const std::vector<double> prof{0.6, 0.4, 0.2};
  for (int mi = 0; mi < 8; ++mi)
    for (scorer_name sc : {scorer_name::attention, scorer_name::window, scorer_name::keynorm})
      for (double ratio : {0.0, 0.37, 0.8}) {
        policy p;
        p.method = method_kind(mi);
        p.scorer = sc;
        p.evict_ratio = ratio;
        p.sinks = 3;
        p.recent = 2;
        p.window = 5;
        if (p.method == method_kind::profile) p.profile = prof;
        if ((p.method == method_kind::full || p.method == method_kind::streaming) && sc != scorer_name::attention)
          continue;
        INFO("method ", to_string(p.method), " scorer ", to_string(sc), " ratio ", ratio);
        cpu_backend be(m);
        std::vector<float> logits;
        REQUIRE(prefill_and_compress(be, prompt, p, logits, err));
        reference ref(m);
        std::vector<double> rl;
        for (int t = 0; t < T; ++t) rl = ref.forward(prompt[t], t);
        check_close(logits, rl);
        // which positions survive in each (layer, kv head): match the compacted rows against the history
        const auto len = be.lengths();
        int64_t kept = 0;
        for (int l = 0; l < c.n_layers; ++l)
          for (int g = 0; g < c.n_kv_heads; ++g) {
            const int n = len[size_t(l) * c.n_kv_heads + g];
            kept += n;
            std::vector<char> alive(T, 0);
            int last = -1;
            for (int r = 0; r < n; ++r) {
              const float* row = be.keys(l) + (size_t(g) * be.capacity() + r) * hs;
              int found = -1;
              for (int pos = last + 1; pos < T && found < 0; ++pos) {
                bool same = true;
                for (int i = 0; i < hs; ++i) same = same && std::fabs(row[i] - ref.K[l][g][pos][i]) < 1e-4;
                if (same) found = pos;
              }
              REQUIRE(found >= 0);  // kept rows are original rows, in token order
              alive[found] = 1;
              last = found;
            }
            // the positions the backend carries through the compressor name the same rows
            std::vector<int> matched;
            for (int pos = 0; pos < T; ++pos)
              if (alive[pos]) matched.push_back(pos);
            CHECK(be.positions(l, g) == matched);
            for (int pos = 0; pos < 3; ++pos) CHECK(alive[pos]);          // sinks
            for (int pos = T - 2; pos < T; ++pos) CHECK(alive[pos]);      // recent
            ref.alive[l][g] = alive;
            if (!per_head(p.method) && g > 0)  // layer granularity: the kv heads of a layer keep the same tokens
              CHECK(alive == ref.alive[l][0]);
          }
        // the budget: rint(r * N) candidates evicted over all segments (N = tokens summed over the segments)
        const int64_t segs = int64_t(c.n_layers) * (per_head(p.method) ? c.n_kv_heads : 1);
        const int64_t N = segs * T;
        if (!compresses(p)) {
          CHECK(kept == int64_t(c.n_layers) * c.n_kv_heads * T);
        } else if (p.method == method_kind::profile) {
          for (int l = 0; l < c.n_layers; ++l)
            CHECK(len[size_t(l) * c.n_kv_heads] == T - int(ratio == 0.0 ? 0 : std::rint(prof[l] * T)));
        } else {
          const int64_t per_seg_rows = per_head(p.method) ? 1 : c.n_kv_heads;
          CHECK(kept / per_seg_rows == N - int64_t(std::rint(ratio * double(N))));
        }
        // decode greedily on both; the reference sees only the kept positions, new tokens at T, T+1, ...
        int next = argmax(logits);
        for (int i = 0; i < steps; ++i) {
          REQUIRE(be.step(next, T + i, logits, err));
          rl = ref.forward(next, T + i);
          check_close(logits, rl);
          next = argmax(logits);
        }
        for (int l = 0; l < c.n_layers; ++l)
          for (int g = 0; g < c.n_kv_heads; ++g) {
            int n = 0;
            std::vector<int> pos;
            for (size_t q = 0; q < ref.alive[l][g].size(); ++q)
              if (ref.alive[l][g][q]) ++n, pos.push_back(int(q));
            CHECK(be.lengths()[size_t(l) * c.n_kv_heads + g] == n);
            CHECK(be.positions(l, g) == pos);  // new tokens at T, T + 1, ...
          }
      }
}

TEST_CASE("save / restore bring back the caches; compress needs a fresh prefill") {
  tiny_files f(6);
  model m;
  std::string err;
  REQUIRE(load_checkpoint(f.ckpt, m, err));
  cpu_backend be(m);
  std::vector<int> prompt{1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50};
  std::vector<float> l0, a, b;
  prefill_record rec;
  rec.attention = true;
  REQUIRE(be.prefill(prompt.data(), int(prompt.size()), rec, l0, err));
  be.save(0);
  REQUIRE(be.step(7, 12, a, err));
  const auto pos_after = be.positions(2, 1);
  be.restore(0);
  CHECK(be.positions(2, 1).size() == prompt.size());
  REQUIRE(be.step(7, 12, b, err));
  CHECK(a == b);
  CHECK(be.positions(2, 1) == pos_after);
  std::string e2;
  policy p;
  prefixkv::compress_plan plan;
  REQUIRE(make_policy_plan(p, m.cfg, plan, err));
  CHECK_FALSE(be.compress(plan, e2));  // after a step
  be.restore(0);
  CHECK(be.compress(plan, e2));
  p.scorer = scorer_name::window;
  REQUIRE(make_policy_plan(p, m.cfg, plan, err));
  be.restore(0);
  CHECK_FALSE(be.compress(plan, e2));  // the prefill recorded no window queries
  CHECK(!e2.empty());
  // a full cache is an error, not a crash
  std::vector<int> longp(size_t(m.cfg.seq_len), 5);
  REQUIRE(be.prefill(longp.data(), int(longp.size()), prefill_record{}, l0, err));
  CHECK_FALSE(be.step(5, m.cfg.seq_len, a, err));
  CHECK_FALSE(be.prefill(longp.data(), 0, prefill_record{}, l0, err));
}
