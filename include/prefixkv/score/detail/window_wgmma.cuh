//! \file prefixkv/score/detail/window_wgmma.cuh
//! Private to score.cuh (included after window_mma.cuh): the Hopper (sm_90a) variant of the tensor-core
//! accumulate pass of the window scorer, for f16/bf16, head_dim 64 or 128, 16-byte-aligned K rows and a CTA
//! query block of 128 or 256 rows (heads x padded window; padded window 64, 128 or 256).
//!
//! Opt-in: compiled and dispatched only when the translation unit defines `PREFIXKV_SM90A` (the build must then
//! target sm_90a ONLY for that translation unit, e.g. `-gencode=arch=compute_90a,code=sm_90a`; a body compiled for
//! another target traps, so a misconfigured build fails loudly instead of returning zeros) and the device is
//! compute capability 9.0. Otherwise window_mma.cuh (mma.sync) runs.
//!
//! EXPERIMENT (seventh session; slower than the three-warpgroup kernel of the previous commit, kept only in
//! history): S^T = K Q^T with `wgmma.mma_async.m64n128k16` (fp32 accumulation), A = K and B = Q both from shared
//! memory (128-byte swizzle). Two warpgroups (256 threads); K tiles go through a ring of `stages` stages filled by
//! their readers with cp.async (arrival on the stage's "full" mbarrier when the copies land) and released on its
//! "empty" mbarrier once the MMAs on it completed. With a 256-row query block warpgroup c takes accumulator c of
//! every tile and the two combine per-key partials through a two-slot shared buffer; with 128 rows they take
//! alternate tiles. The MMAs of the next tile run while the previous tile becomes probabilities.
//! H100, 128K-token Llama-3-8B layer: bench/score/RESULTS.md.
#pragma once

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

inline constexpr int wgmma_keys = 64;       // keys per tile (M)
inline constexpr int wgmma_n = 128;         // queries per accumulator (N); the CTA query block is 128 or 256 rows
inline constexpr int wgmma_threads = 256;   // two warpgroups
inline constexpr int wgmma_stages_max = 8;  // K stages (the plan takes fewer when shared memory is short)
//! lse2 layout: per accumulator (128 query columns) a block of 4 x 36 floats; the 32 columns thread t (t = lane % 4)
//! reads, 8j + 2t and 8j + 2t + 1 for j < 16, lie at 36 t + 2j (+1): two n8 tiles per 16-byte load, the four t rows
//! in different banks.
inline constexpr int wgmma_lse_row = 36, wgmma_lse_block = 4 * wgmma_lse_row;
//! A CTA's set-up (Q block, LSE) in rounds of the split model (window_split_keys); H100, 128K Llama layer: three
//! waves of short CTAs spent ~19 % of the warps' time in the set-up, one wave of long CTAs wins.
inline constexpr int wgmma_prologue_rounds = 3;

//! Shared-memory layout of the wgmma kernel: 1024-byte alignment slack, swizzled Q (R x D), lse2 (R floats), the
//! combine buffer (2 slots x 64 keys), full + empty mbarriers per stage, K stages (64 rows x D, swizzled like Q).
struct window_wgmma_smem {
  size_t q_off, lse_off, x_off, bar_off, k_off, total;
  __host__ __device__ window_wgmma_smem(int R, int D, int stages, int elem_bytes) {
    auto up = [](size_t x) { return (x + 127) / 128 * 128; };
    q_off = 0;  // relative to the 1024-aligned base
    lse_off = up(size_t(R) * D * elem_bytes);
    x_off = up(lse_off + size_t(R / wgmma_n) * wgmma_lse_block * sizeof(float));
    bar_off = up(x_off + 2 * size_t(wgmma_keys) * sizeof(float));
    k_off = (bar_off + 16 * size_t(stages) + 1023) / 1024 * 1024;  // swizzle atoms are 1024-byte aligned
    total = 1024 + k_off + size_t(stages) * wgmma_keys * size_t(D) * elem_bytes;
  }
};

#if defined(PREFIXKV_SM90A)

PREFIXKV_DEVICE void wg_fence_acc(float (&acc)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(acc[i])::"memory");
}

//! d (+)= A(desc, 64x16) * B(desc, 16x128), m64n128k16, both K-major in shared memory; `accumulate == 0`
//! overwrites.
template <class T>
PREFIXKV_DEVICE void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PKV_WGMMA_ARGS \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31, " \
  "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, " \
  "%64, %65, p, 1, 1, 0, 0;\n}\n"
#define PKV_WGMMA_OPS \
  : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
  : "l"(desc_a), "l"(desc_b), "r"(accumulate) \
  : "memory"
  if constexpr (std::is_same<T, bf16>::value) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " PKV_WGMMA_ARGS PKV_WGMMA_OPS);
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " PKV_WGMMA_ARGS PKV_WGMMA_OPS);
  }
#undef PKV_WGMMA_ARGS
#undef PKV_WGMMA_OPS
#else
  (void)d, (void)desc_a, (void)desc_b, (void)accumulate;
#endif
}

PREFIXKV_DEVICE void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
PREFIXKV_DEVICE void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
PREFIXKV_DEVICE void wgmma_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

//! 128-byte-swizzle K-major descriptor (start address in bytes, shared window). Adding `bytes >> 4` to the result
//! moves the start address (the 14-bit field cannot carry: shared addresses are below 256 KB).
PREFIXKV_DEVICE uint64_t wgmma_desc_sw128(uint32_t addr) {
  return uint64_t((addr & 0x3FFFFu) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

//! Named barrier `Id` over `Count` threads (id 0 is __syncthreads): `Wait` = bar.sync, else bar.arrive.
template <bool Wait, int Id, int Count = 256>
PREFIXKV_DEVICE void named_bar() {
  if constexpr (Wait)
    asm volatile("bar.sync %0, %1;\n" ::"n"(Id), "n"(Count) : "memory");
  else
    asm volatile("bar.arrive %0, %1;\n" ::"n"(Id), "n"(Count) : "memory");
}

//! acc = w * 0 + acc on packed halves: acc stays +-0 unless some element of w was NaN or Inf (then NaN sticks).
template <class T>
PREFIXKV_DEVICE void probe_nonfinite2(uint32_t& acc, uint32_t w) {
  if constexpr (std::is_same<T, bf16>::value)
    asm("fma.rn.bf16x2 %0, %1, %2, %0;\n" : "+r"(acc) : "r"(w), "r"(0u));
  else
    asm("fma.rn.f16x2 %0, %1, %2, %0;\n" : "+r"(acc) : "r"(w), "r"(0u));
}

//! Probabilities of one accumulator (64 keys x the 128 queries of the warpgroup) summed per row and 64-query block
//! into h[block][row]; lse2t = the thread's row of the accumulator's lse2 block.
//! `Masked`: the causal mask of the window (key t visible to window query i iff t <= n - w + i; d0 = the thread's
//! first key minus n - w, queries i of a head = block row & wp_mask).
template <bool Masked>
PREFIXKV_DEVICE void wgmma_probs(const float (&acc)[64], const float* lse2t, float sc, int64_t d0, int i0,
                                 int wp_mask, float (&h)[2][2]) {
#pragma unroll
  for (int jp = 0; jp < 8; ++jp) {  // n8 tiles 2 jp, 2 jp + 1
    const float4 l4 = *reinterpret_cast<const float4*>(lse2t + 4 * jp);
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int j = 2 * jp + u;
      const float lx = u == 0 ? l4.x : l4.z, ly = u == 0 ? l4.y : l4.w;
      float p00 = ex2_approx(fmaf(acc[4 * j + 0], sc, -lx)), p01 = ex2_approx(fmaf(acc[4 * j + 1], sc, -ly));
      float p10 = ex2_approx(fmaf(acc[4 * j + 2], sc, -lx)), p11 = ex2_approx(fmaf(acc[4 * j + 3], sc, -ly));
      if constexpr (Masked) {
        const int i = (i0 + 8 * j) & wp_mask;
        p00 = d0 > i ? 0.0f : p00;
        p01 = d0 > i + 1 ? 0.0f : p01;
        p10 = d0 + 8 > i ? 0.0f : p10;
        p11 = d0 + 8 > i + 1 ? 0.0f : p11;
      }
      if (j % 8 == 0) {
        h[j >> 3][0] = p00 + p01;
        h[j >> 3][1] = p10 + p11;
      } else {
        h[j >> 3][0] += p00 + p01;
        h[j >> 3][1] += p10 + p11;
      }
    }
  }
}

PREFIXKV_DEVICE float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

//! NK = head_dim / 64, NP = accumulators per tile (CTA query block R = 128 NP rows).
template <class T, int NK, int NP>
PREFIXKV_KERNEL void __launch_bounds__(wgmma_threads, 1) window_wgmma_kernel(window_params<T> p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = 64 * NK;
  constexpr int CPR = D / 8;       // 16-byte chunks per row
  constexpr int R = NP * wgmma_n;  // query rows of the CTA block (== p.R)
  constexpr int KS = NK * 4;       // k16 steps
  constexpr int CT = 256;          // consumer threads
  constexpr uint32_t row_bytes = uint32_t(D * sizeof(T));
  constexpr uint32_t stage_bytes = uint32_t(wgmma_keys * D * sizeof(T));
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const int S = p.stages;
  const window_wgmma_smem L(R, D, S, int(sizeof(T)));
  const uint32_t raw_s = smem_u32(smem_raw);
  unsigned char* base = smem_raw + ((1024u - (raw_s & 1023u)) & 1023u);
  unsigned char* Qs = base + L.q_off;
  float* lse2 = reinterpret_cast<float*>(base + L.lse_off);
  float* xbuf = reinterpret_cast<float*>(base + L.x_off);
  const uint32_t full0 = smem_u32(base + L.bar_off), empty0 = full0 + 8u * uint32_t(S);
  const uint32_t kst0 = smem_u32(base + L.k_off);
  const int warp = int(threadIdx.x >> 5), lane = int(threadIdx.x & 31), c = warp >> 2;

  const window_cta cta = window_cta_of(p);
  if (cta.key_begin >= cta.key_end) return;  // uniform over the CTA
  const int64_t Hk = p.k.heads, b = cta.b, kh = cta.kh, n = cta.n, key_begin = cta.key_begin, key_end = cta.key_end,
                h0 = cta.h0;
  const int w = cta.w, hc = cta.hc;
  const int ntile = int((key_end - key_begin + wgmma_keys - 1) / wgmma_keys);
  // Tile t goes into stage t % S (use t / S of it). Its readers (both warpgroups with NP = 2, warpgroup t % 2
  // with NP = 1; S is even then, so a stage's tiles all belong to one warpgroup) also fill it, with cp.async (each
  // thread arrives on "full" when its copies have landed) and release it by arriving on "empty".
  constexpr unsigned readers = NP == 2 ? 256 : 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(full0 + 8u * uint32_t(s), readers);
      mbar_init(empty0 + 8u * uint32_t(s), readers);
    }
    mbar_init_fence();
  }
  __syncthreads();
  // A thread's part of a tile: 16-byte chunk `kc` of rows kr0, kr0 + RPP, ... of the warpgroup's share (all 64
  // rows with NP = 1, rows 32 c .. 32 c + 31 with NP = 2). Rows past the CTA's last key repeat that key.
  constexpr int RPP = 128 / CPR;                    // rows per pass of a warpgroup
  constexpr int PASSES = wgmma_keys / NP / RPP;     // passes per tile
  const int lt = int(threadIdx.x & 127), kc = lt % CPR;
  const int kr0 = (NP == 2 ? 32 * c : 0) + lt / CPR;
  const char* kcol = reinterpret_cast<const char*>(p.k.row(b, kh, 0)) + kc * 16;
  const int64_t kts = p.k.stride_token * int64_t(sizeof(T));  // bytes from key to key
  // 128-byte-swizzle K-major layout as for Q: dims 0-63 of the 64 rows, then dims 64-127; chunk kc of row r at
  // (kc & 7) ^ (r & 7) (r & 7 == kr0 & 7 for all of a thread's rows, RPP being a multiple of 8).
  const uint32_t kdst = kst0 + uint32_t((kc >> 3) * wgmma_keys * 128 + kr0 * 128 + (((kc & 7) ^ (kr0 & 7)) << 4));
  auto fill = [&](int t, int s) {  // tile t into stage s = t % S, once the stage's previous use has been released
    const uint32_t dst = kdst + uint32_t(s) * stage_bytes;
    const int64_t key0 = key_begin + int64_t(t) * wgmma_keys + kr0;
#pragma unroll
    for (int i = 0; i < PASSES; ++i)
      cp_async16(dst + uint32_t(i * RPP * 128), kcol + min(key0 + i * RPP, key_end - 1) * kts);
    cp_async_mbar_arrive(full0 + 8u * uint32_t(s));
  };
  const int tstep = NP == 2 ? 1 : 2;  // tiles of this warpgroup: all (NP = 2) or every other one (NP = 1)
  const int tfirst = NP == 2 ? 0 : c;
  for (int t = tfirst; t < ntile && t < S; t += tstep) fill(t, t);

  // The LSE of query row ct (R <= 256) and the Q rows in the swizzled canonical layout (zero rows for
  // padded queries / heads past the chunk); all loads of a thread are issued before any is used.
  const int ct = int(threadIdx.x), wq = warp & 3, g = lane >> 2, t4 = lane & 3;
  const int j = NP == 2 ? c : 0;  // the warpgroup's accumulator: queries 128 j .. 128 j + 127 of the block
  bool bad = false;
  const float lse_v = ct < R ? window_lse_raw(p, cta, ct) : INFINITY;
  constexpr int QIT = R * CPR / CT;  // 16-byte Q chunks per thread
  uint4 qv[QIT];
#pragma unroll
  for (int it = 0; it < QIT; ++it) {
    const int idx = ct + it * CT, r = idx / CPR, cd = idx - r * CPR;
    const int hl = r / p.WP, i = r - hl * p.WP;
    qv[it] = make_uint4(0, 0, 0, 0);
    if (hl < hc && i < w) {
      const T* s = p.q.row(b, h0 + hl, i) + int64_t(cd) * 8 * p.q.stride_dim;
      if (p.vec_q) {
        qv[it] = *reinterpret_cast<const uint4*>(s);
      } else {
        uint16_t e[8];
#pragma unroll
        for (int x = 0; x < 8; ++x) e[x] = s[x * p.q.stride_dim].bits;
        qv[it].x = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
        qv[it].y = uint32_t(e[2]) | (uint32_t(e[3]) << 16);
        qv[it].z = uint32_t(e[4]) | (uint32_t(e[5]) << 16);
        qv[it].w = uint32_t(e[6]) | (uint32_t(e[7]) << 16);
      }
    }
  }
#pragma unroll
  for (int it = 0; it < QIT; ++it) {
    const int idx = ct + it * CT, r = idx / CPR, cd = idx - r * CPR;
    const uint4 v = qv[it];
    bad |= word_nonfinite<T>(v.x) | word_nonfinite<T>(v.y) | word_nonfinite<T>(v.z) | word_nonfinite<T>(v.w);
    const int hf = cd >> 3, cc = cd & 7;
    *reinterpret_cast<uint4*>(Qs + size_t(hf) * R * 128 + size_t(r) * 128 + ((cc ^ (r & 7)) << 4)) = v;
  }
  if (ct < R) {
    const int cc = ct % wgmma_n;  // column cc of accumulator ct / 128: thread cc % 8 / 2, tile cc / 8, element cc % 2
    lse2[(ct / wgmma_n) * wgmma_lse_block + (cc % 8 / 2) * wgmma_lse_row + (cc / 8) * 2 + (cc & 1)] =
        window_lse2_of(p, cta, ct, lse_v, bad);
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // generic stores -> tensor-core reads
  named_bar<true, 1>();                                            // the consumers' Q block and LSE are ready
  const float* lq = lse2 + j * wgmma_lse_block + t4 * wgmma_lse_row;  // the thread's LSE columns
  const uint64_t qdesc = wgmma_desc_sw128(smem_u32(Qs)) + uint64_t((j * wgmma_n * 128) >> 4);
  const int64_t limit = n - w;
  const float sc = p.scale_log2;
  const bool gmax = p.group == head_reduce::max;
  const int wp_mask = p.WP - 1;  // WP is 64, 128 or 256
  const int bph = p.WP / 64;     // 64-query blocks per head
  // Partial results of the two warpgroups (NP = 2) add for the mean and for a head spanning both accumulators
  // (WP 256), else the larger head wins.
  const bool comb_sum = !gmax || bph == 4;
  float* out_row = p.kvrows + (b * Hk + kh) * p.k.tokens;
  uint32_t probe[2] = {0u, 0u};
  // Tile t's stage (called for the warpgroup's tiles in order). The stage and phase of the current and the previous
  // tile advance by tstep (no division). First the previous tile's stage is refilled with tile t - tstep + S (its
  // readers released it when their MMAs on it completed; with one stage that is tile t's own stage, so it comes
  // before the wait), then tile t's stage is awaited, the thread's own chunks are probed for NaN/Inf, and the
  // copies (generic proxy) are ordered before the tensor cores' reads (async proxy).
  int s_cur = tfirst - tstep, s_prev = 0;
  uint32_t ph_cur = 0, ph_prev = 0;
  auto load_k = [&](int t) {
    s_prev = s_cur;
    ph_prev = ph_cur;
    s_cur += tstep;
    if (s_cur >= S) {
      s_cur -= S;
      ph_cur ^= 1u;
    }
    const int tp = t - tstep;
    if (tp >= 0 && tp + S < ntile) {
      mbar_wait(empty0 + 8u * uint32_t(s_prev), ph_prev);
      fill(tp + S, s_prev);
    }
    mbar_wait(full0 + 8u * uint32_t(s_cur), ph_cur);
    const unsigned char* own = base + (kdst - smem_u32(base)) + size_t(s_cur) * stage_bytes;
#pragma unroll
    for (int i = 0; i < PASSES; ++i) {
      const uint4 v = *reinterpret_cast<const uint4*>(own + i * RPP * 128);
      probe_nonfinite2<T>(probe[0], v.x);
      probe_nonfinite2<T>(probe[1], v.y);
      probe_nonfinite2<T>(probe[0], v.z);
      probe_nonfinite2<T>(probe[1], v.w);
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  };
  auto release = [&]() { mbar_arrive(empty0 + 8u * uint32_t(s_cur)); };  // after the MMAs on the stage completed
  auto issue = [&](float (&acc)[64]) {
    const uint64_t kdesc = wgmma_desc_sw128(kst0 + uint32_t(s_cur) * stage_bytes);
    wg_fence_acc(acc);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
      wgmma_m64n128k16<T>(acc, kdesc + uint64_t(((ks >> 2) * wgmma_keys * 128 + (ks & 3) * 32) >> 4),
                          qdesc + uint64_t(((ks >> 2) * R * 128 + (ks & 3) * 32) >> 4), ks > 0 ? 1 : 0);
    wgmma_commit();
  };
  // Probabilities of tile t, group reduction of key rows g (r = 0) and g + 8 (r = 1), combination with the other
  // warpgroup's half (NP = 2: warpgroup 1 hands its partials to warpgroup 0 through slot t % 2), store.
  auto finish = [&](const float (&acc)[64], int t) {
    const int64_t k0 = key_begin + int64_t(t) * wgmma_keys;
    const int64_t d0 = k0 + 16 * wq + g - limit;  // key g of the warp, relative to the fully visible prefix
    float h[2][2];
    if (k0 + wgmma_keys - 1 > limit)
      wgmma_probs<true>(acc, lq, sc, d0, j * wgmma_n + 2 * t4, wp_mask, h);
    else
      wgmma_probs<false>(acc, lq, sc, d0, 0, wp_mask, h);
    float v[2];
#pragma unroll
    for (int r = 0; r < 2; ++r)
      v[r] = !gmax || bph >= 2 ? quad_sum(h[0][r] + h[1][r]) : fmaxf(quad_sum(h[0][r]), quad_sum(h[1][r]));
    if constexpr (NP == 2) {  // slot t % 2; both warpgroups meet at its barrier, so a slot is rewritten only after
                              // warpgroup 0 has passed the other slot's barrier, i.e. after it read this one
      const bool odd = (t & 1) != 0;
      float* xs = xbuf + (odd ? wgmma_keys : 0) + 16 * wq + g;
      if (c == 1 && t4 < 2) xs[8 * t4] = t4 == 0 ? v[0] : v[1];
      odd ? named_bar<true, 3>() : named_bar<true, 2>();
      if (c == 1) return;
      const float o0 = xs[0], o1 = xs[8];
      v[0] = comb_sum ? v[0] + o0 : fmaxf(v[0], o0);
      v[1] = comb_sum ? v[1] + o1 : fmaxf(v[1], o1);
    }
    // Quad thread 0 writes key 16 wq + g, thread 1 key 16 wq + g + 8.
    if (t4 < 2) window_store_key(p, out_row, k0 + 16 * wq + 8 * t4 + g, key_end, t4 == 0 ? v[0] : v[1], gmax, bad);
  };

  // Tiles of this warpgroup: all (NP = 2) or every other one (NP = 1). The MMAs of the next tile run while the
  // current one becomes probabilities; every iteration ends with no MMA in flight.
  float acc0[64], acc1[64];
  int t = tfirst;
  if (t < ntile) {
    load_k(t);
    issue(acc0);
    wgmma_wait<0>();
    wg_fence_acc(acc0);
    release();
    for (;;) {
      bool more = t + tstep < ntile;
      if (more) {
        load_k(t + tstep);
        issue(acc1);
      }
      finish(acc0, t);
      wgmma_wait<0>();  // also where nothing was issued: no MMA in flight past this point
      wg_fence_acc(acc1);
      if (!more) break;
      release();
      t += tstep;
      more = t + tstep < ntile;
      if (more) {
        load_k(t + tstep);
        issue(acc0);
      }
      finish(acc1, t);
      wgmma_wait<0>();
      wg_fence_acc(acc0);
      if (!more) break;
      release();
      t += tstep;
    }
  }
  bad |= ((probe[0] | probe[1]) & 0x7FFF7FFFu) != 0u;
  if (bad) flag(p.status, status_nonfinite);
#else
  (void)p;
  __trap();  // PREFIXKV_SM90A defined but this body was not compiled for sm_90a: fail loudly
#endif
}

#endif  // PREFIXKV_SM90A

}  // namespace detail
PREFIXKV_NAMESPACE_END
