// prefixkv-llama on the real model (models/stories260K), run as a child process: the known greedy story from BOS,
// every method at evict ratio 0 equal to the full cache (generation and --score-continuation), compressed runs
// that keep what they report, and bad input -> exit 2 with one line on stderr and nothing on stdout.
#include <doctest/doctest.h>

#include "llama/runtime.hpp"
#include "llama/serve.hpp"
#include "llama/tokenizer.hpp"

#include <prefixkv/io/json.hpp>

#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#ifndef PKV_LLAMA
#error "PKV_LLAMA must name the prefixkv-llama executable"
#endif

namespace {

const std::string model_dir = PKV_LLAMA_MODEL_DIR;
const std::string model_args = "--model '" + model_dir + "/stories260K.bin' --tokenizer '" + model_dir + "/tok512.bin' ";
const char* methods[] = {"full", "streaming", "uniform", "pyramid", "adakv", "prefixkv", "prefixkv-head", "profile"};
const std::string prompt =
    "Once upon a time, there was a little boy named Tim. Tim had a red ball. He liked to play with it in the park. "
    "One day, Tim saw a big dog. The dog wanted to play too.";

struct result {
  int code = -1;
  std::string out, err;
};

std::string slurp(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}
void write_text(const std::string& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; }

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

result run(const std::string& args) {
  const std::string cmd = std::string("\"") + PKV_LLAMA + "\" " + args + " > llama_out.txt 2> llama_err.txt";
  const int st = std::system(cmd.c_str());
  result r;
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  r.out = slurp("llama_out.txt");
  r.err = slurp("llama_err.txt");
  return r;
}

result run_ok(const std::string& args) {
  INFO("args: ", args);
  result r = run(args);
  INFO("stderr: ", r.err);
  REQUIRE(r.code == 0);
  return r;
}

void expect_bad(const std::string& args) {
  INFO("args: ", args);
  const result r = run(args);
  CHECK(r.code == 2);
  CHECK(r.out.empty());
  REQUIRE(!r.err.empty());
  CHECK(r.err.find('\n') == r.err.size() - 1);  // exactly one line
  CHECK(r.err.rfind("prefixkv-llama: ", 0) == 0);
}

std::vector<double> array_field(const std::string& json, const std::string& key) {
  const size_t k = json.find("\"" + key + "\": ");
  REQUIRE(k != std::string::npos);
  const size_t a = json.find('[', k), b = json.find(']', a);
  std::vector<double> v;
  REQUIRE(prefixkv::json_parse_number_array(json.data() + a, b - a + 1, v) == cudaSuccess);
  return v;
}
std::string text_field(const std::string& json, const std::string& key) {
  const size_t k = json.find("\"" + key + "\": ");
  REQUIRE(k != std::string::npos);
  const size_t a = k + key.size() + 4, b = json.find_first_of(",}", a);
  return json.substr(a, b - a);
}

std::string method_args(const char* m) {
  std::string a = std::string("--method ") + m + " ";
  if (std::string(m) == "profile") a += "--profile llama_profile.json ";
  return a;
}

}  // namespace

TEST_CASE("greedy decoding from BOS with the full cache writes the known story") {
  const result r = run_ok(model_args + "--prompt '' --method full --steps 60");
  CHECK(r.out.rfind("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One "
                    "day, she saw a big, red ball. She wanted to play with it, but it was too high",
                    0) == 0);
  CHECK(r.err.empty());
}

TEST_CASE("the encoder round-trips text and matches the model's own tokens") {
  prefixkv_llama::tokenizer tk;
  std::string err;
  REQUIRE(tk.load(model_dir + "/tok512.bin", 512, err));
  const std::string s = "Once upon a time, there was a little girl named Lily. \xc3\xa9\xe2\x82\xac {}";
  const auto all = tk.encode(s, true, true);
  CHECK(tk.decode(1, std::vector<int>(all.begin() + 1, all.end())) == s);
  const auto t = tk.encode("Once upon a time", true, true);
  CHECK(t.front() == 1);
  CHECK(tk.text(t[1]) == " Once");  // the dummy space merges into the first word
  CHECK(tk.encode(" upon", false, false) == std::vector<int>(t.begin() + 2, t.begin() + 3));
}

TEST_CASE("every method at evict ratio 0 generates and scores exactly as the full cache") {
  write_text("llama_profile.json", "[0.5, 0.4, 0.3, 0.2, 0.1]\n");
  const std::string base = model_args + "--prompt " + quote(prompt) + " ";
  const result full = run_ok(base + "--method full --steps 40");
  CHECK(full.out.size() > 40);
  const std::string cont = quote(" Tim threw the ball and the dog ran after it. They played all day.");
  const result full_ppl = run_ok(base + "--method full --score-continuation " + cont);
  const std::string ppl = text_field(full_ppl.out, "ppl");
  for (const char* m : methods)
    for (const char* sc : {"attention", "window", "keynorm"}) {
      INFO("method ", m, " scorer ", sc);
      const std::string a = base + method_args(m) + "--scorer " + sc + " --evict-ratio 0 ";
      CHECK(run_ok(a + "--steps 40").out == full.out);
      const result s = run_ok(a + "--score-continuation " + cont);
      CHECK(text_field(s.out, "ppl") == ppl);
      CHECK(text_field(s.out, "nll_mean") == text_field(full_ppl.out, "nll_mean"));
      CHECK(text_field(s.out, "tokens") == text_field(full_ppl.out, "tokens"));
      CHECK(array_field(s.out, "keep") == array_field(full_ppl.out, "keep"));
    }
}

TEST_CASE("compressed runs keep the budget they report and stay reproducible") {
  write_text("llama_profile.json", "[0.5, 0.4, 0.3, 0.2, 0.1]\n");
  const std::string base = model_args + "--prompt " + quote(prompt) + " ";
  prefixkv_llama::tokenizer tk;
  std::string err;
  REQUIRE(tk.load(model_dir + "/tok512.bin", 512, err));
  const double T = double(tk.encode(prompt, true, true).size());
  const std::string cont = quote(" Tim threw the ball and the dog ran after it.");
  for (const char* m : methods)
    for (const char* sc : {"attention", "window", "keynorm"}) {
      INFO("method ", m, " scorer ", sc);
      const std::string a = base + method_args(m) + "--scorer " + sc + " --evict-ratio 0.6 ";
      const result s = run_ok(a + "--score-continuation " + cont);
      const auto keep = array_field(s.out, "keep");
      REQUIRE(keep.size() == 5);
      double kept = 0;
      for (double k : keep) kept += k;
      const std::string mm = m;
      const bool heads = mm == "adakv" || mm == "prefixkv-head";
      CHECK((s.out.find("keep_heads") != std::string::npos) == heads);
      if (mm == "full") {
        CHECK(kept == 5 * T);
      } else if (mm == "profile") {
        const double f[5] = {0.5, 0.4, 0.3, 0.2, 0.1};
        for (int l = 0; l < 5; ++l) CHECK(keep[l] == T - std::rint(f[l] * T));
      } else {
        const double N = 5 * T * (heads ? 4 : 1);
        CHECK(kept * (heads ? 4 : 1) == N - std::rint(0.6 * N));
      }
      CHECK(std::strtod(text_field(s.out, "ppl").c_str(), nullptr) > 1.0);
      // generation: same arguments, same text; sampling with a seed is reproducible too
      const result g1 = run_ok(a + "--steps 30"), g2 = run_ok(a + "--steps 30");
      CHECK(g1.out == g2.out);
      CHECK(!g1.out.empty());
    }
  const result t1 = run_ok(base + "--temperature 0.9 --seed 5 --steps 30");
  const result t2 = run_ok(base + "--temperature 0.9 --seed 5 --steps 30");
  const result t3 = run_ok(base + "--temperature 0.9 --seed 6 --steps 30");
  CHECK(t1.out == t2.out);
  CHECK(t1.out != t3.out);
}

TEST_CASE("bad input: exit 2, one line on stderr, nothing on stdout") {
  const std::string ckpt = model_dir + "/stories260K.bin", tok = model_dir + "/tok512.bin";
  const std::string bytes = slurp(ckpt), tbytes = slurp(tok);
  REQUIRE(bytes.size() == 1056540);
  write_text("llama_trunc.bin", bytes.substr(0, bytes.size() - 4));
  write_text("llama_long.bin", bytes + std::string(4, '\0'));
  write_text("llama_hdr.bin", bytes.substr(0, 20));
  std::string badhead = bytes;
  badhead[12] = 7;  // n_heads 7: dim 64 is not a multiple
  write_text("llama_heads.bin", badhead);
  write_text("llama_tok_trunc.bin", tbytes.substr(0, tbytes.size() - 3));
  write_text("llama_tok_extra.bin", tbytes + "x");
  write_text("llama_badprof.json", "[0.5, 0.5]\n");
  write_text("llama_badprof2.json", "[0.5, 0.5, 1.5, 0, 0]\n");
  write_text("llama_profile.json", "[0.5, 0.4, 0.3, 0.2, 0.1]\n");
  const std::string t = "--tokenizer '" + tok + "' ", m = "--model '" + ckpt + "' ";
  const std::string ok = model_args + "--prompt 'Once upon a time' ";
  expect_bad("--model no/such.bin " + t + "--prompt hi");
  expect_bad(m + "--tokenizer no/such.bin --prompt hi");
  expect_bad("--model llama_trunc.bin " + t + "--prompt hi");
  expect_bad("--model llama_long.bin " + t + "--prompt hi");
  expect_bad("--model llama_hdr.bin " + t + "--prompt hi");
  expect_bad("--model llama_heads.bin " + t + "--prompt hi");
  expect_bad("--model '" + tok + "' " + t + "--prompt hi");  // a tokenizer is no checkpoint
  expect_bad(m + "--tokenizer llama_tok_trunc.bin --prompt hi");
  expect_bad(m + "--tokenizer llama_tok_extra.bin --prompt hi");
  expect_bad(m + "--tokenizer '" + ckpt + "' --prompt hi");  // nor is a checkpoint a tokenizer
  expect_bad(ok + "--method magic");
  expect_bad(ok + "--scorer magic");
  expect_bad(ok + "--evict-ratio 1");
  expect_bad(ok + "--evict-ratio -0.1");
  expect_bad(ok + "--evict-ratio nan");
  expect_bad(ok + "--evict-ratio 0.5x");
  expect_bad(ok + "--steps -1");
  expect_bad(ok + "--steps many");
  expect_bad(ok + "--temperature -1");
  expect_bad(ok + "--seed -3 --temperature 1");
  expect_bad(ok + "--sinks -1");
  expect_bad(ok + "--window 0 --scorer window");
  expect_bad(ok + "--device tpu");
  write_text("llama_req.jsonl", "{\"prompt\": \"hi\"}\n");
#if defined(PKV_LLAMA_HAS_CUDA)
  {  // a CUDA build: runs where a device is usable, else exit 2 with one line
    const result r = run(ok + "--device cuda --steps 5");
    if (r.code != 0) expect_bad(ok + "--device cuda --steps 5");
  }
#else
  expect_bad(ok + "--device cuda");
  expect_bad("--serve llama_req.jsonl --pool-pages 10 --device cuda");
#endif
  expect_bad("--serve llama_none.jsonl --pool-pages 10");      // no such requests file
  expect_bad("--serve llama_req.jsonl");                       // no --pool-pages
  expect_bad("--serve llama_req.jsonl --pool-pages 0");
  expect_bad("--serve llama_req.jsonl --pool-pages 10 --prompt hi");
  expect_bad("--serve llama_req.jsonl --pool-pages 10 --temperature 1");
  expect_bad("--serve llama_req.jsonl --pool-pages 10 --scorer window");
  expect_bad(ok + "--pool-pages 10");                          // --pool-pages without --serve
  write_text("llama_badreq.jsonl", "{\"prompt\": \"hi\", \"steps\": -1}\n");
  expect_bad("--serve llama_badreq.jsonl --pool-pages 10");   // a malformed request
  expect_bad(ok + "--method profile");
  expect_bad(ok + "--method profile --profile no/such.json");
  expect_bad(ok + "--method profile --profile llama_badprof.json");
  expect_bad(ok + "--method profile --profile llama_badprof2.json");
  expect_bad(ok + "--profile llama_profile.json");  // a profile without --method profile
  expect_bad(ok + "--bogus");
  expect_bad(ok + "--steps");
  expect_bad(ok + "--score-continuation ''");
  std::string longp;
  for (int i = 0; i < 400; ++i) longp += " the big dog";
  expect_bad(model_args + "--prompt '" + longp + "'");
  std::string longc;
  for (int i = 0; i < 150; ++i) longc += " the big dog";
  expect_bad(ok + "--score-continuation '" + longc + "'");
  // the budget cannot be met: sinks and recent protect everything there is to evict
  expect_bad(ok + "--sinks 100 --evict-ratio 0.5");
}

TEST_CASE("decode upkeep: every policy runs capped, changes nothing with nothing to evict, rejects bad flags") {
  write_text("llama_profile.json", "[0.5, 0.4, 0.3, 0.2, 0.1]\n");
  const std::string tim = "Once upon a time, there was a little boy named Tim.";
  const std::string base = model_args + "--prompt " + quote(tim) + " ";
  const std::string cont = quote(" Tim threw the ball and the dog ran after it. They played all day.");
  const result plain = run_ok(base + "--method prefixkv --evict-ratio 0 --steps 220");
  const result plain_ppl = run_ok(base + "--method prefixkv --evict-ratio 0 --score-continuation " + cont);
  CHECK(plain_ppl.out.find("keep_end") == std::string::npos);  // no upkeep: the output of before
  for (const std::string pol : {"fixed", "fixed:4", "score", "score-ordered", "amortised:16", "rebalance:16"}) {
    INFO("policy ", pol);
    const std::string d = std::string("--decode-policy ") + pol + " ";
    // nothing to evict (no prefill compression, budgets = every token): the same text and scores as without upkeep
    CHECK(run_ok(base + "--method prefixkv --evict-ratio 0 --steps 220 " + d).out == plain.out);
    const result s0 = run_ok(base + "--method prefixkv --evict-ratio 0 --score-continuation " + cont + " " + d);
    CHECK(text_field(s0.out, "nll_mean") == text_field(plain_ppl.out, "nll_mean"));
    // capped: 200+ tokens, and the continuation ends with the cache at its cap (40 rows per layer, no prefill
    // compression; amortised: at most the slack more)
    const result g = run_ok(base + "--method full --steps 240 --decode-budget cap:40 --verbose " + d);
    CHECK(g.err.find("decode upkeep: budget cap:40, policy " + pol + ",") != std::string::npos);
    const std::string longc = quote(std::string(" Tim threw the ball and the dog ran after it.") +
                                    " They played all day until the sun went down and it was time to go home." +
                                    " The next day Tim and the dog went to the park again.");
    const result s = run_ok(base + "--method full --decode-budget cap:40 --score-continuation " + longc + " " + d);
    const auto end = array_field(s.out, "keep_end");
    REQUIRE(end.size() == 5);
    const double slack = pol.find(":16") != std::string::npos ? 16 : 0;
    double total = 0;
    for (double x : end) {
      total += x;
      if (pol.rfind("rebalance", 0) == 0) continue;  // the layer split moves, the total stays
      CHECK(x >= 40);
      CHECK(x <= 40 + slack);
    }
    CHECK(total >= 5 * 40);
    CHECK(total <= 5 * (40 + slack));
    CHECK(array_field(s.out, "keep") != end);
  }
  // the profile budget: the paper's rule after N tokens, ceil(N (1 - f_l)) for this profile
  const result p = run_ok(base + "--method prefixkv --decode-budget profile --profile llama_profile.json "
                                 "--decode-policy score --score-continuation " + cont);
  prefixkv_llama::tokenizer tk;
  std::string err;
  REQUIRE(tk.load(model_dir + "/tok512.bin", 512, err));
  const double steps = double(
      tk.encode(" Tim threw the ball and the dog ran after it. They played all day.", false, false).size() - 1);
  const double N = double(tk.encode(tim, true, true).size()) + steps;
  const auto pkeep = array_field(p.out, "keep"), pend = array_field(p.out, "keep_end");
  const double f[5] = {0.5, 0.4, 0.3, 0.2, 0.1};
  int below = 0;
  for (int l = 0; l < 5; ++l) {  // rows never exceed what the layer was given: the kept prefill + every new token
    CHECK(pend[size_t(l)] == std::min(pkeep[size_t(l)] + steps, std::ceil(N * (1 - f[l]) - 1e-9)));
    below += pend[size_t(l)] < pkeep[size_t(l)] + steps;
  }
  CHECK(below >= 3);
  const std::string ok = model_args + "--prompt 'Once upon a time' ";
  expect_bad(ok + "--decode-policy magic");
  expect_bad(ok + "--decode-policy amortised");
  expect_bad(ok + "--decode-policy amortised:-1");
  expect_bad(ok + "--decode-policy score:3");
  expect_bad(ok + "--decode-policy fixed:x");
  expect_bad(ok + "--decode-budget cap:0");
  expect_bad(ok + "--decode-budget cap:");
  expect_bad(ok + "--decode-budget everything");
  expect_bad(ok + "--decode-budget profile");  // without --profile
  expect_bad(ok + "--decode-budget profile --profile no/such.json");
  expect_bad(ok + "--decode-budget");
  expect_bad(ok + "--decode-recent -1 --decode-policy score");
  expect_bad(ok + "--decode-recent x --decode-policy score");
  expect_bad(ok + "--decode-recent 8");  // no upkeep asked for
  // a protected recent window: the newest 16 rows of every layer are the 16 newest tokens
  const result r = run_ok(base + "--method full --decode-budget cap:40 --decode-policy score --decode-recent 16 "
                                 "--verbose --steps 100");
  CHECK(r.err.find("protected 4 sinks + 16 recent") != std::string::npos);
}

TEST_CASE("--serve on the host: one line per request (texts of the single runs, refusals), then the summary") {
  const std::string p1 = prompt, p2 = "Lily had a cat named Tom. Tom liked to sleep in the sun.";
  write_text("llama_serve.jsonl",
             "{\"prompt\": " + prefixkv_llama::json_quote(p1) + ", \"method\": \"prefixkv\", \"evict_ratio\": 0.75, "
             "\"steps\": 30}\n" +
             "{\"prompt\": " + prefixkv_llama::json_quote(p2) + ", \"method\": \"full\", \"steps\": 20}\n" +
             "{\"prompt\": \"Hi\", \"method\": \"prefixkv\", \"evict_ratio\": 0.9}\n" +
             "{\"prompt\": " + prefixkv_llama::json_quote(p2) + ", \"method\": \"prefixkv-head\", \"evict_ratio\": 0.5, "
             "\"steps\": 25}\n");
  const result s = run_ok(model_args + "--serve llama_serve.jsonl --pool-pages 60 --max-prefill 2 --device cpu");
  std::istringstream in(s.out);
  std::vector<std::string> lines;
  for (std::string x; std::getline(in, x);) lines.push_back(x);
  REQUIRE(lines.size() == 5);
  CHECK(lines[4].rfind("{\"summary\": {\"requests\": 4, \"completed\": 3, \"refused\": 1", 0) == 0);
  CHECK(lines[4].find("\"pages_in_use_end\": 0, \"pages_reserved_end\": 0") != std::string::npos);
  CHECK(lines[2].rfind("{\"request\": 2, \"error\": ", 0) == 0);
  const std::string single[] = {
      "--prompt " + quote(p1) + " --method prefixkv --evict-ratio 0.75 --steps 30",
      "--prompt " + quote(p2) + " --method full --steps 20", "",
      "--prompt " + quote(p2) + " --method prefixkv-head --evict-ratio 0.5 --steps 25"};
  for (int i : {0, 1, 3}) {
    INFO("request " << i);
    const result one = run_ok(model_args + single[i]);
    const std::string want = "\"text\": " + prefixkv_llama::json_quote(one.out.substr(0, one.out.size() - 1)) + ",";
    CHECK(lines[size_t(i)].find(want) != std::string::npos);
  }
}
