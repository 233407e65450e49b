// libFuzzer harness: build_curves_host on hostile row descriptions, protect policies and scores (NaN, +-inf,
// negative, -0.0). Properties: no crash, no sanitizer report, no exception; accepted exactly when an independent
// reference says the input is valid; on rejection the output buffers are byte-identical; on success the curves
// equal the reference ranking (score descending, position ascending) with non-decreasing cumulative values that end
// at 1. Rows either lie inside the score buffer or are invalid by rule (a caller must not describe rows outside its
// buffer: that stays a precondition).
#include <prefixkv/curve/curve.hpp>

#include "fuzz_common.hpp"

#include <algorithm>
#include <cmath>

namespace pk = prefixkv;
using fuzz::wide;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const int form = in.ConsumeIntegralInRange<int>(0, 2);  // uniform, cu_seqlens, begins + lengths
  const int64_t n_arr = in.ConsumeIntegralInRange<int64_t>(0, 12);
  std::vector<int64_t> offs(static_cast<size_t>(n_arr) + 1), lens(static_cast<size_t>(n_arr));
  for (auto& x : offs) x = fuzz::size_or_hostile(in, 0, 80);
  for (auto& x : lens) x = fuzz::size_or_hostile(in, 0, 40);
  if (form == 1 && in.ConsumeBool()) {  // mostly well-formed cu_seqlens
    offs[0] = 0;
    for (size_t i = 1; i < offs.size(); ++i) offs[i] = offs[i - 1] + in.ConsumeIntegralInRange<int64_t>(0, 12);
  }
  pk::segments rows;
  if (form == 0) {
    const uint8_t m = in.ConsumeIntegral<uint8_t>();
    rows.count = m < 240 ? in.ConsumeIntegralInRange<int64_t>(0, 12) : (m & 1 ? int64_t(1) << 62 : INT64_MAX);
    rows.uniform_length = fuzz::size_or_hostile(in, 0, 16);
    rows.uniform_stride = in.ConsumeBool() ? rows.uniform_length : fuzz::size_or_hostile(in, 0, 20);
  } else if (form == 1) {
    rows = pk::make_offset_segments(n_arr, offs.data());
  } else {
    rows = pk::make_ragged_segments(n_arr, offs.data(), lens.data());
  }
  pk::protect_policy prot{fuzz::size_or_hostile(in, 0, 6), fuzz::size_or_hostile(in, 0, 3)};
  std::vector<float> scores(static_cast<size_t>(in.ConsumeIntegralInRange<int>(0, 200)));
  for (auto& x : scores) x = fuzz::score(in);
  const float* sp = scores.empty() && in.ConsumeBool() ? nullptr : scores.data();
  const int64_t cap = static_cast<int64_t>(scores.size());

  // --- independent reference: is the description valid, and does it fit the buffer? ----------------------------
  bool valid = prot.sinks >= 0 && prot.recent >= 0 && rows.count >= 0;
  bool inside = true;  // every non-empty row inside [0, cap)
  const bool uniform = form == 0;
  if (valid && uniform && rows.count > 0) {
    valid = rows.uniform_length >= 0 && rows.uniform_stride >= 0 &&
            (rows.count == 1 || rows.uniform_stride >= rows.uniform_length) &&
            fuzz::fits_i64((wide(rows.count) - 1) * rows.uniform_stride + rows.uniform_length) &&
            rows.uniform_length <= INT32_MAX;
    if (valid && rows.uniform_length > 0)
      inside = (wide(rows.count) - 1) * rows.uniform_stride + rows.uniform_length <= cap;
  } else if (valid && !uniform) {
    for (int64_t s = 0; s < rows.count && valid; ++s) {
      const int64_t b = offs[s];
      if (b < 0) valid = false;
      else if (form == 1) valid = offs[s + 1] >= b;
      else valid = lens[s] >= 0 && fuzz::fits_i64(wide(b) + lens[s]);
    }
    // rows are read in order; the library refuses a row longer than INT32_MAX before reading it, so only rows
    // before the first such row must lie inside the buffer
    for (int64_t s = 0; s < rows.count && valid && inside; ++s) {
      const int64_t len = form == 1 ? offs[s + 1] - offs[s] : lens[s];
      if (len > INT32_MAX) valid = false;
      else if (len > 0 && wide(offs[s]) + len > cap) inside = false;
    }
  }
  if (valid && !inside) return 0;  // a caller precondition (rows must lie in the buffer), not a library duty
  std::vector<float> ref_scores;   // valid => all scores read are finite and >= 0?
  bool scores_ok = true;
  if (valid && rows.count > 0 && !(uniform && rows.uniform_length == 0)) {
    for (int64_t s = 0; s < rows.count; ++s) {
      const int64_t len = rows.length(s);
      if (len > 0 && sp == nullptr) scores_ok = false;
      for (int64_t t = 0; t < len && sp; ++t) {
        const float x = sp[rows.begin(s) + t];
        if (!std::isfinite(x) || x < 0.0f) scores_ok = false;
      }
    }
  }
  // uniform rows of absurd count: the outputs cannot be allocated (no exception, an allocation error)
  const bool huge = valid && uniform && rows.count > (int64_t(1) << 24);
  if (huge && rows.uniform_length > 0) return 0;  // (would need a score buffer of that size)

  // --- the call -------------------------------------------------------------------------------------------------
  pk::curve_buffers out;
  out.offsets = {7, 7};
  out.positions = {1, 2, 3};
  out.cumulative = {0.5f};
  const auto before_o = out.offsets;
  const auto before_p = out.positions;
  const auto before_c = out.cumulative;
  const auto before_s = fuzz::bytes_of(scores.data(), scores.size());
  const cudaError_t e = pk::build_curves_host(sp, rows, prot, out);
  FUZZ_ASSERT(fuzz::same_bytes(scores.data(), scores.size(), before_s));  // input never written
  if (e != cudaSuccess) {
    FUZZ_ASSERT(out.offsets == before_o && out.positions == before_p && out.cumulative == before_c);
    FUZZ_ASSERT(!valid || !scores_ok || huge);
    if (valid && !huge && sp != nullptr) {
      FUZZ_ASSERT(e == cudaErrorInvalidValue);
      const auto why = pk::last_error().why;
      FUZZ_ASSERT(why == pk::reason::nonfinite_input || why == pk::reason::negative_input);
    }
    if (huge) FUZZ_ASSERT(e == cudaErrorMemoryAllocation || e == cudaErrorInvalidValue);
    return 0;
  }
  FUZZ_ASSERT(valid && scores_ok && !huge);
  // --- reference curves --------------------------------------------------------------------------------------------
  const int64_t S = rows.count;
  FUZZ_ASSERT(static_cast<int64_t>(out.tokens.size()) == S && static_cast<int64_t>(out.offsets.size()) == S + 1);
  FUZZ_ASSERT(out.offsets[0] == 0);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = rows.length(s), c = pk::candidate_count(n, prot);
    FUZZ_ASSERT(out.tokens[s] == n && out.offsets[s + 1] - out.offsets[s] == c);
    std::vector<int32_t> order;
    for (int64_t t = 0; t < n; ++t)
      if (!pk::is_protected(t, n, prot)) order.push_back(static_cast<int32_t>(t));
    FUZZ_ASSERT(static_cast<int64_t>(order.size()) == c);
    const int64_t base = rows.begin(s);
    auto row = [&](int64_t t) { return sp[base + t]; };
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return row(a) > row(b); });
    float prev = 0.0f;
    for (int64_t r = 0; r < c; ++r) {
      const int64_t i = out.offsets[s] + r;
      FUZZ_ASSERT(out.positions[i] == order[r]);
      FUZZ_ASSERT(out.sorted_scores[i] == row(order[r]) && !std::signbit(out.sorted_scores[i]));
      FUZZ_ASSERT(out.cumulative[i] >= prev && out.cumulative[i] <= 1.0f);
      prev = out.cumulative[i];
    }
    if (c > 0) FUZZ_ASSERT(out.cumulative[out.offsets[s + 1] - 1] == 1.0f);
  }
  return 0;
}
