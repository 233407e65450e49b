// prefixkv-llama: what the command line and the study share — the backend factory, sampling, teacher forcing,
// generation and the ROUGE-L scorer.
#pragma once

#include "backend.hpp"
#include "cpu_backend.hpp"
#include "policy.hpp"
#if defined(PREFIXKV_LLAMA_CUDA)
#include "cuda_backend.cuh"
#endif

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace prefixkv_llama {

//! The backend for `device`: "cpu" (always) or "cuda" (where this build has a CUDA backend); null + reason.
inline std::unique_ptr<backend> make_backend(const std::string& device, const model& m, std::string& err) {
  if (device == "cpu") return std::make_unique<cpu_backend>(m);
  if (device == "cuda") {
#if defined(PREFIXKV_LLAMA_CUDA)
    return make_cuda_backend(m, err);
#else
    err = "--device cuda: this build has no CUDA backend for prefixkv-llama (use --device cpu)";
    return nullptr;
#endif
  }
  err = "unknown device '" + device + "' (cpu or cuda)";
  return nullptr;
}

//! A small deterministic generator (splitmix64), the same on every platform.
struct rng {
  uint64_t state;
  explicit rng(uint64_t seed) : state(seed) {}
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  //! Uniform in [0, 1) with 53 random bits.
  double uniform() { return double(next() >> 11) * (1.0 / 9007199254740992.0); }
};

//! Index of the largest logit (the lowest index on ties).
inline int argmax(const std::vector<float>& v) {
  int best = 0;
  for (int i = 1; i < int(v.size()); ++i)
    if (v[i] > v[best]) best = i;
  return best;
}

//! Next token: greedy for temperature <= 0, else a draw from softmax(logits / temperature) (double precision).
inline int sample(const std::vector<float>& logits, double temperature, rng& r) {
  if (!(temperature > 0.0)) return argmax(logits);
  double mx = -INFINITY;
  for (float x : logits) mx = std::max(mx, double(x) / temperature);
  double sum = 0.0;
  std::vector<double> p(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) sum += (p[i] = std::exp(double(logits[i]) / temperature - mx));
  const double u = r.uniform() * sum;
  double acc = 0.0;
  for (size_t i = 0; i < p.size(); ++i) {
    acc += p[i];
    if (u < acc) return int(i);
  }
  return int(p.size()) - 1;
}

//! -log softmax(logits)[token] in double precision.
inline double nll(const std::vector<float>& logits, int token) {
  double mx = -INFINITY;
  for (float x : logits) mx = std::max(mx, double(x));
  double sum = 0.0;
  for (float x : logits) sum += std::exp(double(x) - mx);
  return std::log(sum) + mx - double(logits[size_t(token)]);
}

//! ROUGE-L F1 of `cand` against `ref`, tokens as units: LCS length l, precision l / |cand|, recall l / |ref|,
//! F1 = 2 P R / (P + R); 0 when either is empty or nothing matches.
inline double rouge_l_f1(const std::vector<int>& cand, const std::vector<int>& ref) {
  if (cand.empty() || ref.empty()) return 0.0;
  std::vector<int> row(ref.size() + 1, 0), prev(ref.size() + 1, 0);
  for (size_t i = 1; i <= cand.size(); ++i) {
    for (size_t j = 1; j <= ref.size(); ++j)
      row[j] = cand[i - 1] == ref[j - 1] ? prev[j - 1] + 1 : std::max(prev[j], row[j - 1]);
    std::swap(row, prev);
  }
  const double l = prev[ref.size()];
  if (l == 0) return 0.0;
  const double p = l / double(cand.size()), r = l / double(ref.size());
  return 2.0 * p * r / (p + r);
}

//! Prefill `prompt` (full cache), then compress with `pol` (unless it is `full`). `logits` receives the prompt's
//! last logits (they predict the first new token and never see a compressed cache).
inline bool prefill_and_compress(backend& be, const std::vector<int>& prompt, const policy& pol,
                                 std::vector<float>& logits, std::string& err) {
  prefixkv::compress_plan plan;
  if (compresses(pol) && !make_policy_plan(pol, be.cfg(), plan, err)) return false;
  if (!be.prefill(prompt.data(), int(prompt.size()), record_for(pol), logits, err)) return false;
  return !compresses(pol) || be.compress(plan, err);
}

//! Teacher forcing over `text` after a prompt of `prompt_len` tokens whose last logits are `logits0`: adds
//! -log p(text[i]) to `nll_sum` for every i, and (optionally) the argmax prediction at every position to `top1`.
inline bool teacher_force(backend& be, const std::vector<float>& logits0, const std::vector<int>& text, int prompt_len,
                          double& nll_sum, std::vector<int>* top1, std::string& err) {
  std::vector<float> logits = logits0;
  nll_sum = 0.0;
  if (top1) top1->clear();
  for (size_t i = 0; i < text.size(); ++i) {
    if (i > 0 && !be.step(text[i - 1], prompt_len + int(i) - 1, logits, err)) return false;
    nll_sum += nll(logits, text[i]);
    if (top1) top1->push_back(argmax(logits));
  }
  return true;
}

//! Generate up to `steps` tokens after a prompt of `prompt_len` tokens whose last logits are `logits0`. Stops early
//! at BOS or EOS (not included) when `stop_at_boundary`, and at the end of the context.
inline bool generate(backend& be, const std::vector<float>& logits0, int steps, int prompt_len, double temperature,
                     rng& r, bool stop_at_boundary, std::vector<int>& out, std::string& err) {
  out.clear();
  std::vector<float> logits = logits0;
  for (int i = 0; i < steps; ++i) {
    const int tok = sample(logits, temperature, r);
    if (stop_at_boundary && (tok == 1 || tok == 2)) break;
    out.push_back(tok);
    if (i + 1 == steps || prompt_len + i >= be.cfg().seq_len) break;  // no room (in positions) for the next one
    if (!be.step(tok, prompt_len + i, logits, err)) return false;
  }
  return true;
}

}  // namespace prefixkv_llama
