//! \file prefixkv/score/detail/window_mma.cuh
//! Private to score.cuh (included from it, after `window_params`, `load_rows` and `flag`): the tensor-core
//! accumulate pass of the window scorer for f16/bf16 with head_dim 64 or 128 and 16-byte-aligned K rows.
//!
//! It computes S^T = K Q^T with `mma.sync.m16n8k16` (fp32 accumulation) and turns every logit into a probability
//! in registers: p = ex2(s * scale * log2(e) - lse2[q]).
//! * A operand = K. Each warp owns 32 keys (two m16 tiles) at a time, staged by `cp.async` into a private
//!   shared-memory buffer (1 or 2 stages per warp, no CTA barrier in the loop), then loaded with ldmatrix into
//!   registers for the whole query loop (the buffer is refilled with the next tile at once).
//! * B operand = the Q rows of the (chunk of the) GQA group, in shared memory for the whole CTA lifetime, read
//!   with ldmatrix (rows padded by 16 bytes: conflict-free).
//! * Accumulator layout: a thread holds keys (g, g + 8) x queries (2t, 2t + 1) of each m16n8 tile, so the sum
//!   over the queries of one head is intra-thread plus two shuffles (xor 1, 2) once per head; the group
//!   reduction over the heads (mean / max) is in registers. Padded queries have lse2 = +inf (p = 0 exactly).
//! * The causal mask (key t visible to window query i iff t <= n - w + i) is applied only in tiles that reach
//!   the last w keys. Keys of the tile at or past the CTA's range end are zero-filled and never written.
//! * Each CTA writes its head chunk's partial row (plain stores); window_finalize combines the chunks in a fixed
//!   order, so the result does not depend on the order in which CTAs run.
#pragma once

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

inline constexpr int wmma_keys = 32;   // keys per warp tile (two m16 tiles)
inline constexpr int wmma_qstep = 32;  // window rows of a head are padded to a multiple of this

//! Shared-memory layout of the mma kernel: Q rows (R x (D + 8)), lse2 (R floats), per-warp K stages.
struct window_mma_smem {
  size_t q_off, lse_off, k_off, total;
  __host__ __device__ window_mma_smem(int R, int D, int stages, int elem_bytes, int warps) {
    auto up = [](size_t x) { return (x + 127) / 128 * 128; };
    const size_t row = size_t(D + 8) * elem_bytes;
    q_off = 0;
    lse_off = up(size_t(R) * row);
    k_off = up(lse_off + size_t(R) * sizeof(float));
    total = k_off + size_t(warps) * stages * wmma_keys * row;
  }
};

//! Four 8x8 b16 matrices from shared memory (lane l gives the row address of matrix l / 8), fragment order.
PREFIXKV_DEVICE void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

PREFIXKV_DEVICE float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

//! d += a * b for one m16n8k16 tile (row.col, fp32 accumulation).
template <class T>
PREFIXKV_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, bf16>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

//! Per packed word: bit 15 / 31 of the result is set when that 16-bit element has an all-ones exponent
//! (NaN/Inf). OR the results together and test `& 0x80008000u` once.
template <class T>
PREFIXKV_DEVICE uint32_t exp_probe(uint32_t w) {
  if constexpr (std::is_same<T, bf16>::value)
    return (w & 0x7F807F80u) + 0x00800080u;
  else
    return (w & 0x7C007C00u) + 0x04000400u;
}

//! A CTA's share of the window work: layer z of the call from blockIdx.z, (batch b, kv head kh, chunk of q heads
//! starting at q head h0, hc of them) from blockIdx.y, keys [key_begin, key_end) from blockIdx.x; an empty key range
//! when the row length is bad (flagged once per (layer, batch, kv head)). q, k: the layer's Q and K data.
template <class T>
struct window_cta {
  int64_t z, b, kh, h0, n, key_begin, key_end;
  int w, hc, chunk;
  const T* q;
  const T* k;
};

template <class T>
PREFIXKV_DEVICE window_cta<T> window_cta_of(const window_params<T>& p) {
  window_cta<T> c;
  const int64_t Hk = p.k.heads, by = blockIdx.y;
  const int chunk = int(by % p.chunks);
  c.z = blockIdx.z;
  c.chunk = chunk;
  c.q = p.q_of[c.z];
  c.k = p.k_of[c.z];
  c.kh = (by / p.chunks) % Hk;
  c.b = by / (int64_t(p.chunks) * Hk);
  c.w = int(p.q.tokens);
  c.n = window_row_length(p, c.z, c.b, c.kh);
  const bool bad_len = c.n < c.w || c.n > p.k.tokens;
  if (bad_len && blockIdx.x == 0 && chunk == 0 && threadIdx.x == 0) flag(p.status, status_bad_length);
  c.key_begin = int64_t(blockIdx.x) * p.split_keys;
  c.key_end = bad_len ? 0 : (c.n < c.key_begin + p.split_keys ? c.n : c.key_begin + p.split_keys);
  const int h_first = chunk * p.HC;
  c.hc = min(p.HC, p.G - h_first);
  c.h0 = c.kh * p.G + h_first;
  return c;
}

//! Query row r of the CTA block (R rows: hc heads x WP padded window rows) is a real window query.
template <class T>
PREFIXKV_DEVICE bool window_row_real(const window_params<T>& p, const window_cta<T>& c, int r) {
  const int hl = r / p.WP;
  return hl < c.hc && r - hl * p.WP < c.w;
}

//! Row r's LSE as the caller gave it; +inf for a padded row (its probabilities are then exactly 0). Split from
//! window_lse2_of so a kernel can issue the load early and use it late.
template <class T>
PREFIXKV_DEVICE float window_lse_raw(const window_params<T>& p, const window_cta<T>& c, int r) {
  const int hl = r / p.WP;
  return window_row_real(p, c, r) ? window_lse_at(p, c.z, c.b, c.h0 + hl, r - hl * p.WP) : INFINITY;
}

//! Base-2 form of row r's raw LSE v; a real row's value that is not finite sets `bad`.
template <class T>
PREFIXKV_DEVICE float window_lse2_of(const window_params<T>& p, const window_cta<T>& c, int r, float v, bool& bad) {
  if (window_row_real(p, c, r)) {
    bad |= !isfinite(v);
    if (p.lse_natural) v *= 1.4426950408889634f;
  }
  return v;
}

//! The CTA's base-2 log-sum-exp per query row into lse2[r]. Returns whether any caller value was not finite.
template <class T>
PREFIXKV_DEVICE bool window_load_lse2(const window_params<T>& p, const window_cta<T>& c, float* lse2) {
  bool bad = false;
  for (int r = int(threadIdx.x); r < p.R; r += int(blockDim.x))
    lse2[r] = window_lse2_of(p, c, r, window_lse_raw(p, c, r), bad);
  return bad;
}

//! Stores one key's group reduction v (divided by the group size for the mean) into the CTA's head-chunk row `row`
//! (window_finalize combines the chunks). Keys at or past `key_end` are skipped; a non-finite value sets `bad`.
template <class T>
PREFIXKV_DEVICE void window_store_key(const window_params<T>& p, float* row, int64_t key, int64_t key_end, float v,
                                      bool gmax, bool& bad) {
  if (key >= key_end) return;
  if (!gmax) v *= p.inv_G;
  bad |= !isfinite(v);
  row[key] = v;
}

//! One CTA: (layer, batch b, kv head kh, chunk of HC q heads) x a contiguous range of `split_keys` keys; warps take
//! 32-key tiles round robin and run independently after the Q block is loaded. `Paged`: K through a block table.
template <class T, int NK, int NJ, int WARPS, bool Paged>
PREFIXKV_KERNEL void __launch_bounds__(WARPS * 32, 1) window_mma_kernel(window_params<T> p) {
  constexpr int QS = 8 * NJ;         // queries per inner step (NJ n8 tiles)
  constexpr int D = 64 * NK;
  constexpr int LD = D + 8;          // shared row length in elements (16-byte pad: conflict-free 16-byte loads)
  constexpr int CPR = D / 8;         // 16-byte chunks per row
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const window_mma_smem L(p.R, D, p.stages, int(sizeof(T)), WARPS);
  T* Qs = reinterpret_cast<T*>(smem_raw + L.q_off);
  float* lse2 = reinterpret_cast<float*>(smem_raw + L.lse_off);
  const int warp = int(threadIdx.x >> 5), lane = int(threadIdx.x & 31), g = lane >> 2, t4 = lane & 3;
  T* Kw = reinterpret_cast<T*>(smem_raw + L.k_off) + size_t(warp) * p.stages * wmma_keys * LD;

  const window_cta<T> cta = window_cta_of(p);
  if (cta.key_begin >= cta.key_end) return;  // uniform over the CTA
  const int64_t b = cta.b, kh = cta.kh, n = cta.n, key_begin = cta.key_begin, key_end = cta.key_end, h0 = cta.h0;
  const int w = cta.w, hc = cta.hc;
  bool bad = window_load_lse2(p, cta, lse2), bad_page = false;
  bad |= load_rows<T>(Qs, LD, p.R, D, p.q.stride_dim, p.vec_q != 0, [&](int r) -> const T* {
    const int hl = r / p.WP, i = r - hl * p.WP;
    return (hl < hc && i < w) ? cta.q + p.q.offset(b, h0 + hl, i, 0) : nullptr;
  });
  __syncthreads();

  // ldmatrix lane addresses. A (K rows): lanes 0-15 rows 0-15 at dims +0, lanes 16-31 rows 0-15 at dims +8.
  // B (Q rows, non-transposed): lane l reads row l % 8 at dims 8 * (l / 8) (two k-steps per x4).
  const uint32_t k_lane = smem_u32(Kw) + uint32_t(((lane & 15) * LD + (lane >> 4) * 8) * int(sizeof(T)));
  const uint32_t q_lane = smem_u32(Qs) + uint32_t(((lane & 7) * LD + (lane >> 3) * 8) * int(sizeof(T)));
  const int64_t ntile = (key_end - key_begin + wmma_keys - 1) / wmma_keys;
  // A valid address for the zero-filling copies (nothing is read from it): K row 0, or a Q row of the CTA when K
  // is paged (its first page id may be out of range).
  const T* krow0 = Paged ? cta.q + p.q.offset(b, h0, 0, 0) : k_row_of<false>(p.k, p.pg, cta.k, b, kh, 0);
  auto issue = [&](int64_t tile, int buf) {
    if (tile < ntile) {
      const int64_t k0 = key_begin + tile * wmma_keys;  // 32-aligned
      T* dst = Kw + size_t(buf) * wmma_keys * LD;
      // The layer's K base is read from the kernel parameters here rather than held in a register across the
      // loop (ptxas then keeps the bf16 D = 128 instance at 215 registers instead of 254).
      if constexpr (Paged) {
        // Pages of a multiple of 16 tokens: the tile's two 16-key halves take one block-table lookup each.
        const bool by_half = p.pg.page_size % 16 == 0;
        const T* half[2] = {nullptr, nullptr};
        if (by_half) {
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int64_t key = k0 + 16 * hh;
            half[hh] = key < key_end ? k_row_of<true>(p.k, p.pg, p.k_of[blockIdx.z], b, kh, key) : nullptr;
            bad_page |= key < key_end && half[hh] == nullptr;
          }
        }
#pragma unroll
        for (int it = 0; it < CPR; ++it) {
          const int idx = lane + 32 * it, r = idx / CPR, c = idx - r * CPR;
          const T* row = nullptr;
          if (by_half) {
            row = half[r >> 4] != nullptr && k0 + r < key_end ? half[r >> 4] + (r & 15) * p.k.stride_token : nullptr;
          } else {
            row = k0 + r < key_end ? k_row_of<true>(p.k, p.pg, p.k_of[blockIdx.z], b, kh, k0 + r) : nullptr;
            bad_page |= k0 + r < key_end && row == nullptr;
          }
          cp_async16(smem_u32(dst + r * LD + c * 8), row != nullptr ? row + c * 8 : krow0, row != nullptr);
        }
      } else {
#pragma unroll
        for (int it = 0; it < CPR; ++it) {
          const int idx = lane + 32 * it, r = idx / CPR, c = idx - r * CPR;
          const bool ok = k0 + r < key_end;
          cp_async16(smem_u32(dst + r * LD + c * 8),
                     ok ? k_row_of<false>(p.k, p.pg, p.k_of[blockIdx.z], b, kh, k0 + r) + c * 8 : krow0, ok);
        }
      }
    }
    cp_async_commit();  // one group per tile slot, possibly empty: keeps the wait count uniform
  };
  const int stages = p.stages;
  for (int s = 0; s < stages; ++s) issue(warp + int64_t(s) * WARPS, s);

  const int64_t limit = n - w;  // keys <= limit are visible to every window query
  const float sc = p.scale_log2;
  const bool gmax = p.group == head_reduce::max;
  const int qsteps = p.WP / QS;
  uint32_t probe = 0;
  int it = 0;
  for (int64_t tile = warp; tile < ntile; tile += WARPS, ++it) {
    const int buf = stages == 2 ? (it & 1) : 0;
    if (stages == 2)
      cp_async_wait<1>();
    else
      cp_async_wait<0>();
    __syncwarp();
    // K fragments of the 32-key tile into registers (A operand: one ldmatrix.x4 per m16 tile and k-step).
    uint32_t a[2][NK * 4][4];
    {
      const uint32_t kb = k_lane + uint32_t(buf * wmma_keys * LD * int(sizeof(T)));
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int ks = 0; ks < NK * 4; ++ks) {
          ldmatrix_x4(a[m][ks], kb + uint32_t((16 * m * LD + 16 * ks) * int(sizeof(T))));
#pragma unroll
          for (int e = 0; e < 4; ++e) probe |= exp_probe<T>(a[m][ks][e]);
        }
    }
    __syncwarp();  // every lane has its fragments: the buffer may be refilled
    issue(tile + int64_t(stages) * WARPS, buf);

    const int64_t k0 = key_begin + tile * wmma_keys;
    float gs[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};  // group reduction; p >= 0, so 0 is neutral for max too
    float hs[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};  // current head: sum over its queries (this thread's part)
    // Logits of query step gi (rows 32 gi .. 32 gi + 31 of Qs; a head is qsteps consecutive steps).
    auto logits = [&](float (&acc)[2][NJ][4], int gi) {
      const int q0 = gi * QS;
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[m][j][e] = 0.0f;
#pragma unroll
      for (int kp = 0; kp < NK * 2; ++kp) {  // 32 head dims (two k-steps) at a time
        uint32_t bw[NJ][4];
#pragma unroll
        for (int j = 0; j < NJ; ++j) ldmatrix_x4(bw[j], q_lane + uint32_t(((q0 + 8 * j) * LD + 32 * kp) * int(sizeof(T))));
#pragma unroll
        for (int s = 0; s < 2; ++s)
#pragma unroll
          for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int m = 0; m < 2; ++m) mma_16816<T>(acc[m][j], a[m][2 * kp + s], bw[j][2 * s], bw[j][2 * s + 1]);
      }
    };
    // Probabilities of query step gi summed into hs (Masked: causal mask of the last w keys).
    auto probs = [&](const float (&acc)[2][NJ][4], int gi, auto masked_tag) {
      constexpr bool Masked = decltype(masked_tag)::value;
      const int q0 = gi * QS;
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        const float2 l = *reinterpret_cast<const float2*>(lse2 + q0 + 8 * j + 2 * t4);
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          float p00 = ex2_approx(fmaf(acc[m][j][0], sc, -l.x)), p01 = ex2_approx(fmaf(acc[m][j][1], sc, -l.y));
          float p10 = ex2_approx(fmaf(acc[m][j][2], sc, -l.x)), p11 = ex2_approx(fmaf(acc[m][j][3], sc, -l.y));
          if constexpr (Masked) {
            const int i0 = (gi % qsteps) * QS + 8 * j + 2 * t4;  // window query of p00 / p10
            const int64_t d0 = k0 + 16 * m + g - limit, d8 = d0 + 8;    // visible iff d <= i
            if (d0 > i0) p00 = 0.0f;
            if (d0 > i0 + 1) p01 = 0.0f;
            if (d8 > i0) p10 = 0.0f;
            if (d8 > i0 + 1) p11 = 0.0f;
          }
          hs[m][0] += p00 + p01;
          hs[m][1] += p10 + p11;
        }
      }
    };
    // End of a head: finish the sum over its queries (the quad's 4 threads) and fold it into the group value.
    auto flush = [&]() {
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float v = hs[m][r];
          v += __shfl_xor_sync(0xffffffffu, v, 1);
          v += __shfl_xor_sync(0xffffffffu, v, 2);
          gs[m][r] = gmax ? fmaxf(gs[m][r], v) : gs[m][r] + v;
          hs[m][r] = 0.0f;
        }
    };
    const int ng = hc * qsteps;
    if (k0 + wmma_keys - 1 > limit) {  // tile reaches the causal tail: one step at a time, masked
      for (int gi = 0; gi < ng; ++gi) {
        float acc[2][NJ][4];
        logits(acc, gi);
        probs(acc, gi, std::true_type{});
        if ((gi + 1) % qsteps == 0) flush();
      }
    } else {
      // Two accumulator sets: the mma of step gi + 1 is issued next to the exponentials of step gi (tensor pipe
      // and MUFU overlap inside one warp).
      float acc0[2][NJ][4], acc1[2][NJ][4];
      logits(acc0, 0);
      for (int gi = 0; gi < ng; gi += 2) {
        if (gi + 1 < ng) {
          logits(acc1, gi + 1);
          probs(acc0, gi, std::false_type{});
        } else {
          probs(acc0, gi, std::false_type{});
        }
        if ((gi + 1) % qsteps == 0) flush();
        if (gi + 1 < ng) {
          if (gi + 2 < ng) {
            logits(acc0, gi + 2);
            probs(acc1, gi + 1, std::false_type{});
          } else {
            probs(acc1, gi + 1, std::false_type{});
          }
          if ((gi + 2) % qsteps == 0) flush();
        }
      }
    }
    // Quad thread t4 writes key 16 * (t4 / 2) + 8 * (t4 % 2) + g of the tile.
    const float v = t4 == 0 ? gs[0][0] : t4 == 1 ? gs[0][1] : t4 == 2 ? gs[1][0] : gs[1][1];
    window_store_key(p, window_kvrow(p, cta.z, cta.chunk, b, kh), k0 + 16 * (t4 >> 1) + 8 * (t4 & 1) + g, key_end,
                     v, gmax, bad);
  }
  cp_async_wait<0>();
  bad |= (probe & 0x80008000u) != 0u;
  if (__syncthreads_or(bad) && threadIdx.x == 0) flag(p.status, status_nonfinite);
  if (Paged && __syncthreads_or(bad_page) && threadIdx.x == 0) flag(p.status, status_bad_page);
}

}  // namespace detail
PREFIXKV_NAMESPACE_END
