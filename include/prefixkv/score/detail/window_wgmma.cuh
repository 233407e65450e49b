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
//! S^T = K Q^T with `wgmma.mma_async.m64n128k16` (fp32 accumulation), A = K from registers, B = Q from shared
//! memory, 3 warpgroups per CTA:
//! * Warpgroup wg takes 64-key tiles wg, wg + WGS, ...; warp w of a warpgroup stages keys 16w..16w+15 of each tile
//!   by `cp.async` into a private buffer (rows padded by 16 bytes, 1-4 stages, no barrier; the first stages are in
//!   flight while the CTA loads Q and the LSE) and loads them with ldmatrix as the A fragments (the wgmma
//!   register-A layout of a warp equals mma.sync's m16n8k16 A layout). The fragments are probed for NaN/Inf with
//!   one packed FMA per word (x * 0 is NaN exactly when x is NaN or Inf).
//! * B = the R = 128 NP Q rows of the (chunk of the) GQA group, loaded once in the 128-byte-swizzle K-major
//!   canonical layout: dims 0-63 of all R rows first (row r at 128 r bytes, 16-byte chunk c stored at chunk
//!   c ^ (r % 8)), then dims 64-127. Descriptor: start >> 4, LBO 1 (unused), SBO 1024 B (8 rows x 128 B), swizzle
//!   mode 1 (128 B); a k16 step adds 32 B, the second half of dim 128 is R * 128 bytes further, accumulator j
//!   (queries 128 j ..) 128 * 128 j bytes further. All offsets are compile-time constants added to one descriptor.
//! * Turns: the warpgroups issue their MMAs in a fixed rotation (named barriers 1 .. 3), so the tensor cores run
//!   one warpgroup's MMAs while the others compute exponentials. A turn is one accumulator (64 keys x 128 queries;
//!   a warpgroup holds one, 164 registers).
//! * Accumulator layout per warp = mma.sync's C layout (keys 16w + g, +8 x queries 8j + 2t, +1): per element one
//!   FFMA + ex2.approx + FADD, the LSE of a thread's 32 query columns in one 16-byte-aligned row (8 loads), sums per
//!   64-query block in registers, quad shuffles once per tile, the causal mask only in tiles that reach the last w
//!   keys (a separately compiled loop). Each CTA writes its head chunk's partial row with plain stores.
//! * Paged K (`Paged`): a warp's 16 keys of a tile take one block-table lookup when the page size is a multiple
//!   of 16, else one per row; an id outside the pool zero-fills the rows and sets `status_bad_page`.
//! H100, 128K-token Llama-3-8B layer: bench/score/RESULTS.md.
#pragma once

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

inline constexpr int wgmma_keys = 64;    // keys per warpgroup tile (M)
inline constexpr int wgmma_n = 128;      // queries per accumulator (N); the CTA query block is 128 or 256 rows
inline constexpr int wgmma_groups = 3;   // warpgroups per CTA
inline constexpr int wgmma_stages_max = 4;  // K stages per warp (the plan takes fewer when shared memory is short)
//! lse2 layout: per accumulator (128 query columns) a block of 4 x 36 floats; the 32 columns thread t (t = lane % 4)
//! reads, 8j + 2t and 8j + 2t + 1 for j < 16, lie at 36 t + 2j (+1): two n8 tiles per 16-byte load, the four t rows
//! in different banks.
inline constexpr int wgmma_lse_row = 36, wgmma_lse_block = 4 * wgmma_lse_row;
//! A CTA's set-up (Q block, LSE) in rounds of the split model (window_split_keys); H100, 128K Llama layer: three
//! waves of short CTAs spent ~19 % of the warps' time in the set-up, one wave of long CTAs wins.
inline constexpr int wgmma_prologue_rounds = 3;

//! Shared-memory layout of the wgmma kernel: 1024-byte alignment slack, swizzled Q (R x D), lse2 (R / 128 blocks),
//! per-warp K stages (16 rows x (D + 8)).
struct window_wgmma_smem {
  size_t q_off, lse_off, k_off, total;
  __host__ __device__ window_wgmma_smem(int R, int D, int stages, int elem_bytes, int groups) {
    auto up = [](size_t x) { return (x + 127) / 128 * 128; };
    q_off = 0;  // relative to the 1024-aligned base
    lse_off = up(size_t(R) * D * elem_bytes);
    k_off = up(lse_off + size_t(R / wgmma_n) * wgmma_lse_block * sizeof(float));
    total = 1024 + k_off + size_t(groups) * 4 * stages * 16 * size_t(D + 8) * elem_bytes;
  }
};

#if defined(PREFIXKV_SM90A)

PREFIXKV_DEVICE void wg_fence_acc(float (&acc)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(acc[i])::"memory");
}

//! d (+)= A(regs, 64x16 per warpgroup) * B(desc, 16x128), m64n128k16; `accumulate == 0` overwrites.
template <class T>
PREFIXKV_DEVICE void wgmma_m64n128k16(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PKV_WGMMA_ARGS \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31, " \
  "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, " \
  "{%64,%65,%66,%67}, %68, p, 1, 1, 0;\n}\n"
#define PKV_WGMMA_OPS \
  : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate) \
  : "memory"
  if constexpr (std::is_same<T, bf16>::value) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " PKV_WGMMA_ARGS PKV_WGMMA_OPS);
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " PKV_WGMMA_ARGS PKV_WGMMA_OPS);
  }
#undef PKV_WGMMA_ARGS
#undef PKV_WGMMA_OPS
#else
  (void)d, (void)a, (void)desc_b, (void)accumulate;
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

//! Named barrier `Id` of the warpgroups' turns, 256 threads (id 0 is __syncthreads): `Wait` = bar.sync (blocks
//! until the previous warpgroup's 128 threads have arrived), else bar.arrive (does not wait).
template <bool Wait, int Id>
PREFIXKV_DEVICE void turn_bar() {
  if constexpr (Wait)
    asm volatile("bar.sync %0, 256;\n" ::"n"(Id) : "memory");
  else
    asm volatile("bar.arrive %0, 256;\n" ::"n"(Id) : "memory");
}

//! acc = w * 0 + acc on packed halves: acc stays +-0 unless some element of w was NaN or Inf (then NaN sticks).
template <class T>
PREFIXKV_DEVICE void probe_nonfinite2(uint32_t& acc, uint32_t w) {
  if constexpr (std::is_same<T, bf16>::value)
    asm("fma.rn.bf16x2 %0, %1, %2, %0;\n" : "+r"(acc) : "r"(w), "r"(0u));
  else
    asm("fma.rn.f16x2 %0, %1, %2, %0;\n" : "+r"(acc) : "r"(w), "r"(0u));
}

//! Probabilities of one accumulator (64 keys x queries q0 .. q0 + 127 of the CTA block) summed per row and
//! 64-query block into h[block][row] (h starts at 0); lse2t = the thread's row of the accumulator's lse2 block, whose
//! first 16 bytes the caller loaded already (l4_first: issued before the wait for the MMAs, so the first FFMAs do
//! not wait for shared memory).
//! `Masked`: the causal mask of the window (key t visible to window query i iff t <= n - w + i; d0 = the thread's
//! first key minus n - w, queries i of a head = block row & wp_mask).
template <bool Masked>
PREFIXKV_DEVICE void wgmma_probs(const float (&acc)[64], const float* lse2t, float4 l4_first, float sc, int64_t d0,
                                 int i0, int wp_mask, float (&h)[2][2]) {
#pragma unroll
  for (int jp = 0; jp < 8; ++jp) {  // n8 tiles 2 jp, 2 jp + 1
    const float4 l4 = jp == 0 ? l4_first : *reinterpret_cast<const float4*>(lse2t + 4 * jp);
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

//! Turns on the tensor cores: warpgroup wg waits on barrier wg + 1 (`Wait`) and signals barrier next + 1, next =
//! the following warpgroup. Immediate ids (a register id would make ptxas reserve all 16 barriers).
template <bool Wait>
PREFIXKV_DEVICE void wgmma_turn(int i) {
  if (i == 0)
    turn_bar<Wait, 1>();
  else if (i == 1)
    turn_bar<Wait, 2>();
  else
    turn_bar<Wait, 3>();
}

//! NP = accumulators per tile (CTA query block R = 128 NP rows), NK = head_dim / 64, `Paged`: K through a block
//! table. wgmma_groups (3) warpgroups; each turn issues one accumulator, so a warpgroup holds one at a time.
template <class T, int NK, int NP, bool Paged>
PREFIXKV_KERNEL void __launch_bounds__(wgmma_groups * 128, 1) window_wgmma_kernel(window_params<T> p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = 64 * NK;
  constexpr int LD = D + 8;          // K stage row length in elements (16-byte pad: conflict-free ldmatrix)
  constexpr int CPR = D / 8;         // 16-byte chunks per row
  constexpr int RPI = 32 / CPR;      // K rows one warp-wide cp.async covers
  constexpr int R = NP * wgmma_n;    // query rows of the CTA block (== p.R)
  constexpr int KS = NK * 4;         // k16 steps
  constexpr uint32_t stage_bytes = 16u * LD * sizeof(T);
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  constexpr int WGS = wgmma_groups;
  constexpr int THREADS = WGS * 128;
  constexpr int SPT = 1;          // accumulators per turn
  constexpr int TPT = NP / SPT;   // turns per tile
  const window_wgmma_smem L(R, D, p.stages, int(sizeof(T)), WGS);
  const uint32_t raw_s = smem_u32(smem_raw);
  unsigned char* base = smem_raw + ((1024u - (raw_s & 1023u)) & 1023u);
  unsigned char* Qs = base + L.q_off;
  float* lse2 = reinterpret_cast<float*>(base + L.lse_off);
  const int warp = int(threadIdx.x >> 5), lane = int(threadIdx.x & 31), g = lane >> 2, t4 = lane & 3;
  const int wg = warp >> 2, wq = warp & 3;  // warpgroup, warp inside it (keys 16 wq .. 16 wq + 15 of a tile)
  T* Kw = reinterpret_cast<T*>(base + L.k_off) + size_t(warp) * p.stages * 16 * LD;

  const window_cta<T> cta = window_cta_of(p);
  if (cta.key_begin >= cta.key_end) return;  // uniform over the CTA
  const int64_t b = cta.b, kh = cta.kh, n = cta.n, key_begin = cta.key_begin, key_end = cta.key_end, h0 = cta.h0;
  const int w = cta.w, hc = cta.hc;
  bool bad_page = false;

  // K staging: lane copies 16-byte chunk `kc` of rows kr0, kr0 + RPI, ... of its warp's 16 keys. The first stages
  // are issued before the Q block and the LSE are read, so their latencies overlap.
  const int kr0 = lane / CPR, kc = lane % CPR;
  const int64_t kts = p.k.stride_token * int64_t(sizeof(T));  // bytes from key to key
  // Strided: the lane's column of key 0 (rows follow at `kts` bytes). Paged: a valid address for the zero-filling
  // copies (nothing is read from it), a Q row of the CTA.
  const char* kcol = Paged ? reinterpret_cast<const char*>(cta.q + p.q.offset(b, h0, 0, 0))
                           : reinterpret_cast<const char*>(k_row_of<false>(p.k, p.pg, cta.k, b, kh, 0)) + kc * 16;
  const uint32_t kdst = smem_u32(Kw) + uint32_t((kr0 * LD + kc * 8) * int(sizeof(T)));
  const int64_t ntile = (key_end - key_begin + wgmma_keys - 1) / wgmma_keys;
  const int stages = p.stages;
  auto issue = [&](int64_t tile, int buf) {
    if (Paged && tile < ntile) {
      const int64_t slice = key_begin + tile * wgmma_keys + 16 * wq;  // the warp's 16 keys start here (16-aligned)
      const int64_t key0 = slice + kr0;
      const uint32_t dst = kdst + uint32_t(buf) * stage_bytes;
      if (p.pg.page_size % 16 == 0) {  // the 16 keys lie in one page: one block-table lookup
        const T* first = slice < key_end ? k_row_of<Paged>(p.k, p.pg, cta.k, b, kh, slice) : nullptr;
        bad_page |= slice < key_end && first == nullptr;
        const char* src = first != nullptr ? reinterpret_cast<const char*>(first) + kc * 16 + kr0 * kts : kcol;
#pragma unroll
        for (int it = 0; it < 16 / RPI; ++it) {
          const bool ok = first != nullptr && key0 + it * RPI < key_end;
          cp_async16(dst + uint32_t(it * RPI * LD * int(sizeof(T))), ok ? src + it * RPI * kts : kcol, ok);
        }
      } else {  // one lookup per row
#pragma unroll
        for (int it = 0; it < 16 / RPI; ++it) {
          const int64_t key = key0 + it * RPI;
          const T* row = key < key_end ? k_row_of<Paged>(p.k, p.pg, cta.k, b, kh, key) : nullptr;
          bad_page |= key < key_end && row == nullptr;
          cp_async16(dst + uint32_t(it * RPI * LD * int(sizeof(T))),
                     row != nullptr ? reinterpret_cast<const char*>(row) + kc * 16 : kcol, row != nullptr);
        }
      }
    } else if (tile < ntile) {
      const int64_t key0 = key_begin + tile * wgmma_keys + 16 * wq + kr0;
      const char* src = kcol + key0 * kts;
      const uint32_t dst = kdst + uint32_t(buf) * stage_bytes;
      if (key_begin + (tile + 1) * wgmma_keys <= key_end) {  // the whole tile is in range (uniform)
#pragma unroll
        for (int it = 0; it < 16 / RPI; ++it)
          cp_async16(dst + uint32_t(it * RPI * LD * int(sizeof(T))), src + it * RPI * kts, true);
      } else {
#pragma unroll
        for (int it = 0; it < 16 / RPI; ++it) {
          const bool ok = key0 + it * RPI < key_end;
          cp_async16(dst + uint32_t(it * RPI * LD * int(sizeof(T))), ok ? src + it * RPI * kts : kcol, ok);
        }
      }
    }
    cp_async_commit();
  };
  for (int s = 0; s < stages; ++s) issue(wg + int64_t(s) * WGS, s);

  // The LSE of query row threadIdx.x (R <= threads) and the Q rows in the swizzled canonical layout (zero rows for
  // padded queries / heads past the chunk); all loads of a thread are issued before any is used.
  static_assert(R <= THREADS, "one LSE row per thread");
  bool bad = false;
  const float lse_v = int(threadIdx.x) < R ? window_lse_raw(p, cta, int(threadIdx.x)) : INFINITY;
  constexpr int QIT = (R * CPR + THREADS - 1) / THREADS;  // 16-byte Q chunks per thread
  uint4 qv[QIT];
#pragma unroll
  for (int it = 0; it < QIT; ++it) {
    const int idx = int(threadIdx.x) + it * THREADS, r = idx / CPR, cd = idx - r * CPR;
    const int hl = r / p.WP, i = r - hl * p.WP;
    qv[it] = make_uint4(0, 0, 0, 0);
    if (idx < R * CPR && hl < hc && i < w) {
      const T* s = cta.q + p.q.offset(b, h0 + hl, i, int64_t(cd) * 8);
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
    const int idx = int(threadIdx.x) + it * THREADS, r = idx / CPR, cd = idx - r * CPR;
    if (QIT * THREADS > R * CPR && idx >= R * CPR) break;
    const uint4 v = qv[it];
    bad |= word_nonfinite<T>(v.x) | word_nonfinite<T>(v.y) | word_nonfinite<T>(v.z) | word_nonfinite<T>(v.w);
    const int hf = cd >> 3, c = cd & 7;
    *reinterpret_cast<uint4*>(Qs + size_t(hf) * R * 128 + size_t(r) * 128 + ((c ^ (r & 7)) << 4)) = v;
  }
  if (int(threadIdx.x) < R) {
    const int r = int(threadIdx.x);
    const int c = r % wgmma_n;  // column c of accumulator r / 128: thread c % 8 / 2, tile c / 8, element c % 2
    lse2[(r / wgmma_n) * wgmma_lse_block + (c % 8 / 2) * wgmma_lse_row + (c / 8) * 2 + (c & 1)] =
        window_lse2_of(p, cta, r, lse_v, bad);
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // generic stores -> tensor-core reads
  __syncthreads();

  const uint32_t k_lane = smem_u32(Kw) + uint32_t(((lane & 15) * LD + (lane >> 4) * 8) * int(sizeof(T)));
  const uint64_t qdesc = wgmma_desc_sw128(smem_u32(Qs));
  const int64_t limit = n - w;
  const float sc = p.scale_log2;
  const bool gmax = p.group == head_reduce::max;
  const int wp_mask = p.WP - 1;  // WP is 64, 128 or 256
  const int bph = p.WP / 64;     // 64-query blocks per head
  float* out_row = window_kvrow(p, cta.z, cta.chunk, b, kh);
  uint32_t probe[2] = {0u, 0u};
  int buf = 0;
  // Turns: warpgroup 0 issues first, then 1, (2,) 0, ...; each warpgroup waits for its turn before issuing MMAs and
  // then passes it on. Every warpgroup takes the same number of turns (a warpgroup without a tile in the last
  // round takes empty ones), and the last warpgroup does not pass its last turn, so every barrier phase sees
  // 128 waiting + 128 arriving threads.
  const int64_t rounds = (ntile + WGS - 1) / WGS;
  const int64_t my_tiles = (ntile - wg + WGS - 1) / WGS;
  const int64_t turns = rounds * TPT;
  int64_t turn = 0;
  auto pass = [&]() {
    if (wg + 1 < WGS || turn + 1 < turns) wgmma_turn<false>(wg + 1 == WGS ? 0 : wg + 1);
    ++turn;
  };
  if (wg == WGS - 1) turn_bar<false, 1>();
  for (int64_t it = 0; it < my_tiles; ++it) {
    const int64_t tile = it * WGS + wg;
    if (stages >= 4)
      cp_async_wait<3>();
    else if (stages == 3)
      cp_async_wait<2>();
    else if (stages == 2)
      cp_async_wait<1>();
    else
      cp_async_wait<0>();
    __syncwarp();
    uint32_t a[KS][4];
    const uint32_t kb = k_lane + uint32_t(buf) * stage_bytes;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      ldmatrix_x4(a[ks], kb + uint32_t(16 * ks * int(sizeof(T))));
#pragma unroll
      for (int e = 0; e < 4; ++e) probe_nonfinite2<T>(probe[e & 1], a[ks][e]);
    }
    __syncwarp();
    issue(tile + int64_t(stages) * WGS, buf);
    buf = buf + 1 == stages ? 0 : buf + 1;

    const int64_t k0 = key_begin + tile * wgmma_keys;
    const bool tail = k0 + wgmma_keys - 1 > limit;
    const int64_t d0 = k0 + 16 * wq + g - limit;  // key g of the warp, relative to the fully visible prefix
    float h[NP][2][2];
#pragma unroll
    for (int tb = 0; tb < TPT; ++tb) {
      float acc[SPT][64];
      wgmma_turn<true>(wg);  // this warpgroup's turn on the tensor cores
#pragma unroll
      for (int s = 0; s < SPT; ++s) wg_fence_acc(acc[s]);
      wgmma_fence();
#pragma unroll
      for (int s = 0; s < SPT; ++s) {
        const int j = tb * SPT + s;  // accumulator (queries 128 j ..)
#pragma unroll
        for (int ks = 0; ks < KS; ++ks)
          wgmma_m64n128k16<T>(acc[s], a[ks],
                              qdesc + uint64_t((j * wgmma_n * 128 + (ks >> 2) * R * 128 + (ks & 3) * 32) >> 4),
                              ks > 0 ? 1 : 0);
        wgmma_commit();
      }
      pass();
#pragma unroll
      for (int s = 0; s < SPT; ++s) {
        const int j = tb * SPT + s;
        const float* lq = lse2 + j * wgmma_lse_block + t4 * wgmma_lse_row;
        const float4 l4 = *reinterpret_cast<const float4*>(lq);
        if (s + 1 < SPT)
          wgmma_wait<1>();
        else
          wgmma_wait<0>();
        wg_fence_acc(acc[s]);
        const int i0 = j * wgmma_n + 2 * t4;
        if (tail)
          wgmma_probs<true>(acc[s], lq, l4, sc, d0, i0, wp_mask, h[j]);
        else
          wgmma_probs<false>(acc[s], lq, l4, sc, d0, 0, wp_mask, h[j]);
      }
    }
    // Group reduction of the key rows g (r = 0) and g + 8 (r = 1): the mean sums every block, the max takes the
    // largest head sum (bph consecutive blocks; padded heads sum to 0 and cannot win).
    float v[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (!gmax) {
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < NP; ++j) s += h[j][0][r] + h[j][1][r];
        v[r] = quad_sum(s);
      } else {
        float m = 0.0f, cur = 0.0f;
#pragma unroll
        for (int blk = 0; blk < 2 * NP; ++blk) {
          cur += h[blk >> 1][blk & 1][r];
          if ((blk + 1) % bph == 0) {
            m = fmaxf(m, quad_sum(cur));
            cur = 0.0f;
          }
        }
        v[r] = m;
      }
    }
    // Quad thread 0 writes key 16 wq + g, thread 1 key 16 wq + g + 8.
    if (t4 < 2) window_store_key(p, out_row, k0 + 16 * wq + 8 * t4 + g, key_end, t4 == 0 ? v[0] : v[1], gmax, bad);
  }
  while (turn < turns) {  // empty turns of the last round
    wgmma_turn<true>(wg);
    pass();
  }
  cp_async_wait<0>();
  bad |= ((probe[0] | probe[1]) & 0x7FFF7FFFu) != 0u;
  if (__syncthreads_or(bad) && threadIdx.x == 0) flag(p.status, status_nonfinite);
  if (Paged && __syncthreads_or(bad_page) && threadIdx.x == 0) flag(p.status, status_bad_page);
#else
  (void)p;
  __trap();  // PREFIXKV_SM90A defined but this body was not compiled for sm_90a: fail loudly
#endif
}

#endif  // PREFIXKV_SM90A

}  // namespace detail
PREFIXKV_NAMESPACE_END
