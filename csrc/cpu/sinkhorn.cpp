// Fused CPU forward of the batched log-domain Sinkhorn (the "torch" backend on CPU tensors when
// kd_kernels._C is built; math: docs/sinkhorn.md §4, code blueprint: kd_kernels/torch_impl/sinkhorn.py
// sinkhorn_fwd, whose outputs this function reproduces exactly in layout and semantics).
//
// Per problem b (one at::parallel_for task each, so one problem's M = -C/eps stays in the
// thread's cache for all iterations instead of streaming B cost matrices per pass):
//   beta_0 = 0
//   alpha_k,i = log a_i - LSE_j(M_ij + beta_{k-1,j})   (row pass: max, then sum of exp, row in L1)
//   beta_k,j  = log b_j - LSE_i(M_ij + alpha_k,i)      (column pass, row-major: running column
//                                                        max over rows, then column sums of exp)
//   P = exp(M + alpha_L 1^T + 1 beta_L^T)
// LSE follows torch.logsumexp: the shift is the max, replaced by 0 when it is +-inf (so an
// all -inf slice gives -inf, a +inf entry gives +inf). exp is a branch-free polynomial that the
// compiler vectorises (~1 ulp in fp32 and fp64); the hot loops are compiled for AVX-512, AVX2+FMA
// and baseline x86-64 (GCC target_clones; chosen once at load time by the CPU's features).
//
// Returns (plan [B, n, m] in cost's dtype, alphas [L, B, n], betas [L, B, m]) in the compute dtype
// (float64 when any input is float64, else float32). A cost with batch stride 0 (one shared
// [n, m] cost expanded over B problems) is negated once and read by all problems.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "kd_ops.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(_WIN32)
#define KD_SINKHORN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KD_SINKHORN_CLONES
#endif
#if defined(__GNUC__)
#define KD_INLINE inline __attribute__((always_inline))
#else
#define KD_INLINE inline
#endif

// Reductions the compiler may reorder into SIMD lanes (OpenMP simd; ignored without -fopenmp).
#define KD_PRAGMA(x) _Pragma(#x)
#define KD_SIMD_MAX(v) KD_PRAGMA(omp simd reduction(max : v))
#define KD_SIMD_SUM(v) KD_PRAGMA(omp simd reduction(+ : v))

namespace kd_kernels {
namespace {

// ---- a vectorisable exp: exp_poly (shared with the divergence kernels) -------------------
#define KD_EXP_INLINE KD_INLINE
#include "exp_poly.h"

// torch.logsumexp's shift: the max, or 0 where the max is +-inf.
template <typename T>
KD_INLINE T safe_shift(T mx) {
  return std::isinf(mx) ? T(0) : mx;
}

// Exact log-domain column step for column j: LSE_i(M_ij + alpha_i) (two strided passes).
template <typename T>
KD_INLINE T column_lse(const T* __restrict M, const T* __restrict alpha, int64_t n, int64_t m, int64_t j) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    const T x = M[i * m + j] + alpha[i];
    mx = x > mx ? x : mx;
  }
  const T sh = safe_shift(mx);
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += exp_poly(M[i * m + j] + alpha[i] - sh);
  return std::log(s) + sh;
}

// One problem: M [n, m] (read-only; may alias plan), a [n], log_a [n], log_b [m]; writes alpha_k
// to alphas + k * a_stride and beta_k to betas + k * b_stride, and the plan [n, m].
// work: 3 m scalars.
//
// One exp per element and iteration: the row pass computes t_ij = exp(M_ij + beta'_j - sh_i)
// (beta' = beta_{k-1}, sh_i its row max) with row sums s_i, so alpha_i = log a_i - log s_i - sh_i
// and exp(alpha_i + sh_i) = a_i / s_i = w_i. Then
//   LSE_i(M_ij + alpha_i) = log sum_i exp(M_ij + beta'_j - sh_i) exp(alpha_i + sh_i) - beta'_j
//                         = log S_j - beta'_j,     S_j = sum_i t_ij w_i,
// accumulated from the row pass's exponentials (still in L1). Exact in exact arithmetic; in
// floating point the same few-ulp error as the two-pass LSE, as long as no significant term of
// S_j underflowed: a column whose S_j is below W 2^-60 (fp32; 2^-600 fp64; W = max_i w_i), or not
// finite, or whose beta'_j is not finite, is recomputed by the exact log-domain column pass.
template <typename T>
KD_INLINE void solve_one(const T* __restrict M, T* plan, const T* __restrict a, const T* __restrict log_a,
                         const T* __restrict log_b, T* __restrict alphas, int64_t a_stride, T* __restrict betas,
                         int64_t b_stride, int64_t n, int64_t m, int64_t iters, T* __restrict work) {
  T* __restrict tmp = work;        // t_i. of the current row
  T* __restrict colS = work + m;   // S_j
  T* __restrict zeros = work + 2 * m;  // beta_0 = 0
  for (int64_t j = 0; j < m; ++j) zeros[j] = 0;
  const T ninf = -std::numeric_limits<T>::infinity();
  const T rel_floor = std::is_same_v<T, float> ? T(8.673617379884035e-19) : T(2.409919865102884e-181);  // 2^-60, 2^-600
  const T* beta_prev = zeros;
  T* alpha = alphas;
  T* beta = betas;
  for (int64_t k = 0; k < iters; ++k) {
    alpha = alphas + k * a_stride;
    beta = betas + k * b_stride;
    for (int64_t j = 0; j < m; ++j) colS[j] = 0;
    T wmax = 0;
    bool rows_ok = true;
    // ---- row update alpha_i = log a_i - LSE_j(M_ij + beta'_j), and S_j += t_ij w_i
    for (int64_t i = 0; i < n; ++i) {
      const T* __restrict row = M + i * m;
      T mx = ninf;
      KD_SIMD_MAX(mx)
      for (int64_t j = 0; j < m; ++j) {
        const T x = row[j] + beta_prev[j];
        mx = x > mx ? x : mx;
      }
      const T sh = safe_shift(mx);
      T s = 0;
      KD_SIMD_SUM(s)
      for (int64_t j = 0; j < m; ++j) {
        const T t = exp_poly(row[j] + beta_prev[j] - sh);
        tmp[j] = t;
        s += t;
      }
      alpha[i] = log_a[i] - (std::log(s) + sh);
      const T w = a[i] / s;
      rows_ok = rows_ok && std::isfinite(mx) && std::isfinite(w) && w >= 0;
      wmax = w > wmax ? w : wmax;
      for (int64_t j = 0; j < m; ++j) colS[j] += tmp[j] * w;
    }
    // ---- column update beta_j = log b_j - LSE_i(M_ij + alpha_i)
    const T floor = wmax * rel_floor;
    for (int64_t j = 0; j < m; ++j) {
      const T S = colS[j];
      const bool ok = rows_ok && S > floor && std::isfinite(S) && std::isfinite(beta_prev[j]);
      const T lse = ok ? std::log(S) - beta_prev[j] : column_lse(M, alpha, n, m, j);
      beta[j] = log_b[j] - lse;
    }
    beta_prev = beta;
  }
  // ---- plan: P_ij = exp(M_ij + alpha_i + beta_j)   (same association as the torch path)
  for (int64_t i = 0; i < n; ++i) {
    const T* row = M + i * m;
    T* out = plan + i * m;
    const T ai = alpha[i];
    for (int64_t j = 0; j < m; ++j) out[j] = exp_poly(row[j] + ai + beta[j]);
  }
}

KD_SINKHORN_CLONES
void solve_range(const float* M, int64_t M_bstride, float* plan, const float* a, const float* log_a, const float* log_b,
                     float* alphas, float* betas, int64_t nb, int64_t n, int64_t m, int64_t iters, int64_t b0,
                     int64_t b1) {
  std::vector<float> work(3 * m);
  for (int64_t b = b0; b < b1; ++b) {
    solve_one<float>(M + b * M_bstride, plan + b * n * m, a + b * n, log_a + b * n, log_b + b * m, alphas + b * n, nb * n,
                     betas + b * m, nb * m, n, m, iters, work.data());
  }
}

KD_SINKHORN_CLONES
void solve_range(const double* M, int64_t M_bstride, double* plan, const double* a, const double* log_a, const double* log_b,
                     double* alphas, double* betas, int64_t nb, int64_t n, int64_t m, int64_t iters, int64_t b0,
                     int64_t b1) {
  std::vector<double> work(3 * m);
  for (int64_t b = b0; b < b1; ++b) {
    solve_one<double>(M + b * M_bstride, plan + b * n * m, a + b * n, log_a + b * n, log_b + b * m, alphas + b * n, nb * n,
                      betas + b * m, nb * m, n, m, iters, work.data());
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_fwd_cpu(const at::Tensor& cost, const at::Tensor& a,
                                                                const at::Tensor& b, double epsilon,
                                                                int64_t n_iters) {
  TORCH_CHECK(cost.device().is_cpu() && a.device().is_cpu() && b.device().is_cpu(),
              "sinkhorn_fwd_cpu: cost, a and b must be CPU tensors");
  TORCH_CHECK(cost.dim() == 3, "sinkhorn_fwd_cpu: cost must be [B, n, m], got ", cost.sizes());
  TORCH_CHECK(cost.is_floating_point() && a.is_floating_point() && b.is_floating_point(),
              "sinkhorn_fwd_cpu: cost, a and b must be floating tensors");
  TORCH_CHECK(n_iters >= 1, "sinkhorn_fwd_cpu: n_iters must be >= 1, got ", n_iters);
  TORCH_CHECK(epsilon > 0, "sinkhorn_fwd_cpu: epsilon must be > 0, got ", epsilon);
  const int64_t nb = cost.size(0), n = cost.size(1), m = cost.size(2);
  TORCH_CHECK(a.dim() == 2 && a.size(0) == nb && a.size(1) == n, "sinkhorn_fwd_cpu: a must be [B, n] = [", nb,
              ", ", n, "], got ", a.sizes());
  TORCH_CHECK(b.dim() == 2 && b.size(0) == nb && b.size(1) == m, "sinkhorn_fwd_cpu: b must be [B, m] = [", nb,
              ", ", m, "], got ", b.sizes());
  // The torch path's dtype rule: float64 when any input is float64, else float32.
  at::ScalarType dt = at::kFloat;
  for (const at::Tensor* t : {&cost, &a, &b}) dt = at::promote_types(dt, t->scalar_type());
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "sinkhorn_fwd_cpu: unsupported dtype combination");

  const auto opts = cost.options().dtype(dt);
  at::Tensor plan = at::empty({nb, n, m}, opts);
  at::Tensor alphas = at::empty({n_iters, nb, n}, opts);
  at::Tensor betas = at::empty({n_iters, nb, m}, opts);
  if (nb == 0 || n == 0 || m == 0) return {plan.to(cost.scalar_type()), alphas, betas};

  const at::Tensor a_c = a.to(dt).contiguous();
  const at::Tensor log_a = at::log(a_c);
  const at::Tensor log_b = at::log(b.to(dt)).contiguous();
  // M = C / -eps, as the torch path computes it (a division, not a multiply by 1/eps).
  const bool shared = nb > 1 && cost.stride(0) == 0;
  at::Tensor neg;
  int64_t m_bstride = 0;
  if (shared) {
    neg = at::div(cost.select(0, 0).to(dt), -epsilon).contiguous();  // read by every problem
  } else {
    at::div_out(plan, cost.to(dt), -epsilon);  // M in the plan buffer, overwritten by P per problem
    neg = plan;
    m_bstride = n * m;
  }
  const int64_t iters = n_iters;
  AT_DISPATCH_FLOATING_TYPES(dt, "sinkhorn_fwd_cpu", [&] {
    const scalar_t* M = neg.const_data_ptr<scalar_t>();
    scalar_t* P = plan.mutable_data_ptr<scalar_t>();
    const scalar_t* ac = a_c.const_data_ptr<scalar_t>();
    const scalar_t* la = log_a.const_data_ptr<scalar_t>();
    const scalar_t* lb = log_b.const_data_ptr<scalar_t>();
    scalar_t* al = alphas.mutable_data_ptr<scalar_t>();
    scalar_t* be = betas.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      solve_range(M, m_bstride, P, ac, la, lb, al, be, nb, n, m, iters, b0, b1);
    });
  });
  return {plan.to(cost.scalar_type()), alphas, betas};
}

}  // namespace kd_kernels
