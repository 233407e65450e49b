// libFuzzer harness: the scorers' host twins (key_norm_host, accumulated_attention_host, window_attention_host)
// on hostile views (strides, extents, NaN/inf inputs), segment grids, row descriptions (uniform, cu_seqlens,
// begins + lengths, ragged per-head rows) and options. Properties: no crash, no sanitizer report, no exception; on
// rejection the score buffer is byte-identical; on success nothing outside the rows of the scored layer changed.
// The score buffer is exactly as long as the rows of the scored layer need (the caller's contract), so a write
// past any row is an ASan report or a changed byte.
#include <prefixkv/score/score.hpp>

#include "fuzz_common.hpp"

#include <cmath>

namespace pk = prefixkv;
using fuzz::wide;

namespace {

constexpr int64_t kArena = 1024;  // floats
alignas(64) float g_in[kArena];


// A float view inside the input arena (or a hostile one that validation must refuse). false: skip (a view that
// would be valid but does not lie in the arena is a caller precondition).
bool make_view(FuzzedDataProvider& in, int64_t b, int64_t h, int64_t t, int64_t d, pk::kv_view<const float>& v) {
  const int64_t ext[4] = {b, h, t, d};
  int64_t str[4];
  switch (in.ConsumeIntegralInRange<int>(0, 3)) {
    case 0: str[0] = h * t * d; str[1] = t * d; str[2] = d; str[3] = 1; break;   // bhsd
    case 1: str[0] = t * h * d; str[1] = d; str[2] = h * d; str[3] = 1; break;   // bshd
    case 2: str[0] = h * t * d * 2 + 1; str[1] = t * d * 2; str[2] = d * 2; str[3] = 2; break;  // padded, strided dim
    default:
      for (auto& s : str) s = in.ConsumeIntegralInRange<int>(0, 15) == 0 ? fuzz::hostile_int(in) : in.ConsumeIntegralInRange<int64_t>(0, 40);
  }
  const int64_t at = in.ConsumeIntegralInRange<int64_t>(0, kArena - 1);
  v = pk::make_kv_view<const float>(g_in + at, b, h, t, d, str[0], str[1], str[2], str[3]);
  if (pk::validate(v) != cudaSuccess) return true;  // the scorer must refuse it too
  __int128 last = 0;
  for (int i = 0; i < 4; ++i) {
    if (ext[i] == 0) return true;
    last += (wide(ext[i]) - 1) * str[i];
  }
  return at + last + 1 <= kArena;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  for (auto& x : g_in) x = 0.0f;
  const int which = in.ConsumeIntegralInRange<int>(0, 2);  // key norm, accumulated attention, window
  const int64_t B = in.ConsumeIntegralInRange<int64_t>(0, 2), Hk = in.ConsumeIntegralInRange<int64_t>(0, 3);
  const int64_t T = in.ConsumeIntegralInRange<int64_t>(0, 12), D = in.ConsumeIntegralInRange<int64_t>(0, 4);
  const int64_t G = in.ConsumeIntegralInRange<int64_t>(1, 2), W = in.ConsumeIntegralInRange<int64_t>(0, 3);
  for (auto& x : g_in) {
    const uint8_t m = in.remaining_bytes() ? in.ConsumeIntegral<uint8_t>() : 0;
    x = m < 250 ? static_cast<float>(static_cast<int>(m % 17) - 8) * 0.125f : (m < 253 ? NAN : INFINITY);
    if (in.remaining_bytes() < 64) break;  // keep bytes for the rest
  }
  // grid, layer and rows
  pk::segment_grid grid{in.ConsumeIntegralInRange<int64_t>(0, 3), B, in.ConsumeBool() ? 1 : (in.ConsumeBool() ? Hk : 2)};
  if (in.ConsumeIntegralInRange<int>(0, 31) == 0) grid.layers = fuzz::hostile_int(in);
  const int64_t layer = in.ConsumeIntegralInRange<int64_t>(-1, 3);
  const int64_t S = grid.layers >= 0 && grid.layers <= 3 && grid.heads >= 0 && grid.heads <= 3 ? grid.count() : 0;
  const int form = in.ConsumeIntegralInRange<int>(0, 2);
  std::vector<int64_t> offs(static_cast<size_t>(S) + 1, 0), lens(static_cast<size_t>(S) + 1, 0);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t len = in.ConsumeIntegralInRange<int>(0, 31) == 0 ? fuzz::size_or_hostile(in, 0, 20)
                                                                    : in.ConsumeIntegralInRange<int64_t>(0, T + 1);
    lens[s] = len;
    offs[s + 1] = form == 1 && len >= 0 && len <= (int64_t(1) << 40) && offs[s] <= (int64_t(1) << 40)
                      ? offs[s] + len
                      : in.ConsumeIntegralInRange<int64_t>(0, 60);
  }
  if (form == 2)
    for (int64_t s = 0; s < S; ++s) offs[s] = in.ConsumeIntegralInRange<int64_t>(0, 60);
  pk::segments rows;
  if (form == 0) rows = pk::make_uniform_segments(S, in.ConsumeIntegralInRange<int64_t>(0, T + 1), in.ConsumeIntegralInRange<int64_t>(0, 16));
  else if (form == 1) rows = pk::make_offset_segments(S, offs.data());
  else rows = pk::make_ragged_segments(S, offs.data(), lens.data());
  if (form == 0 && in.ConsumeIntegralInRange<int>(0, 31) == 0) rows.count = fuzz::hostile_int(in);  // (arrays: exact)

  // the output: exactly what the rows of `layer` need (only when the description is one the scorer may accept)
  int64_t need = 0;
  // (any grid the library may accept: small, or large with hostile layers and a matching row count)
  bool plausible = pk::validate(grid) == cudaSuccess && grid.heads >= 1 && grid.heads <= 3 &&
                   rows.count == grid.count() && layer >= 0 && layer < grid.layers && rows.count > 0 &&
                   (rows.offsets == nullptr || rows.count == S);
  if (plausible && pk::validate_host_contents(rows) == cudaSuccess) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < grid.heads; ++h) {
        const int64_t id = grid.id(layer, b, h);
        if (rows.length(id) > 0) need = std::max<int64_t>(need, rows.begin(id) + rows.length(id));
      }
  }
  if (need > 4096) return 0;
  std::vector<float> out(static_cast<size_t>(need) + (in.ConsumeIntegralInRange<int>(0, 7) == 0 ? 0 : 0), -1.5f);
  float* op = out.empty() && in.ConsumeBool() ? nullptr : out.data();
  std::vector<unsigned char> allowed(out.size(), 0);  // bytes the call may write: the rows of `layer`
  if (plausible && pk::validate_host_contents(rows) == cudaSuccess)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < grid.heads; ++h) {
        const int64_t id = grid.id(layer, b, h);
        for (int64_t t = 0; t < rows.length(id); ++t) allowed[static_cast<size_t>(rows.begin(id) + t)] = 1;
      }
  const auto before = fuzz::bytes_of(out.data(), out.size());

  cudaError_t e = cudaErrorUnknown;
  pk::kv_view<const float> a, q;
  if (which == 0) {
    if (!make_view(in, B, Hk, T, D, a)) return 0;
    pk::key_norm_options opt;
    opt.reciprocal = in.ConsumeBool();
    e = pk::key_norm_host(a, opt, grid, layer, rows, op);
  } else if (which == 1) {  // P: (batch, q_head, query, key)
    if (!make_view(in, B, Hk * G, W, T, a)) return 0;
    e = pk::accumulated_attention_host(a, grid, layer, rows, op);
  } else {
    if (!make_view(in, B, Hk * G, W, D, q) || !make_view(in, B, Hk, T, D, a)) return 0;
    pk::window_options opt;
    opt.scale = in.ConsumeIntegralInRange<int>(0, 15) == 0 ? static_cast<float>(fuzz::ratio(in) * -3.0) : 0.0f;
    opt.group = static_cast<pk::head_reduce>(in.ConsumeIntegralInRange<int>(0, 2));
    opt.pool = static_cast<pk::pool_kind>(in.ConsumeIntegralInRange<int>(0, 3));
    opt.pool_kernel = in.ConsumeIntegralInRange<int>(-1, 6);
    opt.heads = static_cast<pk::head_reduce>(in.ConsumeIntegralInRange<int>(0, 2));
    pk::lse_view lse;
    if (in.ConsumeBool()) {
      lse.data = g_in + in.ConsumeIntegralInRange<int64_t>(0, 64);
      lse.stride_batch = in.ConsumeIntegralInRange<int64_t>(-1, 40);
      lse.stride_head = in.ConsumeIntegralInRange<int64_t>(0, 12);
      lse.stride_query = in.ConsumeIntegralInRange<int64_t>(0, 3);
      // (an LSE array shorter than (batch, q_head, w) is a caller precondition)
      if (lse.stride_batch >= 0 && 64 + (B ? B - 1 : 0) * lse.stride_batch + (Hk * G) * lse.stride_head + W * lse.stride_query >= kArena)
        return 0;
    }
    e = pk::window_attention_host(q, a, lse, opt, grid, layer, rows, op);
  }
  if (e != cudaSuccess) {
    FUZZ_ASSERT(e == cudaErrorInvalidValue);
    FUZZ_ASSERT(fuzz::same_bytes(out.data(), out.size(), before));
    return 0;
  }
  const unsigned char* now = reinterpret_cast<const unsigned char*>(out.data());
  for (size_t i = 0; i < out.size(); ++i)
    if (!allowed[i]) FUZZ_ASSERT(std::memcmp(now + i * 4, before.data() + i * 4, 4) == 0);
  return 0;
}
