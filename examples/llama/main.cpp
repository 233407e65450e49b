// prefixkv-llama: a LLaMA runtime (llama2.c checkpoints) with the prefixkv compressor inside.
//
//   prefixkv-llama --model M.bin --tokenizer T.bin --prompt TEXT [--steps N] [--temperature T --seed S]
//                  [--method full|streaming|uniform|pyramid|adakv|prefixkv|prefixkv-head|profile] [--evict-ratio R]
//                  [--profile P.json] [--scorer attention|window|keynorm] [--window W] [--sinks 4] [--recent 1]
//                  [--device cpu|cuda] [--score-continuation TEXT] [--verbose]
//                  [--decode-budget prefill|profile|cap:N] [--decode-recent R]
//                  [--decode-policy fixed[:D]|score|score-ordered|amortised:M|rebalance:M]
//   prefixkv-llama --serve REQUESTS.jsonl --pool-pages N [--max-active 256] [--max-prefill 8]
//                  [--max-prefill-tokens 4096] [--page-size 16] [the policy options above as defaults]
//
// The prompt is encoded the llama2.c way (BOS, a dummy space, merges by score) and prefilled with the full cache;
// the compressor then compresses every layer's cache (see policy.hpp for the methods) and decoding continues on
// the compressed caches, new tokens at their original positions (prompt_len, prompt_len + 1, ...).
// * Decode-time upkeep (either flag turns it on; see decode_upkeep.hpp and docs/decode.md): after every new token
//   every cache is brought back to its budget — `prefill` (default): the fraction of the tokens seen that the
//   prefill compression kept; `profile`: the --profile's fractions (ceil(N (1 - f_l)) after N tokens); `cap:N`: the
//   prefill fractions, frozen once N tokens were seen (a fixed cache size) — by the policy `fixed[:D]` (the paper's:
//   evict row n0 + D, D = -25), `score` (default; running accumulated attention, lowest evicted), `score-ordered`
//   (the same, token order kept), `amortised:M` (overshoot by M tokens, then one compression of every layer) or
//   `rebalance:M` (amortised, re-solving the layer split). The score-based policies never evict the first --sinks
//   and the last --decode-recent rows (default: --recent). Without the flags the caches grow by one row per token.
// * Generation (default): prints the continuation's text (up to N tokens, stopping at BOS/EOS) on stdout.
// * --score-continuation TEXT: TEXT is encoded with the merges only (no BOS, no dummy space); the prompt's last
//   logits predict its first token, then the cache is compressed and TEXT is fed token by token (teacher
//   forcing). Prints one JSON object: {"ppl": exp(nll_mean), "nll_mean", "tokens", "keep": [tokens kept per layer,
//   protected ones included; the mean over kv heads with head granularity], "keep_heads" (head granularity only):
//   [[tokens kept per kv head] per layer]}; with decode upkeep also "keep_end" / "keep_heads_end": the same after
//   the continuation.
// * --serve REQUESTS.jsonl: serve many requests over one paged KV pool of N pages (serve.hpp) on the host
//   (--device cpu) or the GPU (--device cuda):
//   one JSON line per request on stdout, in file order — {"request", "text", "prompt_tokens", "generated", "keep",
//   "admitted", "finished"}, or {"request", "error"} for a refused one — then one {"summary": {...}} line (peak
//   concurrent requests, tokens per second, pages in use over time). Every text equals the one this command prints
//   for that request alone.
// Errors (bad arguments, unreadable or malformed files, a prompt longer than the context) print one line on stderr
// and exit with status 2.
#include "runtime.hpp"
#include "serve_host.hpp"
#include "tokenizer.hpp"

#include <prefixkv/io/json.hpp>
#include <prefixkv/profile/profile.hpp>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#ifndef PREFIXKV_LLAMA_MODEL_DIR
#define PREFIXKV_LLAMA_MODEL_DIR "models/stories260K"
#endif

namespace {

using namespace prefixkv_llama;

[[noreturn]] void die(const std::string& why) {
  std::fprintf(stderr, "prefixkv-llama: %s\n", why.c_str());
  std::exit(2);
}

const char* usage =
    "usage: prefixkv-llama [--model M.bin] [--tokenizer T.bin] --prompt TEXT [--steps N] [--temperature T --seed S]\n"
    "         [--method full|streaming|uniform|pyramid|adakv|prefixkv|prefixkv-head|profile] [--evict-ratio R]\n"
    "         [--profile P.json] [--scorer attention|window|keynorm] [--window W] [--sinks 4] [--recent 1]\n"
    "         [--device cpu|cuda] [--score-continuation TEXT] [--verbose]\n"
    "         [--decode-budget prefill|profile|cap:N]\n"
    "         [--decode-policy fixed[:D]|score|score-ordered|amortised:M|rebalance:M] [--decode-recent R]\n"
    "       prefixkv-llama --serve REQUESTS.jsonl --pool-pages N [--max-active 256] [--max-prefill 8]\n"
    "         [--max-prefill-tokens 4096] [--page-size 16] [policy options as defaults]\n";

struct options {
  std::string model = PREFIXKV_LLAMA_MODEL_DIR "/stories260K.bin";
  std::string tokenizer = PREFIXKV_LLAMA_MODEL_DIR "/tok512.bin";
  std::string prompt, profile, device = "cpu", continuation;
  bool has_continuation = false, verbose = false, has_prompt = false;
  std::string serve;
  serve_options so;
  long long steps = 256;
  double temperature = 0.0;
  unsigned long long seed = 0;
  policy pol;
  decode_options dec;
  bool has_decode_policy = false;
  long long decode_recent = -1;
};

double parse_double(const std::string& flag, const std::string& s) {
  errno = 0;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || end != s.c_str() + s.size() || errno != 0 || !std::isfinite(v))
    die(flag + ": '" + s + "' is not a finite number");
  return v;
}
long long parse_int(const std::string& flag, const std::string& s) {
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || end != s.c_str() + s.size() || errno != 0) die(flag + ": '" + s + "' is not an integer");
  return v;
}

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) die("missing value after " + a);
      return argv[++i];
    };
    if (a == "--help" || a == "-h") {
      std::fputs(usage, stdout);
      std::exit(0);
    } else if (a == "--model") o.model = value();
    else if (a == "--tokenizer") o.tokenizer = value();
    else if (a == "--prompt") o.prompt = value(), o.has_prompt = true;
    else if (a == "--serve") o.serve = value();
    else if (a == "--pool-pages" || a == "--max-active" || a == "--max-prefill" || a == "--max-prefill-tokens" ||
             a == "--page-size") {
      const long long v = parse_int(a, value());
      if (v < 1 || v > (1 << 30)) die(a + " must be in [1, 2^30]");
      int& dst = a == "--pool-pages" ? o.so.pool_pages
                 : a == "--max-active" ? o.so.max_active
                 : a == "--max-prefill" ? o.so.max_prefill
                 : a == "--max-prefill-tokens" ? o.so.max_prefill_tokens
                                               : o.so.page_size;
      dst = int(v);
    }
    else if (a == "--steps") o.steps = parse_int(a, value());
    else if (a == "--temperature") o.temperature = parse_double(a, value());
    else if (a == "--seed") {
      const long long s = parse_int(a, value());
      if (s < 0) die("--seed must be >= 0");
      o.seed = static_cast<unsigned long long>(s);
    } else if (a == "--method") {
      const std::string m = value();
      if (!parse_method(m, o.pol.method)) die("unknown --method '" + m + "'");
    } else if (a == "--evict-ratio") {
      o.pol.evict_ratio = parse_double(a, value());
    } else if (a == "--profile") o.profile = value();
    else if (a == "--scorer") {
      const std::string s = value();
      if (!parse_scorer(s, o.pol.scorer)) die("unknown --scorer '" + s + "'");
    } else if (a == "--window") {
      const long long w = parse_int(a, value());
      if (w < 1 || w > (1 << 20)) die("--window must be >= 1");
      o.pol.window = int(w);
    } else if (a == "--sinks") o.pol.sinks = parse_int(a, value());
    else if (a == "--recent") o.pol.recent = parse_int(a, value());
    else if (a == "--device") o.device = value();
    else if (a == "--score-continuation") {
      o.continuation = value();
      o.has_continuation = true;
    } else if (a == "--decode-budget") {
      std::string err;
      if (!parse_decode_budget(value(), o.dec, err)) die(err);
    } else if (a == "--decode-policy") {
      std::string err;
      if (!parse_decode_policy(value(), o.dec, err)) die(err);
      o.has_decode_policy = true;
    } else if (a == "--decode-recent") {
      o.decode_recent = parse_int(a, value());
      if (o.decode_recent < 0 || o.decode_recent > (1 << 20)) die("--decode-recent must be in [0, 2^20]");
    } else if (a == "--verbose") o.verbose = true;
    else die("unknown option '" + a + "' (see --help)");
  }
  if (o.steps < 0) die("--steps must be >= 0");
  if (o.temperature < 0) die("--temperature must be >= 0");
  if (!(o.pol.evict_ratio >= 0.0 && o.pol.evict_ratio < 1.0)) die("--evict-ratio must be in [0, 1)");
  if (o.pol.sinks < 0 || o.pol.recent < 0) die("--sinks and --recent must be >= 0");
  if (o.pol.sinks > (1 << 20) || o.pol.recent > (1 << 20)) die("--sinks and --recent are too large");
  if (o.pol.method == method_kind::profile && o.profile.empty()) die("--method profile needs --profile P.json");
  if (o.has_decode_policy && !o.dec.enabled()) o.dec.budget = decode_budget_kind::prefill;
  if (o.decode_recent >= 0 && !o.dec.enabled()) die("--decode-recent needs --decode-policy or --decode-budget");
  const bool decode_profile = o.dec.budget == decode_budget_kind::profile;
  if (decode_profile && o.profile.empty()) die("--decode-budget profile needs --profile P.json");
  if (o.pol.method != method_kind::profile && !decode_profile && !o.profile.empty())
    die("--profile needs --method profile or --decode-budget profile");
  o.dec.protect = prefixkv::protect_policy{o.pol.sinks, o.decode_recent >= 0 ? o.decode_recent : o.pol.recent};
  o.dec.gran = compresses(o.pol) && per_head(o.pol.method) ? prefixkv::granularity::head : prefixkv::granularity::layer;
  if (!o.serve.empty()) {
    if (o.has_prompt || o.has_continuation) die("--serve takes its prompts from the requests file");
    if (o.so.pool_pages < 1) die("--serve needs --pool-pages N");
    if (o.temperature != 0.0) die("--serve decodes greedily (no --temperature)");
    if (o.pol.method == method_kind::profile) die("--serve: method profile is not served");
    if (o.dec.enabled()) die("--serve runs no decode upkeep (--decode-budget / --decode-policy)");
  } else if (o.so.pool_pages > 0) {
    die("--pool-pages needs --serve");
  }
  return o;
}

std::string keep_json(const std::vector<int32_t>& len, int layers, int heads, bool with_heads,
                      const std::string& suffix = "") {
  std::string s = "\"keep" + suffix + "\": [";
  for (int l = 0; l < layers; ++l) {
    int64_t sum = 0;
    for (int h = 0; h < heads; ++h) sum += len[size_t(l) * heads + h];
    if (l) s += ", ";
    if (sum % heads == 0)
      prefixkv::json_append_int(s, sum / heads);
    else
      prefixkv::json_append_number(s, double(sum) / heads);
  }
  s += "]";
  if (with_heads) {
    s += ", \"keep_heads" + suffix + "\": [";
    for (int l = 0; l < layers; ++l) {
      if (l) s += ", ";
      prefixkv::json_append_int_array(s, len.data() + size_t(l) * heads, heads);
    }
    s += "]";
  }
  return s;
}

//! --serve: read and run the requests, print one line per request and the summary.
int serve_main(const options& o, const model& m, const tokenizer& tk) {
  std::FILE* f = std::fopen(o.serve.c_str(), "rb");
  if (!f) die("cannot open the requests file " + o.serve);
  std::string text;
  char buf[65536];
  size_t got = 0;
  while ((got = std::fread(buf, 1, sizeof(buf), f)) > 0) text.append(buf, got);
  std::fclose(f);
  std::vector<serve_request> reqs;
  std::string err;
  if (!parse_requests(text, o.pol, int(std::min<long long>(o.steps, 1 << 20)), reqs, err)) die(err);
  std::vector<std::vector<int>> prompts;
  for (const serve_request& r : reqs) prompts.push_back(tk.encode(r.prompt, true, true));
  std::vector<serve_result> res;
  serve_summary sum;
  if (o.device == "cuda") {
#if defined(PREFIXKV_LLAMA_CUDA)
    if (!serve_cuda(m, reqs, prompts, o.so, res, sum, err)) die(err);
#else
    die("--device cuda: this build has no CUDA backend for prefixkv-llama (use --device cpu)");
#endif
  } else if (o.device == "cpu") {
    if (!serve_host(m, reqs, prompts, o.so, res, sum, err)) die(err);
  } else {
    die("unknown device '" + o.device + "' (cpu or cuda)");
  }
  const config& c = m.cfg;
  std::string out;
  for (size_t i = 0; i < reqs.size(); ++i) {
    out += "{\"request\": ";
    prefixkv::json_append_int(out, int64_t(i));
    if (!res[i].error.empty()) {
      out += ", \"error\": " + json_quote(res[i].error) + "}\n";
      continue;
    }
    out += ", \"text\": " + json_quote(tk.decode(prompts[i].back(), res[i].tokens));
    out += ", \"prompt_tokens\": ";
    prefixkv::json_append_int(out, int64_t(prompts[i].size()));
    out += ", \"generated\": ";
    prefixkv::json_append_int(out, int64_t(res[i].tokens.size()));
    out += ", " + keep_json(res[i].kept, c.n_layers, c.n_kv_heads, false);
    out += ", \"admitted\": ";
    prefixkv::json_append_int(out, res[i].admitted);
    out += ", \"finished\": ";
    prefixkv::json_append_int(out, res[i].finished);
    out += "}\n";
  }
  out += summary_json(sum) + "\n";
  std::fputs(out.c_str(), stdout);
  if (o.verbose)
    std::fprintf(stderr, "prefixkv-llama --serve: %d requests (%d refused), peak %d concurrent, %lld tokens in %.3f s "
                 "(%.1f tokens/s), peak %d of %d pages\n", sum.requests, sum.refused, sum.peak_active,
                 static_cast<long long>(sum.generated_tokens), sum.seconds, sum.tokens_per_s(), sum.peak_pages,
                 sum.pool_pages);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  options o = parse(argc, argv);
  model m;
  tokenizer tk;
  std::string err;
  if (!load_checkpoint(o.model, m, err)) die(err);
  if (!tk.load(o.tokenizer, m.cfg.vocab_size, err)) die(err);
  if (!o.serve.empty()) return serve_main(o, m, tk);
  if (!o.profile.empty()) {
    if (prefixkv::profile_load(o.profile.c_str(), o.pol.profile) != cudaSuccess)
      die("cannot use the profile " + o.profile + ": " + prefixkv::last_error().message);
    o.dec.profile = o.pol.profile;
  }
  auto be = make_backend(o.device, m, err);
  if (!be) die(err);
  const config& c = m.cfg;
  const std::vector<int> prompt = tk.encode(o.prompt, true, true);
  if (int64_t(prompt.size()) > c.seq_len)
    die("the prompt has " + std::to_string(prompt.size()) + " tokens, the context " + std::to_string(c.seq_len));
  const int T = int(prompt.size());
  std::vector<float> logits;
  prefixkv::clear_last_error();
  if (!prefill_and_compress(*be, prompt, o.pol, logits, err)) {
    if (prefixkv::last_error().why == prefixkv::reason::infeasible_budget)
      err += " (a prompt of " + std::to_string(T) + " tokens with " + std::to_string(o.pol.sinks) + " sinks and " +
             std::to_string(o.pol.recent) + " recent tokens protected per segment; lower --evict-ratio)";
    die(err);
  }
  const std::vector<int32_t> len = be->lengths();
  if (o.dec.enabled() && !be->begin_decode(o.dec, err)) die(err);
  if (o.verbose) {
    std::fprintf(stderr, "prefixkv-llama: %d prompt tokens, method %s, scorer %s, evict ratio %g; kept per layer:", T,
                 to_string(o.pol.method), to_string(o.pol.scorer), o.pol.evict_ratio);
    for (int l = 0; l < c.n_layers; ++l) {
      std::fprintf(stderr, " [");
      for (int h = 0; h < c.n_kv_heads; ++h) std::fprintf(stderr, h ? " %d" : "%d", len[size_t(l) * c.n_kv_heads + h]);
      std::fprintf(stderr, "]");
    }
    std::fprintf(stderr, "\n");
    if (o.dec.enabled())
      std::fprintf(stderr, "prefixkv-llama: decode upkeep: budget %s, policy %s, protected %lld sinks + %lld recent\n",
                   decode_budget_name(o.dec).c_str(), decode_policy_name(o.dec).c_str(),
                   static_cast<long long>(o.dec.protect.sinks), static_cast<long long>(o.dec.protect.recent));
  }
  if (o.has_continuation) {
    const std::vector<int> text = tk.encode(o.continuation, false, false);
    if (text.empty()) die("--score-continuation: the text is empty");
    if (int64_t(T) + int64_t(text.size()) - 1 > c.seq_len)
      die("prompt (" + std::to_string(T) + ") and continuation (" + std::to_string(text.size()) +
          " tokens) exceed the context of " + std::to_string(c.seq_len));
    double nll_sum = 0;
    if (!teacher_force(*be, logits, text, T, nll_sum, nullptr, err)) die(err);
    const double mean = nll_sum / double(text.size());
    std::string s = "{\"ppl\": ";
    prefixkv::json_append_number(s, std::exp(mean));
    s += ", \"nll_mean\": ";
    prefixkv::json_append_number(s, mean);
    s += ", \"tokens\": ";
    prefixkv::json_append_int(s, int64_t(text.size()));
    s += ", " + keep_json(len, c.n_layers, c.n_kv_heads, per_head(o.pol.method));
    if (o.dec.enabled())  // the same after the continuation
      s += ", " + keep_json(be->lengths(), c.n_layers, c.n_kv_heads, per_head(o.pol.method), "_end");
    s += "}\n";
    std::fputs(s.c_str(), stdout);
    return 0;
  }
  rng r(o.seed);
  std::vector<int> out;
  if (!generate(*be, logits, int(std::min<long long>(o.steps, c.seq_len)), T, o.temperature, r, true, out, err)) die(err);
  if (o.verbose && o.dec.enabled()) {
    const std::vector<int32_t> end = be->lengths();
    std::fprintf(stderr, "prefixkv-llama: after %zu new tokens, cached per layer:", out.size());
    for (int l = 0; l < c.n_layers; ++l) {
      std::fprintf(stderr, " [");
      for (int h = 0; h < c.n_kv_heads; ++h) std::fprintf(stderr, h ? " %d" : "%d", end[size_t(l) * c.n_kv_heads + h]);
      std::fprintf(stderr, "]");
    }
    std::fprintf(stderr, "\n");
  }
  std::string text = tk.decode(prompt.back(), out);
  text += "\n";
  std::fputs(text.c_str(), stdout);
  return 0;
}
