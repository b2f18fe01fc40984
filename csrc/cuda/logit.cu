// Hinton knowledge distillation (forward KL with temperature; math: docs/logit.md): CUDA row kernels.
//
// Functions of kd_kernels._C (declared in include/kd_ops.h, bound in kd_kernels.cpp):
//   kd_fwd_cuda(student, teacher, temperature: float) -> (row_loss, lse_s, lse_t)
//   kd_bwd_cuda(grad_row, student, teacher, lse_s, lse_t, temperature: float) -> grad_student
// student, teacher: logits [N, C] of one floating dtype (float16, bfloat16, float32, float64).
// row_loss, lse_s, lse_t: [N] in the accumulation type: float32, or float64 for float64 logits.
// grad_student: [N, C] in the student's dtype. Non-contiguous inputs are copied to contiguous ones.
//
// Math, per row r (T = temperature, u_s = z_s / T, u_t = z_t / T):
//   lse_s = log Σ_c exp(u_s,c)          q_c = exp(u_s,c − lse_s)      (student)
//   lse_t = log Σ_c exp(u_t,c)          p_c = exp(u_t,c − lse_t)      (teacher)
//   row_loss = T² · KL(p ‖ q) = T² · Σ_c p_c (log p_c − log q_c)
//            = T² · (Σ_c p_c (u_t,c − u_s,c) − lse_t + lse_s)          (Σ_c p_c = 1)
// One pass computes everything: each thread keeps an online log-sum-exp state per input,
//   (m_s, S_s = Σ exp(u_s − m_s)) and (m_t, S_t = Σ exp(u_t − m_t), A = Σ exp(u_t − m_t)(u_t − u_s)),
// rescaling S (and A) by exp(m_old − m_new) when the running max grows; the block merges the
// states the same way, and Σ_c p_c (u_t,c − u_s,c) = A / S_t. Classes with p_c = 0 (teacher logit
// −inf) contribute 0, as 0·log 0 = 0 in KL.
//
// Gradient (softmax backward; for the batch mean ∂L/∂z_s = T·(q − p)/N):
//   ∂ KL(p‖q) / ∂z_s,c = (q_c − p_c) / T, so
//   ∂ row_loss / ∂z_s,c = T² · (q_c − p_c) / T = T · (q_c − p_c), and
//   grad_student[r, c] = grad_row[r] · T · (q_c − p_c),
// with q and p recomputed from the logits and the saved lse_s, lse_t (no [N, C] buffer is saved).
// The teacher gradient is not computed here (the teacher is normally detached); the Python
// wrapper computes it with PyTorch when the teacher requires grad.
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
#include <tuple>

#include "checks.h"
#include "kd_ops.h"

namespace kd_kernels {
namespace {

// Threads per row: enough that each thread reads about kElemsPerThread logits (amortises the
// block reduction over the loads), at least one warp, at most the CUDA block limit.
constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr int64_t kElemsPerThread = 8;
// grid.y (column chunks of the backward) may not exceed 65535 (CUDA limit).
constexpr int64_t kMaxGridY = 65535;

int threads_for_row(int64_t C) {
  int threads = kWarpSize;
  while (threads < kMaxThreads && static_cast<int64_t>(threads) * kElemsPerThread < C) threads *= 2;
  return threads;
}

// Online log-sum-exp state of one (partial) row; see the comment block at the top.
template <typename acc_t>
struct RowState {
  acc_t m_s;  // running max of u_s = z_s / T (−inf when empty)
  acc_t s_s;  // Σ exp(u_s − m_s)
  acc_t m_t;  // running max of u_t = z_t / T (−inf when empty)
  acc_t s_t;  // Σ exp(u_t − m_t)
  acc_t a;    // Σ exp(u_t − m_t) · (u_t − u_s)
};

// exp / log in the accumulation type (float → the single-precision intrinsics, no silent promotion).
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return ::exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return ::log(x); }

// exp(m_old − m_new), defined as 0 for an empty state (m_old = −inf), so −inf − (−inf) never occurs.
template <typename acc_t>
__device__ __forceinline__ acc_t rescale(acc_t m_old, acc_t m_new) {
  return m_old == -INFINITY ? acc_t(0) : acc_exp(m_old - m_new);
}

// x ← x ⊕ y (the states of two disjoint sets of classes).
template <typename acc_t>
__device__ __forceinline__ void merge(RowState<acc_t>& x, const RowState<acc_t>& y) {
  const acc_t ms = x.m_s > y.m_s ? x.m_s : y.m_s;
  x.s_s = x.s_s * rescale(x.m_s, ms) + y.s_s * rescale(y.m_s, ms);
  x.m_s = ms;
  const acc_t mt = x.m_t > y.m_t ? x.m_t : y.m_t;
  const acc_t fx = rescale(x.m_t, mt);
  const acc_t fy = rescale(y.m_t, mt);
  x.s_t = x.s_t * fx + y.s_t * fy;
  x.a = x.a * fx + y.a * fy;
  x.m_t = mt;
}

template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> shfl_xor(const RowState<acc_t>& x, int lane_mask) {
  RowState<acc_t> y;
  y.m_s = __shfl_xor_sync(0xffffffffu, x.m_s, lane_mask);
  y.s_s = __shfl_xor_sync(0xffffffffu, x.s_s, lane_mask);
  y.m_t = __shfl_xor_sync(0xffffffffu, x.m_t, lane_mask);
  y.s_t = __shfl_xor_sync(0xffffffffu, x.s_t, lane_mask);
  y.a = __shfl_xor_sync(0xffffffffu, x.a, lane_mask);
  return y;
}

template <typename acc_t>
__device__ __forceinline__ void warp_merge(RowState<acc_t>& x) {
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) merge(x, shfl_xor(x, mask));
}

// Forward: one block per row; blockDim.x is a multiple of 32 (at most 1024).
template <typename scalar_t, typename acc_t>
__global__ void kd_fwd_kernel(const scalar_t* __restrict__ student,  // [N, C] student logits z_s, contiguous
                              const scalar_t* __restrict__ teacher,  // [N, C] teacher logits z_t, contiguous
                              acc_t* __restrict__ row_loss,          // [N] out: T² · KL(p ‖ q) per row
                              acc_t* __restrict__ lse_s,             // [N] out: logsumexp(z_s / T) per row
                              acc_t* __restrict__ lse_t,             // [N] out: logsumexp(z_t / T) per row
                              int64_t C,                             // number of classes (row length), ≥ 1
                              acc_t inv_t,                           // 1 / T
                              acc_t t_sq) {                          // T²
  const int64_t row = blockIdx.x;
  const scalar_t* zs = student + row * C;
  const scalar_t* zt = teacher + row * C;

  RowState<acc_t> st{-INFINITY, acc_t(0), -INFINITY, acc_t(0), acc_t(0)};
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const acc_t us = static_cast<acc_t>(zs[c]) * inv_t;
    const acc_t ut = static_cast<acc_t>(zt[c]) * inv_t;
    if (us > st.m_s) {
      st.s_s = st.s_s * rescale(st.m_s, us) + acc_t(1);
      st.m_s = us;
    } else if (us != -INFINITY) {
      st.s_s += acc_exp(us - st.m_s);
    }
    const acc_t d = ut - us;
    if (ut > st.m_t) {
      const acc_t f = rescale(st.m_t, ut);
      st.s_t = st.s_t * f + acc_t(1);
      st.a = st.a * f + d;
      st.m_t = ut;
    } else if (ut != -INFINITY) {  // p_c = 0 for ut = −inf: no term (avoids 0 · inf)
      const acc_t e = acc_exp(ut - st.m_t);
      st.s_t += e;
      st.a += e * d;
    }
  }

  // Block reduction: within each warp, then the warps' states through shared memory.
  __shared__ RowState<acc_t> partial[kMaxThreads / kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  warp_merge(st);
  if (lane == 0) partial[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < n_warps ? partial[lane] : RowState<acc_t>{-INFINITY, acc_t(0), -INFINITY, acc_t(0), acc_t(0)};
    warp_merge(st);
    if (lane == 0) {
      const acc_t ls = st.m_s + acc_log(st.s_s);
      const acc_t lt = st.m_t + acc_log(st.s_t);
      lse_s[row] = ls;
      lse_t[row] = lt;
      row_loss[row] = t_sq * (st.a / st.s_t - lt + ls);
    }
  }
}

// Backward: grid (N, column chunks); each block writes a strided share of one row's gradient.
template <typename scalar_t, typename acc_t>
__global__ void kd_bwd_kernel(const acc_t* __restrict__ grad_row,     // [N] upstream gradient of row_loss
                              const scalar_t* __restrict__ student,   // [N, C] student logits z_s, contiguous
                              const scalar_t* __restrict__ teacher,   // [N, C] teacher logits z_t, contiguous
                              const acc_t* __restrict__ lse_s,        // [N] logsumexp(z_s / T) from the forward
                              const acc_t* __restrict__ lse_t,        // [N] logsumexp(z_t / T) from the forward
                              scalar_t* __restrict__ grad_student,    // [N, C] out: grad_row · T · (q − p)
                              int64_t C,                              // number of classes (row length), ≥ 1
                              acc_t inv_t,                            // 1 / T
                              acc_t temperature) {                    // T
  const int64_t row = blockIdx.x;
  const int64_t offset = row * C;
  const acc_t g = grad_row[row] * temperature;
  const acc_t ls = lse_s[row];
  const acc_t lt = lse_t[row];
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; c < C; c += stride) {
    const acc_t q = acc_exp(static_cast<acc_t>(student[offset + c]) * inv_t - ls);
    const acc_t p = acc_exp(static_cast<acc_t>(teacher[offset + c]) * inv_t - lt);
    grad_student[offset + c] = static_cast<scalar_t>(g * (q - p));
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

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                           double temperature) {
  constexpr const char* op = "kd_fwd_cuda";
  check_logits(student, teacher, temperature, op);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor zs = student.contiguous();
  const at::Tensor zt = teacher.contiguous();
  const int64_t N = zs.size(0);
  const int64_t C = zs.size(1);
  const auto stat_options = zs.options().dtype(at::toOpMathType(zs.scalar_type()));
  at::Tensor row_loss = at::empty({N}, stat_options);
  at::Tensor lse_s = at::empty({N}, stat_options);
  at::Tensor lse_t = at::empty({N}, stat_options);
  if (N == 0) return {row_loss, lse_s, lse_t};

  const int threads = threads_for_row(C);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, zs.scalar_type(), "kd_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kd_fwd_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(N), threads, 0, stream>>>(
        zs.data_ptr<scalar_t>(), zt.data_ptr<scalar_t>(), row_loss.data_ptr<acc_t>(), lse_s.data_ptr<acc_t>(),
        lse_t.data_ptr<acc_t>(), C, static_cast<acc_t>(1.0 / temperature),
        static_cast<acc_t>(temperature * temperature));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {row_loss, lse_s, lse_t};
}

at::Tensor kd_bwd_cuda(const at::Tensor& grad_row, const at::Tensor& student, const at::Tensor& teacher,
                       const at::Tensor& lse_s, const at::Tensor& lse_t, double temperature) {
  constexpr const char* op = "kd_bwd_cuda";
  check_logits(student, teacher, temperature, op);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor g = row_stat(grad_row, student, op, "grad_row");
  const at::Tensor ls = row_stat(lse_s, student, op, "lse_s");
  const at::Tensor lt = row_stat(lse_t, student, op, "lse_t");
  const at::Tensor zs = student.contiguous();
  const at::Tensor zt = teacher.contiguous();
  const int64_t N = zs.size(0);
  const int64_t C = zs.size(1);
  at::Tensor grad_student = at::empty({N, C}, zs.options());
  if (N == 0) return grad_student;

  const int threads = threads_for_row(C);
  const int64_t per_block = static_cast<int64_t>(threads) * kElemsPerThread;
  const int64_t chunks = std::min<int64_t>((C + per_block - 1) / per_block, kMaxGridY);
  const dim3 grid(static_cast<unsigned int>(N), static_cast<unsigned int>(chunks));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, zs.scalar_type(), "kd_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kd_bwd_kernel<scalar_t, acc_t><<<grid, threads, 0, stream>>>(
        g.data_ptr<acc_t>(), zs.data_ptr<scalar_t>(), zt.data_ptr<scalar_t>(), ls.data_ptr<acc_t>(),
        lt.data_ptr<acc_t>(), grad_student.data_ptr<scalar_t>(), C, static_cast<acc_t>(1.0 / temperature),
        static_cast<acc_t>(temperature));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_student;
}

}  // namespace kd_kernels
