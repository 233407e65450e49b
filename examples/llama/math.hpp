// prefixkv-llama: the arithmetic every backend shares, so that the host and CUDA backends compute bit-identical
// logits and attention probabilities.
//
// * Every float operation is one IEEE-754 single-precision operation rounded to nearest, never fused: the device
//   uses the __fmul_rn / __fadd_rn / __fdiv_rn / __fsqrt_rn intrinsics (nvcc cannot contract them into FMA), the host
//   plain operators in a translation unit compiled with -ffp-contract=off (examples/CMakeLists.txt sets it).
// * `exp_rn` is a portable exponential built from those operations alone (range reduction by ln 2, a degree-7
//   polynomial, scaling by a power of two through the exponent bits): the same bits on the host and the device,
//   within 2 ulp of exp. The C library's expf and CUDA's expf differ from each other in the last bits.
// * Sums run in one fixed order: `dot` keeps eight partial sums (row element j goes to partial sum j % 8) combined as
//   ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7)), then the tail; every other sum runs sequentially.
// * RoPE's cos / sin come from one table computed on the host (`rope_table`) and uploaded to the device.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__CUDACC__)
#define PKL_HD __host__ __device__ __forceinline__
#else
#define PKL_HD inline
#endif

namespace prefixkv_llama {

PKL_HD float f_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
PKL_HD float f_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
PKL_HD float f_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
PKL_HD float f_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
PKL_HD float f_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
PKL_HD float f_floor(float a) {
#if defined(__CUDA_ARCH__)
  return floorf(a);
#else
  return std::floor(a);
#endif
}
//! 2^e as a float, e in [-126, 127] (exact, from the exponent bits).
PKL_HD float f_pow2i(int e) {
  const uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

//! exp(x) from single-precision operations only (see the file comment). +inf above the overflow threshold, +0 below
//! the smallest subnormal, NaN for NaN.
PKL_HD float exp_rn(float x) {
  if (!(x == x)) return x;
  if (x > 88.7228394f) return INFINITY;
  if (x < -103.972084f) return 0.0f;
  // x = k ln2 + r, |r| <= ln2 / 2 (+ rounding); ln2_hi has 15 significant bits, so k * ln2_hi is exact for |k| < 256
  const float k = f_floor(f_add(f_mul(x, 1.44269502f), 0.5f));
  const float ln2_hi = 0.693145751953125f, ln2_lo = 1.42860677e-06f;
  const float r = f_sub(f_sub(x, f_mul(k, ln2_hi)), f_mul(k, ln2_lo));
  float p = 1.98412701e-04f;  // 1/5040
  p = f_add(f_mul(p, r), 1.38888892e-03f);  // 1/720
  p = f_add(f_mul(p, r), 8.33333377e-03f);  // 1/120
  p = f_add(f_mul(p, r), 4.16666679e-02f);  // 1/24
  p = f_add(f_mul(p, r), 1.66666672e-01f);  // 1/6
  p = f_add(f_mul(p, r), 0.5f);
  p = f_add(f_mul(p, r), 1.0f);
  p = f_add(f_mul(p, r), 1.0f);
  // p * 2^k in two exact steps of normal powers of two (the second one rounds once into the subnormals)
  const int ki = static_cast<int>(k), k1 = ki / 2, k2 = ki - ki / 2;
  return f_mul(f_mul(p, f_pow2i(k1)), f_pow2i(k2));
}

//! row . x over n elements: eight partial sums, combined in a fixed tree, then the tail (see the file comment).
PKL_HD float dot(const float* row, const float* x, int n) {
  const int n8 = n - n % 8;
  float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int j = 0; j < n8; j += 8)
    for (int u = 0; u < 8; ++u) a[u] = f_add(a[u], f_mul(row[j + u], x[j + u]));
  float s = f_add(f_add(f_add(a[0], a[4]), f_add(a[1], a[5])), f_add(f_add(a[2], a[6]), f_add(a[3], a[7])));
  for (int j = n8; j < n; ++j) s = f_add(s, f_mul(row[j], x[j]));
  return s;
}

//! RMSNorm's scale 1 / sqrt(mean(x^2) + 1e-5) (sequential sum of squares).
PKL_HD float rms_scale(const float* x, int n) {
  float ss = 0.f;
  for (int i = 0; i < n; ++i) ss = f_add(ss, f_mul(x[i], x[i]));
  return f_div(1.0f, f_sqrt(f_add(f_div(ss, static_cast<float>(n)), 1e-5f)));
}
//! One element of RMSNorm's output: w * (scale * x).
PKL_HD float rms_apply(float w, float scale, float x) { return f_mul(w, f_mul(scale, x)); }

//! SwiGLU's gate: silu(h1) * h3 = h1 / (1 + exp(-h1)) * h3.
PKL_HD float silu_mul(float h1, float h3) { return f_mul(f_div(h1, f_add(1.0f, exp_rn(-h1))), h3); }

//! RoPE on one pair (a, b) with (cos, sin) = (c, s).
PKL_HD void rope_pair(float& a, float& b, float c, float s) {
  const float x = a, y = b;
  a = f_sub(f_mul(x, c), f_mul(y, s));
  b = f_add(f_mul(x, s), f_mul(y, c));
}

//! RoPE cos / sin (positions [0, positions), pairs [0, head_size / 2)): theta 10000 on pairs of adjacent dimensions,
//! angle = position * 10000^(-2i / head_size), computed once on the host.
struct rope_table {
  int pairs = 0, positions = 0;
  std::vector<float> cos, sin;  // (position, pair)
  rope_table() = default;
  rope_table(int head_size, int n_positions) : pairs(head_size / 2), positions(n_positions) {
    std::vector<float> inv(static_cast<size_t>(pairs));
    for (int i = 0; i < head_size; i += 2) inv[i / 2] = 1.0f / std::pow(10000.0f, float(i) / float(head_size));
    cos.resize(static_cast<size_t>(pairs) * positions);
    sin.resize(cos.size());
    for (int p = 0; p < positions; ++p)
      for (int i = 0; i < pairs; ++i) angle(p, inv[i], cos[size_t(p) * pairs + i], sin[size_t(p) * pairs + i]);
    inv_ = inv;
  }
  //! cos / sin of pair i at position pos (positions past the table are computed the same way).
  void at(int pos, int i, float& c, float& s) const {
    if (pos >= 0 && pos < positions) {
      c = cos[size_t(pos) * pairs + i];
      s = sin[size_t(pos) * pairs + i];
    } else {
      angle(pos, inv_[size_t(i)], c, s);
    }
  }

 private:
  static void angle(int pos, float inv_freq, float& c, float& s) {
    const float ang = float(pos) * inv_freq;
    c = std::cos(ang);
    s = std::sin(ang);
  }
  std::vector<float> inv_;
};

}  // namespace prefixkv_llama
