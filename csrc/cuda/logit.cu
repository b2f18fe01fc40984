// The per-row logit divergences (math: docs/logit.md sections 3-6): Hinton KD (forward KL with T²),
// reverse KL, generalized JSD(β) and TVD, as ONE kernel template over the divergence kind.
//
// Functions of kd_kernels._C (declared in include/kd_ops.h, bound in kd_kernels.cpp):
//   divergence_fwd_cuda(kind, student, teacher, temperature, beta) -> (row_loss, lse_s, lse_t)
//   divergence_bwd_cuda(kind, grad_row, student, teacher, lse_s, lse_t, temperature, beta) -> grad_student
//   kd_fwd_cuda(student, teacher, temperature)      = divergence_fwd_cuda("kd", ..., beta ignored)
//   kd_bwd_cuda(grad_row, student, teacher, lse_s, lse_t, temperature)  (the same, for the backward)
// kind: "kd" | "reverse_kl" | "jsd" | "tvd"; beta is read for "jsd" only (0 <= beta <= 1).
// student, teacher: logits [N, C] of one floating dtype (float16, bfloat16, float32, float64).
// row_loss, lse_s, lse_t: [N] in the accumulation type: float32, or float64 for float64 logits.
// grad_student: [N, C] in the student's dtype. Non-contiguous inputs are copied to contiguous ones.
//
// Math, per row r (T = temperature, u = z / T, l = log-softmax):
//   lse_s = log Σ_c exp(u_s,c)   l_s = u_s − lse_s   q = exp(l_s)      (student)
//   lse_t = log Σ_c exp(u_t,c)   l_t = u_t − lse_t   p = exp(l_t)      (teacher)
//   kd          L = T² KL(p ‖ q)      dL/dz_s = T (q − p)
//   reverse_kl  L = KL(q ‖ p)         dL/dz_s = (t − q K) / T,  t = q (l_s − l_t)
//   jsd (0<β<1) log M = logaddexp(log β + l_t, log(1 − β) + l_s)
//               L = β KL(p ‖ M) + (1 − β) KL(q ‖ M)
//                                     dL/dz_s = (1 − β)(t − q K) / T,  t = q (l_s − log M)
//       β = 0:  forward KL(p ‖ q) without T² (the kd kernels with scales 1 and 1/T)
//       β = 1:  reverse KL(q ‖ p)   (the reverse_kl kernels; TRL / Liger endpoint rule)
//   tvd         L = ½ Σ |p − q|       dL/dz_s = (t − q K) / T,  t = q h, h = ½ sign(q − p)
// with K = Σ_c t_c (a row scalar; K = L for reverse KL), and p·d = 0 where p = 0 (a −inf logit:
// vocabulary masking; 0·log 0 = 0). Each gradient row is multiplied by grad_row[r].
//
// Passes (one block per row, blockDim.x a multiple of 32, at most 1024 threads):
//   forward, kd / reverse_kl: ONE pass. Each thread keeps online log-sum-exp states
//     (m_y, S_y = Σ exp(u_y − m_y)) and (m_x, S_x = Σ exp(u_x − m_x), A = Σ exp(u_x − m_x)(u_x − u_y)),
//     x = the weighting distribution (kd: teacher, reverse_kl: student), y = the other; S (and A) are
//     rescaled by exp(m_old − m_new) when the running max grows; the block merges the states the
//     same way, and since Σ_c x_c = 1,  KL(x ‖ y) = A / S_x − lse_x + lse_y.
//   forward, jsd / tvd: the same online pass (without A) gives both lse; a second pass over the row
//     (read again, normally from L2) sums the per-class terms, which need both lse first.
//   backward, kd: one pass, grid (N, column chunks): grad_row · scale · (q − p) from the saved lse.
//   backward, reverse_kl / jsd / tvd: two passes per row (one block): K = Σ t_c, then t_c − q_c K.
// The teacher gradient is not computed here (the teacher is normally detached); the Python
// adapter in kd_kernels/ops/logit.py computes it with PyTorch when the teacher requires grad.
//
// Non-finite inputs: NaN propagates through the sums (the online updates add exp(NaN) = NaN, the
// p = 0 tests are false for NaN, and TVD's sign keeps NaN as NaN); a +inf logit makes lse = +inf
// and l = inf − inf = NaN on that class, as on the PyTorch path. No host-side NaN carrier is needed.
//
// Loads are in the input dtype; all arithmetic is in acc_t (float32, or float64 for float64 inputs).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

#include "checks.h"
#include "kd_ops.h"

namespace kd_kernels {
namespace {

// Threads per row: enough that each thread reads about kElemsPerThread logits (amortises the
// block reduction over the loads), at least one warp, at most the CUDA block limit.
constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;
constexpr int64_t kElemsPerThread = 8;
// grid.y (column chunks of the one-pass backward) may not exceed 65535 (CUDA limit).
constexpr int64_t kMaxGridY = 65535;

int threads_for_row(int64_t C) {
  int threads = kWarpSize;
  while (threads < kMaxThreads && static_cast<int64_t>(threads) * kElemsPerThread < C) threads *= 2;
  return threads;
}

// The divergence kinds of the template. kKD also serves JSD with β = 0 (forward KL without T²),
// kReverseKL serves JSD with β = 1.
enum class Div : int { kKD, kReverseKL, kJSD, kTVD };

// The forward needs the row value in the online pass (A) for the KL kinds only.
template <Div kind>
constexpr bool kOnePassForward = kind == Div::kKD || kind == Div::kReverseKL;

// Scalars of one launch, in the accumulation type (set on the host by divergence_params()).
template <typename acc_t>
struct DivParams {
  acc_t inv_t;        // 1 / T
  acc_t loss_scale;   // kd: T² (Hinton) or 1 (JSD β = 0); tvd: 1/2; reverse_kl, jsd: 1
  acc_t grad_scale;   // kd: T (Hinton) or 1/T (JSD β = 0); reverse_kl, tvd: 1/T; jsd: (1 − β)/T
  acc_t beta;         // jsd: β
  acc_t log_beta;     // jsd: log β
  acc_t log_1m_beta;  // jsd: log(1 − β)
};

// exp / log in the accumulation type (float → the single-precision functions, no silent promotion).
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return ::exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return ::log(x); }
__device__ __forceinline__ float acc_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double acc_log1p(double x) { return ::log1p(x); }
__device__ __forceinline__ float acc_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double acc_abs(double x) { return ::fabs(x); }

// exp(m_old − m_new), defined as 0 for an empty state (m_old = −inf), so −inf − (−inf) never occurs.
template <typename acc_t>
__device__ __forceinline__ acc_t rescale(acc_t m_old, acc_t m_new) {
  return m_old == -INFINITY ? acc_t(0) : acc_exp(m_old - m_new);
}

// p · d with 0 where p = 0 (a class of probability 0, where d may be NaN or ±inf); NaN p propagates.
template <typename acc_t>
__device__ __forceinline__ acc_t plog(acc_t p, acc_t d) {
  return p == acc_t(0) ? acc_t(0) : p * d;
}

// log(exp(x) + exp(y)) as torch.logaddexp: equal infinities return themselves, NaN propagates.
template <typename acc_t>
__device__ __forceinline__ acc_t logaddexp(acc_t x, acc_t y) {
  if (isinf(x) && x == y) return x;
  const acc_t m = x > y ? x : y;  // a NaN x falls to y, but then |x − y| is NaN
  return m + acc_log1p(acc_exp(-acc_abs(x - y)));
}

// Online log-sum-exp state of one (partial) row; see the comment block at the top. With kAcc the
// x-weighted log-ratio A is kept too (the KL kinds' one-pass forward).
template <typename acc_t>
struct RowState {
  acc_t m_x;  // running max of u_x (−inf when empty)
  acc_t s_x;  // Σ exp(u_x − m_x)
  acc_t m_y;  // running max of u_y (−inf when empty)
  acc_t s_y;  // Σ exp(u_y − m_y)
  acc_t a;    // Σ exp(u_x − m_x) · (u_x − u_y)   (kAcc only; else stays 0)
};

template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> empty_state() {
  return RowState<acc_t>{-INFINITY, acc_t(0), -INFINITY, acc_t(0), acc_t(0)};
}

// One class (u_x, u_y) into a thread's state.
template <bool kAcc, typename acc_t>
__device__ __forceinline__ void push(RowState<acc_t>& st, acc_t ux, acc_t uy) {
  if (uy > st.m_y) {
    st.s_y = st.s_y * rescale(st.m_y, uy) + acc_t(1);
    st.m_y = uy;
  } else if (uy != -INFINITY) {  // NaN lands here: s_y becomes NaN
    st.s_y += acc_exp(uy - st.m_y);
  }
  if (ux > st.m_x) {
    const acc_t f = rescale(st.m_x, ux);
    st.s_x = st.s_x * f + acc_t(1);
    if constexpr (kAcc) st.a = st.a * f + (ux - uy);
    st.m_x = ux;
  } else if (ux != -INFINITY) {  // x_c = 0 for u_x = −inf: no term (avoids 0 · inf)
    const acc_t e = acc_exp(ux - st.m_x);
    st.s_x += e;
    if constexpr (kAcc) st.a += e * (ux - uy);
  }
}

// x ← x ⊕ y (the states of two disjoint sets of classes).
template <bool kAcc, typename acc_t>
__device__ __forceinline__ void merge(RowState<acc_t>& x, const RowState<acc_t>& y) {
  const acc_t my = x.m_y > y.m_y ? x.m_y : y.m_y;
  x.s_y = x.s_y * rescale(x.m_y, my) + y.s_y * rescale(y.m_y, my);
  x.m_y = my;
  const acc_t mx = x.m_x > y.m_x ? x.m_x : y.m_x;
  const acc_t fx = rescale(x.m_x, mx);
  const acc_t fy = rescale(y.m_x, mx);
  x.s_x = x.s_x * fx + y.s_x * fy;
  if constexpr (kAcc) x.a = x.a * fx + y.a * fy;
  x.m_x = mx;
}

template <bool kAcc, typename acc_t>
__device__ __forceinline__ RowState<acc_t> shfl_xor(const RowState<acc_t>& x, int lane_mask) {
  RowState<acc_t> y;
  y.m_x = __shfl_xor_sync(0xffffffffu, x.m_x, lane_mask);
  y.s_x = __shfl_xor_sync(0xffffffffu, x.s_x, lane_mask);
  y.m_y = __shfl_xor_sync(0xffffffffu, x.m_y, lane_mask);
  y.s_y = __shfl_xor_sync(0xffffffffu, x.s_y, lane_mask);
  y.a = kAcc ? __shfl_xor_sync(0xffffffffu, x.a, lane_mask) : acc_t(0);
  return y;
}

template <bool kAcc, typename acc_t>
__device__ __forceinline__ void warp_merge(RowState<acc_t>& x) {
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) merge<kAcc>(x, shfl_xor<kAcc>(x, mask));
}

// The whole row's state in thread 0 (other threads: unspecified). Uses `partial` [kMaxWarps].
template <bool kAcc, typename acc_t>
__device__ __forceinline__ RowState<acc_t> block_merge(RowState<acc_t> st, RowState<acc_t>* partial) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  warp_merge<kAcc>(st);
  if (lane == 0) partial[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < n_warps ? partial[lane] : empty_state<acc_t>();
    warp_merge<kAcc>(st);
  }
  return st;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) x += __shfl_xor_sync(0xffffffffu, x, mask);
  return x;
}

// Σ over the block of x, returned to every thread. Uses `scratch` [kMaxWarps + 1]; called at
// most once per kernel (a second call would need a __syncthreads() before it).
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t x, acc_t* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  x = warp_sum(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = warp_sum(lane < n_warps ? scratch[lane] : acc_t(0));
    if (lane == 0) scratch[kMaxWarps] = x;
  }
  __syncthreads();
  return scratch[kMaxWarps];
}

// The forward's per-class term of the two-pass kinds (jsd, tvd), before loss_scale.
template <Div kind, typename acc_t>
__device__ __forceinline__ acc_t fwd_term(acc_t ls, acc_t lt, const DivParams<acc_t>& prm) {
  const acc_t q = acc_exp(ls);
  const acc_t p = acc_exp(lt);
  if constexpr (kind == Div::kJSD) {
    const acc_t lm = logaddexp(lt + prm.log_beta, ls + prm.log_1m_beta);
    return prm.beta * plog(p, lt - lm) + (acc_t(1) - prm.beta) * plog(q, ls - lm);
  } else {  // kTVD
    return acc_abs(p - q);
  }
}

// The backward's (q_c, t_c) of the two-pass kinds: dL/dz_s,c = grad_scale (t_c − q_c Σ t).
template <Div kind, typename acc_t>
__device__ __forceinline__ void bwd_term(acc_t ls, acc_t lt, const DivParams<acc_t>& prm, acc_t& q, acc_t& t) {
  q = acc_exp(ls);
  if constexpr (kind == Div::kReverseKL) {
    t = plog(q, ls - lt);
  } else if constexpr (kind == Div::kJSD) {
    t = plog(q, ls - logaddexp(lt + prm.log_beta, ls + prm.log_1m_beta));
  } else {  // kTVD: h = ½ sign(q − p), sign(0) = 0, NaN kept
    const acc_t p = acc_exp(lt);
    const acc_t h = q > p ? acc_t(0.5) : (q < p ? acc_t(-0.5) : (q == p ? acc_t(0) : q + p));
    t = q * h;
  }
}

// Forward: one block per row.
template <Div kind, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads, 1)
    divergence_fwd_kernel(const scalar_t* __restrict__ student,  // [N, C] student logits z_s, contiguous
                          const scalar_t* __restrict__ teacher,  // [N, C] teacher logits z_t, contiguous
                          acc_t* __restrict__ row_loss,          // [N] out: the row's divergence
                          acc_t* __restrict__ lse_s,             // [N] out: logsumexp(z_s / T) per row
                          acc_t* __restrict__ lse_t,             // [N] out: logsumexp(z_t / T) per row
                          int64_t C,                             // number of classes (row length), ≥ 1
                          DivParams<acc_t> prm) {
  constexpr bool kAcc = kOnePassForward<kind>;
  constexpr bool kXIsStudent = kind == Div::kReverseKL;  // x: the distribution weighting the log-ratio
  const int64_t row = blockIdx.x;
  const scalar_t* zs = student + row * C;
  const scalar_t* zt = teacher + row * C;

  RowState<acc_t> st = empty_state<acc_t>();
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const acc_t us = static_cast<acc_t>(zs[c]) * prm.inv_t;
    const acc_t ut = static_cast<acc_t>(zt[c]) * prm.inv_t;
    if constexpr (kXIsStudent) {
      push<kAcc>(st, us, ut);
    } else {
      push<kAcc>(st, ut, us);
    }
  }

  __shared__ RowState<acc_t> partial[kMaxWarps];
  st = block_merge<kAcc>(st, partial);
  if constexpr (kAcc) {
    if (threadIdx.x == 0) {
      const acc_t lx = st.m_x + acc_log(st.s_x);
      const acc_t ly = st.m_y + acc_log(st.s_y);
      lse_s[row] = kXIsStudent ? lx : ly;
      lse_t[row] = kXIsStudent ? ly : lx;
      row_loss[row] = prm.loss_scale * (st.a / st.s_x - lx + ly);
    }
  } else {
    // Both lse to every thread, then the second pass over the row.
    __shared__ acc_t lse[2];
    __shared__ acc_t scratch[kMaxWarps + 1];
    if (threadIdx.x == 0) {
      lse[0] = st.m_y + acc_log(st.s_y);  // student (x = teacher for these kinds)
      lse[1] = st.m_x + acc_log(st.s_x);  // teacher
    }
    __syncthreads();
    const acc_t ls_row = lse[0];
    const acc_t lt_row = lse[1];
    acc_t sum = acc_t(0);
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const acc_t ls = static_cast<acc_t>(zs[c]) * prm.inv_t - ls_row;
      const acc_t lt = static_cast<acc_t>(zt[c]) * prm.inv_t - lt_row;
      sum += fwd_term<kind>(ls, lt, prm);
    }
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) {
      lse_s[row] = ls_row;
      lse_t[row] = lt_row;
      row_loss[row] = prm.loss_scale * sum;
    }
  }
}

// Backward (student). kd: grid (N, column chunks), each block a strided share of one row.
// reverse_kl / jsd / tvd: grid (N, 1), one block per row, two passes (K = Σ t, then the gradient).
template <Div kind, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads, 1)
    divergence_bwd_kernel(const acc_t* __restrict__ grad_row,   // [N] upstream gradient of row_loss
                          const scalar_t* __restrict__ student,  // [N, C] student logits z_s, contiguous
                          const scalar_t* __restrict__ teacher,  // [N, C] teacher logits z_t, contiguous
                          const acc_t* __restrict__ lse_s,       // [N] logsumexp(z_s / T) from the forward
                          const acc_t* __restrict__ lse_t,       // [N] logsumexp(z_t / T) from the forward
                          scalar_t* __restrict__ grad_student,   // [N, C] out: dLoss / dz_s
                          int64_t C,                             // number of classes (row length), ≥ 1
                          DivParams<acc_t> prm) {
  const int64_t row = blockIdx.x;
  const int64_t offset = row * C;
  const acc_t g = grad_row[row] * prm.grad_scale;
  const acc_t ls_row = lse_s[row];
  const acc_t lt_row = lse_t[row];
  const int64_t start = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  if constexpr (kind == Div::kKD) {
    for (int64_t c = start; c < C; c += stride) {
      const acc_t q = acc_exp(static_cast<acc_t>(student[offset + c]) * prm.inv_t - ls_row);
      const acc_t p = acc_exp(static_cast<acc_t>(teacher[offset + c]) * prm.inv_t - lt_row);
      grad_student[offset + c] = static_cast<scalar_t>(g * (q - p));
    }
  } else {
    __shared__ acc_t scratch[kMaxWarps + 1];
    acc_t k = acc_t(0);
    for (int64_t c = start; c < C; c += stride) {  // pass 1: K = Σ t_c
      acc_t q, t;
      bwd_term<kind>(static_cast<acc_t>(student[offset + c]) * prm.inv_t - ls_row,
                     static_cast<acc_t>(teacher[offset + c]) * prm.inv_t - lt_row, prm, q, t);
      k += t;
    }
    k = block_sum(k, scratch);
    for (int64_t c = start; c < C; c += stride) {  // pass 2: grad_scale (t_c − q_c K), times grad_row
      acc_t q, t;
      bwd_term<kind>(static_cast<acc_t>(student[offset + c]) * prm.inv_t - ls_row,
                     static_cast<acc_t>(teacher[offset + c]) * prm.inv_t - lt_row, prm, q, t);
      grad_student[offset + c] = static_cast<scalar_t>(g * (t - q * k));
    }
  }
}

void check_logits(const at::Tensor& student, const at::Tensor& teacher, double temperature, const char* op) {
  check_cuda(student, op, "student");
  check_same_device(teacher, student, op, "teacher", "student");
  check_floating(student, op, "student");
  check_same_dtype(teacher, student, op, "teacher", "student");
  check_dim(student, 2, op, "student", "[N, C]");
  check_sizes(teacher, student.sizes(), op, "teacher", "[N, C] (the student's shape)");
  TORCH_CHECK(student.size(0) <= INT32_MAX, op, ": student has ", student.size(0),
              " rows; the kernels launch one block per row and support at most 2^31 - 1");
  TORCH_CHECK(student.size(1) >= 1, op, ": student must have at least one class (C >= 1), got shape ",
              student.sizes());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be a positive finite number, got ",
              temperature);
}

// A row statistic [N] of the forward (or its gradient), in the accumulation dtype, contiguous.
at::Tensor row_stat(const at::Tensor& x, const at::Tensor& student, const char* op, const char* name) {
  check_same_device(x, student, op, name, "student");
  check_floating(x, op, name);
  check_sizes(x, {student.size(0)}, op, name, "[N]");
  return x.to(at::toOpMathType(student.scalar_type())).contiguous();
}

// A resolved kind with its launch scalars (in double; cast to acc_t at the launch).
struct DivSpec {
  Div div;
  DivParams<double> prm;
};

// kind ("kd" | "reverse_kl" | "jsd" | "tvd") and beta → the kernel instance and its scalars,
// with the JSD endpoint rule (β = 0: forward KL without T², β = 1: reverse KL).
DivSpec divergence_spec(const std::string& kind, double temperature, double beta, const char* op) {
  const double inv_t = 1.0 / temperature;
  DivSpec spec{Div::kKD, DivParams<double>{inv_t, 1.0, inv_t, 0.0, 0.0, 0.0}};
  if (kind == "kd") {
    spec.prm.loss_scale = temperature * temperature;
    spec.prm.grad_scale = temperature;
  } else if (kind == "reverse_kl") {
    spec.div = Div::kReverseKL;
  } else if (kind == "tvd") {
    spec.div = Div::kTVD;
    spec.prm.loss_scale = 0.5;
  } else if (kind == "jsd") {
    TORCH_CHECK(std::isfinite(beta) && beta >= 0.0 && beta <= 1.0, op, ": beta must be in [0, 1] for kind 'jsd', got ",
                beta);
    if (beta == 0.0) {
      spec.div = Div::kKD;  // forward KL(p ‖ q), loss and gradient without T²: scales 1 and 1/T
    } else if (beta == 1.0) {
      spec.div = Div::kReverseKL;
    } else {
      spec.div = Div::kJSD;
      spec.prm.grad_scale = (1.0 - beta) * inv_t;
      spec.prm.beta = beta;
      spec.prm.log_beta = std::log(beta);
      spec.prm.log_1m_beta = std::log1p(-beta);
    }
  } else {
    TORCH_CHECK(false, op, ": kind must be one of 'kd', 'reverse_kl', 'jsd', 'tvd', got '", kind, "'");
  }
  return spec;
}

template <typename acc_t>
DivParams<acc_t> cast_params(const DivParams<double>& p) {
  return DivParams<acc_t>{static_cast<acc_t>(p.inv_t),    static_cast<acc_t>(p.loss_scale),
                          static_cast<acc_t>(p.grad_scale), static_cast<acc_t>(p.beta),
                          static_cast<acc_t>(p.log_beta), static_cast<acc_t>(p.log_1m_beta)};
}

template <Div kind, typename scalar_t, typename acc_t>
void launch_fwd(const at::Tensor& zs, const at::Tensor& zt, at::Tensor& row_loss, at::Tensor& lse_s,
                at::Tensor& lse_t, const DivParams<double>& prm, cudaStream_t stream) {
  const int64_t N = zs.size(0);
  const int64_t C = zs.size(1);
  divergence_fwd_kernel<kind, scalar_t, acc_t><<<static_cast<unsigned int>(N), threads_for_row(C), 0, stream>>>(
      zs.data_ptr<scalar_t>(), zt.data_ptr<scalar_t>(), row_loss.data_ptr<acc_t>(), lse_s.data_ptr<acc_t>(),
      lse_t.data_ptr<acc_t>(), C, cast_params<acc_t>(prm));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <Div kind, typename scalar_t, typename acc_t>
void launch_bwd(const at::Tensor& g, const at::Tensor& zs, const at::Tensor& zt, const at::Tensor& ls,
                const at::Tensor& lt, at::Tensor& grad_student, const DivParams<double>& prm, cudaStream_t stream) {
  const int64_t N = zs.size(0);
  const int64_t C = zs.size(1);
  const int threads = threads_for_row(C);
  int64_t chunks = 1;  // the two-pass kinds need the whole row in one block
  if constexpr (kind == Div::kKD) {
    const int64_t per_block = static_cast<int64_t>(threads) * kElemsPerThread;
    chunks = std::min<int64_t>((C + per_block - 1) / per_block, kMaxGridY);
  }
  const dim3 grid(static_cast<unsigned int>(N), static_cast<unsigned int>(chunks));
  divergence_bwd_kernel<kind, scalar_t, acc_t><<<grid, threads, 0, stream>>>(
      g.data_ptr<acc_t>(), zs.data_ptr<scalar_t>(), zt.data_ptr<scalar_t>(), ls.data_ptr<acc_t>(),
      lt.data_ptr<acc_t>(), grad_student.data_ptr<scalar_t>(), C, cast_params<acc_t>(prm));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> divergence_fwd_impl(const std::string& kind, const at::Tensor& student,
                                                                   const at::Tensor& teacher, double temperature,
                                                                   double beta, const char* op) {
  check_logits(student, teacher, temperature, op);
  const DivSpec spec = divergence_spec(kind, temperature, beta, op);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor zs = student.contiguous();
  const at::Tensor zt = teacher.contiguous();
  const int64_t N = zs.size(0);
  const auto stat_options = zs.options().dtype(at::toOpMathType(zs.scalar_type()));
  at::Tensor row_loss = at::empty({N}, stat_options);
  at::Tensor lse_s = at::empty({N}, stat_options);
  at::Tensor lse_t = at::empty({N}, stat_options);
  if (N == 0) return {row_loss, lse_s, lse_t};

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, zs.scalar_type(),
                                  "divergence_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    switch (spec.div) {
      case Div::kKD: launch_fwd<Div::kKD, scalar_t, acc_t>(zs, zt, row_loss, lse_s, lse_t, spec.prm, stream); break;
      case Div::kReverseKL:
        launch_fwd<Div::kReverseKL, scalar_t, acc_t>(zs, zt, row_loss, lse_s, lse_t, spec.prm, stream);
        break;
      case Div::kJSD: launch_fwd<Div::kJSD, scalar_t, acc_t>(zs, zt, row_loss, lse_s, lse_t, spec.prm, stream); break;
      case Div::kTVD: launch_fwd<Div::kTVD, scalar_t, acc_t>(zs, zt, row_loss, lse_s, lse_t, spec.prm, stream); break;
    }
  });
  return {row_loss, lse_s, lse_t};
}

at::Tensor divergence_bwd_impl(const std::string& kind, const at::Tensor& grad_row, const at::Tensor& student,
                               const at::Tensor& teacher, const at::Tensor& lse_s, const at::Tensor& lse_t,
                               double temperature, double beta, const char* op) {
  check_logits(student, teacher, temperature, op);
  const DivSpec spec = divergence_spec(kind, temperature, beta, op);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor g = row_stat(grad_row, student, op, "grad_row");
  const at::Tensor ls = row_stat(lse_s, student, op, "lse_s");
  const at::Tensor lt = row_stat(lse_t, student, op, "lse_t");
  const at::Tensor zs = student.contiguous();
  const at::Tensor zt = teacher.contiguous();
  at::Tensor grad_student = at::empty({zs.size(0), zs.size(1)}, zs.options());
  if (zs.size(0) == 0) return grad_student;

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, zs.scalar_type(),
                                  "divergence_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    switch (spec.div) {
      case Div::kKD: launch_bwd<Div::kKD, scalar_t, acc_t>(g, zs, zt, ls, lt, grad_student, spec.prm, stream); break;
      case Div::kReverseKL:
        launch_bwd<Div::kReverseKL, scalar_t, acc_t>(g, zs, zt, ls, lt, grad_student, spec.prm, stream);
        break;
      case Div::kJSD: launch_bwd<Div::kJSD, scalar_t, acc_t>(g, zs, zt, ls, lt, grad_student, spec.prm, stream); break;
      case Div::kTVD: launch_bwd<Div::kTVD, scalar_t, acc_t>(g, zs, zt, ls, lt, grad_student, spec.prm, stream); break;
    }
  });
  return grad_student;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> divergence_fwd_cuda(const std::string& kind, const at::Tensor& student,
                                                                   const at::Tensor& teacher, double temperature,
                                                                   double beta) {
  return divergence_fwd_impl(kind, student, teacher, temperature, beta, "divergence_fwd_cuda");
}

at::Tensor divergence_bwd_cuda(const std::string& kind, const at::Tensor& grad_row, const at::Tensor& student,
                               const at::Tensor& teacher, const at::Tensor& lse_s, const at::Tensor& lse_t,
                               double temperature, double beta) {
  return divergence_bwd_impl(kind, grad_row, student, teacher, lse_s, lse_t, temperature, beta, "divergence_bwd_cuda");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                           double temperature) {
  return divergence_fwd_impl("kd", student, teacher, temperature, 0.0, "kd_fwd_cuda");
}

at::Tensor kd_bwd_cuda(const at::Tensor& grad_row, const at::Tensor& student, const at::Tensor& teacher,
                       const at::Tensor& lse_s, const at::Tensor& lse_t, double temperature) {
  return divergence_bwd_impl("kd", grad_row, student, teacher, lse_s, lse_t, temperature, 0.0, "kd_bwd_cuda");
}

}  // namespace kd_kernels
