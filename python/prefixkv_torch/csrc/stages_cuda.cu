// prefixkv_torch: the CUDA kernels of the ops — the compressor's entry (dispatching on the cache's element type to
// compress_*.cu) and the lower-level stages (curves, solve, select, gather). Every one enqueues on the current
// stream, takes its workspace from PyTorch's caching allocator and never synchronises with the host; problems in
// device data are reported through the status tensors it returns.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "pkv_common.h"
#include "pkv_ops.h"

#include <prefixkv/compact/compact.cuh>
#include <prefixkv/curve/curve.cuh>
#include <prefixkv/select/select.cuh>
#include <prefixkv/solve/solve.cuh>

#include <algorithm>

namespace pkv_torch {
namespace {

at::Tensor workspace(size_t bytes, const at::Device& dev) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, at::TensorOptions().dtype(at::kByte).device(dev));
}

//! A 1-D tensor of n elements whose data pointer is valid even when n == 0 (the device stages need real pointers).
at::Tensor vec(int64_t n, at::ScalarType t, const at::Device& dev) {
  return at::empty({std::max<int64_t>(n, 1)}, at::TensorOptions().dtype(t).device(dev)).narrow(0, 0, n);
}

cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

//! Device selections from the caller: offsets that do not start at 0, decrease or run past the index vector would
//! make the compaction read outside `indices`. Checked here with tensor ops (no host sync): such a selection is
//! replaced by an empty one (nothing moves) and `ok` is false, to be reported as out_of_range in the status.
at::Tensor safe_offsets(const at::Tensor& sel_offsets, const at::Tensor& indices, at::Tensor& ok) {
  const int64_t S = sel_offsets.size(0) - 1;
  ok = sel_offsets.select(0, 0).eq(0) & sel_offsets.select(0, S).le(indices.numel());
  if (S > 0) ok = ok & sel_offsets.narrow(0, 1, S).ge(sel_offsets.narrow(0, 0, S)).all();
  return at::where(ok, sel_offsets, at::zeros_like(sel_offsets)).contiguous();
}

void report_bad_selection(at::Tensor& status, const at::Tensor& ok) {
  status.masked_fill_(ok.logical_not(), static_cast<int>(pk::reason::out_of_range));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> compress_cuda(
    at::TensorList keys, at::TensorList values, const opt_tensor& lengths, at::TensorList attention,
    at::TensorList queries, at::TensorList lse, const opt_tensor& scores, int64_t layout, int64_t q_heads,
    int64_t scorer, int64_t gran, int64_t alloc, int64_t budget, double evict_ratio, int64_t keep_tokens,
    at::ArrayRef<double> profile, int64_t sinks, int64_t recent, int64_t min_keep, int64_t max_keep,
    double window_scale, int64_t window_group, int64_t window_pool, int64_t window_pool_kernel, int64_t window_heads) {
  const compress_opts o = make_opts(layout, q_heads, scorer, gran, alloc, budget, evict_ratio, keep_tokens, profile,
                                    sinks, recent, min_keep, max_keep, window_scale, window_group, window_pool,
                                    window_pool_kernel, window_heads);
  PKV_REQUIRE(!keys.empty(), "bad_parameter", "keys must hold one tensor per layer (got an empty list)");
  const c10::cuda::CUDAGuard guard(keys[0].device());
  const compress_call c = prepare_compress(keys, values, lengths, attention, queries, lse, scores, o);
  switch (keys[0].scalar_type()) {
    case at::kHalf: return compress_cuda_f16(c, o, keys, values, attention, queries, lse);
    case at::kBFloat16: return compress_cuda_bf16(c, o, keys, values, attention, queries, lse);
    default: return compress_cuda_f32(c, o, keys, values, attention, queries, lse);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> curves_cuda(
    const at::Tensor& scores, const opt_tensor& lengths, int64_t sinks, int64_t recent) {
  check_score_rows(scores, lengths);
  PKV_REQUIRE(sinks >= 0 && recent >= 0, "bad_parameter", "sinks and recent must be >= 0");
  const at::Device dev = scores.device();
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor sc = scores.stride(1) == 1 ? scores : scores.contiguous();
  const int64_t S = sc.size(0), N = sc.size(1), C = S * N;
  const auto i64 = at::TensorOptions().dtype(at::kLong).device(dev);
  at::Tensor status = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(dev));
  at::Tensor lens;
  if (lengths.has_value() && lengths->defined()) {
    check_device(*lengths, dev, "lengths");
    const at::Tensor l = lengths->to(at::kLong);
    // a row length outside [0, N] would read past its row: reported as status_bad_length, clamped for the builder
    status.bitwise_or_((l.lt(0) | l.gt(N)).any().to(at::kInt) * static_cast<int>(pk::status_bad_length));
    lens = l.clamp(0, N).contiguous();
  } else {
    lens = at::full({S}, N, i64);
  }
  const at::Tensor begins = at::arange(S, i64) * sc.stride(0);
  at::Tensor offsets = vec(S + 1, at::kLong, dev), tokens = vec(S, at::kLong, dev);
  at::Tensor positions = vec(C, at::kInt, dev), cumulative = vec(C, at::kFloat, dev), sorted = vec(C, at::kFloat, dev);
  const pk::segments rows = pk::make_ragged_segments(S, begins.data_ptr<int64_t>(), lens.data_ptr<int64_t>());
  const pk::curve_device_out out{offsets.data_ptr<int64_t>(), tokens.data_ptr<int64_t>(), positions.data_ptr<int32_t>(),
                                 cumulative.data_ptr<float>(), sorted.data_ptr<float>()};
  pk::curve_set set;
  unsigned* bits = reinterpret_cast<unsigned*>(status.data_ptr<int32_t>());
  const pk::protect_policy protect{sinks, recent};
  size_t bytes = 0;
  check(pk::build_curves(nullptr, bytes, sc.data_ptr<float>(), rows, protect, C, out, set, bits, current_stream()),
        "curves");
  const at::Tensor ws = workspace(bytes, dev);
  check(pk::build_curves(ws.data_ptr(), bytes, sc.data_ptr<float>(), rows, protect, C, out, set, bits,
                         current_stream()),
        "curves");
  return {offsets, tokens, positions, cumulative, sorted, status};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> solve_cuda(
    const at::Tensor& offsets, const at::Tensor& tokens, const at::Tensor& cumulative, int64_t sinks, int64_t recent,
    const opt_tensor& problem_offsets, int64_t budget, double evict_ratio, int64_t count, const opt_tensor& ratios,
    const opt_tensor& counts, int64_t min_keep, int64_t max_keep, const opt_tensor& lo, const opt_tensor& hi) {
  const at::Device dev = offsets.device();
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor cum = cumulative.numel() > 0 ? cumulative : vec(0, at::kFloat, dev);
  pk::curve_set cs = curve_set_of(offsets, tokens, at::Tensor(), cum, sinks, recent);
  const int64_t S = cs.count;
  at::Tensor keep_alive[5];
  int64_t P = 1;
  const int64_t* poff = nullptr;
  if (problem_offsets.has_value() && problem_offsets->defined()) {
    PKV_REQUIRE(problem_offsets->dim() == 1 && problem_offsets->size(0) >= 1, "shape_mismatch",
                "problem_offsets must be (problems + 1,)");
    P = problem_offsets->size(0) - 1;
    poff = opt_array<int64_t>(problem_offsets, at::kLong, P + 1, dev, "problem_offsets", keep_alive[0]);
  }
  PKV_REQUIRE(budget >= 0 && budget <= 2, "bad_parameter", "unknown budget kind");
  pk::solve_budget b;
  b.kind = static_cast<pk::budget_kind>(budget);
  b.ratio = evict_ratio;
  b.count = count;
  b.ratios = opt_array<double>(ratios, at::kDouble, P, dev, "ratios", keep_alive[1]);
  b.counts = opt_array<int64_t>(counts, at::kLong, P, dev, "counts", keep_alive[2]);
  const pk::keep_bounds kb{min_keep, max_keep, opt_array<int64_t>(lo, at::kLong, S, dev, "lo", keep_alive[3]),
                           opt_array<int64_t>(hi, at::kLong, S, dev, "hi", keep_alive[4])};
  at::Tensor keep = vec(S, at::kLong, dev);
  at::Tensor thr = at::zeros({P}, at::TensorOptions().dtype(at::kFloat).device(dev));
  at::Tensor status = at::zeros({P}, at::TensorOptions().dtype(at::kInt).device(dev));
  size_t bytes = 0;
  check(pk::solve(nullptr, bytes, cs, P, poff, b, kb, keep.data_ptr<int64_t>(), thr.data_ptr<float>(),
                  status.data_ptr<int32_t>(), current_stream()),
        "solve");
  const at::Tensor ws = workspace(bytes, dev);
  check(pk::solve(ws.data_ptr(), bytes, cs, P, poff, b, kb, keep.data_ptr<int64_t>(), thr.data_ptr<float>(),
                  status.data_ptr<int32_t>(), current_stream()),
        "solve");
  return {keep, thr, status};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_cuda(const at::Tensor& offsets, const at::Tensor& tokens,
                                                           const at::Tensor& positions, int64_t sinks, int64_t recent,
                                                           const at::Tensor& keep) {
  const at::Device dev = offsets.device();
  const c10::cuda::CUDAGuard guard(dev);
  const pk::curve_set cs = curve_set_of(offsets, tokens, positions, at::Tensor(), sinks, recent);
  PKV_REQUIRE(keep.dim() == 1 && keep.size(0) == cs.count, "shape_mismatch", "keep must be (segments,)");
  check_device(keep, dev, "keep");
  const at::Tensor k = keep.to(at::kLong).contiguous();
  const int64_t S = cs.count, C = positions.size(0);
  at::Tensor sel = vec(S + 1, at::kLong, dev), idx = vec(C, at::kInt, dev);
  at::Tensor status = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(dev));
  size_t bytes = 0;
  check(pk::write_selection(nullptr, bytes, cs, k.data_ptr<int64_t>(), sel.data_ptr<int64_t>(),
                            idx.data_ptr<int32_t>(), C, status.data_ptr<int32_t>(), current_stream()),
        "select");
  const at::Tensor ws = workspace(bytes, dev);
  check(pk::write_selection(ws.data_ptr(), bytes, cs, k.data_ptr<int64_t>(), sel.data_ptr<int64_t>(),
                            idx.data_ptr<int32_t>(), C, status.data_ptr<int32_t>(), current_stream()),
        "select");
  return {sel, idx, status};
}

std::tuple<at::Tensor, at::Tensor> gather_inplace_cuda(at::TensorList keys, at::TensorList values,
                                                       const at::Tensor& sel_offsets, const at::Tensor& indices,
                                                       int64_t heads_grid, bool sequence_major, int64_t layout) {
  const pk::segment_grid g =
      check_gather(keys, values, sel_offsets, indices, heads_grid, sequence_major, layout, "keys");
  const at::Device dev = keys[0].device();
  const c10::cuda::CUDAGuard guard(dev);
  const auto i32 = at::TensorOptions().dtype(at::kInt).device(dev);
  at::Tensor lengths = at::zeros({g.count()}, i32), status = at::zeros({1}, i32), ok;
  const at::Tensor offsets = safe_offsets(sel_offsets, indices, ok);
  dispatch_kv(keys[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    cache_views<T> cv(keys, values, layout);
    const pk::selection sel{g.count(), offsets.data_ptr<int64_t>(), index_ptr(indices)};
    const pk::compact_outputs out{lengths.data_ptr<int32_t>(), nullptr, nullptr, status.data_ptr<int32_t>()};
    size_t bytes = 0;
    check(pk::compact_in_place(nullptr, bytes, cv.layers(g.layers), sel, g, out, pk::index_check::device, current_stream()), "gather_");
    const at::Tensor ws = workspace(bytes, dev);
    check(pk::compact_in_place(ws.data_ptr(), bytes, cv.layers(g.layers), sel, g, out, pk::index_check::device, current_stream()), "gather_");
    return 0;
  });
  report_bad_selection(status, ok);
  return {lengths, status};
}

std::tuple<at::Tensor, at::Tensor> gather_cuda(at::TensorList keys, at::TensorList values,
                                               const at::Tensor& sel_offsets, const at::Tensor& indices,
                                               at::TensorList out_keys, at::TensorList out_values, int64_t heads_grid,
                                               bool sequence_major, int64_t layout) {
  const pk::segment_grid g =
      check_gather(keys, values, sel_offsets, indices, heads_grid, sequence_major, layout, "keys");
  check_gather_dst(keys, values, out_keys, out_values, layout);
  const at::Device dev = keys[0].device();
  const c10::cuda::CUDAGuard guard(dev);
  const auto i32 = at::TensorOptions().dtype(at::kInt).device(dev);
  at::Tensor lengths = at::zeros({g.count()}, i32), status = at::zeros({1}, i32), ok;
  const at::Tensor offsets = safe_offsets(sel_offsets, indices, ok);
  dispatch_kv(keys[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    cache_views<T> src(keys, values, layout), dst(out_keys, out_values, layout);
    const pk::selection sel{g.count(), offsets.data_ptr<int64_t>(), index_ptr(indices)};
    const pk::compact_outputs out{lengths.data_ptr<int32_t>(), nullptr, nullptr, status.data_ptr<int32_t>()};
    size_t bytes = 0;
    check(pk::gather_kept(nullptr, bytes, src.layers(g.layers), dst.layers(g.layers), sel, g, out, pk::index_check::device, current_stream()),
          "gather");
    const at::Tensor ws = workspace(bytes, dev);
    check(pk::gather_kept(ws.data_ptr(), bytes, src.layers(g.layers), dst.layers(g.layers), sel, g, out, pk::index_check::device,
                          current_stream()),
          "gather");
    return 0;
  });
  report_bad_selection(status, ok);
  return {lengths, status};
}

}  // namespace pkv_torch
