// libFuzzer harness: the JSON reader, profile parsing, the serving rule and the profile accumulator on untrusted
// text and hostile counts. Properties: no crash, no sanitizer report, no exception; outputs byte-identical on
// rejection; an accepted array round-trips exactly through the writer; an accepted profile has fractions in
// [0, 1]; apply_profile keeps every protected token and never more than the prompt; the accumulator's state is
// unchanged by a rejected sample.
#include <prefixkv/io/json.hpp>
#include <prefixkv/profile/profile.hpp>

#include "fuzz_common.hpp"

#include <cmath>
#include <string>

namespace pk = prefixkv;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // 1. the whole input as JSON text
  const char* text = reinterpret_cast<const char*>(data);
  std::vector<double> v = {42.0};
  const cudaError_t e = pk::json_parse_number_array(text, size, v);
  if (e != cudaSuccess) {
    FUZZ_ASSERT(v.size() == 1 && v[0] == 42.0);
  } else {
    for (double x : v) FUZZ_ASSERT(std::isfinite(x));
    std::string s;
    FUZZ_ASSERT(pk::json_append_number_array(s, v.data(), static_cast<int64_t>(v.size())));
    std::vector<double> back;
    FUZZ_ASSERT(pk::json_parse_number_array(s.data(), s.size(), back) == cudaSuccess);
    FUZZ_ASSERT(back.size() == v.size());
    for (size_t i = 0; i < v.size(); ++i) FUZZ_ASSERT(back[i] == v[i] || (back[i] == 0.0 && v[i] == 0.0));
  }
  std::vector<double> prof = {7.0};
  if (pk::profile_from_json(text, size, prof) != cudaSuccess) {
    FUZZ_ASSERT(prof.size() == 1 && prof[0] == 7.0);
  } else {
    FUZZ_ASSERT(e == cudaSuccess && prof.size() == v.size());
    for (double f : prof) FUZZ_ASSERT(f >= 0.0 && f <= 1.0);
  }

  // 2. the serving rule and the accumulator on hostile counts (the same bytes, read as numbers)
  FuzzedDataProvider in(data, size);
  const int64_t layers = in.ConsumeIntegralInRange<int>(0, 15) == 0 ? fuzz::hostile_int(in) : in.ConsumeIntegralInRange<int64_t>(0, 8);
  const int64_t nl = layers >= 0 && layers <= 8 ? layers : 8;  // the arrays really hold 8
  std::vector<double> f(8);
  for (auto& x : f) x = fuzz::ratio(in);
  const int64_t tokens = fuzz::size_or_hostile(in, 0, 5000);
  const pk::protect_policy prot{fuzz::size_or_hostile(in, 0, 8), fuzz::size_or_hostile(in, 0, 4)};
  std::vector<int64_t> keep(9, -3);
  const auto kb = fuzz::bytes_of(keep.data(), keep.size());
  const bool lengths_ok = layers >= 0 && layers <= 8;
  if (lengths_ok || layers < 0) {  // (a positive layer count beyond the arrays is a caller error, not fuzzed)
    const cudaError_t ea = pk::apply_profile(f.data(), layers, tokens, prot, keep.data());
    if (ea != cudaSuccess) {
      FUZZ_ASSERT(ea == cudaErrorInvalidValue && fuzz::same_bytes(keep.data(), keep.size(), kb));
    } else {
      for (int64_t l = 0; l < nl; ++l) {
        FUZZ_ASSERT(keep[l] >= pk::protected_count(tokens, prot) && keep[l] <= tokens);
        FUZZ_ASSERT(keep[l] == tokens - pk::profile_evictions(f[l], tokens, prot));
      }
      FUZZ_ASSERT(keep[8] == -3);
    }
  }
  pk::profile_accumulator acc;
  std::vector<int64_t> k(8), t(8);
  for (int round = 0; round < 3 && in.remaining_bytes() > 0; ++round) {
    for (auto& x : k) x = fuzz::size_or_hostile(in, 0, 100);
    for (auto& x : t) x = fuzz::size_or_hostile(in, 0, 100);
    const int64_t n = in.ConsumeIntegralInRange<int64_t>(0, 8);
    const int64_t before_samples = acc.samples(), before_layers = acc.layers();
    std::vector<double> fr_before;
    const bool had = acc.fractions(fr_before) == cudaSuccess;
    const cudaError_t ea = acc.add(k.data(), t.data(), n);
    if (ea != cudaSuccess) {
      FUZZ_ASSERT(acc.samples() == before_samples && acc.layers() == before_layers);
      std::vector<double> fr_after;
      FUZZ_ASSERT((acc.fractions(fr_after) == cudaSuccess) == had);
      if (had) FUZZ_ASSERT(fr_after == fr_before);
    } else {
      FUZZ_ASSERT(acc.samples() == before_samples + 1 && acc.layers() == n);
      std::vector<double> fr;
      FUZZ_ASSERT(acc.fractions(fr) == cudaSuccess);
      for (double x : fr) FUZZ_ASSERT(x >= 0.0 && x <= 1.0);
    }
  }
  return 0;
}
