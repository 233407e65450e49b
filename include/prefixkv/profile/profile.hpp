//! \file prefixkv/profile/profile.hpp
//! Offline per-layer retention profiles (the paper's deployment mode).
//!
//! * `profile_accumulator` averages, over calibration samples, the fraction of each layer's tokens that the
//!   exact global solver evicts: f_l = mean over samples of (n_l - keep_l) / n_l.
//! * Profiles are saved and loaded as the paper's JSON: one number per layer, the evicted fraction
//!   (e.g. `prefixkv_llava-v1.5-7b_0.5.json`).
//! * `apply_profile` is the paper's serving rule: a prompt of n tokens evicts round(f_l * n) candidates of
//!   layer l (round half to even, as Python's round), clipped to the layer's candidate count; protected tokens
//!   (sinks, recent) are always kept.
//!
//! \code
//! std::vector<double> f;
//! auto e = prefixkv::profile_load("prefixkv_llava-v1.5-7b_0.5.json", f);
//! std::vector<int64_t> keep(f.size());
//! e = prefixkv::apply_profile(f.data(), int64_t(f.size()), 1000, prefixkv::protect_policy{}, keep.data());
//! // keep[l] = tokens layer l keeps of a 1000-token prompt
//! \endcode
#pragma once

#include "../core/error.hpp"
#include "../curve/curve.hpp"
#include "../io/json.hpp"
#include "../io/npy.hpp"

#include <cmath>
#include <string>
#include <vector>

PREFIXKV_NAMESPACE_BEGIN

//! Averages per-layer eviction fractions over samples.
class profile_accumulator {
 public:
  //! Add one sample: `keep` (layers) tokens kept per layer, `tokens` (layers) tokens per layer before eviction.
  //! A layer with 0 tokens counts as fraction 0. All samples must have the same number of layers.
  [[nodiscard]] cudaError_t add(const int64_t* keep, const int64_t* tokens, int64_t layers) noexcept {
    if (layers < 0) return detail::fail(reason::negative_extent, "profile: negative layer count");
    if (layers > 0 && (keep == nullptr || tokens == nullptr))
      return detail::fail(reason::null_pointer, "profile: keep or tokens is null");
    if (samples_ > 0 && layers != static_cast<int64_t>(sum_.size()))
      return detail::fail(reason::shape_mismatch, "profile: samples disagree on the number of layers");
    for (int64_t l = 0; l < layers; ++l)
      if (tokens[l] < 0 || keep[l] < 0 || keep[l] > tokens[l])
        return detail::fail(reason::out_of_range, "profile: keep must lie in [0, tokens]");
    try {
      if (samples_ == 0) sum_.assign(static_cast<size_t>(layers), 0.0);
    } catch (...) {
      return detail::fail(reason::capacity_exceeded, "profile: out of memory", cudaErrorMemoryAllocation);
    }
    for (int64_t l = 0; l < layers; ++l)
      sum_[l] += tokens[l] > 0 ? static_cast<double>(tokens[l] - keep[l]) / static_cast<double>(tokens[l]) : 0.0;
    ++samples_;
    return cudaSuccess;
  }
  int64_t samples() const noexcept { return samples_; }
  int64_t layers() const noexcept { return static_cast<int64_t>(sum_.size()); }
  //! The averaged eviction fractions (one per layer). Fails with no samples.
  [[nodiscard]] cudaError_t fractions(std::vector<double>& out) const noexcept {
    if (samples_ == 0) return detail::fail(reason::bad_parameter, "profile: no samples were added");
    try {
      out.resize(sum_.size());
    } catch (...) {
      return detail::fail(reason::capacity_exceeded, "profile: out of memory", cudaErrorMemoryAllocation);
    }
    for (size_t l = 0; l < sum_.size(); ++l) out[l] = sum_[l] / static_cast<double>(samples_);
    return cudaSuccess;
  }

 private:
  std::vector<double> sum_;
  int64_t samples_ = 0;
};

//! Check a profile: every fraction finite and in [0, 1].
[[nodiscard]] inline cudaError_t validate_profile(const double* f, int64_t layers) noexcept {
  if (layers < 0) return detail::fail(reason::negative_extent, "profile: negative layer count");
  if (layers > 0 && f == nullptr) return detail::fail(reason::null_pointer, "profile: fractions is null");
  for (int64_t l = 0; l < layers; ++l)
    if (!(f[l] >= 0.0 && f[l] <= 1.0)) return detail::fail(reason::bad_parameter, "profile: a fraction is outside [0, 1]");
  return cudaSuccess;
}

//! The paper's JSON text of a profile: `[f_0, f_1, ...]`.
[[nodiscard]] inline cudaError_t profile_to_json(const std::vector<double>& f, std::string& out) noexcept {
  PREFIXKV_TRY(validate_profile(f.data(), static_cast<int64_t>(f.size())));
  std::string s;
  if (!json_append_number_array(s, f.data(), static_cast<int64_t>(f.size())))
    return detail::fail(reason::capacity_exceeded, "profile: out of memory", cudaErrorMemoryAllocation);
  out.swap(s);
  return cudaSuccess;
}

//! Parse a profile from JSON text (a JSON array of fractions in [0, 1]).
[[nodiscard]] inline cudaError_t profile_from_json(const char* text, size_t n, std::vector<double>& out) noexcept {
  std::vector<double> f;
  PREFIXKV_TRY(json_parse_number_array(text, n, f));
  if (validate_profile(f.data(), static_cast<int64_t>(f.size())) != cudaSuccess)
    return detail::fail(reason::bad_file, "profile: a fraction is outside [0, 1]");
  out.swap(f);
  return cudaSuccess;
}

//! Load a profile file of at most `max_bytes` bytes (`reason::capacity_exceeded` beyond; a file that does not
//! start like a JSON array is refused at its first bytes).
[[nodiscard]] inline cudaError_t profile_load(const char* path, std::vector<double>& out,
                                              size_t max_bytes = read_file_default_limit) noexcept {
  std::vector<unsigned char> bytes;
  PREFIXKV_TRY(detail::read_file_bytes_impl(path, bytes, max_bytes, '[', "profile: not a JSON array (expected '[')"));
  return profile_from_json(reinterpret_cast<const char*>(bytes.data()), bytes.size(), out);
}

//! Save a profile file (JSON array, newline-terminated).
[[nodiscard]] inline cudaError_t profile_save(const char* path, const std::vector<double>& f) noexcept {
  std::string s;
  PREFIXKV_TRY(profile_to_json(f, s));
  if (path == nullptr) return detail::fail(reason::null_pointer, "profile: path is null");
  std::FILE* fp = std::fopen(path, "wb");
  if (!fp) return detail::fail(reason::bad_file, "profile: cannot create the file");
  const bool ok = std::fwrite(s.data(), 1, s.size(), fp) == s.size() && std::fputc('\n', fp) != EOF;
  if (std::fclose(fp) != 0 || !ok) return detail::fail(reason::bad_file, "profile: write error");
  return cudaSuccess;
}

//! Candidates evicted from a layer of n tokens by fraction f: round(f * n) (half to even) clipped to the
//! candidate count.
PREFIXKV_HOST_DEVICE int64_t profile_evictions(double f, int64_t n, protect_policy p) {
  const double e = rint(f * static_cast<double>(n));
  const int64_t c = candidate_count(n, p);
  return e >= static_cast<double>(c) ? c : (e <= 0.0 ? 0 : static_cast<int64_t>(e));
}

//! The serving rule: `keep` (layers) = tokens kept per layer for a prompt of `tokens` tokens in every layer.
[[nodiscard]] inline cudaError_t apply_profile(const double* fractions, int64_t layers, int64_t tokens,
                                               protect_policy protect, int64_t* keep) noexcept {
  PREFIXKV_TRY(validate_profile(fractions, layers));
  PREFIXKV_TRY(validate(protect));
  if (tokens < 0) return detail::fail(reason::negative_extent, "apply_profile: negative token count");
  if (layers > 0 && keep == nullptr) return detail::fail(reason::null_pointer, "apply_profile: keep is null");
  for (int64_t l = 0; l < layers; ++l) keep[l] = tokens - profile_evictions(fractions[l], tokens, protect);
  return cudaSuccess;
}

PREFIXKV_NAMESPACE_END
