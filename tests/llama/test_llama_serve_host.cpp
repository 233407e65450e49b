// prefixkv-llama --serve on the host: the requests file, the pool's bookkeeping, the page arithmetic of
// reservations, the report (serve.hpp), and the loop itself (serve_loop.hpp with the host engine, serve_host.hpp):
// every served request == the same request run alone on the host backend with contiguous caches, no page leaks.
// (The CUDA engine: test_llama_gpu.)
#include "serve_check.hpp"

#include "llama/serve_host.hpp"

#include <cstdlib>
#include <string>
#include <vector>

using namespace prefixkv_llama;
using namespace serve_check;

TEST_CASE("serve: requests file — fields, defaults, escapes, and one-line errors naming the line") {
  policy base;
  base.method = method_kind::full;
  base.evict_ratio = 0.25;
  std::vector<serve_request> r;
  std::string err;
  const std::string text =
      "{\"prompt\": \"Once upon a time\"}\n"
      "\n"
      "  {\"prompt\": \"a \\\"b\\\" \\u00e9\\ud83d\\ude00\\n\", \"steps\": 7, \"method\": \"prefixkv\", "
      "\"evict_ratio\": 0.75}  \r\n"
      "{\"steps\": 0, \"prompt\": \"\", \"method\": \"prefixkv-head\"}";
  REQUIRE_MESSAGE(parse_requests(text, base, 32, r, err), err);
  REQUIRE(r.size() == 3);
  CHECK(r[0].prompt == "Once upon a time");
  CHECK(r[0].steps == 32);
  CHECK(r[0].pol.method == method_kind::full);
  CHECK(r[0].pol.evict_ratio == 0.25);
  CHECK(r[1].prompt == "a \"b\" \xc3\xa9\xf0\x9f\x98\x80\n");
  CHECK(r[1].steps == 7);
  CHECK(r[1].pol.method == method_kind::prefixkv);
  CHECK(r[1].pol.evict_ratio == 0.75);
  CHECK(r[2].prompt.empty());
  CHECK(r[2].steps == 0);
  CHECK(r[2].pol.method == method_kind::prefixkv_head);
  const std::vector<serve_request> before = r;
  auto bad = [&](const std::string& t, const char* what) {
    INFO(what);
    std::string e;
    CHECK_FALSE(parse_requests(t, base, 32, r, e));
    CHECK(!e.empty());
    CHECK(e.find('\n') == std::string::npos);
    CHECK(r.size() == before.size());  // untouched
  };
  bad("", "empty file");
  bad("\n\n", "blank lines only");
  bad("{\"steps\": 3}", "no prompt");
  bad("{\"prompt\": \"x\", \"steps\": -1}", "negative steps");
  bad("{\"prompt\": \"x\", \"steps\": 2.5}", "fractional steps");
  bad("{\"prompt\": \"x\", \"evict_ratio\": 1}", "ratio 1");
  bad("{\"prompt\": \"x\", \"evict_ratio\": \"0.5\"}", "ratio as a string");
  bad("{\"prompt\": \"x\", \"method\": \"magic\"}", "unknown method");
  bad("{\"prompt\": \"x\", \"method\": \"profile\"}", "profile (no per-request profile)");
  bad("{\"prompt\": \"x\", \"temperature\": 1}", "unknown key");
  bad("{\"prompt\": \"x\"", "unterminated object");
  bad("{\"prompt\": \"x\"} {", "text after the object");
  bad("[\"x\"]", "not an object");
  bad("{\"prompt\": \"bad \\q escape\"}", "bad escape");
  bad("{\"prompt\": \"\\ud83d alone\"}", "lone surrogate");
  bad("{\"prompt\": \"x\"}\n{\"prompt\": 3}", "second line: prompt not a string");
  std::string e;
  CHECK_FALSE(parse_requests("{\"prompt\": \"x\"}\n\n{\"prompt\": 3}", base, 32, r, e));
  CHECK(e.rfind("requests line 3: ", 0) == 0);
}

TEST_CASE("serve: the page pool — lowest page first, reservations bound what is held, nothing lost") {
  page_pool p(5);
  CHECK(p.capacity() == 5);
  CHECK(p.free_pages() == 5);
  CHECK(p.reserve(3));
  CHECK_FALSE(p.reserve(3));  // 6 > 5
  CHECK(p.reserve(2));
  CHECK_FALSE(p.can_reserve(1));
  CHECK(p.alloc() == 0);
  CHECK(p.alloc() == 1);
  CHECK(p.in_use() == 2);
  p.release(0);
  CHECK(p.alloc() == 0);  // the page released last comes back first
  for (int i = 0; i < 3; ++i) CHECK(p.alloc() >= 0);
  CHECK(p.alloc() == -1);
  for (int i = 0; i < 5; ++i) p.release(i);
  p.unreserve(5);
  CHECK(p.reserved() == 0);
  CHECK(p.free_pages() == 5);
}

TEST_CASE("serve: page arithmetic of reservations (as `generate` feeds tokens back)") {
  CHECK(pages_for(0, 16) == 0);
  CHECK(pages_for(1, 16) == 1);
  CHECK(pages_for(16, 16) == 1);
  CHECK(pages_for(17, 16) == 2);
  // steps 0: nothing generated; steps 1: the first token comes from the prefill, nothing fed back
  CHECK(serve_appends(10, 0, 512) == 0);
  CHECK(serve_appends(10, 1, 512) == 0);
  CHECK(serve_appends(10, 40, 512) == 39);
  CHECK(serve_appends(500, 40, 512) == 12);  // a fed token needs a position inside the context
  CHECK(serve_appends(512, 40, 512) == 0);
  CHECK(serve_pages_needed({16, 17, 0}, 0, 16) == 1 + 2 + 0);
  CHECK(serve_pages_needed({16, 17, 0}, 16, 16) == 2 + 3 + 1);
  // reservations: full caches hold the prompt and the appends in every layer
  policy full;
  full.method = method_kind::full;
  CHECK(serve_reservation(5, 4, 100, 30, 16, full) == 5 * 9);
  // compressed (layer granularity, r = 0.75): the prefill's 5 x 7 pages dominate the bound of the compressed cache
  // (K = 500 - 375 = 125 kept tokens; (125 + 5 * (30 + 15)) / 16 = 21)
  policy pk;
  pk.method = method_kind::prefixkv;
  pk.evict_ratio = 0.75;
  CHECK(serve_reservation(5, 4, 100, 30, 16, pk) == 35);
  CHECK(serve_reservation(5, 4, 100, 300, 16, pk) == (125 + 5 * (300 + 15)) / 16);
  pk.evict_ratio = 0.0;  // nothing evicted: the full worst case
  CHECK(serve_reservation(5, 4, 100, 300, 16, pk) == 5 * pages_for(400, 16));
  policy head = pk;  // head granularity: N counts every kv head; the layers keep at most every prompt token
  head.method = method_kind::prefixkv_head;
  head.evict_ratio = 0.5;
  CHECK(serve_reservation(5, 4, 100, 300, 16, head) == std::min(5 * pages_for(400, 16), (500 + 5 * 315) / 16));
  // the bound holds for every split of K kept tokens over the layers
  for (int k0 = 0; k0 <= 100; k0 += 7)
    for (int k1 = 0; k1 <= 125 - k0 && k1 <= 100; k1 += 11) {
      const int rest = 125 - k0 - k1;
      if (rest > 300) continue;
      const std::vector<int32_t> split = {k0, k1, std::min(rest, 100), std::max(0, std::min(rest - 100, 100)),
                                          std::max(0, rest - 200)};
      CHECK(serve_pages_needed(split, 300, 16) <= (125 + 5 * (300 + 15)) / 16);
    }
  policy a, b;
  CHECK(same_policy(a, b));
  b.evict_ratio = 0.75;
  CHECK_FALSE(same_policy(a, b));
}

TEST_CASE("serve: the summary is one JSON object with the timeline") {
  serve_summary s;
  s.requests = 3;
  s.completed = 2;
  s.refused = 1;
  s.generated_tokens = 10;
  s.seconds = 0.5;
  s.timeline.push_back({0, 2, 7, 9, 0.25});
  s.timeline.push_back({1, 1, 3, 4, 0.5});
  const std::string j = summary_json(s);
  CHECK(j.rfind("{\"summary\": {\"requests\": 3, \"completed\": 2, \"refused\": 1", 0) == 0);
  const size_t k = j.find("\"tokens_per_s\": ");
  REQUIRE(k != std::string::npos);
  CHECK(std::strtod(j.c_str() + k + 16, nullptr) == 20.0);
  CHECK(j.find("\"pages_in_use\": [7, 3]") != std::string::npos);
  CHECK(j.find("\"active\": [2, 1]") != std::string::npos);
  CHECK(j.find('\n') == std::string::npos);
  CHECK(json_quote("a\"b\\c\n\x01") == "\"a\\\"b\\\\c\\n\\u0001\"");
}

TEST_CASE("serve on the host: the acceptance batch (full / prefixkv, ratios 0.5 / 0.75, a pool too small for every "
          "full cache) == every request alone") {
  real_model& r = real();
  if (!r.ok) {
    MESSAGE("skipped: no model at " << model_dir);
    return;
  }
  mixed_batch mb(r, 16, 24, 41);
  REQUIRE(mb.full_pages > mb.opt.pool_pages);
  std::vector<serve_result> res;
  const serve_summary sum = serve_and_check(serve_host, r.m, mb.reqs, mb.prompts, mb.opt, &res);
  CHECK(sum.completed == 16);
  CHECK(sum.peak_active >= 2);
  // the pool was the limit: some requests waited for pages; compressed requests keep fewer tokens than their prompt
  int waited = 0;
  for (const serve_result& x : res) waited += x.admitted > 0;
  CHECK(waited > 0);
  for (size_t i = 0; i < res.size(); ++i) {
    int64_t kept = 0;
    for (int32_t k : res[i].kept) kept += k;
    const int64_t full = int64_t(mb.prompts[i].size()) * r.m.cfg.n_layers * r.m.cfg.n_kv_heads;
    if (mb.reqs[i].pol.method == method_kind::full) CHECK(kept == full);
    else CHECK(kept < full);
  }
}

TEST_CASE("serve on the host: every method, page size 8, requests refused, few slots, a tight pool") {
  real_model& r = real();
  if (!r.ok) {
    MESSAGE("skipped: no model at " << model_dir);
    return;
  }
  auto rng = prefixkv_test::make_rng(42);
  const method_kind methods[] = {method_kind::full, method_kind::streaming, method_kind::uniform, method_kind::pyramid,
                                 method_kind::adakv, method_kind::prefixkv, method_kind::prefixkv_head};
  std::vector<serve_request> reqs;
  for (int i = 0; i < 10; ++i) {
    serve_request q;
    q.prompt = story_words(20 + int(rng() % 80), int(rng() % 50));
    q.steps = int(rng() % 16);
    q.pol = make_policy(methods[i % 7], scorer_name::attention, double(rng() % 8) / 10.0);
    reqs.push_back(q);
  }
  serve_request too_long;
  too_long.prompt = story_words(700);
  reqs.insert(reqs.begin() + 2, too_long);
  serve_request infeasible;
  infeasible.prompt = "Hi";
  infeasible.pol = make_policy(method_kind::prefixkv, scorer_name::attention, 0.9);
  reqs.insert(reqs.begin() + 5, infeasible);
  std::vector<std::vector<int>> prompts;
  for (const serve_request& q : reqs) prompts.push_back(r.tk.encode(q.prompt, true, true));
  serve_options opt;
  opt.page_size = 8;
  opt.max_prefill = 3;
  opt.max_active = 4;
  opt.max_prefill_tokens = 200;
  opt.pool_pages = r.m.cfg.n_layers * pages_for(r.m.cfg.seq_len, 8);
  const serve_summary sum = serve_and_check(serve_host, r.m, reqs, prompts, opt);
  CHECK(sum.refused == 2);
  CHECK(sum.peak_active <= 4);
}

TEST_CASE("serve on the host: random models of other shapes (head sizes, GQA groups, page sizes)") {
  struct shape {
    int dim, hidden, layers, heads, kv_heads, vocab, seq_len, page;
  };
  const shape shapes[] = {{16, 24, 3, 4, 2, 300, 64, 16}, {24, 37, 2, 4, 4, 97, 50, 5}, {8, 13, 4, 4, 1, 40, 33, 1}};
  uint64_t salt = 51;
  for (const shape& s : shapes) {
    const model m = random_model(s.dim, s.hidden, s.layers, s.heads, s.kv_heads, s.vocab, s.seq_len, salt++);
    auto rng = prefixkv_test::make_rng(salt++);
    std::vector<serve_request> reqs;
    std::vector<std::vector<int>> prompts;
    const method_kind methods[] = {method_kind::full, method_kind::uniform, method_kind::adakv, method_kind::prefixkv,
                                   method_kind::prefixkv_head, method_kind::streaming};
    for (int i = 0; i < 12; ++i) {
      serve_request q;
      q.steps = 1 + int(rng() % 20);
      q.pol = make_policy(methods[rng() % 6], scorer_name::attention, double(rng() % 7) / 10.0);
      q.pol.sinks = int(rng() % 3);
      reqs.push_back(q);
      std::vector<int> p(static_cast<size_t>(1 + rng() % uint64_t(s.seq_len - 1)));
      p[0] = 1;
      for (size_t k = 1; k < p.size(); ++k) p[k] = int(rng() % uint64_t(s.vocab));
      prompts.push_back(p);
    }
    serve_options opt;
    opt.page_size = s.page;
    opt.max_prefill = 1 + int(rng() % 4);
    opt.max_active = 2 + int(rng() % 6);
    opt.pool_pages = s.layers * pages_for(s.seq_len, s.page) + int(rng() % 20);
    INFO("shape dim " << s.dim << " heads " << s.heads << "/" << s.kv_heads << " page " << s.page << " pool "
                      << opt.pool_pages);
    serve_and_check(serve_host, m, reqs, prompts, opt);
  }
}

// batched_backend (the CUDA backend's code) on the host: the same bookkeeping, views and compressor calls as on the
// GPU, with the bodies run as loops and the host compressor — it must equal the host backend bit for bit.
TEST_CASE("batched backend on the host == host backend, bit for bit: every method, scorer and ratio") {
  real_model& r = real();
  if (!r.ok) {
    MESSAGE("skipped: no model at " << model_dir);
    return;
  }
  const std::vector<int> cont = r.tk.encode(" Tim threw the ball and the dog ran after it.", false, false);
  const method_kind methods[] = {method_kind::full,    method_kind::streaming, method_kind::uniform,
                                 method_kind::pyramid, method_kind::adakv,     method_kind::prefixkv,
                                 method_kind::prefixkv_head, method_kind::profile};
  for (const std::string& p : {std::string(""), story_words(70, 5)}) {
    const std::vector<int> prompt = r.tk.encode(p, true, true);
    for (method_kind m : methods)
      for (scorer_name s : {scorer_name::attention, scorer_name::window, scorer_name::keynorm})
        for (double ratio : {0.0, 0.6}) {
          if ((m == method_kind::full || m == method_kind::streaming) && s != scorer_name::attention) continue;
          INFO("prompt tokens " << prompt.size() << " method " << to_string(m) << " scorer " << to_string(s)
                                << " ratio " << ratio);
          compare_backends("cpu-batched", r.m, prompt, make_policy(m, s, ratio), 16, cont);
        }
  }
}

TEST_CASE("batched backend on the host == host backend, bit for bit: random models of other shapes") {
  struct shape {
    int dim, hidden, layers, heads, kv_heads, vocab, seq_len;
  };
  const shape shapes[] = {{16, 24, 3, 4, 2, 300, 64}, {24, 37, 2, 4, 4, 97, 50}, {64, 100, 2, 4, 1, 64, 40},
                          {8, 13, 4, 4, 2, 40, 33}};
  uint64_t salt = 61;
  for (const shape& s : shapes) {
    const model m = random_model(s.dim, s.hidden, s.layers, s.heads, s.kv_heads, s.vocab, s.seq_len, salt++);
    auto rng = prefixkv_test::make_rng(salt++);
    for (int rep = 0; rep < 6; ++rep) {
      const int T = 1 + int(rng() % uint64_t(s.seq_len - 1));
      std::vector<int> prompt(static_cast<size_t>(T)), cont(static_cast<size_t>(1 + rng() % 8));
      for (int& t : prompt) t = int(rng() % uint64_t(s.vocab));
      for (int& t : cont) t = int(rng() % uint64_t(s.vocab));
      const method_kind methods[] = {method_kind::full, method_kind::streaming, method_kind::uniform,
                                     method_kind::pyramid, method_kind::adakv, method_kind::prefixkv,
                                     method_kind::prefixkv_head, method_kind::profile};
      const method_kind mk = methods[rng() % 8];
      const scorer_name sc = scorer_name(rng() % 3);
      const double ratio = double(rng() % 9) / 10.0;
      policy p = make_policy(mk, sc, ratio);
      p.window = 1 + int(rng() % 8);
      p.sinks = int(rng() % 3);
      INFO("shape dim " << s.dim << " heads " << s.heads << "/" << s.kv_heads << " T " << T << " method "
                        << to_string(mk) << " scorer " << to_string(sc) << " ratio " << ratio);
      compare_backends("cpu-batched", m, prompt, p, 12, cont);
    }
  }
}
