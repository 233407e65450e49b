// prefixkv-llama's CUDA path against its host path:
// * the CUDA backend == the host backend bit for bit (prefill logits, kept tokens per (layer, kv head), the logits of
//   every greedy step, teacher-forced NLL) on the real model (models/stories260K) for every method, scorer and
//   several evict ratios, and on random models of other shapes;
// * the serving loop (paged pool, per-layer block tables, batched prefill / compression / decode) == every request
//   run alone on the host backend with contiguous caches, token for token; no page leaks;
// * the command line: --device cuda prints what --device cpu prints; --serve prints the single runs' texts.
#include "serve_check.hpp"

#include "llama/serve_host.hpp"

#include <sys/wait.h>

#include <cstdio>

using namespace prefixkv_llama;
using namespace serve_check;
using prefixkv_test::make_rng;
using prefixkv_test::quick_mode;
using prefixkv_test::tiny_mode;

namespace {

}  // namespace

TEST_CASE("CUDA backend == host backend, bit for bit, on the real model: every method, scorer and ratio") {
  real_model& r = real();
  if (!r.ok) {
    MESSAGE("skipped: no model at " << model_dir);
    return;
  }
  const bool quick = quick_mode();
  const std::vector<std::string> prompts = quick ? std::vector<std::string>{story_words(40)}
                                                 : std::vector<std::string>{"", story_words(12), story_words(60, 5),
                                                                            story_words(230, 17)};
  std::vector<int> cont = r.tk.encode(" Tim threw the ball and the dog ran after it. They played all day.", false, false);
  if (tiny_mode()) cont.resize(2);  // racecheck: every kernel still runs, on fewer tokens
  const method_kind methods[] = {method_kind::full,    method_kind::streaming, method_kind::uniform,
                                 method_kind::pyramid, method_kind::adakv,     method_kind::prefixkv,
                                 method_kind::prefixkv_head, method_kind::profile};
  for (const std::string& p : prompts) {
    const std::vector<int> prompt = r.tk.encode(p, true, true);
    for (method_kind m : methods)
      for (scorer_name s : {scorer_name::attention, scorer_name::window, scorer_name::keynorm})
        for (double ratio : {0.0, 0.5, 0.75}) {
          if ((m == method_kind::full || m == method_kind::streaming) && s != scorer_name::attention) continue;
          // quick (sanitizers): every method once with attention at 0.5, the other scorers with prefixkv
          if (quick && (ratio != 0.5 || (s != scorer_name::attention && m != method_kind::prefixkv))) continue;
          // tiny (racecheck): the full cache and prefixkv with each scorer
          if (tiny_mode() && m != method_kind::full && m != method_kind::prefixkv) continue;
          INFO("prompt tokens " << prompt.size() << " method " << to_string(m) << " scorer " << to_string(s)
                                << " ratio " << ratio);
          compare_backends("cuda", r.m, prompt, make_policy(m, s, ratio), tiny_mode() ? 2 : quick ? 8 : 40, cont);
        }
  }
}

TEST_CASE("CUDA backend == host backend, bit for bit, on random models of other shapes") {
  struct shape {
    int dim, hidden, layers, heads, kv_heads, vocab, seq_len;
  };
  // head sizes 4, 6, 16, 2; GQA groups 1, 2, 4; hidden sizes that are not multiples of 8
  const shape shapes[] = {{16, 24, 3, 4, 2, 300, 64}, {24, 37, 2, 4, 4, 97, 50}, {64, 100, 2, 4, 1, 64, 40},
                          {8, 13, 4, 4, 2, 40, 33}};
  uint64_t salt = 11;
  for (const shape& s : shapes) {
    const model m = random_model(s.dim, s.hidden, s.layers, s.heads, s.kv_heads, s.vocab, s.seq_len, salt++);
    auto rng = make_rng(salt++);
    for (int rep = 0; rep < prefixkv_test::rounds(6, 2, 1); ++rep) {
      const int T = 1 + int(rng() % uint64_t(s.seq_len - 1));
      std::vector<int> prompt(static_cast<size_t>(T)), cont(size_t(1 + rng() % 8));
      for (int& t : prompt) t = int(rng() % uint64_t(s.vocab));
      for (int& t : cont) t = int(rng() % uint64_t(s.vocab));
      const method_kind methods[] = {method_kind::full, method_kind::streaming, method_kind::uniform,
                                     method_kind::pyramid, method_kind::adakv, method_kind::prefixkv,
                                     method_kind::prefixkv_head, method_kind::profile};
      const method_kind m2 = methods[rng() % 8];
      const scorer_name sc = scorer_name(rng() % 3);
      const double ratio = double(rng() % 9) / 10.0;
      policy p = make_policy(m2, sc, ratio);
      p.window = 1 + int(rng() % 8);
      p.sinks = int(rng() % 3);
      INFO("shape dim " << s.dim << " heads " << s.heads << "/" << s.kv_heads << " T " << T << " method "
                        << to_string(m2) << " scorer " << to_string(sc) << " ratio " << ratio);
      compare_backends("cuda", m, prompt, p, tiny_mode() ? 3 : 12, cont);
    }
  }
}

namespace {

//! serve_cuda, checked against the single runs, and against serve_host: the same loop on the host must take the
//! same decisions (admissions, pages over time) and produce the same tokens.
serve_summary serve_both(const model& m, const std::vector<serve_request>& reqs,
                         const std::vector<std::vector<int>>& prompts, const serve_options& opt) {
  std::vector<serve_result> gpu_res, host_res;
  const serve_summary g = serve_and_check(serve_cuda, m, reqs, prompts, opt, &gpu_res);
  serve_summary h;
  std::string err;
  REQUIRE_MESSAGE(serve_host(m, reqs, prompts, opt, host_res, h, err), err);
  CHECK(g.iterations == h.iterations);
  CHECK(g.peak_active == h.peak_active);
  CHECK(g.peak_pages == h.peak_pages);
  REQUIRE(g.timeline.size() == h.timeline.size());
  for (size_t i = 0; i < g.timeline.size(); ++i) {
    CHECK(g.timeline[i].pages_in_use == h.timeline[i].pages_in_use);
    CHECK(g.timeline[i].active == h.timeline[i].active);
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    CHECK(gpu_res[i].admitted == host_res[i].admitted);
    CHECK(gpu_res[i].finished == host_res[i].finished);
  }
  return g;
}

}  // namespace

TEST_CASE("--serve: a mixed batch (full / prefixkv, ratios 0.5 / 0.75) in a pool too small for full caches == every "
          "request alone") {
  real_model& r = real();
  if (!r.ok) {
    MESSAGE("skipped: no model at " << model_dir);
    return;
  }
  // 24 requests; 16 under the sanitizers; racecheck (PREFIXKV_TEST_QUICK=2, the slowest tool): 10 requests of short
  // generations, every (method, ratio) pair still in the batch and the pool still too small (19 iterations, not 41)
  const int R = tiny_mode() ? 10 : quick_mode() ? 16 : 24, steps = tiny_mode() ? 4 : quick_mode() ? 20 : 60;
  mixed_batch mb(r, R, steps, 21);
  REQUIRE(mb.full_pages > mb.opt.pool_pages);  // full caches cannot all fit
  const serve_summary sum = serve_both(r.m, mb.reqs, mb.prompts, mb.opt);
  CHECK(sum.completed == int(mb.reqs.size()));
  CHECK(sum.peak_active >= 2);
  CHECK(sum.iterations > 1);
  MESSAGE("peak " << sum.peak_active << " concurrent requests, " << sum.peak_pages << " of " << mb.opt.pool_pages
                  << " pages, " << sum.iterations << " iterations, " << sum.tokens_per_s() << " tokens/s");
}

TEST_CASE("--serve: every method, head granularity, streaming, page size 8, refused requests, a tight pool") {
  real_model& r = real();
  if (!r.ok) {
    MESSAGE("skipped: no model at " << model_dir);
    return;
  }
  const model& m = r.m;
  auto rng = make_rng(22);
  const method_kind methods[] = {method_kind::full, method_kind::streaming, method_kind::uniform, method_kind::pyramid,
                                 method_kind::adakv, method_kind::prefixkv, method_kind::prefixkv_head};
  std::vector<serve_request> reqs;
  std::vector<std::vector<int>> prompts;
  // racecheck (PREFIXKV_TEST_QUICK=2): every method once, short generations
  const int R = tiny_mode() ? 7 : quick_mode() ? 9 : 18;
  for (int i = 0; i < R; ++i) {
    serve_request q;
    q.prompt = story_words(20 + int(rng() % 110), int(rng() % 50));
    q.steps = int(rng() % (tiny_mode() ? 6 : 30));  // 0 included: prefill and compression only
    q.pol = make_policy(methods[i % 7], scorer_name::attention, double(rng() % 8) / 10.0);
    reqs.push_back(q);
  }
  // refused: a prompt longer than the context, a budget the prompt cannot meet
  serve_request too_long;
  too_long.prompt = story_words(700);
  too_long.pol = make_policy(method_kind::full, scorer_name::attention, 0.0);
  reqs.insert(reqs.begin() + 2, too_long);
  serve_request infeasible;
  infeasible.prompt = "Hi";
  infeasible.pol = make_policy(method_kind::prefixkv, scorer_name::attention, 0.9);
  reqs.insert(reqs.begin() + 5, infeasible);
  for (const serve_request& q : reqs) prompts.push_back(r.tk.encode(q.prompt, true, true));
  serve_options opt;
  opt.page_size = 8;
  opt.max_prefill = 3;
  opt.max_active = 5;
  opt.max_prefill_tokens = 300;
  opt.pool_pages = m.cfg.n_layers * pages_for(m.cfg.seq_len, 8);  // one full-context request
  const serve_summary sum = serve_both(m, reqs, prompts, opt);
  CHECK(sum.refused == 2);
}

namespace {

// The serving loop on a random model of shape `which` (head sizes 4, 6, 2; GQA groups 2, 1, 4) == every request alone.
void serve_random_model(int which) {
  struct shape {
    int dim, hidden, layers, heads, kv_heads, vocab, seq_len;
  };
  const shape shapes[] = {{16, 24, 3, 4, 2, 300, 64}, {24, 37, 2, 4, 4, 97, 50}, {8, 13, 4, 4, 1, 40, 33}};
  const uint64_t salt = 31 + 2 * uint64_t(which);
  const shape& s = shapes[which];
  const model m = random_model(s.dim, s.hidden, s.layers, s.heads, s.kv_heads, s.vocab, s.seq_len, salt);
  auto rng = make_rng(salt + 1);
  std::vector<serve_request> reqs;
  std::vector<std::vector<int>> prompts;
  const method_kind methods[] = {method_kind::full, method_kind::uniform, method_kind::adakv, method_kind::prefixkv,
                                 method_kind::prefixkv_head};
  for (int i = 0, n = prefixkv_test::rounds(12, 12, 4); i < n; ++i) {
    serve_request q;
    q.steps = 1 + int(rng() % (tiny_mode() ? 5 : 20));  // racecheck: short generations
    q.pol = make_policy(methods[rng() % 5], scorer_name::attention, double(rng() % 7) / 10.0);
    q.pol.sinks = int(rng() % 3);
    reqs.push_back(q);
    std::vector<int> p(size_t(1 + rng() % uint64_t(s.seq_len - 1)));
    p[0] = 1;
    for (size_t k = 1; k < p.size(); ++k) p[k] = int(rng() % uint64_t(s.vocab));
    prompts.push_back(p);
  }
  serve_options opt;
  opt.page_size = 16;
  opt.max_prefill = 1 + int(rng() % 4);
  opt.pool_pages = s.layers * pages_for(s.seq_len, 16) + int(rng() % 20);
  INFO("shape dim " << s.dim << " heads " << s.heads << "/" << s.kv_heads << " pool " << opt.pool_pages);
  serve_both(m, reqs, prompts, opt);
}

}  // namespace

// One test case per shape, so that the sanitizers (one process per test case) run them side by side.
TEST_CASE("--serve on a random model (dim 16, 4 / 2 heads) == every request alone") { serve_random_model(0); }
TEST_CASE("--serve on a random model (dim 24, 4 / 4 heads, hidden 37) == every request alone") { serve_random_model(1); }
TEST_CASE("--serve on a random model (dim 8, 4 / 1 heads) == every request alone") { serve_random_model(2); }

namespace {

struct cli_result {
  int code = -1;
  std::string out, err;
};
std::string slurp(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}
std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}
cli_result cli(const std::string& args) {
  const std::string o = scratch() + "/out.txt", e = scratch() + "/err.txt";
  const std::string cmd = std::string("\"") + PKV_LLAMA + "\" --model '" + model_dir + "/stories260K.bin' --tokenizer '" +
                          model_dir + "/tok512.bin' " + args + " > '" + o + "' 2> '" + e + "'";
  const int st = std::system(cmd.c_str());
  cli_result r;
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  r.out = slurp(o);
  r.err = slurp(e);
  return r;
}

}  // namespace

TEST_CASE("command line: --device cuda prints what --device cpu prints; --serve prints the single runs' texts") {
  if (!real().ok) {
    MESSAGE("skipped: no model at " << model_dir);
    return;
  }
  const std::string cont = quote(" Tim threw the ball and the dog ran after it. They played all day.");
  const bool quick = quick_mode();
  std::vector<std::string> prompts = {story_words(30), story_words(90, 11)};
  if (quick) prompts.resize(1);
  std::vector<std::string> runs = {"--method full", "--method prefixkv --evict-ratio 0.5",
                                   "--method prefixkv-head --evict-ratio 0.75",
                                   "--method pyramid --scorer window --evict-ratio 0.5"};
  if (quick) runs.resize(tiny_mode() ? 1 : 2);
  for (const std::string& p : prompts)
    for (const std::string& a : runs) {
      for (const std::string& mode : {std::string("--steps 40"), "--score-continuation " + cont}) {
        const std::string args = "--prompt " + quote(p) + " " + a + " " + mode;
        INFO(args);
        const cli_result c = cli(args + " --device cpu"), g = cli(args + " --device cuda");
        INFO("stderr: " << c.err << g.err);
        REQUIRE(c.code == 0);
        REQUIRE(g.code == 0);
        CHECK(c.out == g.out);
      }
    }
  // --serve: one JSON line per request, then the summary; every text equals the request's single run
  const std::string reqs = scratch() + "/requests.jsonl";
  std::vector<std::pair<std::string, std::string>> lines = {
      {story_words(40), "\"method\": \"prefixkv\", \"evict_ratio\": 0.75, \"steps\": 30"},
      {story_words(120, 3), "\"method\": \"full\", \"steps\": 20"},
      {story_words(70, 9) + " \\u00e9 \\\"q\\\"", "\"method\": \"prefixkv\", \"evict_ratio\": 0.5, \"steps\": 25"},
      {story_words(10, 1), "\"method\": \"full\", \"evict_ratio\": 0.5, \"steps\": 40"}};
  {
    std::ofstream f(reqs);
    for (const auto& l : lines) f << "{\"prompt\": \"" << l.first << "\", " << l.second << "}\n";
  }
  const cli_result s = cli("--serve '" + reqs + "' --pool-pages 120 --max-prefill 2 --device cuda");
  INFO("stderr: " << s.err);
  REQUIRE(s.code == 0);
  std::istringstream in(s.out);
  std::vector<std::string> out;
  for (std::string x; std::getline(in, x);) out.push_back(x);
  REQUIRE(out.size() == lines.size() + 1);
  CHECK(out.back().rfind("{\"summary\": ", 0) == 0);
  std::vector<serve_request> parsed;
  std::string err;
  REQUIRE(parse_requests(slurp(reqs), policy{}, 256, parsed, err));
  for (size_t i = 0; i < lines.size(); ++i) {
    const size_t k = out[i].find("\"text\": ");
    REQUIRE(k != std::string::npos);
    size_t at = k + 8;
    std::string text;
    REQUIRE(serve_detail::parse_string(out[i], at, text));
    std::string a = "--prompt " + quote(parsed[i].prompt) + " --method " + to_string(parsed[i].pol.method) +
                    " --steps " + std::to_string(parsed[i].steps);
    if (parsed[i].pol.method != method_kind::full) a += " --evict-ratio " + std::to_string(parsed[i].pol.evict_ratio);
    const cli_result one = cli(a);
    REQUIRE(one.code == 0);
    CHECK(text + "\n" == one.out);
  }
  // without --pool-pages, with a prompt, with a bad file: exit 2, one line
  for (const std::string& bad : {"--serve '" + reqs + "'", "--serve '" + reqs + "' --pool-pages 10 --prompt hi",
                                 "--serve " + scratch() + "/none.jsonl --pool-pages 10"}) {
    const cli_result b = cli(bad);
    CHECK(b.code == 2);
    CHECK(b.out.empty());
  }
}
