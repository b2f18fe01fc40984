// The functions that kd_kernels._C exposes to Python, declared once for the kernel files (which
// define them) and for kd_kernels.cpp (which binds them with pybind11).
//
// Scheme ("no op inside an op"): the kernels are plain C++ functions bound as plain pybind11
// functions of the module kd_kernels._C, e.g. `kd_kernels._C.rkd_angle_fwd_cuda(s, t, "mean",
// "tf32x3")`. They are not torch.library ops: the Python custom ops of kd_kernels/ops/ call them from
// their CUDA implementation, so the dispatcher sees one op per loss direction, not one op inside
// another. Adding a function = its declaration here + its definition in csrc/cuda/<stem>.cu + one
// KD_KERNELS_FUNCTIONS line in kd_kernels.cpp (see csrc/README.md).
//
// The .cu files include only this header and the small ATen headers: nvcc never sees pybind11.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

namespace kd_kernels {

// ---- Hinton KD (csrc/cuda/logit.cu) --------------------------------------------------------
// student, teacher: logits [N, C], one dtype (float16, bfloat16, float32, float64).
// Returns (row_loss, lse_s, lse_t), each [N] in float32 (float64 for float64 logits).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                           double temperature);
// grad_student [N, C] in the student's dtype: grad_row[r] · T · (q − p).
at::Tensor kd_bwd_cuda(const at::Tensor& grad_row, const at::Tensor& student, const at::Tensor& teacher,
                       const at::Tensor& lse_s, const at::Tensor& lse_t, double temperature);

// ---- The divergence group: kd, reverse KL, JSD(beta), TVD (csrc/cuda/logit.cu) --------------
// One kernel template over the kind; kd_fwd_cuda / kd_bwd_cuda are its "kd" instances.
// kind: "kd" | "reverse_kl" | "jsd" | "tvd"; beta is read for "jsd" only (0 <= beta <= 1; 0 and
// 1 are forward KL without T^2 and reverse KL). Shapes and dtypes as kd_fwd_cuda / kd_bwd_cuda.
// Returns (row_loss, lse_s, lse_t), each [N] in float32 (float64 for float64 logits).
std::tuple<at::Tensor, at::Tensor, at::Tensor> divergence_fwd_cuda(const std::string& kind, const at::Tensor& student,
                                                                   const at::Tensor& teacher, double temperature,
                                                                   double beta);
// grad_student [N, C] in the student's dtype: grad_row[r] · d(row_loss[r]) / dz_s.
at::Tensor divergence_bwd_cuda(const std::string& kind, const at::Tensor& grad_row, const at::Tensor& student,
                               const at::Tensor& teacher, const at::Tensor& lse_s, const at::Tensor& lse_t,
                               double temperature, double beta);

// ---- RKD (csrc/cuda/rkd_distance.cu, csrc/cuda/rkd_angle.cu) --------------------------------
// student [N, Ds], teacher [N, Dt], float32 / float16 / bfloat16 (float64 is the torch path's);
// reduction "mean" | "sum" | "none"; precision "tf32x3" | "tf32" (fp32 products; ignored for
// half/bf16). Unneeded gradients are empty tensors (numel 0). Semantics: docs/rkd.md.
// (loss, mu_s, mu_t): loss 0-dim or [N, N] ("none") in the student's dtype; mu_* 0-dim float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rkd_distance_fwd_cuda(const at::Tensor& student,
                                                                      const at::Tensor& teacher,
                                                                      const std::string& reduction,
                                                                      const std::string& precision);
std::tuple<at::Tensor, at::Tensor> rkd_distance_bwd_cuda(const at::Tensor& grad, const at::Tensor& student,
                                                         const at::Tensor& teacher, const at::Tensor& mu_s,
                                                         const at::Tensor& mu_t, const std::string& reduction,
                                                         bool need_student, bool need_teacher,
                                                         const std::string& precision);
// loss: 0-dim or [N] ("none": per-anchor means over the N² (b, c) pairs) in the student's dtype.
at::Tensor rkd_angle_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher, const std::string& reduction,
                              const std::string& precision);
std::tuple<at::Tensor, at::Tensor> rkd_angle_bwd_cuda(const at::Tensor& grad, const at::Tensor& student,
                                                      const at::Tensor& teacher, const std::string& reduction,
                                                      bool need_student, bool need_teacher,
                                                      const std::string& precision);

// ---- Feature geometry: gram, CKA, relation, Procrustes (csrc/cuda/geometry.cu) -------------
// The streaming primitives of the D x D form (math: docs/geometry.md; the D x D epilogues are the
// shared Python code of kd_kernels/triton/geometry.py, called from kd_kernels/ops/geometry_cuda.py).
// Rows x [B, N, Ds], y / v [B, N, D*] (one dtype: float32 / float16 / bfloat16; float64 is the torch
// path's). An empty tensor (numel 0) is "none" for every optional argument: w [B, N] 0/1 row mask
// (int8 or any dtype: nonzero keeps the row), row scales [B, N], shifts / means [B, D] (fp32).
// precision "tf32x3" | "tf32" (fp32 MMA operands). Returns, all fp32:
//   (XᵀWX [B, Ds, Ds], XᵀWY [B, Ds, Dt], YᵀWY [B, Dt, Dt], Σ w x' [B, Ds], Σ w y' [B, Dt], Σ w [B])
// with x' = (x − shift_x) · rinv_x (each factor when given), likewise y'.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> geometry_products_cuda(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& w, const at::Tensor& rinv_x, const at::Tensor& rinv_y,
    const at::Tensor& shift_x, const at::Tensor& shift_y, const std::string& precision);
// W ((A − 1μ_aᵀ) P + (V − 1μ_vᵀ) Q) [B, N, Dout] (rows of A, V times ra, rv when given; no centring
// when mu_a / mu_v are empty); p [B, Da, Dout], q [B, Dv, Dout]; fp32 if out_f32, else a's dtype.
at::Tensor geometry_grad_cuda(const at::Tensor& a, const at::Tensor& v, const at::Tensor& w, const at::Tensor& ra,
                              const at::Tensor& rv, const at::Tensor& p, const at::Tensor& q, const at::Tensor& mu_a,
                              const at::Tensor& mu_v, bool out_f32, const std::string& precision);
// w_i ‖x_i − μ‖² [B, N] fp32 (μ [B, D] or empty; 0 on masked rows).
at::Tensor geometry_row_sq_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& mu);

// ---- The divergence group on the CPU (csrc/cpu/logit.cpp; math in docs/logit.md §3-6) -------
// The PyTorch path's CPU kernel: student, teacher [N, C] float32 on the CPU; keep [N] bool (False =
// dropped row: loss 0, gradient 0); kind "kd" | "forward_kl" | "reverse_kl" | "jsd" (0 < beta < 1)
// | "tvd". Returns (row_loss, lse_s, lse_t) [N] float32, exactly torch_impl.logit.divergence_fwd's
// outputs (kd includes T^2); the backward returns grad_student [N, C] float32 (teacher: PyTorch path).
// The loops are compiled for AVX2 + FMA: divergence_cpu_supported() says whether this CPU runs them.
bool divergence_cpu_supported();
// The loops in use: "avx512", "avx2" (KD_KERNELS_CPU_ISA=avx2 forces them) or "none".
std::string divergence_cpu_isa();
std::tuple<at::Tensor, at::Tensor, at::Tensor> divergence_fwd_cpu(const std::string& kind, const at::Tensor& student,
                                                                  const at::Tensor& teacher, const at::Tensor& keep,
                                                                  double temperature, double beta);
at::Tensor divergence_bwd_cpu(const std::string& kind, const at::Tensor& grad_row, const at::Tensor& student,
                              const at::Tensor& teacher, const at::Tensor& lse_s, const at::Tensor& lse_t,
                              const at::Tensor& keep, double temperature, double beta);

// ---- Batched log-domain Sinkhorn, CPU (csrc/cpu/sinkhorn.cpp; math in docs/sinkhorn.md §4) ---
// cost [B, n, m] (batch stride 0 = one shared cost), a [B, n], b [B, m]; any floating dtypes,
// computed in float64 when any is float64, else float32. Returns (plan [B, n, m] in cost's dtype,
// alphas [L, B, n], betas [L, B, m]): exactly kd_kernels.torch_impl.sinkhorn.sinkhorn_fwd's outputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_fwd_cpu(const at::Tensor& cost, const at::Tensor& a,
                                                                const at::Tensor& b, double epsilon,
                                                                int64_t n_iters);

// ---- The optimal-transport family on CUDA (csrc/cuda/sinkhorn.cu; math in docs/sinkhorn.md) -----
// float32 / float16 / bfloat16 inputs (float64 runs on the torch path), float32 arithmetic.
// Batched log-domain Sinkhorn, the op contract of kd_kernels/ops/sinkhorn.py: cost [B, n, m]
// (strided; batch stride 0 = one shared cost), a [B, n], b [B, m] (strided). tol <= 0: all n_iters
// iterations; tol > 0: every check_every iterations a problem whose L1 row-marginal error is
// <= tol is frozen on the device (n_run[b] = iterations it ran). Returns (plan [B, n, m] in cost's
// dtype, alphas [S, B, n], betas [S, B, m] float32 with S = 1 if implicit else n_iters, n_run [B] int32).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_fwd_cuda(const at::Tensor& cost, const at::Tensor& a,
                                                                             const at::Tensor& b, double epsilon,
                                                                             int64_t n_iters, double tol,
                                                                             int64_t check_every, bool implicit);
// (grad_cost [B, n, m], grad_a [B, n], grad_b [B, m]) in the dtypes of cost / a / b: the unrolled
// reverse recurrence over each problem's n_run[b] steps, or (implicit) the adjoint fixed-point
// iteration at the final potentials. An unneeded gradient is an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_bwd_cuda(const at::Tensor& grad, const at::Tensor& cost,
                                                                 const at::Tensor& a, const at::Tensor& b,
                                                                 const at::Tensor& alphas, const at::Tensor& betas,
                                                                 const at::Tensor& n_run, double epsilon,
                                                                 int64_t n_iters, bool implicit, bool need_cost,
                                                                 bool need_a, bool need_b);
// SinKD (docs/sinkhorn.md §1-3): student, teacher logits [B, C] (1 <= B <= 4096). Returns (loss 0-dim
// in the student's dtype, D [B, B], U [L+1, B], V [L+1, B] float32): torch_impl.sinkhorn_loss_fwd's outputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_loss_fwd_cuda(const at::Tensor& student,
                                                                                  const at::Tensor& teacher,
                                                                                  double temperature, double epsilon,
                                                                                  int64_t n_iters);
// (grad_student, grad_teacher) [B, C] in the inputs' dtypes; grad is the 0-dim upstream gradient
// (read on the device). An unneeded gradient is an empty tensor.
std::tuple<at::Tensor, at::Tensor> sinkhorn_loss_bwd_cuda(const at::Tensor& grad, const at::Tensor& student,
                                                          const at::Tensor& teacher, const at::Tensor& cost,
                                                          const at::Tensor& u, const at::Tensor& v, double temperature,
                                                          double epsilon, bool need_student, bool need_teacher);

}  // namespace kd_kernels
