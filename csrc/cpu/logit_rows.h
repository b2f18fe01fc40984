// The per-row loops of csrc/cpu/logit.cpp (see its header comment for the math). This file is
// included twice there, once per instruction set (AVX2 + FMA, and AVX-512), each time inside its
// own namespace and `#pragma GCC target` region: no include guard on purpose, and nothing here
// may include a library header (its inline functions would be compiled for that ISA); exp_poly.h
// is the project's own, written for this.
// Every comparison may be speculated (no-trapping-math): the clamps and selects if-convert and the
// loops vectorise; no floating-point exception flag is read anywhere.

constexpr float kInf = std::numeric_limits<float>::infinity();

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

#include "exp_poly.h"  // exp_poly(float): every argument here is <= 0 up to rounding

// log(x) for float x > 0 (log(0) = -inf, negative or NaN -> NaN, +inf -> +inf): x = 2^k m with
// m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s), s = (m-1)/(m+1), |s| <= 0.172, odd series to s^9
// (rel. error ~1e-7 after rounding). Inputs below the smallest normal are treated as 0 (-inf).
inline float fast_log(float x) {
  const uint32_t bits = float_to_bits(x);
  int32_t k = static_cast<int32_t>((bits >> 23) & 0xff) - 127;
  float m = bits_to_float((bits & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  k = big ? k + 1 : k;
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float p = 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  // k ln2 with ln2 split (k * ln2_hi exact) so the sum keeps the small log m accurately
  float y = static_cast<float>(k) * 0.693359375f + (2.0f * s * p + static_cast<float>(k) * -2.12194440e-4f);
  y = x < 1.17549435e-38f ? -kInf : y;
  y = x == kInf ? kInf : y;
  return (x < 0.0f || x != x) ? std::numeric_limits<float>::quiet_NaN() : y;
}

// log M of the JSD mixture M = b p + (1 - b) q from p, q and their logs: the log of the sum, floored
// by the log of either term (exact where the sum underflows, within float rounding elsewhere).
inline float log_mixture(float p, float q, float lt, float ls, float beta, float log_b, float log_1mb) {
  const float lm = fast_log(beta * p + (1.0f - beta) * q);
  const float a = lt + log_b, b = ls + log_1mb;
  const float floor = a > b ? a : b;
  return (lm > floor ? lm : floor) + 0.0f * (p + q);  // 0 * NaN: a NaN p or q stays NaN
}

// Row maxima of u = z / T (pass 1); NaN anywhere in a row makes its maximum NaN.
void row_max(const float* s, const float* t, int64_t c, float inv_t, float& ms, float& mt) {
  float a = -kInf, b = -kInf;
  int nan_s = 0, nan_t = 0;
#pragma omp simd reduction(max : a, b) reduction(+ : nan_s, nan_t)
  for (int64_t j = 0; j < c; ++j) {
    const float us = s[j] * inv_t, ut = t[j] * inv_t;
    a = us > a ? us : a;
    b = ut > b ? ut : b;
    nan_s += us != us;
    nan_t += ut != ut;
  }
  ms = nan_s ? std::numeric_limits<float>::quiet_NaN() : a;
  mt = nan_t ? std::numeric_limits<float>::quiet_NaN() : b;
}

// Sums run in float over blocks of kBlock classes (8 SIMD lanes: 32 terms per lane, relative
// error < 2e-6 worst case) and the block sums in double: 1.5x faster than double lanes.
constexpr int64_t kBlock = 256;

// Accumulator of pass 2 (template argument: no branch inside a vectorised loop).
constexpr int kAccNone = 0, kAccForward = 1, kAccReverse = 2;

// Pass 2: S_s, S_t and the KL accumulator A (kAccForward: sum e_t (v_t - v_s), kAccReverse:
// sum e_s (v_s - v_t), v = u - max; 0 where the weight is 0: a -inf logit). Shifted by the maxima,
// a row identical up to a constant gives exactly 0 (C = 1 included). With STORE the
// exponentials go to es / et (pass 3 of jsd and tvd reads them instead of recomputing).
template <int ACC, bool STORE>
void row_sums(const float* s, const float* t, int64_t c, float inv_t, float ms, float mt, double& ss_out,
              double& st_out, double& a_out, float* es_buf, float* et_buf) {
  double ss = 0.0, st = 0.0, acc = 0.0;
  for (int64_t j0 = 0; j0 < c; j0 += kBlock) {
    const int64_t j1 = j0 + kBlock < c ? j0 + kBlock : c;
    float bs = 0.0f, bt = 0.0f, ba = 0.0f;
#pragma omp simd reduction(+ : bs, bt, ba)
    for (int64_t j = j0; j < j1; ++j) {
      const float vs = s[j] * inv_t - ms, vt = t[j] * inv_t - mt;
      const float es = exp_poly(vs), et = exp_poly(vt);
      bs += es;
      bt += et;
      if constexpr (ACC == kAccForward) {
        ba += et == 0.0f ? 0.0f : et * (vt - vs);
      } else if constexpr (ACC == kAccReverse) {
        ba += es == 0.0f ? 0.0f : es * (vs - vt);
      }
      if constexpr (STORE) {
        es_buf[j] = es;
        et_buf[j] = et;
      }
    }
    ss += bs;
    st += bt;
    acc += ba;
  }
  ss_out = ss;
  st_out = st;
  a_out = acc;
}

// Pass 3 of jsd / tvd: the row value from the stored exponentials (q = e_s / S_s, p = e_t / S_t).
template <int MODE>
double row_value(const float* s, const float* t, const float* es, const float* et, int64_t c, float inv_t,
                 float inv_ss, float inv_st, float lse_s, float lse_t, float beta, float log_b, float log_1mb) {
  double acc = 0.0;
  for (int64_t j0 = 0; j0 < c; j0 += kBlock) {
    const int64_t j1 = j0 + kBlock < c ? j0 + kBlock : c;
    float ba = 0.0f;
#pragma omp simd reduction(+ : ba)
    for (int64_t j = j0; j < j1; ++j) {
      const float q = es[j] * inv_ss, p = et[j] * inv_st;
      if constexpr (MODE == kModeTvd) {
        const float d = p - q;
        ba += 0.5f * (d < 0.0f ? -d : d);
      } else {
        const float ls = s[j] * inv_t - lse_s, lt = t[j] * inv_t - lse_t;
        const float lm = log_mixture(p, q, lt, ls, beta, log_b, log_1mb);
        const float tp = p == 0.0f ? 0.0f : p * (lt - lm);
        const float tq = q == 0.0f ? 0.0f : q * (ls - lm);
        ba += beta * tp + (1.0f - beta) * tq;
      }
    }
    acc += ba;
  }
  return acc;
}

// Student gradient of kd / forward_kl: out = w (q - p).
void grad_kl(const float* s, const float* t, int64_t c, float inv_t, float lse_s, float lse_t, float w, float* out) {
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) {
    out[j] = w * (exp_poly(s[j] * inv_t - lse_s) - exp_poly(t[j] * inv_t - lse_t));
  }
}

// Pass A of the centred gradients (reverse_kl, jsd, tvd): out = q d (0 where q = 0), q_buf = q;
// returns <q, d>. d = l_s - l_t (reverse_kl), l_s - log M (jsd), sign(q - p) / 2 (tvd, NaN kept).
template <int MODE>
double grad_pass_a(const float* s, const float* t, int64_t c, float inv_t, float lse_s, float lse_t, float beta,
                   float log_b, float log_1mb, float* out, float* q_buf) {
  double acc = 0.0;
  for (int64_t j0 = 0; j0 < c; j0 += kBlock) {
    const int64_t j1 = j0 + kBlock < c ? j0 + kBlock : c;
    float ba = 0.0f;
#pragma omp simd reduction(+ : ba)
    for (int64_t j = j0; j < j1; ++j) {
      const float ls = s[j] * inv_t - lse_s, lt = t[j] * inv_t - lse_t;
      const float q = exp_poly(ls), p = exp_poly(lt);
      float d;
      if constexpr (MODE == kModeReverseKl) {
        d = ls - lt;
      } else if constexpr (MODE == kModeJsd) {
        d = ls - log_mixture(p, q, lt, ls, beta, log_b, log_1mb);
      } else {
        const float g = q > p ? 0.5f : (q < p ? -0.5f : 0.0f);
        d = (q == q && p == p) ? g : q + p;
      }
      const float qd = q == 0.0f ? 0.0f : q * d;
      out[j] = qd;
      q_buf[j] = q;
      ba += qd;
    }
    acc += ba;
  }
  return acc;
}

// Pass B: out = w (q d - q <q, d>).
void grad_pass_b(int64_t c, float mean, float w, const float* q_buf, float* out) {
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) {
    out[j] = w * (out[j] - q_buf[j] * mean);
  }
}

// One forward row: lse_s, lse_t and the row value. KIND: kRowKl (kd with t2 = T^2, forward_kl with
// t2 = 1), kRowReverseKl, kRowJsd, kRowTvd; es / et: scratch rows of C floats (jsd, tvd).

template <int KIND>
void forward_row(const float* sr, const float* tr, int64_t c, float inv_t, double t2, float beta, float log_b,
                 float log_1mb, float* es, float* et, double& ls, double& lt, double& value) {
  constexpr bool kPass3 = KIND == kRowJsd || KIND == kRowTvd;
  constexpr int kAcc = KIND == kRowKl ? kAccForward : (KIND == kRowReverseKl ? kAccReverse : kAccNone);
  float ms, mt;
  row_max(sr, tr, c, inv_t, ms, mt);
  double ss, st, acc;
  row_sums<kAcc, kPass3>(sr, tr, c, inv_t, ms, mt, ss, st, acc, es, et);
  const double log_ss = std::log(ss), log_st = std::log(st);
  ls = static_cast<double>(ms) + log_ss;
  lt = static_cast<double>(mt) + log_st;
  if constexpr (kAcc == kAccForward) {
    value = (acc / st - log_st + log_ss) * t2;
  } else if constexpr (kAcc == kAccReverse) {
    value = acc / ss - log_ss + log_st;
  } else {
    constexpr int kMode = KIND == kRowTvd ? kModeTvd : kModeJsd;
    value = row_value<kMode>(sr, tr, es, et, c, inv_t, static_cast<float>(1.0 / ss), static_cast<float>(1.0 / st),
                             static_cast<float>(ls), static_cast<float>(lt), beta, log_b, log_1mb);
  }
}

// One centred gradient row (reverse_kl, jsd, tvd).
template <int MODE>
void grad_row_centred(const float* s, const float* t, int64_t c, float inv_t, float lse_s, float lse_t, float beta,
                      float log_b, float log_1mb, float w, float* q_buf, float* out) {
  const float mean = static_cast<float>(grad_pass_a<MODE>(s, t, c, inv_t, lse_s, lse_t, beta, log_b, log_1mb, out, q_buf));
  grad_pass_b(c, mean, w, q_buf, out);
}

// This ISA's row functions, for the drivers (a table of pointers: nothing here runs at load time).
inline const RowKernels& row_kernels() {
  static const RowKernels table{
      {forward_row<kRowKl>, forward_row<kRowReverseKl>, forward_row<kRowJsd>, forward_row<kRowTvd>},
      {grad_row_centred<kModeReverseKl>, grad_row_centred<kModeJsd>, grad_row_centred<kModeTvd>},
      grad_kl,
  };
  return table;
}
