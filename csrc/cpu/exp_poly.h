// exp_poly(float), exp_poly(double): vectorisable exp for the CPU kernels (csrc/cpu/logit.cpp via
// logit_rows.h, csrc/cpu/sinkhorn.cpp). No include and no include guard: it is included inside
// namespaces and `#pragma GCC target` regions (once per instruction set); the includer provides
// <cstdint>, <cstring>, <limits> and KD_EXP_INLINE (e.g. `inline __attribute__((always_inline))`).
// Compiled without FMA contraction, every build computes the same bits per element.

// x = k ln2 + r, |r| <= ln2/2 (Cody-Waite, two-part ln2), exp(r) by its Taylor polynomial
// (degree 7 in fp32: 5e-9 relative truncation; degree 13 in fp64: 2e-17; no FMA, so every
// build computes the same bits), times 2^k built in
// the exponent bits. Below the smallest normal result it returns 0 (exp(-inf) = 0 exactly),
// above the overflow threshold +inf; NaN stays NaN.
KD_EXP_INLINE float exp_poly(float x) {
  const float lo = -87.33654f, hi = 88.72283f;
  const bool under = x < lo;
  const bool over = x > hi;
  float xc = under ? lo : (over ? hi : x);
  const float kf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (0x1.8p23)
  float r = kf * -0.693145751953125f + xc;
  r = kf * -1.428606765330187045e-06f + r;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t k = static_cast<int32_t>(kf);
  int32_t bits = (k + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float y = p * scale;
  y = under ? 0.0f : y;
  y = over ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}

KD_EXP_INLINE double exp_poly(double x) {
  const double lo = -708.3964185322641, hi = 709.782712893384;
  const bool under = x < lo;
  const bool over = x > hi;
  double xc = under ? lo : (over ? hi : x);
  const double kf = (xc * 1.4426950408889634074 + 6755399441055744.0) - 6755399441055744.0;  // 0x1.8p52
  double r = kf * -6.93147180369123816490e-01 + xc;
  r = kf * -1.90821492927058770002e-10 + r;
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int64_t k = static_cast<int64_t>(kf);
  int64_t bits = (k + 1023) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  double y = p * scale;
  y = under ? 0.0 : y;
  y = over ? std::numeric_limits<double>::infinity() : y;
  return x != x ? x : y;
}

