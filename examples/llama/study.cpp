// prefixkv-llama-study: the heavy loop of the quality study (scripts/quality-study.sh drives it), in-process on
// the same runtime as prefixkv-llama. Three phases:
//
//   prefixkv-llama-study stories   --set calib|eval --count N --out DIR [--prompt-min 250 --prompt-max 380 --cont 100]
//       Sample N stories from the full-cache model at temperature 1, story k with seed 1000000 + k (calib) or
//       2000000 + k (eval): from BOS until the story ends (BOS/EOS) or prompt-max + cont tokens. Stories shorter than
//       prompt-min + cont tokens are skipped (the next seed is tried). Story = prompt (BOS + min(prompt-max,
//       length - cont) tokens) + continuation (the next cont tokens). Writes DIR/stories_SET.txt (one story a line:
//       index seed prompt_tokens continuation_tokens ids...) and DIR/stories_SET.jsonl (the texts).
//   prefixkv-llama-study calibrate --out DIR [--ratios R,...] [--scorers S,...]
//       For every calibration prompt, scorer and ratio: prefixkv's solution (allocation prefix, layer granularity);
//       profile_accumulator averages the per-layer eviction fractions; writes DIR/profiles/SCORER_RATIO.json.
//   prefixkv-llama-study evaluate  --out DIR [--ratios R,...] [--scorers S,...] [--methods M,...] [--shard i/n]
//       [--gen 64] For every evaluation story (those with index % n == i): prefill the prompt once, then for the
//       full cache and every (scorer, method, ratio): compress a copy of the prefilled cache, feed the continuation
//       (teacher forcing: NLL, argmax predictions) and generate `gen` greedy tokens. Writes DIR/eval_i.jsonl, one
//       line per (story, scorer, method, ratio): nll_mean, ppl, top1 (agreement of the argmax predictions with the
//       full cache's, over the continuation positions that see the compressed cache), rouge_l (ROUGE-L F1 of the
//       greedy generation against the full cache's), keep / keep_heads (tokens kept per layer / kv head),
//       recent_kept (share of the prompt's last 64 positions still cached, mean over layers and kv heads).
//       `streaming` ignores the scorer (it is reported once, scorer "recency"); `full` once (scorer "none").
//
//   prefixkv-llama-study longgen   --out DIR [--gen 256] [--caps 32,64] [--policies P,...] [--prefill-ratio 0.5]
//       [--shard i/n] Long generations with decode-time upkeep, on the stories of `stories --set long` (short
//       prompts, long continuations): for every story the full cache first (teacher forcing over the continuation,
//       `gen` greedy tokens), then for both prefills — `full` (no compression) and `prefixkv` (window scorer,
//       evict ratio `prefill-ratio`) — every cap C (rows per layer on average: budget cap:C for the full prefill,
//       cap:C / (1 - ratio) for the compressed one, so both hold about C rows per layer) and every decode policy:
//       the same teacher forcing and greedy generation with the upkeep running, plus the compressed prefill
//       without upkeep (policy "none": the cache grows). Writes DIR/longgen_i.jsonl, one line per (story, prefill,
//       cap, policy): nll_mean, ppl, top1, rouge_l as in `evaluate` (against the full cache), rows_mean /
//       rows_peak (cached rows per (layer, kv head) over the teacher-forced steps: mean, largest), rows_end (per
//       layer, at the end), budget_ok (every step of both runs: no segment above its budget — plus the slack for
//       the amortised policies — and, for the per-step policies, exactly min(rows + 1, budget)). Policies use the
//       --decode-policy syntax, with `@R` for a protected recent window of R rows (--decode-recent R), e.g.
//       score@16; the others protect --recent rows.
//
// Common options: --model M.bin --tokenizer T.bin --window 16 --sinks 4 --recent 1. Errors: one line, exit 2.
#include "runtime.hpp"
#include "tokenizer.hpp"

#include <prefixkv/io/json.hpp>
#include <prefixkv/profile/profile.hpp>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <sys/stat.h>
#include <vector>

#ifndef PREFIXKV_LLAMA_MODEL_DIR
#define PREFIXKV_LLAMA_MODEL_DIR "models/stories260K"
#endif

namespace {

using namespace prefixkv_llama;

[[noreturn]] void die(const std::string& why) {
  std::fprintf(stderr, "prefixkv-llama-study: %s\n", why.c_str());
  std::exit(2);
}

//! A decode policy of the long-generation phase: `--decode-policy` syntax, optionally `@R` = a protected recent
//! window of R rows for the upkeep (`--decode-recent R`), e.g. score@16.
bool parse_study_policy(const std::string& s, decode_options& d, std::string& err) {
  const size_t at = s.find('@');
  if (!parse_decode_policy(s.substr(0, at), d, err)) return false;
  if (at == std::string::npos) return true;
  errno = 0;
  char* end = nullptr;
  const std::string r = s.substr(at + 1);
  const long long v = std::strtoll(r.c_str(), &end, 10);
  if (r.empty() || end != r.c_str() + r.size() || errno != 0 || v < 0 || v > (1 << 20))
    return err = "policy '" + s + "': the recent window after @ must be an integer >= 0", false;
  d.protect.recent = v;
  return true;
}

struct options {
  std::string phase, out, set = "eval";
  std::string model = PREFIXKV_LLAMA_MODEL_DIR "/stories260K.bin";
  std::string tokenizer = PREFIXKV_LLAMA_MODEL_DIR "/tok512.bin";
  int count = 100, prompt_min = 250, prompt_max = 380, cont = 100, gen = 64, window = 16;
  int64_t sinks = 4, recent = 1;
  int shard = 0, shards = 1;
  std::vector<int> caps{32, 64};
  std::vector<std::string> policies{"fixed",         "fixed:4",      "score",           "score@16",
                                    "score-ordered@16", "amortised:16", "amortised:16@16", "rebalance:16@16"};
  double prefill_ratio = 0.5;
  std::vector<double> ratios{0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9};
  std::vector<scorer_name> scorers{scorer_name::attention, scorer_name::window};
  std::vector<method_kind> methods{method_kind::streaming, method_kind::uniform,  method_kind::pyramid,
                                   method_kind::adakv,     method_kind::prefixkv, method_kind::prefixkv_head,
                                   method_kind::profile};
};

long long parse_int(const std::string& flag, const std::string& s) {
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || end != s.c_str() + s.size() || errno != 0) die(flag + ": '" + s + "' is not an integer");
  return v;
}
double parse_double(const std::string& flag, const std::string& s) {
  errno = 0;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || end != s.c_str() + s.size() || errno != 0 || !std::isfinite(v))
    die(flag + ": '" + s + "' is not a number");
  return v;
}
std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  std::stringstream ss(s);
  while (std::getline(ss, cur, ','))
    if (!cur.empty()) out.push_back(cur);
  return out;
}

options parse(int argc, char** argv) {
  options o;
  if (argc < 2)
    die("usage: prefixkv-llama-study stories|calibrate|evaluate|longgen --out DIR [options] (see study.cpp)");
  o.phase = argv[1];
  if (o.phase != "stories" && o.phase != "calibrate" && o.phase != "evaluate" && o.phase != "longgen")
    die("unknown phase '" + o.phase + "'");
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) die("missing value after " + a);
      return argv[++i];
    };
    auto count = [&](int lo, int hi) {
      const long long v = parse_int(a, value());
      if (v < lo || v > hi) die(a + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
      return int(v);
    };
    if (a == "--out") o.out = value();
    else if (a == "--model") o.model = value();
    else if (a == "--tokenizer") o.tokenizer = value();
    else if (a == "--set") {
      o.set = value();
      if (o.set != "calib" && o.set != "eval" && o.set != "long") die("--set must be calib, eval or long");
    } else if (a == "--count") o.count = count(1, 100000);
    else if (a == "--prompt-min") o.prompt_min = count(1, 1 << 20);
    else if (a == "--prompt-max") o.prompt_max = count(1, 1 << 20);
    else if (a == "--cont") o.cont = count(1, 1 << 20);
    else if (a == "--gen") o.gen = count(1, 1 << 20);
    else if (a == "--window") o.window = count(1, 1 << 20);
    else if (a == "--sinks") o.sinks = count(0, 1 << 20);
    else if (a == "--recent") o.recent = count(0, 1 << 20);
    else if (a == "--shard") {
      const std::string s = value();
      const size_t slash = s.find('/');
      if (slash == std::string::npos) die("--shard must be i/n");
      o.shard = int(parse_int(a, s.substr(0, slash)));
      o.shards = int(parse_int(a, s.substr(slash + 1)));
      if (o.shards < 1 || o.shard < 0 || o.shard >= o.shards) die("--shard i/n needs 0 <= i < n");
    } else if (a == "--caps") {
      o.caps.clear();
      for (const auto& c : split(value())) {
        const long long x = parse_int(a, c);
        if (x < 1 || x > (1 << 20)) die("--caps: every cap must be >= 1");
        o.caps.push_back(int(x));
      }
      if (o.caps.empty()) die("--caps is empty");
    } else if (a == "--policies") {
      o.policies = split(value());
      for (const auto& p : o.policies) {
        decode_options d;
        std::string err;
        if (!parse_study_policy(p, d, err)) die(err);
      }
      if (o.policies.empty()) die("--policies is empty");
    } else if (a == "--prefill-ratio") {
      o.prefill_ratio = parse_double(a, value());
      if (!(o.prefill_ratio >= 0.0 && o.prefill_ratio < 1.0)) die("--prefill-ratio must be in [0, 1)");
    } else if (a == "--ratios") {
      o.ratios.clear();
      for (const auto& r : split(value())) {
        const double x = parse_double(a, r);
        if (!(x >= 0.0 && x < 1.0)) die("--ratios: every ratio must be in [0, 1)");
        o.ratios.push_back(x);
      }
      if (o.ratios.empty()) die("--ratios is empty");
    } else if (a == "--scorers") {
      o.scorers.clear();
      for (const auto& s : split(value())) {
        scorer_name x;
        if (!parse_scorer(s, x)) die("--scorers: unknown scorer '" + s + "'");
        o.scorers.push_back(x);
      }
    } else if (a == "--methods") {
      o.methods.clear();
      for (const auto& s : split(value())) {
        method_kind x;
        if (!parse_method(s, x)) die("--methods: unknown method '" + s + "'");
        if (x != method_kind::full) o.methods.push_back(x);
      }
    } else die("unknown option '" + a + "'");
  }
  if (o.out.empty()) die("--out DIR is required");
  if (o.prompt_min > o.prompt_max) die("--prompt-min must be <= --prompt-max");
  return o;
}

std::string ratio_tag(double r) {
  char b[32];
  std::snprintf(b, sizeof(b), "%.2f", r);
  return b;
}
std::string profile_path(const options& o, scorer_name s, double r) {
  return o.out + "/profiles/" + to_string(s) + "_" + ratio_tag(r) + ".json";
}

std::string json_string(const std::string& s) {
  std::string o = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      o += '\\';
      o += char(c);
    } else if (c < 0x20) {
      char b[8];
      std::snprintf(b, sizeof(b), "\\u%04x", c);
      o += b;
    } else {
      o += char(c);
    }
  }
  return o + "\"";
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct story {
  int index = 0;
  uint64_t seed = 0;
  std::vector<int> prompt;  // BOS + prompt tokens
  std::vector<int> cont;
};

std::vector<story> read_stories(const std::string& path) {
  std::ifstream f(path);
  if (!f) die("cannot open " + path + " (run the stories phase first)");
  std::vector<story> out;
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ss(line);
    story s;
    long long np = 0, nc = 0;
    if (!(ss >> s.index >> s.seed >> np >> nc) || np < 1 || nc < 1 || np + nc > (1 << 20)) die("malformed line in " + path);
    s.prompt.resize(size_t(np));
    s.cont.resize(size_t(nc));
    for (auto& t : s.prompt)
      if (!(ss >> t)) die("malformed line in " + path);
    for (auto& t : s.cont)
      if (!(ss >> t)) die("malformed line in " + path);
    out.push_back(std::move(s));
  }
  return out;
}

void make_dir(const std::string& d) {
  if (::mkdir(d.c_str(), 0755) != 0 && errno != EEXIST) die("cannot create " + d);
}

// ---- phase 1: stories ----------------------------------------------------------------------------------------
void run_stories(const options& o, const model& m, const tokenizer& tk) {
  if (o.prompt_max + o.cont + 1 > m.cfg.seq_len) die("--prompt-max + --cont + 1 exceeds the context");
  std::string err;
  cpu_backend be(m);
  const uint64_t base = o.set == "calib" ? 1000000 : o.set == "eval" ? 2000000 : 3000000;
  const auto t0 = std::chrono::steady_clock::now();
  std::string txt = "# index seed prompt_tokens continuation_tokens ids (prompt with BOS, then continuation)\n";
  std::string js;
  int kept = 0, tried = 0;
  for (uint64_t k = 0; kept < o.count; ++k, ++tried) {
    if (tried > 100 * o.count + 1000) die("too few stories reach --prompt-min + --cont tokens");
    rng r(base + k);
    std::vector<int> toks{tokenizer::bos};
    std::vector<float> logits;
    if (!be.prefill(toks.data(), 1, prefill_record{}, logits, err)) die(err);
    while (int(toks.size()) - 1 < o.prompt_max + o.cont) {
      const int t = sample(logits, 1.0, r);
      if (t == tokenizer::bos || t == tokenizer::eos) break;
      toks.push_back(t);
      if (!be.step(t, int(toks.size()) - 1, logits, err)) die(err);
    }
    const int n = int(toks.size()) - 1;
    if (n < o.prompt_min + o.cont) continue;
    const int np = std::min(o.prompt_max, n - o.cont);
    story s;
    s.index = kept++;
    s.seed = base + k;
    s.prompt.assign(toks.begin(), toks.begin() + 1 + np);
    s.cont.assign(toks.begin() + 1 + np, toks.begin() + 1 + np + o.cont);
    txt += std::to_string(s.index) + " " + std::to_string(s.seed) + " " + std::to_string(s.prompt.size()) + " " +
           std::to_string(s.cont.size());
    for (int t : s.prompt) txt += " " + std::to_string(t);
    for (int t : s.cont) txt += " " + std::to_string(t);
    txt += "\n";
    js += "{\"index\": " + std::to_string(s.index) + ", \"seed\": " + std::to_string(s.seed) +
          ", \"prompt_tokens\": " + std::to_string(s.prompt.size()) + ", \"prompt\": " +
          json_string(tk.decode(tokenizer::bos, std::vector<int>(s.prompt.begin() + 1, s.prompt.end()))) +
          ", \"continuation\": " + json_string(tk.decode(s.prompt.back(), s.cont)) + "}\n";
  }
  std::ofstream(o.out + "/stories_" + o.set + ".txt") << txt;
  std::ofstream(o.out + "/stories_" + o.set + ".jsonl") << js;
  std::fprintf(stderr, "stories %s: %d kept of %d sampled (%.1f s)\n", o.set.c_str(), kept, tried, seconds_since(t0));
}

// ---- phase 2: calibrate --------------------------------------------------------------------------------------
void run_calibrate(const options& o, const model& m) {
  const auto stories = read_stories(o.out + "/stories_calib.txt");
  const config& c = m.cfg;
  std::string err;
  cpu_backend be(m);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<prefixkv::profile_accumulator> acc(o.scorers.size() * o.ratios.size());
  std::vector<prefixkv::compress_plan> plans(acc.size());
  for (size_t si = 0; si < o.scorers.size(); ++si)
    for (size_t ri = 0; ri < o.ratios.size(); ++ri) {
      policy p;
      p.method = method_kind::prefixkv;
      p.scorer = o.scorers[si];
      p.evict_ratio = o.ratios[ri];
      p.sinks = o.sinks;
      p.recent = o.recent;
      p.window = o.window;
      if (!make_policy_plan(p, c, plans[si * o.ratios.size() + ri], err)) die(err);
    }
  prefill_record rec;
  rec.attention = true;
  rec.window = o.window;
  std::vector<float> logits;
  std::vector<int64_t> keep(size_t(c.n_layers)), tokens(size_t(c.n_layers));
  for (const story& s : stories) {
    if (!be.prefill(s.prompt.data(), int(s.prompt.size()), rec, logits, err)) die(err);
    be.save(0);
    for (size_t i = 0; i < plans.size(); ++i) {
      be.restore(0);
      if (!be.compress(plans[i], err)) die("story " + std::to_string(s.index) + ": " + err);
      const auto len = be.lengths();
      for (int l = 0; l < c.n_layers; ++l) {
        keep[l] = len[size_t(l) * c.n_kv_heads];
        tokens[l] = int64_t(s.prompt.size());
      }
      if (acc[i].add(keep.data(), tokens.data(), c.n_layers) != cudaSuccess) die(prefixkv::last_error().message);
    }
  }
  make_dir(o.out + "/profiles");
  for (size_t si = 0; si < o.scorers.size(); ++si)
    for (size_t ri = 0; ri < o.ratios.size(); ++ri) {
      std::vector<double> f;
      const auto& a = acc[si * o.ratios.size() + ri];
      if (a.fractions(f) != cudaSuccess) die(prefixkv::last_error().message);
      const std::string path = profile_path(o, o.scorers[si], o.ratios[ri]);
      if (prefixkv::profile_save(path.c_str(), f) != cudaSuccess) die(path + ": " + prefixkv::last_error().message);
    }
  std::fprintf(stderr, "calibrate: %zu prompts x %zu (scorer, ratio) (%.1f s)\n", stories.size(), plans.size(),
               seconds_since(t0));
}

// ---- phase 3: evaluate ---------------------------------------------------------------------------------------
struct eval_config {
  policy pol;
  prefixkv::compress_plan plan;
  const char* scorer_label;
};

void run_evaluate(const options& o, const model& m) {
  const auto stories = read_stories(o.out + "/stories_eval.txt");
  const config& c = m.cfg;
  std::string err;
  cpu_backend be(m);
  // the configurations: streaming once (its scorer is the position), the others per scorer
  std::vector<eval_config> cfgs;
  for (double r : o.ratios)
    for (method_kind mk : o.methods)
      for (size_t si = 0; si < o.scorers.size(); ++si) {
        if (mk == method_kind::streaming && si > 0) continue;
        eval_config e;
        e.pol.method = mk;
        e.pol.scorer = o.scorers[si];
        e.pol.evict_ratio = r;
        e.pol.sinks = o.sinks;
        e.pol.recent = o.recent;
        e.pol.window = o.window;
        e.scorer_label = mk == method_kind::streaming ? "recency" : to_string(o.scorers[si]);
        if (mk == method_kind::profile) {
          const std::string path = profile_path(o, o.scorers[si], r);
          if (prefixkv::profile_load(path.c_str(), e.pol.profile) != cudaSuccess)
            die(path + ": " + prefixkv::last_error().message + " (run the calibrate phase first)");
        }
        if (!make_policy_plan(e.pol, c, e.plan, err)) die(err);
        cfgs.push_back(std::move(e));
      }
  const std::string path = o.out + "/eval_" + std::to_string(o.shard) + ".jsonl";
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) die("cannot create " + path);
  prefill_record rec;
  rec.attention = true;
  rec.window = o.window;
  const auto t0 = std::chrono::steady_clock::now();
  int done = 0;
  std::vector<float> logits;
  std::vector<int> top1_full, gen_full, top1, gen;
  // share of the prompt's last 64 positions that the compressed caches still hold (mean over (layer, kv head))
  auto recent_share = [&](int T) {
    const int from = std::max(0, T - 64);
    double sum = 0;
    for (int l = 0; l < c.n_layers; ++l)
      for (int h = 0; h < c.n_kv_heads; ++h) {
        int n = 0;
        for (int p : be.positions(l, h)) n += p >= from && p < T;
        sum += double(n) / double(T - from);
      }
    return sum / double(c.n_layers * c.n_kv_heads);
  };
  auto emit = [&](const story& s, const char* scorer, const char* method, double ratio, double nll_sum,
                  double agree, double rouge, const std::vector<int32_t>& len, bool heads, double recent) {
    const double mean = nll_sum / double(s.cont.size());
    std::string line = "{\"story\": " + std::to_string(s.index) + ", \"scorer\": \"" + scorer + "\", \"method\": \"" +
                       method + "\", \"ratio\": " + ratio_tag(ratio) +
                       ", \"prompt_tokens\": " + std::to_string(s.prompt.size()) + ", \"nll_mean\": ";
    prefixkv::json_append_number(line, mean);
    line += ", \"ppl\": ";
    prefixkv::json_append_number(line, std::exp(mean));
    line += ", \"top1\": ";
    prefixkv::json_append_number(line, agree);
    line += ", \"rouge_l\": ";
    prefixkv::json_append_number(line, rouge);
    line += ", \"recent_kept\": ";
    prefixkv::json_append_number(line, recent);
    line += ", \"keep\": [";
    for (int l = 0; l < c.n_layers; ++l) {
      int64_t sum = 0;
      for (int h = 0; h < c.n_kv_heads; ++h) sum += len[size_t(l) * c.n_kv_heads + h];
      if (l) line += ", ";
      if (sum % c.n_kv_heads == 0)
        prefixkv::json_append_int(line, sum / c.n_kv_heads);
      else
        prefixkv::json_append_number(line, double(sum) / c.n_kv_heads);
    }
    line += "]";
    if (heads) {
      line += ", \"keep_heads\": [";
      for (int l = 0; l < c.n_layers; ++l) {
        if (l) line += ", ";
        prefixkv::json_append_int_array(line, len.data() + size_t(l) * c.n_kv_heads, c.n_kv_heads);
      }
      line += "]";
    }
    line += "}\n";
    std::fputs(line.c_str(), f);
  };
  for (const story& s : stories) {
    if (s.index % o.shards != o.shard) continue;
    const int T = int(s.prompt.size());
    if (T + int(s.cont.size()) - 1 > c.seq_len || T + o.gen - 1 > c.seq_len) die("a story exceeds the context");
    if (!be.prefill(s.prompt.data(), T, rec, logits, err)) die(err);
    be.save(0);
    const std::vector<float> logits0 = logits;
    rng unused(0);
    double nll_full = 0;
    if (!teacher_force(be, logits0, s.cont, T, nll_full, &top1_full, err)) die(err);
    be.restore(0);
    if (!generate(be, logits0, o.gen, T, 0.0, unused, false, gen_full, err)) die(err);
    be.restore(0);
    emit(s, "none", "full", 0.0, nll_full, 1.0, 1.0, be.lengths(), false, 1.0);
    for (const eval_config& e : cfgs) {
      be.restore(0);
      if (!be.compress(e.plan, err))
        die("story " + std::to_string(s.index) + ", " + to_string(e.pol.method) + " " + e.scorer_label + " " +
            ratio_tag(e.pol.evict_ratio) + ": " + err);
      const auto len = be.lengths();
      const double recent = recent_share(T);
      be.save(1);
      double nll_sum = 0;
      if (!teacher_force(be, logits0, s.cont, T, nll_sum, &top1, err)) die(err);
      int agree = 0;
      for (size_t i = 1; i < top1.size(); ++i) agree += top1[i] == top1_full[i];
      be.restore(1);
      if (!generate(be, logits0, o.gen, T, 0.0, unused, false, gen, err)) die(err);
      emit(s, e.scorer_label, to_string(e.pol.method), e.pol.evict_ratio, nll_sum,
           top1.size() > 1 ? double(agree) / double(top1.size() - 1) : 1.0, rouge_l_f1(gen, gen_full), len,
           per_head(e.pol.method), recent);
    }
    ++done;
    std::fflush(f);
  }
  if (std::fclose(f) != 0) die("write error on " + path);
  std::fprintf(stderr, "evaluate shard %d/%d: %d stories x %zu configurations (%.1f s)\n", o.shard, o.shards, done,
               cfgs.size() + 1, seconds_since(t0));
}

// ---- phase 4: long generations with decode-time upkeep --------------------------------------------------------
//! Per-step statistics of a run with upkeep: cached rows per (layer, kv head) and the budget check (a segment of
//! n rows before the step holds min(n + 1, budget) after it; the amortised policies: n + 1, and min(n + 1,
//! budget) once every slack + 1 steps — rebalance: at most n + 1, the split being re-solved).
struct upkeep_stats {
  double rows_sum = 0;
  int64_t steps = 0, rows_peak = 0;
  bool budget_ok = true;
  void observe(const cpu_backend& be, const std::vector<int32_t>& before) {
    const auto len = be.lengths();
    const config& c = be.cfg();
    const host_decode_upkeep& u = be.upkeep();
    const prefixkv::decode_config& dc = u.plan().cfg;
    const bool amortised = u.active() && dc.policy == prefixkv::decode_policy::amortised;
    const bool compressed = amortised && (steps + 1) % (dc.slack + 1) == 0;
    int64_t sum = 0;
    for (int l = 0; l < c.n_layers; ++l)
      for (int h = 0; h < c.n_kv_heads; ++h) {
        const int64_t n = len[size_t(l) * c.n_kv_heads + h], prev = before[size_t(l) * c.n_kv_heads + h];
        sum += n;
        rows_peak = std::max(rows_peak, n);
        int64_t want = prev + 1;
        if (u.active() && (!amortised || compressed)) want = std::min(want, u.budget(l, h));
        if (amortised && compressed && dc.rebalance ? n > prev + 1 : n != want) budget_ok = false;
      }
    rows_sum += double(sum) / double(c.n_layers * c.n_kv_heads);
    ++steps;
  }
};

//! Teacher forcing over `text` (as `teacher_force`), with statistics after every step.
bool teacher_force_stats(cpu_backend& be, const std::vector<float>& logits0, const std::vector<int>& text,
                         int prompt_len, double& nll_sum, std::vector<int>& top1, upkeep_stats& st, std::string& err) {
  std::vector<float> logits = logits0;
  nll_sum = 0.0;
  top1.clear();
  for (size_t i = 0; i < text.size(); ++i) {
    if (i > 0) {
      const auto before = be.lengths();
      if (!be.step(text[i - 1], prompt_len + int(i) - 1, logits, err)) return false;
      st.observe(be, before);
    }
    nll_sum += nll(logits, text[i]);
    top1.push_back(argmax(logits));
  }
  return true;
}

//! `steps` greedy tokens (no stop at story boundaries), checking the budgets after every step.
bool generate_stats(cpu_backend& be, const std::vector<float>& logits0, int steps, int prompt_len,
                    std::vector<int>& out, upkeep_stats& st, std::string& err) {
  std::vector<float> logits = logits0;
  out.clear();
  for (int i = 0; i < steps; ++i) {
    out.push_back(argmax(logits));
    if (i + 1 == steps) break;
    const auto before = be.lengths();
    if (!be.step(out.back(), prompt_len + i, logits, err)) return false;
    st.observe(be, before);
  }
  return true;
}

void run_longgen(const options& o, const model& m) {
  const auto stories = read_stories(o.out + "/stories_long.txt");
  const config& c = m.cfg;
  std::string err;
  cpu_backend be(m);
  struct prefill_cfg {
    const char* name;
    policy pol;
    double keep;  // kept fraction of the prompt: the cap's horizon is C / keep
  };
  std::vector<prefill_cfg> prefills(2);
  prefills[0].name = "full";
  prefills[0].pol.method = method_kind::full;
  prefills[0].keep = 1.0;
  prefills[1].name = "prefixkv";
  prefills[1].pol.method = method_kind::prefixkv;
  prefills[1].pol.scorer = scorer_name::window;
  prefills[1].pol.evict_ratio = o.prefill_ratio;
  prefills[1].keep = 1.0 - o.prefill_ratio;
  for (auto& p : prefills) {
    p.pol.sinks = o.sinks;
    p.pol.recent = o.recent;
    p.pol.window = o.window;
  }
  const std::string path = o.out + "/longgen_" + std::to_string(o.shard) + ".jsonl";
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) die("cannot create " + path);
  const auto t0 = std::chrono::steady_clock::now();
  int done = 0, runs = 0;
  std::vector<float> logits;
  std::vector<int> top1_full, gen_full, top1, gen;
  auto emit = [&](const story& s, const char* prefill, int cap, int64_t horizon, const std::string& pol,
                  double nll_sum, const std::vector<int>& t1, const std::vector<int>& g, const upkeep_stats& st,
                  const std::vector<int32_t>& keep0, const std::vector<int32_t>& end) {
    int agree = 0;
    for (size_t i = 1; i < t1.size(); ++i) agree += t1[i] == top1_full[i];
    const double mean = nll_sum / double(s.cont.size());
    std::string line = "{\"story\": " + std::to_string(s.index) + ", \"prefill\": \"" + prefill +
                       "\", \"cap\": " + std::to_string(cap) + ", \"horizon\": " + std::to_string(horizon) +
                       ", \"policy\": \"" + pol + "\", \"prompt_tokens\": " + std::to_string(s.prompt.size()) +
                       ", \"tokens\": " + std::to_string(s.cont.size()) + ", \"gen\": " + std::to_string(g.size()) +
                       ", \"nll_mean\": ";
    prefixkv::json_append_number(line, mean);
    line += ", \"ppl\": ";
    prefixkv::json_append_number(line, std::exp(mean));
    line += ", \"top1\": ";
    prefixkv::json_append_number(line, t1.size() > 1 ? double(agree) / double(t1.size() - 1) : 1.0);
    line += ", \"rouge_l\": ";
    prefixkv::json_append_number(line, rouge_l_f1(g, gen_full));
    line += ", \"rows_mean\": ";
    prefixkv::json_append_number(line, st.steps ? st.rows_sum / double(st.steps) : 0.0);
    line += ", \"rows_peak\": " + std::to_string(st.rows_peak);
    line += std::string(", \"budget_ok\": ") + (st.budget_ok ? "true" : "false");
    std::vector<double> per_layer(size_t(c.n_layers)), per_layer0(size_t(c.n_layers));
    for (int l = 0; l < c.n_layers; ++l)
      for (int h = 0; h < c.n_kv_heads; ++h) {
        per_layer[l] += double(end[size_t(l) * c.n_kv_heads + h]) / c.n_kv_heads;
        per_layer0[l] += double(keep0[size_t(l) * c.n_kv_heads + h]) / c.n_kv_heads;
      }
    line += ", \"keep0\": ";
    prefixkv::json_append_number_array(line, per_layer0.data(), c.n_layers);
    line += ", \"rows_end\": ";
    prefixkv::json_append_number_array(line, per_layer.data(), c.n_layers);
    line += "}\n";
    std::fputs(line.c_str(), f);
    ++runs;
  };
  for (const story& s : stories) {
    if (s.index % o.shards != o.shard) continue;
    const int T = int(s.prompt.size());
    if (T + int(s.cont.size()) - 1 > c.seq_len || T + o.gen - 1 > c.seq_len) die("a story exceeds the context");
    prefill_record rec;
    rec.window = o.window;  // the compressed prefill's scorer input (the full cache's logits do not depend on it)
    if (!be.prefill(s.prompt.data(), T, rec, logits, err)) die(err);
    be.save(0);
    const std::vector<float> logits0 = logits;
    {  // the full cache: the reference of every other run
      upkeep_stats st;
      double nll_full = 0;
      if (!teacher_force_stats(be, logits0, s.cont, T, nll_full, top1_full, st, err)) die(err);
      const std::vector<int32_t> end = be.lengths();
      be.restore(0);
      upkeep_stats gs;
      if (!generate_stats(be, logits0, o.gen, T, gen_full, gs, err)) die(err);
      be.restore(0);
      emit(s, "full", 0, 0, "full", nll_full, top1_full, gen_full, st, be.lengths(), end);
    }
    for (const prefill_cfg& p : prefills) {
      be.restore(0);
      prefixkv::compress_plan plan;
      if (compresses(p.pol)) {
        if (!make_policy_plan(p.pol, c, plan, err)) die(err);
        if (!be.compress(plan, err)) die("story " + std::to_string(s.index) + ": " + err);
      }
      be.save(1);
      const std::vector<int32_t> keep0 = be.lengths();
      std::vector<std::string> pols = o.policies;
      if (compresses(p.pol)) pols.insert(pols.begin(), "none");
      for (int cap : o.caps)
        for (const std::string& pn : pols) {
          if (pn == "none" && cap != o.caps.front()) continue;  // no upkeep: the same run for every cap
          decode_options d;
          d.protect = prefixkv::protect_policy{o.sinks, o.recent};
          if (pn != "none" && !parse_study_policy(pn, d, err)) die(err);
          const int64_t horizon = std::max<int64_t>(1, int64_t(std::lround(double(cap) / p.keep)));
          d.budget = pn == "none" ? decode_budget_kind::off : decode_budget_kind::cap;
          d.cap = horizon;
          d.gran = prefixkv::granularity::layer;
          double nll_sum = 0;
          upkeep_stats st, gs;
          be.restore(1);
          if (d.enabled() && !be.begin_decode(d, err)) die(err);
          if (!teacher_force_stats(be, logits0, s.cont, T, nll_sum, top1, st, err)) die(err);
          const std::vector<int32_t> end = be.lengths();
          be.restore(1);
          if (d.enabled() && !be.begin_decode(d, err)) die(err);
          if (!generate_stats(be, logits0, o.gen, T, gen, gs, err)) die(err);
          st.budget_ok = st.budget_ok && gs.budget_ok;
          emit(s, p.name, pn == "none" ? 0 : cap, pn == "none" ? 0 : horizon, pn, nll_sum, top1, gen, st, keep0, end);
        }
    }
    ++done;
    std::fflush(f);
  }
  if (std::fclose(f) != 0) die("write error on " + path);
  std::fprintf(stderr, "longgen shard %d/%d: %d stories, %d runs (%.1f s)\n", o.shard, o.shards, done, runs,
               seconds_since(t0));
}

}  // namespace

int main(int argc, char** argv) {
  const options o = parse(argc, argv);
  model m;
  tokenizer tk;
  std::string err;
  if (!load_checkpoint(o.model, m, err)) die(err);
  if (!tk.load(o.tokenizer, m.cfg.vocab_size, err)) die(err);
  make_dir(o.out);
  if (o.phase == "stories")
    run_stories(o, m, tk);
  else if (o.phase == "calibrate")
    run_calibrate(o, m);
  else if (o.phase == "longgen")
    run_longgen(o, m);
  else
    run_evaluate(o, m);
  return 0;
}
