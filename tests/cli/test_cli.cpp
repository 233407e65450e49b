// The `prefixkv` CLI, run as a child process: JSON on stdout for good input; for bad input exit code 2, one
// line on stderr and nothing on stdout.
#include <doctest/doctest.h>

#include <prefixkv/io/json.hpp>
#include <prefixkv/io/npy.hpp>
#include <prefixkv/profile/profile.hpp>
#include <prefixkv/select/select.hpp>
#include <prefixkv/solve/solve.hpp>

#include "support/test_random.hpp"

#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace pk = prefixkv;
using namespace prefixkv_test;

#ifndef PKV_CLI
#error "PKV_CLI must name the prefixkv executable"
#endif

namespace {

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

result run(const std::string& args) {
  const std::string cmd = std::string("\"") + PKV_CLI + "\" " + args + " > cli_out.txt 2> cli_err.txt";
  const int st = std::system(cmd.c_str());
  result r;
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  r.out = slurp("cli_out.txt");
  r.err = slurp("cli_err.txt");
  return r;
}

void expect_bad(const std::string& args) {
  INFO("args: ", args);
  const result r = run(args);
  CHECK(r.code == 2);
  CHECK(r.out.empty());
  REQUIRE(!r.err.empty());
  CHECK(r.err.find('\n') == r.err.size() - 1);  // exactly one line
  CHECK(r.err.rfind("prefixkv: ", 0) == 0);
}

// The integer array following "key": in a JSON object text.
std::vector<double> array_field(const std::string& json, const std::string& key) {
  const size_t k = json.find("\"" + key + "\": ");
  REQUIRE(k != std::string::npos);
  const size_t a = json.find('[', k), b = json.find(']', a);
  std::vector<double> v;
  REQUIRE(pk::json_parse_number_array(json.data() + a, b - a + 1, v) == cudaSuccess);
  return v;
}
double number_field(const std::string& json, const std::string& key) {
  const size_t k = json.find("\"" + key + "\": ");
  REQUIRE(k != std::string::npos);
  return std::strtod(json.c_str() + k + key.size() + 4, nullptr);
}

void write_matrix(const std::string& path, const std::vector<float>& x, int64_t rows, int64_t cols) {
  const int64_t shape[2] = {rows, cols};
  REQUIRE(pk::npy_save(path.c_str(), x.data(), shape, 2) == cudaSuccess);
}

}  // namespace

TEST_CASE("cli solve: evict ratio and keep tokens agree with the host solver; indices are the selection") {
  auto rng = make_rng(801);
  const int64_t R = 5, T = 64;
  std::vector<float> x = random_vector<float>(rng, R * T, 0.0, 1.0);
  write_matrix("cli_scores.npy", x, R, T);
  pk::curve_buffers c;
  REQUIRE(pk::build_curves_host(x.data(), pk::make_uniform_segments(R, T), pk::protect_policy{}, c) == cudaSuccess);
  for (double ratio : {0.0, 0.25, 0.5, 0.75}) {
    char arg[64];
    std::snprintf(arg, sizeof(arg), "%.17g", ratio);
    const result r = run(std::string("solve --scores cli_scores.npy --evict-ratio ") + arg + " --indices");
    INFO(r.err);
    REQUIRE(r.code == 0);
    CHECK(r.err.empty());
    std::vector<int64_t> keep;
    float thr = 0;
    REQUIRE(pk::solve_host(c.view(), pk::budget_evict_ratio(ratio), {}, keep, &thr) == cudaSuccess);
    const auto k = array_field(r.out, "keep");
    REQUIRE(k.size() == keep.size());
    int64_t total = 0;
    for (size_t i = 0; i < k.size(); ++i) {
      CHECK(int64_t(k[i]) == keep[i]);
      total += keep[i];
    }
    CHECK(int64_t(number_field(r.out, "kept_total")) == total);
    CHECK(int64_t(number_field(r.out, "evicted_total")) == R * T - total);
    CHECK(float(number_field(r.out, "threshold")) == thr);
    // indices: one ascending list per segment, equal to the host selection
    pk::selection_buffers sel;
    REQUIRE(pk::write_selection_host(c.view(), keep.data(), sel) == cudaSuccess);
    const size_t at = r.out.find("\"indices\": [");
    REQUIRE(at != std::string::npos);
    size_t p = at + 12;
    for (int64_t s = 0; s < R; ++s) {
      const size_t a = r.out.find('[', p), b = r.out.find(']', a);
      std::vector<double> row;
      REQUIRE(pk::json_parse_number_array(r.out.data() + a, b - a + 1, row) == cudaSuccess);
      REQUIRE(int64_t(row.size()) == sel.offsets[s + 1] - sel.offsets[s]);
      for (size_t i = 0; i < row.size(); ++i) CHECK(int64_t(row[i]) == sel.indices[sel.offsets[s] + i]);
      p = b + 1;
    }
  }
  const result r = run("solve --scores cli_scores.npy --keep-tokens 100 --sinks 2 --recent 3 --min-keep 4 --max-keep 30");
  REQUIRE(r.code == 0);
  pk::curve_buffers c2;
  REQUIRE(pk::build_curves_host(x.data(), pk::make_uniform_segments(R, T), pk::protect_policy{2, 3}, c2) == cudaSuccess);
  pk::keep_bounds bd;
  bd.min_keep = 4;
  bd.max_keep = 30;
  std::vector<int64_t> keep;
  REQUIRE(pk::solve_host(c2.view(), pk::budget_keep_tokens(100), bd, keep) == cudaSuccess);
  const auto k = array_field(r.out, "keep");
  for (size_t i = 0; i < k.size(); ++i) CHECK(int64_t(k[i]) == keep[i]);
  CHECK(number_field(r.out, "kept_total") == 100);
}

TEST_CASE("cli profile and apply") {
  auto rng = make_rng(802);
  const int64_t L = 4;
  std::vector<std::vector<int64_t>> keeps;
  std::string files;
  for (int smp = 0; smp < 3; ++smp) {
    const int64_t n = 30 + int64_t(rng() % 50);
    std::vector<float> x = random_vector<float>(rng, L * n, 0.0, 1.0);
    const std::string f = "cli_sample" + std::to_string(smp) + ".npy";
    write_matrix(f, x, L, n);
    files += " " + f;
  }
  const result r = run("profile --evict-ratio 0.4" + files);
  INFO(r.err);
  REQUIRE(r.code == 0);
  std::vector<double> f;
  REQUIRE(pk::profile_from_json(r.out.data(), r.out.size(), f) == cudaSuccess);
  CHECK(f.size() == size_t(L));
  double mean = 0;
  for (double v : f) mean += v / L;
  CHECK(mean == doctest::Approx(0.4).epsilon(0.05));
  // apply the profile we just produced, and a published one
  {
    std::ofstream o("cli_profile.json");
    o << r.out;
  }
  const result a = run("apply --profile cli_profile.json --tokens 1000");
  REQUIRE(a.code == 0);
  std::vector<int64_t> want(L);
  REQUIRE(pk::apply_profile(f.data(), L, 1000, pk::protect_policy{}, want.data()) == cudaSuccess);
  const auto k = array_field(a.out, "keep");
  REQUIRE(k.size() == size_t(L));
  for (int64_t l = 0; l < L; ++l) CHECK(int64_t(k[l]) == want[l]);
  const result p = run(std::string("apply --profile \"") + PKV_PROFILE_DATA + "/prefixkv_llava-v1.5-7b_0.5.json\" --tokens 1000");
  REQUIRE(p.code == 0);
  const auto kp = array_field(p.out, "keep");
  REQUIRE(kp.size() == 32);
  CHECK(kp[0] == 886);
  CHECK(kp[21] == 235);
}

TEST_CASE("cli bad input: exit 2, one line on stderr, nothing on stdout") {
  auto rng = make_rng(803);
  std::vector<float> x = random_vector<float>(rng, 2 * 20, 0.0, 1.0);
  write_matrix("cli_ok.npy", x, 2, 20);
  x[7] = NAN;
  write_matrix("cli_nan.npy", x, 2, 20);
  x[7] = -1;
  write_matrix("cli_neg.npy", x, 2, 20);
  const int64_t shape3[3] = {2, 2, 10};
  REQUIRE(pk::npy_save("cli_rank3.npy", x.data(), shape3, 3) == cudaSuccess);
  {
    std::ofstream o("cli_garbage.npy", std::ios::binary);
    o << "\x93NUMPY\x01\x00garbage";
  }
  {
    // int32 payload with a valid header
    std::string d = "{'descr': '<i4', 'fortran_order': False, 'shape': (1, 2), }";
    while ((10 + d.size() + 1) % 64) d += ' ';
    d += '\n';
    std::ofstream o("cli_int.npy", std::ios::binary);
    o << "\x93NUMPY" << char(1) << char(0) << char(d.size() & 0xFF) << char(d.size() >> 8) << d << std::string(8, '\0');
  }
  {
    std::ofstream o("cli_bad_profile.json");
    o << "[0.1, 1.7]";
  }
  expect_bad("");
  expect_bad("frobnicate");
  expect_bad("solve");
  expect_bad("solve --scores missing.npy --evict-ratio 0.1");
  expect_bad("solve --scores cli_garbage.npy --evict-ratio 0.1");
  expect_bad("solve --scores cli_int.npy --evict-ratio 0.1");
  expect_bad("solve --scores cli_rank3.npy --evict-ratio 0.1");
  expect_bad("solve --scores cli_nan.npy --evict-ratio 0.1");
  expect_bad("solve --scores cli_neg.npy --evict-ratio 0.1");
  expect_bad("solve --scores cli_ok.npy --evict-ratio 1");
  expect_bad("solve --scores cli_ok.npy --evict-ratio -0.2");
  expect_bad("solve --scores cli_ok.npy --evict-ratio nan");
  expect_bad("solve --scores cli_ok.npy --evict-ratio 0.5x");
  expect_bad("solve --scores cli_ok.npy --evict-ratio 0.9");         // more than the candidates
  expect_bad("solve --scores cli_ok.npy --keep-tokens 3");           // fewer than the protected tokens
  expect_bad("solve --scores cli_ok.npy --keep-tokens 41");          // more than all tokens
  expect_bad("solve --scores cli_ok.npy --evict-ratio 0.1 --keep-tokens 10");
  expect_bad("solve --scores cli_ok.npy --evict-ratio 0.1 --min-keep 5 --max-keep 2");
  expect_bad("solve --scores cli_ok.npy --keep-tokens 40 --max-keep 3");  // bounds vs budget
  expect_bad("solve --scores cli_ok.npy --evict-ratio 0.1 --sinks -1");
  expect_bad("solve --scores cli_ok.npy --evict-ratio 0.1 --bogus");
  expect_bad("solve --scores cli_ok.npy --evict-ratio");
  expect_bad("profile --evict-ratio 0.1");
  expect_bad("profile cli_ok.npy");
  expect_bad("profile --evict-ratio 0.1 cli_ok.npy cli_rank3.npy");
  expect_bad("apply --profile cli_bad_profile.json --tokens 10");
  expect_bad("apply --profile missing.json --tokens 10");
  expect_bad(std::string("apply --profile \"") + PKV_PROFILE_DATA + "/prefixkv_llava-v1.5-7b_0.5.json\" --tokens -4");
  expect_bad(std::string("apply --profile \"") + PKV_PROFILE_DATA + "/prefixkv_llava-v1.5-7b_0.5.json\"");
}

TEST_CASE("cli hostile input: work bounded by the file, endless streams, underflow, failed writes") {
  auto rng = make_rng(804);
  // a 128-byte .npy of shape (60000000, 0): no data, but 60M rows of work and output (ran and printed 60 MB)
  {
    std::string d = "{'descr': '<f4', 'fortran_order': False, 'shape': (60000000, 0), }";
    while ((10 + d.size() + 1) % 64) d += ' ';
    d += '\n';
    std::ofstream o("cli_zero_cols.npy", std::ios::binary);
    o << "\x93NUMPY" << char(1) << char(0) << char(d.size() & 0xFF) << char(d.size() >> 8) << d;
  }
  expect_bad("solve --scores cli_zero_cols.npy --evict-ratio 0.5");
  expect_bad("profile --evict-ratio 0.5 cli_zero_cols.npy");
  // endless streams stop at once (bad magic / not a JSON array), not after reading gigabytes
  expect_bad("solve --scores /dev/zero --evict-ratio 0.5");
  expect_bad("apply --profile /dev/zero --tokens 10");
  // 1e-400 is finite: it underflows and is taken as 0 (the same answer as --evict-ratio 0)
  std::vector<float> x = random_vector<float>(rng, 3 * 16, 0.0, 1.0);
  write_matrix("cli_small.npy", x, 3, 16);
  const result z = run("solve --scores cli_small.npy --evict-ratio 0");
  const result u = run("solve --scores cli_small.npy --evict-ratio 1e-400");
  REQUIRE(z.code == 0);
  CHECK(u.code == 0);
  CHECK(u.out == z.out);
  CHECK(run("solve --scores cli_small.npy --evict-ratio -1e-400").out == z.out);
  expect_bad("solve --scores cli_small.npy --evict-ratio 1e400");  // overflow is not finite
  // a failed write to stdout: one line on stderr, exit 2 (it exited 0 or said nothing)
  for (const char* args : {"solve --scores cli_small.npy --evict-ratio 0.5", "--help", "apply --profile cli_profile_w.json --tokens 9"}) {
    INFO("args: ", args);
    {
      std::ofstream o("cli_profile_w.json");
      o << "[0.5, 0.25]";
    }
    const std::string cmd = std::string("\"") + PKV_CLI + "\" " + args + " > /dev/full 2> cli_err.txt";
    const int st = std::system(cmd.c_str());
    REQUIRE(WIFEXITED(st));
    CHECK(WEXITSTATUS(st) == 2);
    const std::string err = slurp("cli_err.txt");
    REQUIRE(!err.empty());
    CHECK(err.find('\n') == err.size() - 1);
    CHECK(err.rfind("prefixkv: ", 0) == 0);
  }
}
