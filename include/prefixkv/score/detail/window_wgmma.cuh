//! \file prefixkv/score/detail/window_wgmma.cuh
//! Private to score.cuh (included after window_mma.cuh): the Hopper (sm_90a) variant of the tensor-core
//! accumulate pass of the window scorer, for f16/bf16, head_dim 64 or 128 and 16-byte-aligned K rows.
//!
//! Opt-in: compiled and dispatched only when the translation unit defines `PREFIXKV_SM90A` (the build must then
//! target sm_90a ONLY for that translation unit, e.g. `-gencode=arch=compute_90a,code=sm_90a`; a body compiled for
//! another target traps, so a misconfigured build fails loudly instead of returning zeros) and the device is
//! compute capability 9.0. Otherwise window_mma.cuh (mma.sync) runs.
//!
//! S^T = K Q^T with `wgmma.mma_async.m64n64k16` (fp32 accumulation), A = K from registers, B = Q from shared memory:
//! * CTA = WGS warpgroups; warpgroup wg takes 64-key tiles wg, wg + WGS, ...; warp w of a warpgroup stages keys
//!   16w..16w+15 of each tile by `cp.async` into a private buffer (rows padded by 16 bytes, 1-3 stages, no barrier)
//!   and loads them with ldmatrix as the A fragments (the wgmma register-A layout of a warp equals mma.sync's
//!   m16n8k16 A layout), probing them for NaN/Inf on the way.
//! * B = the Q rows of the (chunk of the) GQA group, loaded once in the 128-byte-swizzle K-major canonical layout:
//!   dims 0-63 of all R rows first (row r at 128 r bytes, 16-byte chunk c stored at chunk c ^ (r % 8)), then dims
//!   64-127. Descriptor: start >> 4, LBO 1 (unused), SBO 1024 B (8 rows x 128 B), swizzle mode 1 (128 B); a k16
//!   step adds 32 B, the second half of dim 128 is R * 128 bytes further.
//! * One query step = 64 queries (N = 64; window rows padded to a multiple of 64 per head, padded queries have
//!   lse2 = +inf). Two accumulator sets: the wgmma of step s + 1 runs while the exponentials of step s are computed.
//!   The accumulator layout per warp equals mma.sync's C layout (keys 16w + g, +8 x queries 8j + 2t, +1), so the
//!   per-element code (FFMA + ex2.approx, quad shuffles per head, group mean/max in registers, causal mask only in
//!   tiles that reach the last w keys) is the mma.sync kernel's.
#pragma once

PREFIXKV_NAMESPACE_BEGIN
namespace detail {

inline constexpr int wgmma_keys = 64;  // keys per warpgroup tile
inline constexpr int wgmma_qstep = 64; // queries per wgmma (N); window rows of a head padded to a multiple

//! Shared-memory layout of the wgmma kernel: 1024-byte alignment slack, swizzled Q (R x D), lse2 (R floats),
//! per-warp K stages (16 rows x (D + 8)).
struct window_wgmma_smem {
  size_t q_off, lse_off, k_off, total;
  __host__ __device__ window_wgmma_smem(int R, int D, int stages, int elem_bytes, int warps) {
    auto up = [](size_t x) { return (x + 127) / 128 * 128; };
    q_off = 0;  // relative to the 1024-aligned base
    lse_off = up(size_t(R) * D * elem_bytes);
    k_off = up(lse_off + size_t(R) * sizeof(float));
    total = 1024 + k_off + size_t(warps) * stages * 16 * size_t(D + 8) * elem_bytes;
  }
};

#if defined(PREFIXKV_SM90A)

PREFIXKV_DEVICE void wg_fence_acc(float (&acc)[32]) {
#pragma unroll
  for (int i = 0; i < 32; ++i) asm volatile("" : "+f"(acc[i])::"memory");
}

//! acc (+)= A(regs, 64x16 per warpgroup) * B(desc, 16x64), m64n64k16; `accumulate == 0` overwrites.
template <class T>
PREFIXKV_DEVICE void wgmma_m64n64k16(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PKV_WGMMA_ARGS                                                                                              \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29," \
  "%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n"
#define PKV_WGMMA_OPS                                                                                              \
  : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),     \
    "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),          \
    "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),         \
    "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])                       \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate)                                       \
  : "memory"
  if constexpr (std::is_same<T, bf16>::value) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " PKV_WGMMA_ARGS PKV_WGMMA_OPS);
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " PKV_WGMMA_ARGS PKV_WGMMA_OPS);
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

//! 128-byte-swizzle K-major descriptor (start address in bytes, shared window).
PREFIXKV_DEVICE uint64_t wgmma_desc_sw128(uint32_t addr) {
  return uint64_t((addr & 0x3FFFFu) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

template <class T, int NK, int WGS>
PREFIXKV_KERNEL void __launch_bounds__(WGS * 128, 1) window_wgmma_kernel(window_params<T> p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = 64 * NK;
  constexpr int LD = D + 8;   // K stage row length in elements (16-byte pad: conflict-free ldmatrix)
  constexpr int CPR = D / 8;  // 16-byte chunks per row
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const window_wgmma_smem L(p.R, D, p.stages, int(sizeof(T)), WGS * 4);
  const uint32_t raw_s = smem_u32(smem_raw);
  unsigned char* base = smem_raw + ((1024u - (raw_s & 1023u)) & 1023u);
  unsigned char* Qs = base + L.q_off;
  float* lse2 = reinterpret_cast<float*>(base + L.lse_off);
  const int warp = int(threadIdx.x >> 5), lane = int(threadIdx.x & 31), g = lane >> 2, t4 = lane & 3;
  const int wg = warp >> 2, wq = warp & 3;  // warpgroup, warp inside it (keys 16 wq .. 16 wq + 15 of a tile)
  T* Kw = reinterpret_cast<T*>(base + L.k_off) + size_t(warp) * p.stages * 16 * LD;

  const window_cta cta = window_cta_of(p);
  if (cta.key_begin >= cta.key_end) return;  // uniform over the CTA
  const int64_t Hk = p.k.heads, b = cta.b, kh = cta.kh, n = cta.n, key_begin = cta.key_begin, key_end = cta.key_end,
                h0 = cta.h0;
  const int w = cta.w, hc = cta.hc;
  bool bad = window_load_lse2(p, cta, lse2);
  // Q rows in the swizzled canonical layout (zero rows for padded queries / heads past the chunk).
  for (int idx = int(threadIdx.x); idx < p.R * CPR; idx += int(blockDim.x)) {
    const int r = idx / CPR, cd = idx - r * CPR;
    const int hl = r / p.WP, i = r - hl * p.WP;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (hl < hc && i < w) {
      const T* s = p.q.row(b, h0 + hl, i) + int64_t(cd) * 8 * p.q.stride_dim;
      if (p.vec_q) {
        v = *reinterpret_cast<const uint4*>(s);
      } else {
        uint16_t e[8];
#pragma unroll
        for (int x = 0; x < 8; ++x) e[x] = s[x * p.q.stride_dim].bits;
        v.x = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
        v.y = uint32_t(e[2]) | (uint32_t(e[3]) << 16);
        v.z = uint32_t(e[4]) | (uint32_t(e[5]) << 16);
        v.w = uint32_t(e[6]) | (uint32_t(e[7]) << 16);
      }
      bad |= word_nonfinite<T>(v.x) | word_nonfinite<T>(v.y) | word_nonfinite<T>(v.z) | word_nonfinite<T>(v.w);
    }
    const int hf = cd >> 3, c = cd & 7;
    *reinterpret_cast<uint4*>(Qs + size_t(hf) * p.R * 128 + size_t(r) * 128 + ((c ^ (r & 7)) << 4)) = v;
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // generic stores -> tensor-core reads
  __syncthreads();

  const uint32_t k_lane = smem_u32(Kw) + uint32_t(((lane & 15) * LD + (lane >> 4) * 8) * int(sizeof(T)));
  const uint32_t q_base = smem_u32(Qs);
  const uint32_t half_bytes = uint32_t(p.R) * 128u;
  const int64_t ntile = (key_end - key_begin + wgmma_keys - 1) / wgmma_keys;
  const T* krow0 = p.k.row(b, kh, 0);
  const int stages = p.stages;
  // Warp wq stages its 16 keys of tile `tile` into stage `buf`.
  auto issue = [&](int64_t tile, int buf) {
    if (tile < ntile) {
      const int64_t k0 = key_begin + tile * wgmma_keys + 16 * wq;
      T* dst = Kw + size_t(buf) * 16 * LD;
#pragma unroll
      for (int it = 0; it < CPR / 2; ++it) {
        const int idx = lane + 32 * it, r = idx / CPR, c = idx - r * CPR;
        const bool ok = k0 + r < key_end;
        cp_async16(smem_u32(dst + r * LD + c * 8), ok ? p.k.row(b, kh, k0 + r) + c * 8 : krow0, ok);
      }
    }
    cp_async_commit();
  };
  for (int s = 0; s < stages; ++s) issue(wg + int64_t(s) * WGS, s);

  const int64_t limit = n - w;
  const float sc = p.scale_log2;
  const bool gmax = p.group == head_reduce::max;
  const int qsteps = p.WP / wgmma_qstep;
  const int ns = hc * qsteps;
  uint32_t probe = 0;
  int it = 0;
  int buf = 0;
  for (int64_t tile = wg; tile < ntile; tile += WGS, ++it) {
    if (stages == 3)
      cp_async_wait<2>();
    else if (stages == 2)
      cp_async_wait<1>();
    else
      cp_async_wait<0>();
    __syncwarp();
    uint32_t a[NK * 4][4];
    {
      const uint32_t kb = k_lane + uint32_t(buf * 16 * LD * int(sizeof(T)));
#pragma unroll
      for (int ks = 0; ks < NK * 4; ++ks) {
        ldmatrix_x4(a[ks], kb + uint32_t(16 * ks * int(sizeof(T))));
#pragma unroll
        for (int e = 0; e < 4; ++e) probe |= exp_probe<T>(a[ks][e]);
      }
    }
    __syncwarp();
    issue(tile + int64_t(stages) * WGS, buf);
    buf = buf + 1 == stages ? 0 : buf + 1;

    const int64_t k0 = key_begin + tile * wgmma_keys;
    const bool tail = k0 + wgmma_keys - 1 > limit;
    float gs[2] = {0.0f, 0.0f};
    float hs[2] = {0.0f, 0.0f};
    auto mma = [&](float (&acc)[32], int s) {
      wg_fence_acc(acc);
      wgmma_fence();
      const uint32_t qa = q_base + uint32_t(s) * (wgmma_qstep * 128u);
#pragma unroll
      for (int ks = 0; ks < NK * 4; ++ks)
        wgmma_m64n64k16<T>(acc, a[ks], wgmma_desc_sw128(qa + uint32_t(ks >> 2) * half_bytes + uint32_t(ks & 3) * 32u),
                           ks);
      wgmma_commit();
    };
    auto probs = [&](float (&acc)[32], int s) {
      wg_fence_acc(acc);
      const int q0 = s * wgmma_qstep;
      const int i0b = (s % qsteps) * wgmma_qstep + 2 * t4;
      const int64_t d0 = k0 + 16 * wq + g - limit;  // key g of the warp, relative to the fully visible prefix
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float2 l = *reinterpret_cast<const float2*>(lse2 + q0 + 8 * j + 2 * t4);
        float p00 = ex2_approx(fmaf(acc[4 * j + 0], sc, -l.x)), p01 = ex2_approx(fmaf(acc[4 * j + 1], sc, -l.y));
        float p10 = ex2_approx(fmaf(acc[4 * j + 2], sc, -l.x)), p11 = ex2_approx(fmaf(acc[4 * j + 3], sc, -l.y));
        if (tail) {
          const int i0 = i0b + 8 * j;
          if (d0 > i0) p00 = 0.0f;
          if (d0 > i0 + 1) p01 = 0.0f;
          if (d0 + 8 > i0) p10 = 0.0f;
          if (d0 + 8 > i0 + 1) p11 = 0.0f;
        }
        hs[0] += p00 + p01;
        hs[1] += p10 + p11;
      }
      if ((s + 1) % qsteps == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float v = hs[r];
          v += __shfl_xor_sync(0xffffffffu, v, 1);
          v += __shfl_xor_sync(0xffffffffu, v, 2);
          gs[r] = gmax ? fmaxf(gs[r], v) : gs[r] + v;
          hs[r] = 0.0f;
        }
      }
    };
    // Steps in pairs: the wgmma of step s + 1 runs while the exponentials of step s are computed. No accumulator
    // is in flight across the loop's back edge (ptxas would serialise the wgmmas otherwise); the other
    // warpgroups of the CTA fill the tensor pipe while this one finishes step s + 1.
    float acc0[32], acc1[32];
    for (int s = 0; s < ns; s += 2) {
      const bool two = s + 1 < ns;
      mma(acc0, s);
      if (two) {
        mma(acc1, s + 1);
        wgmma_wait<1>();
      } else {
        wgmma_wait<0>();
      }
      probs(acc0, s);
      if (two) {
        wgmma_wait<0>();
        probs(acc1, s + 1);
      }
    }
    // Quad thread 0 writes key 16 wq + g, thread 1 key 16 wq + g + 8.
    if (t4 < 2) {
      window_store_key(p, p.kvrows + (b * Hk + kh) * p.k.tokens, k0 + 16 * wq + 8 * t4 + g, key_end,
                       t4 == 0 ? gs[0] : gs[1], gmax, bad);
    }
  }
  cp_async_wait<0>();
  bad |= (probe & 0x80008000u) != 0u;
  if (__syncthreads_or(bad) && threadIdx.x == 0) flag(p.status, status_nonfinite);
#else
  (void)p;
  __trap();  // PREFIXKV_SM90A defined but this body was not compiled for sm_90a: fail loudly
#endif
}

#endif  // PREFIXKV_SM90A

}  // namespace detail
PREFIXKV_NAMESPACE_END
