// Shared by the host and GPU tests of prefixkv-llama's batched paths: models (the bundled one, random ones of any
// shape), prompts, a backend against the host backend bit for bit, every request run alone on the host backend, and
// the check that a served batch equals those runs.
#pragma once

#include <doctest/doctest.h>

#include "llama/batched_backend.hpp"
#include "llama/runtime.hpp"
#include "llama/serve.hpp"
#include "llama/tokenizer.hpp"

#include "support/test_random.hpp"

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace serve_check {

using namespace prefixkv_llama;

#ifndef PKV_LLAMA_MODEL_DIR
#define PKV_LLAMA_MODEL_DIR "models/stories260K"
#endif
inline const std::string model_dir = PKV_LLAMA_MODEL_DIR;

//! A scratch directory for this process (files never land in the caller's working directory).
inline const std::string& scratch() {
  static const std::string dir = [] {
    const auto p = std::filesystem::temp_directory_path() / ("pkv_llama_test_" + std::to_string(::getpid()));
    std::filesystem::create_directories(p);
    return p.string();
  }();
  return dir;
}

//! The bundled model (ok == false when models/stories260K is missing).
struct real_model {
  model m;
  tokenizer tk;
  bool ok = false;
  real_model() {
    if (!std::ifstream(model_dir + "/stories260K.bin").good()) return;
    std::string err;
    ok = load_checkpoint(model_dir + "/stories260K.bin", m, err) && tk.load(model_dir + "/tok512.bin", 512, err);
  }
};
inline real_model& real() {
  static real_model r;
  return r;
}

//! A random model of the given shape (weights uniform in [-0.5, 0.5]), written as a llama2.c checkpoint and loaded.
inline model random_model(int dim, int hidden, int layers, int heads, int kv_heads, int vocab, int seq_len,
                          uint64_t salt) {
  auto rng = prefixkv_test::make_rng(salt);
  std::vector<unsigned char> b;
  auto put = [&](auto x) {
    unsigned char t[sizeof(x)];
    std::memcpy(t, &x, sizeof(x));
    b.insert(b.end(), t, t + sizeof(x));
  };
  for (int32_t x : {dim, hidden, layers, heads, kv_heads, vocab, seq_len}) put(x);
  config c;
  c.dim = dim, c.hidden_dim = hidden, c.n_layers = layers, c.n_heads = heads, c.n_kv_heads = kv_heads;
  c.vocab_size = vocab, c.seq_len = seq_len, c.shared_classifier = true;
  int64_t n = 0;
  REQUIRE(checkpoint_floats(c, n));
  std::uniform_real_distribution<float> d(-0.5f, 0.5f);
  for (int64_t i = 0; i < n; ++i) put(d(rng));
  const std::string path = scratch() + "/random.bin";
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
  model m;
  std::string err;
  REQUIRE_MESSAGE(load_checkpoint(path, m, err), err);
  return m;
}

inline policy make_policy(method_kind m, scorer_name s, double ratio) {
  policy p;
  p.method = m;
  p.scorer = s;
  p.evict_ratio = ratio;
  if (m == method_kind::profile) p.profile = {0.5, 0.4, 0.3, 0.2, 0.1};
  return p;
}

inline const char* story =
    "Once upon a time, there was a little boy named Tim. Tim had a red ball. He liked to play with it in the park. "
    "One day, Tim saw a big dog. The dog wanted to play too. Tim threw the ball and the dog ran after it. They "
    "played all day. When the sun went down, Tim was tired. He said goodbye to the dog and went home. His mom made "
    "him a warm soup. Tim ate it all and went to bed. He dreamed about the big dog and the red ball. The next day, "
    "Tim went back to the park. The dog was there again! They played and played until it was time to go home. Tim "
    "was very happy to have a new friend. Lily had a cat named Tom. Tom liked to sleep in the sun. ";

//! `words` words of the story from word `start` on (repeated as needed).
inline std::string story_words(int words, int start = 0) {
  std::vector<std::string> w;
  std::istringstream in(story);
  for (std::string x; in >> x;) w.push_back(x);
  std::string s;
  for (int i = 0; i < words; ++i) s += (i ? " " : "") + w[size_t(start + i) % w.size()];
  return s;
}

//! Every request alone on the host backend (contiguous caches): generated tokens and kept tokens, or an error.
inline void single_runs(const model& m, const std::vector<serve_request>& reqs,
                        const std::vector<std::vector<int>>& prompts, std::vector<serve_result>& out) {
  out.assign(reqs.size(), serve_result{});
  for (size_t i = 0; i < reqs.size(); ++i) {
    std::string err;
    auto be = make_backend("cpu", m, err);
    REQUIRE(be);
    const std::vector<int>& prompt = prompts[i];
    if (int(prompt.size()) > m.cfg.seq_len) {
      out[i].error = "too long";
      continue;
    }
    std::vector<float> logits;
    if (!prefill_and_compress(*be, prompt, reqs[i].pol, logits, err)) {
      out[i].error = err;
      continue;
    }
    out[i].kept = be->lengths();
    rng r(0);
    REQUIRE(generate(*be, logits, std::min(reqs[i].steps, m.cfg.seq_len), int(prompt.size()), 0.0, r, true,
                     out[i].tokens, err));
  }
}

//! Serve `reqs` with `serve_fn` (serve_host or serve_cuda) and check every request against its single run and the
//! pool's bookkeeping; returns the summary.
template <class ServeFn>
serve_summary serve_and_check(ServeFn serve_fn, const model& m, const std::vector<serve_request>& reqs,
                              const std::vector<std::vector<int>>& prompts, const serve_options& opt,
                              std::vector<serve_result>* results = nullptr) {
  std::vector<serve_result> got, want;
  serve_summary sum;
  std::string err;
  REQUIRE_MESSAGE(serve_fn(m, reqs, prompts, opt, got, sum, err), err);
  single_runs(m, reqs, prompts, want);
  REQUIRE(got.size() == reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    INFO("request " << i << " (" << prompts[i].size() << " prompt tokens, method " << to_string(reqs[i].pol.method)
                    << ", ratio " << reqs[i].pol.evict_ratio << ", steps " << reqs[i].steps << ")");
    CHECK(got[i].error.empty() == want[i].error.empty());
    if (!want[i].error.empty()) continue;
    CHECK(got[i].tokens == want[i].tokens);
    CHECK(got[i].kept == want[i].kept);
    CHECK(got[i].admitted >= 0);
    CHECK(got[i].finished >= got[i].admitted);
  }
  // no page leaks: everything back in the pool, no reservation left; what is held stays within the reservations
  CHECK(sum.pages_in_use_end == 0);
  CHECK(sum.pages_reserved_end == 0);
  CHECK(sum.peak_pages <= opt.pool_pages);
  for (const serve_sample& s : sum.timeline) {
    CHECK(s.pages_in_use <= s.pages_reserved);
    CHECK(s.pages_reserved <= opt.pool_pages);
    CHECK(s.active <= opt.max_active);
  }
  if (results) *results = got;
  return sum;
}

//! The acceptance batch: `R` requests with ragged prompts (about 25 to 250 tokens), methods full / prefixkv,
//! evict ratios 0.5 / 0.75, and a pool too small for all their full caches (but large enough for each alone).
struct mixed_batch {
  std::vector<serve_request> reqs;
  std::vector<std::vector<int>> prompts;
  serve_options opt;
  int64_t full_pages = 0;
  mixed_batch(const real_model& r, int R, int max_steps, uint64_t salt) {
    auto rng = prefixkv_test::make_rng(salt);
    int max_need = 0;
    for (int i = 0; i < R; ++i) {
      serve_request q;
      q.prompt = story_words(20 + int(rng() % 170), int(rng() % 60));  // >= 20 tokens: every budget feasible
      q.steps = 4 + int(rng() % uint64_t(max_steps));
      q.pol = make_policy(i % 2 ? method_kind::prefixkv : method_kind::full, scorer_name::attention,
                          (i / 2) % 2 ? 0.75 : 0.5);
      prompts.push_back(r.tk.encode(q.prompt, true, true));
      const int T = int(prompts.back().size());
      const int need = r.m.cfg.n_layers * pages_for(T + serve_appends(T, q.steps, r.m.cfg.seq_len), 16);
      full_pages += need;
      max_need = std::max(max_need, need);
      reqs.push_back(q);
    }
    opt.pool_pages = std::max<int>(max_need + 7, int(full_pages / 4));
    opt.max_prefill = 4;
  }
};

inline bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

//! The host backend and the backend of `device` ("cuda", or "cpu-batched": batched_backend on the host) on one prompt
//! and policy: prefill (+ compression) logits, kept tokens, `steps` greedy steps with their logits, and teacher
//! forcing over `cont`, all bit for bit.
inline void compare_backends(const std::string& device, const model& m, const std::vector<int>& prompt,
                             const policy& pol, int steps, const std::vector<int>& cont) {
  std::string e1, e2;
  auto cpu = make_backend("cpu", m, e1);
  auto gpu = device == "cpu-batched" ? make_batched_host_backend(m, e2) : make_backend(device, m, e2);
  REQUIRE_MESSAGE(cpu, e1);
  REQUIRE_MESSAGE(gpu, e2);
  if (pol.method == method_kind::profile && pol.profile.size() != size_t(m.cfg.n_layers)) {
    policy q = pol;
    q.profile.assign(size_t(m.cfg.n_layers), 0.25);
    return compare_backends(device, m, prompt, q, steps, cont);
  }
  std::vector<float> lc, lg;
  const bool okc = prefill_and_compress(*cpu, prompt, pol, lc, e1);
  const bool okg = prefill_and_compress(*gpu, prompt, pol, lg, e2);
  REQUIRE(okc == okg);
  if (!okc) {  // e.g. a budget the prompt cannot meet: the same reason on both
    CHECK(e1 == e2);
    return;
  }
  CHECK(same_bits(lc, lg));
  CHECK(cpu->lengths() == gpu->lengths());
  cpu->save(0);
  gpu->save(0);
  const std::vector<float> l0c = lc, l0g = lg;
  const int T = int(prompt.size());
  for (int i = 0; i < steps && T + i < m.cfg.seq_len; ++i) {
    const int tok = argmax(lc);
    REQUIRE(argmax(lg) == tok);
    REQUIRE(cpu->step(tok, T + i, lc, e1));
    REQUIRE(gpu->step(tok, T + i, lg, e2));
    INFO("step " << i);
    REQUIRE(same_bits(lc, lg));
  }
  CHECK(cpu->lengths() == gpu->lengths());
  if (cont.empty()) return;
  cpu->restore(0);  // back to the compressed caches right after the prefill
  gpu->restore(0);
  CHECK(cpu->lengths() == gpu->lengths());
  std::vector<int> t1, t2;
  double n1 = 0, n2 = 0;
  const int usable = std::min<int>(int(cont.size()), m.cfg.seq_len - T + 1);
  const std::vector<int> text(cont.begin(), cont.begin() + usable);
  REQUIRE(teacher_force(*cpu, l0c, text, T, n1, &t1, e1));
  REQUIRE(teacher_force(*gpu, l0g, text, T, n2, &t2, e2));
  CHECK(std::memcmp(&n1, &n2, sizeof(double)) == 0);
  CHECK(t1 == t2);
}


}  // namespace serve_check
