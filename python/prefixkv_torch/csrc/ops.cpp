// prefixkv_torch: the op schemas (namespace `prefixkv` in the PyTorch dispatcher), their CPU kernels (prefixkv's
// host backend), the registration of the CUDA kernels (defined in *.cu, compiled only in CUDA builds) and a few
// Python helpers. Every op checks its inputs before it touches a tensor; bad input raises ValueError carrying
// prefixkv's reason ("prefixkv [reason] message").
#include <torch/extension.h>
#include <torch/library.h>

#include "pkv_common.h"
#include "pkv_ops.h"

#include <cstring>

namespace pkv_torch {
namespace {

// ---- compress_ ---------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> compress_cpu(
    at::TensorList keys, at::TensorList values, const opt_tensor& lengths, at::TensorList attention,
    at::TensorList queries, at::TensorList lse, const opt_tensor& scores, int64_t layout, int64_t q_heads,
    int64_t scorer, int64_t gran, int64_t alloc, int64_t budget, double evict_ratio, int64_t keep_tokens,
    at::ArrayRef<double> profile, int64_t sinks, int64_t recent, int64_t min_keep, int64_t max_keep,
    double window_scale, int64_t window_group, int64_t window_pool, int64_t window_pool_kernel, int64_t window_heads) {
  const compress_opts o = make_opts(layout, q_heads, scorer, gran, alloc, budget, evict_ratio, keep_tokens, profile,
                                    sinks, recent, min_keep, max_keep, window_scale, window_group, window_pool,
                                    window_pool_kernel, window_heads);
  const compress_call c = prepare_compress(keys, values, lengths, attention, queries, lse, scores, o);
  auto outs = compress_outputs_like(c, keys[0].device());
  dispatch_kv(keys[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto ptag) {
      using P = decltype(ptag);
      compress_views<T, P> v(c, o, keys, values, attention, queries, lse);
      v.args.out.lengths = std::get<0>(outs).data_ptr<int32_t>();
      v.args.out.status = std::get<1>(outs).data_ptr<int32_t>();
      v.args.out.threshold = std::get<2>(outs).data_ptr<float>();
      check(pk::compress_host(c.plan, v.args), "compress_");
    };
    if (c.p_type == at::kFloat)
      run(float{});
    else
      run(T{});
    return 0;
  });
  return outs;
}

// ---- curves ------------------------------------------------------------------------------------------------------

//! Lengths of score rows as int64 values on the host (N for every row when absent).
std::vector<int64_t> host_lengths(const opt_tensor& lengths, int64_t S, int64_t N) {
  std::vector<int64_t> lens(static_cast<size_t>(S), N);
  if (lengths.has_value() && lengths->defined()) {
    const at::Tensor l = lengths->to(at::kLong).contiguous();
    const int64_t* p = l.data_ptr<int64_t>();
    for (int64_t s = 0; s < S; ++s) {
      PKV_REQUIRE(p[s] >= 0 && p[s] <= N, "out_of_range", "a row length is outside [0, tokens]: ", p[s]);
      lens[static_cast<size_t>(s)] = p[s];
    }
  }
  return lens;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> curves_cpu(
    const at::Tensor& scores, const opt_tensor& lengths, int64_t sinks, int64_t recent) {
  check_score_rows(scores, lengths);
  PKV_REQUIRE(sinks >= 0 && recent >= 0, "bad_parameter", "sinks and recent must be >= 0");
  const at::Tensor sc = scores.stride(1) == 1 ? scores : scores.contiguous();
  const int64_t S = sc.size(0), N = sc.size(1), C = S * N;
  const std::vector<int64_t> lens = host_lengths(lengths, S, N);
  std::vector<int64_t> begins(static_cast<size_t>(S));
  for (int64_t s = 0; s < S; ++s) begins[static_cast<size_t>(s)] = s * sc.stride(0);
  const pk::segments rows = pk::make_ragged_segments(S, begins.data(), lens.data());
  pk::curve_buffers cb;
  check(pk::build_curves_host(sc.data_ptr<float>(), rows, pk::protect_policy{sinks, recent}, cb), "curves");
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  at::Tensor offsets = at::empty({S + 1}, i64), tokens = at::empty({S}, i64);
  at::Tensor positions = at::zeros({C}, at::TensorOptions().dtype(at::kInt));
  at::Tensor cumulative = at::zeros({C}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor sorted = at::zeros({C}, at::TensorOptions().dtype(at::kFloat));
  std::memcpy(offsets.data_ptr<int64_t>(), cb.offsets.data(), sizeof(int64_t) * cb.offsets.size());
  if (S > 0) std::memcpy(tokens.data_ptr<int64_t>(), cb.tokens.data(), sizeof(int64_t) * cb.tokens.size());
  const size_t n = cb.positions.size();
  if (n > 0) {
    std::memcpy(positions.data_ptr<int32_t>(), cb.positions.data(), sizeof(int32_t) * n);
    std::memcpy(cumulative.data_ptr<float>(), cb.cumulative.data(), sizeof(float) * n);
    std::memcpy(sorted.data_ptr<float>(), cb.sorted_scores.data(), sizeof(float) * n);
  }
  return {offsets, tokens, positions, cumulative, sorted, at::zeros({1}, at::TensorOptions().dtype(at::kInt))};
}

// ---- solve -------------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> solve_cpu(
    const at::Tensor& offsets, const at::Tensor& tokens, const at::Tensor& cumulative, int64_t sinks, int64_t recent,
    const opt_tensor& problem_offsets, int64_t budget, double evict_ratio, int64_t count, const opt_tensor& ratios,
    const opt_tensor& counts, int64_t min_keep, int64_t max_keep, const opt_tensor& lo, const opt_tensor& hi) {
  const pk::curve_set cs = curve_set_of(offsets, tokens, at::Tensor(), cumulative, sinks, recent);
  const int64_t S = cs.count;
  const at::Device dev = offsets.device();
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
  pk::keep_bounds kb{min_keep, max_keep, opt_array<int64_t>(lo, at::kLong, S, dev, "lo", keep_alive[3]),
                     opt_array<int64_t>(hi, at::kLong, S, dev, "hi", keep_alive[4])};
  at::Tensor keep = at::empty({S}, at::TensorOptions().dtype(at::kLong));
  at::Tensor thr = at::zeros({P}, at::TensorOptions().dtype(at::kFloat));
  check(pk::solve_host(cs, P, poff, b, kb, keep.data_ptr<int64_t>(), thr.data_ptr<float>()), "solve");
  return {keep, thr, at::zeros({P}, at::TensorOptions().dtype(at::kInt))};
}

// ---- select ------------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_cpu(const at::Tensor& offsets, const at::Tensor& tokens,
                                                          const at::Tensor& positions, int64_t sinks, int64_t recent,
                                                          const at::Tensor& keep) {
  const pk::curve_set cs = curve_set_of(offsets, tokens, positions, at::Tensor(), sinks, recent);
  PKV_REQUIRE(keep.dim() == 1 && keep.size(0) == cs.count, "shape_mismatch", "keep must be (segments,)");
  const at::Tensor k = keep.to(at::kLong).contiguous();
  const int64_t S = cs.count, C = positions.size(0);
  at::Tensor sel = at::empty({S + 1}, at::TensorOptions().dtype(at::kLong));
  at::Tensor idx = at::zeros({C}, at::TensorOptions().dtype(at::kInt));
  check(pk::write_selection_host(cs, k.data_ptr<int64_t>(), sel.data_ptr<int64_t>(), idx.data_ptr<int32_t>(), C),
        "select");
  return {sel, idx, at::zeros({1}, at::TensorOptions().dtype(at::kInt))};
}

// ---- gather ------------------------------------------------------------------------------------------------------

//! Host selections: offsets must start at 0, never decrease and stay within the index vector.
void check_host_selection(const at::Tensor& sel_offsets, const at::Tensor& indices) {
  const int64_t* o = sel_offsets.data_ptr<int64_t>();
  const int64_t S = sel_offsets.size(0) - 1;
  PKV_REQUIRE(o[0] == 0, "out_of_range", "selection offsets must start at 0");
  for (int64_t s = 0; s < S; ++s)
    PKV_REQUIRE(o[s + 1] >= o[s] && o[s + 1] <= indices.numel(), "out_of_range",
                "selection offsets must not decrease and must stay within the indices");
}

std::tuple<at::Tensor, at::Tensor> gather_inplace_cpu(at::TensorList keys, at::TensorList values,
                                                      const at::Tensor& sel_offsets, const at::Tensor& indices,
                                                      int64_t heads_grid, bool sequence_major, int64_t layout) {
  const pk::segment_grid g =
      check_gather(keys, values, sel_offsets, indices, heads_grid, sequence_major, layout, "keys");
  check_host_selection(sel_offsets, indices);
  at::Tensor lengths = at::empty({g.count()}, at::TensorOptions().dtype(at::kInt));
  at::Tensor status = at::zeros({1}, at::TensorOptions().dtype(at::kInt));
  dispatch_kv(keys[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    cache_views<T> cv(keys, values, layout);
    const pk::selection sel{g.count(), sel_offsets.data_ptr<int64_t>(), index_ptr(indices)};
    const pk::compact_outputs out{lengths.data_ptr<int32_t>(), nullptr, nullptr, status.data_ptr<int32_t>()};
    check(pk::compact_in_place_host(cv.layers(g.layers), sel, g, out), "gather_");
    return 0;
  });
  return {lengths, status};
}

std::tuple<at::Tensor, at::Tensor> gather_cpu(at::TensorList keys, at::TensorList values,
                                              const at::Tensor& sel_offsets, const at::Tensor& indices,
                                              at::TensorList out_keys, at::TensorList out_values, int64_t heads_grid,
                                              bool sequence_major, int64_t layout) {
  const pk::segment_grid g =
      check_gather(keys, values, sel_offsets, indices, heads_grid, sequence_major, layout, "keys");
  check_gather_dst(keys, values, out_keys, out_values, layout);
  check_host_selection(sel_offsets, indices);
  at::Tensor lengths = at::empty({g.count()}, at::TensorOptions().dtype(at::kInt));
  at::Tensor status = at::zeros({1}, at::TensorOptions().dtype(at::kInt));
  dispatch_kv(keys[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    cache_views<T> src(keys, values, layout), dst(out_keys, out_values, layout);
    const pk::selection sel{g.count(), sel_offsets.data_ptr<int64_t>(), index_ptr(indices)};
    const pk::compact_outputs out{lengths.data_ptr<int32_t>(), nullptr, nullptr, status.data_ptr<int32_t>()};
    check(pk::gather_kept_host(src.layers(g.layers), dst.layers(g.layers), sel, g, out), "gather");
    return 0;
  });
  return {lengths, status};
}

}  // namespace
}  // namespace pkv_torch

TORCH_LIBRARY(prefixkv, m) {
  m.def(
      "compress_(Tensor(a!)[] keys, Tensor(b!)[] values, Tensor? lengths, Tensor[] attention, Tensor[] queries, "
      "Tensor[] lse, Tensor? scores, int layout, int q_heads, int scorer, int granularity, int allocation, int budget, "
      "float evict_ratio, int keep_tokens, float[] profile, int sinks, int recent, int min_keep, int max_keep, "
      "float window_scale, int window_group, int window_pool, int window_pool_kernel, int window_heads) "
      "-> (Tensor lengths, Tensor status, Tensor threshold)");
  m.def(
      "curves(Tensor scores, Tensor? lengths, int sinks, int recent) -> (Tensor offsets, Tensor tokens, "
      "Tensor positions, Tensor cumulative, Tensor sorted_scores, Tensor status)");
  m.def(
      "solve(Tensor offsets, Tensor tokens, Tensor cumulative, int sinks, int recent, Tensor? problem_offsets, "
      "int budget, float evict_ratio, int count, Tensor? ratios, Tensor? counts, int min_keep, int max_keep, "
      "Tensor? lo, Tensor? hi) -> (Tensor keep, Tensor threshold, Tensor status)");
  m.def(
      "select(Tensor offsets, Tensor tokens, Tensor positions, int sinks, int recent, Tensor keep) "
      "-> (Tensor sel_offsets, Tensor indices, Tensor status)");
  m.def(
      "gather_(Tensor(a!)[] keys, Tensor(b!)[] values, Tensor sel_offsets, Tensor indices, int heads_grid, "
      "bool sequence_major, int layout) -> (Tensor lengths, Tensor status)");
  m.def(
      "gather(Tensor[] keys, Tensor[] values, Tensor sel_offsets, Tensor indices, Tensor(a!)[] out_keys, "
      "Tensor(b!)[] out_values, int heads_grid, bool sequence_major, int layout) -> (Tensor lengths, Tensor status)");
}

TORCH_LIBRARY_IMPL(prefixkv, CPU, m) {
  m.impl("compress_", &pkv_torch::compress_cpu);
  m.impl("curves", &pkv_torch::curves_cpu);
  m.impl("solve", &pkv_torch::solve_cpu);
  m.impl("select", &pkv_torch::select_cpu);
  m.impl("gather_", &pkv_torch::gather_inplace_cpu);
  m.impl("gather", &pkv_torch::gather_cpu);
}

#ifdef PKV_TORCH_CUDA
TORCH_LIBRARY_IMPL(prefixkv, CUDA, m) {
  m.impl("compress_", &pkv_torch::compress_cuda);
  m.impl("curves", &pkv_torch::curves_cuda);
  m.impl("solve", &pkv_torch::solve_cuda);
  m.impl("select", &pkv_torch::select_cuda);
  m.impl("gather_", &pkv_torch::gather_inplace_cuda);
  m.impl("gather", &pkv_torch::gather_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "prefixkv PyTorch ops (registered under torch.ops.prefixkv)";
  m.def("reason_name", [](int r) { return std::string(prefixkv::to_string(static_cast<prefixkv::reason>(r))); },
        "The name of a prefixkv::reason value (as in a status tensor).");
  m.def("compress_message", [](int r) { return std::string(prefixkv::detail::compress_message(static_cast<prefixkv::reason>(r))); },
        "The compressor's message for a chain status.");
  m.def("has_cuda", []() {
#ifdef PKV_TORCH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("version", []() { return PREFIXKV_VERSION; });
}
