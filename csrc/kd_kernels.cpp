// Module init of the compiled extension kd_kernels._C: binds the kernels' launchers as plain
// pybind11 functions (no torch.library ops; see include/kd_ops.h) and build_info().
//
// The Python custom ops of kd_kernels/ops/ call these functions from their CUDA implementation
// (one op per loss direction; never an op inside an op). Each function checks its arguments with
// TORCH_CHECK (RuntimeError in Python) and runs on the current CUDA stream of its inputs' device.
//
// Build macros (set by setup.py and CMakeLists.txt):
//   KD_KERNELS_CUDA_ARCHS  the arch list as a bare token sequence with ':' for ';' (8.0:9.0+PTX)
//   KD_KERNELS_DEBUG       1 for a debug build (-O0 -g, device -G), else 0
#include <cuda.h>  // CUDA_VERSION
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor casters
#include <torch/version.h>            // TORCH_VERSION

#include <string>
#include <vector>

#include "kd_ops.h"

#ifndef KD_KERNELS_CUDA_ARCHS
#define KD_KERNELS_CUDA_ARCHS unknown
#endif
#ifndef KD_KERNELS_DEBUG
#define KD_KERNELS_DEBUG 0
#endif

#define KD_KERNELS_STR_(x) #x
#define KD_KERNELS_STR(x) KD_KERNELS_STR_(x)

namespace py = pybind11;
using namespace pybind11::literals;

namespace kd_kernels {
namespace {

// Names of the functions bound below, in binding order: build_info()["ops"]. Filled by bind_kernel(), so
// the list can never drift from what the module actually provides.
std::vector<std::string>& function_names() {
  static std::vector<std::string> names;
  return names;
}

template <typename Fn, typename... Extra>
void bind_kernel(py::module_& m, const char* name, Fn&& fn, const char* doc, const Extra&... extra) {
  m.def(name, std::forward<Fn>(fn), doc, extra...);
  function_names().emplace_back(name);
}

// "8.0:9.0+PTX" -> {"8.0", "9.0+PTX"}.
std::vector<std::string> split_archs(const std::string& archs) {
  std::vector<std::string> out;
  std::string cur;
  for (char ch : archs) {
    if (ch == ':') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else if (ch != ' ') {
      cur.push_back(ch);
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

py::dict build_info() {
  py::dict info;
  info["cuda_version"] = static_cast<int>(CUDA_VERSION);  // e.g. 13000 for CUDA 13.0
  info["archs"] = split_archs(KD_KERNELS_STR(KD_KERNELS_CUDA_ARCHS));
  info["torch_version_at_build"] = std::string(TORCH_VERSION);
  info["debug"] = static_cast<bool>(KD_KERNELS_DEBUG);
  info["ops"] = function_names();  // the kernel functions of this module (kd_kernels._C.<name>)
  return info;
}

}  // namespace
}  // namespace kd_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace kd_kernels;
  m.doc() = "kd_kernels CUDA C++ kernels: plain functions called by the custom ops of kd_kernels.ops";

  // ---- The divergence group: Hinton KD, reverse KL, JSD, TVD (csrc/cuda/logit.cu) ------------
  ::kd_kernels::bind_kernel(m, "kd_fwd_cuda", &kd_fwd_cuda,
       "(row_loss, lse_s, lse_t) [N] (float32; float64 for float64 logits) of logits [N, C]: "
       "row_loss = T^2 KL(softmax(teacher/T) || softmax(student/T))",
       "student"_a, "teacher"_a, "temperature"_a);
  ::kd_kernels::bind_kernel(m, "kd_bwd_cuda", &kd_bwd_cuda,
       "grad_student [N, C] (student's dtype) = grad_row[r] * T * (q - p)", "grad_row"_a, "student"_a, "teacher"_a,
       "lse_s"_a, "lse_t"_a, "temperature"_a);
  ::kd_kernels::bind_kernel(m, "divergence_fwd_cuda", &divergence_fwd_cuda,
       "(row_loss, lse_s, lse_t) [N] (float32; float64 for float64 logits) of logits [N, C] for kind "
       "'kd' | 'reverse_kl' | 'jsd' | 'tvd' (beta: jsd only, in [0, 1]); one kernel template, kd_fwd_cuda is its 'kd'",
       "kind"_a, "student"_a, "teacher"_a, "temperature"_a, "beta"_a);
  ::kd_kernels::bind_kernel(m, "divergence_bwd_cuda", &divergence_bwd_cuda,
       "grad_student [N, C] (student's dtype) = grad_row[r] * d row_loss[r] / d student for kind "
       "'kd' | 'reverse_kl' | 'jsd' | 'tvd'",
       "kind"_a, "grad_row"_a, "student"_a, "teacher"_a, "lse_s"_a, "lse_t"_a, "temperature"_a, "beta"_a);

  // ---- The divergence group on the CPU (csrc/cpu/logit.cpp) --------------------------------
  ::kd_kernels::bind_kernel(m, "divergence_cpu_supported", &divergence_cpu_supported,
       "True when this CPU runs the AVX2 + FMA loops of divergence_fwd_cpu / divergence_bwd_cpu");
  ::kd_kernels::bind_kernel(m, "divergence_cpu_isa", &divergence_cpu_isa,
       "the row loops in use: 'avx512', 'avx2' (KD_KERNELS_CPU_ISA=avx2 forces them) or 'none'");
  ::kd_kernels::bind_kernel(m, "divergence_fwd_cpu", &divergence_fwd_cpu,
       "(row_loss, lse_s, lse_t) [N] float32 of CPU float32 logits [N, C] for kind 'kd' | 'forward_kl' | "
       "'reverse_kl' | 'jsd' | 'tvd'; keep [N] bool (False: row loss 0)",
       "kind"_a, "student"_a, "teacher"_a, "keep"_a, "temperature"_a, "beta"_a);
  ::kd_kernels::bind_kernel(m, "divergence_bwd_cpu", &divergence_bwd_cpu,
       "grad_student [N, C] float32 = grad_row[r] * d row_loss[r] / d student (0 on dropped rows)",
       "kind"_a, "grad_row"_a, "student"_a, "teacher"_a, "lse_s"_a, "lse_t"_a, "keep"_a, "temperature"_a, "beta"_a);

  // ---- RKD (csrc/cuda/rkd_distance.cu, csrc/cuda/rkd_angle.cu; math in docs/rkd.md) ----------
  ::kd_kernels::bind_kernel(m, "rkd_distance_fwd_cuda", &rkd_distance_fwd_cuda,
       "(loss, mu_s, mu_t): loss 0-dim or [N, N] for reduction='none' (student's dtype), mu_* 0-dim float32. "
       "float32/float16/bfloat16 inputs; precision 'tf32x3' or 'tf32' (fp32 products)",
       "student"_a, "teacher"_a, "reduction"_a, "precision"_a);
  ::kd_kernels::bind_kernel(m, "rkd_distance_bwd_cuda", &rkd_distance_bwd_cuda,
       "(grad_student, grad_teacher); an unneeded gradient is an empty tensor", "grad"_a, "student"_a,
       "teacher"_a, "mu_s"_a, "mu_t"_a, "reduction"_a, "need_student"_a, "need_teacher"_a, "precision"_a);
  ::kd_kernels::bind_kernel(m, "rkd_angle_fwd_cuda", &rkd_angle_fwd_cuda,
       "loss 0-dim or [N] for reduction='none' (student's dtype); precision 'tf32x3' or 'tf32'", "student"_a,
       "teacher"_a, "reduction"_a, "precision"_a);
  ::kd_kernels::bind_kernel(m, "rkd_angle_bwd_cuda", &rkd_angle_bwd_cuda,
       "(grad_student, grad_teacher); an unneeded gradient is an empty tensor", "grad"_a, "student"_a,
       "teacher"_a, "reduction"_a, "need_student"_a, "need_teacher"_a, "precision"_a);

  // ---- Batched log-domain Sinkhorn, CPU (csrc/cpu/sinkhorn.cpp; math in docs/sinkhorn.md §4) ----
  ::kd_kernels::bind_kernel(m, "sinkhorn_fwd_cpu", &sinkhorn_fwd_cpu,
       "(plan [B, n, m] in cost's dtype, alphas [L, B, n], betas [L, B, m]) of the log-domain Sinkhorn on CPU "
       "tensors, cost [B, n, m] (batch stride 0 = shared), a [B, n], b [B, m]: the outputs of "
       "kd_kernels.torch_impl.sinkhorn.sinkhorn_fwd (float64 when any input is float64, else float32)",
       "cost"_a, "a"_a, "b"_a, "epsilon"_a, "n_iters"_a);

  // ---- Feature geometry (csrc/cuda/geometry.cu; math in docs/geometry.md) -------------------
  ::kd_kernels::bind_kernel(m, "geometry_products_cuda", &geometry_products_cuda,
       "(XtWX [B, Ds, Ds], XtWY [B, Ds, Dt], YtWY [B, Dt, Dt], sum w x' [B, Ds], sum w y' [B, Dt], sum w [B]) fp32 "
       "of rows x [B, N, Ds], y [B, N, Dt], x' = (x - shift_x) * rinv_x; empty tensors for w [B, N], rinv_* [B, N], "
       "shift_* [B, D] mean none; precision 'tf32x3' or 'tf32'",
       "x"_a, "y"_a, "w"_a, "rinv_x"_a, "rinv_y"_a, "shift_x"_a, "shift_y"_a, "precision"_a);
  ::kd_kernels::bind_kernel(m, "geometry_grad_cuda", &geometry_grad_cuda,
       "W ((A - 1 mu_a^T) P + (V - 1 mu_v^T) Q) [B, N, Dout] (fp32 if out_f32, else a's dtype); rows times ra, rv "
       "when given; empty tensors mean none; precision 'tf32x3' or 'tf32'",
       "a"_a, "v"_a, "w"_a, "ra"_a, "rv"_a, "p"_a, "q"_a, "mu_a"_a, "mu_v"_a, "out_f32"_a, "precision"_a);
  ::kd_kernels::bind_kernel(m, "geometry_row_sq_cuda", &geometry_row_sq_cuda,
       "w_i |x_i - mu|^2 [B, N] fp32 of rows x [B, N, D] (w [B, N], mu [B, D] fp32: empty tensors mean none)",
       "x"_a, "w"_a, "mu"_a);

  // ---- Optimal transport on CUDA (csrc/cuda/sinkhorn.cu; math in docs/sinkhorn.md) ----------
  ::kd_kernels::bind_kernel(m, "sinkhorn_fwd_cuda", &sinkhorn_fwd_cuda,
       "(plan [B, n, m] in cost's dtype, alphas [S, B, n], betas [S, B, m] float32, n_run [B] int32) of the batched "
       "log-domain Sinkhorn: cost [B, n, m] (strided, batch stride 0 = shared), a [B, n], b [B, m]; tol > 0 freezes "
       "converged problems on the device every check_every iterations; S = 1 if implicit else n_iters",
       "cost"_a, "a"_a, "b"_a, "epsilon"_a, "n_iters"_a, "tol"_a, "check_every"_a, "implicit"_a);
  ::kd_kernels::bind_kernel(m, "sinkhorn_bwd_cuda", &sinkhorn_bwd_cuda,
       "(grad_cost, grad_a, grad_b) of sinkhorn_fwd_cuda (unrolled over n_run[b] steps, or the implicit adjoint "
       "iteration); an unneeded gradient is an empty tensor",
       "grad"_a, "cost"_a, "a"_a, "b"_a, "alphas"_a, "betas"_a, "n_run"_a, "epsilon"_a, "n_iters"_a, "implicit"_a,
       "need_cost"_a, "need_a"_a, "need_b"_a);
  ::kd_kernels::bind_kernel(m, "sinkhorn_loss_fwd_cuda", &sinkhorn_loss_fwd_cuda,
       "(loss 0-dim in the student's dtype, D [B, B], U [L+1, B], V [L+1, B] float32) of SinKD on logits [B, C]",
       "student"_a, "teacher"_a, "temperature"_a, "epsilon"_a, "n_iters"_a);
  ::kd_kernels::bind_kernel(m, "sinkhorn_loss_bwd_cuda", &sinkhorn_loss_bwd_cuda,
       "(grad_student, grad_teacher) [B, C] of SinKD; an unneeded gradient is an empty tensor", "grad"_a,
       "student"_a, "teacher"_a, "cost"_a, "u"_a, "v"_a, "temperature"_a, "epsilon"_a, "need_student"_a,
       "need_teacher"_a);

  m.def("build_info", &kd_kernels::build_info,
        "dict(cuda_version, archs, torch_version_at_build, debug, ops): how this library was built; "
        "ops = the kernel functions of this module");
}
