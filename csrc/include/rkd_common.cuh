// Host checks, input preparation and device helpers shared by the RKD kernel files
// (the math: docs/rkd.md; the dtype and precision policy: docs/precision.md).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <utility>

#include "checks.h"
#include "pairwise_tiles.cuh"

// float32 / float16 / bfloat16 only: float64 runs on the PyTorch path (fewer kernels to compile).
#define KD_DISPATCH_RKD_TYPES(TYPE, NAME, ...)                                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)     \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace kd_kernels {
namespace {

// Near-duplicate threshold of docs/rkd.md section 4: near_ij := i != j and E_ij < kTau (s_i + s_j).
constexpr float kTau = 0.015625f;  // 2^-6
// The reference's clamp of squared distances (pdist) and of norms (F.normalize).
constexpr float kSqClamp = 1e-12f;

// Minimum resident blocks per SM in every RKD kernel's __launch_bounds__: 1 lets ptxas use the
// registers a kernel needs (<= 255); without it, its occupancy heuristic held some kernels at 80-128
// registers and spilled 4-56 B per thread (sm_90, the compile gate's CUDA part).
constexpr int kMinBlocks = 1;

enum class Reduction { kMean, kSum, kNone };

inline Reduction parse_reduction(const std::string& reduction, const char* op) {
  if (reduction == "mean") return Reduction::kMean;
  if (reduction == "sum") return Reduction::kSum;
  if (reduction == "none") return Reduction::kNone;
  TORCH_CHECK(false, op, ": reduction must be one of 'mean', 'sum', 'none', got '", reduction, "'");
  return Reduction::kMean;  // unreachable
}

// true: 3xTF32 for fp32 products ("tf32x3", the default policy); false: one TF32 pass ("tf32").
inline bool parse_precision(const std::string& precision, const char* op) {
  TORCH_CHECK(precision == "tf32x3" || precision == "tf32", op, ": precision must be 'tf32x3' or 'tf32', got '",
              precision, "'");
  return precision == "tf32x3";
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// student [N, Ds] and teacher [N, Dt] on one CUDA device, float32 / float16 / bfloat16, N >= min_rows.
inline void check_rkd_pair(const at::Tensor& student, const at::Tensor& teacher, const char* op, int64_t min_rows) {
  check_cuda(student, op, "student");
  check_cuda(teacher, op, "teacher");
  check_same_device(teacher, student, op, "teacher", "student");
  check_floating(student, op, "student");
  check_floating(teacher, op, "teacher");
  TORCH_CHECK(student.scalar_type() != at::kDouble && teacher.scalar_type() != at::kDouble, op,
              ": float64 inputs run on the PyTorch path (kd_kernels/torch_impl/rkd.py); the CUDA kernels take "
              "float32, float16 or bfloat16, got student ",
              student.scalar_type(), " and teacher ", teacher.scalar_type());
  check_dim(student, 2, op, "student", "[N, Ds]");
  check_dim(teacher, 2, op, "teacher", "[N, Dt]");
  TORCH_CHECK(teacher.size(0) == student.size(0), op, ": teacher must have the student's N = ", student.size(0),
              " rows, got ", teacher.size(0));
  TORCH_CHECK(student.size(0) >= min_rows, op, ": needs N >= ", min_rows, " rows, got N = ", student.size(0));
}

// Contiguous student / teacher of one dtype: their own if they agree, else both float32.
inline std::pair<at::Tensor, at::Tensor> rkd_inputs(const at::Tensor& student, const at::Tensor& teacher) {
  if (student.scalar_type() == teacher.scalar_type()) return {student.contiguous(), teacher.contiguous()};
  return {student.to(at::kFloat).contiguous(), teacher.to(at::kFloat).contiguous()};
}

// One network's rows and what the Gram tiles need: column means and |x~_i|² (fp32), the latter of
// the centred rows as rounded to the MMA input type (so that E = s_i + s_j − 2 G is consistent).
struct RkdPrep {
  at::Tensor x;     // [n, d] contiguous, the input dtype
  at::Tensor mean;  // [d] float32
  at::Tensor sq;    // [n] float32
  int64_t n;
  int64_t d;
};

inline RkdPrep rkd_prepare(const at::Tensor& x) {
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor mean = xf.mean(0).contiguous();
  at::Tensor xc = xf - mean;
  if (x.scalar_type() != at::kFloat) xc = xc.to(x.scalar_type()).to(at::kFloat);
  const at::Tensor sq = (xc * xc).sum(1).contiguous();
  return {x, mean, sq, x.size(0), x.size(1)};
}

// The NaN carrier of both RKD losses (README "Non-finite input"): a 0-dim float32 tensor that is
// 0 when x is finite and NaN when x holds a NaN or an inf (0 · max + 0 · min; no host sync, no
// overflow). The kernels' masks (E > 0, E >= 1e-12) are false for NaN, so without it a non-finite
// input would give a finite loss; it is added to the loss and to each gradient.
inline at::Tensor nan_carrier(const at::Tensor& x) {
  return x.amax().to(at::kFloat).mul(0.0) + x.amin().to(at::kFloat).mul(0.0);
}

// grad as a contiguous float32 vector, after checking its shape ([N, N] / [N] for "none", else one element).
inline at::Tensor rkd_upstream_grad(const at::Tensor& grad, const at::Tensor& student, at::IntArrayRef none_shape,
                                    bool none, const char* op) {
  check_same_device(grad, student, op, "grad", "student");
  if (none) {
    check_sizes(grad, none_shape, op, "grad", none_shape.size() == 2 ? "[N, N]" : "[N]");
  } else {
    TORCH_CHECK(grad.numel() == 1, op, ": grad must have one element for a reduced loss, got shape ", grad.sizes());
  }
  return grad.to(at::kFloat).contiguous().reshape({-1});
}

// smooth-L1 with beta 1: h(x) = x²/2 for |x| < 1, |x| − 1/2 otherwise; h'(x) = clamp(x, −1, 1).
__device__ __forceinline__ float smooth_l1(float x) {
  const float ax = fabsf(x);
  return ax < 1.0f ? 0.5f * x * x : ax - 0.5f;
}
__device__ __forceinline__ float smooth_l1_grad(float x) { return fminf(fmaxf(x, -1.0f), 1.0f); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// The squared distance of pair (i, j) of one network given its Gram entry g = x~_i · x~_j, with the
// near-duplicate rule of docs/rkd.md section 4: near_ij := i != j and s_i + s_j − 2 g < kTau (s_i + s_j)
// -> E_ij from explicit differences of the original rows (fp32). `*near` tells which route was taken.
template <typename scalar_t>
__device__ __forceinline__ float pair_sqdist(const scalar_t* __restrict__ x, const float* __restrict__ sq, int64_t d,
                                             int64_t i, int64_t j, float g, bool* near) {
  const float si = sq[i];
  const float sj = sq[j];
  float e = si + sj - 2.0f * g;
  *near = i != j && e < kTau * (si + sj);
  if (*near) e = tiles::explicit_sqdist(x, d, i, j);
  return e;
}

}  // namespace

// Laplacian product of one row block on tensor cores (defined in csrc/cuda/rkd_distance.cu, used
// by both RKD losses): gacc[i, k] += rowsum[i] · x~_ik − Σ_j a[i − row0, j] · x~_jk for the rows
// row0 .. row0 + rows − 1, x~ = x − mean. a [rows, n] float32 (row-major), rowsum [n] float32,
// x [n, d] contiguous (float32 / float16 / bfloat16), mean [d] float32, gacc [n, d] float32.
// split: 3xTF32 (fp32 x under "tf32x3"), else one TF32 pass. Current stream; launch-checked.
void rkd_laplacian_pass(const at::Tensor& a, const at::Tensor& rowsum, const at::Tensor& x, const at::Tensor& mean,
                        int64_t row0, int64_t rows, bool split, at::Tensor& gacc);

}  // namespace kd_kernels
