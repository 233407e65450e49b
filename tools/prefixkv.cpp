// prefixkv — command-line front end of the exact global prefix solver, offline profiles and the serving rule.
//
//   prefixkv solve --scores S.npy (--evict-ratio r | --keep-tokens T) [--sinks 4] [--recent 1]
//                  [--min-keep k] [--max-keep k] [--indices]
//   prefixkv profile --evict-ratio r [--sinks 4] [--recent 1] SAMPLE.npy...
//   prefixkv apply --profile P.json --tokens n [--sinks 4] [--recent 1]
//
// Output: JSON on stdout. Bad input: one line on stderr, exit code 2, nothing on stdout. A failed write to stdout
// (a full disk, a closed pipe) is reported the same way (one line on stderr, exit code 2).
// Limits (work and memory stay proportional to the input): input files are read up to 1 GiB (kMaxInputBytes), and a
// score matrix with rows must have at least one column (every row, hence every output entry, is backed by data in
// the file); an evict ratio below the smallest normal double (e.g. 1e-400) underflows and is taken as 0.
// Built with the host solver only (any C++17 compiler).
#include <prefixkv/io/json.hpp>
#include <prefixkv/io/npy.hpp>
#include <prefixkv/profile/profile.hpp>
#include <prefixkv/select/select.hpp>
#include <prefixkv/solve/solve.hpp>

#include <cerrno>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace pk = prefixkv;

namespace {

//! Largest input file (score matrices, profiles) the tool reads.
constexpr size_t kMaxInputBytes = size_t(1) << 30;

struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const char* const usage_text =
    "usage: prefixkv solve --scores S.npy (--evict-ratio r | --keep-tokens T) [--sinks 4] [--recent 1] "
    "[--min-keep k] [--max-keep k] [--indices]\n"
    "       prefixkv profile --evict-ratio r [--sinks 4] [--recent 1] SAMPLE.npy...\n"
    "       prefixkv apply --profile P.json --tokens n [--sinks 4] [--recent 1]\n";

[[noreturn]] void fail_with(const std::string& what) { throw usage_error(what); }

void check(cudaError_t e, const std::string& context) {
  if (e != cudaSuccess) fail_with(context + ": " + pk::last_error().message + " (" + pk::to_string(pk::last_error().why) + ")");
}

void need(bool ok) {
  if (!ok) fail_with("out of memory while writing the output");
}

double parse_double(const std::string& opt, const char* s) {
  errno = 0;
  char* end = nullptr;
  double v = std::strtod(s, &end);
  const bool range = errno == ERANGE;
  if (*s == '\0' || end == nullptr || *end != '\0' || !std::isfinite(v) || (range && std::fabs(v) > DBL_MIN))
    fail_with(opt + ": not a finite number: '" + s + "'");
  if (range) v = 0.0;  // underflow (e.g. 1e-400): finite, taken as 0
  return v;
}

int64_t parse_int(const std::string& opt, const char* s) {
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  if (*s == '\0' || end == nullptr || *end != '\0' || errno == ERANGE) fail_with(opt + ": not an integer: '" + s + "'");
  return static_cast<int64_t>(v);
}

struct options {
  std::string scores, profile;
  bool has_ratio = false, has_keep = false, has_tokens = false, indices = false;
  double ratio = 0;
  int64_t keep_tokens = 0, tokens = 0;
  int64_t sinks = 4, recent = 1, min_keep = 0, max_keep = INT64_MAX;
  std::vector<std::string> positional;
};

options parse(const std::string& cmd, int argc, char** argv) {
  options o;
  auto value = [&](int& i) -> const char* {
    if (i + 1 >= argc) fail_with(std::string(argv[i]) + ": missing value");
    return argv[++i];
  };
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--scores" && cmd == "solve") o.scores = value(i);
    else if (a == "--profile" && cmd == "apply") o.profile = value(i);
    else if (a == "--evict-ratio" && cmd != "apply") { o.ratio = parse_double(a, value(i)); o.has_ratio = true; }
    else if (a == "--keep-tokens" && cmd == "solve") { o.keep_tokens = parse_int(a, value(i)); o.has_keep = true; }
    else if (a == "--tokens" && cmd == "apply") { o.tokens = parse_int(a, value(i)); o.has_tokens = true; }
    else if (a == "--sinks") o.sinks = parse_int(a, value(i));
    else if (a == "--recent") o.recent = parse_int(a, value(i));
    else if (a == "--min-keep" && cmd == "solve") o.min_keep = parse_int(a, value(i));
    else if (a == "--max-keep" && cmd == "solve") o.max_keep = parse_int(a, value(i));
    else if (a == "--indices" && cmd == "solve") o.indices = true;
    else if (a.size() > 1 && a[0] == '-') fail_with("unknown option '" + a + "' for '" + cmd + "'");
    else if (cmd == "profile") o.positional.push_back(a);
    else fail_with("unexpected argument '" + a + "'");
  }
  if (o.sinks < 0 || o.recent < 0) fail_with("--sinks and --recent must be >= 0");
  if (o.has_ratio && !(o.ratio >= 0.0 && o.ratio < 1.0)) fail_with("--evict-ratio must be in [0, 1)");
  if (o.min_keep < 0 || o.max_keep < o.min_keep) fail_with("--min-keep/--max-keep: need 0 <= min-keep <= max-keep");
  return o;
}

// A [rows, tokens] score matrix as float rows, checked.
struct matrix {
  int64_t rows = 0, cols = 0;
  std::vector<float> x;
};

matrix load_matrix(const std::string& path) {
  pk::npy_array a;
  check(pk::npy_load(path.c_str(), a, kMaxInputBytes), path);
  if (a.rank() != 2) fail_with(path + ": expected a 2-D array [segments, tokens], got rank " + std::to_string(a.rank()));
  if (a.shape[1] > INT32_MAX) fail_with(path + ": too many tokens per row");
  if (a.shape[0] > 0 && a.shape[1] == 0) fail_with(path + ": rows without tokens (shape [n, 0]); every row needs a score");
  matrix m;
  m.rows = a.shape[0];
  m.cols = a.shape[1];
  m.x.resize(a.data.size());
  for (size_t i = 0; i < a.data.size(); ++i) {
    const double v = a.data[i];
    if (!std::isfinite(v)) fail_with(path + ": a score is NaN or infinite");
    if (v < 0) fail_with(path + ": a score is negative");
    const float f = static_cast<float>(v);
    if (!std::isfinite(f)) fail_with(path + ": a score does not fit float32");
    m.x[i] = f;
  }
  return m;
}

struct solution {
  pk::curve_buffers curves;
  std::vector<int64_t> keep;
  float threshold = 0;
};

solution solve_matrix(const matrix& m, const pk::solve_budget& budget, const pk::keep_bounds& bounds,
                      pk::protect_policy prot, const std::string& context) {
  solution s;
  check(pk::build_curves_host(m.x.data(), pk::make_uniform_segments(m.rows, m.cols), prot, s.curves), context);
  check(pk::solve_host(s.curves.view(), budget, bounds, s.keep, &s.threshold), context);
  return s;
}

std::string run_solve(const options& o) {
  if (o.scores.empty()) fail_with("solve: --scores is required");
  if (o.has_ratio == o.has_keep) fail_with("solve: give exactly one of --evict-ratio and --keep-tokens");
  const matrix m = load_matrix(o.scores);
  const pk::protect_policy prot{o.sinks, o.recent};
  pk::keep_bounds bounds;
  bounds.min_keep = o.min_keep;
  bounds.max_keep = o.max_keep;
  const pk::solve_budget budget = o.has_ratio ? pk::budget_evict_ratio(o.ratio) : pk::budget_keep_tokens(o.keep_tokens);
  const solution s = solve_matrix(m, budget, bounds, prot, o.scores);
  int64_t kept = 0;
  for (int64_t k : s.keep) kept += k;
  std::string out = "{\"keep\": ";
  need(pk::json_append_int_array(out, s.keep.data(), static_cast<int64_t>(s.keep.size())));
  out += ", \"kept_total\": ";
  need(pk::json_append_int(out, kept));
  out += ", \"evicted_total\": ";
  need(pk::json_append_int(out, m.rows * m.cols - kept));
  out += ", \"threshold\": ";
  need(pk::json_append_float(out, s.threshold));
  if (o.indices) {
    pk::selection_buffers sel;
    check(pk::write_selection_host(s.curves.view(), s.keep.data(), sel), "solve");
    out += ", \"indices\": [";
    for (int64_t r = 0; r < m.rows; ++r) {
      if (r) out += ", ";
      need(pk::json_append_int_array(out, sel.indices.data() + sel.offsets[r], sel.offsets[r + 1] - sel.offsets[r]));
    }
    out += "]";
  }
  out += "}\n";
  return out;
}

std::string run_profile(const options& o) {
  if (!o.has_ratio) fail_with("profile: --evict-ratio is required");
  if (o.positional.empty()) fail_with("profile: give at least one SAMPLE.npy");
  const pk::protect_policy prot{o.sinks, o.recent};
  pk::profile_accumulator acc;
  for (const std::string& path : o.positional) {
    const matrix m = load_matrix(path);
    const solution s = solve_matrix(m, pk::budget_evict_ratio(o.ratio), pk::keep_bounds{}, prot, path);
    check(acc.add(s.keep.data(), s.curves.tokens.data(), m.rows), path);
  }
  std::vector<double> f;
  check(acc.fractions(f), "profile");
  std::string out;
  check(pk::profile_to_json(f, out), "profile");
  return out + "\n";
}

std::string run_apply(const options& o) {
  if (o.profile.empty()) fail_with("apply: --profile is required");
  if (!o.has_tokens) fail_with("apply: --tokens is required");
  if (o.tokens < 0) fail_with("apply: --tokens must be >= 0");
  std::vector<double> f;
  check(pk::profile_load(o.profile.c_str(), f, kMaxInputBytes), o.profile);
  std::vector<int64_t> keep(f.size());
  check(pk::apply_profile(f.data(), static_cast<int64_t>(f.size()), o.tokens, pk::protect_policy{o.sinks, o.recent},
                          keep.data()),
        "apply");
  std::string out = "{\"keep\": ";
  need(pk::json_append_int_array(out, keep.data(), static_cast<int64_t>(keep.size())));
  return out + "}\n";
}

// Write everything to stdout; on failure one line on stderr and exit code 2.
int write_stdout(const std::string& out) {
  errno = 0;
  const bool ok = std::fwrite(out.data(), 1, out.size(), stdout) == out.size();
  const bool flushed = std::fflush(stdout) == 0;
  if (ok && flushed && !std::ferror(stdout)) return 0;
  const int err = errno;
  std::fprintf(stderr, "prefixkv: cannot write the output to stdout: %s\n", err ? std::strerror(err) : "write error");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string out;
  try {
    if (argc < 2) fail_with("missing command (solve, profile or apply)");
    const std::string cmd = argv[1];
    if (cmd == "--help" || cmd == "-h") return write_stdout(usage_text);
    if (cmd != "solve" && cmd != "profile" && cmd != "apply") fail_with("unknown command '" + cmd + "'");
    const options o = parse(cmd, argc, argv);
    out = cmd == "solve" ? run_solve(o) : cmd == "profile" ? run_profile(o) : run_apply(o);
  } catch (const std::exception& e) {
    std::string msg = e.what();
    for (char& c : msg)
      if (c == '\n' || c == '\r') c = ' ';
    std::fprintf(stderr, "prefixkv: %s\n", msg.c_str());
    return 2;
  } catch (...) {
    std::fputs("prefixkv: internal error\n", stderr);
    return 2;
  }
  return write_stdout(out);
}
