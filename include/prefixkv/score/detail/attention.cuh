//! \file prefixkv/score/detail/attention.cuh
//! Private to score.cuh (included from it, after `flag` and `no_workspace_begin`): the accumulated-attention kernel
//! and its dispatch.
//!
//! The defined order (score.hpp) cuts the queries into chunks of `attention_query_chunk` queries; chunk j's partial
//! sum of key k runs over (group head, chunk query), heads outer; the chunk sums are added in chunk order; one
//! division by the group size G ends it. The kernel follows it exactly:
//!
//! * A block owns one key tile of one output row (grid: key tiles, batch x output heads, layers). Its threads form
//!   `workers` workers of `lanes` lanes (32, 16 or 8: plan_attention); lane i of every worker owns the V
//!   consecutive keys [tile start + i V, + V) of the tile, so a worker covers the whole tile (lanes x V keys).
//! * Workers take chunks round-robin (round r: worker w computes chunk r x workers + w) into registers: V fp32
//!   accumulators per lane, the loads of `attention_load_bytes / (V x element size)` consecutive queries in flight.
//!   Contiguous key rows are read with 16-, 8- or 4-byte vector loads (the widest that every row start allows),
//!   anything else (a key stride, 2-byte-aligned rows) element by element. Only keys < n are read: the vector
//!   tiles cover the keys below n rounded down to V (a lane loads all its V keys or none), and one more block per
//!   row (the tail tile, one key per lane) reads the last n mod V keys element by element.
//! * At the end of a round the workers' chunk sums go to shared memory (double-buffered: one barrier per round) and
//!   each thread adds, for the keys it owns in the running sums, the round's chunk sums in chunk order.
//! * Non-finite elements: f16 sums cannot overflow, so a non-finite chunk sum means a non-finite element; for fp32
//!   and bf16 a lane also keeps max |x| (NaN makes the chunk sum NaN, which finite elements cannot: a sum that
//!   overflowed stays +-inf). No workspace: the size query answers the minimum.
#pragma once

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

inline constexpr int attention_max_threads = 512;  // threads per block (2 blocks per SM: <= 64 registers)
inline constexpr int attention_load_bytes = 128;   // bytes of P per lane whose loads are in flight together

template <class T>
struct attention_params {
  kv_view<const T> p;  // (batch, q_head, query, key) extents and strides; layer z's data at p_of[z]
  segment_grid grid;
  int64_t layer;       // grid layer of blockIdx.z == 0
  segments rows;
  float* scores;
  unsigned* status;
  int64_t tiles;       // key tiles per row (lanes x V keys each)
  int lanes;           // lanes per worker: 32, 16 or 8
  int workers;         // workers per block (blockDim.x / lanes)
  const T* p_of[score_max_layers];
};

//! Loads of `Bytes` bytes of P as 32-bit words (a 2-byte load in the low half of one word), cache-streaming.
template <int Bytes>
PREFIXKV_DEVICE void attention_ld(const void* ptr, uint32_t* w) {
  if constexpr (Bytes == 16) {
    const uint4 v = __ldcs(static_cast<const uint4*>(ptr));
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  } else if constexpr (Bytes == 8) {
    const uint2 v = __ldcs(static_cast<const uint2*>(ptr));
    w[0] = v.x;
    w[1] = v.y;
  } else if constexpr (Bytes == 4) {
    w[0] = __ldcs(static_cast<const unsigned int*>(ptr));
  } else {
    static_assert(Bytes == 2, "attention_ld: 16, 8, 4 or 2 bytes");
    w[0] = __ldcs(static_cast<const unsigned short*>(ptr));
  }
}

//! Element e (0-based, memory order) of V elements of T packed in words.
template <class T>
PREFIXKV_DEVICE float attention_elem(const uint32_t* w, int e) {
  if constexpr (std::is_same<T, float>::value) {
    return __uint_as_float(w[e]);
  } else {
    const uint32_t x = w[e >> 1];
    if constexpr (std::is_same<T, bf16>::value)
      return __uint_as_float((e & 1) ? (x & 0xFFFF0000u) : (x << 16));
    else
      return __half2float(__ushort_as_half(static_cast<unsigned short>((e & 1) ? (x >> 16) : (x & 0xFFFFu))));
  }
}

//! The V elements at `ptr` (keys k0 .. k0 + V - 1 of one (head, query) row) as words. Edge: only lanes with
//! `active` read (a whole vector), the others get zeros.
template <class T, int V, bool Edge>
PREFIXKV_DEVICE void attention_load(const T* ptr, bool active, uint32_t* w) {
  constexpr int VB = V * int(sizeof(T));
  constexpr int NW = VB >= 4 ? VB / 4 : 1;
  if constexpr (Edge) {
#pragma unroll
    for (int i = 0; i < NW; ++i) w[i] = 0u;
    if (active) attention_ld<VB>(ptr, w);
  } else {
    attention_ld<VB>(ptr, w);
  }
  (void)active;
}

//! c[v] += element v (fp32, round to nearest: no contraction); m = max(m, |x|) except for f16 (see the file comment).
template <class T, int V>
PREFIXKV_DEVICE void attention_add(const uint32_t* w, float (&c)[V], float& m) {
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const float x = attention_elem<T>(w, v);
    c[v] = __fadd_rn(c[v], x);
    if constexpr (!std::is_same<T, f16>::value) m = fmaxf(m, fabsf(x));
  }
}

//! Whether the chunk met a NaN/Inf element (see the file comment).
template <class T, int V>
PREFIXKV_DEVICE bool attention_chunk_nonfinite(const float (&c)[V], float m) {
  bool bad = false;
#pragma unroll
  for (int v = 0; v < V; ++v) bad |= std::is_same<T, f16>::value ? !isfinite(c[v]) : isnan(c[v]);
  if constexpr (!std::is_same<T, f16>::value) bad |= !(m <= 3.402823466e38f);
  return bad;
}

//! Chunk sum of one lane's V keys: `cb` = (b, first head of the group, first query of the chunk, first key of the
//! lane); heads outer (stride sh, G of them), the chunk's nq queries inner (stride sq), one accumulator per key.
template <class T, int V, int UCap, bool Edge>
PREFIXKV_DEVICE void attention_chunk(const T* cb, int64_t sh, int64_t sq, int64_t G, int nq, bool active, float (&c)[V],
                                     float& m) {
  constexpr int VB = V * int(sizeof(T));
  constexpr int NW = VB >= 4 ? VB / 4 : 1;
  // Queries whose loads are in flight together: attention_load_bytes per lane, at most UCap.
  constexpr int U = attention_load_bytes / VB < UCap ? attention_load_bytes / VB : UCap;
  static_assert(attention_query_chunk % U == 0, "attention: the batch of loads must divide the query chunk");
  for (int64_t g = 0; g < G; ++g, cb += sh) {
    const T* ptr = cb;
    int q = 0;
    for (; q + U <= nq; q += U, ptr += U * sq) {
      uint32_t w[U][NW];
#pragma unroll
      for (int u = 0; u < U; ++u) attention_load<T, V, Edge>(ptr + u * sq, active, w[u]);
#pragma unroll
      for (int u = 0; u < U; ++u) attention_add<T, V>(w[u], c, m);
    }
    for (; q < nq; ++q, ptr += sq) {
      uint32_t w[NW];
      attention_load<T, V, Edge>(ptr, active, w);
      attention_add<T, V>(w, c, m);
    }
  }
}

//! One key tile of a row: keys [t0, t0 + lanes x V) below `kend` (a lane's V keys are all below it or none is;
//! key k at `row0 + k x sk`), at most UCap loads in flight per lane. Every thread of the block calls it (barriers
//! inside); see the file comment.
template <class T, int V, int UCap>
PREFIXKV_DEVICE void attention_tile(const attention_params<T>& a, const T* row0, int64_t sk, int64_t t0, int64_t kend,
                                    float* out, float* smem, bool& bad) {
  const kv_view<const T>& p = a.p;
  const int L = a.lanes, NWK = a.workers, NT = L * NWK;
  const int tid = int(threadIdx.x), kl = tid % L, wk = tid / L;
  const int64_t TW = int64_t(L) * V;
  float* const buf = smem;                 // [2][NWK][TW]: the round's chunk sums, double-buffered
  float* const acc = buf + 2 * NWK * TW;  // [TW]: the running sums
  const int64_t G = p.heads / a.grid.heads, Q = p.tokens, QC = attention_query_chunk;
  const int64_t J = (Q + QC - 1) / QC, R = (J + NWK - 1) / NWK;
  const int64_t k0 = t0 + int64_t(kl) * V;
  const bool active = k0 < kend, edge = t0 + TW > kend;
  for (int64_t k = tid; k < TW; k += NT) acc[k] = 0.0f;  // a thread's own keys: no barrier needed
  const T* const base = row0 + (active ? k0 * sk : 0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t j = r * NWK + wk;
    if (j < J) {
      float c[V], m = 0.0f;
#pragma unroll
      for (int v = 0; v < V; ++v) c[v] = 0.0f;
      const int64_t q0 = j * QC;
      const int nq = int(Q - q0 < QC ? Q - q0 : QC);
      const T* const cb = base + q0 * p.stride_token;
      if (edge)
        attention_chunk<T, V, UCap, true>(cb, p.stride_head, p.stride_token, G, nq, active, c, m);
      else
        attention_chunk<T, V, UCap, false>(cb, p.stride_head, p.stride_token, G, nq, true, c, m);
      bad |= attention_chunk_nonfinite<T, V>(c, m);
      float* const slot = buf + ((r & 1) * NWK + wk) * TW + int64_t(kl) * V;
#pragma unroll
      for (int v = 0; v < V; ++v) slot[v] = c[v];
    }
    __syncthreads();  // the round's chunk sums are visible; the other buffer is free again (see the file comment)
    const int nw = int(J - r * NWK < NWK ? J - r * NWK : NWK);
    const float* const rb = buf + (r & 1) * NWK * TW;
    for (int64_t k = tid; k < TW; k += NT) {
      float s = acc[k];
      for (int i = 0; i < nw; ++i) s = __fadd_rn(s, rb[i * TW + k]);
      acc[k] = s;
    }
  }
  const float Gf = static_cast<float>(G);
  for (int64_t k = tid; k < TW; k += NT)
    if (t0 + k < kend) out[t0 + k] = __fdiv_rn(acc[k], Gf);
  __syncthreads();  // the next tile reuses the buffers
}

//! One block: key tiles blockIdx.x, blockIdx.x + gridDim.x, ... of row (layer blockIdx.z, batch x output head
//! blockIdx.y). Tiles [0, a.tiles) hold V-key vectors per lane and cover the keys below n rounded down to V; with
//! V > 1 one more tile (index a.tiles) takes the last n mod V keys element by element (lanes x 1 keys). Dynamic
//! shared memory: 2 x workers x tile floats + tile floats (the largest tile). A row longer than the key extent is
//! flagged and written as zeros over at most the key extent.
template <class T, int V, bool Contig>
PREFIXKV_KERNEL void __launch_bounds__(attention_max_threads, 2) accumulated_attention_kernel(attention_params<T> a) {
  extern __shared__ __align__(16) unsigned char attention_smem[];
  float* const smem = reinterpret_cast<float*>(attention_smem);
  const kv_view<const T>& p = a.p;
  const int64_t z = blockIdx.z, oh = blockIdx.y % a.grid.heads, b = blockIdx.y / a.grid.heads;
  const int64_t id = a.grid.id(a.layer + z, b, oh), n_row = a.rows.length(id);
  const bool bad_len = n_row > p.dim;
  const int64_t n = bad_len ? p.dim : n_row, nv = V > 1 ? n / V * V : n;
  const int tid = int(threadIdx.x), NT = a.lanes * a.workers;
  if (bad_len && blockIdx.x == 0 && tid == 0) flag(a.status, status_bad_length);
  float* const out = a.scores + a.rows.begin(id);
  const T* const row0 = a.p_of[z] + b * p.stride_batch + oh * (p.heads / a.grid.heads) * p.stride_head;
  const int64_t TW = int64_t(a.lanes) * V, tiles = a.tiles + (V > 1 ? 1 : 0);
  bool bad = false;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {  // uniform over the block
    if (tile < a.tiles) {
      const int64_t t0 = tile * TW;
      if (bad_len) {
        for (int64_t k = t0 + tid; k < t0 + TW && k < n; k += NT) out[k] = 0.0f;
      } else if (t0 < nv) {
        attention_tile<T, V, (V == 1 ? 32 : 16)>(a, row0, Contig ? 1 : p.stride_dim, t0, nv, out, smem, bad);
      }
    } else if (!bad_len && nv < n) {  // V > 1: the last n - nv < V keys, element by element (contiguous keys)
      attention_tile<T, 1, 16>(a, row0, 1, nv, n, out, smem, bad);
    }
  }
  if (__syncthreads_or(bad) && tid == 0) flag(a.status, status_nonfinite);
}

//! Widest load (16, 8 or 4 bytes, or 0 = element loads) that reaches every lane's V keys of every (batch, head,
//! query) row of every layer aligned: contiguous keys, and the data pointers and the strides of axes with more
//! than one index multiples of it. A result below 4 bytes means element loads.
template <class T>
inline int attention_vector_bytes(const kv_view<const T>* p, int64_t layers) {
  const kv_view<const T>& v = p[0];
  if (v.dim > 1 && v.stride_dim != 1) return 0;
  const int64_t e = static_cast<int64_t>(sizeof(T));
  int vb = common_pow2(16, {v.batch > 1 ? v.stride_batch * e : 0, v.heads > 1 ? v.stride_head * e : 0,
                            v.tokens > 1 ? v.stride_token * e : 0});
  for (int64_t l = 0; l < layers; ++l)
    vb = common_pow2(vb, {static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(p[l].data) % 16)});
  return vb >= 4 ? vb : 0;
}

//! Compile-time choices of the launch shape (the results do not depend on them: the order is fixed by the chunks).
//! The entry points use this one; tests instantiate `accumulated_attention_run` with others to reach every shape on
//! any device.
struct attention_policy {
  static constexpr int lanes = 0;        //!< lanes per worker: 0 = chosen per launch (plan_attention), else 32, 16, 8
  static constexpr int max_workers = 0;  //!< 0 = attention_max_threads / lanes, else at most this many per round
};

//! Launch shape: lanes per worker, workers per block, key tiles per row.
struct attention_launch {
  int lanes = 32, workers = 1;
  int64_t tiles = 1;
  size_t smem = 0;
};

//! The shape for `lanes` lanes per worker: key tiles of lanes x V keys; enough workers for the query chunks in the
//! fewest rounds of at most `attention_max_threads` threads (or `max_workers` workers), spread evenly over the
//! rounds, in whole warps.
inline attention_launch attention_shape(int64_t keys, int64_t queries, int V, int lanes, int max_workers) {
  attention_launch s;
  s.lanes = lanes;
  const int64_t tw = int64_t(lanes) * V;
  s.tiles = keys > 0 ? (keys + tw - 1) / tw : int64_t(1);
  const int64_t QC = attention_query_chunk;
  const int64_t J = std::max<int64_t>(1, (queries + QC - 1) / QC);
  const int64_t per_warp = 32 / lanes;
  const int64_t wmax = max_workers > 0 ? std::min<int64_t>(max_workers, attention_max_threads / lanes)
                                       : attention_max_threads / lanes;
  const int64_t rounds = (J + wmax - 1) / wmax;
  int64_t w = (J + rounds - 1) / rounds;
  w = (w + per_warp - 1) / per_warp * per_warp;
  s.workers = static_cast<int>(w);
  s.smem = static_cast<size_t>((2 * w * tw + tw) * int64_t(sizeof(float)));
  return s;
}

//! Lanes per worker (unless the policy fixes them): the widest of 32, 16, 8 whose grid keeps the most threads busy
//! on average — all blocks at once when they fit the device (blocks x threads), else full waves weighted by the
//! last wave's fill — narrower only for at least 10 % more (wider tiles read longer contiguous runs of each row).
//! `occupancy(threads, smem)` = resident blocks per SM of the kernel.
template <class Occupancy>
inline attention_launch plan_attention(int64_t keys, int64_t queries, int64_t row_blocks, int V, int lanes,
                                       int max_workers, Occupancy&& occupancy) {
  if (lanes != 0) return attention_shape(keys, queries, V, lanes, max_workers);
  const double sms = double(sm_count());
  attention_launch best;
  double best_score = -1.0;
  int64_t prev_tiles = -1;
  for (int l : {32, 16, 8}) {
    const attention_launch s = attention_shape(keys, queries, V, l, max_workers);
    if (s.tiles == prev_tiles) continue;  // narrower lanes that add no tile only shorten the loads
    prev_tiles = s.tiles;
    const double threads = double(s.lanes) * s.workers, blocks = double(s.tiles) * double(row_blocks);
    const double slots = std::max(1, occupancy(int(threads), s.smem)) * sms;
    const double score = blocks <= slots ? blocks * threads
                                         : slots * threads * blocks / (std::ceil(blocks / slots) * slots);
    if (best_score < 0.0 || score > 1.1 * best_score) {
      best = s;
      best_score = score;
    }
  }
  return best;
}

template <class Policy, class T, int V, bool Contig>
inline cudaError_t launch_attention(const attention_params<T>& a0, int64_t ny, int64_t layers, int64_t row_blocks,
                                    cudaStream_t stream) {
  attention_params<T> a = a0;
  static_assert(Policy::lanes == 0 || Policy::lanes == 8 || Policy::lanes == 16 || Policy::lanes == 32,
                "attention_policy::lanes: 0, 8, 16 or 32");
  const auto kernel = accumulated_attention_kernel<T, V, Contig>;
  auto occupancy = [&](int threads, size_t smem) {
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem) == cudaSuccess) return blocks;
    (void)cudaGetLastError();  // a failed query only loses the estimate; the launch reports its own errors
    return 1;
  };
  const attention_launch s =
      plan_attention(a.p.dim, a.p.tokens, row_blocks, V, Policy::lanes, Policy::max_workers, occupancy);
  a.tiles = s.tiles;
  a.lanes = s.lanes;
  a.workers = s.workers;
  const int64_t bx = std::min<int64_t>(s.tiles + (V > 1 ? 1 : 0), 0x7FFFFFFF);
  kernel<<<dim3(unsigned(bx), unsigned(ny), unsigned(layers)), unsigned(s.lanes * s.workers), s.smem, stream>>>(a);
  return check_launch(stream);
}

//! The accumulated-attention scorer for `layers` layers starting at grid layer `layer`: one launch.
template <class Policy, class T>
inline cudaError_t accumulated_attention_run(void* d_temp, size_t& temp_bytes, const kv_view<const T>* p,
                                             const segment_grid& grid, int64_t layer, int64_t layers,
                                             const segments& rows, float* scores, unsigned* d_status,
                                             cudaStream_t stream) {
  PREFIXKV_TRY(check_attention_args(p, grid, layer, layers, rows, scores, false));
  bool launch = false;
  PREFIXKV_TRY(no_workspace_begin(d_temp, temp_bytes, p[0].batch, rows, launch));
  if (!launch) return cudaSuccess;
  int64_t ny = 0, row_blocks = 0;
  if (!score_mul(p[0].batch, grid.heads, ny) || ny > 65535)
    return fail(reason::unsupported, "attention scorer: batch x heads too large for one launch");
  row_blocks = ny * layers;
  attention_params<T> a{};
  a.p = p[0];
  for (int64_t l = 0; l < layers; ++l) a.p_of[l] = p[l].data;
  a.grid = grid;
  a.layer = layer;
  a.rows = rows;
  a.scores = scores;
  a.status = d_status;
  const int vb = attention_vector_bytes(p, layers);
  constexpr int e = int(sizeof(T));
  if (vb == 16) return launch_attention<Policy, T, 16 / e, true>(a, ny, layers, row_blocks, stream);
  if (vb == 8) return launch_attention<Policy, T, 8 / e, true>(a, ny, layers, row_blocks, stream);
  if constexpr (sizeof(T) == 2)
    if (vb == 4) return launch_attention<Policy, T, 2, true>(a, ny, layers, row_blocks, stream);
  return launch_attention<Policy, T, 1, false>(a, ny, layers, row_blocks, stream);
}

}  // namespace detail
PREFIXKV_NAMESPACE_END
