//! \file prefixkv/dist/compress_dist.hpp
//! The compressor on a sharded model: tensor parallelism (the kv heads split over ranks), pipeline parallelism (the
//! layers split over ranks), or both. Every rank calls the compressor on its own shard with the same plan (made from
//! the whole model's configuration) and a `compress_shard` that names its communicators and its layers; the ranks
//! exchange a few kilobytes of integer counts (no K/V, no float reduction), so that every rank takes the same
//! decisions as the single-GPU compressor on the unsharded model and compacts its own part of the cache. The result
//! is bit for bit the unsharded one: the same budgets, the same kept tokens, the same bytes in every shard, the same
//! outputs on every rank (see docs/multigpu.md for what is exchanged and why it is exact).
//!
//! \code
//! prefixkv::compress_plan plan;                       // the WHOLE model: 32 layers, 8 kv heads, ...
//! PREFIXKV_TRY(prefixkv::make_plan(cfg, plan));
//! prefixkv::compress_shard shard;
//! shard.tp = prefixkv::make_communicator(tp_comm);    // ranks that share these layers, kv heads split evenly
//! shard.pp = prefixkv::make_communicator(pp_comm);    // ranks that share these kv heads, layers split
//! shard.layer_begin = 16;                             // this pipeline stage holds layers [16, 32)
//! shard.layer_count = 16;
//! args.cache = {k_views, v_views, nullptr, nullptr, 16};   // this rank's 16 layers, kv_heads / tp heads each
//! PREFIXKV_TRY(prefixkv::compress_host(plan, args, shard));        // host memory, host_comm
//! // CUDA: prefixkv::compress(d_temp, bytes, plan, args, shard, stream) with an NCCL communicator (compress_dist.cuh)
//! \endcode
//!
//! What a rank passes (everything else as in compress.hpp):
//! * `args.cache` (and `args.dst`): its `layer_count` layers, each with kv_heads / tp kv heads: kv heads
//!   [tp_rank * kv_heads / tp, (tp_rank + 1) * kv_heads / tp) of the model;
//! * `args.lengths`: the WHOLE model's lengths, the same array on every rank: (batch), or (layers, batch[, kv_heads])
//!   with `lengths_per_segment` (every layer's lengths enter the budgets);
//! * the scorer's inputs for its layers and heads: `attention[li]` (batch, q_heads / tp, query, key) and `queries[li]`
//!   (batch, q_heads / tp, window, dim) for li < layer_count; caller `scores` as rows (layer_count, batch[, kv_heads
//!   / tp], score_stride) — with layer granularity under tensor parallelism, the layer rows are the same on every
//!   rank of the tensor-parallel group;
//! * `args.out`: the WHOLE model's outputs — every rank writes all of them, equal on every rank: lengths and
//!   cu_seqlens of every layer (a later call's per-segment lengths), pages_in_use, thresholds, status.
//! Every rank of both groups must make the call (with the same batch), in the same order as its other collectives.
//!
//! Limits under tensor parallelism: kv_heads must be a multiple of the tensor-parallel ranks (no replicated kv
//! heads), and the attention scorer needs `granularity::head` (its layer rows add every q head of a layer in one
//! defined order that head shards cannot reproduce; the window and key-norm scorers reduce per kv head first and
//! are exact).
#pragma once

#include "../compress/compress.hpp"
#include "communicator.hpp"

#include <algorithm>
#include <memory>
#include <vector>

PREFIXKV_NAMESPACE_BEGIN

//! This rank's place in a sharded model.
struct compress_shard {
  //! The ranks that hold the same layers as this one and split the kv heads evenly (tensor parallelism), this rank
  //! holding the `tp.rank`-th slice. Empty: this rank holds every kv head.
  communicator tp{};
  //! The ranks that hold the same kv heads as this one and split the layers (pipeline parallelism), in layer order:
  //! rank 0 holds the first layers. Empty: this rank holds every layer.
  communicator pp{};
  int64_t layer_begin = 0;  //!< the first layer this rank holds (a layer index of the whole model)
  int64_t layer_count = 0;  //!< the layers it holds (0: all from layer_begin to the model's last)
};

//! What one sharded call exchanges (CUDA backend), per rank: payload bytes of each collective (NCCL moves about
//! 2 (n - 1) / n times an all-reduce's payload over its n ranks, and receives (n - 1) payloads of an all-gather).
//! Sizes follow from the plan, the shard and the batch alone. See docs/multigpu.md.
struct compress_traffic {
  int64_t head_rows = 0;         //!< the tensor-parallel all-gather of per-kv-head score rows (this rank's part):
                                 //!< layer rows under tensor parallelism with the window / key-norm scorer, else 0
  int64_t histogram = 0;         //!< each of the 4 radix rounds' all-reduces (summed over the tensor- and pipeline-
                                 //!< parallel calls of the round; 0: no rank shares a problem)
  int64_t tally = 0;             //!< the final all-reduces: (less, equal) per segment and one key per problem
  int64_t records = 0;           //!< the status all-gathers (64 bytes each: one per present communicator)
  int collectives = 0;           //!< collective calls per step on this rank
  //! Payload bytes of all collectives of one call.
  int64_t total() const { return head_rows + 4 * histogram + tally + records; }
};

namespace detail {

inline constexpr int dist_radix_rounds = 4;   // 8-bit digits of the 32-bit entry keys
inline constexpr int dist_radix_bins = 256;

//! A rank's view of one sharded call. Segments are numbered sequence-major, locally (this rank's layers and heads:
//! id = (b * lc + li) * Hl + hl) and globally (the whole model, as the single-GPU compressor: (b * L + l) * H + h).
struct dist_geometry {
  int64_t L = 0, l0 = 0, lc = 0;   // the model's layers; this rank's first layer and layer count
  int64_t B = 0;                   // sequences of the call
  int64_t Hk = 0, hc = 0, h0 = 0;  // the model's kv heads; this rank's count and first
  int64_t H = 1, Hl = 1;           // segments per (layer, sequence): globally (1 or Hk) and locally (1 or hc)
  int64_t T = 0;                   // floats per score row in the workspace (and in the per-head exchange)
  int64_t capacity = 0;            // this rank's token capacity
  bool prefix = true;              // one problem per sequence (allocation::prefix), else per (sequence, layer)
  bool head_rows = false;          // layer rows under tensor parallelism: per-kv-head rows exchanged, reduced here
  int tp_size = 1, tp_rank = 0, pp_size = 1, pp_rank = 0;

  PREFIXKV_HOST_DEVICE int64_t local_segments() const { return lc * B * Hl; }
  PREFIXKV_HOST_DEVICE int64_t global_segments() const { return L * B * H; }
  PREFIXKV_HOST_DEVICE int64_t problems() const { return prefix ? B : B * L; }
  //! Problems this rank holds segments of (the radix histograms): every sequence, or (sequence, own layer).
  PREFIXKV_HOST_DEVICE int64_t local_problems() const { return prefix ? B : B * lc; }
  PREFIXKV_HOST_DEVICE segment_grid local_grid() const { return segment_grid{lc, B, Hl, true}; }
  PREFIXKV_HOST_DEVICE int64_t global_id(int64_t l, int64_t b, int64_t h) const { return (b * L + l) * H + h; }
  PREFIXKV_HOST_DEVICE int64_t global_of_local(int64_t s) const {
    const int64_t hl = s % Hl, li = (s / Hl) % lc, b = s / (Hl * lc);
    return global_id(l0 + li, b, H == 1 ? 0 : h0 + hl);
  }
  PREFIXKV_HOST_DEVICE int64_t local_problem_of(int64_t s) const {
    const int64_t li = (s / Hl) % lc, b = s / (Hl * lc);
    return prefix ? b : b * lc + li;
  }
  PREFIXKV_HOST_DEVICE int64_t problem_of_local(int64_t q) const { return prefix ? q : (q / lc) * L + l0 + q % lc; }
  //! Global segments of problem p: [p * per_problem, (p + 1) * per_problem).
  PREFIXKV_HOST_DEVICE int64_t per_problem() const { return prefix ? L * H : H; }
  //! Whether this rank writes problem p's threshold key into the exchange (the holder of its first segment; with
  //! head granularity the tensor-parallel rank holding kv head 0).
  PREFIXKV_HOST_DEVICE bool owns_problem(int64_t p) const {
    const int64_t l = prefix ? 0 : p % L;
    return l >= l0 && l < l0 + lc && (H == 1 || h0 == 0);
  }
  //! Words exchanged by the final all-reduce: (less, equal) per global segment, then threshold key + 1 per problem.
  PREFIXKV_HOST_DEVICE int64_t tally_words() const { return 2 * global_segments() + problems(); }
};

//! Token count of segment (l, b, h) of the whole model from the caller's lengths (h < H, the global segment heads).
PREFIXKV_HOST_DEVICE int64_t dist_length(const int32_t* lengths, bool per_segment, int64_t B, int64_t H, int64_t l,
                                         int64_t b, int64_t h) {
  return per_segment ? lengths[(l * B + b) * H + h] : lengths[b];
}

//! Candidates, protected tokens and clipped bounds of a segment of n tokens (n clamped to [0, capacity]).
struct dist_segment {
  int64_t c = 0, prot = 0, lo = 0, hi = 0;
};
PREFIXKV_HOST_DEVICE dist_segment dist_segment_of(const compress_config& cfg, int64_t n) {
  dist_segment d;
  d.c = candidate_count(n, cfg.protect);
  d.prot = n - d.c;
  segment_bounds(keep_bounds{cfg.min_keep, cfg.max_keep, nullptr, nullptr}, 0, d.c, d.lo, d.hi);
  return d;
}

//! The key at which digit d of round `round` is tested: the known top 8 * round bits `known`, then d, then all ones.
//! count(key <= this) over the problem is non-decreasing in d, and the threshold's digit is the smallest d whose count
//! reaches R.
PREFIXKV_HOST_DEVICE int64_t dist_radix_key(int64_t known, int round, int64_t d) {
  const int shift = 24 - 8 * round;
  return (((known << 8) | d) << shift) | ((int64_t(1) << shift) - 1);
}

//! The digit picked from a histogram of counts (count(key <= dist_radix_key(known, round, d)) for every d).
PREFIXKV_HOST_DEVICE int64_t dist_radix_pick(const int64_t* hist, int64_t R) {
  for (int d = 0; d < dist_radix_bins; ++d)
    if (hist[d] >= R) return d;
  return dist_radix_bins - 1;  // only when the inputs are bad (the chain stops anyway)
}

//! One rank's status, exchanged before anything moves. `why[i]` holds the smallest reason met in stage i: 0 the
//! lengths, page ids and budgets; 1 the scores and curves (host backend); 2 the selection; 3 the compaction's checks.
//! `bits`: the device scorers' and curve builders' status bits (the CUDA backend's stage 1). The layout fields let
//! every rank check that the shards tile the model.
struct dist_record {
  int32_t why[4] = {0, 0, 0, 0};
  int32_t bits = 0;
  int32_t l0 = 0, lc = 0;  // layers held (after a tensor-parallel merge: the group's)
  int32_t batch = 0;
  int32_t rows = 0;        // score row length the ranks exchange (host backend), 0 on the CUDA backend
  int32_t pad[7] = {};
};
static_assert(sizeof(dist_record) == 64, "dist_record: 16 words");

//! Merge the records of a tensor-parallel group (same layers: `pipeline == false`) or of the pipeline stages in
//! order (layers tile [0, L): `pipeline == true`). Mismatches are reason::shape_mismatch in stage 0.
PREFIXKV_HOST_DEVICE dist_record dist_merge(const dist_record* r, int n, bool pipeline, int64_t L) {
  dist_record m = r[0];
  reason layout = reason::none;
  int64_t next = 0;
  for (int i = 0; i < n; ++i) {
    if (i > 0) {
      for (int k = 0; k < 4; ++k)
        m.why[k] = static_cast<int32_t>(compress_min_reason(static_cast<reason>(m.why[k]), static_cast<reason>(r[i].why[k])));
      m.bits |= r[i].bits;
      if (r[i].batch != r[0].batch || r[i].rows != r[0].rows) layout = reason::shape_mismatch;
      if (!pipeline && (r[i].l0 != r[0].l0 || r[i].lc != r[0].lc)) layout = reason::shape_mismatch;
    }
    if (pipeline) {
      if (r[i].l0 != next) layout = reason::shape_mismatch;
      next = int64_t(r[i].l0) + r[i].lc;
    }
  }
  if (pipeline) {
    if (next != L) layout = reason::shape_mismatch;
    m.l0 = 0;
    m.lc = static_cast<int32_t>(L);
  }
  m.why[0] = static_cast<int32_t>(compress_min_reason(static_cast<reason>(m.why[0]), layout));
  return m;
}

//! The chain's reason from a merged record, in chain order: stage 0, then stage 1 (with the device's status bits,
//! `bits_reason(bits)`), the selection, the compaction's checks.
template <class BitsReason>
PREFIXKV_HOST_DEVICE reason dist_chain_reason(const dist_record& m, BitsReason bits_reason) {
  if (m.why[0]) return static_cast<reason>(m.why[0]);
  reason r1 = static_cast<reason>(m.why[1]);
  if (r1 == reason::none && m.bits) r1 = bits_reason(static_cast<unsigned>(m.bits));
  if (r1 != reason::none) return r1;
  if (m.why[2]) return static_cast<reason>(m.why[2]);
  return static_cast<reason>(m.why[3]);
}

//! Where the sums of a call go: histograms of sequence-wide problems need every rank holding a distinct segment
//! (layer rows: the pipeline stages, the tensor-parallel ranks holding the same rows; head rows: every rank);
//! per-layer problems live inside one stage (head rows: summed over the tensor-parallel group; layer rows: one rank
//! alone holds them).
enum class dist_scope : int { none = 0, pp = 1, tp = 2, all = 3 };
inline dist_scope dist_hist_scope(const dist_geometry& g) {
  if (g.prefix) return g.H == 1 ? dist_scope::pp : dist_scope::all;
  return g.H == 1 ? dist_scope::none : dist_scope::tp;
}
inline dist_scope dist_tally_scope(const dist_geometry& g) { return g.H == 1 ? dist_scope::pp : dist_scope::all; }

//! In-place integer sum over the scope's communicators (each an exact sum, so the order does not matter).
inline cudaError_t dist_sum(const compress_shard& sh, dist_scope scope, int64_t* data, int64_t count,
                            cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  if ((scope == dist_scope::tp || scope == dist_scope::all) && sh.tp.present())
    PREFIXKV_TRY(sh.tp.all_reduce_sum(data, data, static_cast<size_t>(count), stream));
  if ((scope == dist_scope::pp || scope == dist_scope::all) && sh.pp.present())
    PREFIXKV_TRY(sh.pp.all_reduce_sum(data, data, static_cast<size_t>(count), stream));
  return cudaSuccess;
}

//! Host-visible checks of a sharded call and its geometry (no contents read). `local` receives the plan of this
//! rank's shard (its layers and heads), against which the arguments are checked as for the single-GPU compressor.
inline cudaError_t dist_prepare(const compress_plan& pl, const compress_shard& sh, comm_memory memory,
                                dist_geometry& g, compress_plan& local) {
  if (!pl.valid) return fail(reason::bad_parameter, "compress: the plan was not made by make_plan");
  PREFIXKV_TRY(check_communicator(sh.tp, memory, "compress: shard.tp is not a valid communicator"));
  PREFIXKV_TRY(check_communicator(sh.pp, memory, "compress: shard.pp is not a valid communicator"));
  const compress_config& c = pl.cfg;
  const int tp = sh.tp.ranks();
  if (c.kv_heads % tp != 0)
    return fail(reason::unsupported, "compress: kv_heads must be a multiple of the tensor-parallel ranks");
  const int64_t L = c.layers, l0 = sh.layer_begin;
  if (l0 < 0 || l0 >= L) return fail(reason::out_of_range, "compress: shard.layer_begin outside the model's layers");
  const int64_t lc = sh.layer_count == 0 ? L - l0 : sh.layer_count;
  if (lc < 1 || lc > L - l0) return fail(reason::out_of_range, "compress: shard.layer_count outside the model's layers");
  if (!sh.pp.present() && (l0 != 0 || lc != L))
    return fail(reason::shape_mismatch, "compress: without a pipeline communicator a rank holds every layer");
  if (c.scorer == scorer_kind::attention && c.gran == granularity::layer && tp > 1)
    return fail(reason::unsupported,
                "compress: the attention scorer's layer rows add all q heads of a layer in one order that kv-head "
                "shards cannot reproduce; use granularity::head (or the window / key-norm scorer) under tensor "
                "parallelism");
  compress_config lcfg = c;
  lcfg.layers = lc;
  lcfg.kv_heads = c.kv_heads / tp;
  lcfg.q_heads = c.q_heads / tp;
  lcfg.profile = c.alloc == allocation::profile ? pl.profile + l0 : nullptr;
  PREFIXKV_TRY(make_plan(lcfg, local));
  g = dist_geometry{};
  g.L = L;
  g.l0 = l0;
  g.lc = lc;
  g.Hk = c.kv_heads;
  g.hc = c.kv_heads / tp;
  g.tp_size = tp;
  g.tp_rank = sh.tp.index();
  g.pp_size = sh.pp.ranks();
  g.pp_rank = sh.pp.index();
  g.h0 = g.tp_rank * g.hc;
  g.H = pl.seg_heads;
  g.Hl = local.seg_heads;
  g.prefix = c.alloc == allocation::prefix;
  g.head_rows = tp > 1 && c.gran == granularity::layer &&
                (c.scorer == scorer_kind::window || c.scorer == scorer_kind::key_norm);
  g.T = c.max_tokens;
  return cudaSuccess;
}

//! Exchange a record over the tensor-parallel group, then over the pipeline; returns the merged record.
template <class Gather>
inline cudaError_t dist_exchange_records(const compress_shard& sh, int64_t L, dist_record& rec, Gather gather) {
  if (sh.tp.present()) {
    dist_record merged;
    PREFIXKV_TRY(gather(sh.tp, rec, merged, false));
    rec = merged;
  }
  if (sh.pp.present()) {
    dist_record merged;
    PREFIXKV_TRY(gather(sh.pp, rec, merged, true));
    rec = merged;
  } else {
    const dist_record one = rec;
    rec = dist_merge(&one, 1, true, L);  // a single stage must hold every layer
  }
  return cudaSuccess;
}

//! The head reduction of layer rows under tensor parallelism: the window scorer's `heads` reduction, the key norm's
//! mean, over kv heads 0..Hk-1 in order, exactly as the single-GPU scorers reduce (one fp32 accumulator from 0 or
//! -inf, then one division). `gathered` holds the per-head rows of every rank: rank r's block at r * lc * B * hc * T,
//! row ((b * lc + li) * hc + hl) * T. Returns the value of key t of layer row s = b * lc + li.
PREFIXKV_HOST_DEVICE float dist_head_value(const dist_geometry& g, head_reduce op, const float* gathered, int64_t s,
                                           int64_t t) {
  const int64_t block = g.lc * g.B * g.hc * g.T;
  float v = op == head_reduce::max ? -INFINITY : 0.0f;
  for (int64_t kh = 0; kh < g.Hk; ++kh) {
    const int64_t r = kh / g.hc, hl = kh % g.hc;
    const float x = gathered[r * block + (s * g.hc + hl) * g.T + t];
#if defined(__CUDA_ARCH__)
    v = op == head_reduce::max ? fmaxf(v, x) : v + x;
#else
    v = op == head_reduce::max ? std::fmax(v, x) : v + x;
#endif
  }
  return op == head_reduce::max ? v : v / static_cast<float>(g.Hk);
}

//! Host: every layer row of this rank from the gathered head rows (rows[s * T + t] for t < lens[s]).
inline void dist_reduce_heads_host(const dist_geometry& g, head_reduce op, const float* gathered,
                                   const std::vector<int64_t>& lens, float* rows) {
  for (int64_t s = 0; s < g.B * g.lc; ++s)
    for (int64_t t = 0; t < lens[static_cast<size_t>(s)]; ++t) rows[s * g.T + t] = dist_head_value(g, op, gathered, s, t);
}

//! The traffic of one call of the CUDA backend with `batch` sequences (collectives on present communicators only).
inline cudaError_t dist_traffic(const compress_plan& pl, const compress_shard& sh, int64_t batch,
                                compress_traffic& out) {
  dist_geometry g;
  compress_plan local;
  PREFIXKV_TRY(dist_prepare(pl, sh, sh.tp.present() || sh.pp.present()
                                        ? (sh.tp.present() ? sh.tp.memory : sh.pp.memory)
                                        : comm_memory::device, g, local));
  if (batch < 0 || batch > pl.cfg.max_batch)
    return fail(reason::out_of_range, "compress: batch outside [0, the plan's max_batch]");
  g.B = batch;
  compress_traffic t;
  auto calls = [&](dist_scope s) {
    return ((s == dist_scope::tp || s == dist_scope::all) && sh.tp.present() ? 1 : 0) +
           ((s == dist_scope::pp || s == dist_scope::all) && sh.pp.present() ? 1 : 0);
  };
  if (g.head_rows) {
    t.head_rows = g.lc * g.B * g.hc * g.T * int64_t(sizeof(float));
    t.collectives += 1;
  }
  const int hc = calls(dist_hist_scope(g)), tc = calls(dist_tally_scope(g));
  t.histogram = hc && g.local_problems() > 0 ? g.local_problems() * dist_radix_bins * int64_t(sizeof(int64_t)) : 0;
  t.tally = tc && g.tally_words() > 0 ? g.tally_words() * int64_t(sizeof(int64_t)) : 0;
  const int rc = (sh.tp.present() ? 1 : 0) + (sh.pp.present() ? 1 : 0);
  t.histogram *= hc;  // one all-reduce per present communicator of the scope
  t.tally *= tc;
  t.records = rc * int64_t(sizeof(dist_record));
  t.collectives += (t.histogram ? 4 * hc : 0) + (t.tally ? tc : 0) + rc;
  out = t;
  return cudaSuccess;
}

//! The sharded compressor reads one block table shared by the layers (the prologue checks the pages of every
//! layer's tokens through it): per-layer block tables are refused.
template <class Cache, class P, class Dst>
inline cudaError_t dist_check_tables(const compress_plan& pl, const compress_args<Cache, P, Dst>& a) {
  if (per_layer_tables(a.cache) || (!pl.cfg.in_place && per_layer_tables(a.dst)))
    return fail(reason::unsupported, "compress_dist: paged caches need one block table shared by the layers");
  return cudaSuccess;
}

template <class Cache, class P, class Dst>
inline cudaError_t compress_host_dist_run(const compress_plan& pl, const compress_args<Cache, P, Dst>& a,
                                          const compress_shard& sh) {
  dist_geometry g;
  compress_plan local;
  PREFIXKV_TRY(dist_prepare(pl, sh, comm_memory::host, g, local));
  const compress_config& c = pl.cfg;
  auto gather_model = [&](const communicator& cm, const dist_record& mine, dist_record& merged, bool pipeline) {
    std::vector<dist_record> all(static_cast<size_t>(cm.size));
    PREFIXKV_TRY(cm.all_gather(&mine, all.data(), sizeof(dist_record), nullptr));
    merged = dist_merge(all.data(), cm.size, pipeline, g.L);
    return cudaSuccess;
  };

  // ---- 1. the arguments (host-visible), agreed on by every rank before anything else is exchanged
  int64_t batch = 0, capacity = 0;
  cudaError_t arg = compress_check_args(local, a, -1, batch, capacity);
  if (arg == cudaSuccess) arg = dist_check_tables(pl, a);
  const error_info arg_info = last_error();
  g.B = arg == cudaSuccess ? batch : 0;
  g.capacity = capacity;
  const int64_t H = g.H, B = g.B, L = g.L;
  const int64_t h_in = a.lengths_per_segment ? H : 1;
  auto n_in = [&](int64_t l, int64_t b, int64_t h) {
    return dist_length(a.lengths, a.lengths_per_segment, B, h_in, l, b, a.lengths_per_segment ? h : 0);
  };
  auto n_cl = [&](int64_t l, int64_t b, int64_t h) {
    const int64_t n = n_in(l, b, h);
    return n < 0 ? int64_t(0) : (n > capacity ? capacity : n);
  };
  // the score rows' length: the longest segment of the model (every rank reads the same lengths)
  int64_t rows_len = 0;
  if (arg == cudaSuccess)
    for (int64_t l = 0; l < L; ++l)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h) rows_len = std::max(rows_len, std::min(std::max<int64_t>(n_in(l, b, h), 0), c.max_tokens));
  {
    dist_record rec;
    rec.why[0] = static_cast<int32_t>(arg == cudaSuccess ? reason::none : (arg_info.why == reason::none ? reason::cuda_runtime : arg_info.why));
    rec.l0 = static_cast<int32_t>(g.l0);
    rec.lc = static_cast<int32_t>(g.lc);
    rec.batch = static_cast<int32_t>(batch);
    rec.rows = static_cast<int32_t>(rows_len);
    PREFIXKV_TRY(dist_exchange_records(sh, L, rec, gather_model));
    if (arg != cudaSuccess) return fail(arg_info.why, arg_info.message, arg);
    if (rec.why[0] != 0)
      return fail(static_cast<reason>(rec.why[0]),
                  "compress: a rank of the group rejected its arguments, or the shards do not tile the model (same "
                  "batch and lengths everywhere, layers in pipeline order)");
  }
  g.T = rows_len;
  const int64_t S = g.local_segments(), SG = g.global_segments(), NP = g.problems(), NQ = g.local_problems();
  const segment_grid grid = g.local_grid();
  const bool caller_scores = c.scorer == scorer_kind::scores;

  // ---- 2. lengths, pages and budgets (stage 0)
  reason r0 = reason::none, r1 = reason::none, r2 = reason::none, r3 = reason::none;
  const char* msg1 = nullptr;
  std::vector<int64_t> lens(static_cast<size_t>(S)), begins(static_cast<size_t>(S));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t li = 0; li < g.lc; ++li)
      for (int64_t hl = 0; hl < g.Hl; ++hl) {
        const int64_t l = g.l0 + li, s = grid.id(li, b, hl), n = n_in(l, b, H == 1 ? 0 : g.h0 + hl);
        const int64_t w = c.scorer == scorer_kind::window ? a.queries[li].tokens : 0;
        const reason r = compress_length_reason(n, capacity, c.max_tokens, w, a.score_stride, caller_scores);
        r0 = compress_min_reason(r0, r);
        lens[static_cast<size_t>(s)] = r == reason::none ? n : 0;
        begins[static_cast<size_t>(s)] = caller_scores ? ((li * B + b) * g.Hl + hl) * a.score_stride : s * g.T;
      }
  for (int64_t l = 0; l < L; ++l)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t n = n_in(l, b, h);
        if (n < 0 || n > capacity) r0 = compress_min_reason(r0, reason::out_of_range);
      }
  if constexpr (is_paged_cache<Cache>::value) {
    const auto& v = a.cache.k[0];
    for (int64_t b = 0; b < B; ++b) {
      int64_t nmax = 0;
      for (int64_t l = 0; l < L; ++l)
        for (int64_t h = 0; h < H; ++h) nmax = std::max(nmax, n_cl(l, b, h));
      for (int64_t blk = 0; blk * v.page_size < nmax; ++blk) {
        const int32_t page = v.block_table[b * v.block_table_stride + blk];
        if (page < 0 || page >= v.num_pages) r0 = compress_min_reason(r0, reason::out_of_range);
      }
    }
  }
  std::vector<int64_t> counts(static_cast<size_t>(NP)), R(static_cast<size_t>(NP)), layer_counts(static_cast<size_t>(L));
  for (int64_t b = 0; b < B; ++b) {
    const reason r = sequence_budgets(pl, [&](int64_t l, int64_t h) { return n_cl(l, b, h); },
                                      g.prefix ? counts.data() + b : layer_counts.data());
    if (!g.prefix)
      for (int64_t l = 0; l < L; ++l) counts[static_cast<size_t>(b * L + l)] = layer_counts[static_cast<size_t>(l)];
    r0 = compress_min_reason(r0, r);
  }
  for (int64_t p = 0; p < NP; ++p) {
    int64_t lo = 0;
    for (int64_t s = p * g.per_problem(); s < (p + 1) * g.per_problem(); ++s) {
      const int64_t h = s % H, l = (s / H) % L, b = s / (H * L);
      lo += dist_segment_of(c, n_cl(l, b, h)).lo;
    }
    R[static_cast<size_t>(p)] = counts[static_cast<size_t>(p)] - lo;
  }
  bool ok = r0 == reason::none;

  // ---- 3. scores (stage 1): this rank's segments; layer rows under tensor parallelism from every rank's head rows
  const segments rows = make_ragged_segments(S, begins.data(), lens.data());
  std::vector<float> own;
  const float* scores = a.scores;
  if (!caller_scores) {
    own.assign(static_cast<size_t>(S * g.T), 0.0f);
    scores = own.data();
  } else if (ok) {
    for (int64_t s = 0; s < S && r1 == reason::none; ++s)
      for (int64_t t = 0; t < lens[static_cast<size_t>(s)]; ++t) {
        const float x = a.scores[begins[static_cast<size_t>(s)] + t];
        if (!std::isfinite(x)) r1 = reason::nonfinite_input;
        else if (x < 0.0f && r1 == reason::none) r1 = reason::negative_input;
      }
    if (r1 != reason::none) ok = false;
  }
  auto scorer_failed = [&](cudaError_t e) {
    if (e == cudaSuccess) return;
    const error_info info = last_error();
    r1 = info.why == reason::none ? reason::cuda_runtime : info.why;
    msg1 = info.message;
    ok = false;
  };
  if (g.head_rows) {
    const int64_t block = g.lc * B * g.hc * g.T;
    std::vector<float> gathered(static_cast<size_t>(g.tp_size * block), 0.0f);
    float* mine = gathered.data() + g.tp_rank * block;
    const segment_grid hgrid{g.lc, B, g.hc, true};
    std::vector<int64_t> hb(static_cast<size_t>(g.lc * B * g.hc)), hn(hb.size());
    for (int64_t x = 0; x < g.lc * B * g.hc; ++x) {
      hb[static_cast<size_t>(x)] = x * g.T;
      hn[static_cast<size_t>(x)] = lens[static_cast<size_t>(x / g.hc)];  // (b * lc + li) * hc + hl -> layer row b * lc + li
    }
    const segments hrows = make_ragged_segments(g.lc * B * g.hc, hb.data(), hn.data());
    if (ok) {
      if (c.scorer == scorer_kind::window) {
        for (int64_t li = 0; li < g.lc; ++li) {
          const auto k = layer_keys(a.cache, li, std::min(capacity, c.max_tokens));
          cudaError_t e = window_attention_host(a.queries[li], k, a.lse ? a.lse[li] : lse_view{}, c.window, hgrid, li,
                                                hrows, mine);
          scorer_failed(e);
          if (!ok) break;
        }
      } else {
        for (int64_t li = 0; li < g.lc && ok; ++li) {
          const auto k = layer_keys(a.cache, li, std::min(capacity, c.max_tokens));
          scorer_failed(key_norm_host(k, key_norm_options{true}, hgrid, li, hrows, mine));
        }
      }
    }
    PREFIXKV_TRY(sh.tp.all_gather(mine, gathered.data(), static_cast<size_t>(block) * sizeof(float), nullptr));
    if (ok)
      dist_reduce_heads_host(g, c.scorer == scorer_kind::window ? c.window.heads : head_reduce::mean, gathered.data(),
                             lens, own.data());
  } else if (ok && !caller_scores) {
    for (int64_t li = 0; li < g.lc && ok; ++li) {
      switch (c.scorer) {
        case scorer_kind::attention:
          scorer_failed(accumulated_attention_host(a.attention[li], grid, li, rows, own.data()));
          break;
        case scorer_kind::window:
        case scorer_kind::key_norm: {
          const auto k = layer_keys(a.cache, li, std::min(capacity, c.max_tokens));
          scorer_failed(c.scorer == scorer_kind::window
                            ? window_attention_host(a.queries[li], k, a.lse ? a.lse[li] : lse_view{}, c.window, grid,
                                                    li, rows, own.data())
                            : key_norm_host(k, key_norm_options{true}, grid, li, rows, own.data()));
          break;
        }
        case scorer_kind::recency:
          for (int64_t b = 0; b < B; ++b)
            for (int64_t hl = 0; hl < g.Hl; ++hl) {
              const int64_t s = grid.id(li, b, hl);
              for (int64_t t = 0; t < lens[static_cast<size_t>(s)]; ++t)
                own[static_cast<size_t>(begins[static_cast<size_t>(s)] + t)] = static_cast<float>(t + 1);
            }
          break;
        default: break;
      }
    }
  }
  curve_buffers curves;
  if (ok && build_curves_host(scores, rows, c.protect, curves) != cudaSuccess) scorer_failed(cudaErrorInvalidValue);
  const curve_set cv = curves.view();

  // ---- 4. the threshold key of every problem, one 8-bit digit per round, from exact integer counts
  auto seg_of = [&](int64_t s) {  // local segment -> (bounds, row)
    const int64_t gid = g.global_of_local(s);
    const int64_t h = gid % H, l = (gid / H) % L, b = gid / (H * L);
    return dist_segment_of(c, n_cl(l, b, h));
  };
  std::vector<int64_t> known(static_cast<size_t>(NQ), 0), hist(static_cast<size_t>(NQ * dist_radix_bins));
  for (int round = 0; round < dist_radix_rounds; ++round) {
    std::fill(hist.begin(), hist.end(), 0);
    if (ok)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t q = g.local_problem_of(s), p = g.problem_of_local(q);
        if (R[static_cast<size_t>(p)] <= 0) continue;
        const dist_segment d = seg_of(s);
        const float* row = cv.cumulative + cv.offsets[s];
        for (int64_t x = 0; x < dist_radix_bins; ++x)
          hist[static_cast<size_t>(q * dist_radix_bins + x)] +=
              entries_le(row, d.lo, d.hi, dist_radix_key(known[static_cast<size_t>(q)], round, x));
      }
    PREFIXKV_TRY(dist_sum(sh, dist_hist_scope(g), hist.data(), NQ * dist_radix_bins, nullptr));
    for (int64_t q = 0; q < NQ; ++q)
      known[static_cast<size_t>(q)] = (known[static_cast<size_t>(q)] << 8) |
                                      dist_radix_pick(hist.data() + q * dist_radix_bins, R[static_cast<size_t>(g.problem_of_local(q))]);
  }
  // ---- 5. (less, equal) per segment and the threshold key per problem, summed over the ranks
  std::vector<int64_t> tally(static_cast<size_t>(g.tally_words()), 0);
  if (ok) {
    for (int64_t s = 0; s < S; ++s) {
      const int64_t q = g.local_problem_of(s), p = g.problem_of_local(q), gid = g.global_of_local(s);
      const int64_t v = R[static_cast<size_t>(p)] > 0 ? known[static_cast<size_t>(q)] : -1;
      const dist_segment d = seg_of(s);
      const float* row = cv.cumulative + cv.offsets[s];
      const int64_t less = entries_le(row, d.lo, d.hi, v - 1);
      tally[static_cast<size_t>(gid)] = less;
      tally[static_cast<size_t>(SG + gid)] = entries_le(row, d.lo, d.hi, v) - less;
    }
    for (int64_t q = 0; q < NQ; ++q) {
      const int64_t p = g.problem_of_local(q);
      if (g.owns_problem(p)) tally[static_cast<size_t>(2 * SG + p)] = R[static_cast<size_t>(p)] > 0 ? known[static_cast<size_t>(q)] + 1 : 0;
    }
  }
  PREFIXKV_TRY(dist_sum(sh, dist_tally_scope(g), tally.data(), g.tally_words(), nullptr));
  // every segment's kept tokens (the single-GPU solver's rule: ties go to the lower segment of the problem)
  std::vector<int64_t> keep_g(static_cast<size_t>(SG)), keep(static_cast<size_t>(S));
  std::vector<float> thr(static_cast<size_t>(NP));
  for (int64_t p = 0; p < NP; ++p) {
    const int64_t s0 = p * g.per_problem(), s1 = s0 + g.per_problem();
    int64_t rem = R[static_cast<size_t>(p)];
    for (int64_t s = s0; s < s1; ++s) rem -= tally[static_cast<size_t>(s)];
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t h = s % H, l = (s / H) % L, b = s / (H * L);
      const dist_segment d = dist_segment_of(c, n_cl(l, b, h));
      const int64_t eq = tally[static_cast<size_t>(SG + s)];
      const int64_t take = rem < eq ? (rem > 0 ? rem : 0) : eq;
      rem -= take;
      keep_g[static_cast<size_t>(s)] = d.prot + d.lo + tally[static_cast<size_t>(s)] + take;
    }
    const int64_t vp = tally[static_cast<size_t>(2 * SG + p)];
    thr[static_cast<size_t>(p)] = vp > 0 ? key_value(static_cast<uint32_t>(vp - 1)) : 0.0f;
  }
  for (int64_t s = 0; s < S; ++s) keep[static_cast<size_t>(s)] = keep_g[static_cast<size_t>(g.global_of_local(s))];

  // ---- 6. selection and the compaction's checks (stages 2, 3), before anything moves
  selection_buffers sel;
  const int32_t no_index = 0;
  selection kept{};
  const auto src = a.cache;
  if (ok) {
    if (write_selection_host(cv, keep.data(), sel) != cudaSuccess) {
      r2 = last_error().why;
      ok = false;
    } else {
      kept = sel.view();
      if (kept.indices == nullptr) kept.indices = &no_index;
      compact_meta m;
      std::unique_ptr<compact_ptrs> ptrs(new compact_ptrs);
      const cudaError_t pe = c.in_place ? compact_plan(src, src, true, kept, grid, compact_outputs{}, m, ptrs.get())
                                        : compact_plan(src, a.dst, false, kept, grid, compact_outputs{}, m, ptrs.get());
      if (pe != cudaSuccess) return pe;  // host-visible: the same on every rank, so every rank returns here
      r3 = compact_check_host(m, ptrs->tab);
    }
  }
  // ---- 7. one status for the whole model
  dist_record rec;
  rec.why[0] = static_cast<int32_t>(r0);
  rec.why[1] = static_cast<int32_t>(r1);
  rec.why[2] = static_cast<int32_t>(r2);
  rec.why[3] = static_cast<int32_t>(r3);
  rec.l0 = static_cast<int32_t>(g.l0);
  rec.lc = static_cast<int32_t>(g.lc);
  rec.batch = static_cast<int32_t>(B);
  rec.rows = static_cast<int32_t>(g.T);
  PREFIXKV_TRY(dist_exchange_records(sh, L, rec, gather_model));
  const reason chain = dist_chain_reason(rec, [](unsigned) { return reason::none; });
  const compress_geometry og{0, L, B, H, capacity};
  const int64_t result_page_size = c.in_place ? cache_page_size(a.cache) : cache_page_size(a.dst);
  std::vector<int64_t> len_out(static_cast<size_t>(SG));
  if (chain != reason::none) {
    for (int64_t l = 0; l < L; ++l)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h) len_out[static_cast<size_t>((l * B + b) * H + h)] = n_in(l, b, h);
    compress_outputs_host(og, result_page_size, len_out, a.out, true);
    if (a.out.status) *a.out.status = static_cast<int32_t>(chain);
    const bool mine = chain == r1 && msg1 != nullptr;
    return fail(chain, mine ? msg1 : compress_message(chain));
  }
  // ---- 8. compact this rank's shard, write the whole model's outputs
  const cudaError_t ce = c.in_place ? compact_in_place_host(src, kept, grid) : gather_kept_host(src, a.dst, kept, grid);
  if (ce != cudaSuccess) return ce;  // the checks above passed on every rank: not reached
  for (int64_t l = 0; l < L; ++l)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        len_out[static_cast<size_t>((l * B + b) * H + h)] = keep_g[static_cast<size_t>(g.global_id(l, b, h))];
  compress_outputs_host(og, result_page_size, len_out, a.out, true);
  if (a.out.threshold)
    for (int64_t p = 0; p < NP; ++p) a.out.threshold[p] = thr[static_cast<size_t>(p)];
  if (a.out.status) *a.out.status = 0;
  return cudaSuccess;
}

}  // namespace detail

//! The compressor on one rank of a sharded model (host memory, a host communicator such as `host_comm`): the same
//! result as `compress_host(plan, args)` on the unsharded model — each rank's cache holds its shard of that result,
//! and every rank writes the whole model's outputs. Every rank of `shard.tp` and `shard.pp` must call it (see the
//! file comment). Rejections of the arguments are agreed on first: when any rank rejects its arguments, every rank
//! returns cudaErrorInvalidValue and nothing is written; a chain failure (bad data anywhere in the model) stops every
//! rank before anything moves, as on one GPU.
template <class Cache, class P, class Dst>
[[nodiscard]] cudaError_t compress_host(const compress_plan& plan, const compress_args<Cache, P, Dst>& args,
                                        const compress_shard& shard) noexcept {
  try {
    return detail::compress_host_dist_run(plan, args, shard);
  } catch (...) {
    return detail::fail(reason::capacity_exceeded, "compress: out of host memory", cudaErrorMemoryAllocation);
  }
}

//! The bytes one call of the CUDA backend exchanges on this rank (see `compress_traffic`). Host-only; nothing is
//! read but the plan and the shard.
[[nodiscard]] inline cudaError_t compress_exchange(const compress_plan& plan, const compress_shard& shard,
                                                  int64_t batch, compress_traffic& out) noexcept {
  return detail::dist_traffic(plan, shard, batch, out);
}

PREFIXKV_NAMESPACE_END
