//! \file prefixkv/score/detail/key_norm.cuh
//! Private to score.cuh (included from it, after `k_pages`, `k_row_of`, `flag` and `no_workspace_begin`): the
//! key-norm kernels and their dispatch.
//!
//! * `key_norm_vec_kernel` — K rows that allow 16-byte loads (contiguous rows, 16-byte-aligned base and strides,
//!   row bytes a multiple of 16; every layer): a group of `lanes` lanes (the row's 16-byte chunks rounded up to a
//!   power of two, at most 32) reads one token's row of each kv head, up to 8 heads' loads in flight per lane,
//!   sums of squares reduced by shuffles inside the group. A warp covers 32 / lanes tokens at a time. The sum over
//!   kv heads (layer rows) runs in head order, so the result is deterministic.
//! * `key_norm_scalar_kernel` — everything else: one warp per token, element loads along the row.
//! Both take the layer from blockIdx.z, the sequence from blockIdx.y; a paged K looks up the page of a token once
//! for all its heads and scores a token whose page id is outside the pool as 0 (`status_bad_page`).
#pragma once

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

inline constexpr int key_norm_threads = 256;
inline constexpr int key_norm_heads_per_step = 8;  // kv heads whose loads are in flight together

template <class T>
struct key_norm_params {
  kv_view<const T> k;  // (batch, kv_head, capacity, dim) extents and strides (see k_geometry); data at k_of[z]
  k_pages pg;          // paged K (table == nullptr: strided)
  segments rows;
  segment_grid grid;
  int64_t layer;       // grid layer of blockIdx.z == 0
  float* scores;
  unsigned* status;
  int reciprocal;
  int lanes;           // vector kernel: lanes per key row (power of two <= 32)
  const T* k_of[score_max_layers];
};

//! acc + the sum of squares of the elements packed in a 16-byte word.
template <class T>
PREFIXKV_DEVICE float sum_squares16(const uint4& v, float acc) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same<T, float>::value) {
      const float x = __uint_as_float(w[i]);
      acc = fmaf(x, x, acc);
    } else if constexpr (std::is_same<T, bf16>::value) {
      const float lo = __uint_as_float(w[i] << 16), hi = __uint_as_float(w[i] & 0xFFFF0000u);
      acc = fmaf(lo, lo, acc);
      acc = fmaf(hi, hi, acc);
    } else {
      __half2_raw r;
      r.x = uint16_t(w[i] & 0xFFFFu);
      r.y = uint16_t(w[i] >> 16);
      const float2 f = __half22float2(__half2(r));
      acc = fmaf(f.x, f.x, acc);
      acc = fmaf(f.y, f.y, acc);
    }
  }
  return acc;
}

//! The tokens a block visits for (layer, b): [0, span), span = the row length (layer rows) or the longest head row,
//! at most the capacity; rows longer than the capacity are flagged (once) and scored as zeros.
template <class T>
PREFIXKV_DEVICE int64_t key_norm_span(const key_norm_params<T>& p, int64_t layer, int64_t b) {
  const int64_t cap = p.k.tokens;
  int64_t span = 0;
  bool bad_len = false;
  for (int64_t h = 0; h < p.grid.heads; ++h) {
    const int64_t n = p.rows.length(p.grid.id(layer, b, h));
    bad_len |= n > cap;
    span = max(span, min(n, cap));
  }
  if (bad_len && blockIdx.x == 0 && threadIdx.x == 0) flag(p.status, status_bad_length);
  return span;
}

//! Address of (b, kv head 0, token t, 0) in the layer whose K data starts at kb; nullptr for a page id outside the
//! pool. Head h's row is `stride_head` elements further (the page is shared by the heads of a token).
template <bool Paged, class T>
PREFIXKV_DEVICE const T* key_norm_token(const key_norm_params<T>& p, const T* kb, int64_t b, int64_t t) {
  return k_row_of<Paged>(p.k, p.pg, kb, b, 0, t);
}

//! Whether head h of token t is scored: its row holds t and its length is valid (layer rows: the (layer, b) row).
template <class T>
PREFIXKV_DEVICE bool key_norm_live(const key_norm_params<T>& p, int64_t layer, int64_t b, int64_t h, int64_t t) {
  const int64_t n = p.rows.length(score_row(p.grid, layer, b, h));
  return t < n && n <= p.k.tokens;
}

template <class T, bool Paged>
PREFIXKV_KERNEL void __launch_bounds__(key_norm_threads) key_norm_vec_kernel(key_norm_params<T> p) {
  constexpr int per = 16 / int(sizeof(T));  // elements per 16-byte chunk
  constexpr int HPS = key_norm_heads_per_step;
  const int64_t z = blockIdx.z, b = blockIdx.y, layer = p.layer + z;
  const T* const kb = p.k_of[z];
  const int lanes = p.lanes, lane = int(threadIdx.x & 31), sub = lane & (lanes - 1);
  const int per_warp = 32 / lanes, warp = int(threadIdx.x >> 5), warps = int(blockDim.x >> 5);
  const int chunks = int(p.k.dim / per);
  const int64_t Hk = p.k.heads;
  const bool layer_rows = p.grid.heads == 1;
  const int64_t span = key_norm_span(p, layer, b);
  const int64_t n0 = layer_rows ? p.rows.length(p.grid.id(layer, b, 0)) : 0;
  const bool ok0 = n0 <= p.k.tokens;  // layer rows: the row length is valid
  bool bad = false, bad_page = false;
  const int64_t step = int64_t(gridDim.x) * warps * per_warp;
  // The loop bound is uniform over the warp (shuffles below); a group past the span takes part without loading.
  for (int64_t t0 = (int64_t(blockIdx.x) * warps + warp) * per_warp; t0 < span; t0 += step) {
    const int64_t t = t0 + lane / lanes;
    const T* tok = nullptr;
    if (t < span) {
      tok = key_norm_token<Paged>(p, kb, b, t);
      bad_page |= tok == nullptr;
    }
    float sum = 0.0f;
    for (int64_t h0 = 0; h0 < Hk; h0 += HPS) {
      bool live[HPS];
      float ss[HPS];
#pragma unroll
      for (int j = 0; j < HPS; ++j) {
        const int64_t h = h0 + j;
        live[j] = tok != nullptr && h < Hk && (layer_rows ? ok0 : key_norm_live(p, layer, b, h, t));
        ss[j] = 0.0f;
      }
      for (int c = sub; c < chunks; c += lanes) {
        uint4 v[HPS];
#pragma unroll
        for (int j = 0; j < HPS; ++j) {
          v[j] = make_uint4(0u, 0u, 0u, 0u);
          if (live[j]) v[j] = *reinterpret_cast<const uint4*>(tok + (h0 + j) * p.k.stride_head + int64_t(c) * per);
        }
#pragma unroll
        for (int j = 0; j < HPS; ++j) ss[j] = sum_squares16<T>(v[j], ss[j]);
      }
#pragma unroll
      for (int j = 0; j < HPS; ++j) {
        for (int o = lanes >> 1; o > 0; o >>= 1) ss[j] += __shfl_xor_sync(0xffffffffu, ss[j], o);
        const int64_t h = h0 + j;
        if (h >= Hk) continue;
        const float v = live[j] ? key_norm_value(ss[j], p.reciprocal != 0) : 0.0f;
        bad |= live[j] && !isfinite(ss[j]);
        if (layer_rows) {
          sum += v;
        } else if (sub == 0 && t < span) {
          const int64_t id = p.grid.id(layer, b, h), n = p.rows.length(id);
          if (t < min(n, p.k.tokens)) p.scores[p.rows.begin(id) + t] = v;
        }
      }
    }
    if (layer_rows && sub == 0 && t < span) p.scores[p.rows.begin(p.grid.id(layer, b, 0)) + t] = sum / float(Hk);
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) flag(p.status, status_nonfinite);
  if (Paged && __syncthreads_or(bad_page) && threadIdx.x == 0) flag(p.status, status_bad_page);
}

//! One warp per token, element loads along the row (rows that do not allow 16-byte loads).
template <class T, bool Paged>
PREFIXKV_KERNEL void __launch_bounds__(key_norm_threads) key_norm_scalar_kernel(key_norm_params<T> p) {
  const int64_t z = blockIdx.z, b = blockIdx.y, layer = p.layer + z;
  const T* const kb = p.k_of[z];
  const int lane = int(threadIdx.x & 31);
  const int64_t Hk = p.k.heads, warps = int64_t(gridDim.x) * (blockDim.x / 32);
  const bool layer_rows = p.grid.heads == 1;
  const int64_t span = key_norm_span(p, layer, b);
  const int64_t n0 = layer_rows ? p.rows.length(p.grid.id(layer, b, 0)) : 0;
  const bool ok0 = n0 <= p.k.tokens;
  bool bad = false, bad_page = false;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32; t < span; t += warps) {
    const T* tok = key_norm_token<Paged>(p, kb, b, t);
    bad_page |= tok == nullptr;
    float sum = 0.0f;
    for (int64_t h = 0; h < Hk; ++h) {
      const bool live = tok != nullptr && (layer_rows ? ok0 : key_norm_live(p, layer, b, h, t));
      float ss = 0.0f;
      if (live)
        for (int64_t d = lane; d < p.k.dim; d += 32) {
          const float x = to_float(tok[h * p.k.stride_head + d * p.k.stride_dim]);
          ss = fmaf(x, x, ss);
        }
      for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
      bad |= live && !isfinite(ss);
      const float v = live ? key_norm_value(ss, p.reciprocal != 0) : 0.0f;
      if (layer_rows) {
        sum += v;
      } else if (lane == 0) {
        const int64_t id = p.grid.id(layer, b, h), n = p.rows.length(id);
        if (t < min(n, p.k.tokens)) p.scores[p.rows.begin(id) + t] = v;
      }
    }
    if (layer_rows && lane == 0) p.scores[p.rows.begin(p.grid.id(layer, b, 0)) + t] = sum / float(Hk);
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) flag(p.status, status_nonfinite);
  if (Paged && __syncthreads_or(bad_page) && threadIdx.x == 0) flag(p.status, status_bad_page);
}

//! Lanes per key row of the vector kernel: the row's 16-byte chunks rounded up to a power of two, at most 32.
inline int key_norm_lanes(int64_t chunks) {
  int lanes = 1;
  while (lanes < 32 && lanes < chunks) lanes <<= 1;
  return lanes;
}

//! The key-norm scorer for `layers` layers starting at grid layer `layer` (k: host array of `layers` views): one
//! launch.
template <class KView>
inline cudaError_t key_norm_run(void* d_temp, size_t& temp_bytes, const KView* k, const key_norm_options& opt,
                                const segment_grid& grid, int64_t layer, int64_t layers, const segments& rows,
                                float* scores, unsigned* d_status, cudaStream_t stream) {
  using T = std::remove_const_t<typename KView::element_type>;
  constexpr bool Paged = std::is_same<KView, paged_kv_view<const T>>::value;
  PREFIXKV_TRY(check_key_norm_args(k, grid, layer, layers, rows, scores, false));
  bool launch = false;
  PREFIXKV_TRY(no_workspace_begin(d_temp, temp_bytes, k[0].batch, rows, launch));
  if (!launch) return cudaSuccess;
  if (k[0].batch > 65535) return fail(reason::unsupported, "key-norm scorer: batch too large for one launch");
  key_norm_params<T> p{};
  k_geometry(k[0], p.k, p.pg);
  bool vec = true;
  for (int64_t l = 0; l < layers; ++l) {
    p.k_of[l] = k_data(k[l]);
    vec = vec && vector_bytes(k[l]) == 16;
  }
  p.rows = rows;
  p.grid = grid;
  p.layer = layer;
  p.scores = scores;
  p.status = d_status;
  p.reciprocal = opt.reciprocal ? 1 : 0;
  const int64_t cap = p.k.tokens;
  if (vec) {
    p.lanes = key_norm_lanes(p.k.dim * int64_t(sizeof(T)) / 16);
    const int64_t per_block = (key_norm_threads / 32) * (32 / p.lanes);
    const int64_t bx = cap > 0 ? (cap + per_block - 1) / per_block : 1;  // no keys: one block flags any bad row
    key_norm_vec_kernel<T, Paged><<<dim3(unsigned(bx < 65535 ? bx : 65535), unsigned(k[0].batch), unsigned(layers)),
                                    key_norm_threads, 0, stream>>>(p);
  } else {
    const int64_t bx = cap > 0 ? (cap + 7) / 8 : 1;
    key_norm_scalar_kernel<T, Paged><<<dim3(unsigned(bx < 4096 ? bx : 4096), unsigned(k[0].batch), unsigned(layers)),
                                       key_norm_threads, 0, stream>>>(p);
  }
  return check_launch(stream);
}

}  // namespace detail
PREFIXKV_NAMESPACE_END
