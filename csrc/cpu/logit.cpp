// CPU kernels of the logit divergences (KD, forward KL, reverse KL, generalised JSD, TVD):
// forward (row loss, lse of both rows) and the student backward, one fused loop nest per row,
// rows in parallel (at::parallel_for). Math: docs/logit.md §3-6; the PyTorch path
// (kd_kernels/torch_impl/logit.py) is the blueprint and the fallback (float64, no extension).
//
// Why a C++ kernel: the PyTorch path makes ~30 small ATen passes per forward + backward (each a
// rows x vocab temporary), slower on CPU than the naive log_softmax formulation at typical
// sizes. Here a row is read 2-4 times from cache and nothing of size rows x vocab is allocated
// besides the gradient.
//
// Per row, u = z / T, v = u - max u (float32 inputs; sums in float blocks of 256, then float64):
//   pass 1   m_s = max u_s, m_t = max u_t                      (NaN-sticky: NaN in, NaN out)
//   pass 2   S_s = sum e^{v_s}, S_t = sum e^{v_t}, lse = m + log S, and for
//            kd / forward_kl   A = sum e^{v_t} (v_t - v_s)  ->  KL(p||q) = A / S_t - log S_t + log S_s
//            reverse_kl        A = sum e^{v_s} (v_s - v_t)  ->  KL(q||p) = A / S_s - log S_s + log S_t
//            (jsd, tvd: the exponentials are kept in a scratch row)
//   pass 3   (jsd, tvd) the value from q = e^{v_s} / S_s, p = e^{v_t} / S_t: no exp again;
//            jsd's log M = log(b p + (1-b) q), floored by log of either term (underflow)
// Classes of probability 0 (a -inf logit: vocabulary masking) contribute no term (0 * inf = 0 is
// taken as 0, as the PyTorch path's _plog). Student backward (g_r = grad_row[r]):
//   kd          g_r T (q - p)            forward_kl   g_r (q - p) / T          (one pass)
//   reverse_kl  g_r q (d - <q, d>) / T,          d = l_s - l_t
//   jsd         g_r (1-b)/T q (d - <q, d>),      d = l_s - log M
//   tvd         g_r q (d - <q, d>) / T,          d = sign(q - p) / 2
//   the centred three in two passes: q d into the output row and q into a scratch row with
//   <q, d>, then the subtraction (the second pass has no exp or log).
// Dropped rows (keep[r] == 0) get loss 0 and gradient 0 even when they hold NaN/inf.
//
// exp and log: own polynomial versions (exp_poly.h, logit_rows.h) that the compiler vectorises inside
// `#pragma omp simd` loops (logit_rows.h; std::exp calls do not vectorise without -ffast-math); relative error
// ~2 ulp in float32, special values as std::exp/std::log (NaN, +-inf, 0; exp flushes results
// below 1.2e-38 to 0). The row loops are compiled for AVX2 + FMA and for AVX-512 (below).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "kd_ops.h"

namespace kd_kernels {
namespace {

// Row loops, compiled twice (csrc/cpu/logit_rows.h): for AVX2 + FMA and for AVX-512 (512-bit
// vectors, 1.5x the AVX2 throughput of the exp loops on Zen 4). The entry points pick the widest
// one the CPU has at run time (divergence_cpu_supported: at least AVX2 + FMA). The two differ only
// in the order of the float additions (lane counts).
constexpr int kModeReverseKl = 0, kModeJsd = 1, kModeTvd = 2;     // centred gradients
constexpr int kRowKl = 0, kRowReverseKl = 1, kRowJsd = 2, kRowTvd = 3;  // forward rows

using ForwardRow = void (*)(const float*, const float*, int64_t, float, double, float, float, float, float*, float*,
                            double&, double&, double&);
using CentredRow = void (*)(const float*, const float*, int64_t, float, float, float, float, float, float, float,
                            float*, float*);
using KlGradRow = void (*)(const float*, const float*, int64_t, float, float, float, float, float*);
struct RowKernels {
  ForwardRow forward[4];   // by kRow*
  CentredRow centred[3];   // by kMode*
  KlGradRow kl_grad;
};

#if defined(__GNUC__) && defined(__x86_64__)
#define KD_CPU_SIMD_REGION 1
#define KD_EXP_INLINE inline __attribute__((always_inline))
namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC optimize("no-trapping-math")
#include "logit_rows.h"
#pragma GCC pop_options
}  // namespace avx2
namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma,prefer-vector-width=512")
#pragma GCC optimize("no-trapping-math")
#include "logit_rows.h"
#pragma GCC pop_options
}  // namespace avx512
#endif


enum class Kind { kKd, kForwardKl, kReverseKl, kJsd, kTvd };

Kind parse_kind(const std::string& kind) {
  if (kind == "kd") return Kind::kKd;
  if (kind == "forward_kl") return Kind::kForwardKl;
  if (kind == "reverse_kl") return Kind::kReverseKl;
  if (kind == "jsd") return Kind::kJsd;
  if (kind == "tvd") return Kind::kTvd;
  TORCH_CHECK(false, "divergence_cpu: kind must be one of 'kd', 'forward_kl', 'reverse_kl', 'jsd', 'tvd', got '",
              kind, "'");
}

struct Scalars {
  float inv_t;      // 1 / T
  double t;         // T
  double log_b;     // jsd: log beta
  double log_1mb;   // jsd: log (1 - beta)
  double beta;
};


bool cpu_supported() {
#if defined(__GNUC__) && defined(__x86_64__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// The row loops in use: "avx512" where the CPU has AVX-512 (F, DQ, BW, VL), else "avx2";
// KD_KERNELS_CPU_ISA=avx2 in the environment (read once) forces the AVX2 loops (tests use it to
// cover both on one machine).
bool use_avx512() {
#ifdef KD_CPU_SIMD_REGION
  static const bool yes = [] {
    const char* forced = std::getenv("KD_KERNELS_CPU_ISA");
    if (forced != nullptr && std::string(forced) == "avx2") return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  }();
  return yes;
#else
  return false;
#endif
}

// The row loops this CPU runs (call only when cpu_supported()).
const RowKernels& rows() {
#ifdef KD_CPU_SIMD_REGION
  return use_avx512() ? avx512::row_kernels() : avx2::row_kernels();
#else
  TORCH_CHECK(false, "divergence_cpu: built without the x86-64 row loops");
#endif
}

void check_cpu() {
  TORCH_CHECK(cpu_supported(), "divergence_cpu: this CPU lacks AVX2/FMA (or is not x86-64); use the PyTorch path "
              "(kd_kernels routes there when divergence_cpu_supported() is False)");
}

void check_logits(const at::Tensor& x, const char* name);

// The checks both entry points start with: the CPU, the kind, both logits, one shape.
Kind check_call(const std::string& kind, const at::Tensor& student, const at::Tensor& teacher) {
  check_cpu();
  const Kind k = parse_kind(kind);
  check_logits(student, "student");
  check_logits(teacher, "teacher");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "divergence_cpu: student and teacher must have the same shape, got ",
              student.sizes(), " and ", teacher.sizes());
  return k;
}

void check_logits(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "divergence_cpu: ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "divergence_cpu: ", name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "divergence_cpu: ", name, " must be 2-D [N, C], got ", x.dim(), "-D");
}

void check_rows(const at::Tensor& x, int64_t n, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == dtype && x.dim() == 1 && x.size(0) == n,
              "divergence_cpu: ", name, " must be a CPU ", dtype, " tensor of shape [", n, "], got ", x.scalar_type(),
              " ", x.sizes());
}

Scalars scalars(double temperature, double beta) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, "divergence_cpu: temperature must be > 0, got ",
              temperature);
  return Scalars{static_cast<float>(1.0 / temperature), temperature, std::log(beta), std::log1p(-beta), beta};
}

// Rows per parallel task: ~16K elements (~10 us of work, well above the cost of waking a thread),
// so a 256 x 100 batch already runs on two threads and tiny ones on one.
int64_t grain(int64_t c) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(c, 1)); }

}  // namespace

bool divergence_cpu_supported() { return cpu_supported(); }

std::string divergence_cpu_isa() { return !cpu_supported() ? "none" : (use_avx512() ? "avx512" : "avx2"); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> divergence_fwd_cpu(const std::string& kind, const at::Tensor& student,
                                                                  const at::Tensor& teacher, const at::Tensor& keep,
                                                                  double temperature, double beta) {
  const Kind k = check_call(kind, student, teacher);
  const int64_t n = student.size(0), c = student.size(1);
  check_rows(keep, n, "keep", at::kBool);
  const Scalars sc = scalars(temperature, beta);
  const at::Tensor s = student.contiguous(), t = teacher.contiguous(), kp = keep.contiguous();
  auto opts = student.options();
  at::Tensor row = at::empty({n}, opts), lse_s = at::empty({n}, opts), lse_t = at::empty({n}, opts);
  const float* sp = s.data_ptr<float>();
  const float* tp = t.data_ptr<float>();
  const bool* kpp = kp.data_ptr<bool>();
  float* rp = row.data_ptr<float>();
  float* lsp = lse_s.data_ptr<float>();
  float* ltp = lse_t.data_ptr<float>();
  const int row_kind = (k == Kind::kKd || k == Kind::kForwardKl) ? kRowKl
                       : k == Kind::kReverseKl                     ? kRowReverseKl
                       : k == Kind::kJsd                           ? kRowJsd
                                                                   : kRowTvd;
  const ForwardRow row_fn = rows().forward[row_kind];
  const double t2 = k == Kind::kKd ? sc.t * sc.t : 1.0;
  const bool scratch = k == Kind::kJsd || k == Kind::kTvd;
  at::parallel_for(0, n, grain(c), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(scratch ? 2 * c : 0);  // the row's exponentials for pass 3
    for (int64_t r = begin; r < end; ++r) {
      double ls, lt, value;
      row_fn(sp + r * c, tp + r * c, c, sc.inv_t, t2, static_cast<float>(sc.beta), static_cast<float>(sc.log_b),
             static_cast<float>(sc.log_1mb), buf.data(), buf.data() + (scratch ? c : 0), ls, lt, value);
      // NaN/inf in the row made ls or lt non-finite: the value is NaN (the PyTorch path's rule)
      if (!(std::isfinite(ls) && std::isfinite(lt))) value = std::numeric_limits<double>::quiet_NaN();
      lsp[r] = static_cast<float>(ls);
      ltp[r] = static_cast<float>(lt);
      rp[r] = kpp[r] ? static_cast<float>(value) : 0.0f;
    }
  });
  return {row, lse_s, lse_t};
}

at::Tensor divergence_bwd_cpu(const std::string& kind, const at::Tensor& grad_row, const at::Tensor& student,
                              const at::Tensor& teacher, const at::Tensor& lse_s, const at::Tensor& lse_t,
                              const at::Tensor& keep, double temperature, double beta) {
  const Kind k = check_call(kind, student, teacher);
  const int64_t n = student.size(0), c = student.size(1);
  check_rows(grad_row, n, "grad_row", at::kFloat);
  check_rows(lse_s, n, "lse_s", at::kFloat);
  check_rows(lse_t, n, "lse_t", at::kFloat);
  check_rows(keep, n, "keep", at::kBool);
  const Scalars sc = scalars(temperature, beta);
  const at::Tensor s = student.contiguous(), t = teacher.contiguous(), g = grad_row.contiguous();
  const at::Tensor a = lse_s.contiguous(), b = lse_t.contiguous(), kp = keep.contiguous();
  at::Tensor out = at::empty({n, c}, student.options());
  const float* sp = s.data_ptr<float>();
  const float* tp = t.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  const bool* kpp = kp.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const float log_b = static_cast<float>(sc.log_b), log_1mb = static_cast<float>(sc.log_1mb);
  const bool centred = !(k == Kind::kKd || k == Kind::kForwardKl);
  const CentredRow centred_fn =
      rows().centred[k == Kind::kReverseKl ? kModeReverseKl : (k == Kind::kJsd ? kModeJsd : kModeTvd)];
  const KlGradRow kl_fn = rows().kl_grad;
  const float scale = k == Kind::kKd           ? static_cast<float>(sc.t)
                      : k == Kind::kJsd        ? static_cast<float>((1.0 - sc.beta) / sc.t)
                                               : sc.inv_t;
  const float beta_f = static_cast<float>(sc.beta);
  at::parallel_for(0, n, grain(c), [&](int64_t begin, int64_t end) {
    std::vector<float> q_buf(centred ? c : 0);
    for (int64_t r = begin; r < end; ++r) {
      float* orow = op + r * c;
      if (!kpp[r]) {
        std::fill(orow, orow + c, 0.0f);
        continue;
      }
      const float w = gp[r] * scale;
      if (centred) {
        centred_fn(sp + r * c, tp + r * c, c, sc.inv_t, ap[r], bp[r], beta_f, log_b, log_1mb, w, q_buf.data(), orow);
      } else {
        kl_fn(sp + r * c, tp + r * c, c, sc.inv_t, ap[r], bp[r], w, orow);
      }
    }
  });
  return out;
}

}  // namespace kd_kernels
