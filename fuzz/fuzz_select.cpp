// libFuzzer harness: write_selection_host (both overloads) on curves from the builder or with hostile positions,
// token counts and offsets, hostile keep counts (2^29, 2^40, negative) and capacities. Properties: no crash, no
// sanitizer report, no exception, no allocation out of proportion (libFuzzer's -malloc_limit_mb); on rejection
// `offsets` and `indices` are byte-identical; on success every segment lists keep[s] positions, ascending,
// protected tokens included, and the first keep[s] - protected ranked candidates.
#include <prefixkv/select/select.hpp>

#include "fuzz_common.hpp"

#include <algorithm>

namespace pk = prefixkv;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const int64_t S = in.ConsumeIntegralInRange<int64_t>(0, 6), n = in.ConsumeIntegralInRange<int64_t>(0, 20);
  std::vector<float> x(static_cast<size_t>(S * n));
  for (auto& v : x) v = static_cast<float>(in.ConsumeIntegralInRange<int>(0, 6));
  const pk::protect_policy prot{in.ConsumeIntegralInRange<int64_t>(0, 4), in.ConsumeIntegralInRange<int64_t>(0, 2)};
  pk::curve_buffers c;
  if (pk::build_curves_host(x.data(), pk::make_uniform_segments(S, n), prot, c) != cudaSuccess) return 0;
  // hostile edits of the curves (positions, tokens, offsets, protect policy)
  const int edits = in.ConsumeIntegralInRange<int>(0, 3);
  for (int i = 0; i < edits && !c.positions.empty(); ++i)
    c.positions[in.ConsumeIntegralInRange<size_t>(0, c.positions.size() - 1)] =
        static_cast<int32_t>(in.ConsumeIntegralInRange<int64_t>(-2, n + 2));
  if (S > 0 && in.ConsumeIntegralInRange<int>(0, 7) == 0)
    c.tokens[in.ConsumeIntegralInRange<size_t>(0, c.tokens.size() - 1)] = fuzz::size_or_hostile(in, 0, n + 4);
  if (S > 0 && in.ConsumeIntegralInRange<int>(0, 7) == 0)
    c.offsets[in.ConsumeIntegralInRange<size_t>(0, c.offsets.size() - 1)] = fuzz::size_or_hostile(in, 0, S * n);
  if (in.ConsumeIntegralInRange<int>(0, 15) == 0) c.protect.sinks = fuzz::size_or_hostile(in, 0, 4);
  pk::curve_set cv = c.view();
  // the positions array must hold what the (possibly edited) offsets claim for the ranks that keep[] reads: the
  // writer reads ranks [0, keep - protected) of each segment, within [offsets[s], offsets[s+1]); keep the claim
  // inside the array when the shape is one the writer accepts
  std::vector<int64_t> keep(static_cast<size_t>(S));
  for (int64_t s = 0; s < S; ++s) {
    const uint8_t m = in.ConsumeIntegral<uint8_t>();
    const int64_t tk = c.tokens[s];
    keep[s] = m < 220 ? in.ConsumeIntegralInRange<int64_t>(0, std::max<int64_t>(0, std::min<int64_t>(tk, 64)))
                      : fuzz::hostile_int(in);
    if (m >= 250) keep[s] = int64_t(1) << 29;
  }
  bool shape_ok = c.protect.sinks >= 0 && c.protect.recent >= 0 && (S == 0 || c.offsets[0] == 0);
  for (int64_t s = 0; s < S && shape_ok; ++s)
    shape_ok = c.tokens[s] >= 0 && c.offsets[s + 1] >= c.offsets[s] && c.tokens[s] <= INT32_MAX &&
               c.offsets[s + 1] - c.offsets[s] == pk::candidate_count(c.tokens[s], c.protect);
  if (shape_ok && S > 0 && c.offsets[S] > static_cast<int64_t>(c.positions.size())) return 0;
  const int64_t cap_arr = in.ConsumeIntegralInRange<int64_t>(0, 160);
  const int64_t capacity = in.ConsumeIntegralInRange<int>(0, 15) == 0 ? -in.ConsumeIntegralInRange<int64_t>(1, 3) : cap_arr;
  std::vector<int64_t> offsets(static_cast<size_t>(S) + 1, -9);
  std::vector<int32_t> indices(static_cast<size_t>(cap_arr) + 1, -9);
  const auto ob = fuzz::bytes_of(offsets.data(), offsets.size());
  const auto ib = fuzz::bytes_of(indices.data(), indices.size());
  const cudaError_t e = pk::write_selection_host(cv, keep.data(), offsets.data(), indices.data(), capacity);
  if (e != cudaSuccess) {
    FUZZ_ASSERT(e == cudaErrorInvalidValue);
    FUZZ_ASSERT(fuzz::same_bytes(offsets.data(), offsets.size(), ob) && fuzz::same_bytes(indices.data(), indices.size(), ib));
  } else {
    FUZZ_ASSERT(shape_ok && offsets[0] == 0 && offsets[static_cast<size_t>(S)] <= capacity);
    FUZZ_ASSERT(indices[static_cast<size_t>(cap_arr)] == -9);  // nothing past the capacity
    for (int64_t s = 0; s < S; ++s) {
      const int64_t tk = c.tokens[s], k = keep[s] - pk::protected_count(tk, c.protect);
      FUZZ_ASSERT(offsets[s + 1] - offsets[s] == keep[s]);
      std::vector<unsigned char> want(static_cast<size_t>(tk), 0);
      for (int64_t t = 0; t < tk; ++t) want[t] = pk::is_protected(t, tk, c.protect);
      for (int64_t r = 0; r < k; ++r) want[c.positions[c.offsets[s] + r]] = 1;
      int64_t o = offsets[s];
      for (int64_t t = 0; t < tk; ++t)
        if (want[t]) FUZZ_ASSERT(indices[o++] == t);
      FUZZ_ASSERT(o == offsets[s + 1]);
    }
  }
  // the owning overload: accepted iff the pointer overload accepts with an exact capacity. (A keep count that is
  // valid for a huge all-protected segment legitimately needs that much output memory: not fuzzed here.)
  for (int64_t s = 0; s < S; ++s)
    if (keep[s] > 4096 && keep[s] <= c.tokens[s]) return 0;
  pk::selection_buffers sel;
  sel.offsets = {5};
  const cudaError_t e2 = pk::write_selection_host(cv, keep.data(), sel);
  if (e2 != cudaSuccess) {
    FUZZ_ASSERT(e2 == cudaErrorInvalidValue && sel.offsets.size() == 1 && sel.offsets[0] == 5);
  } else {
    FUZZ_ASSERT(static_cast<int64_t>(sel.offsets.size()) == S + 1);
    if (e == cudaSuccess) {
      for (int64_t s = 0; s <= S; ++s) FUZZ_ASSERT(sel.offsets[s] == offsets[s]);
      for (int64_t i = 0; i < offsets[static_cast<size_t>(S)]; ++i) FUZZ_ASSERT(sel.indices[i] == indices[i]);
    }
  }
  return 0;
}
